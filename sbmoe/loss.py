"""InfoNCE with in-batch and hard negatives, exact across DDP ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sbmoe.device import world_size


def gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated; the local slot is the live tensor, so its gradient survives.

    Identity with one process. Other ranks' rows carry no gradient here; each rank back-propagates
    into its own slot, and DDP's gradient averaging plus the one world-size factor in
    ``info_nce`` make the sum exact.
    """
    if world_size() == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[dist.get_rank()] = t
    return torch.cat(parts, dim=0)


def info_nce(
    q_reps: torch.Tensor,  # (B, H)
    d_reps: torch.Tensor,  # (B * (1 + N), H): query i's positive at i * (1 + N), its negatives after it
    temperature: float,
    doc_ids: torch.Tensor | None = None,  # (B * (1 + N),) integer document ids
    pos_ids: torch.Tensor | None = None,  # (B, P) every known positive of each query, -1 padded
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE over every document of every rank; returns (loss, logits).

    Logits are (world*B, world*B*(1+N)): each rank scores all gathered queries against all gathered
    documents, so the gradients of every rank's embeddings are exact after DDP's averaging. A known
    positive of a query that is not its target is masked out rather than used as a negative.
    """
    q_all, d_all = gather_with_grad(q_reps), gather_with_grad(d_reps)
    logits = (q_all @ d_all.T).float() / temperature  # (W*B, W*B*(1+N))
    group = d_all.shape[0] // q_all.shape[0]
    target = torch.arange(q_all.shape[0], device=logits.device) * group
    if doc_ids is not None and pos_ids is not None:
        doc_all, pos_all = gather_with_grad(doc_ids), gather_with_grad(pos_ids)
        known = (doc_all[None, :, None] == pos_all[:, None, :]).any(-1)  # (W*B, W*B*(1+N))
        known[torch.arange(len(target)), target] = False
        logits = logits.masked_fill(known, torch.finfo(logits.dtype).min)
    loss = F.cross_entropy(logits, target) * world_size()  # the one world-size correction
    return loss, logits
