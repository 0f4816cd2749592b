"""Sequential-recommendation backbones behind one interface (``base.SeqRecModel``)."""

from __future__ import annotations

import torch

from llmser_ray.config import ModelConfig, SemanticConfig
from llmser_ray.models.base import SeqRecModel
from llmser_ray.models.bert4rec import BERT4Rec
from llmser_ray.models.dualview import DualView
from llmser_ray.models.gru4rec import GRU4Rec
from llmser_ray.models.sasrec import SASRec

BACKBONES: dict[str, type[SeqRecModel]] = {"sasrec": SASRec, "bert4rec": BERT4Rec,
                                           "gru4rec": GRU4Rec}


def build_model(cfg: ModelConfig, num_items: int, semantic: SemanticConfig | None = None,
                text: torch.Tensor | None = None, init: bool = True) -> SeqRecModel:
    """A freshly initialised backbone for items ``1..num_items``; with ``semantic.enabled``, the
    backbone inside LLM-ESR's dual view over the item-text table ``text`` ``[num_items + 1, d]``.

    ``init=False`` skips the PCA initialisation (a reader about to load trained weights). The
    backbone is built first, so a seed gives it the same initial weights as a plain run.
    """
    model = BACKBONES[cfg.backbone](cfg, num_items)
    if not cfg.tie_output:
        model.untie_output()
    if semantic is not None and semantic.enabled == "auto":
        raise ValueError("semantic.enabled=auto must be resolved first (models/naming.py resolve_semantic)")
    if semantic is None or not semantic.enabled:
        return model
    if text is None:
        raise ValueError("semantic.enabled needs the item-text table")
    dual = DualView(model, text, semantic)
    if init and semantic.pca_init:
        dual.init_from_pca()
    return dual


__all__ = ["BACKBONES", "BERT4Rec", "DualView", "GRU4Rec", "SASRec", "SeqRecModel", "build_model"]
