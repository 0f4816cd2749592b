"""SIA and ARV end to end with the real vLLM engine (SmolLM2-135M on CPU), FAISS and Ray Data.

Small inputs (a synthetic catalogue, a dozen users) keep each engine start the dominant cost.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from llmser_ray.augment.weights import decay_weights
from llmser_ray.config import load_config
from llmser_ray.stages.prepare import prepare
from llmser_ray.stages.pretrain import pretrain
from llmser_ray.stages.reliability import score_reliability as validate
from llmser_ray.stages.select import select_items as augment

# Each test starts one or two vLLM engines (20-30 s each on a quiet 2-core machine).
pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]

SMALL = ["data.source=synthetic", "data.synthetic.n_users=300", "data.synthetic.n_items=120",
         "data.tail_user_threshold=5", "model.hidden=16", "model.max_len=20", "model.layers=1",
         "train.epochs=3", "train.torch_threads=1", "ray.num_cpus=4", "ray.include_dashboard=false",
         "augment.max_users=12", "augment.shard_size=4", "augment.num_candidates=10",
         "augment.ask_items=5", "dual.num_pseudo=5", "llm.max_tokens=40", "llm.batch_size=16",
         # SIA by the LLM (the default collaborative selector needs none): this file tests that path
         "augment.selector=generate"]


def _cfg(workdir: Path, *extra: str):
    return load_config(None, [f"workdir={workdir}", *SMALL, *extra])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, ray_local) -> Path:
    wd = tmp_path_factory.mktemp("aug")
    cfg = _cfg(wd)
    prepare(cfg)
    pretrain(cfg)
    return wd


def test_constrained_sia_and_arv(workdir: Path) -> None:
    # One engine on two CPUs, as a 2-core run of all of Beauty uses: ARV's actors (scorer, FAISS,
    # prompter, engine, judge) then hold 3.2 of the 4 logical CPUs, and a pipeline step that needs
    # a whole free CPU (the repartition we had) waits forever.
    cfg = _cfg(workdir, "llm.cpus_per_engine=2")
    res = augment(cfg)
    table = pq.read_table(res.path / "augmented.parquet").to_pandas()
    assert len(table) == 12 and table["user_id"].is_monotonic_increasing
    assert res.summary["users"] == 12
    assert set(res.summary["status"]) <= {"ok", "truncated", "malformed", "empty"}
    for row in table.itertuples():
        chosen = list(row.pseudo_items)
        assert len(chosen) == len(set(chosen)) <= 5
        assert set(chosen) <= set(row.candidates)  # grounded to real candidate ids
        assert not set(chosen) & set(row.history)  # history excluded by the candidate generator
        assert row.n_lines == row.n_mapped + row.n_unmapped + row.n_duplicates
        assert row.raw_reply or row.status in ("empty", "error")
    val = validate(cfg)
    rel = pq.read_table(val.path / "reliability.parquet").to_pandas()
    assert list(rel["user_id"]) == list(table["user_id"])
    assert ((rel["r_u"] >= 0) & (rel["r_u"] <= 1)).all()
    want = decay_weights(rel["r_u"].to_numpy(), rel["train_len"].to_numpy(), "step", 0.5, 5)
    np.testing.assert_allclose(rel["w_u"], want)
    for row in rel.itertuples():
        assert row.hidden_item == row.original[-1]  # the last TRAINING item, not the validation label
        if row.picked_item:
            assert row.picked_item in set(row.arv_candidates)
    assert 0 <= val.summary["top_position_share"] <= 1
    # Rerunning with the same config is a no-op for both stages.
    assert augment(cfg).skipped and validate(cfg).skipped


def test_free_text_lines_are_grounded_and_hallucinations_counted(workdir: Path) -> None:
    cfg = _cfg(workdir, "augment.grounding=lines", "llm.max_tokens=80")
    res = augment(cfg)
    table = pq.read_table(res.path / "augmented.parquet").to_pandas()
    s = res.summary
    assert s["answer_entries"] == int(table["n_lines"].sum()) > 0
    assert s["hallucination_rate"] == pytest.approx(table["n_unmapped"].sum() / table["n_lines"].sum())
    for row in table.itertuples():
        assert set(row.pseudo_items) <= set(row.candidates)
        if row.status == "ok":
            assert row.n_mapped > 0


def test_truncated_replies_are_recorded_not_trusted(workdir: Path) -> None:
    cfg = _cfg(workdir, "llm.max_tokens=3")  # "[1," at most: every reply is cut
    res = augment(cfg)
    table = pq.read_table(res.path / "augmented.parquet").to_pandas()
    assert (table["status"] != "ok").all()
    assert set(table["status"]) <= {"truncated", "malformed", "empty"}
    for row in table.itertuples():  # at most the entries completed before the cut
        assert set(row.pseudo_items) <= set(row.candidates) and len(row.pseudo_items) <= 1


def test_degenerate_users_without_candidates(tmp_path: Path, ray_local) -> None:
    # User 1's training part (1 2 3 4) is the whole catalogue and history is excluded from the
    # candidates, so nothing is left to choose from: no LLM call, an "empty" row, nobody lost.
    seqs = tmp_path / "s.txt"
    seqs.write_text("1 1 2 3 4 1 2\n2 1 2 3\n3 2 3 4\n4 3 4 1\n")
    cfg = load_config(None, [f"workdir={tmp_path}", "data.source=s3rec", f"data.path={seqs}",
                             "data.tail_user_threshold=10", "augment.users=all", "augment.num_candidates=3",
                             "augment.ask_items=2", "dual.num_pseudo=2", "model.hidden=8", "model.max_len=8",
                             "train.epochs=1", "ray.include_dashboard=false", "llm.max_tokens=16"])
    prepare(cfg)
    pretrain(cfg)
    res = augment(cfg)
    table = pq.read_table(res.path / "augmented.parquet").to_pandas().set_index("user_id")
    assert len(table.loc[1, "candidates"]) == 0
    assert table.loc[1, "status"] == "empty" and "no candidates" in table.loc[1, "error"]
    assert len(table) == 4  # nobody lost


# Loaded into the interrupted run only (through PYTHONPATH): right after its second shard lands on
# disk the driver either SIGKILLs itself, or sends SIGINT to its whole process group, which is what
# Ctrl-C in a terminal does. An interruption from outside raced the stage: once the engine is up,
# the twelve shards can arrive in one batch and be written, published and cleaned up between two
# polls.
_INTERRUPT_AFTER_SHARDS = """
import os, signal, sys
if sys.argv[:1] == ["-m"] and "augment" in sys.argv:  # the driver, not its Ray workers
    from llmser_ray.augment import shards

    _write, _written = shards.ShardWriter._write, []
    _how = os.environ["LLMSER_TEST_INTERRUPT"]

    def _write_then_interrupt(self, shard):
        _write(self, shard)
        _written.append(shard)
        if len(_written) == 2:
            if _how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            else:
                os.killpg(os.getpgid(0), signal.SIGINT)

    shards.ShardWriter._write = _write_then_interrupt
"""


def _session_alive(sid: int) -> list[psutil.Process]:
    """Live processes of a session: the driver's, and the GCS, raylet, agents and workers it
    started (workers have process groups of their own, so the group would miss them)."""
    alive = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(p.pid) == sid and p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
    return alive


def _kill_all(procs: list[psutil.Process]) -> None:
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.kill()


@pytest.mark.parametrize(("how", "seed"), [("kill", 7), ("ctrl-c", 8)])
def test_interrupted_augment_resumes_without_losing_or_redoing_users(
        workdir: Path, tmp_path: Path, how: str, seed: int) -> None:
    # One user per shard and per LLM call: 12 shards, so the interruption after two leaves ten to
    # do. Each variant samples its own 12 users (augment.seed), so neither finds the other's result.
    sets = [f"workdir={workdir}", *SMALL, "augment.shard_size=1", f"augment.seed={seed}", "llm.batch_size=1"]
    cmd = [sys.executable, "-m", "llmser_ray", "augment", "--skip-validate"]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    hook = tmp_path / "interrupt_hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_INTERRUPT_AFTER_SHARDS)
    hooked_env = {**env, "LLMSER_TEST_INTERRUPT": how,
                  "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), env.get("PYTHONPATH")]))}
    # Earlier tests in this module publish their own augmentation into the same workdir.
    manifest = workdir / "augmented" / "manifest.json"
    published = manifest.read_bytes() if manifest.exists() else None
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env=hooked_env, start_new_session=True)
    _, err = proc.communicate(timeout=900)
    if how == "kill":
        assert proc.returncode == -signal.SIGKILL, f"not interrupted (exit {proc.returncode}): {err[-2000:]}"
        # The local Ray it started dies with it, as with Ctrl-C on a job: the whole session, since
        # the Ray Data actors and the vLLM engine's processes have process groups of their own.
        _kill_all(_session_alive(proc.pid))
    else:
        # Ctrl-C: a one-line message, exit 130, and the local Ray it started shut down with it. The
        # vLLM engine's worker process notices its parent's death on its own: ~25 s on a loaded
        # 2-core machine.
        assert proc.returncode == 130, f"exit {proc.returncode}: {err[-2000:]}"
        assert "interrupted: rerun the same command to resume" in err
        assert "Traceback" not in err
        left = _session_alive(proc.pid)
        for _ in range(90):
            if not left:
                break
            time.sleep(1)
            left = _session_alive(proc.pid)
        names = [p.name() for p in left]
        _kill_all(left)
        assert not names, f"processes left running after Ctrl-C: {names}"
    partial = workdir / ".partial"
    done_before = len(list(partial.glob("augment-*/shard-*.parquet")))
    assert done_before == 2
    assert (manifest.read_bytes() if manifest.exists() else None) == published  # nothing published
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    summary = json.loads((workdir / "augmented" / "summary.json").read_text())
    assert summary["reused_shards"] >= done_before
    assert summary["users_processed_now"] <= 12 - done_before
    table = pq.read_table(workdir / "augmented" / "augmented.parquet").to_pandas()
    assert len(table) == 12 and table["user_id"].is_unique
    assert not list(partial.glob("augment-*"))  # cleaned up after success
