"""Ranking and metrics against hand-computed values and a naive per-user loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from llmser_ray.config import EvalConfig
from llmser_ray.evaluation import evaluate, metrics_from_ranks, rank_targets, user_groups
from llmser_ray.models.base import SeqRecModel


class FixedScores(SeqRecModel):
    """Returns row u of a fixed table for the u-th user the evaluator asks about."""

    def __init__(self, table: np.ndarray, max_len: int = 4) -> None:
        super().__init__(table.shape[1] - 1, max_len)
        self.table = torch.as_tensor(table, dtype=torch.float32)
        self.next_user = 0
        self.calls: list[tuple[bool, bool, tuple[int, ...]]] = []

    def score_all(self, seqs: torch.Tensor) -> torch.Tensor:
        self.calls.append((self.training, torch.is_grad_enabled(), tuple(seqs.shape)))
        rows = self.table[self.next_user:self.next_user + len(seqs)]
        self.next_user += len(seqs)
        return rows

    def rank(self, inputs, targets, cfg: EvalConfig, seen=None) -> np.ndarray:
        self.next_user = 0
        return rank_targets(self, inputs, np.asarray(targets), cfg, self.num_items, seen=seen)


def _cfg(**kw) -> EvalConfig:
    return EvalConfig(**{"ks": [1, 3], "metric": "ndcg@3", **kw})


# Five items; column 0 (padding) gets the highest score so that masking it is visible.
TABLE = np.array([
    [9.0, 0.1, 0.5, 0.3, 0.9, 0.2],
    [9.0, 0.1, 0.5, 0.3, 0.9, 0.2],
    [9.0, 0.1, 0.5, 0.3, 0.9, 0.2],
    [9.0, 0.1, 0.5, 0.3, 0.9, 0.2],
])


def test_hand_computed_full_ranks_and_metrics() -> None:
    model = FixedScores(TABLE)
    inputs = [np.array([], dtype=np.int64), np.array([4]), np.array([3, 2]), np.array([1])]
    targets = [3, 3, 3, 1]
    ranks = model.rank(inputs, targets, _cfg(batch_size=3))
    # user 0: 0.9, 0.5 beat 0.3 -> 2; user 1: item 4 masked -> 1;
    # user 2: target 3 in history still ranked, item 2 masked -> 1; user 3: 1 in history,
    # the target itself -> all of 2, 3, 4, 5 score above 0.1 -> 4.
    assert ranks.tolist() == [2, 1, 1, 4]
    unmasked = model.rank(inputs, targets, _cfg(mask_history=False))
    assert unmasked.tolist() == [2, 2, 2, 4]
    m = metrics_from_ranks(np.array([0, 1, 2, 5]), [1, 3])["overall"]
    assert m["hr@1"] == 0.25 and m["hr@3"] == 0.75 and m["n"] == 4
    assert m["ndcg@1"] == 0.25
    assert m["ndcg@3"] == pytest.approx((1 + 1 / math.log2(3) + 0.5) / 4)
    assert list(m) == ["hr@1", "ndcg@1", "hr@3", "ndcg@3", "n"]


def test_model_is_called_in_eval_mode_without_grad_in_batches() -> None:
    model = FixedScores(TABLE, max_len=3).train()
    model.rank([np.array([1, 2, 3, 4, 5])] * 4, [1, 2, 3, 4], _cfg(batch_size=3))
    assert [c[2] for c in model.calls] == [(3, 3), (1, 3)]  # pad_left(inputs, max_len)
    assert all(not training and not grad for training, grad, _ in model.calls)
    assert model.training  # restored


def test_ties_are_pessimistic() -> None:
    model = FixedScores(np.ones((3, 11)))
    ranks = model.rank([np.array([], dtype=np.int64), np.array([2, 3]), np.array([7])],
                       [1, 5, 7], _cfg())
    # 9 other items tie with the target; minus the masked history items that are not the target.
    assert ranks.tolist() == [9, 7, 9]
    nan = np.full((1, 11), np.nan)
    assert FixedScores(nan).rank([np.array([2])], [1], _cfg()).tolist() == [8]


def test_full_ranking_matches_a_naive_loop() -> None:
    rng = np.random.default_rng(0)
    users, num_items = 60, 30
    table = rng.integers(0, 8, size=(users, num_items + 1)).astype(float)  # many ties
    items = np.arange(1, num_items + 1)
    inputs = [rng.choice(items, size=rng.integers(0, 12)) for _ in range(users)]
    targets = rng.integers(1, num_items + 1, size=users)
    inputs[0] = np.append(inputs[0], targets[0])  # a target inside the history
    for mask in (True, False):
        fast = FixedScores(table).rank(inputs, targets, _cfg(batch_size=7, mask_history=mask))
        naive = []
        for u in range(users):
            t, score = targets[u], table[u]
            rank = 0
            for item in range(1, num_items + 1):
                if item == t or (mask and item in set(inputs[u].tolist())):
                    continue
                rank += score[item] >= score[t]
            naive.append(rank)
        assert fast.tolist() == naive


def _seen_model(seen: list[np.ndarray], targets: list[int], num_items: int,
                target_score: float) -> FixedScores:
    """Seen items score 1, unseen 0, the target ``target_score``."""
    table = np.zeros((len(seen), num_items + 1))
    for u, (s, t) in enumerate(zip(seen, targets, strict=True)):
        table[u, s] = 1.0
        table[u, t] = target_score
    return FixedScores(table)


def test_sampled_negatives_exclude_seen_items() -> None:
    rng = np.random.default_rng(1)
    num_items = 150
    seen = [rng.choice(np.arange(1, num_items + 1), size=40, replace=False) for _ in range(20)]
    targets = [int(s[0]) for s in seen]
    cfg = _cfg(protocol="sampled", num_negatives=100)
    # Target below the seen items but above the unseen ones: rank 0 iff no negative is seen.
    ranks = _seen_model(seen, targets, num_items, 0.5).rank(seen, targets, cfg)
    assert (ranks == 0).all()
    # Target tied with every unseen item: all 100 distinct negatives tie (pessimistic).
    ranks = _seen_model(seen, targets, num_items, 0.0).rank(seen, targets, cfg)
    assert (ranks == 100).all()
    # The default seen set is the input history plus the target.
    inputs = [s[1:] for s in seen]
    ranks = _seen_model(seen, targets, num_items, 0.5).rank(inputs, targets, cfg)
    assert (ranks == 0).all()


def test_sampled_with_fewer_unseen_items_than_negatives() -> None:
    seen = [np.array([1, 2, 3])]
    ranks = _seen_model(seen, [1], 8, 0.0).rank(seen, [1], _cfg(protocol="sampled"))
    assert ranks.tolist() == [5]  # all 5 unseen items tie with the target


def test_sampled_protocol_is_deterministic_under_the_seed() -> None:
    rng = np.random.default_rng(2)
    users, num_items = 40, 300
    table = rng.random((users, num_items + 1))
    inputs = [rng.choice(np.arange(1, num_items + 1), size=5, replace=False) for _ in range(users)]
    targets = rng.integers(1, num_items + 1, size=users)

    def run(**kw) -> np.ndarray:
        return FixedScores(table).rank(inputs, targets, _cfg(protocol="sampled", **kw))

    first = run(batch_size=64)
    assert np.array_equal(first, run(batch_size=64))
    assert np.array_equal(first, run(batch_size=7))  # independent of batching
    assert not np.array_equal(first, run(seed=99))
    assert first.max() <= 100


def test_groups_and_empty_groups() -> None:
    groups = user_groups(np.array([1, 0, 1, 0]), np.array([True, True, True, True]))
    assert set(groups) == {"tail_user", "head_user", "tail_item", "head_item"}
    assert groups["head_user"].tolist() == [False, True, False, True]
    m = metrics_from_ranks(np.array([0, 3, 1, 50]), [1, 3], groups)
    assert m["tail_user"]["hr@3"] == 1.0 and m["tail_user"]["n"] == 2
    assert m["head_user"]["hr@3"] == 0.0 and m["head_user"]["ndcg@1"] == 0.0
    assert m["tail_item"] == m["overall"]
    assert m["head_item"]["n"] == 0 and math.isnan(m["head_item"]["ndcg@3"])
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array([0, 1]), [1], {"bad": np.array([True])})


def test_evaluate_composes_rank_and_metrics() -> None:
    model = FixedScores(TABLE)
    inputs = [np.array([4])] * 4
    groups = {"first": np.array([True, False, False, False])}
    out = evaluate(model, inputs, np.array([2, 2, 5, 1]), _cfg(), 5, groups=groups)
    # item 2 beats all unmasked others (4 masked) -> 0; item 5: 0.5, 0.3 above -> 2; item 1 -> 3
    assert out["overall"]["hr@1"] == 0.5 and out["overall"]["hr@3"] == 0.75
    assert out["first"] == {"hr@1": 1.0, "ndcg@1": 1.0, "hr@3": 1.0, "ndcg@3": 1.0, "n": 1}


def test_rejects_out_of_range_targets() -> None:
    with pytest.raises(ValueError):
        FixedScores(TABLE).rank([np.array([1])], [6], _cfg())


def test_sampled_negatives_are_uniform_over_unseen_items() -> None:
    from llmser_ray.evaluation import _sample_negatives

    users = 3000
    neg = _sample_negatives([np.array([2, 5])] * users, np.full(users, 7), 8, 3,
                            np.random.default_rng(0))
    assert all(len(set(row)) == 3 for row in neg.tolist())  # without replacement
    counts = np.bincount(neg.ravel(), minlength=9)
    assert counts[[0, 2, 5, 7]].sum() == 0
    share = counts[[1, 3, 4, 6, 8]] / neg.size
    assert np.abs(share - 0.2).max() < 0.02, share


def test_nan_and_infinite_scores_match_a_naive_loop() -> None:
    """NaN counts as -inf; ties (incl. -inf vs -inf and +inf vs +inf) are pessimistic."""
    rng = np.random.default_rng(5)
    users, num_items = 80, 25
    table = rng.integers(0, 4, size=(users, num_items + 1)).astype(float)
    special = rng.random(table.shape)
    table[special < 0.1] = np.nan
    table[(special >= 0.1) & (special < 0.15)] = -np.inf
    table[(special >= 0.15) & (special < 0.2)] = np.inf
    items = np.arange(1, num_items + 1)
    inputs = [rng.choice(items, size=rng.integers(0, 8)) for _ in range(users)]
    targets = rng.integers(1, num_items + 1, size=users)
    clean = np.where(np.isnan(table), -np.inf, table)
    for mask in (True, False):
        fast = FixedScores(table).rank(inputs, targets, _cfg(batch_size=9, mask_history=mask))
        naive = []
        for u in range(users):
            t = targets[u]
            excluded = {0, int(t)} | (set(inputs[u].tolist()) if mask else set())
            naive.append(sum(clean[u, i] >= clean[u, t] for i in range(num_items + 1)
                             if i not in excluded))
        assert fast.tolist() == naive
