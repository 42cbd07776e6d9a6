"""Random routing at evaluation is a fixed function of integers (token ids and positions): an input gets the same
experts whatever batch, padding, order or precision it is encoded in, on any CPU, and through the frozen study's
cached features. Decisions are compared, never float bits."""

import pytest
import torch
from conftest import WORDS
from transformers import AutoTokenizer

from lab import frozen
from model import VARIANTS
from sbmoe.layers import key_scores, sequence_keys, token_keys

E = 4
LONG = " ".join(WORDS[i % len(WORDS)] for i in range(40))  # forces padding on every batch it is in
TEXTS = [LONG, *(" ".join(WORDS[(3 * i + j) % len(WORDS)] for j in range(1 + i % 7)) for i in range(40))]
RANDOM = [("sbmoe", dict(design=d, routing="random")) for d in ("residual-zero", "sokli", "seed")]
RANDOM += [("moe", dict(routing="random", top_k=2))]


def build(backbone, kind, **settings):
    if kind == "sbmoe":
        defaults = VARIANTS["sbmoe"].defaults(settings.get("design"))
        settings = {"top_k": defaults["top_k"], "gate_temperature": defaults["gate_temperature"], **settings}
    return VARIANTS[kind].from_backbone(str(backbone), num_experts=E, pooling="mean", **settings).eval()


def per_text(emb, mask: torch.Tensor) -> list[tuple]:
    """Each text's expert choices, block by block (a pooled row's, or its real tokens' in order)."""
    lengths = mask.sum(1).tolist()
    out = [[] for _ in lengths]
    for r in emb.routings:
        idx = r.indices
        if idx.shape[0] == mask.numel():  # every position routed (the token-level MoE): keep the real tokens
            idx = idx[mask.reshape(-1).bool()]
        if idx.shape[0] == len(lengths):  # one row per text
            parts = list(idx)
        else:  # the real tokens of every text, concatenated
            parts = torch.split(idx, lengths)
        for i, p in enumerate(parts):
            out[i].append(tuple(p.reshape(-1).tolist()))
    return [tuple(o) for o in out]


@torch.no_grad()
def choices(model, tokenizer, texts, batch_size: int, bf16: bool = False) -> dict[str, tuple]:
    got = {}
    for a in range(0, len(texts), batch_size):
        chunk = texts[a : a + batch_size]
        batch = tokenizer(chunk, padding=True, truncation=True, max_length=48, return_tensors="pt")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            emb = model.embed(batch["input_ids"], batch["attention_mask"])
        got.update(zip(chunk, per_text(emb, batch["attention_mask"])))
    return got


@pytest.mark.parametrize("kind,settings", RANDOM, ids=lambda x: x if isinstance(x, str) else x.get("design", "moe"))
def test_random_routing_is_the_same_for_any_batch_order_padding_and_precision(tiny_backbone, kind, settings):
    model = build(tiny_backbone, kind, **settings)
    for m in model.modules():  # experts that differ, so that a different routing would change the hidden states
        if m.__class__.__name__ == "Expert":
            torch.nn.init.normal_(m.fc_out.weight, std=0.3)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_backbone))
    reference = choices(model, tokenizer, TEXTS, 1)
    for batch_size in (1, 3, 32):
        for order in (TEXTS, TEXTS[::-1]):
            for bf16 in (False, True):
                assert choices(model, tokenizer, order, batch_size, bf16) == reference, (batch_size, bf16)
    used = {e for c in reference.values() for block in c for e in block}
    assert used == set(range(E))  # every expert is used: the routing is not constant


def test_routing_keys_ignore_padding_and_batch_and_differ_between_inputs():
    ids = torch.tensor([[2, 7, 9, 3, 0, 0], [2, 9, 7, 3, 0, 0], [2, 7, 9, 3, 5, 3]])
    mask = (ids != 0).long()
    keys = token_keys(ids, mask)
    assert torch.equal(keys[:1, :4], token_keys(ids[:1, :4], mask[:1, :4]))  # padding removed: the same keys
    assert torch.all(keys[mask == 0] == 0) and torch.all(keys[mask == 1] > 0)
    assert keys[0, 1] != keys[1, 2]  # the same token at another position: another key
    seq = sequence_keys(keys)
    assert len(set(seq.tolist())) == 3  # the same tokens in another order, or one more token: another sequence
    scores = key_scores(torch.arange(1000), 6)
    assert scores.dtype == torch.float32 and torch.all(scores < 2**24) and torch.equal(scores, scores.round())
    assert all(len(set(row)) == 6 for row in scores.tolist())  # distinct within a row: no tie for argsort to break
    first = scores.argsort(-1)[:, 0]
    assert torch.all((torch.bincount(first, minlength=6) / 1000 - 1 / 6).abs() < 0.05)  # uniform


@pytest.mark.parametrize("design", ["sokli", "seed"])
def test_frozen_heads_route_cached_features_as_the_model_routes_tokens(tiny_backbone, design):
    """The frozen study applies the head to cached backbone outputs: the same routing keys, so the same experts."""
    model = build(tiny_backbone, "sbmoe", design=design, routing="random")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_backbone))
    feats = frozen.encode_features(model, tokenizer, TEXTS, 48, batch_size=7)
    rows = list(range(len(TEXTS)))
    x = frozen.features(feats, rows, model.head_on_tokens())
    with torch.no_grad():
        emb = frozen.head(model, x)
    mask = x[1] if model.head_on_tokens() else torch.ones(len(rows), 1, dtype=torch.long)
    got = dict(zip(TEXTS, per_text(emb, mask)))
    assert got == choices(model, tokenizer, TEXTS, 5)


def test_token_level_random_routing_draws_each_layer_independently(tiny_backbone):
    """In training every MoE layer draws its own experts; at evaluation each layer's keys are salted by its layer,
    so the same token goes to other experts in another layer (not one fixed path through every layer)."""
    model = build(tiny_backbone, "moe", routing="random", top_k=1, moe_layers=[0, 1])
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_backbone))
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=48, return_tensors="pt")
    with torch.no_grad():
        first, second = (r.indices for r in model.embed(batch["input_ids"], batch["attention_mask"]).routings)
    agree = (first == second).float().mean().item()
    assert abs(agree - 1 / E) < 0.1, agree  # independent layers agree about 1/E of the time
