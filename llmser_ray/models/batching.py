"""From users' histories to the tensors a step computes on: padding, channels, length buckets.

Sequences are LEFT-padded ``LongTensor[B, L]`` (0 = padding, the newest item at position
``L - 1``), so a batch can be padded to any width without moving "the user's state now", and a
padding-invariant backbone gives every row the same output whatever the width.

That invariance is what ``by_length`` exploits: it runs a batch as a few sub-batches of similar
length, each cut to its own width. Amazon Beauty has a median of 6 items and a maximum of 204:
a random batch is almost always padded to a long sequence, so the unbucketed transformers spent
most of their work on padding (docs/TRAINING.md, "Length buckets").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from llmser_ray.data.padding import pad_left


def pad_batch(seqs: Sequence[np.ndarray], max_len: int) -> torch.Tensor:
    """``[B, W]`` left-padded to the longest sequence, at most ``max_len + 1`` and at least 2
    wide: a causal model reads positions ``[:-1]`` and predicts ``[1:]``, so ``max_len`` inputs
    need one column more (BERT4Rec reads the last ``max_len`` of them)."""
    longest = max((len(s) for s in seqs), default=1)
    return torch.from_numpy(pad_left(seqs, min(max_len + 1, max(longest, 2))))


@dataclass
class TrainBatch:
    """One training batch of ``U`` users, both channels in one tensor.

    ``seqs`` rows ``0..U-1`` are the users' original sequences; row ``U + j`` is the augmented
    sequence of user ``aug_users[j]`` with dual-channel weight ``aug_weights[j]`` (only users
    with ``w_u > 0`` have one; plain training has none). One tensor means one forward pass, so
    a user's two channels always share a step and DDP sees one graph. ``users`` are the user
    ids of rows ``0..U-1`` when the step needs them (LLM-ESR's self-distillation), else empty.
    A negative id in an augmented row is a pseudo item read as context but never predicted
    (``dual.pseudo_targets=false``): the sign is the mark, so it survives padding, cropping and
    length buckets with the item, and ``LossModule`` drops it before any embedding lookup.
    """

    seqs: torch.Tensor
    aug_users: torch.Tensor
    aug_weights: torch.Tensor
    users: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    @classmethod
    def plain(cls, seqs: torch.Tensor) -> TrainBatch:
        """Original sequences only (plain training)."""
        return cls(seqs, torch.zeros(0, dtype=torch.long), torch.zeros(0))

    def to(self, device: torch.device | str) -> TrainBatch:
        return TrainBatch(self.seqs.to(device), self.aug_users.to(device),
                          self.aug_weights.to(device), self.users.to(device))


def training_batch(idx: np.ndarray, train_seqs: Sequence[np.ndarray], max_len: int,
                   aug_seqs: Sequence[np.ndarray] | None = None,
                   weights: np.ndarray | None = None,
                   users: np.ndarray | None = None) -> TrainBatch:
    """The ``TrainBatch`` of users ``idx``; ``aug_seqs`` and ``weights`` (indexed like
    ``train_seqs``) add the augmented channel of the users whose weight is positive; ``users``
    (indexed the same way) gives the rows' user ids."""
    seqs = [train_seqs[i] for i in idx]
    aug_rows = np.zeros(0, dtype=np.int64)
    if aug_seqs is not None and weights is not None:
        aug_rows = np.flatnonzero(weights[idx] > 0)
        seqs += [aug_seqs[idx[j]] for j in aug_rows]
    aug_weights = np.zeros(0) if weights is None else weights[idx[aug_rows]]
    ids = torch.zeros(0, dtype=torch.long) if users is None else torch.from_numpy(users[idx])
    return TrainBatch(pad_batch(seqs, max_len), torch.from_numpy(aug_rows),
                      torch.as_tensor(aug_weights, dtype=torch.float32), ids)


def by_length(fn: Callable[[torch.Tensor], torch.Tensor], seqs: torch.Tensor,
              min_width: int) -> torch.Tensor:
    """``fn(seqs)`` computed on length buckets: rows grouped by the power of two that holds their
    real (unpadded) length, each group cut to that width (at least ``min_width``).

    ``fn`` must map ``[n, w]`` rows to ``[n, ...]`` results that do not depend on ``w`` beyond the
    row's real items (a padding-invariant backbone; ``SeqRecModel.bucket_by_length`` says which
    are). Groups run narrowest first and rows keep their order in the output, with gradients
    flowing through the reassembly. Widths are powers of two, so a batch makes at most
    ``log2(L) + 1`` calls and wastes at most half of each row on padding.
    """
    b, n = seqs.shape
    if b == 0 or n <= min_width:
        return fn(seqs)
    real = seqs != 0  # negative ids are marked items (``TrainBatch``), not padding
    # Width each row needs: from its first real item to the end (robust to interior zeros).
    first = torch.where(real.any(1), real.to(torch.int8).argmax(1), n)
    need = (n - first).clamp_min(min_width)
    width = torch.pow(2, torch.ceil(torch.log2(need.double()))).long().clamp(max=n)
    widths = torch.unique(width)
    if len(widths) == 1:
        return fn(seqs[:, -int(widths[0]):])
    rows, outs = [], []
    for w in widths.tolist():
        idx = (width == w).nonzero(as_tuple=True)[0]
        rows.append(idx)
        outs.append(fn(seqs[idx, -w:]))
    order = torch.cat(rows)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(b, device=order.device)
    return torch.cat(outs)[inverse]
