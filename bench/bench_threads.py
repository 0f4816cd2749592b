"""One torch thread vs two on a loaded two-core machine: SASRec training steps and validation.

Why it exists: on the shared two-core machine the other engineers' tests keep the load average
between 20 and 110, and a process with two OpenMP threads then waits at every one of the
thousands of tiny parallel regions per batch for the thread the scheduler has descheduled.
This script measures it (wall time, interleaved, same batches) so the choice of
``train.torch_threads=1`` for the long runs rests on a number, not a guess.

    .venv/bin/python bench/bench_threads.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import beauty_sets, loadavg, training_steps

from llmser_ray.config import load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.evaluation import rank_targets
from llmser_ray.stages.prepare import prepare


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/bench-beauty")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--eval-users", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(None, beauty_sets(args.workdir))
    prepare(cfg)
    ds = load_dataset(cfg.workdir_path / "dataset")
    run = training_steps(cfg, ds, args.batches)
    model, batches, step = run.model, run.batches, run.step
    vi, vt = ds.split("valid")
    vi, vt = vi[:args.eval_users], vt[:args.eval_users]

    load_before = loadavg()
    train_ms: dict[int, list[float]] = {1: [], 2: []}
    eval_s: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.repeats):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            t0 = time.perf_counter()
            for b in batches:
                step(b)
            train_ms[threads].append((time.perf_counter() - t0) / len(batches) * 1000)
            t0 = time.perf_counter()
            rank_targets(model, vi, vt, cfg.eval, ds.num_items)
            eval_s[threads].append(time.perf_counter() - t0)
    print(f"load average before {load_before}, after {loadavg()}")
    tr = {t: statistics.median(v) for t, v in train_ms.items()}
    ev = {t: statistics.median(v) for t, v in eval_s.items()}
    for threads in (1, 2):
        runs = ", ".join(f"{x:.0f}" for x in train_ms[threads])
        print(f"{threads} thread(s): SASRec training step median {tr[threads]:8.1f} ms (runs: {runs}); "
              f"validation of {len(vt)} users median {ev[threads]:.2f} s")
    print(f"two threads / one thread: training {tr[2] / tr[1]:.2f}x, validation {ev[2] / ev[1]:.2f}x "
          "(wall time)")

if __name__ == "__main__":
    main()
