"""The losses of models/losses.py on their own: the properties that make each one what it claims."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmser_ray.config import TrainConfig
from llmser_ray.models.losses import (
    Objective,
    bce_loss,
    ce_loss,
    gbce_beta,
    gbce_loss,
    reduce,
    sampled_softmax_loss,
    shared_negatives,
)

N_ITEMS, D = 50, 8


def _inputs(seed: int = 0, n: int = 12) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=g)
    emb = torch.randn(N_ITEMS + 1, D, generator=g) * 0.7
    pos = torch.randint(1, N_ITEMS + 1, (n,), generator=g)
    return h, emb, pos


def test_sampled_softmax_approaches_full_ce_as_negatives_grow() -> None:
    """With the logQ correction the sampled loss is a consistent estimate of full CE: its mean
    error over draws shrinks as K grows and is small at K = 20 n."""
    h, emb, pos = _inputs()
    full = ce_loss(h, emb, pos)
    errors = []
    for k in (8, 64, 1000):
        gen = torch.Generator().manual_seed(1)
        draws = torch.stack([sampled_softmax_loss(h, emb, pos, shared_negatives(N_ITEMS, k, h.device, gen))
                             for _ in range(200)])
        errors.append(float((draws.mean(0) - full).abs().mean()))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 0.03 * float(full.mean()), (errors, float(full.mean()))


def test_logq_correction_lifts_the_negative_mass_to_the_full_softmax() -> None:
    """Without the correction K << n negatives stand for far too little of the partition
    function, so the loss sits well below CE; the correction adds exactly log(n / K) of logit to
    each negative, nothing to the positive."""
    h, emb, pos = _inputs()
    neg = shared_negatives(N_ITEMS, 10, h.device, torch.Generator().manual_seed(3))
    plain = sampled_softmax_loss(h, emb, pos, neg, logq=False)
    fixed = sampled_softmax_loss(h, emb, pos, neg, logq=True)
    assert (fixed > plain).all()
    assert float(plain.mean()) < 0.8 * float(ce_loss(h, emb, pos).mean())
    # By hand: log(exp(s+) + (n / K) sum_j exp(s_j)) - s+, accidental hits dropped.
    s_pos = (h * emb[pos]).sum(-1)
    s_neg = (h @ emb[neg].T).masked_fill(neg[None] == pos[:, None], -math.inf)
    want = torch.log(torch.exp(s_pos) + N_ITEMS / 10 * torch.exp(s_neg).sum(-1)) - s_pos
    torch.testing.assert_close(fixed, want)


def test_accidental_hits_are_not_negatives() -> None:
    h, emb, pos = _inputs(n=4)
    neg = pos.clone()  # every position's own positive drawn, and the others' positives
    hit = sampled_softmax_loss(h, emb, pos, neg, logq=False)
    others = [torch.logsumexp(torch.cat([(h[i] * emb[pos[i]]).sum()[None],
                                         h[i] @ emb[neg[neg != pos[i]]].T]), 0) - (h[i] * emb[pos[i]]).sum()
              for i in range(4)]
    torch.testing.assert_close(hit, torch.stack(others))


def test_gbce_at_t0_is_bce_and_beta_follows_the_paper() -> None:
    h, emb, pos = _inputs()
    neg = shared_negatives(N_ITEMS, 1, h.device, torch.Generator().manual_seed(4))
    # t = 0: beta = 1, plain BCE (one negative: the same as the reference loss on that negative).
    assert gbce_beta(1, N_ITEMS, 0.0) == pytest.approx(1.0)
    s_pos = (h * emb[pos]).sum(-1)
    s_neg = (h @ emb[neg].T).masked_fill(neg[None] == pos[:, None], -math.inf)[:, 0]
    bce = F.binary_cross_entropy_with_logits(s_pos, torch.ones_like(s_pos), reduction="none") + \
        F.binary_cross_entropy_with_logits(s_neg, torch.zeros_like(s_neg), reduction="none")
    torch.testing.assert_close(gbce_loss(h, emb, pos, neg, 0.0), bce)
    # beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = K / (n - 1): t = 1 gives beta = alpha.
    k = 16
    alpha = k / (N_ITEMS - 1)
    assert gbce_beta(k, N_ITEMS, 1.0) == pytest.approx(alpha)
    assert gbce_beta(k, N_ITEMS, 0.5) == pytest.approx(alpha * (0.5 * (1 - 1 / alpha) + 1 / alpha))
    neg = shared_negatives(N_ITEMS, k, h.device, torch.Generator().manual_seed(5))
    t0, t1 = gbce_loss(h, emb, pos, neg, 0.0), gbce_loss(h, emb, pos, neg, 1.0)
    torch.testing.assert_close(t0 - t1, (1 - alpha) * F.softplus(-s_pos))


def test_bce_with_one_negative_is_the_reference_loss() -> None:
    h, emb, pos = _inputs()
    got = bce_loss(h, emb, pos, 1, torch.Generator().manual_seed(0))
    assert got.shape == pos.shape and torch.isfinite(got).all()


@pytest.mark.parametrize("loss", ["ce", "sampled", "gbce", "bce"])
def test_each_loss_is_finite_and_falls_over_a_few_steps(loss: str) -> None:
    h, emb, pos = _inputs(n=32)
    emb = emb.clone().requires_grad_(True)
    w = torch.nn.Linear(D, D)
    opt = torch.optim.Adam([emb, *w.parameters()], lr=0.05)
    objective = Objective(loss, 8)
    gen = torch.Generator()
    values = []
    for _ in range(30):
        gen.manual_seed(0)
        value = objective.per_position(w(h), emb, pos, gen).mean()
        assert torch.isfinite(value)
        opt.zero_grad()
        value.backward()
        opt.step()
        values.append(value.item())
    assert values[-1] < 0.7 * values[0], values


def test_objective_defaults_per_loss() -> None:
    assert Objective.from_config(TrainConfig()).loss == "ce"
    assert Objective.from_config(TrainConfig(loss="bce")).num_negatives == 1
    assert Objective.from_config(TrainConfig(loss="sampled")).num_negatives == 256
    assert Objective.from_config(TrainConfig(loss="gbce", num_negatives=64)).num_negatives == 64
    with pytest.raises(ValueError):
        TrainConfig(gbce_t=1.5)


def test_reduce_user_and_position_by_hand() -> None:
    sums, counts = torch.tensor([6.0, 1.0, 0.0]), torch.tensor([3.0, 1.0, 0.0])  # means 2, 1, (none)
    assert float(reduce(sums, counts, "user")) == pytest.approx((2 + 1 + 0) / 3)
    assert float(reduce(sums, counts, "position")) == pytest.approx(7 / 4)
    w = torch.tensor([0.5, 0.0, 1.0])
    a_s, a_c = torch.tensor([2.0, 0.0, 4.0]), torch.tensor([2.0, 0.0, 2.0])
    assert float(reduce(sums, counts, "user", w, a_s, a_c)) == pytest.approx((0.5 * 2 + 0.5 * 1 + 1 + 2) / 3)
    assert float(reduce(sums, counts, "position", w, a_s, a_c)) == pytest.approx(
        (0.5 * 6 + 0.5 * 2 + 1 + 4) / (0.5 * 3 + 0.5 * 2 + 1 + 2))


def test_transitions_baseline_reads_the_last_item_and_falls_back_to_popularity() -> None:
    import numpy as np

    from llmser_ray.models.baselines import MostPopular, Transitions

    train = [np.array([1, 2, 3]), np.array([1, 2, 4]), np.array([5, 2, 3]), np.array([4, 4, 4])]
    tr = Transitions(train, 5)
    scores = tr.score_all(torch.tensor([[0, 2], [0, 3], [0, 1]]))
    # After 2: 3 (twice) then 4 (once); nothing follows 3, so popularity orders everything.
    assert scores[0].argsort(descending=True)[:2].tolist() == [3, 4]
    pop = MostPopular(train, 5).score_all(torch.tensor([[1]]))[0]
    assert scores[1].argsort(descending=True).tolist()[:5] == pop.argsort(descending=True).tolist()[:5]
    assert scores[2, 2] > scores[2, 4] > 0  # 1 -> 2 twice, 4 only by popularity
    assert pop[4] == 4 and pop[0] == 0
