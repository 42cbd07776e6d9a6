"""The fixed model and global batch shared by the DDP test and its single-process reference."""

import torch

from model import TinyBERTWithMoE


def tiny_model(backbone: str) -> TinyBERTWithMoE:
    torch.manual_seed(1)  # the router's random init must match in every process
    model = TinyBERTWithMoE.from_backbone(backbone, pooling="cls", num_experts=4, top_k=1, aux_loss_coef=0.0)
    for e in model.moe.experts:  # leave the zero init so the experts and router get real gradients
        torch.nn.init.normal_(e.fc_out.weight, std=0.1)
    return model.train()


def global_batch(n_queries: int = 4, negatives: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    n_docs = n_queries * (1 + negatives)
    doc_ids = torch.arange(n_docs)
    doc_ids[2 * (1 + negatives)] = doc_ids[0]  # query 2's positive is also query 0's: a false negative to mask
    return {
        "query_input_ids": torch.randint(5, 30, (n_queries, 6), generator=g),
        "query_attention_mask": torch.ones(n_queries, 6, dtype=torch.long),
        "doc_input_ids": torch.randint(5, 30, (n_docs, 9), generator=g),
        "doc_attention_mask": torch.ones(n_docs, 9, dtype=torch.long),
        "doc_ids": doc_ids,
        "pos_ids": doc_ids[:: 1 + negatives, None].clone(),  # (B, 1) each query's positive
    }
