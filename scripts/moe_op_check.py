"""Does this onnxruntime run its sparse MoE contrib operator (com.microsoft.MoE) on the CPU, and with which GELU?
A one-node graph (8 tokens, 4 experts, top-2, renormalised weights, as the token-level MoE routes) against the
same computation in PyTorch with exact and with tanh-approximated GELU. The token-level MoE's experts use exact GELU.

    python scripts/moe_op_check.py
"""

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper

E, H, INNER, N, K = 4, 8, 16, 8, 2
rng = np.random.default_rng(0)
w1 = rng.standard_normal((E, INNER, H)).astype(np.float32)  # fc1 weights per expert, [inner, hidden] as nn.Linear
w2 = rng.standard_normal((E, H, INNER)).astype(np.float32)
x = rng.standard_normal((N, H)).astype(np.float32)
logits = rng.standard_normal((N, E)).astype(np.float32)


def moe_session(weights: dict, hidden: int, experts: int, threads: int | None = None) -> ort.InferenceSession:
    """A one-node com.microsoft.MoE graph (top-K, renormalised, GELU) over `weights` (w1, b1, w2, b2; biases may be
    absent)."""
    names = [n if n in weights else "" for n in ("w1", "b1", "w2", "b2")]
    node = helper.make_node("MoE", ["x", "router", *names], ["y"], domain="com.microsoft", k=K,
                            activation_type="gelu", normalize_routing_weights=1)  # fmt: skip
    graph = helper.make_graph(
        [node], "moe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, hidden]),
         helper.make_tensor_value_info("router", TensorProto.FLOAT, [None, experts])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, hidden])],
        [helper.make_tensor(n, TensorProto.FLOAT, a.shape, a.ravel()) for n, a in weights.items()],
    )  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(helper.make_model(graph, opset_imports=opsets).SerializeToString(), options,
                                providers=["CPUExecutionProvider"])  # fmt: skip


session = moe_session({"w1": w1, "w2": w2}, H, E)
y = session.run(None, {"x": x, "router": logits})[0]
print(f"onnxruntime {ort.__version__}: com.microsoft.MoE runs on the CPU provider; output scale {np.abs(y).max():.1f}")
probs = torch.tensor(logits).softmax(-1)
weights, experts = probs.topk(K, -1)
weights = weights / weights.sum(-1, keepdim=True)
for approximate in ("none", "tanh"):
    ref = torch.zeros(N, H)
    for n in range(N):
        for j in range(K):
            e = int(experts[n, j])
            hidden = F.gelu(torch.tensor(x[n]) @ torch.tensor(w1[e]).T, approximate=approximate)
            ref[n] += weights[n, j] * (hidden @ torch.tensor(w2[e]).T)
    print(f"max |difference| to PyTorch with GELU approximate={approximate!r}: {np.abs(y - ref.numpy()).max():.1e}")

# One MoE layer at the token-level MoE's shapes (a 23-token query, hidden 384, 8 experts of 1536, top-2), p50 of
# interleaved calls: the operator against the project's sorted dispatch and against the dense FFN it replaces.
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for sbmoe
from sbmoe.layers import Expert, dispatch, route  # noqa: E402

torch.set_num_threads(2)
E, H, INNER, N = 8, 384, 1536, 23
experts = torch.nn.ModuleList(Expert(H, INNER) for _ in range(E)).eval()
dense = Expert(H, INNER).eval()
stack = lambda attr: torch.stack([getattr(e, attr).weight for e in experts]).detach().numpy()  # noqa: E731
bias = lambda attr: torch.stack([getattr(e, attr).bias for e in experts]).detach().numpy()  # noqa: E731
inits = {"w1": stack("fc_in"), "b1": bias("fc_in"), "w2": stack("fc_out"), "b2": bias("fc_out")}
session = moe_session(inits, H, E, threads=2)
xs = torch.randn(N, H)
logits = torch.randn(N, E)
with torch.inference_mode():
    ref = dispatch(experts, xs, route(logits, K, renormalize=True))
    out = session.run(None, {"x": xs.numpy(), "router": logits.numpy()})[0]
    print(f"layer at {N} tokens: max |difference| operator vs dispatch {np.abs(out - ref.numpy()).max():.1e} "
          f"(output scale {ref.abs().max():.2f})")  # fmt: skip
    fns = {"dense FFN (torch)": lambda: dense(xs), "sorted dispatch (torch)": lambda: dispatch(
        experts, xs, route(logits, K, renormalize=True)), "com.microsoft.MoE (onnxruntime)": lambda: session.run(
        None, {"x": xs.numpy(), "router": logits.numpy()})}  # fmt: skip
    times = {k: [] for k in fns}
    for _ in range(300):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
base = statistics.median(times["dense FFN (torch)"])
for k, v in times.items():
    print(f"{k}: p50 {statistics.median(v) * 1e3:.2f} ms ({statistics.median(v) / base:.2f}x the dense FFN)")
