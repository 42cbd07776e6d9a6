"""A retriever's config and outputs, and `Setting`: one variant setting declared once (flag, default, help, check)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.utils import ModelOutput

from sbmoe.layers import (
    Routing,
)


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


def backbone_flops(config: RetrieverConfig, tokens: float) -> float:
    """Analytic forward FLOPs (2 per multiply-add) of the backbone for one input; embeddings ignored."""
    c = config.backbone_config
    H, inner, L, T = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], tokens
    return float(L * (2 * (4 * T * H * H + 2 * T * T * H) + 2 * 2 * T * H * inner))
