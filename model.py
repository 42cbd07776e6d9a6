"""Bi-encoders for dense retrieval: the plain baseline, SB-MoE (three published designs) and token-level MoE.

The building blocks live in the library: routers, experts, the SB-MoE head and the token-level sparse
feed-forward in sbmoe/layers.py, the config and `Setting` in sbmoe/config.py. Every model is a `PreTrainedModel`: `save_pretrained` writes safetensors and a config that rebuilds
it exactly (`load_model(dir)`), offline, without the backbone's original files.

A variant is one class: subclassing `BiEncoder` with a new `kind` registers it in `VARIANTS`, and
the class itself says what the rest of the project needs (its `settings`, each a `Setting` with default,
help and validation, from which train.py makes the flags and build_model the config; default top-k
and MoE learning rate, its MoE blocks, parameters active per input, FLOPs beyond the backbone).
train.py, eval.py, bench.py and the experiment runner derive everything from there.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, BertConfig, BertModel, PreTrainedModel
from transformers import initialization as init
from transformers.models.bert.modeling_bert import BertEmbeddings

from sbmoe.config import AT_LEAST_ONE, NON_NEGATIVE, POSITIVE, Embedding, RetrieverConfig, RetrieverOutput, Setting
from sbmoe.hub import check_source, detect_pooling
from sbmoe.layers import (
    MOE_ROUTINGS,
    RANDOM_ROUTING,
    ROUTINGS,
    SBMOE_DESIGNS,
    Routing,
    SingleBlockMoE,
    SparseMoEFeedForward,
    load_balancing_loss,
    record_outputs,
    router_z_loss,
    routing_keys,
    routing_stats,
    sequence_keys,
    token_keys,
)
from sbmoe.loss import info_nce

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


def describe(config: RetrieverConfig) -> str:
    """The settings that shape a variant's weights, for messages."""
    if config.kind == "baseline":
        return "no MoE"
    keys = ["num_experts", "top_k", "design", "routing", "expert_dim"] if config.kind != "moe" else [
        "num_experts", "top_k", "moe_layers", "routing"]  # fmt: skip
    return ", ".join(f"{k}={getattr(config, k)}" for k in keys)
