"""The interface every backbone offers to training, evaluation, serving and the augmentation stages.

A backbone is an ``nn.Module`` whose ``forward(seqs)`` maps LEFT-padded items ``[B, L]`` (0 =
padding, the newest item at position ``L - 1``; ``models/batching.py``) to hidden states
``[B, L, D]``, and which scores items by a dot product with its own input embedding table (tied
weights; ``model.tie_output=false`` gives it a separate output table). It holds no loss:
``models/losses.py`` does, and ``training.train_step`` joins the two.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llmser_ray.models.batching import by_length


class SeqRecModel(nn.Module):
    """A next-item recommender scoring items by ``user_repr @ item_embeddings().T``.

    Subclasses implement ``forward`` and own an ``item_emb`` embedding whose first
    ``num_items + 1`` rows are the padding row and the items. The defaults here are the causal
    (left-to-right) ones that SASRec and GRU4Rec share; BERT4Rec overrides ``last_state`` and
    ``training_task``.
    """

    num_items: int
    max_len: int
    item_emb: nn.Embedding
    # Whether ``batching.by_length`` may run this model on length buckets: its outputs must not
    # depend on the padding width (not so for SASRec's reference variant, which attends to
    # padding) and buckets must pay off (not so for GRU4Rec, whose packed GRU already skips
    # padding, so buckets only add calls).
    bucket_by_length: bool = True
    # Whether position t may only read items up to t (SASRec, GRU4Rec), not BERT4Rec's both sides:
    # what a layer added around the backbone must respect (the dual view's cross-attention).
    causal: bool = True
    # Whether a training step should compute ``item_embeddings()`` once and share it between
    # its length buckets: True where the table is computed (the dual view's adapter), not a
    # slice of a parameter as in the plain backbones.
    table_once: bool = False

    def __init__(self, num_items: int, max_len: int) -> None:
        super().__init__()
        if num_items < 1:
            raise ValueError(f"num_items must be >= 1 (got {num_items})")
        self.num_items = num_items
        self.max_len = max_len
        self.out_emb: nn.Embedding | None = None  # a separate output table (``untie_output``)

    def forward(self, seqs: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states ``[B, min(L, max_len), D]`` of the last ``max_len`` positions: position t
        has read the items up to t (or around t).

        ``embeds`` ``[B, L, D]``, when given, replaces the lookup of ``seqs`` in ``item_emb``
        (``seqs`` still decides padding and masks): it lets a wrapper run the same layers over
        another view of the items (``models/dualview.py``).
        """
        raise NotImplementedError

    def item_embeddings(self) -> torch.Tensor:
        """``[num_items + 1, D]``; row 0 is padding (the evaluator masks its column)."""
        table = self.item_emb if self.out_emb is None else self.out_emb
        return table.weight[: self.num_items + 1]

    def untie_output(self) -> None:
        """Score against a table of its own (``model.tie_output=false``), initialised like the
        input table, so the losses' negatives no longer move the embeddings the model reads."""
        d = self.item_emb.embedding_dim
        self.out_emb = nn.Embedding(self.num_items + 1, d, padding_idx=0)
        nn.init.normal_(self.out_emb.weight, std=0.02)
        with torch.no_grad():
            self.out_emb.weight[0].zero_()

    def training_task(self, seqs: torch.Tensor, generator: torch.Generator | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What the model reads and must predict in training: ``inputs``, ``targets`` and which
        positions count (``valid``), each ``[B, <= max_len]``.

        Causal next item: ``seqs[:, :-1]`` predicts ``seqs[:, 1:]`` over the last ``max_len``
        positions. A position counts when its input is a real item, so the first item is never
        a target (there is nothing to predict it from).
        """
        inputs = seqs[:, :-1][:, -self.max_len:]
        targets = seqs[:, 1:][:, -self.max_len:]
        return inputs, targets, inputs > 0

    def target_flags(self, flags: torch.Tensor) -> torch.Tensor:
        """Per-item ``flags`` of ``seqs`` ``[B, W]`` moved to the target positions of
        ``training_task(seqs)``: which targets are flagged items."""
        return flags[:, 1:][:, -self.max_len:]

    def inference_inputs(self, seqs: torch.Tensor) -> torch.Tensor:
        """What the model reads to predict the item after each history: its last ``max_len``
        items (BERT4Rec appends its [MASK])."""
        return seqs[:, -self.max_len:]

    def last_state(self, seqs: torch.Tensor) -> torch.Tensor:
        """``[B, D]`` predicting the item after each history (its last ``max_len`` items)."""
        return self(self.inference_inputs(seqs))[:, -1]

    def user_repr(self, seqs: torch.Tensor) -> torch.Tensor:
        """``last_state``, by length bucket where that is exact and faster: the evaluator pads
        every history to ``max_len``."""
        seqs = seqs[:, -self.max_len:]
        return by_length(self.last_state, seqs, 1) if self.bucket_by_length else self.last_state(seqs)

    def score_all(self, seqs: torch.Tensor) -> torch.Tensor:
        """``[B, num_items + 1]`` scores of every item as the next one (column 0 is padding)."""
        return self.user_repr(seqs) @ self.item_embeddings().T
