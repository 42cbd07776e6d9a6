"""The sentence-transformers module that export.py ships in the folder of every MoE variant.

Stock modules (Transformer, Pooling) cannot hold these models: SB-MoE's head sits between the
backbone and the output (or on its token states, in the seed design) and the token-level MoE replaces
the backbone's own FFNs. So one module runs the project's model end to end, through the very
`embed` that eval.py calls (a copy of model.py travels with it as `modeling_moe_retriever.py`), and
a stock `Normalize` follows. Loading runs this code: `SentenceTransformer(DIR, trust_remote_code=True)`.

Lengths follow eval.py: `encode_query` truncates at `query_max_length`, everything else at
`max_seq_length` (the document length).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from sentence_transformers.base.modules import InputModule
from transformers import AutoTokenizer

try:  # inside an exported folder: the model code shipped beside this file
    from .modeling_moe_retriever import load_model
except ImportError:  # in the repository itself
    load_model = importlib.import_module("model").load_model


class MoEEncoder(InputModule):
    """Tokenizer + the project's retriever; writes `sentence_embedding` (before normalisation)."""

    config_keys = ["max_seq_length", "query_max_length"]
    config_file_name = "sentence_moe_config.json"
    save_in_root = True

    def __init__(self, model: torch.nn.Module, tokenizer, max_seq_length: int = 256, query_max_length: int = 64):
        super().__init__()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_seq_length = max_seq_length
        self.query_max_length = query_max_length

    def preprocess(self, inputs, prompt: str | None = None, task: str | None = None, **kwargs) -> dict:
        texts = [prompt + t for t in inputs] if prompt else list(inputs)
        length = self.query_max_length if task == "query" else self.max_seq_length
        return self.tokenizer(texts, padding=True, truncation=True, max_length=length, return_tensors="pt")

    def forward(self, features: dict, **kwargs) -> dict:
        features["sentence_embedding"] = self.model.embed(features["input_ids"], features["attention_mask"]).reps
        return features

    def get_embedding_dimension(self) -> int:
        return self.model.config.backbone_config["hidden_size"]

    def get_sentence_embedding_dimension(self) -> int:
        return self.get_embedding_dimension()

    def save(self, output_path: str, *args, safe_serialization: bool = True, **kwargs) -> None:
        self.model.save_pretrained(output_path, safe_serialization=safe_serialization)
        self.save_tokenizer(output_path)
        self.save_config(output_path)

    @classmethod
    def load(cls, model_name_or_path: str, subfolder: str = "", token=None, cache_folder=None, revision=None,
             local_files_only: bool = False, **kwargs) -> MoEEncoder:  # fmt: skip
        hub = dict(token=token, cache_folder=cache_folder, revision=revision, local_files_only=local_files_only)
        path = cls.load_dir_path(model_name_or_path, subfolder=subfolder, **hub)
        config = cls.load_config(model_name_or_path, subfolder=subfolder, **hub)
        return cls(load_model(Path(path)), AutoTokenizer.from_pretrained(path), **config)
