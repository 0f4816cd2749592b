"""The ``pretrain`` stage: the plain forward backbone and the reverse-trained one.

The forward model is the baseline every result is compared with and the recommender ARV asks
for candidates; the reverse model (trained on reversed sequences) is SIA's collaborative
candidate generator: read backwards, "the next item" is the item that came before. Both are
ordinary ``train`` runs, so they cache, resume and report like any other model.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmser_ray.config import Config
from llmser_ray.training import TrainResult, train


@dataclass
class PretrainResult:
    forward: TrainResult
    reverse: TrainResult


def plain_config(cfg: Config, reverse: bool) -> Config:
    """The config of a pretrained model: no augmentation, forward or reverse."""
    return cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"reverse": reverse}),
        "dual": cfg.dual.model_copy(update={"enabled": False}),
    })


def pretrain(cfg: Config, force: bool = False) -> PretrainResult:
    forward = train(plain_config(cfg, reverse=False), force=force)
    reverse = train(plain_config(cfg, reverse=True), force=force)
    return PretrainResult(forward, reverse)
