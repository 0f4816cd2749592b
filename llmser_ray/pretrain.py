"""The ``pretrain`` stage: the plain forward backbone and the reverse-trained one.

The forward model is the baseline every result is compared with and the recommender ARV asks
for candidates; the reverse model (trained on reversed sequences) is SIA's collaborative
candidate generator: read backwards, "the next item" is the item that came before. Both are
ordinary ``train`` runs, so they cache, resume and report like any other model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmser_ray.config import Config
from llmser_ray.errors import StageError
from llmser_ray.io import read_manifest
from llmser_ray.training import TrainResult, default_name, model_dir, train


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


def pretrained_dir(cfg: Config, reverse: bool) -> Path:
    """The folder of the pretrained forward or reverse model the later stages read; a missing
    one is an error that says which command makes it (they never train it implicitly)."""
    folder = model_dir(cfg, default_name(plain_config(cfg, reverse=reverse)))
    if read_manifest(folder) is None:
        raise StageError(f"no {'reverse' if reverse else 'forward'}-trained model in {folder}",
                         "run `llmser-ray pretrain` with the same --workdir and config first")
    return folder


def pretrain(cfg: Config, force: bool = False) -> PretrainResult:
    forward = train(plain_config(cfg, reverse=False), force=force)
    reverse = train(plain_config(cfg, reverse=True), force=force)
    return PretrainResult(forward, reverse)
