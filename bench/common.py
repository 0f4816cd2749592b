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
    """A fresh model, its optimizer and real Beauty batches, as ``training.train_epoch`` pads them."""

    model: Any
    batches: list[Any]
    step: Callable[[Any], None]


def training_steps(cfg: Any, ds: Any, n_batches: int) -> TrainingSteps:
    """``n_batches`` batches of the random order training uses; ``step`` runs forward, backward
    and one Adam update on one of them."""
    import numpy as np
    import torch

    from llmser_ray.models import build_model
    from llmser_ray.models.losses import Objective, reduce
    from llmser_ray.training import LossModule, _batch_tensor, training_sequences

    torch.manual_seed(0)
    model = build_model(cfg.model, ds.num_items)
    wrapped = LossModule(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    seqs = [s for s in training_sequences(ds, False) if len(s) >= 2]
    order = np.random.default_rng(1).permutation(len(seqs))
    bs = cfg.train.batch_size
    batches = [_batch_tensor([seqs[i] for i in order[s:s + bs]], cfg.model.max_len)
               for s in range(0, bs * n_batches, bs)]
    gen = torch.Generator().manual_seed(0)
    objective = Objective.from_config(cfg.train)

    def step(batch: Any) -> None:
        stats = wrapped(batch, objective, gen)
        loss = reduce(stats[:, 0], stats[:, 1], objective.reduction)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return TrainingSteps(model, batches, step)
