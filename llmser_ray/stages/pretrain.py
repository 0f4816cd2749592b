"""The ``pretrain`` stage: the plain forward backbone and the reverse-trained one.

The forward model is the baseline every result is compared with and the recommender ARV asks
for candidates; the reverse model (trained on reversed sequences) is SIA's collaborative
candidate generator: read backwards, "the next item" is the item that came before. Both are
ordinary ``train`` runs, so they cache, resume and report like any other model; a stage that
reads one asks for it with :func:`forward_model` / :func:`reverse_model`, which train it first
(and say so) when it is missing or stale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmser_ray.config import Config
from llmser_ray.stages.base import Stage, needs
from llmser_ray.stages.train import TrainResult, default_name, finished_metrics, model_dir, train

STAGE = Stage(
    name="pretrain", output="models/<backbone>-<digest>[-reverse]", schema_version=1,
    inputs=("prepare",), identity=("model.*", "train.* except operational keys", "eval.*", "dataset digest"),
    schema="docs/SCHEMA.md#models", summary="the forward baseline and the reverse candidate model")


@dataclass
class PretrainResult:
    forward: TrainResult
    reverse: TrainResult


def plain_config(cfg: Config, reverse: bool) -> Config:
    """The config of a pretrained model: the plain backbone, forward or reverse: no
    augmentation, none of LLM-ESR's parts and no TSLRec initialisation (so LLMSeR's candidate and
    ARV stages and TSLRec's categories, which read these models, stay cached whatever the final
    model's semantic/distill/tslrec settings are)."""
    return cfg.model_copy(update={
        "train": cfg.train.model_copy(update={"reverse": reverse}),
        "dual": cfg.dual.model_copy(update={"enabled": False}),
        "semantic": cfg.semantic.model_copy(update={"enabled": False}),
        "distill": cfg.distill.model_copy(update={"enabled": False}),
        "tslrec": cfg.tslrec.model_copy(update={"init_backbone": False}),
    })


def pretrained_dir(cfg: Config, reverse: bool) -> Path:
    """The folder of the pretrained forward or reverse model (whether or not it exists yet)."""
    return model_dir(cfg, default_name(plain_config(cfg, reverse=reverse)))


def _model(cfg: Config, reverse: bool, stage: str) -> Path:
    plain = plain_config(cfg, reverse=reverse)
    which = "pretrain (reverse model)" if reverse else "pretrain (forward model)"
    needs(stage, which, lambda: finished_metrics(plain, pretrained_dir(cfg, reverse)) is not None,
          lambda: train(plain))
    return pretrained_dir(cfg, reverse)


def forward_model(cfg: Config, stage: str) -> Path:
    """The forward baseline's folder, trained first when missing or stale."""
    return _model(cfg, False, stage)


def reverse_model(cfg: Config, stage: str) -> Path:
    """The reverse candidate model's folder, trained first when missing or stale."""
    return _model(cfg, True, stage)


def pretrain(cfg: Config, force: bool = False) -> PretrainResult:
    forward = train(plain_config(cfg, reverse=False), force=force)
    reverse = train(plain_config(cfg, reverse=True), force=force)
    return PretrainResult(forward, reverse)
