"""The interface every backbone offers to training, evaluation and the augmentation stages.

Sequences are LEFT-padded ``LongTensor[B, L]`` (0 = padding, items ``1..num_items``, the newest
item at position ``L - 1``), so "the user's state now" is always the last position and a batch can
be padded to any width without moving it.

Because the result does not depend on the padding width, ``user_repr`` and ``loss`` run each batch
as a few sub-batches of similar length, each cut to its own width (``by_length``). Amazon Beauty
has a median of 6 items and a maximum of 204: a random batch is almost always padded to a long
sequence, so the unbucketed transformer and GRU spent more than 90% of their work on padding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn

from llmser_ray.models.losses import Objective


def by_length(fn: Callable[[torch.Tensor], torch.Tensor], seqs: torch.Tensor,
              min_width: int) -> torch.Tensor:
    """``fn(seqs)`` computed on length buckets: rows grouped by the power of two that holds their
    real (unpadded) length, each group cut to that width (at least ``min_width``).

    ``fn`` must map ``[n, w]`` rows to ``[n, ...]`` results that do not depend on ``w`` beyond the
    row's real items (true for every padding-invariant backbone here). Rows keep their order in
    the output, and gradients flow through the reassembly. Widths are powers of two so a batch
    makes at most ``log2(L) + 1`` calls and wastes at most half of each row on padding.
    """
    b, n = seqs.shape
    if b == 0 or n <= min_width:
        return fn(seqs)
    real = seqs > 0
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


class SeqRecModel(nn.Module):
    """A next-item recommender scoring items by ``user_repr @ item_embeddings().T``.

    Subclasses implement ``encode`` and own an ``item_emb`` embedding whose first
    ``num_items + 1`` rows are the padding row and the items. The default ``user_repr`` and
    ``loss`` are the causal (left-to-right) ones that SASRec and GRU4Rec share.
    """

    num_items: int
    max_len: int
    item_emb: nn.Embedding
    # False for a model whose outputs depend on the padding width (SASRec's reference variant
    # attends to padding): it then always runs on the batch as given.
    pad_invariant: bool = True
    # Whether length buckets pay off (see ``by_length``); a model that already skips padding
    # (GRU4Rec's packed GRU) turns them off, since every bucket only adds calls.
    bucket_by_length: bool = True

    def __init__(self, num_items: int, max_len: int) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1 (got {num_items})")
        self.num_items = num_items
        self.max_len = max_len

    def encode(self, seqs: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, L, D]``: position t has read the items up to t (or around t)."""
        raise NotImplementedError

    def user_repr(self, seqs: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` predicting the item after the history (only its last ``max_len`` items)."""
        if not (self.pad_invariant and self.bucket_by_length):
            return self.last_state(seqs)
        return by_length(self.last_state, seqs[:, -self.max_len:], 1)

    def last_state(self, seqs: torch.Tensor) -> torch.Tensor:
        """``user_repr`` of one (bucketed) batch; subclasses override this, not ``user_repr``."""
        return self.encode(seqs[:, -self.max_len:])[:, -1]

    def item_embeddings(self) -> torch.Tensor:
        """``[num_items + 1, D]``; row 0 is padding (the evaluator masks its column)."""
        return self.item_emb.weight[: self.num_items + 1]

    def score_all(self, seqs: torch.Tensor) -> torch.Tensor:
        """``[B, num_items + 1]`` scores of every item as the next one (column 0 is padding)."""
        return self.user_repr(seqs) @ self.item_embeddings().T

    def loss(self, seqs: torch.Tensor, objective: Objective,
             generator: torch.Generator | None) -> torch.Tensor:
        """Per-sequence loss sums and target counts ``[B, 2]`` (see ``sequence_loss``), computed
        by length bucket; ``losses.reduce`` makes the batch loss of them."""
        def one(sub: torch.Tensor) -> torch.Tensor:
            return self.sequence_loss(sub, objective, generator)

        if not (self.pad_invariant and self.bucket_by_length):
            return one(seqs)
        return by_length(one, seqs, 2)

    def sequence_loss(self, seqs: torch.Tensor, objective: Objective,
                      generator: torch.Generator | None) -> torch.Tensor:
        """Per-sequence next-item loss sum and count ``[B, 2]`` over the last ``max_len`` causal
        positions.

        Input ``seqs[:, :-1]`` predicts target ``seqs[:, 1:]``. A position counts when its input is
        a real item, i.e. the first item is never a target (there is nothing to predict it from).
        Subclasses override this, not ``loss``.
        """
        inputs = seqs[:, :-1][:, -self.max_len:]
        targets = seqs[:, 1:][:, -self.max_len:]
        valid = inputs > 0
        return self.masked_loss(self.encode(inputs), targets, valid, objective, generator)

    def masked_loss(self, h: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                    objective: Objective, generator: torch.Generator | None) -> torch.Tensor:
        """Sum and count ``[B, 2]`` of the per-position loss over each row's ``valid`` positions.

        Only valid positions are scored, which keeps the full-softmax loss affordable.
        """
        rows = valid.nonzero(as_tuple=True)[0]
        per_pos = objective.per_position(h[valid], self.item_embeddings(), targets[valid], generator)
        out = h.new_zeros(h.shape[0], 2)
        return out.index_add(0, rows, torch.stack([per_pos, torch.ones_like(per_pos)], dim=1))
