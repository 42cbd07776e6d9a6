"""Each SB-MoE design equals its published description, the controls are what they say, and the gate's gradient."""

import pytest
import torch
import torch.nn.functional as F

from model import VARIANTS
from sbmoe.layers import NoisyMLPRouter, Router, routing_keys

H, E = 32, 4


def batch(lengths=(7, 3, 5), seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 30, (len(lengths), max(lengths)), generator=g)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids * mask, mask


def build(tiny_backbone, **settings):
    settings = {"num_experts": E, "pooling": "mean", **settings}
    defaults = VARIANTS["sbmoe"].defaults(settings.get("design"))
    for key in ("top_k", "gate_temperature"):
        settings.setdefault(key, defaults[key])
    model = VARIANTS["sbmoe"].from_backbone(str(tiny_backbone), **settings).eval()
    return model


def pooled_and_hidden(model, ids, mask):
    hidden = model.hidden_states(ids, mask)
    return model.pool(hidden, mask), hidden


def test_residual_zero_starts_as_the_backbone_with_a_linear_gate_and_top1_raw_probability(tiny_backbone):
    model = build(tiny_backbone, design="residual-zero")
    ids, mask = batch()
    pooled, _ = pooled_and_hidden(model, ids, mask)
    assert torch.equal(model.embed(ids, mask).reps, pooled)  # zero-initialised output projections
    moe = model.moe
    assert type(moe.router) is Router and moe.norm is None
    assert [tuple(e.fc_in.weight.shape) for e in moe.experts] == [(H // 2, H)] * E
    assert isinstance(moe.experts[0].act, torch.nn.GELU)
    for e in moe.experts:
        torch.nn.init.normal_(e.fc_out.weight, std=0.3)
    probs = moe.router(pooled).softmax(-1)
    top = probs.argmax(-1)
    expected = pooled + torch.stack([probs[i, t] * moe.experts[t](pooled[i]) for i, t in enumerate(top.tolist())])
    assert torch.allclose(model.embed(ids, mask).reps, expected, atol=1e-5)  # raw probability, not renormalised


def test_sokli_design(tiny_backbone):
    model = build(tiny_backbone, design="sokli")
    moe, ids, mask = model.moe, *batch()
    pooled, _ = pooled_and_hidden(model, ids, mask)
    gate = moe.router
    assert isinstance(gate, NoisyMLPRouter)
    assert (gate.fc_in.in_features, gate.fc_in.out_features, gate.fc_out.out_features) == (H, H // 2, E)
    assert (gate.noise.in_features, gate.noise.out_features) == (H, E)
    assert [(e.fc_in.out_features, e.fc_out.out_features) for e in moe.experts] == [(H // 2, H)] * E
    assert isinstance(moe.experts[0].act, torch.nn.ReLU) and moe.norm is None
    assert moe.experts[0].fc_out.weight.abs().sum() > 0  # default (random) initialisation
    # inference: softmax of the clean gate, top-1 keeps its raw probability, mixture L2-normalised, plus pooled
    logits = gate.fc_out(F.relu(gate.fc_in(pooled)))
    probs = logits.softmax(-1)
    top = probs.argmax(-1)
    mix = torch.stack([probs[i, t] * moe.experts[t](pooled[i]) for i, t in enumerate(top.tolist())])
    assert torch.allclose(model.embed(ids, mask).reps, F.normalize(mix, dim=-1) + pooled, atol=1e-5)
    assert torch.equal(model.embed(ids, mask).reps, model.embed(ids, mask).reps)  # no noise at inference
    routing = model.embed(ids, mask).routings[0]
    assert torch.allclose(routing.weights[:, 0], probs.max(-1).values, atol=1e-6)  # raw probability, top-1
    model.config.inference_mode = "all"
    mix_all = sum(probs[:, i, None] * e(pooled) for i, e in enumerate(moe.experts))
    assert torch.allclose(model.embed(ids, mask).reps, F.normalize(mix_all, dim=-1) + pooled, atol=1e-5)
    model.train()  # training: noisy logits (N(0,1) * softplus(noise(x))), top-1, always
    torch.manual_seed(0)
    noisy = gate(pooled)
    torch.manual_seed(0)
    expected = logits + torch.randn_like(logits) * F.softplus(gate.noise(pooled))
    assert torch.allclose(noisy, expected, atol=1e-6) and not torch.allclose(noisy, logits)
    assert model.embed(ids, mask).routings[0].indices.shape == (3, 1)


def test_seed_design_routes_tokens_after_layernorm_with_temperature_and_renormalised_top2(tiny_backbone):
    model = build(tiny_backbone, design="seed")
    moe, (ids, mask) = model.moe, batch()
    assert model.config.top_k == 2 and model.config.gate_temperature == 5.0
    assert isinstance(moe.norm, torch.nn.LayerNorm) and type(moe.router) is Router
    expert = moe.experts[0]
    assert (expert.fc_in.out_features, expert.fc_out.out_features) == (2 * H, H)
    assert isinstance(expert.act, torch.nn.GELU) and expert.dropout.p == 0.1
    _, hidden = pooled_and_hidden(model, ids, mask)
    tokens = hidden[mask.bool()]  # (M, H) the non-padding tokens
    z = moe.norm(tokens)
    probs = (moe.router(z) / 5.0).softmax(-1)
    w, idx = probs.topk(2, dim=-1)
    w = w / w.sum(-1, keepdim=True)
    mix = torch.stack([sum(w[i, j] * moe.experts[idx[i, j]](z[i]) for j in range(2)) for i in range(len(z))])
    out = hidden.clone()
    out[mask.bool()] = tokens + mix  # added to the sequence output, then pooled
    expected = (out * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    got = model.embed(ids, mask)
    assert torch.allclose(got.reps, expected, atol=1e-5)
    assert got.routings[0].indices.shape == (int(mask.sum()), 2)  # padding is never routed
    model.train()
    torch.manual_seed(0)
    emb = model.embed(ids, mask)
    expected_aux = model.config.aux_loss_coef * ((emb.routings[0].probs.mean(0) - 1 / E) ** 2).mean()
    assert torch.allclose(emb.aux_loss, expected_aux)


@pytest.mark.parametrize("design", ["residual-zero", "sokli", "seed"])
def test_dense_control_is_one_expert_without_a_gate(tiny_backbone, design):
    model = build(tiny_backbone, design=design, routing="dense")
    assert model.moe.router is None and len(model.moe.experts) == 1
    learned = build(tiny_backbone, design=design)
    per_expert = sum(p.numel() for p in learned.moe.experts[0].parameters())
    assert sum(p.numel() for p in model.moe.parameters()) == per_expert + sum(
        p.numel() for p in (learned.moe.norm.parameters() if learned.moe.norm else []))  # same shape, no gate
    ids, mask = batch()
    pooled, _ = pooled_and_hidden(model, ids, mask)
    for m in model.modules():
        if getattr(m, "zero_init", False):
            torch.nn.init.normal_(m.weight, std=0.3)
    if design != "seed":
        mix = model.moe.experts[0](pooled)
        expected = pooled + (F.normalize(mix, dim=-1) if design == "sokli" else mix)
        assert torch.allclose(model.embed(ids, mask).reps, expected, atol=1e-5)
    assert model.count_parameters()["total"] == model.count_parameters()["active_per_token"]


def test_random_routing_is_uniform_with_a_fixed_weight_and_reproducible_at_inference(tiny_backbone):
    model = build(tiny_backbone, design="residual-zero", routing="random")
    assert model.moe.router is None and len(model.moe.experts) == E
    x = torch.randn(4000, H)
    model.train()
    routing = model.moe.choose(x, "top1")
    counts = torch.bincount(routing.indices[:, 0], minlength=E).float()
    assert torch.all((counts / 4000 - 1 / E).abs() < 0.03)  # uniform
    assert torch.all(routing.weights == 1.0)
    model.eval()  # evaluation: a function of each input's integer key alone, whatever batch it comes in; uniform
    keys = torch.arange(4000) * 7919
    with pytest.raises(ValueError, match="routing keys"):
        model.moe.choose(x, "top1")
    fixed = model.moe.choose(x, "top1", keys).indices
    assert torch.equal(fixed, model.moe.choose(torch.randn_like(x), "top1", keys).indices)  # not the float input
    assert torch.equal(fixed[100:200], model.moe.choose(x[100:200], "top1", keys[100:200]).indices)
    counts = torch.bincount(fixed[:, 0], minlength=E).float()
    assert torch.all((counts / 4000 - 1 / E).abs() < 0.03)
    two = build(tiny_backbone, design="seed", routing="random").moe.choose(x, "top1", keys)
    assert torch.all(two.weights == 0.5) and torch.all(two.indices[:, 0] != two.indices[:, 1])  # k distinct


def test_random_routing_all_experts_at_inference_is_the_uniform_ensemble(tiny_backbone):
    """`--inference_mode all` of a gateless block: every expert at weight 1/E (the control for a learned gate's
    all-experts inference); training is untouched and a dense head has one expert to use."""
    model = build(tiny_backbone, design="sokli", routing="random").eval()
    for e in model.moe.experts:
        torch.nn.init.normal_(e.fc_out.weight, std=0.3)
    x = torch.randn(50, H)
    every = model.moe.choose(x, "all")
    assert torch.allclose(every.weights, torch.full((50, E), 1 / E)) and torch.equal(every.indices[7], torch.arange(E))
    assert model.moe.active_experts("all") == E and model.moe.active_experts("top1") == 1
    ids, mask = batch()
    top1 = model.embed(ids, mask).reps
    model.config.inference_mode = "all"
    pooled, _ = pooled_and_hidden(model, ids, mask)
    mix = sum(e(pooled) for e in model.moe.experts) / E
    assert torch.allclose(model.embed(ids, mask).reps, F.normalize(mix, dim=-1) + pooled, atol=1e-5)
    assert not torch.allclose(model.embed(ids, mask).reps, top1)
    model.train()
    assert model.moe.choose(x, "all").indices.shape == (50, 1)  # training draws one random expert, as before
    dense = build(tiny_backbone, design="sokli", routing="dense").eval()
    assert torch.equal(dense.moe.choose(x, "all").indices, dense.moe.choose(x, "top1").indices)
    assert dense.moe.active_experts("all") == 1


def test_noise_only_in_training(tiny_backbone):
    model = build(tiny_backbone, design="residual-zero", noise_std=1.0)
    x = torch.randn(50, H)
    assert torch.equal(model.moe.choose(x, "top1").logits, model.moe.router(x))  # eval: clean
    model.train()
    assert not torch.allclose(model.moe.choose(x, "top1").logits, model.moe.router(x))


def gate_gradient(model) -> float:
    """Largest |gradient| the ranking loss alone (auxiliary losses off) gives the gate's parameters."""
    ids_q, mask_q = batch((4, 5, 3), seed=1)
    ids_d, mask_d = batch((7, 6, 7), seed=2)
    model.config.aux_loss_coef = 0.0
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    model(ids_q, mask_q, ids_d, mask_d).loss.backward()
    grads = [p.grad.abs().max().item() for p in model.moe.router.parameters() if p.grad is not None]
    return max(grads) if grads else 0.0


@pytest.mark.parametrize("design,gets_gradient", [("residual-zero", True), ("seed", True), ("sokli", False)])
def test_which_gates_the_ranking_loss_trains(tiny_backbone, design, gets_gradient, capsys):
    """Sokli's top-1 with an L2-normalised mixture: normalize(p * e(x)) = normalize(e(x)) for any p > 0, so the
    gate's probability cancels and the ranking loss gives the gate (and its noise map) no gradient beyond float
    rounding: the routing is a random function of the input, not a learned one."""
    model = build(tiny_backbone, design=design)
    for m in model.modules():  # live experts everywhere, so a zero gradient can only come from the design
        if getattr(m, "zero_init", False):
            torch.nn.init.normal_(m.weight, std=0.3)
    g = gate_gradient(model)
    with capsys.disabled():
        print(f"\n{design}: largest |d ranking loss / d gate parameter| = {g:.3g}")
    assert (g > 1e-6) == gets_gradient


def test_token_moe_random_routing_is_uniform_fixed_weight_and_reproducible_at_inference(tiny_backbone):
    """The token-level MoE's control: k distinct uniform experts per token at weight 1/k, no router parameters,
    no balance loss; at evaluation a function of each token alone; upcycled, it still equals the dense model."""
    kw = {"num_experts": E, "top_k": 2, "pooling": "mean"}
    model = VARIANTS["moe"].from_backbone(str(tiny_backbone), routing="random", **kw).eval()
    learned = VARIANTS["moe"].from_backbone(str(tiny_backbone), **kw)
    base = VARIANTS["baseline"].from_backbone(str(tiny_backbone), pooling="mean").eval()
    block = model.moe_blocks()[0]
    assert not list(block.router.parameters())
    assert model.count_parameters()["total"] == learned.count_parameters()["total"] - len(model.moe_blocks()) * H * E
    x = torch.randn(4000, H)
    block.train()
    routing = block.decide(block.router(x))
    assert torch.all(routing.weights == 0.5) and torch.all(routing.indices[:, 0] != routing.indices[:, 1])
    counts = torch.bincount(routing.indices.reshape(-1), minlength=E).float()
    assert torch.all((counts / 8000 - 1 / E).abs() < 0.03)  # uniform
    block.eval()
    keys = torch.arange(4000) * 7919
    with routing_keys(keys):
        fixed = block.decide(block.router(x)).indices
        assert torch.equal(fixed, block.decide(block.router(torch.randn_like(x))).indices)  # not the float input
    with routing_keys(keys[100:200]):
        assert torch.equal(fixed[100:200], block.decide(block.router(x[100:200])).indices)
    counts = torch.bincount(fixed.reshape(-1), minlength=E).float()
    assert torch.all((counts / 8000 - 1 / E).abs() < 0.03)  # still uniform
    ids, mask = batch()
    assert torch.allclose(model.encode(ids, mask), base.encode(ids, mask), atol=1e-5)  # copies of the FFN, 1/k each
    for m in model.moe_blocks():  # experts that differ: a document's embedding must not depend on its batch
        for e in m.experts:
            torch.nn.init.normal_(e.fc_out.weight, std=0.3)
    whole = model.encode(ids, mask)
    assert torch.allclose(model.encode(ids[1:], mask[1:]), whole[1:], atol=1e-5)
    assert not torch.allclose(whole, base.encode(ids, mask), atol=1e-3)
    model.train()
    emb = model.embed(ids, mask)
    assert emb.aux_loss is None and len(emb.routings) == len(model.moe_blocks())
    with pytest.raises(ValueError, match="routing"):
        VARIANTS["moe"].from_backbone(str(tiny_backbone), routing="dense", **kw)
