"""Initialising a backbone's item table from external item vectors (TSLRec's LLM item embeddings).

Below the stages: ``stages/train.py`` calls it when ``tslrec.init_backbone`` is set. The LLM's
vectors (576 dimensions for SmolLM2) are wider than the table (``model.hidden``), so they are
projected on their top principal components (the directions that tell items apart most), and
rescaled to the standard deviation the backbone's own initialisation gave the table, so that
the learning rate and dropout tuned for the default init keep their meaning.
"""

from __future__ import annotations

import numpy as np
import torch

from llmser_ray.errors import StageError
from llmser_ray.models.base import SeqRecModel


def project(vectors: np.ndarray, dim: int, std: float) -> np.ndarray:
    """Rows 1.. of ``vectors`` on their top-``dim`` principal components, scaled to ``std``;
    row 0 (padding) stays zero. Fewer source dimensions than ``dim`` leave the rest zero."""
    x = np.asarray(vectors[1:], dtype=np.float64)
    x = x - x.mean(0, keepdims=True)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    k = min(dim, vt.shape[0])
    z = x @ vt[:k].T
    z *= std / max(float(z.std()), 1e-12)
    out = np.zeros((len(vectors), dim), dtype=np.float32)
    out[1:, :k] = z
    return out


def init_item_table(model: SeqRecModel, vectors: np.ndarray) -> None:
    """Overwrite the model's item rows ``0..num_items`` with the projected ``vectors``."""
    if len(vectors) != model.num_items + 1:
        raise StageError(f"the item vectors have {len(vectors) - 1} items, the dataset {model.num_items}",
                         "rerun `llmser-ray tslrec-embed --force` on this workdir")
    with torch.no_grad():
        table = model.item_emb.weight
        std = float(table[1:model.num_items + 1].std())
        new = torch.as_tensor(project(vectors, table.shape[1], std), dtype=table.dtype)
        table[: model.num_items + 1] = new.to(table.device)
