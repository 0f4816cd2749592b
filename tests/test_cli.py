"""The CLI: thin commands, one-line errors with exit code 2, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmser_ray.cli import app

runner = CliRunner()
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def test_help_lists_the_stages() -> None:
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for cmd in ("prepare", "train", "run", "config"):
        assert cmd in res.output


def test_config_prints_resolved_defaults() -> None:
    res = runner.invoke(app, ["config", "--set", "train.lr=0.005"])
    assert res.exit_code == 0, res.output
    assert "lr: 0.005" in res.output and "backbone: sasrec" in res.output


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["config", "--set", "train.nope=1"], "unknown key 'train.nope'"),
        (["config", "--set", "train.batch_size=0"], "'train.batch_size'"),
        (["config", "--config", "/nonexistent.yaml"], "config file not found"),
    ],
)
def test_bad_config_exits_2_with_one_line(args: list[str], needle: str) -> None:
    res = runner.invoke(app, args)
    assert res.exit_code == 2
    assert needle in res.output
    assert "Traceback" not in res.output


def test_prepare_missing_file_leaves_nothing(tmp_path: Path) -> None:
    res = runner.invoke(app, ["prepare", "-w", str(tmp_path / "w"), "--set", "data.source=s3rec",
                              "--set", f"data.path={tmp_path / 'missing.txt'}"])
    assert res.exit_code == 2
    assert "missing.txt" in res.output and "Fix:" in res.output
    assert not (tmp_path / "w" / "dataset").exists()


def test_train_without_dataset_prepares_first_and_says_so(tmp_path: Path) -> None:
    """The one upstream rule: a workdir without a dataset gets one prepared first, announced on
    the console; prepare's own bad input is then the one-line error (exit 2, no traceback)."""
    res = runner.invoke(app, ["train", "-w", str(tmp_path / "empty"), "--set", "data.source=s3rec",
                              "--set", f"data.path={tmp_path / 'missing.txt'}"])
    assert res.exit_code == 2, res.output
    assert "[train] needs prepare" in res.output and "file not found" in res.output
    assert "Traceback" not in res.output
    assert not (tmp_path / "empty" / "dataset").exists()


@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not present")
def test_prepare_beauty_then_noop(tmp_path: Path) -> None:
    beauty = SHARED / "amazon_beauty_2014_5core"
    args = ["prepare", "-w", str(tmp_path), "--set", "data.source=s3rec",
            "--set", f"data.path={beauty / 'Beauty.txt'}",
            "--set", f"data.item_path={beauty / 'items.jsonl'}"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "written" in first.output and "22363" in first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "up to date" in second.output
