"""Run under `torchrun --nproc_per_node 2` (gloo): one DDP step of a tiny SB-MoE, results saved for the test.

Each rank takes its slice of a fixed global batch; rank 0 writes the loss (without the world-size
factor), the logits' shape and the averaged gradients, which the test compares with one
single-process step over the whole batch.
"""

import os
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, sys.argv[3])
from ddp_batch import global_batch, tiny_model  # noqa: E402


def main(backbone: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = tiny_model(backbone)
    ddp = DistributedDataParallel(model, find_unused_parameters=True)
    inputs = global_batch()
    B = inputs["query_input_ids"].shape[0] // world
    group = inputs["doc_input_ids"].shape[0] // inputs["query_input_ids"].shape[0]
    local = {}
    for k, v in inputs.items():
        per = B * group if k.startswith("doc") else B
        local[k] = v[rank * per : (rank + 1) * per]
    out_ = ddp(**local)
    out_.loss.backward()
    if rank == 0:
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.save({"world": world, "loss": out_.loss.detach() / world, "logits_shape": tuple(out_.logits.shape), "grads": grads}, out)
    dist.barrier()
    # Leave without running gloo's C++ teardown: on some machines one rank aborts there after its work is done
    # ("terminate called without an active exception") and the other waits for it forever.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
