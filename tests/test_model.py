"""The three architectures: equal to the baseline at init, exact dispatch, balance loss, round trips."""

import pytest
import torch
from conftest import MINILM, needs_shared

from model import VARIANTS, load_model
from sbmoe.layers import Router, Routing, dispatch, load_balancing_loss, route


def batch(vocab=30, lengths=(7, 3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    ids = torch.randint(5, vocab, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids[:, 0] = 2  # [CLS]
    return ids * mask, mask


def build(kind, backbone, **kw):
    return VARIANTS[kind].from_backbone(str(backbone), pooling=kw.pop("pooling", "mean"), **kw).eval()


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_moe_models_equal_baseline_at_init(tiny_backbone, top_k, pooling):
    ids, mask = batch()
    base = build("baseline", tiny_backbone, pooling=pooling).encode(ids, mask)
    for kind in ("sbmoe", "moe"):
        model = build(kind, tiny_backbone, pooling=pooling, top_k=top_k, num_experts=4)
        assert (model.encode(ids, mask) - base).abs().max().item() < 1e-5, kind


def test_index_dispatch_equals_masked_loop_over_all_experts():
    torch.manual_seed(0)
    from sbmoe.layers import Expert

    experts = torch.nn.ModuleList(Expert(16, 8) for _ in range(5))
    router = Router(16, 5)
    x = torch.randn(40, 16)
    routing = route(router(x), top_k=2, renormalize=True)
    naive = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        w = (routing.weights * (routing.indices == e)).sum(-1, keepdim=True)  # 0 where e is not chosen
        naive += w * expert(x)
    assert torch.allclose(dispatch(experts, x, routing), naive, atol=1e-6)


def test_topk_weights_sum_to_one_and_top1_keeps_the_probability():
    torch.manual_seed(0)
    router, x = Router(8, 4), torch.randn(10, 8)
    r2 = route(router(x), top_k=2, renormalize=True)
    assert torch.allclose(r2.weights.sum(-1), torch.ones(10))
    r1 = route(router(x), top_k=1, renormalize=False)
    assert torch.allclose(r1.weights[:, 0], r1.probs.max(-1).values)


def test_balance_loss_is_one_under_uniform_routing_and_ignores_padding():
    E = 4
    # each token prefers a different expert in turn, with equal probability mass overall
    logits = torch.eye(E).repeat(3, 1) * 2.0  # (12, E): f_i = P_i = 1/E
    assert load_balancing_loss(logits, top_k=1).item() == pytest.approx(1.0, abs=1e-6)
    assert load_balancing_loss(torch.zeros(12, E), top_k=2).item() == pytest.approx(1.0, abs=1e-6)
    skewed = torch.tensor([[5.0, 0, 0, 0]]).repeat(8, 1)
    padded = torch.cat([logits, skewed])
    mask = torch.cat([torch.ones(12), torch.zeros(8)])
    assert load_balancing_loss(padded, 1, mask).item() == pytest.approx(1.0, abs=1e-6)
    assert load_balancing_loss(padded, 1).item() > 1.2


def test_padding_does_not_change_token_moe_aux_loss(tiny_backbone):
    model = build("moe", tiny_backbone, top_k=2, num_experts=4).train()  # dropout is 0 in the tiny backbone
    ids, mask = batch(lengths=(6, 4))
    wide_ids = torch.cat([ids, torch.zeros(2, 5, dtype=torch.long)], 1)
    wide_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], 1)
    e1, e2 = model.embed(ids, mask), model.embed(wide_ids, wide_mask)
    assert torch.allclose(e1.aux_loss, e2.aux_loss, atol=1e-6)
    assert torch.allclose(e1.reps, e2.reps, atol=1e-5)
    assert all(r.logits.shape[0] == int(mask.sum()) for r in e2.routings)  # padding is masked out of routing
    assert len(e2.routings) == len(model.moe_blocks())
    again = model.embed(ids, mask)  # after the padded call: routing is returned, nothing of a call stays on a block
    assert all(torch.equal(a.logits, b.logits) for a, b in zip(again.routings, e1.routings))
    parked = [k for b in model.moe_blocks() for m in b.modules() for k, v in vars(m).items() if torch.is_tensor(v)]
    assert not parked


@pytest.mark.parametrize("kind", ["sbmoe", "moe"])
def test_gradients_reach_router_and_experts(tiny_backbone, kind):
    model = build(kind, tiny_backbone, top_k=2, num_experts=4, temperature=0.1).train()
    if kind == "sbmoe":  # the zero-initialised output projection would block gradients to the router
        torch.nn.init.normal_(model.moe.experts[0].fc_out.weight)
        for e in model.moe.experts:
            torch.nn.init.normal_(e.fc_out.weight, std=0.1)
    q_ids, q_mask = batch(lengths=(4, 5, 3), seed=1)
    d_ids, d_mask = batch(lengths=(7, 6, 7), seed=2)
    out = model(q_ids, q_mask, d_ids, d_mask)
    out.loss.backward()
    routers = [p for n, p in model.named_parameters() if "router" in n]
    experts = [p for n, p in model.named_parameters() if "experts" in n]
    assert routers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)
    assert sum(p.grad.abs().sum() for p in experts if p.grad is not None) > 0
    assert out.expert_load.shape == (len(model.moe_blocks()), 4) and out.aux_loss is not None


def test_router_runs_in_float32_under_bf16_autocast():
    from sbmoe.layers import Expert

    router, x = Router(8, 4), torch.randn(6, 8)
    experts = torch.nn.ModuleList(Expert(8, 4) for _ in range(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = torch.nn.functional.linear(x, torch.eye(8))  # a bf16 hidden state, as the encoder would give
        assert h.dtype == torch.bfloat16  # autocast is really on
        r = route(router(h), top_k=2, renormalize=True)
        out = dispatch(experts, h, r)
    assert r.logits.dtype == torch.float32 and r.probs.dtype == torch.float32
    assert out.dtype == torch.bfloat16  # the mixture comes back in the hidden states' dtype


def test_sbmoe_all_mode_is_softmax_weighted_sum(tiny_backbone):
    model = build("sbmoe", tiny_backbone, num_experts=3)
    for e in model.moe.experts:
        torch.nn.init.normal_(e.fc_out.weight, std=0.5)
    ids, mask = batch()
    pooled = model.pool(model.hidden_states(ids, mask), mask)
    routing: Routing = route(model.moe.router(pooled), 1, renormalize=False)
    expected = pooled + sum(routing.probs[:, i, None] * e(pooled) for i, e in enumerate(model.moe.experts))
    model.config.inference_mode = "all"
    got = model.embed(ids, mask).reps
    assert torch.allclose(got, expected, atol=1e-5)
    model.config.inference_mode = "top1"
    assert not torch.allclose(model.embed(ids, mask).reps, got, atol=1e-4)


@pytest.mark.parametrize("kind", ["baseline", "sbmoe", "moe"])
def test_save_and_load_round_trip_offline(tiny_backbone, tmp_path, monkeypatch, kind):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = build(kind, tiny_backbone, num_experts=4, top_k=2 if kind == "moe" else 1)
    with torch.no_grad():  # move away from init so the check is not trivially "equals the backbone"
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    ids, mask = batch()
    model.save_pretrained(tmp_path / kind)
    assert (tmp_path / kind / "model.safetensors").is_file()
    loaded = load_model(tmp_path / kind).eval()
    assert type(loaded) is type(model)
    assert torch.equal(loaded.encode(ids, mask), model.encode(ids, mask))


def test_parameter_counts(tiny_backbone):
    base = build("baseline", tiny_backbone).count_parameters()
    assert base["total"] == base["active_per_token"]
    sb = build("sbmoe", tiny_backbone, num_experts=4, expert_dim=8)
    c = sb.count_parameters()
    per_expert = 32 * 8 + 8 + 8 * 32 + 32
    assert c["total"] == base["total"] + 4 * per_expert + (32 * 4 + 4)
    assert c["active_per_token"] == c["total"] - 3 * per_expert
    moe = build("moe", tiny_backbone, num_experts=4, top_k=2).count_parameters()
    ffn = 32 * 64 + 64 + 64 * 32 + 32  # one dense FFN = one expert; 1 MoE layer of 2 (layer 1)
    assert moe["total"] == base["total"] - ffn + 4 * ffn + 32 * 4
    assert moe["active_per_token"] == moe["total"] - 2 * ffn


@needs_shared
def test_minilm_backbone_models_start_equal(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the local folder alone must do: no hub look-up
    ids, mask = batch(vocab=2000, lengths=(12, 9))
    baseline = build("baseline", MINILM)
    base = baseline.encode(ids, mask)
    assert baseline.config.pooling == "mean" and baseline.config.backbone == str(MINILM)
    for kind in ("sbmoe", "moe"):
        got = build(kind, MINILM, top_k=1 if kind == "sbmoe" else 2).encode(ids, mask)
        assert (got - base).abs().max().item() < 1e-5


@pytest.mark.parametrize("kind,settings", [("baseline", {}), ("sbmoe", {}), ("sbmoe", {"design": "seed", "top_k": 2}),
                                           ("sbmoe", {"design": "sokli"}), ("moe", {"top_k": 2})])  # fmt: skip
def test_gradient_checkpointing_gives_the_same_gradients(tiny_backbone, kind, settings):
    model = build(kind, tiny_backbone, num_experts=4, temperature=0.1, **settings).train()
    for m in model.modules():  # live zero-initialised experts, so every parameter has a gradient to compare
        if getattr(m, "zero_init", False):
            torch.nn.init.normal_(m.weight, std=0.1)
    q_ids, q_mask = batch(lengths=(4, 5, 3), seed=1)
    d_ids, d_mask = batch(lengths=(7, 6, 7), seed=2)

    def grads():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(0)  # the same dropout and gate noise in both runs
        out = model(q_ids, q_mask, d_ids, d_mask)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss, plain = grads()
    model.gradient_checkpointing_enable()
    assert model.encoder.encoder.layer[0].gradient_checkpointing  # really on
    loss_ckpt, ckpt = grads()
    assert torch.allclose(loss, loss_ckpt, atol=1e-6)
    assert set(plain) == set(ckpt) and any(".router." in n for n in plain) == (kind != "baseline")
    for name, g in plain.items():
        assert torch.allclose(g, ckpt[name], atol=1e-5), name
