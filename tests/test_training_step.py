"""The training step (``training.train_step``) on real Beauty histories, three optimizer steps.

1. Against an independent, straightforward implementation: every user's sequence alone, at its
   own length (no padding, no length buckets, no batching), the full-softmax loss written out by
   hand and the reduction and dual-channel weighting written out from docs/TRAINING.md. Dropout
   is off and the Cloze mask deterministic, so both sides compute the same function.
2. Pinned losses of the stochastic settings (dropout, sampled negatives, Cloze masks), recorded
   from the implementation before the training step was reorganised (issue 21): the same seed
   must keep giving the same losses, to float32 precision on this platform's CPU kernels.
3. Evaluation scores of a padded batch against each user's history scored alone.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from llmser_ray.config import Config, load_config
from llmser_ray.data.padding import pad_left
from llmser_ray.models import build_model
from llmser_ray.models.batching import training_batch
from llmser_ray.models.losses import Objective
from llmser_ray.stages.train import LossModule, train_step

BEAUTY = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon_beauty_2014_5core"
pytestmark = pytest.mark.skipif(not (BEAUTY / "Beauty.txt").is_file(),
                                reason="../shared/data is not present")

VARIANTS = {"sasrec": ["model.backbone=sasrec"],
            "sasrec-ref": ["model.backbone=sasrec", "model.sasrec_variant=reference"],
            "bert4rec": ["model.backbone=bert4rec", "model.mask_prob=0.3"],
            "gru4rec": ["model.backbone=gru4rec"]}
BATCH, STEPS, LR = 32, 3, 1e-2


@pytest.fixture(scope="module")
def beauty() -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray, int]:
    """96 random users' training parts (S3-Rec lines minus the last two items), an augmented
    copy of each (two random items prepended) and dual-channel weights, 40% of them zero."""
    lines = (BEAUTY / "Beauty.txt").read_text().split("\n")
    every = [np.array([int(x) for x in line.split()[1:]], dtype=np.int64)
             for line in lines if line.strip()]
    num_items = int(max(s.max() for s in every))
    rng = np.random.default_rng(0)
    pick = rng.choice(len(every), BATCH * STEPS, replace=False)
    seqs = [every[i][:-2] for i in pick]
    assert all(len(s) >= 2 for s in seqs)  # 5-core: every training part has targets
    aug = [np.concatenate([rng.integers(1, num_items + 1, 2), s]) for s in seqs]
    weights = np.where(rng.random(len(seqs)) < 0.4, 0.0, rng.random(len(seqs)))
    return seqs, aug, weights, num_items


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Pinned numbers are for one torch thread (threads may change float summation order)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(variant: str, loss: str, reduction: str, *extra: str) -> Config:
    negatives = "0" if loss in ("ce", "bce") else "64"
    return load_config(None, [*VARIANTS[variant], "model.hidden=32", "model.layers=2",
                              "model.heads=2", "model.dropout=0.2", "model.max_len=50",
                              f"train.batch_size={BATCH}", f"train.loss={loss}",
                              f"train.reduction={reduction}", f"train.num_negatives={negatives}",
                              *extra])


def _steps(cfg: Config, model: torch.nn.Module, beauty, dual: bool) -> list[float]:
    """``STEPS`` steps of ``train_step`` over consecutive batches of the users, as ``train_epoch``."""
    seqs, aug, weights, _ = beauty
    wrapped = LossModule(model).train()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(11)
    objective = Objective.from_config(cfg.train)
    losses = []
    for step in range(STEPS):
        idx = np.arange(step * BATCH, (step + 1) * BATCH)
        batch = training_batch(idx, seqs, cfg.model.max_len, aug if dual else None,
                               weights if dual else None)
        losses.append(train_step(wrapped, opt, batch, objective, gen))
    return losses


def _one_sequence(model: torch.nn.Module, seq: np.ndarray, bert: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-softmax loss sum and target count of one unpadded sequence, written out."""
    n = model.max_len
    if bert:  # last_item_mask_prob = 1: only the last item is hidden, and predicted
        x = torch.from_numpy(seq[-n:].copy())
        inputs, targets = x.clone(), x[-1:]
        inputs[-1] = model.mask_token
        h = model(inputs[None])[0, -1:]
    else:  # causal: item t predicts item t + 1
        x = torch.from_numpy(seq[-(n + 1):].copy())
        inputs, targets = x[:-1], x[1:]
        h = model(inputs[None])[0]
    logits = h @ model.item_emb.weight[1:model.num_items + 1].T
    nll = -torch.log_softmax(logits, dim=1)[torch.arange(len(targets)), targets - 1]
    return nll.sum(), torch.tensor(float(len(targets)))


def _naive_steps(cfg: Config, model: torch.nn.Module, beauty, dual: bool) -> list[float]:
    seqs, aug, weights, _ = beauty
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    bert = cfg.model.backbone == "bert4rec"
    losses = []
    for step in range(STEPS):
        num = den = 0.0
        per_user = []
        for u in range(step * BATCH, (step + 1) * BATCH):
            w = float(weights[u]) if dual else 0.0
            s, c = _one_sequence(model, seqs[u], bert)
            a, d = _one_sequence(model, aug[u], bert) if w > 0 else (torch.tensor(0.0), torch.tensor(1.0))
            num = num + (1 - w) * s + w * a
            den = den + (1 - w) * c + w * d
            per_user.append((1 - w) * s / c + w * a / d)
        loss = num / den if cfg.train.reduction == "position" else torch.stack(per_user).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("dual", [False, True], ids=["plain", "dual"])
@pytest.mark.parametrize("reduction", ["position", "user"])
@pytest.mark.parametrize("variant", ["sasrec", "bert4rec", "gru4rec"])
def test_train_step_matches_a_per_user_hand_computation(beauty, variant: str, reduction: str,
                                                        dual: bool) -> None:
    """Batching, padding, length buckets, the objective's reduction and the dual-channel rows
    must change nothing but float rounding, over three steps (so the gradients agree too)."""
    cfg = _config(variant, "ce", reduction, "model.dropout=0.0", "model.last_item_mask_prob=1.0")
    torch.manual_seed(7)
    model = build_model(cfg.model, beauty[3])
    twin = copy.deepcopy(model)
    got = _steps(cfg, model, beauty, dual)
    want = _naive_steps(cfg, twin, beauty, dual)
    np.testing.assert_allclose(got, want, rtol=2e-5)
    assert len(set(np.round(got, 4))) == STEPS  # the steps moved the loss: batches and weights differ


# Losses of three steps recorded before issue 21 (torch.manual_seed(7), generator seed 11).
PINNED = {
    "sasrec/ce/position/plain": (9.401474952697754, 9.403511047363281, 9.396321296691895),
    "sasrec/sampled/user/dual": (9.41573715209961, 9.393898963928223, 9.404753684997559),
    "sasrec/bce/position/dual": (1.394858479499817, 1.3855564594268799, 1.3839857578277588),
    "sasrec/gbce/user/plain": (44.70597839355469, 44.75249099731445, 44.5584602355957),
    "sasrec-ref/ce/position/plain": (9.407864570617676, 9.403231620788574, 9.404067993164062),
    "sasrec-ref/sampled/user/dual": (9.398364067077637, 9.407835006713867, 9.424551963806152),
    "bert4rec/ce/position/plain": (9.403661727905273, 9.41180419921875, 9.383910179138184),
    "bert4rec/ce/user/dual": (9.418411254882812, 9.415306091308594, 9.411917686462402),
    "bert4rec/sampled/position/dual": (9.392005920410156, 9.420050621032715, 9.39999771118164),
    "bert4rec/bce/user/plain": (1.3620305061340332, 1.3972358703613281, 1.3820267915725708),
    "bert4rec/gbce/position/plain": (44.31640625, 44.55427169799805, 44.42527770996094),
    "gru4rec/ce/position/plain": (9.40169620513916, 9.400338172912598, 9.395821571350098),
    "gru4rec/sampled/position/dual": (9.401371955871582, 9.400885581970215, 9.401408195495605),
    "gru4rec/bce/user/dual": (1.3853137493133545, 1.3855780363082886, 1.3836790323257446),
    "gru4rec/gbce/user/plain": (44.4976806640625, 44.569541931152344, 44.60182189941406),
}
# Sum and maximum of the scores of the first 12 users after the ce/position/plain steps.
PINNED_SCORES = {"sasrec": (-33078.4921875, 0.9328934550285339),
                 "sasrec-ref": (-11223.998046875, 1.0827810764312744),
                 "bert4rec": (-17217.423828125, 0.508708655834198),
                 "gru4rec": (-15412.87890625, 0.13925836980342865)}


@pytest.mark.parametrize("key", PINNED)
def test_the_same_seed_gives_the_same_losses(beauty, key: str) -> None:
    variant, loss, reduction, channels = key.split("/")
    cfg = _config(variant, loss, reduction)
    torch.manual_seed(7)
    model = build_model(cfg.model, beauty[3])
    got = _steps(cfg, model, beauty, channels == "dual")
    np.testing.assert_allclose(got, PINNED[key], rtol=1e-6)
    if variant in PINNED_SCORES and loss == "ce" and reduction == "position" and channels == "plain":
        model.eval()
        with torch.no_grad():
            scores = model.score_all(torch.from_numpy(pad_left(beauty[0][:12], 60))).numpy()
        # rtol 1e-5: a float32 sum of 145k scores moved by 3e-6 on a new machine with the code
        # unchanged (BERT4Rec); a real change to the model moves it by far more.
        np.testing.assert_allclose((scores.sum(), scores[:, 1:].max()), PINNED_SCORES[variant],
                                   rtol=1e-5)


@pytest.mark.parametrize("variant", ["sasrec", "bert4rec", "gru4rec"])
def test_scores_of_a_padded_batch_are_each_history_scored_alone(beauty, variant: str) -> None:
    cfg = _config(variant, "ce", "position")
    torch.manual_seed(7)
    model = build_model(cfg.model, beauty[3]).eval()
    histories = beauty[0][:12]
    with torch.no_grad():
        batched = model.score_all(torch.from_numpy(pad_left(histories, 60)))
        alone = torch.cat([model.last_state(torch.from_numpy(h[None].copy())) for h in histories])
        torch.testing.assert_close(batched, alone @ model.item_emb.weight[:beauty[3] + 1].T,
                                   rtol=1e-5, atol=1e-5)
