"""MoE building blocks: routers, routing functions (learned, dense, random by integer keys, domain), expert dispatch, auxiliary losses, experts, the SB-MoE head and the token-level sparse feed-forward."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Routing:
    """One router decision: chosen expert indices and their weights, plus float32 logits and probabilities."""

    logits: torch.Tensor  # (N, E) float32
    probs: torch.Tensor  # (N, E) float32 softmax
    indices: torch.Tensor  # (N, k)
    weights: torch.Tensor  # (N, k)

    def select(self, keep: torch.Tensor) -> Routing:
        """The rows where `keep` is true (e.g. the non-padding tokens)."""
        keep = keep.reshape(-1).bool()
        return Routing(self.logits[keep], self.probs[keep], self.indices[keep], self.weights[keep])


class Router(nn.Linear):
    """A linear gate whose logits are float32 even under autocast (Switch, Mixtral)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())


class NoisyMLPRouter(nn.Module):
    """Sokli et al.'s gate: hidden -> hidden/2 -> ReLU -> E; in training the logits get noise
    N(0, 1) * softplus(a learned linear map of the input)."""

    def __init__(self, hidden: int, num_experts: int):
        super().__init__()
        self.fc_in = nn.Linear(hidden, hidden // 2)
        self.fc_out = nn.Linear(hidden // 2, num_experts)
        self.noise = nn.Linear(hidden, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x = x.float()
            logits = self.fc_out(F.relu(self.fc_in(x)))
            if self.training:
                logits = logits + torch.randn_like(logits) * F.softplus(self.noise(x))
        return logits


def route(logits: torch.Tensor, top_k: int, renormalize: bool, temperature: float = 1.0) -> Routing:
    """Softmax (of logits / temperature), top-k, optional renormalisation; all in float32.

    With top-1 the raw softmax probability is kept as the weight (Switch), or the router would get
    no gradient; with k > 1 the k weights are renormalised to sum to 1 (Mixtral).
    """
    logits = logits.float()
    probs = (logits / temperature).softmax(dim=-1)
    weights, indices = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(logits, probs, indices, weights)


def route_all(logits: torch.Tensor, temperature: float = 1.0) -> Routing:
    """Every expert, weighted by its softmax probability (SB-MoE's `all` inference mode)."""
    probs = (logits.float() / temperature).softmax(dim=-1)
    return Routing(logits.float(), probs, torch.arange(probs.shape[-1], device=probs.device).expand_as(probs), probs)


def route_fixed(n: int, num_experts: int, top_k: int, device, random: bool, scores=None) -> Routing:
    """Control routings: k uniformly random distinct experts per input (or expert 0 for a dense head),
    each with the fixed weight 1/k; the logits are uniform, so the balance statistics stay defined.
    `scores` (N, E) replace the fresh uniform draws (evaluation: a fixed pseudo-random function of the input)."""
    if random:
        draws = torch.rand(n, num_experts, device=device) if scores is None else scores
        indices = draws.argsort(-1)[:, :top_k]
    else:
        indices = torch.zeros(n, top_k, dtype=torch.long, device=device)
    logits = torch.zeros(n, num_experts, device=device)
    return Routing(logits, logits.softmax(-1), indices, torch.full((n, top_k), 1.0 / top_k, device=device))


def route_domain(domains: torch.Tensor | None, num_experts: int, n: int, device, training: bool) -> Routing:
    """The domain oracle: row i goes to expert `domains[i]` at weight 1. Without domains (evaluation on a dataset
    no expert was trained for) every expert at weight 1/E, the rule train.py and eval.py document; in
    training, domains are required."""
    if domains is None:
        if training:
            raise ValueError("--routing domain: training needs each example's dataset (domains), got none")
        return route_all(torch.zeros(n, num_experts, device=device))
    domains = domains.reshape(-1).to(device)
    if domains.shape[0] != n or bool(((domains < 0) | (domains >= num_experts)).any()):
        raise ValueError(f"--routing domain: {n} rows need {n} dataset indices in 0..{num_experts - 1}")
    logits = torch.zeros(n, num_experts, device=device)
    return Routing(logits, logits.softmax(-1), domains[:, None].long(), torch.ones(n, 1, device=device))


# Random routing at evaluation is a fixed function of integers (token ids and positions), never of float
# hidden states: a last-bit difference (another CPU's kernels, another batch's padding, bf16, ONNX) cannot send
# an input to other experts. Integer arithmetic modulo a prime below 2**31 keeps every product inside int64.
_PRIME = 2_147_483_647  # 2**31 - 1


RANDOM_ROUTING = "integer keys of token ids and positions"  # what a result records (provenance.py); before: float hash


def _mix(x: torch.Tensor) -> torch.Tensor:
    """[0, _PRIME) to itself, int64 in and out: an affine step, a squaring (the non-linear step: without it, sums of
    keys would not depend on the order of the tokens), another affine step."""
    x = (x * 48271 + 11) % _PRIME
    x = (x * x + 7) % _PRIME  # below 2**62
    return (x * 16807 + 3) % _PRIME


def token_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) int64 routing key of each token from its id and its position among the sequence's tokens, 0 on
    padding: the same whatever the batch, its padding, its order or the precision."""
    mask = attention_mask.long()
    positions = mask.cumsum(-1) - 1  # (B, T) the position among real tokens, wherever the padding sits
    return (_mix((_mix(input_ids.long() + 1) + positions + 1) % _PRIME) + 1) * mask


def sequence_keys(keys: torch.Tensor) -> torch.Tensor:
    """(B,) the routing key of each sequence (a pooled vector's), from its tokens' keys (B, T)."""
    return _mix(keys.sum(-1) % _PRIME)


def key_scores(keys: torch.Tensor, num_experts: int, salt: int = 0) -> torch.Tensor:
    """(N, E) float32 pseudo-uniform scores from (N,) integer keys, distinct within a row and exact in float32
    (integers below 2**24), so the k smallest are the same experts on every machine and in ONNX. `salt` makes
    another, independent function (one per MoE layer: each layer draws its own experts, as in training)."""
    e = torch.arange(num_experts, device=keys.device)
    keys = _mix((keys.reshape(-1, 1) + salt) % _PRIME) if salt else keys.reshape(-1, 1)
    s = _mix((keys + _mix(e + 1)) % _PRIME)  # (N, E)
    return ((s % (2**24 // num_experts)) * num_experts + e).float()


_ROUTING_KEYS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("routing_keys", default=None)


@contextlib.contextmanager
def routing_keys(keys: torch.Tensor | None):
    """The (B, T) token keys of the batch being encoded, for routers deep inside the backbone's layers (the
    token-level MoE's random control), for the length of one forward; nothing stays on a module."""
    token = _ROUTING_KEYS.set(keys)
    try:
        yield
    finally:
        _ROUTING_KEYS.reset(token)


def current_routing_keys() -> torch.Tensor:
    keys = _ROUTING_KEYS.get()
    if keys is None:
        raise RuntimeError("random routing at evaluation needs the routing keys of the inputs (encode through "
                           "`embed`, or pass the keys)")  # fmt: skip
    return keys


def dispatch(experts: nn.ModuleList, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Sum over the chosen experts of weight * expert(x), run only on the rows routed to each expert.

    The (row, slot) assignments are sorted by expert once (stable, so each expert sees its rows in
    ascending order), each expert runs on its contiguous slice, and one `index_add_` sums the weighted
    outputs back in expert order: the same arithmetic as a loop of `torch.where` per expert, with a
    handful of ops per expert instead of ten (what a batch-1 query pays for in Python dispatch).
    """
    if torch.jit.is_tracing():  # ONNX export traces the encoder: no data-dependent shapes in the graph
        return dispatch_dense(experts, x, routing)
    k = routing.indices.shape[-1]
    flat = routing.indices.reshape(-1)  # (N*k,) expert of each assignment, row-major
    order = flat.argsort(stable=True)
    rows = order // k  # (N*k,) the row of each assignment, grouped by expert
    weights = routing.weights.reshape(-1)[order, None].to(x.dtype)  # (N*k, 1)
    counts = torch.bincount(flat, minlength=len(experts)).tolist()
    xs = x[rows]  # (N*k, H)
    ys, start = [], 0
    for expert, n in zip(experts, counts):
        if n:
            ys.append(expert(xs[start : start + n]))
        start += n
    if not ys:
        return torch.zeros_like(x)
    y = (torch.cat(ys) if len(ys) > 1 else ys[0]) * weights
    return torch.zeros_like(x).index_add_(0, rows, y.to(x.dtype))  # (N, H)


def dispatch_dense(experts: nn.ModuleList, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """`dispatch` without data-dependent shapes or branches, what `dispatch` does while traced (ONNX export): every expert runs
    on every row and is weighted 0 where it was not chosen. Equal to `dispatch` up to float rounding;
    E/k times the expert FLOPs, which costs little for SB-MoE's pooled rows."""
    w = torch.zeros(x.shape[0], len(experts), dtype=routing.weights.dtype, device=x.device)
    w = w.scatter_add(1, routing.indices, routing.weights).to(x.dtype)  # (N, E)
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        out = out + w[:, e, None] * expert(x)
    return out


def load_balancing_loss(router_logits: torch.Tensor, top_k: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch loss E * sum_i f_i * P_i over the rows where mask is true (padding never counts).

    f_i is the fraction of routed assignments that went to expert i (k per row), P_i the mean router
    probability of expert i. Equals 1 under perfectly uniform routing.
    """
    logits = router_logits.float().reshape(-1, router_logits.shape[-1])  # (N, E)
    if mask is not None:
        logits = logits[mask.reshape(-1).bool()]
    num_experts = logits.shape[-1]
    probs = logits.softmax(dim=-1)
    chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, num_experts).sum(1).float()  # (N, E)
    f = chosen.mean(0) / top_k
    p = probs.mean(0)
    return num_experts * (f * p).sum()


def gate_mse_loss(probs: torch.Tensor) -> torch.Tensor:
    """The seed code's balance loss: mean squared difference between mean gate probabilities and 1/E."""
    return (probs.float().mean(0) - 1.0 / probs.shape[-1]).pow(2).mean()


def router_z_loss(router_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean squared logsumexp of the router logits, keeping them small."""
    logits = router_logits.float().reshape(-1, router_logits.shape[-1])
    if mask is not None:
        logits = logits[mask.reshape(-1).bool()]
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


def routing_stats(indices: torch.Tensor, probs: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor]:
    """Assignments per expert and mean router entropy, detached, for logging and plots."""
    load = torch.bincount(indices.reshape(-1), minlength=num_experts).float()
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
    return {"load": load.detach(), "entropy": entropy.detach()}


@contextlib.contextmanager
def record_outputs(modules: list[nn.Module]):
    """Collect the outputs of `modules` during one forward (transformers' OutputRecorder idea).

    The hooks live only inside the `with`: the recomputation that gradient checkpointing runs
    during backward does not record twice, and nothing is left on the modules between calls.
    """
    outputs: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda _m, _in, out: outputs.append(out)) for m in modules]
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


class Expert(nn.Module):
    """A small FFN: Linear -> activation -> (dropout) -> Linear."""

    def __init__(self, hidden: int, inner: int, zero_init_out: bool = False, act: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.fc_in = nn.Linear(hidden, inner)
        self.fc_out = nn.Linear(inner, hidden)
        self.act = nn.GELU() if act == "gelu" else nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc_out.zero_init = zero_init_out  # SB-MoE (residual-zero): adds exactly 0 at step 0 (BiEncoder._init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(self.dropout(self.act(self.fc_in(x))))

    def flops(self) -> float:
        return 2.0 * 2 * self.fc_in.in_features * self.fc_in.out_features


# The SB-MoE designs of the literature, as data: where the block sits, its gate, experts and output.
SBMOE_DESIGNS = {
    # ours: pooled vector, linear gate, GELU experts of hidden/2 whose output starts at zero, added back
    "residual-zero": dict(per_token=False, gate="linear", act="gelu", inner=0.5, dropout=0.0, zero_init=True,
                          renormalize=None, normalize_mix=False, aux="switch", top_k=1, gate_temperature=1.0),  # fmt: skip
    # Sokli et al. (FaySokli/SB-MoE): noisy MLP gate, top-1 raw probability, L2-normalised mixture + pooled
    "sokli": dict(per_token=False, gate="noisy-mlp", act="relu", inner=0.5, dropout=0.0, zero_init=False,
                  renormalize=False, normalize_mix=True, aux=None, top_k=1, gate_temperature=1.0),  # fmt: skip
    # the seed paper's code: per token on the last hidden states, LayerNorm, gate with temperature, top-2
    "seed": dict(per_token=True, gate="linear", act="gelu", inner=2.0, dropout=0.1, zero_init=False,
                 renormalize=True, normalize_mix=False, aux="gate-mse", top_k=2, gate_temperature=5.0),  # fmt: skip
}


ROUTINGS = ("learned", "dense", "random", "domain")  # dense: one expert, no gate; random: uniform random experts;


# domain: the oracle control, each input to the expert of its training dataset (as many experts as datasets)
MOE_ROUTINGS = ("learned", "random")  # the token-level MoE's (its dense control is the baseline itself)


class SingleBlockMoE(nn.Module):
    """SB-MoE: one MoE block after the last layer, in one of `SBMOE_DESIGNS`, with learned, dense or
    random routing (the last two are the controls that separate routing from added capacity)."""

    def __init__(self, hidden: int, config):  # config: model.RetrieverConfig
        super().__init__()
        d = self.design = SBMOE_DESIGNS[config.design]
        self.routing_mode, self.top_k = config.routing, config.top_k
        self.temperature, self.noise_std = config.gate_temperature, config.noise_std
        self.num_experts = 1 if config.routing == "dense" else config.num_experts
        inner = config.expert_dim or int(hidden * d["inner"])
        self.norm = nn.LayerNorm(hidden) if d["per_token"] else None
        self.router = None
        if config.routing == "learned":
            self.router = NoisyMLPRouter(hidden, self.num_experts) if d["gate"] == "noisy-mlp" else Router(
                hidden, self.num_experts
            )
        self.experts = nn.ModuleList(
            Expert(hidden, inner, zero_init_out=d["zero_init"], act=d["act"], dropout=d["dropout"])
            for _ in range(self.num_experts)
        )

    def choose(self, x: torch.Tensor, mode: str, keys: torch.Tensor | None = None,
               domains: torch.Tensor | None = None) -> Routing:  # fmt: skip
        """`keys` (N,): the rows' integer routing keys, which random routing needs at evaluation; `domains` (N,):
        each row's dataset, which the domain oracle routes by."""
        if self.routing_mode == "domain":  # at evaluation, `all` is the same gateless ensemble as random's
            known = domains if (self.training or mode != "all") else None
            return route_domain(known, self.num_experts, x.shape[0], x.device, self.training)
        if self.router is None:
            if mode == "all" and not self.training and self.routing_mode == "random":  # the gateless ensemble
                return route_all(torch.zeros(x.shape[0], self.num_experts, device=x.device))  # each expert at 1/E
            k = 1 if self.routing_mode == "dense" else self.top_k
            scores = None
            if self.routing_mode == "random" and not self.training:
                if keys is None:
                    raise ValueError("random routing at evaluation needs the rows' routing keys")
                scores = key_scores(keys, self.num_experts)
            return route_fixed(x.shape[0], self.num_experts, k, x.device, self.routing_mode == "random", scores)
        logits = self.router(x)
        if self.noise_std > 0 and self.training:
            logits = logits + torch.randn_like(logits) * self.noise_std
        if mode == "all" and not self.training:
            return route_all(logits, self.temperature)
        renormalize = self.design["renormalize"]
        return route(logits, self.top_k, self.top_k > 1 if renormalize is None else renormalize, self.temperature)

    def forward(self, x: torch.Tensor, mode: str = "top1", keys: torch.Tensor | None = None,
                domains: torch.Tensor | None = None) -> tuple[torch.Tensor, Routing]:  # fmt: skip
        """x: (N, H) rows to transform (pooled vectors, or the non-padding tokens of the seed design); keys: (N,);
        domains: (N,) dataset index of each row, for `--routing domain`."""
        z = self.norm(x) if self.norm is not None else x
        routing = self.choose(z, mode, keys, domains)
        mixed = dispatch(self.experts, z, routing)  # (N, H)
        if self.design["normalize_mix"]:
            mixed = F.normalize(mixed, dim=-1, eps=1e-6)
        return x + mixed, routing

    def aux_loss(self, routing: Routing, coef: float) -> torch.Tensor | None:
        if self.router is None or not self.design["aux"] or coef == 0:
            return None
        if self.design["aux"] == "gate-mse":
            return coef * gate_mse_loss(routing.probs)
        return coef * load_balancing_loss(routing.logits, self.top_k)

    def active_experts(self, inference_mode: str) -> int:
        if self.routing_mode in ("dense", "domain") and inference_mode != "all":
            return 1
        if self.routing_mode == "dense":
            return 1
        return self.num_experts if inference_mode == "all" else self.top_k

    def flops(self, inference_mode: str) -> float:
        """Forward FLOPs for one input row: gate plus the active experts."""
        gate = sum(2.0 * m.in_features * m.out_features for m in (self.router.modules() if self.router else [])
                   if isinstance(m, nn.Linear) and m is not getattr(self.router, "noise", None))  # fmt: skip
        return gate + self.active_experts(inference_mode) * self.experts[0].flops()


class SparseMoEFeedForward(nn.Module):
    """Token-level top-k MoE replacing a BERT layer's FFN (intermediate + output.dense).

    It is installed as `layer.intermediate` with `layer.output.dense` set to Identity, so BertOutput
    still applies dropout, the residual and LayerNorm. Like Mixtral it routes every position and the
    model masks padding out of the auxiliary losses; the model reads the router logits back with
    `record_outputs` on `router`, so no routing state is kept on the module.
    """

    def __init__(self, hidden: int, inner: int, num_experts: int, top_k: int, routing: str = "learned", layer: int = 0):
        super().__init__()
        self.top_k, self.routing_mode = top_k, routing
        self.router = Router(hidden, num_experts, bias=False) if routing == "learned" else RandomRouter(num_experts,
                                                                                                       salt=layer + 1)
        self.experts = nn.ModuleList(Expert(hidden, inner) for _ in range(num_experts))

    def decide(self, router_out: torch.Tensor) -> Routing:
        """The routing from the router's output: learned top-k renormalised, or k random experts at weight 1/k."""
        if self.routing_mode == "learned":
            return route(router_out, self.top_k, renormalize=True)
        return route_fixed(router_out.shape[0], router_out.shape[-1], self.top_k, router_out.device, True, router_out)

    @torch.no_grad()
    def upcycle(self, intermediate_dense: nn.Linear, output_dense: nn.Linear) -> None:
        """Every expert starts as a copy of the dense FFN, so the layer equals it at step 0."""
        for expert in self.experts:
            expert.fc_in.load_state_dict(intermediate_dense.state_dict())
            expert.fc_out.load_state_dict(output_dense.state_dict())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, T, H)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])  # (B*T, H)
        return dispatch(self.experts, flat, self.decide(self.router(flat))).reshape_as(hidden_states)


class RandomRouter(nn.Module):
    """The token-level MoE's random-routing control: no parameters; (N, E) scores whose top-k pick the experts,
    fresh uniform draws in training and at evaluation a fixed function of each token's id and position (the
    routing keys of the batch being encoded, `routing_keys`), salted by its layer so that layers draw
    independently."""

    def __init__(self, num_experts: int, salt: int = 1):
        super().__init__()
        self.num_experts, self.salt = num_experts, salt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            return torch.rand(x.shape[0], self.num_experts, device=x.device)
        return key_scores(current_routing_keys(), self.num_experts, self.salt)
