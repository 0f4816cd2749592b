"""The interface every backbone offers to training, evaluation and the augmentation stages.

Sequences are LEFT-padded ``LongTensor[B, L]`` (0 = padding, items ``1..num_items``, the newest
item at position ``L - 1``), so "the user's state now" is always the last position and a batch can
be padded to any width without moving it.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from llmser_ray.models.losses import bce_loss, ce_loss

LossName = Literal["bce", "ce"]


class SeqRecModel(nn.Module):
    """A next-item recommender scoring items by ``user_repr @ item_embeddings().T``.

    Subclasses implement ``encode`` and own an ``item_emb`` embedding whose first
    ``num_items + 1`` rows are the padding row and the items. The default ``user_repr`` and
    ``loss`` are the causal (left-to-right) ones that SASRec and GRU4Rec share.
    """

    num_items: int
    max_len: int
    item_emb: nn.Embedding

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
        return self.encode(seqs[:, -self.max_len:])[:, -1]

    def item_embeddings(self) -> torch.Tensor:
        """``[num_items + 1, D]``; row 0 is padding (the evaluator masks its column)."""
        return self.item_emb.weight[: self.num_items + 1]

    def score_all(self, seqs: torch.Tensor) -> torch.Tensor:
        """``[B, num_items + 1]`` scores of every item as the next one (column 0 is padding)."""
        return self.user_repr(seqs) @ self.item_embeddings().T

    def loss(self, seqs: torch.Tensor, loss: LossName, num_negatives: int,
             generator: torch.Generator | None) -> torch.Tensor:
        """Per-sequence mean next-item loss ``[B]`` over the last ``max_len`` causal positions.

        Input ``seqs[:, :-1]`` predicts target ``seqs[:, 1:]``. A position counts when its input is
        a real item, i.e. the first item is never a target (there is nothing to predict it from).
        """
        inputs = seqs[:, :-1][:, -self.max_len:]
        targets = seqs[:, 1:][:, -self.max_len:]
        valid = inputs > 0
        return self.masked_loss(self.encode(inputs), targets, valid, loss, num_negatives,
                                generator)

    def masked_loss(self, h: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                    loss: LossName, num_negatives: int,
                    generator: torch.Generator | None) -> torch.Tensor:
        """Mean of the per-position loss over each row's ``valid`` positions; 0 for rows with none.

        Only valid positions are scored, which keeps the full-softmax loss affordable.
        """
        rows = valid.nonzero(as_tuple=True)[0]
        h_valid, pos = h[valid], targets[valid]
        emb = self.item_embeddings()
        if loss == "bce":
            per_pos = bce_loss(h_valid, emb, pos, num_negatives, generator)
        elif loss == "ce":
            per_pos = ce_loss(h_valid, emb, pos)
        else:
            raise ValueError(f"unknown loss '{loss}' (expected 'bce' or 'ce')")
        batch = h.shape[0]
        total = h.new_zeros(batch).index_add(0, rows, per_pos)
        count = h.new_zeros(batch).index_add(0, rows, torch.ones_like(per_pos))
        return total / count.clamp_min(1.0)
