"""Tune wiring: search-space guards, a real search on a Beauty subset, restore after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmser_ray.config import load_config
from llmser_ray.errors import ConfigError
from llmser_ray.stages.tune import check_early_stop_cleanup, check_search, experiment_name, trial_config

ROOT = Path(__file__).resolve().parents[1]
BEAUTY = ROOT.parent / "shared" / "data" / "amazon_beauty_2014_5core"


def test_search_guards() -> None:
    ok = load_config(None, ['tune.search={"dual.num_pseudo": {"grid": [2, 12]}, '
                            '"train.lr": {"loguniform": [1e-4, 1e-2]}}'])
    check_search(ok)
    too_many = load_config(None, ['tune.search={"dual.num_pseudo": {"grid": [4, 16]}}'])
    with pytest.raises(ConfigError, match="augment.ask_items >= 16"):
        check_search(too_many)
    with pytest.raises(ConfigError, match="unknown key 'dual.bta'"):
        check_search(load_config(None, ['tune.search={"dual.bta": {"grid": [0.1]}}']))
    with pytest.raises(ConfigError, match="cached upstream stage"):
        check_search(load_config(None, ['tune.search={"augment.num_candidates": {"grid": [10]}}']))
    beta_tail = load_config(None, ['tune.search={"dual.beta": {"grid": [0.2, 0.8]}}', "augment.users=tail"])
    with pytest.raises(ConfigError, match="dual.beta, which has no effect"):
        check_search(beta_tail)
    check_search(load_config(None, ['tune.search={"dual.beta": {"grid": [0.2, 0.8]}}', "augment.users=all"]))
    with pytest.raises(ConfigError, match="exactly one of"):
        load_config(None, ['tune.search={"train.lr": {"grid": [0.1], "uniform": [0, 1]}}'])


def test_trial_config_and_experiment_identity() -> None:
    base = load_config(None, ['tune.search={"dual.num_pseudo": {"grid": [2, 4]}}'])
    cfg = trial_config(base.model_dump(mode="json"), {"dual.num_pseudo": 4.0, "dual.beta": 0.2})
    assert cfg.dual.enabled and cfg.dual.num_pseudo == 4 and cfg.dual.beta == 0.2
    same = load_config(None, ['tune.search={"dual.num_pseudo": {"grid": [2, 4]}}',
                              "tune.max_concurrent_trials=3"])
    other = load_config(None, ['tune.search={"dual.num_pseudo": {"grid": [2, 5]}}'])
    assert experiment_name(base) == experiment_name(same)  # resources are not identity
    assert experiment_name(base) != experiment_name(other)


def test_asha_without_the_dashboard_is_refused_before_ray_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """ASHA's stopped trials free their CPUs only through the dashboard's state API: a local Ray
    without it would hang the search, so the config is refused; FIFO or a cluster pass here."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    off = load_config(None, ["ray.include_dashboard=false", "tune.scheduler=asha"])
    with pytest.raises(ConfigError, match="would hang.*Fix: keep Ray's dashboard on"):
        check_early_stop_cleanup(off, ray_started=False)
    check_early_stop_cleanup(load_config(None, ["ray.include_dashboard=false", "tune.scheduler=fifo"]),
                             ray_started=False)
    check_early_stop_cleanup(load_config(None, ["tune.scheduler=asha"]), ray_started=False)
    # A cluster's dashboard is not ours to know before joining: asked after Ray starts.
    check_early_stop_cleanup(load_config(None, ["ray.include_dashboard=false", "tune.scheduler=asha",
                                                "ray.address=10.0.0.1:6379"]), ray_started=False)


def test_asha_on_a_ray_whose_state_api_does_not_answer_is_refused(ray_local: None) -> None:
    """The check after joining Ray, against a real Ray started without the dashboard (as a
    cluster head started with --include-dashboard=false would be)."""
    asha = load_config(None, ["tune.scheduler=asha"])
    with pytest.raises(ConfigError, match="needs Ray's state API.*would hang"):
        check_early_stop_cleanup(asha, ray_started=True, wait_s=0)
    check_early_stop_cleanup(load_config(None, ["tune.scheduler=fifo"]), ray_started=True, wait_s=0)


def _subset(tmp: Path, users: int = 1500) -> Path:
    lines = (BEAUTY / "Beauty.txt").read_text().splitlines()[:users]
    path = tmp / "beauty_subset.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


def _sets(tmp: Path, data: Path) -> list[str]:
    return [f"workdir={tmp / 'w'}", "data.source=s3rec", f"data.path={data}",
            f"data.item_path={BEAUTY / 'items.jsonl'}", "model.hidden=16", "model.max_len=20",
            "model.layers=1", "train.epochs=3", "train.torch_threads=1", "ray.num_cpus=4",
            "ray.include_dashboard=false", "dual.pseudo_source=candidates", "augment.num_candidates=6",
            "dual.num_pseudo=4",
            "tune.scheduler=fifo", "tune.max_concurrent_trials=1",
            'tune.search={"dual.num_pseudo": {"grid": [2, 4]}, "dual.constant_weight": {"grid": [0.3, 0.6]}}']


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not BEAUTY.is_dir(), reason="../shared/data is not present")
def test_tune_runs_reports_and_restores_after_the_driver_dies(tmp_path: Path) -> None:
    sets = _sets(tmp_path, _subset(tmp_path))
    cmd = [sys.executable, "-m", "llmser_ray", "tune"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cfg = load_config(None, sets)
    trials = cfg.workdir_path / "tune" / experiment_name(cfg) / "trials"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.time() + 900
    # Interrupt once the first trial has finished (its model manifest is written last).
    while time.time() < deadline and proc.poll() is None:
        if list(trials.glob("*/manifest.json")):
            break
        time.sleep(1)
    assert proc.poll() is None, "tune finished before it could be interrupted"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    finished = {p.parent.name for p in trials.glob("*/manifest.json")}
    assert finished
    mtimes = {t: (trials / t / "manifest.json").stat().st_mtime for t in finished}

    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1500)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-3000:]
    assert "[tune] restoring" in log
    for t, m in mtimes.items():  # finished trials were not trained again
        assert (trials / t / "manifest.json").stat().st_mtime == m
    report = cfg.workdir_path / "tune" / experiment_name(cfg) / "report"
    summary = json.loads((report / "summary.json").read_text())
    assert len(summary["trials"]) == 4
    assert all(t["status"] == "completed" for t in summary["trials"])
    assert all(t["test_tail_user_ndcg@10"] is not None for t in summary["trials"])
    assert summary["baseline"]["tail_user"]["n"] > 0
    assert (report / "report.html").is_file() and (report / "dual_num_pseudo.png").is_file()
    assert (report / "groups.png").is_file()


def test_trials_get_absolute_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tune runs each trial in its own working folder: a relative workdir must not reach it."""
    import copy
    import pickle

    from llmser_ray.errors import StageError
    from llmser_ray.stages.tune import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["workdir=runs/quickstart", "data.path=data/x.txt", "ray.storage_path=s3://b/p"])
    tree = absolute_paths(cfg.model_dump(mode="json"))
    assert tree["workdir"] == str(tmp_path / "runs" / "quickstart")
    assert tree["data"]["path"] == str(tmp_path / "data" / "x.txt")
    assert tree["ray"]["storage_path"] == "s3://b/p"  # URIs untouched
    assert not tree["llm"]["model_cache"].startswith("~")
    # A trial's error is copied by Tune and pickled by Ray: it must survive both, message intact.
    err = StageError("no prepared dataset", "run prepare")
    for again in (copy.copy(err), pickle.loads(pickle.dumps(err))):
        assert str(again) == "no prepared dataset. Fix: run prepare" and again.fix == "run prepare"


def test_backbone_target_searches_the_plain_model() -> None:
    """tune.target=backbone: trials train the backbone alone (no augmentation), and dual.* keys
    are refused; continuous domains hand integer keys over as floats."""
    cfg = load_config(None, ["tune.target=backbone",
                             'tune.search={"train.loss": {"choice": ["ce", "sampled"]}, '
                             '"model.hidden": {"randint": [32, 65]}}'])
    check_search(cfg)
    trial = trial_config(cfg.model_dump(mode="json"), {"train.loss": "sampled", "model.hidden": 48.0})
    assert not trial.dual.enabled and trial.train.loss == "sampled" and trial.model.hidden == 48
    with pytest.raises(ConfigError, match="tune.target=backbone trains without augmentation"):
        check_search(load_config(None, ["tune.target=backbone",
                                        'tune.search={"dual.beta": {"grid": [0.2]}}']))
    assert trial_config(load_config(None, []).model_dump(mode="json"), {}).dual.enabled  # dual by default


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(not BEAUTY.is_dir(), reason="../shared/data is not present")
def test_backbone_search_runs_for_real_on_a_beauty_subset(tmp_path: Path) -> None:
    """tune_configs/backbone_beauty.yaml itself runs, shrunk to test size: two losses, the plain
    backbone (no embed stage, though the items have text), no LLM stage."""
    config = ROOT / "tune_configs" / "backbone_beauty.yaml"
    sets = [f"workdir={tmp_path / 'w'}", f"data.path={_subset(tmp_path)}",
            f"data.item_path={BEAUTY / 'items.jsonl'}", "model.hidden=16", "model.max_len=20",
            "model.layers=1", "train.epochs=2", "train.lr=0.003", "ray.num_cpus=4", "tune.scheduler=fifo",
            "tune.num_samples=1", "tune.max_concurrent_trials=2", "train.num_negatives=64",
            'tune.search={"train.loss": {"grid": ["ce", "sampled"]}}']
    cmd = [sys.executable, "-m", "llmser_ray", "tune", "--config", str(config)]
    for s in sets:
        cmd += ["--set", s]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, cwd=ROOT,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    cfg = load_config(config, sets)
    assert cfg.tune.target == "backbone" and cfg.semantic.enabled is False
    workdir = cfg.workdir_path
    for stage in ("candidates", "models", "embeddings"):  # no upstream, no dual view
        assert not (workdir / stage).exists(), stage
    summary = json.loads((workdir / "tune" / experiment_name(cfg) / "report" / "summary.json").read_text())
    assert sorted(t["train.loss"] for t in summary["trials"]) == ["ce", "sampled"]
    assert all(t["status"] == "completed" and t["test_overall_ndcg@10"] > 0 for t in summary["trials"])
    assert summary["baseline"] is None
