"""Bi-encoders for dense retrieval: the plain baseline, SB-MoE and token-level (upcycled) MoE.

Read bottom-up: routing helpers and experts first, then the config, then the three models.
Every model is a `PreTrainedModel`: `save_pretrained` writes safetensors and a config that rebuilds
it exactly (`Model.from_pretrained(dir)`), offline, without the backbone's original files.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import AutoModel, BertConfig, BertModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.models.bert.modeling_bert import BertEmbeddings
from transformers.utils import ModelOutput

from utils import info_nce

# --------------------------------------------------------------------------------------------
# Routing


@dataclass
class Routing:
    """One router decision: top-k expert indices and their weights, plus float32 logits."""

    logits: torch.Tensor  # (N, E) float32
    probs: torch.Tensor  # (N, E) float32 softmax
    indices: torch.Tensor  # (N, k)
    weights: torch.Tensor  # (N, k) in the input dtype


def route(router: nn.Linear, x: torch.Tensor, top_k: int, renormalize: bool, noise_std: float = 0.0) -> Routing:
    """Router in float32 even under autocast (Switch/Mixtral): softmax, top-k, optional renormalise.

    With top-1 the raw softmax probability is kept as the weight (Switch), or the router would get
    no gradient; with k > 1 the k weights are renormalised to sum to 1 (Mixtral).
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        logits = F.linear(x.float(), router.weight.float(), None if router.bias is None else router.bias.float())
        if noise_std > 0:
            logits = logits + torch.randn_like(logits) * noise_std
        probs = logits.softmax(dim=-1)
        weights, indices = probs.topk(top_k, dim=-1)
        if renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(logits, probs, indices, weights.to(x.dtype))


def dispatch(experts: nn.ModuleList, x: torch.Tensor, routing: Routing) -> torch.Tensor:
    """Sum over the k chosen experts of weight * expert(x), run only on the rows routed to each expert."""
    out = torch.zeros_like(x)  # (N, H)
    for e, expert in enumerate(experts):
        rows, slot = torch.where(routing.indices == e)
        if rows.numel() == 0:
            continue
        y = expert(x[rows]) * routing.weights[rows, slot, None]
        out.index_add_(0, rows, y.to(out.dtype))
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


# --------------------------------------------------------------------------------------------
# Experts and MoE blocks


class Expert(nn.Module):
    """A small FFN: Linear -> GELU -> Linear."""

    def __init__(self, hidden: int, inner: int, zero_init_out: bool = False):
        super().__init__()
        self.fc_in = nn.Linear(hidden, inner)
        self.fc_out = nn.Linear(inner, hidden)
        self.fc_out.zero_init = zero_init_out  # SB-MoE: adds exactly 0 at step 0, so it starts as the baseline
        if zero_init_out:
            nn.init.zeros_(self.fc_out.weight)
            nn.init.zeros_(self.fc_out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class SingleBlockMoE(nn.Module):
    """SB-MoE head: the pooled vector is routed to top-k of E experts and added back residually."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, expert_dim: int, noise_std: float):
        super().__init__()
        self.top_k, self.noise_std = top_k, noise_std
        self.router = nn.Linear(hidden, num_experts)
        self.experts = nn.ModuleList(Expert(hidden, expert_dim, zero_init_out=True) for _ in range(num_experts))

    def forward(self, pooled: torch.Tensor, mode: str = "top1") -> tuple[torch.Tensor, Routing]:
        noise = self.noise_std if self.training else 0.0
        routing = route(self.router, pooled, self.top_k, renormalize=self.top_k > 1, noise_std=noise)
        if mode == "all":  # softmax-weighted sum of every expert (inference option of prior SB-MoE work)
            mixed = torch.stack([e(pooled) for e in self.experts], dim=1)  # (B, E, H)
            return pooled + (routing.probs.to(mixed.dtype)[..., None] * mixed).sum(1), routing
        return pooled + dispatch(self.experts, pooled, routing), routing


class SparseMoEFeedForward(nn.Module):
    """Token-level top-k MoE replacing a BERT layer's FFN (intermediate + output.dense).

    It is installed as `layer.intermediate` with `layer.output.dense` set to Identity, so BertOutput
    still applies dropout, the residual and LayerNorm. Only non-padding tokens are routed: the
    model sets `token_mask` before each backbone call. The router logits of the last call are kept
    in `last_routing` for the auxiliary losses.
    """

    def __init__(self, hidden: int, inner: int, num_experts: int, top_k: int):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, inner) for _ in range(num_experts))
        self.token_mask: torch.Tensor | None = None
        self.last_routing: Routing | None = None

    @torch.no_grad()
    def upcycle(self, intermediate_dense: nn.Linear, output_dense: nn.Linear) -> None:
        """Every expert starts as a copy of the dense FFN, so the layer equals it at step 0."""
        for expert in self.experts:
            expert.fc_in.load_state_dict(intermediate_dense.state_dict())
            expert.fc_out.load_state_dict(output_dense.state_dict())

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:  # (B, T, H)
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])  # (B*T, H)
        if self.token_mask is not None:
            keep = self.token_mask.reshape(-1).bool()
            tokens = flat[keep]
        else:
            keep, tokens = None, flat
        routing = route(self.router, tokens, self.top_k, renormalize=True)
        self.last_routing = routing
        out = dispatch(self.experts, tokens, routing)
        if keep is not None:
            out = torch.zeros_like(flat).index_put_((keep.nonzero().squeeze(1),), out)
        return out.reshape_as(hidden_states)


# --------------------------------------------------------------------------------------------
# Config


class RetrieverConfig(PretrainedConfig):
    """Everything that rebuilds a trained retriever: backbone config, pooling, loss and MoE settings."""

    model_type = "moe_retriever"

    kind: str = "baseline"  # baseline | sbmoe | moe
    backbone: str = ""  # name or path the backbone came from (a record; never re-read on load)
    backbone_config: dict | None = None  # the backbone's BertConfig as a dict
    pooling: str = "cls"  # cls | mean
    normalize: bool = True
    temperature: float = 0.05
    num_experts: int = 8
    top_k: int = 1
    expert_dim: int | None = None  # SB-MoE expert hidden size; None means hidden / 2
    noise_std: float = 0.0  # SB-MoE noisy gating during training (0 = off)
    moe_layers: list[int] | None = None  # token-level MoE: None means every other layer (1, 3, 5, ...)
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 0.0
    inference_mode: str = "top1"  # SB-MoE: top1 | all

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
    expert_load: torch.Tensor | None = None  # (L, E) assignments per expert, per MoE layer
    router_entropy: torch.Tensor | None = None  # (L,)


# --------------------------------------------------------------------------------------------
# Models


class BiEncoder(PreTrainedModel):
    """Shared BERT encoder for queries and documents; pooling and optional L2 normalisation.

    The subclasses add MoE; the contrastive loss lives here, so the trainer only calls forward.
    """

    config_class = RetrieverConfig
    base_model_prefix = "retriever"
    main_input_name = "query_input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    kind = "baseline"

    def __init__(self, config: RetrieverConfig):
        super().__init__(config)
        self.encoder = BertModel(BertConfig(**config.backbone_config), add_pooling_layer=False)
        self.add_moe(config)
        self.post_init()

    def add_moe(self, config: RetrieverConfig) -> None:
        """Subclasses add their MoE modules here, before the one `post_init`."""

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_backbone(cls, name_or_path: str, pooling: str = "auto", **settings) -> BiEncoder:
        """A new retriever around a pretrained backbone (hub name or local folder)."""
        backbone = AutoModel.from_pretrained(name_or_path, add_pooling_layer=False)
        if pooling == "auto":
            pooling = detect_pooling(name_or_path)
        backbone_config = {k: v for k, v in backbone.config.to_dict().items() if k in BertConfig().to_dict()}
        config = RetrieverConfig(
            kind=cls.kind, backbone=str(name_or_path), backbone_config=backbone_config, pooling=pooling, **settings
        )
        model = cls(config)
        model.encoder.load_state_dict(backbone.state_dict())
        model.after_backbone_loaded()
        return model

    def after_backbone_loaded(self) -> None:
        """Hook for subclasses that derive weights from the backbone (upcycling)."""

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

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, list]:
        """(B, H) representations and the routing decisions made on the way (none for the baseline)."""
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
        return self.pool(hidden, attention_mask), []

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        reps, _ = self.embed(input_ids, attention_mask)
        return F.normalize(reps, dim=-1) if self.config.normalize else reps

    def aux_losses(self, routings: list[Routing]) -> torch.Tensor | None:
        """coef * balance + z-coef * z-loss, averaged over MoE blocks; None without MoE.

        Token-level blocks route only non-padding tokens, so padding never enters these losses.
        """
        if not routings:
            return None
        total = 0.0
        for routing in routings:
            total = total + self.config.aux_loss_coef * load_balancing_loss(routing.logits, self.config.top_k)
            if self.config.z_loss_coef > 0:
                total = total + self.config.z_loss_coef * router_z_loss(routing.logits)
        return total / len(routings)

    # ---- training forward ---------------------------------------------------------------
    def forward(
        self,
        query_input_ids: torch.Tensor,
        query_attention_mask: torch.Tensor,
        doc_input_ids: torch.Tensor | None = None,
        doc_attention_mask: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        pos_ids: torch.Tensor | None = None,
        **_: object,
    ) -> RetrieverOutput:
        q, q_routing = self.embed(query_input_ids, query_attention_mask)
        if doc_input_ids is None:
            return RetrieverOutput(q_reps=self._norm(q))
        d, d_routing = self.embed(doc_input_ids, doc_attention_mask)
        q, d = self._norm(q), self._norm(d)
        contrastive, logits = info_nce(q, d, self.config.temperature, doc_ids, pos_ids)
        routings = q_routing + d_routing
        aux = self.aux_losses(routings)
        loss = contrastive if aux is None else contrastive + aux
        out = RetrieverOutput(loss=loss, contrastive_loss=contrastive.detach(), logits=logits, q_reps=q, d_reps=d)
        if routings:
            out.aux_loss = aux.detach()
            stats = self.routing_summary(routings)
            out.expert_load, out.router_entropy = stats["load"], stats["entropy"]
        return out

    def _norm(self, reps: torch.Tensor) -> torch.Tensor:
        return F.normalize(reps, dim=-1) if self.config.normalize else reps

    def routing_summary(self, routings: list[Routing]) -> dict[str, torch.Tensor]:
        """Per MoE block (queries and documents pooled): assignments per expert and router entropy."""
        n_blocks = self.num_moe_blocks()
        loads, entropies = [], []
        for b in range(n_blocks):
            parts = routings[b::n_blocks]
            stats = [routing_stats(r.indices, r.probs, self.config.num_experts) for r in parts]
            loads.append(sum(s["load"] for s in stats))
            entropies.append(torch.stack([s["entropy"] for s in stats]).mean())
        return {"load": torch.stack(loads), "entropy": torch.stack(entropies)}

    def num_moe_blocks(self) -> int:
        return 0


class TinyBERTWithMoE(BiEncoder):
    """SB-MoE: one MoE block on the pooled vector after the final layer; equals the baseline at init."""

    kind = "sbmoe"

    def add_moe(self, config: RetrieverConfig) -> None:
        hidden = config.backbone_config["hidden_size"]
        self.moe = SingleBlockMoE(
            hidden, config.num_experts, config.top_k, config.expert_dim or hidden // 2, config.noise_std
        )

    def embed(self, input_ids, attention_mask):
        pooled, _ = super().embed(input_ids, attention_mask)
        out, routing = self.moe(pooled, mode=self.config.inference_mode if not self.training else "top1")
        return out, [routing]

    def num_moe_blocks(self) -> int:
        return 1


class TinyBERTMoERegular(BiEncoder):
    """Token-level top-k MoE in the FFN of chosen layers, experts upcycled from the dense FFN."""

    kind = "moe"

    def add_moe(self, config: RetrieverConfig) -> None:
        bc = config.backbone_config
        self.moe_layers = config.resolved_moe_layers()
        for i in self.moe_layers:
            layer = self.encoder.encoder.layer[i]
            layer.intermediate = SparseMoEFeedForward(
                bc["hidden_size"], bc["intermediate_size"], config.num_experts, config.top_k
            )
            layer.output.dense = nn.Identity()

    def moe_blocks(self) -> list[SparseMoEFeedForward]:
        return [self.encoder.encoder.layer[i].intermediate for i in self.moe_layers]

    def num_moe_blocks(self) -> int:
        return len(self.moe_layers)

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

    def embed(self, input_ids, attention_mask):
        blocks = self.moe_blocks()
        for block in blocks:
            block.token_mask = attention_mask
        try:
            pooled, _ = super().embed(input_ids, attention_mask)
        finally:
            for block in blocks:
                block.token_mask = None
        return pooled, [block.last_routing for block in blocks]


MODEL_CLASSES: dict[str, type[BiEncoder]] = {
    "baseline": BiEncoder,
    "zeroshot": BiEncoder,
    "sbmoe": TinyBERTWithMoE,
    "moe": TinyBERTMoERegular,
}


def load_model(path: str | Path) -> BiEncoder:
    """A saved retriever of any kind; the class comes from its config, never from code in the folder."""
    config = RetrieverConfig.from_pretrained(path)
    return MODEL_CLASSES[config.kind].from_pretrained(path, config=config)


def detect_pooling(name_or_path: str) -> str:
    """Mean pooling when a local sentence-transformers folder says so, [CLS] otherwise (the paper)."""
    cfg = Path(name_or_path) / "1_Pooling" / "config.json"
    if cfg.is_file() and json.loads(cfg.read_text()).get("pooling_mode_mean_tokens"):
        return "mean"
    return "cls"


def count_parameters(model: BiEncoder) -> dict[str, int]:
    """Total parameters, and parameters active per token: all but the (E - k) experts not chosen.

    Embedding tables are counted whole in both (the usual convention for MoE reports).
    """
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    blocks = [model.moe] if isinstance(model, TinyBERTWithMoE) else []
    if isinstance(model, TinyBERTMoERegular):
        blocks = model.moe_blocks()
    for block in blocks:
        per_expert = sum(p.numel() for p in block.experts[0].parameters())
        inactive += (len(block.experts) - block.top_k) * per_expert
    return {"total": total, "active_per_token": total - inactive}
