"""The training objective: next-item losses per target position and their reduction to a batch.

The one place a step's loss is defined. A training step (``training.train_step``) hands
``Objective.per_sequence`` the hidden states of a batch, the item table, the targets and which
positions count, and gets each sequence's loss sum and target count back; ``Objective.batch_loss``
turns those into the number the step backpropagates: the per-position or per-user reduction
and the dual-channel weighting of LLMSeR (``reduce``; docs/TRAINING.md has the formulas). The
losses, from the measured best to the papers' setting:

- ``ce``: full-softmax cross-entropy over all items (the strongest where ``N x num_items`` logits
  fit: Klenitskiy & Vasilev 2023, "Turning Dross Into Gold Loss: is BERT4Rec really better than
  SASRec?").
- ``sampled``: softmax over the positive and ``K`` negatives drawn uniformly, one draw shared by
  every position of a ``per_sequence`` call (a length bucket of the batch), with the logQ
  correction (each negative's logit minus ``log(K q_j)``, ``q_j = 1/n``), so the sampled sum
  estimates the full partition function without bias: for catalogues where the full softmax
  does not fit (docs/SCALING.md).
- ``gbce``: gSASRec's generalised BCE (Petrov & Macdonald, RecSys 2023) over the same shared
  negatives: ``beta * softplus(-s+) + sum_j softplus(s_j)`` with
  ``beta = alpha * (t * (1 - 1/alpha) + 1/alpha)``, ``alpha = K / (n - 1)``; ``t = 0`` is plain
  BCE with ``K`` negatives, ``t = 1`` calibrates the scores to the full-softmax probabilities.
- ``bce``: BCE with per-position negatives (averaged), one by default: the setting of the LLMSeR
  and LLM-ESR papers' code (SASRec as Kang & McAuley trained it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from llmser_ray.config import TrainConfig

LossName = Literal["ce", "sampled", "gbce", "bce"]
Reduction = Literal["position", "user"]
# Negatives per target when train.num_negatives is unset: the papers' one for BCE; gSASRec's and
# the sampled-softmax benchmarks' 256 otherwise.
DEFAULT_NEGATIVES = {"bce": 1, "sampled": 256, "gbce": 256, "ce": 0}


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


def shared_negatives(num_items: int, num_negatives: int, device: torch.device,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """``[K]`` items drawn uniformly (with replacement) from ``1..num_items``, shared by ``N``
    positions (those of one length bucket of a batch).

    One shared draw makes the negative logits one ``[N, D] x [D, K]`` product instead of a
    gather of ``N x K`` embeddings; a draw that hits a position's positive is masked there.
    """
    gen_device = generator.device if generator is not None else device
    return torch.randint(1, num_items + 1, (num_negatives,), generator=generator,
                         device=gen_device).to(device)


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


def _shared_logits(h: torch.Tensor, item_emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive logits ``[N]`` and negative logits ``[N, K]``, accidental hits at ``-inf``."""
    pos_logit = (h * item_emb[pos]).sum(-1)
    neg_logit = (h @ item_emb[neg].T).masked_fill(neg.unsqueeze(0) == pos.unsqueeze(1), -math.inf)
    return pos_logit, neg_logit


def sampled_softmax_loss(h: torch.Tensor, item_emb: torch.Tensor, pos: torch.Tensor,
                         neg: torch.Tensor, logq: bool = True) -> torch.Tensor:
    """Softmax cross-entropy of the positive against the uniform negatives ``neg`` ``[K]``.

    With ``logq`` each negative logit is lowered by ``log(K / n)`` (its expected count in the
    draw), so ``sum_j exp(s_j) * n / K`` is an unbiased estimate of the full softmax's negative
    mass and the loss tends to full CE as ``K`` grows; without it the loss underestimates CE and
    the gradient pushes too little on the negatives.
    """
    pos_logit, neg_logit = _shared_logits(h, item_emb, pos, neg)
    if logq:
        neg_logit = neg_logit - math.log(neg.shape[0] / (item_emb.shape[0] - 1))
    logits = torch.cat([pos_logit.unsqueeze(1), neg_logit], dim=1)
    return torch.logsumexp(logits, dim=1) - pos_logit


def gbce_beta(num_negatives: int, num_items: int, t: float) -> float:
    """gSASRec's positive-term exponent ``beta`` for ``K`` negatives out of ``n - 1`` items."""
    alpha = num_negatives / (num_items - 1)
    return alpha * (t * (1 - 1 / alpha) + 1 / alpha)


def gbce_loss(h: torch.Tensor, item_emb: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor,
              t: float) -> torch.Tensor:
    """gSASRec's gBCE: ``-log(sigmoid(s+) ** beta) - sum_j log(1 - sigmoid(s_j))``."""
    pos_logit, neg_logit = _shared_logits(h, item_emb, pos, neg)
    beta = gbce_beta(neg.shape[0], item_emb.shape[0] - 1, t)
    return beta * F.softplus(-pos_logit) + F.softplus(neg_logit).sum(-1)


@dataclass(frozen=True)
class Objective:
    """What a training step minimises: built once from ``train.*`` (``from_config``)."""

    loss: LossName = "ce"
    num_negatives: int = 0
    logq: bool = True
    gbce_t: float = 0.75
    reduction: Reduction = "position"

    @classmethod
    def from_config(cls, train: TrainConfig) -> Objective:
        k = train.num_negatives or DEFAULT_NEGATIVES[train.loss]
        return cls(train.loss, k, train.logq, train.gbce_t, train.reduction)

    def per_position(self, h: torch.Tensor, item_emb: torch.Tensor, pos: torch.Tensor,
                     generator: torch.Generator | None) -> torch.Tensor:
        """Loss ``[N]`` of each target ``pos`` given its hidden state ``h`` ``[N, D]``."""
        if self.loss == "ce":
            return ce_loss(h, item_emb, pos)
        if self.loss == "bce":
            return bce_loss(h, item_emb, pos, self.num_negatives, generator)
        neg = shared_negatives(item_emb.shape[0] - 1, self.num_negatives, h.device, generator)
        if self.loss == "sampled":
            return sampled_softmax_loss(h, item_emb, pos, neg, self.logq)
        if self.loss == "gbce":
            return gbce_loss(h, item_emb, pos, neg, self.gbce_t)
        raise ValueError(f"unknown loss '{self.loss}' (expected one of ce, sampled, gbce, bce)")

    def per_sequence(self, h: torch.Tensor, item_emb: torch.Tensor, targets: torch.Tensor,
                     valid: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Loss sum and target count ``[B, 2]`` of each row over its ``valid`` positions.

        ``h`` ``[B, L, D]`` are a backbone's hidden states, ``targets`` ``[B, L]`` the item each
        position must predict. Only valid positions are scored, which keeps the full-softmax
        loss affordable; sums and counts (not means) let ``batch_loss`` choose the reduction.
        """
        rows = valid.nonzero(as_tuple=True)[0]
        per_pos = self.per_position(h[valid], item_emb, targets[valid], generator)
        out = h.new_zeros(h.shape[0], 2)
        return out.index_add(0, rows, torch.stack([per_pos, torch.ones_like(per_pos)], dim=1))

    def batch_loss(self, stats: torch.Tensor, aug_users: torch.Tensor | None = None,
                   aug_weights: torch.Tensor | None = None) -> torch.Tensor:
        """The loss a step backpropagates, from ``per_sequence`` rows ``[U + A, 2]``.

        Rows ``0..U-1`` are the users' original sequences, row ``U + j`` the augmented sequence
        of user ``aug_users[j]`` weighted ``aug_weights[j]`` (``batching.TrainBatch``); without
        augmented rows this is the plain loss. ``reduce`` applies ``self.reduction``.
        """
        n_aug = 0 if aug_users is None else len(aug_users)
        n = stats.shape[0] - n_aug
        sums, counts = stats[:n, 0], stats[:n, 1]
        if not n_aug:
            return reduce(sums, counts, self.reduction)
        assert aug_users is not None and aug_weights is not None
        rows = aug_users.to(stats.device)
        w = torch.zeros(n, dtype=stats.dtype, device=stats.device)
        w[rows] = aug_weights.to(dtype=stats.dtype, device=stats.device)
        aug_sums = torch.zeros_like(sums).index_copy(0, rows, stats[n:, 0])
        aug_counts = torch.zeros_like(counts).index_copy(0, rows, stats[n:, 1])
        return reduce(sums, counts, self.reduction, w, aug_sums, aug_counts)


def reduce(sums: torch.Tensor, counts: torch.Tensor, reduction: Reduction,
           weights: torch.Tensor | None = None, aug_sums: torch.Tensor | None = None,
           aug_counts: torch.Tensor | None = None) -> torch.Tensor:
    """The batch loss from per-user loss sums and target counts ``[U]`` of each channel.

    ``user``: ``mean_u [(1 - w_u) * S_u / C_u + w_u * A_u / D_u]`` (each user's channels are
    position means; a user weighs the same whatever its length). ``position``:
    ``sum_u [(1 - w_u) S_u + w_u A_u] / sum_u [(1 - w_u) C_u + w_u D_u]``, every target position
    weighs the same and the augmented channel's positions count ``w_u`` each (Kang & McAuley's
    and RecBole's standard for plain training, ``w = 0``). ``S, C`` are the original channel's sum
    and count, ``A, D`` the augmented one's; without ``weights`` only the original channel counts.
    """
    if weights is None:
        weights = sums.new_zeros(sums.shape)
        aug_sums = aug_counts = sums.new_zeros(sums.shape)
    assert aug_sums is not None and aug_counts is not None
    if reduction == "user":
        per_user = ((1 - weights) * sums / counts.clamp_min(1)
                    + weights * aug_sums / aug_counts.clamp_min(1))
        return per_user.mean()
    total = ((1 - weights) * sums + weights * aug_sums).sum()
    return total / ((1 - weights) * counts + weights * aug_counts).sum().clamp_min(1e-12)


class Distillation:
    """LLM-ESR's retrieval-augmented self-distillation, the auxiliary term of a training step:
    ``alpha * MSE(h_u, mean_{v in N(u)} h_v .detach())`` over the batch's users that it applies to.

    ``h_u`` is the state a step already computes at a user's last training position, so the term
    costs no extra forward pass. ``N(u)`` are the ``k`` users whose history-title embeddings are
    nearest to ``u``'s (stages/user_neighbours.py). The reference recomputes the neighbours'
    states with the model in every step: ``k`` more sequences per user, about ``k / 3`` times
    the step's cost. Here ``h_v`` is the state ``v`` had the last time it was in a batch
    (a memory bank, at most one epoch old: every user is visited each epoch), which keeps the
    epoch within the cost target; a neighbour not visited yet does not count, and a user with
    none has no term. Under DDP each rank keeps its own bank from its own batches.

    MSE is torch's mean over users and dimensions (the reference's ``nn.MSELoss``).
    """

    def __init__(self, neighbours: torch.Tensor, applies: torch.Tensor, alpha: float) -> None:
        self.neighbours = neighbours.long()  # [U + 1, k] user ids, 0 = none
        self.applies = applies.bool()  # [U + 1]: distil this user (tail users, or all)
        self.alpha = alpha
        self.bank: torch.Tensor | None = None
        self.seen = torch.zeros(len(applies), dtype=torch.bool)

    def loss(self, states: torch.Tensor, users: torch.Tensor) -> torch.Tensor | None:
        """The term for ``states`` ``[U, D]`` of ``users`` ``[U]`` (None when it is zero: alpha 0
        or nobody with a visited neighbour), then the bank learns these states."""
        device = states.device
        if self.bank is None:
            self.bank = states.new_zeros(len(self.applies), states.shape[1])
            self.seen = self.seen.to(device)
            self.neighbours, self.applies = self.neighbours.to(device), self.applies.to(device)
        users = users.to(device)
        term = None
        if self.alpha > 0:
            nb = self.neighbours[users]
            have = self.seen[nb] & (nb > 0)
            use = self.applies[users] & have.any(1)
            if use.any():
                w = have[use].to(states.dtype).unsqueeze(-1)
                target = (self.bank[nb[use]] * w).sum(1) / w.sum(1)
                term = self.alpha * F.mse_loss(states[use], target.detach())
        self.bank[users] = states.detach()
        self.seen[users] = True
        return term
