"""Dual-channel training: the loss weighting, augmented inference and the reading of augmentation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from llmser_ray.augment.weights import load_augmentation
from llmser_ray.config import ModelConfig, load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.errors import StageError
from llmser_ray.io import write_json
from llmser_ray.models import build_model
from llmser_ray.models.batching import pad_batch
from llmser_ray.models.losses import Objective
from llmser_ray.stages.prepare import prepare
from llmser_ray.stages.train import LossModule, TrainingData, batch_loss, dual_key


def _model(backbone: str) -> LossModule:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, hidden=16, layers=1, heads=1, dropout=0.0, max_len=12)
    return LossModule(build_model(cfg, 30))


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec"])
@pytest.mark.parametrize("reduction", ["user", "position"])
def test_batch_loss_is_the_weighted_sum_of_both_channels(backbone: str, reduction: str) -> None:
    """user: (1 - w) mean L(original) + w mean L(augmented), per user, averaged over users.
    position: every target position's loss weighted 1 - w (original) or w (augmented), divided
    by the sum of those weights. Both by hand from one-sequence losses; w = 0 users ignore the
    augmented channel."""
    model = _model(backbone).eval()
    cfg = load_config(None, ["train.loss=ce", "model.max_len=12", f"train.reduction={reduction}"])
    objective = Objective.from_config(cfg.train)
    orig = [np.array([1, 2, 3]), np.array([4, 5, 6, 7]), np.array([8, 9])]
    aug = [np.array([20, 21, 1, 2, 3]), np.array([4, 5, 6, 7]), np.array([22, 8, 9])]
    w = np.array([0.3, 0.0, 0.8])
    idx = np.arange(3)
    got = batch_loss(model, idx, orig, cfg, "cpu", None, aug, w)

    def one(seq: np.ndarray) -> tuple[torch.Tensor, float]:
        """Loss sum and target count of one sequence (len - 1 targets)."""
        total, count = model(torch.from_numpy(seq[None]), objective, None)[0]
        assert float(count) == len(seq) - 1
        return total, float(count)

    (s0, c0), (s1, c1), (s2, c2) = one(orig[0]), one(orig[1]), one(orig[2])
    (a0, d0), (a2, d2) = one(aug[0]), one(aug[2])
    if reduction == "user":
        want = ((1 - 0.3) * s0 / c0 + 0.3 * a0 / d0 + s1 / c1 + (1 - 0.8) * s2 / c2 + 0.8 * a2 / d2) / 3
        plain_want = (s0 / c0 + s1 / c1 + s2 / c2) / 3
    else:
        want = (((1 - 0.3) * s0 + 0.3 * a0 + s1 + (1 - 0.8) * s2 + 0.8 * a2)
                / ((1 - 0.3) * c0 + 0.3 * d0 + c1 + (1 - 0.8) * c2 + 0.8 * d2))
        plain_want = (s0 + s1 + s2) / (c0 + c1 + c2)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # Without augmentation it is the plain loss.
    plain = batch_loss(model, idx, orig, cfg, "cpu", None)
    torch.testing.assert_close(plain, plain_want)
    # w = 0 everywhere: exactly the plain gradients; w = 1 for a user: different ones.
    def grads(*extra: object) -> torch.Tensor:
        model.zero_grad()
        batch_loss(model, idx, orig, cfg, "cpu", None, *extra).backward()
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    g_plain = grads()
    torch.testing.assert_close(grads(aug, np.zeros(3)), g_plain)
    assert not torch.allclose(grads(aug, np.array([1.0, 0.0, 0.0])), g_plain)


def _write_reliability(workdir: Path, users: list[int], pseudo: list[list[int]], r: list[float],
                       cands: list[list[int]]) -> None:
    folder = workdir / "reliability"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({
        "user_id": pa.array(users, pa.int64()),
        "pseudo_items": pa.array(pseudo, pa.list_(pa.int64())),
        "candidates": pa.array(cands, pa.list_(pa.int64())),
        "r_u": pa.array(r, pa.float64()),
    }), folder / "reliability.parquet")
    write_json(folder / "manifest.json", {"config_digest": "test"})


def test_augmentation_is_read_sliced_weighted_and_used_at_inference(tmp_path: Path) -> None:
    seqs = tmp_path / "s.txt"
    seqs.write_text("1 1 2 3 4 5 6\n2 6 7 8 9 10 11 12 13 14 15 16\n3 2 4 6 8\n")
    base = [f"workdir={tmp_path}", "data.source=s3rec", f"data.path={seqs}", "data.tail_user_threshold=3",
            "dual.enabled=true", "dual.num_pseudo=2", "dual.beta=0.5"]
    cfg = load_config(None, base)
    prepare(cfg)
    ds = load_dataset(tmp_path / "dataset")
    with pytest.raises(StageError, match="llmser-ray augment"):
        load_augmentation(cfg, ds)
    # User 1 (length 4 <= T=3? no: train_len 4 > 3 -> beta), user 3 (train_len 2 <= 3), user 2 none.
    # The LLM listed 10, 9, 11; the reverse model ranked 11 > 10 > 9.
    _write_reliability(tmp_path, [1, 3], [[10, 9, 11], [12]], [0.8, 0.6], [[11, 10, 9], [12]])
    aug = load_augmentation(cfg, ds)
    assert aug.pseudo[0].tolist() == [10, 9] and aug.pseudo[2].tolist() == [12]  # first N=2
    assert len(aug.pseudo[1]) == 0
    assert aug.weight.tolist() == pytest.approx([0.4, 0.0, 0.6])
    # Candidate order: the better-ranked 10 sits last, next to the real history.
    by_rank = load_augmentation(load_config(None, [*base, "dual.order=candidate"]), ds)
    assert by_rank.pseudo[0].tolist() == [9, 10]
    data = TrainingData.build(cfg, ds)
    # Training rows mark the pseudo items context-only (the default, dual.pseudo_targets=false).
    assert data.aug_seqs is not None and data.aug_seqs[0].tolist() == [-10, -9, 1, 2, 3, 4]
    # Inference reads pseudo + history; ranking masks only the real history.
    assert data.val_inputs[0].tolist() == [10, 9, 1, 2, 3, 4]
    assert data.val_seen[0].tolist() == [1, 2, 3, 4]
    no_inf = TrainingData.build(load_config(None, [*base, "dual.infer_augmented=false"]), ds)
    assert no_inf.val_inputs[0].tolist() == [1, 2, 3, 4]
    # Candidates ablation: top-N reversed (best next to the history), constant weight.
    cand_dir = tmp_path / "candidates"
    cand_dir.mkdir()
    pq.write_table(pa.table({"user_id": pa.array([1], pa.int64()),
                             "candidates": pa.array([[30, 31, 32]], pa.list_(pa.int64()))}),
                   cand_dir / "candidates.parquet")
    write_json(cand_dir / "manifest.json", {"config_digest": "c"})
    ablation = load_augmentation(load_config(None, [*base, "dual.pseudo_source=candidates",
                                                    "dual.constant_weight=0.25"]), ds)
    assert ablation.pseudo[0].tolist() == [31, 30] and ablation.weight[0] == 0.25
    assert json.loads((tmp_path / "dataset" / "manifest.json").read_text())["counts"]["users"] == 3


@pytest.mark.parametrize("backbone", ["sasrec", "gru4rec", "bert4rec"])
def test_pseudo_items_as_context_only_are_never_targets(backbone: str) -> None:
    """dual.pseudo_targets=false marks pseudo items with negated ids: the augmented row reads them
    (same hidden states as the unmarked row) but predicts only its real items, the first one
    included; through length buckets of rows of different lengths. The loss is the objective's
    on exactly the unflagged target positions."""
    model = _model(backbone).eval()
    objective = Objective.from_config(load_config(None, ["train.loss=ce"]).train)
    plain = [np.array([20, 21, 1, 2, 3]), np.array([22, 4, 5, 6, 7, 8, 9, 10, 11, 12])]
    marked = [np.array([-20, -21, 1, 2, 3]), np.array([-22, 4, 5, 6, 7, 8, 9, 10, 11, 12])]
    seqs, signed = pad_batch(plain, 12), pad_batch(marked, 12)
    got = model(signed, objective, torch.Generator().manual_seed(4))
    # By hand, row by row as the length buckets run them (narrowest first, widths 8 and 10, one
    # generator: BERT4Rec's Cloze draws land where they do in the module).
    net, gen, rows, dropped = model.model, torch.Generator().manual_seed(4), [], 0
    for row, width in ((0, 8), (1, 10)):
        inputs, targets, valid = net.training_task(seqs[row:row + 1, -width:], gen)
        keep = valid & ~net.target_flags(signed[row:row + 1, -width:] < 0)
        dropped += int((valid & ~keep).sum())
        rows.append(objective.per_sequence(net(inputs), net.item_embeddings(), targets, keep, None))
    torch.testing.assert_close(got, torch.cat(rows))
    if backbone != "bert4rec":  # causal: every real item is a target, the pseudo ones never
        assert got[:, 1].tolist() == [3.0, 9.0]
        assert model(seqs, objective, None)[:, 1].tolist() == [4.0, 9.0]
        assert dropped == 1  # 21 (predicted from 20); 20 and 22 are never targets of a causal model
    else:  # this seed's Cloze masks fall on pseudo items too (3 of them): those do not count
        assert dropped == 3


def test_pseudo_targets_off_marks_training_rows_only_and_keeps_old_run_keys(tmp_path: Path) -> None:
    seqs = tmp_path / "s.txt"
    seqs.write_text("1 1 2 3 4 5 6\n2 6 7 8 9 10 11 12 13 14 15 16\n3 2 4 6 8\n")
    base = [f"workdir={tmp_path}", "data.source=s3rec", f"data.path={seqs}", "data.tail_user_threshold=3",
            "dual.enabled=true", "dual.num_pseudo=2"]
    prepare(load_config(None, base))
    ds = load_dataset(tmp_path / "dataset")
    _write_reliability(tmp_path, [1], [[10, 9]], [0.8], [[10, 9]])
    cfg = load_config(None, [*base, "dual.pseudo_targets=false"])
    data = TrainingData.build(cfg, ds)
    assert data.aug_seqs is not None and data.aug_seqs[0].tolist() == [-10, -9, 1, 2, 3, 4]
    assert data.val_inputs[0].tolist() == [10, 9, 1, 2, 3, 4]  # inference reads plain ids
    # Dual-channel models trained before the option existed predicted their pseudo items: with
    # dual.pseudo_targets=true they keep their run keys (the value the key's dual part had then,
    # pinned); the context-only default makes another model.
    method = load_config(None, ["dual.enabled=true", "dual.pseudo_targets=true"])
    assert dual_key(method) == "e7a06eba"
    assert dual_key(load_config(None, ["dual.enabled=true"])) != "e7a06eba"
    assert TrainingData.build(load_config(None, [*base, "dual.pseudo_targets=true"]),
                              ds).aug_seqs[0].tolist() == [10, 9, 1, 2, 3, 4]
