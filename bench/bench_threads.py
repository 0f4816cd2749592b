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
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from llmser_ray.config import load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.data.prepare import prepare
from llmser_ray.evaluation import rank_targets
from llmser_ray.models import build_model
from llmser_ray.training import LossModule, _batch_tensor, training_sequences

BEAUTY = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon_beauty_2014_5core"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/bench-beauty")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--eval-users", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cfg = load_config(None, [f"workdir={Path(args.workdir).resolve()}", "data.source=s3rec",
                             f"data.path={BEAUTY / 'Beauty.txt'}",
                             f"data.item_path={BEAUTY / 'items.jsonl'}"])
    prepare(cfg)
    ds = load_dataset(cfg.workdir_path / "dataset")
    torch.manual_seed(0)
    model = build_model(cfg.model, ds.num_items)
    wrapped = LossModule(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    seqs = [s for s in training_sequences(ds, False) if len(s) >= 2]
    order = np.random.default_rng(1).permutation(len(seqs))
    bs = cfg.train.batch_size
    batches = [_batch_tensor([seqs[i] for i in order[s:s + bs]], cfg.model.max_len)
               for s in range(0, bs * args.batches, bs)]
    gen = torch.Generator().manual_seed(0)
    vi, vt = ds.split("valid")
    vi, vt = vi[:args.eval_users], vt[:args.eval_users]

    def step(batch: torch.Tensor) -> None:
        loss = wrapped(batch, cfg.train.loss, cfg.train.num_negatives, gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    load_before = "/".join(f"{x:.1f}" for x in os.getloadavg())
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
    print(f"load average before {load_before}, after {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
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
