"""Ray Serve vs a bare FastAPI/uvicorn process (the floor): throughput and p50/p99 latency.

Both servers run the same API code and the same trained model (``serving.bare_app`` is the
Serve deployment's FastAPI app without Ray: one forward pass per request, no batching). The
load comes from a second process (this script with ``--role load``, aiohttp) on 127.0.0.1, and
each server is measured alone, one after the other, in this one script:

- ``c1``: one request at a time (the unloaded latency floor);
- ``rate R``: open loop, R requests/s for ``--duration`` seconds; latency counts from each
  request's *scheduled* send time, so a server that falls behind is charged for the queue it
  builds (no coordinated omission);
- ``closed C``: C concurrent clients back to back (the maximum throughput).

Requests mix known users and ad-hoc histories of 3-10 item ids, k=10. A last pair of runs
measures the pseudo-prior candidate path (a 2-item history with ``pseudo`` "off" vs "on").
Ray Serve is measured once per ``--ingress`` (default both: ``haproxy``, Serve's HAProxy +
direct-ingress mode, and ``proxy``, its classic Python proxy), each on a fresh local Ray
because Serve reads its ingress flags when Ray starts.

    .venv/bin/python bench/bench_serve.py -w runs/beauty --out docs/bench_serve.json

The machine's load average is recorded before and after each run: on a shared machine the
figures are upper bounds of what the code costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmser_ray.ports import pick_port

SEED = 1234


# ----------------------------------------------------------------------------- load generator


def request_bodies(n: int, num_users: int, num_items: int, kind: str,
                   rng: np.random.Generator) -> list[bytes]:
    out = []
    for i in range(n):
        if kind == "mix" and i % 2 == 0:
            body: dict[str, Any] = {"user_id": int(rng.integers(1, num_users + 1)), "k": 10}
        elif kind == "mix":
            size = int(rng.integers(3, 11))
            body = {"item_ids": rng.integers(1, num_items + 1, size=size).tolist(), "k": 10}
        else:  # short2-on / short2-off: the pseudo-prior candidate path and its baseline
            body = {"item_ids": rng.integers(1, num_items + 1, size=2).tolist(), "k": 10,
                    "pseudo": "on" if kind.endswith("on") else "off"}
        out.append(json.dumps(body).encode())
    return out


async def _run_load(url: str, mode: str, level: float, duration: float,
                    bodies: list[bytes]) -> dict[str, Any]:
    import aiohttp

    latencies: list[float] = []
    errors: dict[str, int] = {}
    batch_sizes: list[int] = []
    headers = {"content-type": "application/json"}
    conn = aiohttp.TCPConnector(limit=1024 if mode == "rate" else int(level), force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:

        async def one(body: bytes, start: float) -> None:
            try:
                async with session.post(f"{url}/recommend", data=body, headers=headers) as r:
                    await r.read()
                    if r.status != 200:
                        errors[str(r.status)] = errors.get(str(r.status), 0) + 1
                        return
                    batch_sizes.append(int(r.headers.get("x-batch-size", "1")))
            except Exception as e:  # a failed request is counted, not fatal
                errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
                return
            latencies.append(time.perf_counter() - start)

        t0 = time.perf_counter()
        if mode == "rate":
            tasks = []
            n = int(level * duration)
            for i in range(n):
                scheduled = t0 + i / level
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(bodies[i % len(bodies)], scheduled)))
            await asyncio.gather(*tasks)
        else:
            counter = iter(range(10**9))

            async def client() -> None:
                while time.perf_counter() - t0 < duration:
                    i = next(counter)
                    await one(bodies[i % len(bodies)], time.perf_counter())

            await asyncio.gather(*[client() for _ in range(int(level))])
        wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    cpu = time.process_time()
    return {"mode": mode, "level": level, "ok": int(len(lat)), "errors": errors, "wall_s": round(wall, 2),
            "throughput_rps": round(len(lat) / wall, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2) if len(lat) else None,
            "p99_ms": round(float(np.percentile(lat, 99)), 2) if len(lat) else None,
            "mean_batch": round(float(np.mean(batch_sizes)), 2) if batch_sizes else None,
            "loadgen_cpu_ms_per_request": round(cpu * 1000 / max(len(lat), 1), 3)}


def load_role(args: argparse.Namespace) -> None:
    spec = json.loads(args.spec)
    rng = np.random.default_rng(SEED)
    bodies = request_bodies(4096, spec["num_users"], spec["num_items"], spec["kind"], rng)
    res = asyncio.run(_run_load(spec["url"], spec["mode"], spec["level"], spec["duration"], bodies))
    print(json.dumps(res))


def run_load(url: str, mode: str, level: float, duration: float, kind: str,
             info: dict[str, int]) -> dict[str, Any]:
    """One measurement from a separate process, with the load average around it."""
    spec = {"url": url, "mode": mode, "level": level, "duration": duration, "kind": kind, **info}
    before = os.getloadavg()
    out = subprocess.run([sys.executable, __file__, "--role", "load", "--spec", json.dumps(spec)],
                         capture_output=True, text=True, check=True, timeout=duration * 4 + 120)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res.update(kind=kind, loadavg_before=[round(x, 2) for x in before],
               loadavg_after=[round(x, 2) for x in os.getloadavg()])
    return res


# ----------------------------------------------------------------------------- servers


def bare_role(args: argparse.Namespace) -> None:
    import torch
    import uvicorn

    from llmser_ray.config import load_config
    from llmser_ray.serving import bare_app

    cfg = load_config(args.config, [f"workdir={args.workdir}", *args.set])
    torch.set_num_threads(max(1, math.floor(cfg.serve.cpus_per_replica)))  # as a replica does
    uvicorn.run(bare_app(cfg), host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


def wait_up(url: str, timeout: float = 300) -> dict[str, Any]:
    import urllib.request

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                return json.loads(r.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    import psutil

    out = {}
    for role, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[role] = t.user + t.system
        except psutil.Error:
            out[role] = float("nan")
    return out


def measure(name: str, url: str, args: argparse.Namespace, info: dict[str, int],
            pids: dict[str, int]) -> list[dict[str, Any]]:
    """Each run's latency and throughput, and the CPU milliseconds each server process spent per
    answered request: on a shared machine the wall-clock figures inflate with the load, the CPU
    cost per request much less, and it bounds the throughput of dedicated cores."""
    rows = []
    run_load(url, "closed", 8, 5, "mix", info)  # warm-up (JIT-free, but caches, pools, connections)
    plan = [("closed", 1, "mix"), *[("rate", r, "mix") for r in args.rates],
            *[("closed", c, "mix") for c in args.closed]]
    if info.get("reverse_model"):
        plan += [("closed", 1, "short2-off"), ("closed", 1, "short2-on"),
                 ("rate", 100, "short2-off"), ("rate", 100, "short2-on")]
    for mode, level, kind in plan:
        seconds = args.duration / 2 if mode == "closed" and level == 1 else args.duration
        before = cpu_seconds(pids)
        res = run_load(url, mode, level, seconds, kind, info)
        after = cpu_seconds(pids)
        n = max(res["ok"], 1)
        res["server"] = name
        res["cpu_ms_per_request"] = {k: round((after[k] - before[k]) * 1000 / n, 3) for k in pids}
        res["server_cpu_ms_per_request"] = round(sum(res["cpu_ms_per_request"].values()), 3)
        rows.append(res)
        print(f"  {name:13s} {kind:10s} {mode:6s} {level:>5}: {res['throughput_rps']:7.1f} req/s "
              f"p50 {res['p50_ms']} ms p99 {res['p99_ms']} ms batch {res['mean_batch']} "
              f"cpu/req {res['cpu_ms_per_request']} errors {res['errors'] or 0} "
              f"load {res['loadavg_before'][0]}", flush=True)
    return rows


def in_replica_cost(cfg: Any) -> dict[str, float]:
    """CPU milliseconds of model work per request, measured in-process (no HTTP; CPU time, so a
    busy machine inflates it little): what batching saves and what the candidate path adds."""
    import torch

    from llmser_ray.serving import Query, ServingState

    torch.set_num_threads(max(1, math.floor(cfg.serve.cpus_per_replica)))  # as a replica does
    state = ServingState(cfg)
    rng = np.random.default_rng(SEED)
    hist = [rng.integers(1, state.num_items + 1, size=int(rng.integers(3, 11))) for _ in range(256)]
    qs = [Query(h, 10, h, "item_ids") for h in hist]
    out: dict[str, float] = {}
    for b in (1, 8, 32):
        state.score(qs[:b])
        t0 = time.process_time()
        for i in range(0, 256, b):
            state.score(qs[i:i + b])
        out[f"score_ms_per_request_batch{b}"] = round((time.process_time() - t0) * 1000 / 256, 3)
    if state.reverse is not None:
        for b in (1, 32):
            t0 = time.process_time()
            for i in range(0, 256, b):
                state.candidates([h[:2] for h in hist[i:i + b]])
            out[f"candidates_ms_per_request_batch{b}"] = round((time.process_time() - t0) * 1000 / 256, 3)
    return out


def pseudo_quality(cfg: Any, max_len: int, limit: int) -> dict[str, dict[str, float]]:
    """Does prepending reverse-model candidates help short ad-hoc histories, and in which order?

    Test split of the workdir's dataset (input ``items[:-1]``, target ``items[-1]``), users whose
    input has at most ``max_len`` items, full ranking with the real history masked (as the
    evaluation does). Prefixes are computed exactly as the server does (``ServingState``).
    """
    from llmser_ray.data.dataset import load_dataset
    from llmser_ray.evaluation import metrics_from_ranks, rank_targets
    from llmser_ray.models.checkpoint import load_trained
    from llmser_ray.serving import ServingState

    state = ServingState(cfg)
    ds = load_dataset(cfg.workdir_path / "dataset")
    inputs, targets = ds.split("test")
    keep = [i for i, x in enumerate(inputs) if len(x) <= max_len][:limit]
    hist = [inputs[i] for i in keep]
    tgt = targets[keep]
    cands = []
    for start in range(0, len(hist), 256):
        cands += state.candidates(hist[start:start + 256])
    n = (state._served_dual() or cfg.dual).num_pseudo
    best_last = [state.pseudo_prefix(c) for c in cands]  # the served prefix
    best_first = [c[:n] for c in cands]  # the same items, the other way round (the ablation)
    models = {"served": state.model}
    plain = cfg.workdir_path / "models" / state.backbone
    if state.model_name != state.backbone and (plain / "best" / "model.json").is_file():
        models["plain"] = load_trained(plain)[0]
    out: dict[str, dict[str, float]] = {}
    for name, model in models.items():
        for variant, prefixes in (("none", None), ("best_last", best_last), ("best_first", best_first)):
            seqs = hist if prefixes is None else [np.concatenate([p, h]) for p, h in zip(prefixes, hist,
                                                                                            strict=True)]
            ranks = rank_targets(model, seqs, tgt, cfg.eval, ds.num_items, seen=hist)
            m = metrics_from_ranks(ranks, [10])["overall"]
            out[f"{name}:{variant}"] = {"ndcg@10": round(m["ndcg@10"], 4), "hr@10": round(m["hr@10"], 4),
                                       "users": int(m["n"])}
            print(f"  {name:6s} prefix {variant:10s}: ndcg@10 {m['ndcg@10']:.4f} hr@10 {m['hr@10']:.4f} "
                  f"({int(m['n'])} users)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--role", choices=["main", "load", "bare", "quality"], default="main")
    ap.add_argument("--spec", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)
    ap.add_argument("-w", "--workdir", default="runs/beauty", help="a workdir with a trained model")
    ap.add_argument("-c", "--config", default=None)
    ap.add_argument("--set", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--duration", type=float, default=15.0, help="seconds per run")
    ap.add_argument("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[100.0, 300.0, 500.0])
    ap.add_argument("--closed", type=lambda s: [int(x) for x in s.split(",")], default=[32])
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--serve-env", action="append", default=[],
                    help="KEY=VALUE set before the local Ray starts (Serve tuning flags)")
    ap.add_argument("--skip-bare", action="store_true", help="measure Ray Serve only")
    ap.add_argument("--ingress", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                    default=["haproxy", "proxy"], help="serve.ingress values to measure, in turn")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--quality-max-len", type=int, default=5,
                    help="--role quality: test users with at most this many input items")
    args = ap.parse_args()
    if args.role == "load":
        load_role(args)
        return
    args.workdir = str(Path(args.workdir).resolve())
    if args.role == "bare":
        bare_role(args)
        return
    if args.role == "quality":
        from llmser_ray.config import load_config

        cfg = load_config(args.config, [f"workdir={args.workdir}", *args.set])
        res = pseudo_quality(cfg, args.quality_max_len, 100_000)
        if args.out:
            Path(args.out).write_text(json.dumps(res, indent=2) + "\n")
        return

    import ray
    import torch

    from llmser_ray.config import load_config
    from llmser_ray.serving import serve

    bare_port, serve_port = pick_port(), pick_port()
    cfg = load_config(args.config, [f"workdir={args.workdir}", *args.set, f"serve.port={serve_port}",
                                    f"serve.num_replicas={args.replicas}"])
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "ray": ray.__version__, "shared": True},
        "config": {"serve": cfg.serve.model_dump(mode="json"), "duration_s": args.duration},
        "in_replica": in_replica_cost(cfg),
    }
    print(f"in-replica model cost: {result['in_replica']}", flush=True)

    rows: list[dict[str, Any]] = []
    info: dict[str, int] = {}
    if not args.skip_bare:
        bare = subprocess.Popen([sys.executable, __file__, "--role", "bare", "--port", str(bare_port),
                                 "-w", args.workdir, *(["-c", args.config] if args.config else []),
                                 *sum((["--set", s] for s in args.set), [])])
        try:
            health = wait_up(f"http://127.0.0.1:{bare_port}")
            info = {"num_users": health["num_users"], "num_items": health["num_items"],
                    "reverse_model": int(health["reverse_model"])}
            result["model"] = health["model"]
            print(f"bare uvicorn on 127.0.0.1:{bare_port} ({health['model']})", flush=True)
            rows += measure("bare", f"http://127.0.0.1:{bare_port}", args, info, {"bare": bare.pid})
        finally:
            bare.terminate()
            bare.wait(timeout=30)

    from llmser_ray.serving import serve_process_ids, start_local_serve

    result["serve_env"] = args.serve_env
    for ingress in args.ingress:
        # Serve reads its ingress flags when Ray starts: a fresh local Ray per ingress.
        icfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"ingress": ingress})})
        for kv in args.serve_env:  # extra Serve flags, inherited by every Ray process
            key, _, value = kv.partition("=")
            os.environ[key] = value
        # As `llmser-ray serve` starts its local Ray and Serve (loopback only, robust ports).
        start_local_serve(icfg.model_copy(update={"ray": icfg.ray.model_copy(
            update={"num_cpus": cfg.ray.num_cpus or 4, "include_dashboard": False})}))
        try:
            url = serve(icfg, blocking=False)
            health = wait_up(url)
            info = info or {"num_users": health["num_users"], "num_items": health["num_items"],
                            "reverse_model": int(health["reverse_model"])}
            result["model"] = health["model"]
            pids = serve_process_ids()
            result.setdefault("serve_processes", {})[ingress] = sorted(pids)
            print(f"Ray Serve, ingress {health['ingress']} ({health['model']})", flush=True)
            rows += measure(f"serve-{ingress}", url, args, info, pids)
        finally:
            from ray import serve as ray_serve

            ray_serve.shutdown()
            ray.shutdown()
    result["runs"] = rows
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
