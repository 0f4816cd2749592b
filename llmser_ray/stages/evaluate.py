"""The ``evaluate`` stage: test metrics of a model, by group, under both ranking protocols.

Part of the train stage's publication (``models/<name>/metrics.json``, key ``test``): the train
stage calls :func:`evaluate_splits` on the best weights before it publishes, so a model folder
is complete only with its evaluation. Kept as its own module because the same code scores the
non-neural baselines (:func:`evaluate_baseline`) that every quality table carries, and so that
one place says what "test NDCG@10" means: the real history masked under full ranking; under
100 negatives, negatives that avoid every real item, the same draw for every model.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from llmser_ray.config import Config
from llmser_ray.data.dataset import SeqDataset, load_dataset
from llmser_ray.evaluation import metrics_from_ranks, rank_targets, user_groups
from llmser_ray.models.base import SeqRecModel
from llmser_ray.stages.base import Stage

STAGE = Stage(
    name="evaluate", cli="train", output="models/<name>/metrics.json (test)", schema_version=1,
    inputs=("train",), identity=("the train stage's run key", "eval.*"),
    schema="docs/SCHEMA.md#models",
    summary="test metrics by group, full ranking and 100 negatives (models and baselines)")


def split_groups(ds: SeqDataset, targets: np.ndarray) -> dict[str, np.ndarray]:
    """The user/item groups every table is broken down by, for the targets of one split."""
    return user_groups(ds.is_tail_user, ds.is_tail_item[targets])


def evaluate_baseline(cfg: Config, name: str) -> dict[str, Any]:
    """Validation and test metrics of a non-neural baseline (models/baselines.py) fitted on the
    training sequences, under the same protocols as a trained model's ``metrics.json``."""
    from llmser_ray.models.baselines import BASELINES

    ds = load_dataset(cfg.workdir_path / "dataset")
    model = BASELINES[name](ds.train_sequences(), ds.num_items)
    inputs, targets = ds.split("valid")
    valid = metrics_from_ranks(rank_targets(model, inputs, targets, cfg.eval, ds.num_items),
                               cfg.eval.ks, split_groups(ds, targets))
    return {"name": name, "valid": valid, "test": evaluate_splits(model, ds, cfg)}


def evaluate_splits(model: SeqRecModel, ds: SeqDataset, cfg: Config) -> dict[str, Any]:
    """Test metrics by group under both protocols (the configured one is the headline)."""
    inputs, targets = ds.split("test")
    groups = split_groups(ds, targets)
    real_history = list(inputs)
    if cfg.dual.enabled and cfg.dual.infer_augmented:
        from llmser_ray.augment.weights import load_augmentation

        inputs = load_augmentation(cfg, ds).inputs(inputs)
    out: dict[str, Any] = {}
    for protocol in ("full", "sampled"):
        ecfg = cfg.eval.model_copy(update={"protocol": protocol})
        # Full: mask the real history only. Sampled: negatives avoid every real item (incl. the
        # target), the same draw for every model so baselines and LLMSeR are comparable.
        seen = list(ds.sequences) if protocol == "sampled" else real_history
        ranks = rank_targets(model, inputs, targets, ecfg, ds.num_items, seen=seen)
        out[protocol] = metrics_from_ranks(ranks, cfg.eval.ks, groups)
    return out
