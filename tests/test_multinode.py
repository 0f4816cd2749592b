"""Multi-node Ray on one machine: the pipeline across nodes, and a node lost mid-training.

``ray.cluster_utils.Cluster`` starts real Ray nodes (a raylet, object store and workers each) on
this machine. The head advertises no CPUs and every worker node exactly one, while a training
worker takes one CPU: so the two DDP workers of ``train.num_workers=2`` must land on two different
nodes, as they would on a real cluster, and killing a node really takes a rank away.

Why these tests look the way they do:
- The cluster keeps its own Ray temp dir (``RAY_TMPDIR``): a Cluster writes its address to
  ``<temp>/ray_current_cluster``, and any plain ``ray.init()`` on the machine would otherwise join
  it. Token authentication is on, as on the clusters in cluster/ (the job API needs the token).
- The first test goes through the job API exactly as ``ray job submit -- llmser-ray ...
  --address auto`` does on a real cluster (cluster/, docs/CLUSTER.md).
- The node-loss test first adds a spare node (the capacity an autoscaler would bring; a
  Cluster cannot start nodes from a non-main thread, where the kill happens), then kills the
  node of a live training worker with SIGKILL (no graceful shutdown) and checks from the epoch
  records that the run resumed from the checkpoint Ray had committed: epochs before the kill are
  not recomputed, none is skipped or repeated in the history.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmser_ray.config import TrainConfig, load_config
from llmser_ray.ports import pick_port

pytestmark = pytest.mark.slow

SMALL = [
    "data.source=synthetic", "data.synthetic.n_users=3000", "data.synthetic.n_items=500",
    "data.tail_user_threshold=6", "model.hidden=32", "model.max_len=30", "model.dropout=0.2",
    "train.batch_size=256", "train.num_workers=2", "train.cpus_per_worker=1", "train.torch_threads=1",
    "train.patience=50", "semantic.enabled=false",
]
WORKER_NODES = 2


class MultiNode:
    """A running Cluster plus what the tests need to find and kill its nodes."""

    def __init__(self, cluster: Any, dashboard: str, temp: Path) -> None:
        self.cluster = cluster
        self.dashboard = dashboard
        self.temp = temp

    def worker_nodes(self) -> list[Any]:
        return list(self.cluster.worker_nodes)

    def add_worker(self) -> Any:
        return self.cluster.add_node(num_cpus=1)


@pytest.fixture(scope="module")
def multinode() -> Iterator[MultiNode]:
    import ray
    from ray._private.authentication.authentication_token_setup import (
        enable_token_auth_by_default,
        ensure_token_if_auth_enabled,
    )
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # Short: Ray's Unix socket paths live under it (107-character limit).
    temp = Path(tempfile.mkdtemp(prefix="llmser-mn-", dir="/tmp"))
    port = pick_port()
    # Token authentication exactly as a local ray.init() of Ray 2.60 sets it up (RAY_AUTH_MODE=token
    # for this process and the nodes it starts, the token in ~/.ray/auth_token); a Cluster does not
    # do it by itself.
    enable_token_auth_by_default()
    ensure_token_if_auth_enabled(None, create_token_if_missing=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_TMPDIR", str(temp))
        mp.setenv("RAY_DEDUP_LOGS", "1")
        # Free ports for the dashboard and the head's dashboard agent (the job API goes through
        # it): the defaults (8265, 52365) may belong to another Ray on this machine.
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
            "dashboard_port": port, "dashboard_agent_listen_port": pick_port()})
        try:
            for _ in range(WORKER_NODES):
                cluster.add_node(num_cpus=1)
            cluster.wait_for_nodes()
            ray.init(address=cluster.address)
            yield MultiNode(cluster, f"http://127.0.0.1:{port}", temp)
        finally:
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(temp, ignore_errors=True)


def _train_workers(job_id: str | None = None) -> list[Any]:
    """Ray Train worker actors (alive and dead) as the state API reports them."""
    from ray.util.state import list_actors

    filters: list[Any] = [("class_name", "=", "RayTrainWorker")]
    if job_id:
        filters.append(("job_id", "=", job_id))
    return list_actors(filters=filters, detail=True, limit=1000)


def _submit(client: Any, entrypoint: str, wait_s: float = 300) -> str:
    """Submit, waiting for the head's job agent: right after a cluster starts the dashboard may
    answer "No available agent to submit job, please try again later" (`ray job submit` too)."""
    deadline = time.time() + wait_s
    while True:
        try:
            return str(client.submit_job(entrypoint=entrypoint))
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(2)


def test_job_runs_the_pipeline_across_nodes(multinode: MultiNode) -> None:
    """`ray job submit -- llmser-ray prepare ... && llmser-ray train --address auto ...`."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    workdir = multinode.temp / "job"
    sets = " ".join(f"--set {a}" for a in [f"workdir={workdir}", *SMALL, "train.epochs=2"])
    cli = f"{sys.executable} -m llmser_ray"
    entrypoint = f"{cli} prepare {sets} && {cli} train --address auto {sets}"
    client = JobSubmissionClient(multinode.dashboard)
    sub = _submit(client, entrypoint)
    deadline = time.time() + 480
    status = client.get_job_status(sub)
    while not status.is_terminal() and time.time() < deadline:
        time.sleep(2)
        status = client.get_job_status(sub)
    logs = client.get_job_logs(sub)
    assert status == JobStatus.SUCCEEDED, f"job {status}:\n{logs[-4000:]}"

    metrics = json.loads((workdir / "models" / "sasrec" / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == [1, 2]
    assert metrics["test"]["full"]["overall"]["n"] > 0

    job_id = client.get_job_info(sub).job_id
    workers = _train_workers(job_id)
    nodes = {a.node_id for a in workers}
    worker_node_ids = {n.node_id for n in multinode.worker_nodes()}
    assert len(workers) == 2, [(a.actor_id, a.node_id, a.state) for a in workers]
    assert len(nodes) == 2 and nodes <= worker_node_ids, (
        f"the two DDP workers should run on two worker nodes, got {nodes}")


def _committed_epoch(run_dir: Path) -> int:
    """The epoch of the newest checkpoint Ray Train has registered (0: none yet)."""
    snap = run_dir / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snap.read_text()).get("latest_checkpoint_result") or {}
    except (FileNotFoundError, json.JSONDecodeError):  # not written yet, or being rewritten
        return 0
    return int(latest.get("metrics", {}).get("epoch", 0))


def test_node_loss_during_training_resumes_from_last_checkpoint(multinode: MultiNode) -> None:
    import ray

    from llmser_ray.stages.prepare import prepare
    from llmser_ray.stages.train import train

    if "max_failures" not in TrainConfig.model_fields:
        pytest.fail("train.max_failures does not exist: stages/train.py must pass "
                    "ray.train.FailureConfig(max_failures=cfg.train.max_failures) to RunConfig "
                    "for a run to survive a lost node (without it Ray Train fails the run at once)")

    epochs = 10
    workdir = multinode.temp / "nodeloss"
    cfg = load_config(None, [f"workdir={workdir}", *SMALL, f"train.epochs={epochs}",
                             "train.max_failures=2", f"ray.address={multinode.cluster.address}"])
    prepare(cfg)
    # Capacity for the restarted worker group once a node is gone.
    multinode.add_worker()
    multinode.cluster.wait_for_nodes()
    storage = workdir / "models" / "sasrec" / "ray"
    killed: dict[str, Any] = {}

    def kill_a_training_node() -> None:
        try:
            deadline = time.time() + 420
            while time.time() < deadline:
                runs = list(storage.glob("run-*"))
                if runs and _committed_epoch(runs[0]) >= 2:
                    break
                time.sleep(0.2)
            else:
                killed["error"] = "no committed checkpoint of epoch 2 within the deadline"
                return
            killed["committed"] = _committed_epoch(runs[0])
            alive = {a.node_id for a in _train_workers() if a.state == "ALIVE"}
            victim = next((n for n in multinode.worker_nodes() if n.node_id in alive), None)
            if victim is None:
                killed["error"] = f"no live training worker on a worker node ({alive})"
                return
            killed["node"] = victim.node_id
            killed["time"] = time.time()
            multinode.cluster.remove_node(victim, allow_graceful=False)
        except Exception as e:  # surfaced by the assertions below
            killed["error"] = repr(e)

    killer = threading.Thread(target=kill_a_training_node, daemon=True)
    killer.start()
    res = train(cfg)
    killer.join(timeout=60)
    assert "error" not in killed, killed.get("error")
    assert "time" in killed, "the node was never killed"

    history = json.loads((res.model_dir / "metrics.json").read_text())["history"]
    epochs_seen = [h["epoch"] for h in history]
    assert epochs_seen == list(range(1, epochs + 1)), f"lost or repeated epochs: {epochs_seen}"
    before = [h["epoch"] for h in history if h["wall_time"] < killed["time"]]
    after = [h["epoch"] for h in history if h["wall_time"] >= killed["time"]]
    # Resumed from a checkpoint, not from scratch, and not older than what Ray had committed.
    assert before == list(range(1, len(before) + 1)) and len(before) >= killed["committed"], (
        f"kept {before}, committed {killed['committed']} at the kill")
    assert after and after[0] == len(before) + 1, f"the kill came after training ended: {after}"
    # The restart happened inside this one run: a second worker group of this driver's job.
    mine = _train_workers(ray.get_runtime_context().get_job_id())
    assert killed["node"] in {a.node_id for a in mine}
    assert len(mine) >= 4, [(a.node_id, a.state) for a in mine]


def _vllm_actor_pids() -> set[int]:
    """Processes of the vLLM engine actors (every node of the Cluster runs on this machine)."""
    import psutil

    pids = set()
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "MapBatches(VLLMBatch)" in " ".join(p.info["cmdline"] or []):
                pids.add(p.pid)
        except psutil.Error:
            continue
    return pids


def test_killed_augmentation_actor_loses_no_users(multinode: MultiNode) -> None:
    """SIGKILL the vLLM engine actor mid-SIA on a worker node: Ray restarts it, its batch is
    retried, and every chosen user ends with exactly one answered row."""
    import os
    import signal

    import pyarrow.parquet as pq

    from llmser_ray.stages.prepare import prepare
    from llmser_ray.stages.pretrain import pretrain
    from llmser_ray.stages.select import select_items as augment

    workdir = multinode.temp / "augkill"
    users = 24
    cfg = load_config(None, [
        f"workdir={workdir}", *SMALL, "train.num_workers=1", "train.epochs=2",
        f"ray.address={multinode.cluster.address}", f"augment.max_users={users}",
        "augment.shard_size=2", "augment.num_candidates=10", "augment.ask_items=5", "dual.num_pseudo=5",
        "augment.selector=generate",  # the LLM selector: its engine is what this test kills
        "augment.scorer_cpus=0.25", "llm.batch_size=2", "llm.max_tokens=40", "llm.cpus_per_engine=0.5"])
    # A node with two CPUs: Ray Data's own tasks (repartition) take a whole CPU, which the
    # one-CPU nodes cannot offer next to the fractional stage actors. Real nodes have more.
    multinode.cluster.add_node(num_cpus=2)
    multinode.cluster.wait_for_nodes()
    prepare(cfg)
    pretrain(cfg)
    before = _vllm_actor_pids()
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["res"] = augment(cfg)
        except BaseException as e:  # noqa: BLE001 - reported by the assertions below
            result["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 600
    while not list((workdir / "llm_cache").glob("part-*.jsonl")):  # the engine answers
        assert time.monotonic() < deadline and worker.is_alive(), result
        time.sleep(0.2)
    victims = _vllm_actor_pids() - before
    assert len(victims) == 1, victims
    victim = victims.pop()
    os.kill(victim, signal.SIGKILL)
    worker.join(timeout=900)
    assert not worker.is_alive() and "error" not in result, result.get("error")
    table = pq.read_table(result["res"].path / "augmented.parquet").to_pandas()
    assert len(table) == users and table["user_id"].is_unique
    assert (table["status"] != "error").all(), table[table["status"] == "error"]["error"].tolist()
    writers = {int(p.name.split("-")[2]) for p in (workdir / "llm_cache").glob("part-*.jsonl")}
    assert victim in writers and len(writers) >= 2, writers  # the replacement answered the rest
