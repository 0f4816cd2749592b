"""Peak memory of a full Amazon Beauty training run (`llmser-ray train`, reference settings).

Samples every process of the run (the CLI driver and everything it starts: Ray's GCS, raylet,
dashboard and the Train workers) four times a second and reports the peak of the summed PSS
(proportional set size: shared pages counted once, so the sum is what the run really costs)
next to the summed RSS (which double-counts shared libraries, an upper bound).

    .venv/bin/python bench/bench_memory.py --epochs 3

The peak is reached within the first epoch and the test evaluation (nothing accumulates per
epoch but the small history), so a few epochs measure what a full run peaks at. The dashboard
is on, as in a default `llmser-ray train`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

import psutil
from common import BEAUTY
from common import loadavg as load

GIB = 1024**3


def tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def sample(pid: int, stop: threading.Event, peaks: dict[str, float]) -> None:
    while not stop.is_set():
        pss = rss = 0
        for p in tree(pid):
            try:
                info = p.memory_full_info()
                pss += info.pss
                rss += info.rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        peaks["procs"] = max(peaks["procs"], len(tree(pid)))
        peaks["pss"] = max(peaks["pss"], pss)
        peaks["rss"] = max(peaks["rss"], rss)
        time.sleep(0.25)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--workdir", default="runs/bench-memory")
    args = ap.parse_args()
    sets = ["data.source=s3rec", f"data.path={BEAUTY / 'Beauty.txt'}",
            f"data.item_path={BEAUTY / 'items.jsonl'}", f"train.epochs={args.epochs}",
            "ray.include_dashboard=true"]
    base = [sys.executable, "-m", "llmser_ray"]
    flags = ["-w", args.workdir]
    for s in sets:
        flags += ["--set", s]
    subprocess.run([*base, "prepare", *flags], check=True)
    load_before = load()
    for attempt in range(1, 4):
        # Ray gives its raylet a fixed 30 s to register with the GCS; on this shared machine at a
        # load of 50-110 that can run out before training starts. Such a run measured nothing:
        # start again (the peak of the run that completes is the one reported).
        peaks = {"pss": 0.0, "rss": 0.0, "procs": 0.0}
        stop = threading.Event()
        t0 = time.perf_counter()
        proc = subprocess.Popen([*base, "train", *flags, "--force"])
        th = threading.Thread(target=sample, args=(proc.pid, stop, peaks), daemon=True)
        th.start()
        rc = proc.wait()
        stop.set()
        th.join()
        wall = time.perf_counter() - t0
        if rc == 0:
            break
        print(f"train exited with {rc} (attempt {attempt}); retrying", flush=True)
    print(f"\n== peak memory, SASRec on full Beauty, {args.epochs} epochs, {wall:.0f} s, exit {rc}")
    print(f"machine: {os.cpu_count()} logical CPUs, {psutil.virtual_memory().total / GIB:.1f} GiB; "
          f"load average before {load_before}, after {load()}; "
          f"peak processes in the run: {peaks['procs']:.0f}")
    print(f"peak summed PSS: {peaks['pss'] / GIB:.2f} GiB   target <= 4 GiB")
    print(f"peak summed RSS: {peaks['rss'] / GIB:.2f} GiB (upper bound, shared pages counted per process)")
    sys.exit(rc)


if __name__ == "__main__":
    main()
