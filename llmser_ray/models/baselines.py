"""Non-neural reference points for every quality table: what the neural backbones add.

Both are fitted on the training part of the leave-one-out split (the same sequences the neural
models learn from) and expose ``score_all`` like a ``SeqRecModel``, so the evaluator ranks them
under exactly the same rules (full ranking with the history masked, or 100 sampled negatives).

- ``MostPopular``: every user gets the items by training-interaction count.
- ``Transitions``: a first-order Markov chain of item-to-item transitions (count of ``i -> j``
  among consecutive training items), read at the user's last item; ties and items never seen
  after it fall back to popularity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn


def _popularity(seqs: Sequence[np.ndarray], num_items: int) -> torch.Tensor:
    counts = np.bincount(np.concatenate([np.asarray(s, dtype=np.int64) for s in seqs] or [np.zeros(0, int)]),
                         minlength=num_items + 1).astype(np.float32)
    counts[0] = 0.0
    return torch.from_numpy(counts)


class MostPopular(nn.Module):
    def __init__(self, train_seqs: Sequence[np.ndarray], num_items: int) -> None:
        super().__init__()
        self.num_items, self.max_len = num_items, 1
        self.register_buffer("counts", _popularity(train_seqs, num_items))

    def score_all(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.counts.expand(seqs.shape[0], -1)


class Transitions(nn.Module):
    """Scores ``count(last -> j) + popularity(j) / (1 + max popularity)``: transitions first,
    popularity (always < 1) only orders what the transitions leave tied."""

    def __init__(self, train_seqs: Sequence[np.ndarray], num_items: int) -> None:
        super().__init__()
        self.num_items, self.max_len = num_items, 1
        pairs = [np.stack([s[:-1], s[1:]], 1) for s in map(np.asarray, train_seqs) if len(s) >= 2]
        edges = np.concatenate(pairs) if pairs else np.zeros((0, 2), dtype=np.int64)
        key = edges[:, 0].astype(np.int64) * (num_items + 1) + edges[:, 1]
        uniq, count = np.unique(key, return_counts=True)
        src, dst = uniq // (num_items + 1), uniq % (num_items + 1)
        # CSR rows by source item: the row of item i is dst[indptr[i]:indptr[i + 1]].
        indptr = np.zeros(num_items + 2, dtype=np.int64)
        np.add.at(indptr, src + 1, 1)
        self.indptr, self.dst, self.count = np.cumsum(indptr), dst, count.astype(np.float32)
        pop = _popularity(train_seqs, num_items)
        self.register_buffer("tiebreak", pop / (1.0 + float(pop.max())))

    def score_all(self, seqs: torch.Tensor) -> torch.Tensor:
        scores = self.tiebreak.expand(seqs.shape[0], -1).clone()
        for row, last in enumerate(seqs[:, -1].tolist()):
            lo, hi = self.indptr[last], self.indptr[last + 1]
            if hi > lo:
                scores[row, torch.from_numpy(self.dst[lo:hi])] += torch.from_numpy(self.count[lo:hi])
        return scores


BASELINES = {"most_popular": MostPopular, "transitions": Transitions}
