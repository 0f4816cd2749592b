"""Next-item losses on already-selected positions.

Both functions take the hidden states of the positions that carry a target (``[N, D]``) and
return one loss per position (``[N]``), so the model can average them per sequence: dual-channel
training weights whole users, not positions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_negatives(pos: torch.Tensor, num_items: int, num_negatives: int,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``[N, num_negatives]`` items drawn uniformly from ``1..num_items`` minus each positive.

    Drawing from ``1..num_items-1`` and shifting values ``>= pos`` up by one is exact (every other
    item has probability ``1 / (num_items - 1)``) and needs no rejection loop. The draw happens on
    the generator's device so a CPU generator also seeds GPU training reproducibly.
    """
    if num_items < 2:
        raise ValueError(f"negative sampling needs at least 2 items (got num_items={num_items})")
    device = generator.device if generator is not None else pos.device
    neg = torch.randint(1, num_items, (pos.shape[0], num_negatives), generator=generator,
                        device=device).to(pos.device)
    return neg + (neg >= pos.unsqueeze(1)).long()


def bce_loss(h: torch.Tensor, item_emb: torch.Tensor, pos: torch.Tensor, num_negatives: int,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary cross-entropy of the positive vs ``num_negatives`` sampled negatives.

    The negative term is averaged over the negatives, so with the reference's single negative
    this is the reference loss and more negatives do not shift the positive/negative balance.
    ``item_emb`` is ``[num_items + 1, D]`` with row 0 the padding item.
    """
    neg = sample_negatives(pos, item_emb.shape[0] - 1, num_negatives, generator)
    pos_logit = (h * item_emb[pos]).sum(-1)
    neg_logit = torch.einsum("nd,nkd->nk", h, item_emb[neg])
    return F.softplus(-pos_logit) + F.softplus(neg_logit).mean(-1)


def ce_loss(h: torch.Tensor, item_emb: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Full-softmax cross-entropy over items ``1..num_items`` (the padding row never competes)."""
    logits = h @ item_emb[1:].T
    return F.cross_entropy(logits, pos - 1, reduction="none")
