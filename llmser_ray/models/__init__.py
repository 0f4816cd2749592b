"""Sequential-recommendation backbones behind one interface (``base.SeqRecModel``)."""

from __future__ import annotations

from llmser_ray.config import ModelConfig
from llmser_ray.models.base import SeqRecModel
from llmser_ray.models.bert4rec import BERT4Rec
from llmser_ray.models.gru4rec import GRU4Rec
from llmser_ray.models.sasrec import SASRec

BACKBONES: dict[str, type[SeqRecModel]] = {"sasrec": SASRec, "bert4rec": BERT4Rec,
                                           "gru4rec": GRU4Rec}


def build_model(cfg: ModelConfig, num_items: int) -> SeqRecModel:
    """A freshly initialised backbone for items ``1..num_items``."""
    return BACKBONES[cfg.backbone](cfg, num_items)


__all__ = ["BACKBONES", "BERT4Rec", "GRU4Rec", "SASRec", "SeqRecModel", "build_model"]
