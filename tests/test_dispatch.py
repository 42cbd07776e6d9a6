"""The sorted-once MoE dispatch equals the per-expert `torch.where` loop it replaced, and its dense (traceable) twin."""

from __future__ import annotations

import pytest
import torch

import model as M
import sbmoe.layers


def reference_dispatch(experts, x, routing):
    """sbmoe.layers.dispatch as it was before the sort-once rewrite: one torch.where per expert."""
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        rows, slot = torch.where(routing.indices == e)
        if rows.numel() == 0:
            continue
        y = expert(x[rows]) * routing.weights[rows, slot, None].to(x.dtype)
        out.index_add_(0, rows, y.to(out.dtype))
    return out


@pytest.mark.parametrize("n, k", [(1, 1), (1, 2), (7, 2), (300, 2), (64, 1)])
def test_sorted_dispatch_equals_the_per_expert_loop(n, k):
    torch.manual_seed(n + k)
    experts = torch.nn.ModuleList(sbmoe.layers.Expert(16, 32) for _ in range(8)).eval().requires_grad_(False)
    x = torch.randn(n, 16)
    logits = torch.randn(n, 8)
    logits[:, 5] -= 100  # expert 5 never chosen: an empty group
    routing = sbmoe.layers.route(logits, k, renormalize=k > 1)
    with torch.no_grad():
        ref = reference_dispatch(experts, x, routing)
        assert torch.allclose(sbmoe.layers.dispatch(experts, x, routing), ref, atol=1e-6, rtol=0)
        assert torch.allclose(sbmoe.layers.dispatch_dense(experts, x, routing), ref, atol=1e-6, rtol=0)
        traced = torch.jit.trace(lambda v: sbmoe.layers.dispatch(experts, v, routing), x)  # dense while traced
        assert torch.allclose(traced(x), ref, atol=1e-6, rtol=0)
        assert "index_add" not in str(traced.graph) and "argsort" not in str(traced.graph)


@pytest.mark.parametrize("routing", ["learned", "random"])
def test_token_level_moe_encodes_as_before(tiny_backbone, monkeypatch, routing):
    torch.manual_seed(0)
    model = M.TinyBERTMoERegular.from_backbone(str(tiny_backbone), pooling="mean", num_experts=4, top_k=2,
                                               routing=routing).eval()  # fmt: skip
    with torch.no_grad():
        for block in model.moe_blocks():  # experts differ, so a wrong assignment shows
            for expert in block.experts:
                expert.fc_in.weight.add_(0.1 * torch.randn_like(expert.fc_in.weight))
    ids = torch.randint(5, 30, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        new = [model.encode(ids[:1, :4], mask[:1, :4]), model.encode(ids, mask)]  # batch 1, and a ragged batch
        monkeypatch.setattr(sbmoe.layers, "dispatch", reference_dispatch)
        old = [model.encode(ids[:1, :4], mask[:1, :4]), model.encode(ids, mask)]
    for a, b in zip(new, old):
        assert torch.allclose(a, b, atol=1e-6, rtol=0)
