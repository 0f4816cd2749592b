"""Console output: known-harmless noise dropped by signature, progress lines, the local Ray's start."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from llmser_ray import console, ray_utils
from llmser_ray.config import RayConfig

# Verbatim (less Ray's "(Actor pid=N)" prefix) from a quickstart run's stderr.
MP = "/root/.pyenv/versions/3.11.7/lib/python3.11/multiprocessing"
RAY = "/work/main/.venv/lib/python3.11/site-packages/ray"
TRACKER_BLOCK = [
    f"{MP}/resource_tracker.py:123: UserWarning: "
    "resource_tracker: process died unexpectedly, relaunching.  Some resources might leak.",
    "  warnings.warn('resource_tracker: process died unexpectedly, '",
    "Traceback (most recent call last):",
    f'  File "{MP}/resource_tracker.py", line 239, in main',
    "    cache[rtype].remove(name)",
    "KeyError: '/psm_732fa5c9'",
    "Traceback (most recent call last):",
    f'  File "{MP}/resource_tracker.py", line 239, in main',
    "    cache[rtype].remove(name)",
    "KeyError: '/loky-27671-xnq5m4id'",
]
SIGTERM_BLOCK = [
    "Exception ignored in: <function WeakSet.__init__.<locals>._remove at 0x7f4dc0b9a480>",
    "Traceback (most recent call last):",
    '  File "/root/.pyenv/versions/3.11.7/lib/python3.11/_weakrefset.py", line 39, in _remove',
    "    def _remove(item, selfref=ref(self)):",
    "",
    f'  File "{RAY}/_private/worker.py", line 1063, in sigterm_handler',
    "    raise_sys_exit_with_custom_error_message(",
    '  File "python/ray/_raylet.pyx", line 712, in ray._raylet.raise_sys_exit_with_custom_error_message',
    "SystemExit: 1",
]
ONE_LINERS = [
    "[2026-12-02 07:11:01,259 E 25714 25803] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' "
    "and ID: '1b70c13e' has constructor arguments in the object store and max_restarts > 0. If the arguments",
    "Failed to query Ray Train Controller actor state. State API may be temporarily unavailable. Continuing.",
    "Triton is installed, but doesn't include CPU backend. Disabling Triton.",
    "/x/vllm/triton_utils/dispatcher.py:138: FutureWarning: `torch.distributed.reduce_op` is deprecated, "
    "please use `torch.distributed.ReduceOp` instead",
    '  if hasattr(value, "__dict__"):',
]
REAL_ERROR = [
    "Traceback (most recent call last):",
    '  File "/work/main/llmser_ray/stages/select.py", line 12, in select_items',
    "    raise ValueError('bad')",
    "ValueError: bad",
]


def test_harmless_noise_is_dropped_and_everything_else_kept() -> None:
    kept = ["epoch 1 valid NDCG@10=0.31", *REAL_ERROR, "UserWarning: something you should fix"]
    lines = [*TRACKER_BLOCK, kept[0], *SIGTERM_BLOCK, *ONE_LINERS, *kept[1:]]
    assert console.drop_noise(lines) == kept
    # A KeyError traceback from anywhere but the tracker is real.
    other = ["Traceback (most recent call last):", '  File "a.py", line 1, in f', "KeyError: 'x'"]
    assert console.drop_noise(other) == other
    # An unfinished block at the end of a batch is never swallowed.
    assert console.drop_noise(TRACKER_BLOCK[2:5]) == TRACKER_BLOCK[2:5]


def test_driver_filter_wraps_rays_printer_once() -> None:
    got: list[dict] = []
    printer = console._filtered(got.append)
    assert console._filtered(printer) is printer
    printer({"pid": 1, "lines": [*TRACKER_BLOCK]})  # nothing left: not printed at all
    printer({"pid": 2, "lines": [ONE_LINERS[0], "kept"]})
    assert got == [{"pid": 2, "lines": ["kept"]}]


def _unset(monkeypatch: pytest.MonkeyPatch, *keys: str) -> None:
    """Unset ``keys`` for this test and restore them afterwards, even those that were unset."""
    for key in keys:
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)


def test_verbose_turns_every_filter_off(monkeypatch: pytest.MonkeyPatch) -> None:
    _unset(monkeypatch, console.VERBOSE_ENV)
    assert console.ray_init_options() == {
        "runtime_env": {"worker_process_setup_hook": "llmser_ray.console.worker_setup"}}
    console.setup(verbose=True)
    assert os.environ[console.VERBOSE_ENV] == "1"
    assert console.ray_init_options() == {}
    console.setup(verbose=False)  # a later default call does not clear the user's choice
    assert console.is_verbose()


def test_cli_verbose_flag_reaches_the_environment() -> None:
    env = {k: v for k, v in os.environ.items() if k != console.VERBOSE_ENV}
    code = ("import os, sys; from llmser_ray.cli import app; sys.argv = ['llmser-ray', *sys.argv[1:]]\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "print('VERBOSE=' + os.environ.get('LLMSER_VERBOSE', ''))")
    on = subprocess.run([sys.executable, "-c", code, "--verbose", "config"], capture_output=True, text=True,
                        env=env, timeout=120)
    off = subprocess.run([sys.executable, "-c", code, "config"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert on.stdout.strip().endswith("VERBOSE=1"), on.stderr
    assert off.stdout.strip().endswith("VERBOSE="), off.stderr


def test_progress_lines_have_counts_rate_eta_and_a_summary() -> None:
    now = [0.0]
    out = io.StringIO()
    bar = console.Progress("select", total=240, unit="users", every=10, stream=out, clock=lambda: now[0])
    now[0] = 5.0
    bar.update(10)  # before the first interval: silent
    now[0] = 20.0
    bar.update(30)
    now[0] = 160.0
    bar.update(200)
    bar.close()
    lines = out.getvalue().splitlines()
    assert lines == ["[select] 40/240 users, 2.00/s (17%), ETA 1m40s",
                     "[select] 240/240 users, 1.50/s (100%)",
                     "[select] done: 240 users in 2m40s, 1.50/s"]
    items = list(console.progress(range(3), "x", total=3, every=1e9))
    assert items == [0, 1, 2]


def test_cluster_address_honours_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    _unset(monkeypatch, "RAY_ADDRESS")
    assert ray_utils.cluster_address(RayConfig()) is None
    assert ray_utils.cluster_address(RayConfig(address="ray://h:10001")) == "ray://h:10001"
    monkeypatch.setenv("RAY_ADDRESS", "local")
    assert ray_utils.cluster_address(RayConfig()) is None
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6390")
    assert ray_utils.cluster_address(RayConfig()) == "127.0.0.1:6390"
    assert ray_utils.cluster_address(RayConfig(address="auto")) == "auto"


def test_a_local_ray_never_joins_another_and_names_its_own_state_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """``ray.init(address="local")`` with our dashboard port and state API address; a later join
    of a cluster from the same process drops what was set for the local one."""
    import ray

    calls: list[dict] = []

    class Ctx:
        dashboard_url = None

    def start_locked() -> bool:
        """Whether another process would wait to start a local Ray now."""
        import fcntl
        import tempfile

        with open(Path(tempfile.gettempdir()) / ray_utils.LOCAL_START_LOCK, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(f, fcntl.LOCK_UN)
            return False

    def fake_init(**kwargs):
        # A local start holds the machine-wide lock while Ray binds its dashboard port (two
        # commands started together once both took 8265); joining a cluster does not.
        kwargs["locked"] = start_locked()
        calls.append(kwargs)
        return Ctx()

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    _unset(monkeypatch, "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER",
           console.VERBOSE_ENV)
    ray_utils.init_ray(RayConfig(num_cpus=2), quiet=True)
    local = calls[-1]
    assert local["address"] == "local" and local["num_cpus"] == 2 and local["locked"]
    assert not start_locked()  # released once Ray is up
    port = local["dashboard_port"]
    assert os.environ["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{port}"
    assert os.environ["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] == "0"
    assert local["runtime_env"] == {"worker_process_setup_hook": console.WORKER_SETUP_HOOK}

    ray_utils.init_ray(RayConfig(num_cpus=2, include_dashboard=False), quiet=True)
    assert "dashboard_port" not in calls[-1]
    dead_end = os.environ["RAY_API_SERVER_ADDRESS"]  # a port nothing listens on: fails fast
    assert dead_end.startswith("http://127.0.0.1:")

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")
    ray_utils.init_ray(RayConfig(), quiet=True)
    assert calls[-1]["address"] == "127.0.0.1:1" and "num_cpus" not in calls[-1]
    assert not calls[-1]["locked"]
    assert "RAY_API_SERVER_ADDRESS" not in os.environ
    assert "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER" not in os.environ


def test_quiet_ray_data_turns_progress_back_on() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ray_utils.quiet_ray_data()
    assert ctx.enable_progress_bars


# ----------------------------------------------------------------------------- end to end

TINY = ["data.source=synthetic", "data.synthetic.n_users=300", "data.synthetic.n_items=120",
        "data.tail_user_threshold=5", "model.hidden=16", "model.max_len=20", "model.layers=1",
        "train.epochs=2", "train.torch_threads=1", "ray.num_cpus=4", "augment.users=all",
        "augment.max_users=8", "augment.shard_size=4", "augment.num_candidates=10", "augment.ask_items=5",
        "dual.num_pseudo=3", "llm.max_tokens=40", "llm.batch_size=16", "tune.name=tiny",
        "tune.scheduler=fifo", "tune.max_concurrent_trials=1",
        'tune.search={"dual.num_pseudo": {"grid": [2, 3]}}']
NOISE = ("Traceback", "constructor arguments in the object store", "Failed to query Ray Train Controller",
         "multiple active Ray instances", "resource_tracker")


def _ray_start_head(tmp: Path) -> subprocess.Popen[str]:
    """A second, independent Ray on this machine (as another user's `ray start` would be), its
    session under ``tmp`` (short: Ray's socket paths must fit in 107 bytes)."""
    from llmser_ray.ports import pick_port

    ports = {flag: pick_port() for flag in (
        "--port", "--node-manager-port", "--object-manager-port", "--ray-client-server-port",
        "--min-worker-port", "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
        "--metrics-export-port", "--runtime-env-agent-port")}
    ports["--max-worker-port"] = ports["--min-worker-port"] + 20
    cmd = [str(Path(sys.executable).with_name("ray")), "start", "--head", "--block",
           "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--include-dashboard", "false",
           "--temp-dir", str(tmp / "ray"), "--disable-usage-stats"]
    for flag, port in ports.items():
        cmd += [flag, str(port)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _stop(proc: subprocess.Popen[str]) -> None:
    """Stop the Ray this test started, by the processes it started (never `ray stop`)."""
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        procs = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=30)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_green_quickstart_prints_no_traceback_beside_another_ray(tmp_path: Path) -> None:
    """The quickstart's stages end to end (prepare, pretrain, candidates, SIA and ARV with the real
    vLLM engine, a two-trial dual-channel Tune search) on tiny data, as a command, with another
    Ray running on the machine and no RAY_ADDRESS: it must start its own Ray (not join that one),
    Ray Train must find its own state API, and no traceback or known noise reaches the output.
    """
    ray_tmp = Path(tempfile.mkdtemp(prefix="llmser-", dir="/tmp"))
    other = _ray_start_head(ray_tmp)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not list((ray_tmp / "ray").glob("session_*/logs/raylet.out")):
            assert other.poll() is None, other.stderr.read() if other.stderr else ""
            time.sleep(1)
        cmd = [sys.executable, "-m", "llmser_ray", "tune", "-w", str(tmp_path / "w")]
        for s in TINY:
            cmd += ["--set", s]
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", console.VERBOSE_ENV)}
        env["PYTHONUNBUFFERED"] = "1"
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=2200)
    finally:
        _stop(other)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert "report:" in res.stdout
    # Worker output reaches us through Ray's printer, "(Actor pid=N) ..." (console.py filters it).
    # The driver's own core worker writes its C++ lines straight to fd 2, past any Python filter:
    # Ray Data's actor pools started here log the "constructor arguments" line once each.
    noisy = [line for line in log.splitlines() if any(n in line for n in NOISE)
             and not (line.startswith("[") and "constructor arguments in the object store" in line)]
    assert not noisy, "\n".join(noisy)[:4000]
    assert "Total Progress:" in log  # Ray Data's progress is on (a log file: its periodic lines)


def test_streamed_batches_report_progress_when_labelled(ray_local, capsys: pytest.CaptureFixture) -> None:
    import pyarrow as pa

    table = pa.table({"user_id": list(range(10))})
    rows = [b.num_rows for b in ray_utils.iter_plain_batches(ray_utils.from_arrow_blocks(table, 3))]
    assert sum(rows) == 10 and "[" not in capsys.readouterr().out  # unlabelled: silent, as before
    got = list(ray_utils.iter_plain_batches(ray_utils.from_arrow_blocks(table, 3), label="select", total=10))
    assert sum(b.num_rows for b in got) == 10
    assert "[select] done: 10 users in " in capsys.readouterr().out
