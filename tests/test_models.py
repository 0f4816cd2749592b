"""Backbones: shapes, padding, causality, length buckets, the loss contract and that each one can learn."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from llmser_ray.config import ModelConfig
from llmser_ray.models import BERT4Rec, GRU4Rec, SASRec, build_model
from llmser_ray.models.batching import by_length
from llmser_ray.models.losses import Objective, bce_loss, ce_loss, sample_negatives
from llmser_ray.models.sasrec import attention_mask
from llmser_ray.stages.train import LossModule

NUM_ITEMS = 20
LOSSES = ["ce", "sampled", "gbce", "bce"]
VARIANTS = {
    "sasrec": {"backbone": "sasrec"},
    "sasrec-reference": {"backbone": "sasrec", "sasrec_variant": "reference"},
    "bert4rec": {"backbone": "bert4rec"},
    "gru4rec": {"backbone": "gru4rec"},
    "sasrec-untied": {"backbone": "sasrec", "tie_output": False},
}
# Left-padded, with an all-padding row and a single-item row.
SEQS = torch.tensor([
    [0, 0, 0, 0, 0, 0, 0, 0],
    [0, 0, 0, 0, 0, 3, 7, 2],
    [1, 2, 3, 4, 5, 6, 7, 8],
    [0, 0, 0, 0, 0, 0, 0, 9],
    [0, 0, 11, 12, 13, 14, 15, 20],
])


def _model(name: str, **over) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {"hidden": 16, "layers": 2, "heads": 2, "dropout": 0.1, "max_len": 6,
          **VARIANTS[name], **over}
    return build_model(ModelConfig(**kw), NUM_ITEMS)


def _stats(model: torch.nn.Module, seqs: torch.Tensor, objective: Objective,
           gen: torch.Generator | None) -> torch.Tensor:
    """Per-sequence loss sums and target counts ``[B, 2]``, as a training step computes them."""
    return LossModule(model)(seqs, objective, gen)


@pytest.mark.parametrize("name", VARIANTS)
def test_shapes_and_no_nan(name: str) -> None:
    model = _model(name)
    for mode in (True, False):
        model.train(mode)
        h = model(SEQS)
        assert h.shape == (5, 6, 16)  # forward reads at most max_len positions
        assert model.user_repr(SEQS).shape == (5, 16)
        assert model.item_embeddings().shape == (NUM_ITEMS + 1, 16)
        scores = model.score_all(SEQS)
        assert scores.shape == (5, NUM_ITEMS + 1)
        assert torch.isfinite(h).all() and torch.isfinite(scores).all()
        for loss in LOSSES:
            stats = _stats(model, SEQS, Objective(loss, 3), torch.Generator().manual_seed(0))
            assert stats.shape == (5, 2)
            assert torch.isfinite(stats).all()
            assert (stats[0] == 0).all()  # nothing to predict
            assert (stats[[1, 2, 4], 0] > 0).all() and (stats[[1, 2, 4], 1] >= 1).all()


@pytest.mark.parametrize("name", VARIANTS)
def test_gradients_finite_and_reach_every_parameter(name: str) -> None:
    model = _model(name)
    _stats(model, SEQS, Objective("bce", 2), None)[:, 0].sum().backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname  # DDP needs every parameter used
        assert torch.isfinite(p.grad).all(), pname


def test_all_padding_batch_has_zero_loss() -> None:
    empty = torch.zeros(3, 5, dtype=torch.long)
    for name in VARIANTS:
        model = _model(name)
        for loss in LOSSES:
            out = _stats(model, empty, Objective(loss, 2), None)
            assert torch.equal(out, torch.zeros(3, 2)), name
        assert torch.isfinite(model.score_all(empty)).all(), name


@pytest.mark.parametrize("backbone", ["sasrec", "bert4rec", "gru4rec"])
def test_an_untied_model_scores_against_its_own_output_table(backbone: str, tmp_path) -> None:
    cfg = ModelConfig(backbone=backbone, hidden=16, heads=2, max_len=6, tie_output=False)
    torch.manual_seed(0)
    model = build_model(cfg, NUM_ITEMS)
    assert model.out_emb is not None
    assert model.item_embeddings().data_ptr() == model.out_emb.weight.data_ptr()
    assert model.item_embeddings().data_ptr() != model.item_emb.weight.data_ptr()
    assert (model.item_embeddings()[0] == 0).all()  # padding scores 0 like the tied table's row
    # A negative-only loss moves the output rows of the negatives, never the input table.
    h = model.user_repr(SEQS[1:]).detach()
    torch.nn.functional.softplus(h @ model.item_embeddings()[[4, 5]].T).sum().backward()
    assert model.item_emb.weight.grad is None
    assert model.out_emb.weight.grad[[4, 5]].abs().sum() > 0
    path = tmp_path / "m.safetensors"
    save_file(model.state_dict(), str(path))
    clone = build_model(cfg, NUM_ITEMS)
    clone.load_state_dict(load_file(str(path)))
    model.eval(), clone.eval()
    torch.testing.assert_close(model.score_all(SEQS), clone.score_all(SEQS))


@pytest.mark.parametrize("name", ["sasrec", "bert4rec", "gru4rec"])
def test_extra_left_padding_and_truncation_do_not_change_the_prediction(name: str) -> None:
    model = _model(name).eval()
    narrow = torch.tensor([[0, 0, 4, 5, 6]])
    wide = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 4, 5, 6]])
    torch.testing.assert_close(model.user_repr(narrow), model.user_repr(wide))
    # Longer than max_len (6): only the items the model can read matter.
    long = torch.arange(1, 13).unsqueeze(0)
    readable = model.max_len - 1 if name == "bert4rec" else model.max_len
    torch.testing.assert_close(model.user_repr(long), model.user_repr(long[:, -readable:]))


def test_gru_state_reflects_only_the_real_items() -> None:
    model = _model("gru4rec").eval()
    assert isinstance(model, GRU4Rec)
    seq = torch.tensor([[0, 0, 0, 5, 9, 2]])
    out, _ = model.gru(model.item_emb(torch.tensor([[5, 9, 2]])))
    torch.testing.assert_close(model.user_repr(seq), out[:, -1])


@pytest.mark.parametrize("variant, causal", [("standard", True), ("reference", False)])
def test_sasrec_causality(variant: str, causal: bool) -> None:
    model = _model("sasrec", sasrec_variant=variant).eval()
    assert isinstance(model, SASRec)
    a = torch.tensor([[0, 1, 2, 3, 4, 5]])
    b = a.clone()
    b[0, -1] = 17
    ha, hb = model(a), model(b)
    assert torch.allclose(ha[:, :-1], hb[:, :-1], atol=1e-6) is causal
    assert not torch.allclose(ha[:, -1], hb[:, -1])


def test_attention_mask_gives_every_query_a_key() -> None:
    seqs = torch.tensor([[0, 0, 4, 5], [0, 0, 0, 0]])
    causal = attention_mask(seqs, causal=True)[:, 0]
    # An empty softmax is NaN on some kernels: padded queries keep (only) themselves.
    assert causal.any(-1).all()
    assert causal[0].tolist() == [[True, False, False, False], [False, True, False, False],
                                  [False, False, True, False], [False, False, True, True]]
    both_ways = attention_mask(seqs, causal=False)[0, 0]
    assert both_ways[2].tolist() == [False, False, True, True]


def test_reference_variant_has_no_feed_forward() -> None:
    names = {n for n, _ in _model("sasrec-reference").named_parameters()}
    assert not any(".ffn." in n for n in names)
    assert any(".ffn." in n for n, _ in _model("sasrec").named_parameters())


@pytest.mark.parametrize("name", VARIANTS)
@pytest.mark.parametrize("loss", LOSSES)
def test_overfits_a_fixed_batch(name: str, loss: str) -> None:
    model = _model(name, dropout=0.0, layers=1)
    batch = SEQS[1:]
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    gen = torch.Generator()
    losses = []
    for _ in range(40):
        gen.manual_seed(0)  # the same masks and negatives every step: a fixed objective
        stats = _stats(model, batch, Objective(loss, 2), gen)
        value = stats[:, 0].sum() / stats[:, 1].sum()
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(value.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_negatives_exclude_the_positive_and_are_uniform() -> None:
    pos = torch.randint(1, 6, (4000,), generator=torch.Generator().manual_seed(1))
    neg = sample_negatives(pos, 5, 3, torch.Generator().manual_seed(2))
    assert neg.shape == (4000, 3)
    assert (neg != pos[:, None]).all()
    assert neg.min() >= 1 and neg.max() <= 5
    # Given positive 3, each of the other four items is drawn with probability 1/4.
    counts = torch.bincount(neg[pos == 3].flatten(), minlength=6)[1:].float()
    assert counts[2] == 0
    share = counts[[0, 1, 3, 4]] / counts.sum()
    assert ((share - 0.25).abs() < 0.04).all(), share
    again = sample_negatives(pos, 5, 3, torch.Generator().manual_seed(2))
    assert torch.equal(neg, again)
    with pytest.raises(ValueError):
        sample_negatives(pos, 1, 1, None)


def test_losses_per_position() -> None:
    torch.manual_seed(0)
    h, emb = torch.randn(7, 4), torch.randn(11, 4)
    pos = torch.randint(1, 11, (7,))
    assert bce_loss(h, emb, pos, 5, torch.Generator().manual_seed(0)).shape == (7,)
    ce = ce_loss(h, emb, pos)
    expected = -torch.log_softmax(h @ emb[1:].T, dim=1)[torch.arange(7), pos - 1]
    torch.testing.assert_close(ce, expected)


def test_cloze_mask() -> None:
    model = _model("bert4rec", mask_prob=0.01, last_item_mask_prob=0.0)
    assert isinstance(model, BERT4Rec)
    seqs = SEQS[:, -6:]
    masked = model.cloze_mask(seqs, torch.Generator().manual_seed(0))
    assert not masked[seqs == 0].any()
    assert masked.sum(1).tolist()[0] == 0
    assert (masked.sum(1)[1:] >= 1).all()  # at least one per non-empty sequence
    model.last_item_mask_prob = 1.0
    masked = model.cloze_mask(seqs, torch.Generator().manual_seed(0))
    assert torch.equal(masked[:, -1], seqs[:, -1] > 0) and not masked[:, :-1].any()


def test_bert4rec_vocabulary_and_mask_token() -> None:
    model = _model("bert4rec")
    assert model.item_emb.num_embeddings == NUM_ITEMS + 2
    assert model.item_embeddings().shape[0] == NUM_ITEMS + 1  # the [MASK] row is not an item


def test_build_model_and_safetensors_round_trip(tmp_path) -> None:
    for name, cls in [("sasrec", SASRec), ("bert4rec", BERT4Rec), ("gru4rec", GRU4Rec)]:
        model = _model(name)
        assert isinstance(model, cls) and model.num_items == NUM_ITEMS and model.max_len == 6
        path = tmp_path / f"{name}.safetensors"
        save_file(model.state_dict(), str(path))  # fails on shared (tied) tensors
        clone = _model(name)
        clone.load_state_dict(load_file(str(path)))
        model.eval(), clone.eval()
        torch.testing.assert_close(model.score_all(SEQS), clone.score_all(SEQS))


@pytest.mark.parametrize("name", ["sasrec", "bert4rec", "gru4rec"])
def test_length_buckets_give_the_unbucketed_results(name: str) -> None:
    """``user_repr`` and the training step run length buckets (``batching.by_length``); the
    results must be those of the whole batch at its full width, row for row, gradients
    included. Forced on for GRU4Rec too (it turns buckets off for speed, not exactness)."""
    model = _model(name, max_len=12, last_item_mask_prob=1.0).eval()  # deterministic Cloze
    gen = torch.Generator().manual_seed(3)
    lengths = [0, 1, 2, 3, 5, 8, 9, 13, 4, 1]
    batch = torch.zeros(len(lengths), 14, dtype=torch.long)
    for row, n in enumerate(lengths):
        if n:
            batch[row, -n:] = torch.randint(1, NUM_ITEMS + 1, (n,), generator=gen)
    torch.testing.assert_close(by_length(model.last_state, batch, 1), model.last_state(batch))
    model.bucket_by_length = True
    torch.testing.assert_close(model.user_repr(batch), model.last_state(batch))
    bucketed = _stats(model, batch, Objective("ce"), None)
    model.bucket_by_length = False
    whole = _stats(model, batch, Objective("ce"), None)
    torch.testing.assert_close(bucketed, whole)
    grads = torch.autograd.grad(bucketed.sum(), model.item_emb.weight)[0]
    torch.testing.assert_close(grads, torch.autograd.grad(whole.sum(), model.item_emb.weight)[0])


def test_by_length_makes_one_call_per_power_of_two_width() -> None:
    """Rows are grouped by the power of two holding their real length (at least ``min_width``),
    narrowest group first, and come back in their original order."""
    seqs = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 5], [1, 2, 3, 4, 5, 6, 7, 8],
                         [0, 0, 0, 0, 0, 6, 7, 8], [0, 0, 0, 0, 0, 0, 0, 0]])
    calls: list[tuple[int, int]] = []

    def fn(sub: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(sub.shape))
        return sub.sum(1, keepdim=True)

    out = by_length(fn, seqs, 2)
    assert calls == [(2, 2), (1, 4), (1, 8)]  # lengths 1 and 0 -> width 2, 3 -> 4, 8 -> 8
    torch.testing.assert_close(out, seqs.sum(1, keepdim=True))


def test_reference_sasrec_is_never_bucketed() -> None:
    """The reference variant attends to padding, so its output depends on the width it is given."""
    model = _model("sasrec", sasrec_variant="reference").eval()
    assert not model.bucket_by_length
    seqs = torch.tensor([[0, 0, 0, 0, 3, 4], [1, 2, 3, 4, 5, 6]])
    torch.testing.assert_close(model.user_repr(seqs), model.last_state(seqs))


def test_the_tied_default_keeps_existing_training_keys() -> None:
    """Models trained before ``model.tie_output`` existed stay current; untying retrains."""
    from llmser_ray.config import Config, SemanticConfig
    from llmser_ray.stages.base import digest
    from llmser_ray.stages.train import OPERATIONAL_TRAIN_KEYS, TRAIN_SECTIONS, _run_key

    cfg = Config(semantic=SemanticConfig(enabled=False))  # the plain backbone, as resolved
    payload = {s: getattr(cfg, s).model_dump(mode="json") for s in TRAIN_SECTIONS}
    del payload["model"]["tie_output"]
    for op in OPERATIONAL_TRAIN_KEYS:
        del payload["train"][op]
    old = f"{digest(payload)}-na"
    assert _run_key(cfg, {}) == old
    untied = cfg.model_copy(update={"model": cfg.model.model_copy(update={"tie_output": False})})
    assert _run_key(untied, {}) != old
