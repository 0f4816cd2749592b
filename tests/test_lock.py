"""The workdir lock: one writing command per workdir, a killed holder never blocks the next."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llmser_ray import lock
from llmser_ray.cli import app
from llmser_ray.errors import StageError, WorkdirInUse

# Takes the lock as `llmser-ray train -w <workdir>` would, says so, then holds it.
HOLDER = """
import sys, time
from llmser_ray.lock import workdir_lock
wd = sys.argv[1]
sys.argv = ["llmser-ray", "train", "-w", wd]
with workdir_lock(wd):
    print("held", flush=True)
    time.sleep(600)
"""


def _env() -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}


@pytest.fixture
def holder(tmp_path: Path):
    """A second process holding ``tmp_path/w``'s lock; killed at the end if still alive."""
    wd = tmp_path / "w"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(wd)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env())
    line = proc.stdout.readline() if proc.stdout else ""
    assert line.strip() == "held", proc.stderr.read() if proc.stderr else ""
    yield wd, proc
    if proc.poll() is None:
        proc.kill()
    proc.wait(timeout=30)


def test_a_second_holder_is_refused_with_one_line_naming_the_first(holder) -> None:
    wd, proc = holder
    with pytest.raises(WorkdirInUse) as err:
        lock.acquire(wd)
    msg = str(err.value)
    assert isinstance(err.value, StageError)  # the CLI's exit 2, one line
    assert "\n" not in msg
    assert f"workdir {wd.resolve()} is in use by pid {proc.pid}" in msg
    assert f"`llmser-ray train -w {wd}`" in msg and "since 20" in msg
    assert "Fix: wait for that command to finish, or give this one another --workdir" in msg
    holder_info = json.loads((wd / ".lock").read_text())
    assert holder_info["pid"] == proc.pid and holder_info["hostname"]


def test_released_on_exit_and_reentrant(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    with lock.workdir_lock(wd) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()
        with lock.workdir_lock(wd):  # the same command entering a second locked call
            pass
        assert path.exists()  # the outer block still holds it
        out = subprocess.run([sys.executable, "-c", HOLDER, str(wd)], capture_output=True, text=True,
                             env=_env(), timeout=60)
        assert out.returncode != 0 and "is in use by pid" in out.stderr
    assert not (wd / ".lock").exists()
    with lock.workdir_lock(wd):  # free again
        (wd / "dataset").mkdir()
    assert (wd / "dataset").is_dir()  # a workdir with outputs stays


def test_a_killed_holder_is_taken_over(holder) -> None:
    wd, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert (wd / ".lock").exists()  # SIGKILL left the file behind, but not the flock
    with lock.workdir_lock(wd) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_stale_file_of_a_dead_pid_is_taken_over(tmp_path: Path) -> None:
    wd = tmp_path / "w"
    wd.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (wd / ".lock").write_text(json.dumps({"pid": dead.pid, "hostname": "h", "command": "x",
                                          "started": time.time()}))
    with lock.workdir_lock(wd) as path:
        assert json.loads(path.read_text())["pid"] == os.getpid()


def test_busy_message_without_details_or_from_a_leftover_process(tmp_path: Path) -> None:
    assert "another llmser-ray command" in str(lock.busy_message(tmp_path, None))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    msg = str(lock.busy_message(tmp_path, {"pid": dead.pid, "hostname": socket.gethostname(),
                                           "command": "llmser-ray tune", "started": time.time()}))
    assert f"pid {dead.pid}" in msg and "it has exited, a process it started still holds the lock" in msg


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "llmser_ray", *args], capture_output=True, text=True,
                          env=_env(), timeout=300)


def test_a_blocked_command_exits_2_in_one_line_and_read_only_ones_run(holder) -> None:
    wd, proc = holder
    out = _cli("prepare", "-w", str(wd), "--set", "data.source=synthetic")
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: workdir ") and f"pid {proc.pid}" in lines[0]
    assert not (wd / "dataset").exists()
    # Read-only commands are not blocked: `config`, and `serve` (here: no dataset to serve).
    conf = _cli("config", "--set", f"workdir={wd}")
    assert conf.returncode == 0 and "workdir:" in conf.stdout
    serve = _cli("serve", "-w", str(wd))
    assert serve.returncode == 2 and "in use" not in serve.stderr and "Traceback" not in serve.stderr


def test_writing_commands_hold_the_lock_while_their_stage_runs(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Each writing command holds the lock around its stage (probed from another process)."""
    import llmser_ray.stages.prepare as prepare_mod

    wd = tmp_path / "w"
    seen: list[str] = []

    def probing_prepare(cfg, force=False):
        out = subprocess.run([sys.executable, "-c", HOLDER, str(wd)], capture_output=True, text=True,
                             env=_env(), timeout=60)
        seen.append(out.stderr)
        raise StageError("probe done", "nothing")

    monkeypatch.setattr(prepare_mod, "prepare", probing_prepare)
    res = CliRunner().invoke(app, ["prepare", "-w", str(wd)])
    assert res.exit_code == 2 and "probe done" in res.output
    assert seen and f"is in use by pid {os.getpid()}" in seen[0]
    assert not wd.exists()  # released after the error; the workdir it made for the lock, empty, too
