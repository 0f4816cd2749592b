"""The serving package's layout (issue 21): re-exports, a light HAProxy wrapper, shared helpers.

Fast, no Ray: what the package promises its importers (the CLI, the tests, RayService's
``import_path``), and that the top-k and prefix rules the server now borrows from the
augmentation stages keep the server's guarantees (no padding, exclusions or NaN scores returned;
the prefix order dual training uses).
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import llmser_ray.serving as serving
from llmser_ray.augment.scoring import topk_scores
from llmser_ray.augment.weights import candidate_prefix, selection_prefix

ROOT = Path(__file__).resolve().parents[1]


def test_every_reexported_name_is_its_modules_object() -> None:
    assert sorted(serving.__all__) == sorted(serving._HOME)
    for name, module in serving._HOME.items():
        home = importlib.import_module(f"llmser_ray.serving.{module}")
        assert getattr(serving, name) is getattr(home, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = serving.nope


def test_ray_serve_import_path_and_console_script_resolve() -> None:
    from ray._common.utils import import_attr

    assert import_attr("llmser_ray.serving:app_builder") is serving.deployment.app_builder
    target = re.search(r'^llmser-ray-haproxy = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert target, "pyproject.toml names no llmser-ray-haproxy script"
    module, _, attr = target.group(1).partition(":")
    assert getattr(importlib.import_module(module), attr) is importlib.import_module(
        "llmser_ray.serving.haproxy").main


def test_haproxy_wrapper_imports_nothing_heavy() -> None:
    """Serve runs the wrapper at every HAProxy start and reload: importing it (and so the package
    ``__init__``) must not load torch, Ray, FastAPI or numpy."""
    code = ("import sys, llmser_ray.serving.haproxy; "
            "print(','.join(m for m in ('torch', 'ray', 'fastapi', 'numpy') if m in sys.modules))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True)
    assert res.stdout.strip() == ""


class _LastItemModel:
    """Scores depend on the newest item only (so any padding width gives the same scores);
    item 3 always scores NaN."""

    max_len = 8

    def __init__(self, num_items: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.table = torch.rand(num_items + 1, num_items + 1, generator=g)
        self.table[:, 3] = torch.nan
        self.widths: list[int] = []

    def eval(self) -> _LastItemModel:
        return self

    def score_all(self, seqs: torch.Tensor) -> torch.Tensor:
        self.widths.append(seqs.shape[1])
        return self.table[seqs[:, -1]]


def test_topk_scores_never_returns_padding_excluded_or_nan_items() -> None:
    model = _LastItemModel(num_items=6)
    inputs = [np.array([1, 2]), np.array([5]), np.array([4, 4, 4])]
    exclude = [np.array([2, 6]), np.zeros(0, np.int64), np.array([1, 2, 4, 5, 6])]
    items, scores = topk_scores(model, inputs, exclude, k=6)
    for row, ex in zip(items, exclude, strict=True):
        real = row[row > 0]
        assert not set(real) & ({0, 3} | set(ex.tolist()))
        assert len(real) == 5 - len(set(ex.tolist()))  # every eligible item, best first
    assert items[2].tolist() == [0] * 6 and np.isneginf(scores[2]).all()  # none eligible
    # Input [5]: every item but padding and the NaN item 3, best first, then an empty slot.
    ranked = sorted((1, 2, 4, 5, 6), key=lambda i: -float(model.table[5, i]))
    assert items[1].tolist() == [*ranked, 0]


def test_topk_scores_trim_pads_to_the_longest_input_with_the_same_result() -> None:
    model = _LastItemModel(num_items=6)
    inputs = [np.array([1, 2]), np.array([5]), np.arange(1, 12) % 6 + 1]
    exclude = [np.zeros(0, np.int64)] * 3
    full = topk_scores(model, inputs[:2], exclude[:2], k=4)
    trimmed = topk_scores(model, inputs[:2], exclude[:2], k=4, trim=True)
    capped = topk_scores(model, inputs, exclude, k=4, trim=True)
    assert model.widths == [8, 2, 8]  # max_len, the longest input, capped at max_len
    np.testing.assert_array_equal(full[0], trimmed[0])
    np.testing.assert_array_equal(full[1], trimmed[1])
    np.testing.assert_array_equal(capped[0][:2], full[0])


def test_prefix_rules_shared_by_dual_training_and_the_server() -> None:
    cands = np.array([40, 41, 42, 43, 44])  # best first
    assert candidate_prefix(cands, 3).tolist() == [42, 41, 40]  # best last, next to the history
    assert candidate_prefix(cands[:2], 3).tolist() == [41, 40]
    picked = [43, 40, 44, 41]
    assert selection_prefix(picked, cands, 3, "llm").tolist() == [43, 40, 44]
    assert selection_prefix(picked, cands, 3, "candidate").tolist() == [44, 43, 40]
