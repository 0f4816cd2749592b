"""What dual-channel training and serving read from the augmentation stages.

Per user (aligned with ``SeqDataset.sequences``): the pseudo-prior items to prepend and the
weight ``w_u`` of the augmented channel. The weight is recomputed here from the stored
reliability ``r_u`` with the run's own ``dual`` settings, so a Tune trial that changes N, beta
or T reuses the cached LLM output and never asks the LLM again.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from llmser_ray.config import Config
from llmser_ray.data.dataset import SeqDataset, split_list_column
from llmser_ray.errors import StageError


def decay_weights(r: np.ndarray, train_len: np.ndarray, decay: str, beta: float,
                  threshold: int) -> np.ndarray:
    """``w_u`` from ``r_u`` and the user's original length (METHOD stage 2).

    step: ``r`` for users at or below T, ``beta * r`` above (the paper); smooth:
    ``r * exp(-beta * max(0, len - T))``, which avoids a cliff at T. Clipped to [0, 1]: a
    negative cosine means "unreliable", not "anti-reliable".
    """
    r = np.clip(np.nan_to_num(np.asarray(r, dtype=np.float64), nan=0.0), 0.0, 1.0)
    length = np.asarray(train_len, dtype=np.float64)
    if decay == "step":
        w = np.where(length <= threshold, r, beta * r)
    elif decay == "smooth":
        w = r * np.exp(-beta * np.maximum(0.0, length - threshold))
    else:
        raise ValueError(f"unknown decay '{decay}' (expected 'step' or 'smooth')")
    return np.clip(w, 0.0, 1.0)


def order_by_candidate_rank(pseudo: np.ndarray, candidates: np.ndarray) -> np.ndarray:
    """Chronological prefix from ranked candidates: the best-ranked item last, next to the history."""
    rank = {int(c): i for i, c in enumerate(candidates)}
    return np.array(sorted((int(p) for p in pseudo), key=lambda p: -rank.get(p, len(rank))),
                    dtype=np.int64)


def candidate_prefix(candidates: np.ndarray, n: int) -> np.ndarray:
    """The no-LLM prefix (``dual.pseudo_source=candidates``): the top ``n`` candidates, reversed.

    Candidates are ranked "most plausible earlier item first" (the reverse model scores each
    item as the one just before the first real item); the one nearest in time to the real
    history should sit next to it, so the best goes last. Dual training and the server both
    build the prefix here, so the served one is the one the model was trained on.
    """
    return np.asarray(candidates[:n], dtype=np.int64)[::-1].copy()


def selection_prefix(picked: np.ndarray | list[int], candidates: np.ndarray, n: int,
                     order: str) -> np.ndarray:
    """The LLM prefix (``dual.pseudo_source=llm``): the first ``n`` items the LLM picked, in
    the LLM's order, or by candidate rank (best last) with ``dual.order=candidate``. Shared by
    dual training and the server's per-request LLM call."""
    prefix = np.asarray(picked[:n], dtype=np.int64)
    return order_by_candidate_rank(prefix, candidates) if order == "candidate" else prefix


@dataclass
class Augmentation:
    """Pseudo items (empty array for users without) and channel weights, indexed like the dataset."""

    pseudo: list[np.ndarray]
    weight: np.ndarray
    source: str
    path: Path

    @property
    def augmented(self) -> np.ndarray:
        return np.array([len(p) > 0 for p in self.pseudo]) & (self.weight > 0)

    def inputs(self, inputs: list[np.ndarray], context_only: bool = False) -> list[np.ndarray]:
        """Model inputs with pseudo items prepended for augmented users. ``context_only`` (training
        with ``dual.pseudo_targets=false``) stores the pseudo items as negated ids, the mark
        ``LossModule`` reads to keep them out of the targets (``batching.TrainBatch``)."""
        sign = -1 if context_only else 1
        return [np.concatenate([sign * p, x]) if len(p) else x
                for p, x in zip(self.pseudo, inputs, strict=True)]


def augmentation_dir(cfg: Config) -> Path:
    sub = "reliability" if cfg.dual.pseudo_source == "llm" else "candidates"
    return cfg.workdir_path / sub


def load_augmentation(cfg: Config, ds: SeqDataset) -> Augmentation:
    """Read ``reliability/`` (LLMSeR) or ``candidates/`` (no-LLM ablation) for dual-channel training."""
    folder = augmentation_dir(cfg)
    name = "reliability.parquet" if cfg.dual.pseudo_source == "llm" else "candidates.parquet"
    path = folder / name
    if not path.is_file():
        stage = "llmser-ray augment" + ("" if cfg.dual.pseudo_source == "llm" else " --candidates-only")
        raise StageError(f"dual-channel training needs {path}",
                         f"run `{stage}` with the same --workdir first")
    table = pq.read_table(path)
    users = table.column("user_id").to_numpy()
    if len(users) and (users.min() < 1 or users.max() > ds.num_users):
        raise StageError(f"{path} names users outside 1..{ds.num_users}",
                         "it was written for another dataset: rerun `llmser-ray augment`")
    n = cfg.dual.num_pseudo
    empty = np.zeros(0, dtype=np.int64)
    pseudo = [empty] * ds.num_users
    weight = np.zeros(ds.num_users, dtype=np.float64)
    if cfg.dual.pseudo_source == "llm":
        picked = split_list_column(table.column("pseudo_items"))
        cands = (split_list_column(table.column("candidates")) if cfg.dual.order == "candidate"
                 else [empty] * len(picked))  # read only to order by rank
        lists = [selection_prefix(p, c, n, cfg.dual.order) for p, c in zip(picked, cands, strict=True)]
        r = table.column("r_u").to_numpy(zero_copy_only=False)
        w = decay_weights(r, ds.train_len[users - 1], cfg.dual.decay, cfg.dual.beta, cfg.decay_threshold)
    else:
        lists = [candidate_prefix(c, n) for c in split_list_column(table.column("candidates"))]
        w = np.full(len(users), cfg.dual.constant_weight)
    for u, items, wu in zip(users, lists, w, strict=True):
        items = np.asarray(items, dtype=np.int64)
        if len(items) and wu > 0:
            pseudo[u - 1] = items
            weight[u - 1] = wu
    return Augmentation(pseudo, weight, cfg.dual.pseudo_source, folder)
