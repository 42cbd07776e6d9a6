"""Bi-encoders for dense retrieval: the plain baseline, SB-MoE (three published designs) and token-level MoE.

Read bottom-up: routing helpers and experts first, then the SB-MoE head, the config, then the models.
Every model is a `PreTrainedModel`: `save_pretrained` writes safetensors and a config that rebuilds
it exactly (`load_model(dir)`), offline, without the backbone's original files.

A variant is one class: subclassing `BiEncoder` with a new `kind` registers it in `VARIANTS`, and
the class itself says what the rest of the project needs (its `settings`, each a `Setting` with default,
help and validation, from which train.py makes the flags and build_model the config; default top-k
and MoE learning rate, its MoE blocks, parameters active per input, FLOPs beyond the backbone).
train.py, eval.py, bench.py and the experiment runner derive everything from there.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.models.bert.modeling_bert import BertEmbeddings
from transformers.utils import ModelOutput

from utils import info_nce

# --------------------------------------------------------------------------------------------
# Routing


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
    if _TRACEABLE:
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
    """`dispatch` without data-dependent shapes or branches, for tracing (ONNX export): every expert runs
    on every row and is weighted 0 where it was not chosen. Equal to `dispatch` up to float rounding;
    E/k times the expert FLOPs, which costs little for SB-MoE's pooled rows."""
    w = torch.zeros(x.shape[0], len(experts), dtype=routing.weights.dtype, device=x.device)
    w = w.scatter_add(1, routing.indices, routing.weights).to(x.dtype)  # (N, E)
    out = torch.zeros_like(x)
    for e, expert in enumerate(experts):
        out = out + w[:, e, None] * expert(x)
    return out


_TRACEABLE = False


@contextlib.contextmanager
def traceable():
    """Inside the `with`, MoE blocks dispatch with `dispatch_dense` (what export.py traces to ONNX)."""
    global _TRACEABLE
    previous, _TRACEABLE = _TRACEABLE, True
    try:
        yield
    finally:
        _TRACEABLE = previous


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


# --------------------------------------------------------------------------------------------
# Experts and MoE blocks


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

    def __init__(self, hidden: int, config: RetrieverConfig):
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


# --------------------------------------------------------------------------------------------
# Settings and config


@dataclass(frozen=True)
class Setting:
    """One setting of a variant, declared once on the class that introduces it: train.py makes its flag
    from it, build_model puts it into the config, and `error` is its one validation (the command line's,
    and the model's when built from Python)."""

    type: type
    default: object = None
    help: str = ""
    choices: tuple | None = None
    check: Callable[[object], bool] | None = None  # with `must`, what the value must be
    must: str = ""
    inherited: bool = True  # whether subclasses of the declaring class have it too
    flag: bool = True  # a training flag (False: set elsewhere, e.g. eval.py's --inference_mode)
    strict: bool = False  # the flag given to a kind without this setting is an error, not ignored

    def error(self, name: str, value) -> str | None:
        """A one-line message naming the flag when `value` is not allowed; None when it is (or is unset)."""
        if value is None:
            return None
        shown = " ".join(map(str, value)) if isinstance(value, list) else value
        if self.choices is not None and value not in self.choices:
            return f"--{name} {shown}: expected one of {' | '.join(map(str, self.choices))}"
        if self.check is not None and not self.check(value):
            return f"--{name} {shown}: must be {self.must}"
        return None


POSITIVE = dict(check=lambda v: math.isfinite(v) and v > 0, must="a number > 0")
NON_NEGATIVE = dict(check=lambda v: math.isfinite(v) and v >= 0, must="a number >= 0")
AT_LEAST_ONE = dict(check=lambda v: v >= 1, must="at least 1")


class RetrieverConfig(PretrainedConfig):
    """Everything that rebuilds a trained retriever: backbone config, pooling, loss and MoE settings.

    The settings are declared on the variants (`BiEncoder.settings`); the class defaults below are kept so
    that checkpoints saved before a setting existed still load. A new variant's settings need none here:
    they travel as PretrainedConfig kwargs into config.json and come back on load.
    """

    model_type = "moe_retriever"

    kind: str = "baseline"  # a key of VARIANTS
    backbone: str = ""  # name or path the backbone came from (a record; never re-read on load)
    backbone_config: dict | None = None  # the backbone's BertConfig as a dict
    pooling: str = "cls"  # cls | mean
    normalize: bool = True
    temperature: float = 0.05
    num_experts: int = 8
    top_k: int = 1
    expert_dim: int | None = None  # SB-MoE expert hidden size; None means the design's (hidden/2 or 2*hidden)
    noise_std: float = 0.0  # SB-MoE: extra Gaussian noise on the gate logits in training (0 = off)
    design: str = "residual-zero"  # SB-MoE: a key of SBMOE_DESIGNS
    routing: str = "learned"  # learned | dense (SB-MoE only: one expert, no gate) | random
    gate_temperature: float = 1.0  # SB-MoE: softmax temperature of the gate (the seed design's default is 5)
    moe_layers: list[int] | None = None  # token-level MoE: None means every other layer (1, 3, 5, ...)
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    inference_mode: str = "top1"  # SB-MoE: top1 | all
    domains: list[str] | None = None  # the training datasets, in order, when several (expert d of --routing domain)

    def resolved_moe_layers(self) -> list[int]:
        n = self.backbone_config["num_hidden_layers"]
        layers = list(range(1, n, 2)) if self.moe_layers is None else list(self.moe_layers)
        if not layers or any(not 0 <= i < n for i in layers):
            raise ValueError(f"--moe_layers {layers} must name layers in 0..{n - 1}")
        return layers


@dataclass
class RetrieverOutput(ModelOutput):
    loss: torch.Tensor | None = None
    contrastive_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    q_reps: torch.Tensor | None = None
    d_reps: torch.Tensor | None = None
    expert_load: torch.Tensor | None = None  # (L, E) assignments per expert, per MoE block
    router_entropy: torch.Tensor | None = None  # (L,)


@dataclass
class Embedding:
    """What `embed` returns: (B, H) representations and the routing decisions made on the way."""

    reps: torch.Tensor
    routings: list[Routing]
    aux_loss: torch.Tensor | None = None


# --------------------------------------------------------------------------------------------
# Models

VARIANTS: dict[str, type[BiEncoder]] = {}


class BiEncoder(PreTrainedModel):
    """Shared BERT encoder for queries and documents; pooling and optional L2 normalisation.

    The subclasses add MoE; the contrastive loss lives here, so the trainer only calls forward.
    A subclass with its own `kind` registers itself in `VARIANTS`.
    """

    config_class = RetrieverConfig
    base_model_prefix = "retriever"
    main_input_name = "query_input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    kind = "baseline"
    default_top_k = 1  # experts per input when --top_k is not given
    default_moe_learning_rate: float | None = None  # routers and experts; None: the backbone's rate

    settings: dict[str, Setting] = {}  # the settings this class introduces (a subclass adds its own)

    @classmethod
    def defaults(cls, design: str | None = None) -> dict:
        """Settings this variant uses when the command line leaves them unset."""
        return {"top_k": cls.default_top_k, "moe_learning_rate": cls.default_moe_learning_rate}

    @classmethod
    def variant_settings(cls) -> dict[str, Setting]:
        """Every setting of this variant: its own and the inherited ones of its base classes."""
        out: dict[str, Setting] = {}
        for klass in reversed(cls.__mro__):
            for name, setting in klass.__dict__.get("settings", {}).items():
                if setting.inherited or klass is cls:
                    out[name] = setting
        return out

    @classmethod
    def settings_error(cls, values: dict) -> str | None:
        """The first setting in `values` this variant does not allow, as a one-line message; None if all fit.
        A subclass adds checks that span settings (top_k against num_experts)."""
        for name, setting in cls.variant_settings().items():
            if (error := setting.error(name, values.get(name))) is not None:
                return error
        return None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            VARIANTS[cls.kind] = cls

    def __init__(self, config: RetrieverConfig):
        super().__init__(config)
        for name, setting in type(self).variant_settings().items():  # a config saved before the setting existed
            if not hasattr(config, name):
                setattr(config, name, setting.default)
        if (error := type(self).settings_error({n: getattr(config, n) for n in type(self).variant_settings()})):
            raise ValueError(f"{config.kind}: {error}")
        self.encoder = BertModel(BertConfig(**config.backbone_config), add_pooling_layer=False)
        self.add_moe(config)
        self.post_init()

    def add_moe(self, config: RetrieverConfig) -> None:
        """Subclasses add their MoE modules here, before the one `post_init`."""

    # ---- what the rest of the project asks of a variant ----------------------------------
    def moe_blocks(self) -> list[nn.Module]:
        """The MoE blocks (each with `router` and `experts`); their parameters train at the MoE rate."""
        return []

    def moe_parameter_names(self) -> set[str]:
        """Parameters trained at the MoE/head learning rate: the MoE blocks and anything outside the backbone."""
        in_blocks = {id(p) for block in self.moe_blocks() for p in block.parameters()}
        return {n for n, p in self.named_parameters() if id(p) in in_blocks or not n.startswith("encoder.")}

    def count_parameters(self) -> dict[str, int]:
        """Total parameters, and parameters active per input: all but the experts not chosen.

        Embedding tables are counted whole in both (the usual convention for MoE reports).
        """
        total = sum(p.numel() for p in self.parameters())
        inactive = 0
        for block in self.moe_blocks():
            per_expert = sum(p.numel() for p in block.experts[0].parameters())
            inactive += (len(block.experts) - self.active_experts(block)) * per_expert
        return {"total": total, "active_per_token": total - inactive}

    def active_experts(self, block: nn.Module) -> int:
        return block.top_k

    def extra_flops(self, tokens: float) -> float:
        """Forward FLOPs (2 per multiply-add) beyond the backbone's, for one input of `tokens` tokens."""
        return 0.0

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, name_or_path: str, pooling: str = "auto", **settings) -> BiEncoder:
        """A new retriever around a pretrained backbone (hub name or local folder)."""
        check_source(name_or_path)
        # A retrieval backbone is loaded without its pooler: those keys alone are expected to be left over,
        # so only they leave the load report (any other missing or unexpected key is still reported).
        loader = AutoModel
        with contextlib.suppress(KeyError):  # a model type AutoModel does not know: AutoModel says so
            found = AutoModel._model_mapping[type(AutoConfig.from_pretrained(name_or_path))]
            loader = type(found.__name__, (found,), {"_keys_to_ignore_on_load_unexpected": [r"(^|\.)pooler\."]})
        backbone = loader.from_pretrained(name_or_path, add_pooling_layer=False)
        if pooling == "auto":
            pooling = detect_pooling(name_or_path)
        backbone_config = {k: v for k, v in backbone.config.to_dict().items() if k in BertConfig().to_dict()}
        config = RetrieverConfig(
            kind=cls.kind, backbone=str(name_or_path), backbone_config=backbone_config, pooling=pooling, **settings
        )
        model = cls(config)
        model.encoder.load_state_dict(backbone.state_dict())
        return model

    def _init_weights(self, module: nn.Module) -> None:
        if getattr(module, "zero_init", False):
            init.zeros_(module.weight)
            init.zeros_(module.bias)
            return
        super()._init_weights(module)
        if isinstance(module, BertEmbeddings):
            init.copy_(module.position_ids, torch.arange(module.position_ids.shape[-1]).expand((1, -1)))
            init.zeros_(module.token_type_ids)

    # ---- encoding -----------------------------------------------------------------------
    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.config.pooling == "mean":
            m = attention_mask[..., None].to(hidden.dtype)
            return (hidden * m).sum(1) / m.sum(1).clamp_min(1e-9)
        return hidden[:, 0]

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with routing_keys(token_keys(input_ids, attention_mask)):  # for random routers inside the layers
            return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, domains: torch.Tensor | None = None
              ) -> Embedding:  # fmt: skip
        """(B, H) representations and the routing decisions made on the way (none for the baseline).
        domains: (B,) long, each input's training dataset (used only by SB-MoE's `--routing domain`)."""
        hidden = self.hidden_states(input_ids, attention_mask)
        return self.embed_hidden(hidden, attention_mask, token_keys(input_ids, attention_mask), domains=domains)

    def embed_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor, keys: torch.Tensor | None = None,
                     domains: torch.Tensor | None = None) -> Embedding:  # fmt: skip
        """From the backbone's last hidden states (B, T, H) on; the frozen-backbone study starts here. keys: the
        (B, T) `token_keys` of the inputs, which random routing needs at evaluation; domains: (B,)."""
        sequence = None if keys is None else sequence_keys(keys)
        return self.embed_pooled(self.pool(hidden, attention_mask), sequence, domains=domains)

    def embed_pooled(self, pooled: torch.Tensor, keys: torch.Tensor | None = None,
                     domains: torch.Tensor | None = None) -> Embedding:  # fmt: skip
        """From pooled vectors (B, H) on, for models whose head sits after pooling; keys: (B,) `sequence_keys`."""
        return Embedding(pooled, [])

    def head_on_tokens(self) -> bool:
        """Whether what follows the backbone needs its token states, not just the pooled vector."""
        return False

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, domains: torch.Tensor | None = None
               ) -> torch.Tensor:  # fmt: skip
        return self._norm(self.embed_with(input_ids, attention_mask, domains).reps)

    def embed_with(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, domains: torch.Tensor | None
                   ) -> Embedding:  # fmt: skip
        """`embed`, passing domains only when there are some (a variant's `embed` may not take them)."""
        args = (input_ids, attention_mask) if domains is None else (input_ids, attention_mask, domains)
        return self.embed(*args)

    def aux_losses(self, embeddings: list[Embedding]) -> torch.Tensor | None:
        """The auxiliary losses of the MoE blocks, averaged over the embed calls; None without any."""
        losses = [e.aux_loss for e in embeddings if e.aux_loss is not None]
        return sum(losses) / len(losses) if losses else None

    # ---- training forward ---------------------------------------------------------------
    def forward(
        self,
        query_input_ids: torch.Tensor,
        query_attention_mask: torch.Tensor,
        doc_input_ids: torch.Tensor | None = None,
        doc_attention_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        pos_ids: torch.Tensor | None = None,
        domains: torch.Tensor | None = None,  # (B,) each query's dataset; its documents share it
        **_: object,
    ) -> RetrieverOutput:
        q = self.embed_with(query_input_ids, query_attention_mask, domains)
        if doc_input_ids is None:
            return RetrieverOutput(q_reps=self._norm(q.reps))
        doc_domains = None if domains is None else domains.repeat_interleave(len(doc_input_ids) // len(domains))
        return self.contrastive(q, self.embed_with(doc_input_ids, doc_attention_mask, doc_domains), doc_ids, pos_ids)

    def contrastive(self, q: Embedding, d: Embedding, doc_ids=None, pos_ids=None) -> RetrieverOutput:
        """InfoNCE plus the MoE auxiliary losses, from query and document embeddings (forward, frozen.py)."""
        q_reps, d_reps = self._norm(q.reps), self._norm(d.reps)
        contrastive, logits = info_nce(q_reps, d_reps, self.config.temperature, doc_ids, pos_ids)
        aux = self.aux_losses([q, d])
        loss = contrastive if aux is None else contrastive + aux
        out = RetrieverOutput(loss=loss, contrastive_loss=contrastive.detach(), logits=logits, q_reps=q_reps,
                              d_reps=d_reps)  # fmt: skip
        routings = q.routings + d.routings
        if routings:
            out.aux_loss = aux.detach() if aux is not None else torch.zeros((), device=loss.device)
            stats = self.routing_summary(routings)
            out.expert_load, out.router_entropy = stats["load"], stats["entropy"]
        return out

    def _norm(self, reps: torch.Tensor) -> torch.Tensor:
        return F.normalize(reps, dim=-1) if self.config.normalize else reps

    def normalize_reps(self, reps: torch.Tensor) -> torch.Tensor:
        """The final representations from `Embedding.reps` (what `encode` returns), for callers that embed in
        parts, such as frozen.py's head on cached backbone outputs."""
        return self._norm(reps)

    def routing_summary(self, routings: list[Routing]) -> dict[str, torch.Tensor]:
        """Per MoE block (queries and documents pooled): assignments per expert and router entropy."""
        blocks = self.moe_blocks()
        loads, entropies = [], []
        for b, block in enumerate(blocks):
            parts = routings[b :: len(blocks)]
            stats = [routing_stats(r.indices, r.probs, len(block.experts)) for r in parts]
            loads.append(sum(s["load"] for s in stats))
            entropies.append(torch.stack([s["entropy"] for s in stats]).mean())
        return {"load": torch.stack(loads), "entropy": torch.stack(entropies)}


class MoEBiEncoder(BiEncoder):
    """What the MoE variants share: their experts, top-k, routing and balance loss (no `kind`: not a variant)."""

    random_routing = RANDOM_ROUTING  # the evaluation routing of its random control, as results record it

    settings = {
        "num_experts": Setting(int, 8, "experts per MoE block", **AT_LEAST_ONE),
        "top_k": Setting(int, 1, "experts per input (default: the variant's)"),
        "routing": Setting(str, "learned", "routing: " + " | ".join(ROUTINGS) + " (the token-level MoE: "
                           + " | ".join(MOE_ROUTINGS) + ")", choices=ROUTINGS),  # fmt: skip
        "aux_loss_coef": Setting(float, 0.01, "load-balancing loss coefficient", **NON_NEGATIVE),
    }

    @classmethod
    def settings_error(cls, values: dict) -> str | None:
        if (error := super().settings_error(values)) is not None:
            return error
        top_k, num_experts = values.get("top_k"), values.get("num_experts")
        if top_k is not None and num_experts is not None and not 0 < top_k <= num_experts:
            return f"--top_k {top_k} must be between 1 and --num_experts {num_experts}"
        return None


class TinyBERTWithMoE(MoEBiEncoder):
    """SB-MoE: one MoE block after the final layer (`--design`, `--routing`); see SBMOE_DESIGNS."""

    kind = "sbmoe"
    default_moe_learning_rate = 1e-4
    settings = {
        "design": Setting(str, "residual-zero", "SB-MoE design: " + " | ".join(SBMOE_DESIGNS),
                          choices=tuple(SBMOE_DESIGNS)),  # fmt: skip
        "gate_temperature": Setting(float, 1.0, "SB-MoE gate softmax temperature (default: the design's)", **POSITIVE),
        "expert_dim": Setting(int, None, "SB-MoE expert hidden size (default: the design's)", **AT_LEAST_ONE),
        "noise_std": Setting(float, 0.0, "SB-MoE extra gate noise std during training (0 = off)", **NON_NEGATIVE),
        "inference_mode": Setting(str, "top1", "SB-MoE routing at evaluation: top1 | all", choices=("top1", "all"),
                                  flag=False),  # fmt: skip
    }

    @classmethod
    def defaults(cls, design: str | None = None) -> dict:
        d = SBMOE_DESIGNS.get(design or "residual-zero", SBMOE_DESIGNS["residual-zero"])
        return {**super().defaults(), "top_k": d["top_k"], "gate_temperature": d["gate_temperature"]}

    def add_moe(self, config: RetrieverConfig) -> None:
        self.moe = SingleBlockMoE(config.backbone_config["hidden_size"], config)

    def moe_blocks(self) -> list[nn.Module]:
        return [self.moe]

    def active_experts(self, block: nn.Module) -> int:
        return block.active_experts(self.config.inference_mode)

    def extra_flops(self, tokens: float) -> float:
        per_row = self.moe.flops(self.config.inference_mode)
        return per_row * tokens if self.moe.design["per_token"] else per_row

    def head_on_tokens(self) -> bool:
        return self.moe.design["per_token"]

    def embed_hidden(self, hidden: torch.Tensor, attention_mask: torch.Tensor, keys: torch.Tensor | None = None,
                     domains: torch.Tensor | None = None) -> Embedding:  # fmt: skip
        if not self.moe.design["per_token"]:
            return super().embed_hidden(hidden, attention_mask, keys, domains=domains)
        keep = attention_mask.reshape(-1).bool()  # route the non-padding tokens, then pool
        flat = hidden.reshape(-1, hidden.shape[-1])
        if domains is not None:  # each token carries its input's dataset
            domains = domains.to(hidden.device)[:, None].expand(attention_mask.shape).reshape(-1)[keep]
        out, routing = self.moe(flat[keep], mode=self.mode(), keys=None if keys is None else keys.reshape(-1)[keep],
                                domains=domains)  # fmt: skip
        hidden = flat.index_put((keep.nonzero().squeeze(1),), out).reshape_as(hidden)
        return Embedding(self.pool(hidden, attention_mask), [routing], self.head_aux(routing))

    def embed_pooled(self, pooled: torch.Tensor, keys: torch.Tensor | None = None,
                     domains: torch.Tensor | None = None) -> Embedding:  # fmt: skip
        """The head on pooled vectors (B, H), for the designs that sit after pooling; keys: (B,)."""
        reps, routing = self.moe(pooled, mode=self.mode(), keys=keys, domains=domains)
        return Embedding(reps, [routing], self.head_aux(routing))

    def mode(self) -> str:
        return self.config.inference_mode if not self.training else "top1"

    def head_aux(self, routing: Routing) -> torch.Tensor | None:
        return self.moe.aux_loss(routing, self.config.aux_loss_coef) if self.training else None


class TinyBERTMoERegular(MoEBiEncoder):
    """Token-level top-k MoE in the FFN of chosen layers, experts upcycled from the dense FFN."""

    kind = "moe"
    default_top_k = 2
    random_routing = RANDOM_ROUTING + ", salted per layer"
    settings = {
        "routing": replace(MoEBiEncoder.settings["routing"], choices=MOE_ROUTINGS),  # its dense control is the baseline
        "moe_layers": Setting(list[int], None, "MoE layers (default every other layer)", strict=True,
                              check=lambda v: all(i >= 0 for i in v) and len(set(v)) == len(v),
                              must="distinct layer numbers >= 0"),  # fmt: skip
        "z_loss_coef": Setting(float, 0.0, "router z-loss coefficient", **NON_NEGATIVE),
    }

    def add_moe(self, config: RetrieverConfig) -> None:
        bc = config.backbone_config
        self.moe_layers = config.resolved_moe_layers()
        for i in self.moe_layers:
            layer = self.encoder.encoder.layer[i]
            layer.intermediate = SparseMoEFeedForward(
                bc["hidden_size"], bc["intermediate_size"], config.num_experts, config.top_k, config.routing, layer=i
            )
            layer.output.dense = nn.Identity()

    def moe_blocks(self) -> list[nn.Module]:
        return [self.encoder.encoder.layer[i].intermediate for i in self.moe_layers]

    def extra_flops(self, tokens: float) -> float:
        """Per MoE layer: k - 1 more FFNs than the dense layer, plus the learned router."""
        c = self.config.backbone_config
        ffn = 2.0 * 2 * tokens * c["hidden_size"] * c["intermediate_size"]
        router = 2.0 * tokens * c["hidden_size"] * self.config.num_experts * (self.config.routing == "learned")
        return len(self.moe_layers) * ((self.config.top_k - 1) * ffn + router)

    @classmethod
    def from_backbone(cls, name_or_path: str, pooling: str = "auto", **settings) -> TinyBERTMoERegular:
        # Build once as a baseline to get the dense FFN weights, then upcycle them into the experts.
        dense = BiEncoder.from_backbone(name_or_path, pooling=pooling, **settings)
        config = copy.deepcopy(dense.config)
        config.kind = cls.kind
        model = cls(config)
        missing, _ = model.encoder.load_state_dict(dense.encoder.state_dict(), strict=False)
        assert all(".intermediate." in k for k in missing), missing  # only the new MoE blocks
        for i, block in zip(model.moe_layers, model.moe_blocks()):
            src = dense.encoder.encoder.layer[i]
            block.upcycle(src.intermediate.dense, src.output.dense)
        return model

    def embed(self, input_ids, attention_mask, domains=None):  # domains: unused (no domain routing here)
        blocks = self.moe_blocks()
        with record_outputs([b.router for b in blocks]) as logits:
            reps = self.pool(self.hidden_states(input_ids, attention_mask), attention_mask)
        routings = [b.decide(x).select(attention_mask) for b, x in zip(blocks, logits)]
        aux = None
        if self.training and self.config.routing == "learned":  # padding never enters the losses
            aux = sum(self.config.aux_loss_coef * load_balancing_loss(r.logits, self.config.top_k) for r in routings)
            if self.config.z_loss_coef > 0:
                aux = aux + sum(self.config.z_loss_coef * router_z_loss(r.logits) for r in routings)
            aux = aux / len(routings)
        return Embedding(reps, routings, aux)


VARIANTS["baseline"] = BiEncoder


def load_model(path: str | Path) -> BiEncoder:
    """A saved retriever of any kind; the class comes from its config, never from code in the folder.

    The weights must be exactly what the config's variant and settings build: a missing, unexpected or
    reshaped tensor is a ValueError naming it (never a randomly initialised layer evaluated as trained).
    """
    from safetensors import safe_open

    path = Path(path)
    try:
        config = RetrieverConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:  # ValueError: config.json is not JSON
        raise ValueError(f"{path / 'config.json'}: not a readable checkpoint config ({str(exc).splitlines()[0]})") from None
    if config.kind not in VARIANTS:
        raise ValueError(f"{path}: model kind {config.kind!r} is not one of {sorted(VARIANTS)}")
    weights = path / "model.safetensors"
    if not weights.is_file():
        raise ValueError(f"{weights}: missing (the checkpoint has a config but no weights)")
    try:
        with safe_open(weights, "pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error type for a truncated or foreign file
        raise ValueError(f"{weights}: unreadable weights, truncated or not safetensors ({exc})") from None
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in VARIANTS[config.kind](config).state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    reshaped = sorted(k for k in set(expected) & set(shapes) if expected[k] != shapes[k])
    if missing or unexpected or reshaped:
        parts = [f"{what} {len(keys)}: {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
                 for what, keys in (("missing", missing), ("unexpected", unexpected), ("reshaped", reshaped)) if keys]
        raise ValueError(f"{weights}: weights do not match its config ({config.kind}, {describe(config)}): "
                         + "; ".join(parts))  # fmt: skip
    return VARIANTS[config.kind].from_pretrained(path, config=config)


def checkpoint_digest(path: str | Path) -> str:
    """A checkpoint's identity by content: sha1 of its config.json and model.safetensors (a copy or a move
    keeps it, retraining into the same folder changes it). What metrics.json and export.json record."""
    import hashlib

    h = hashlib.sha1()
    for name in ("config.json", "model.safetensors"):
        with open(Path(path) / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def describe(config: RetrieverConfig) -> str:
    """The settings that shape a variant's weights, for messages."""
    if config.kind == "baseline":
        return "no MoE"
    keys = ["num_experts", "top_k", "design", "routing", "expert_dim"] if config.kind != "moe" else [
        "num_experts", "top_k", "moe_layers", "routing"]  # fmt: skip
    return ", ".join(f"{k}={getattr(config, k)}" for k in keys)


def looks_like_path(name_or_path: str) -> bool:
    """A name that can only mean a local folder (not a hub id such as `org/name`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path.replace("/", "", 1):
        return True
    try:
        validate_repo_id(name_or_path)
    except HFValidationError:
        return True
    return False


def check_source(name_or_path: str) -> None:
    """A one-line ValueError when a model is neither a local folder nor reachable on the hub."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{name_or_path}: a folder without config.json, not a model")
        return
    if path.exists() or looks_like_path(str(name_or_path)):
        raise ValueError(f"{name_or_path}: no such model folder (and not a hub name)")
    try:
        AutoConfig.from_pretrained(name_or_path)  # a local hub cache is enough; online, fetches config.json
    except (OSError, ValueError) as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
        why = "HF_HUB_OFFLINE is set and it is not in the local cache" if offline else str(exc).splitlines()[0]
        raise ValueError(f"{name_or_path}: not a local folder and not available from the hub ({why}); "
                         "pass a local model folder") from None  # fmt: skip


class _ExpectedNotices(logging.Filter):
    """Drops the one notice every checkpoint load gives: AutoTokenizer reading our config.json as a generic one."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "model of type `moe_retriever` to instantiate a model of type ``" not in record.getMessage()


logging.getLogger("transformers.configuration_utils").addFilter(_ExpectedNotices())


def load_tokenizer(name_or_path: str | Path):
    """The tokenizer of a checkpoint or backbone; a ValueError (one line) when the folder has none."""
    try:
        return AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{name_or_path}: no usable tokenizer ({str(exc).splitlines()[0][:200]})") from None


def detect_pooling(name_or_path: str) -> str:
    """Mean pooling when a local sentence-transformers folder says so, [CLS] otherwise (the paper)."""
    cfg = Path(name_or_path) / "1_Pooling" / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls"


def backbone_flops(config: RetrieverConfig, tokens: float) -> float:
    """Analytic forward FLOPs (2 per multiply-add) of the backbone for one input; embeddings ignored."""
    c = config.backbone_config
    H, inner, L, T = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], tokens
    return float(L * (2 * (4 * T * H * H + 2 * T * T * H) + 2 * 2 * T * H * inner))

