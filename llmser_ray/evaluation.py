"""Leave-one-out ranking metrics: HR@k and NDCG@k, overall and per user/item group.

Ranks are 0-based: rank r means r competing items are placed ahead of the target.

FULL protocol (the default; sampled metrics are biased, Krichene & Rendle 2020). Every item
``1..num_items`` competes with the target, except:
- the padding column 0, always;
- with ``EvalConfig.mask_history``, every item of the user's WHOLE input history (all of
  ``inputs[u]``, not only the last ``max_len`` items the model reads), or of ``seen[u]`` when
  given: augmented users READ pseudo-prior items, but only their real history is masked, so a
  baseline and an augmented model compete against the same items.
The target is always ranked with its own score, even when it also occurs in the history.

SAMPLED protocol (the papers' protocol, for comparison with published numbers). The target
competes with ``EvalConfig.num_negatives`` items drawn uniformly without replacement from the
items not in ``seen[u]`` (default: the input history; the target is always excluded too). The
draw depends only on ``EvalConfig.seed`` and the users' order and ``seen`` sets, so it is the
same across runs, models, batch sizes and devices. A user with fewer unseen items than
``num_negatives`` is ranked against all of them.

Ties are counted pessimistically: rank = #competitors scoring above the target + #competitors
scoring equal to it, so a model that gives every item the same score gets the worst rank, not
the best. A NaN score counts as -inf (a NaN target therefore ties with, and is ranked behind,
every competitor that is not above it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from llmser_ray.config import EvalConfig
from llmser_ray.data.padding import pad_left
from llmser_ray.models.base import SeqRecModel


def _sample_negatives(seen: Sequence[np.ndarray], targets: np.ndarray, num_items: int,
                      num_negatives: int, rng: np.random.Generator) -> np.ndarray:
    """``[U, num_negatives]`` unseen items per user (``-1`` where a user has too few).

    Draws k distinct ranks among the user's unseen items, then maps rank j to the (j+1)-th
    unseen item: ``j + 1 + #{seen items at or below it}``, found by a binary search over the
    sorted seen items (``s_i - 1 - i`` unseen items lie below the i-th seen item ``s_i``).
    """
    out = np.full((len(targets), num_negatives), -1, dtype=np.int64)
    for u, (hist, target) in enumerate(zip(seen, targets, strict=True)):
        s = np.unique(np.append(np.asarray(hist, dtype=np.int64), target))
        s = s[(s >= 1) & (s <= num_items)]
        available = num_items - len(s)
        k = min(num_negatives, available)
        if k <= 0:
            continue
        j = rng.choice(available, size=k, replace=False)
        out[u, :k] = j + 1 + np.searchsorted(s - 1 - np.arange(len(s)), j, side="right")
    return out


def _nan_to_neg_inf(x: torch.Tensor) -> torch.Tensor:
    return x.masked_fill(x.isnan(), float("-inf"))


def _full_ranks(scores: torch.Tensor, tgt: torch.Tensor, hist: torch.Tensor | None) -> torch.Tensor:
    """Pessimistic full-ranking ranks of one batch: ``[B]`` from scores ``[B, I + 1]``.

    Two passes over the score matrix (compare, count) and never a write into it: ``scores`` may
    be a model's own buffer. The excluded columns (padding, history, the target itself) are
    switched off in the boolean comparison result by scatters that touch only those cells. A
    NaN competitor compares False, which is exactly "NaN counts as -inf" against a finite or
    +inf target; a target whose score is NaN or -inf ties with every competitor, so its rank is
    the number of competitors (counted separately for those rare rows).
    """
    target_score = scores.gather(1, tgt)
    beaten = scores >= target_score
    beaten[:, 0] = False
    if hist is not None:
        beaten.scatter_(1, hist, False)
    beaten.scatter_(1, tgt, False)  # the target does not compete with itself
    ranks = beaten.sum(1, dtype=torch.int32)  # int32 sums bools about twice as fast as int64
    floor = ~(target_score.squeeze(1) > float("-inf"))  # NaN or -inf
    if floor.any():
        rows = floor.nonzero(as_tuple=True)[0]
        competes = torch.ones(len(rows), scores.shape[1], dtype=torch.bool, device=scores.device)
        competes[:, 0] = False
        if hist is not None:
            competes.scatter_(1, hist[rows], False)
        competes.scatter_(1, tgt[rows], False)
        ranks[rows] = competes.sum(1, dtype=torch.int32)
    return ranks


def rank_targets(model: SeqRecModel, inputs: Sequence[np.ndarray], targets: np.ndarray,
                 cfg: EvalConfig, num_items: int, seen: Sequence[np.ndarray] | None = None,
                 device: str | torch.device = "cpu") -> np.ndarray:
    """0-based rank of each user's target (see the module docstring for the rules).

    ``model`` must already be on ``device``; it is put in eval mode and restored afterwards.
    """
    targets = np.asarray(targets, dtype=np.int64)
    if len(inputs) != len(targets):
        raise ValueError(f"{len(inputs)} inputs but {len(targets)} targets")
    if len(targets) and (targets.min() < 1 or targets.max() > num_items):
        raise ValueError(f"targets must lie in 1..{num_items}")
    negatives = None
    if cfg.protocol == "sampled":
        seen = inputs if seen is None else seen
        if len(seen) != len(targets):
            raise ValueError(f"{len(seen)} seen sets but {len(targets)} targets")
        negatives = _sample_negatives(seen, targets, num_items, cfg.num_negatives,
                                      np.random.default_rng(cfg.seed))

    ranks = np.empty(len(targets), dtype=np.int64)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(targets), cfg.batch_size):
                stop = min(start + cfg.batch_size, len(targets))
                batch = [np.asarray(s, dtype=np.int64) for s in inputs[start:stop]]
                seqs = torch.from_numpy(pad_left(batch, model.max_len)).to(device)
                scores = model.score_all(seqs).float()
                tgt = torch.from_numpy(targets[start:stop]).to(device).unsqueeze(1)
                if negatives is None:
                    hist = None
                    if cfg.mask_history:
                        masked = batch if seen is None else [np.asarray(s, dtype=np.int64)
                                                             for s in seen[start:stop]]
                        longest = max((len(s) for s in masked), default=0)
                        hist = torch.from_numpy(pad_left(masked, max(longest, 1))).to(device)
                    ranks[start:stop] = _full_ranks(scores, tgt, hist).cpu().numpy()
                else:
                    neg = torch.from_numpy(negatives[start:stop]).to(device)
                    target_score = _nan_to_neg_inf(scores.gather(1, tgt))
                    competing = _nan_to_neg_inf(scores.gather(1, neg.clamp_min(0)))
                    beaten = (competing >= target_score) & (neg >= 0)
                    ranks[start:stop] = beaten.sum(1).cpu().numpy()
    finally:
        model.train(was_training)
    return ranks


def ndcg_at(ranks: np.ndarray, k: int) -> np.ndarray:
    """Per-user NDCG@k of one relevant item at 0-based ``ranks``: 1/log2(rank + 2) if rank < k."""
    r = np.asarray(ranks)
    return np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)


def metrics_from_ranks(ranks: np.ndarray, ks: Sequence[int],
                       groups: dict[str, np.ndarray] | None = None) -> dict[str, dict[str, float]]:
    """HR@k and NDCG@k (one relevant item: 1/log2(rank + 2) if rank < k) per group.

    Returns ``{"overall": {"hr@5": ..., "ndcg@5": ..., ..., "n": users}, group: {...}}``. A group
    without users has ``n = 0`` and NaN metrics: "no evidence" must not read as a score of 0.
    """
    ranks = np.asarray(ranks, dtype=np.int64)
    selections = {"overall": np.ones(len(ranks), dtype=bool), **(groups or {})}
    out: dict[str, dict[str, float]] = {}
    for name, sel in selections.items():
        sel = np.asarray(sel, dtype=bool)
        if sel.shape != ranks.shape:
            raise ValueError(f"group '{name}' has {sel.shape[0]} entries for {len(ranks)} ranks")
        r = ranks[sel]
        row: dict[str, float] = {}
        for k in ks:
            row[f"hr@{k}"] = float((r < k).mean()) if len(r) else float("nan")
            row[f"ndcg@{k}"] = float(ndcg_at(r, k).mean()) if len(r) else float("nan")
        row["n"] = int(len(r))
        out[name] = row
    return out


def user_groups(is_tail_user: np.ndarray, target_is_tail_item: np.ndarray) -> dict[str, np.ndarray]:
    """Boolean masks for the four reported groups (a user is in one user and one item group)."""
    tail_user = np.asarray(is_tail_user, dtype=bool)
    tail_item = np.asarray(target_is_tail_item, dtype=bool)
    return {"tail_user": tail_user, "head_user": ~tail_user,
            "tail_item": tail_item, "head_item": ~tail_item}


def evaluate(model: SeqRecModel, inputs: Sequence[np.ndarray], targets: np.ndarray,
             cfg: EvalConfig, num_items: int, groups: dict[str, np.ndarray] | None = None,
             seen: Sequence[np.ndarray] | None = None,
             device: str | torch.device = "cpu") -> dict[str, dict[str, float]]:
    """Metrics of ``rank_targets`` for ``cfg.ks``, overall and per group."""
    ranks = rank_targets(model, inputs, targets, cfg, num_items, seen=seen, device=device)
    return metrics_from_ranks(ranks, cfg.ks, groups)
