"""What the benchmark scripts share: where Beauty is, how its config starts, how the machine's
load is printed, and the training-step setup of the per-batch benchmarks.

The scripts run as ``python bench/<name>.py``, so this folder is on ``sys.path`` and they import
it as ``common``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BEAUTY = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon_beauty_2014_5core"


def beauty_sets(workdir: str | Path, data: Path = BEAUTY) -> list[str]:
    """Config overrides that read Amazon Beauty (S3-Rec format) into ``workdir``."""
    return [f"workdir={Path(workdir).resolve()}", "data.source=s3rec",
            f"data.path={data / 'Beauty.txt'}", f"data.item_path={data / 'items.jsonl'}"]


def loadavg() -> str:
    """The 1/5/15-minute load average, printed beside every figure (the machine may be shared)."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


@dataclass
class TrainingSteps:
    """A fresh model, its optimizer and real Beauty batches (``[B, W]`` tensors), as
    ``training.train_epoch`` pads them."""

    model: Any
    batches: list[Any]
    step: Callable[[Any], None]


def training_steps(cfg: Any, ds: Any, n_batches: int) -> TrainingSteps:
    """``n_batches`` batches of the random order training uses; ``step`` runs
    ``training.train_step`` (forward, backward, one Adam update) on one of them."""
    import numpy as np
    import torch

    from llmser_ray.models import build_model
    from llmser_ray.models.batching import TrainBatch, pad_batch
    from llmser_ray.models.losses import Objective
    from llmser_ray.stages.train import LossModule, train_step, training_sequences

    torch.manual_seed(0)
    model = build_model(cfg.model, ds.num_items)
    wrapped = LossModule(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    seqs = [s for s in training_sequences(ds, False) if len(s) >= 2]
    order = np.random.default_rng(1).permutation(len(seqs))
    bs = cfg.train.batch_size
    batches = [pad_batch([seqs[i] for i in order[s:s + bs]], cfg.model.max_len)
               for s in range(0, bs * n_batches, bs)]
    gen = torch.Generator().manual_seed(0)
    objective = Objective.from_config(cfg.train)

    def step(batch: Any) -> None:
        train_step(wrapped, opt, TrainBatch.plain(batch), objective, gen)

    return TrainingSteps(model, batches, step)
