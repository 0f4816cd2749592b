"""What the length buckets of `models/base.py::by_length` save: one training step (forward,
backward, Adam) per backbone on real Beauty batches, with and without buckets (forced both
ways, whatever the backbone's default: GRU4Rec turns them off because they cost it time).

The same 30 batches of 128 users (the random order training uses, padded to the batch's
longest sequence as `training.train_epoch` pads them) are run both ways, interleaved over
several repeats. CPU time of this process is reported (one torch thread by default): on a
shared machine it measures the work done, which wall time under a load of 20-60 does not.

    .venv/bin/python bench/bench_buckets.py
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import beauty_sets, loadavg, training_steps

from llmser_ray.config import load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.stages.prepare import prepare

SETTINGS = {"sasrec": [], "gru4rec": [], "bert4rec": ["train.loss=ce", "model.mask_prob=0.6"]}


def measure(base: list[str], backbone: str, extra: list[str], n_batches: int,
            repeats: int) -> dict[str, float]:
    """Median CPU ms per training step, whole batch vs length buckets, and the padded width."""
    cfg = load_config(None, [*base, f"model.backbone={backbone}", *extra])
    ds = load_dataset(cfg.workdir_path / "dataset")
    run = training_steps(cfg, ds, n_batches)
    model, batches, step = run.model, run.batches, run.step
    for b in batches[:3]:
        step(b)
    cpu: dict[str, list[float]] = {"whole": [], "buckets": []}
    for _ in range(repeats):
        for variant in cpu:
            model.bucket_by_length = variant == "buckets"  # False: one call at the full width
            c0 = time.process_time()
            for b in batches:
                step(b)
            cpu[variant].append((time.process_time() - c0) / len(batches) * 1000)
    model.bucket_by_length = type(model).bucket_by_length
    return {"whole": statistics.median(cpu["whole"]), "buckets": statistics.median(cpu["buckets"]),
            "width": statistics.mean(b.shape[1] for b in batches)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="runs/bench-beauty")
    ap.add_argument("--batches", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--backbones", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = beauty_sets(args.workdir)
    prepare(load_config(None, base))
    print(f"load average before {loadavg()}")
    for backbone in args.backbones:
        extra = SETTINGS[backbone]
        r = measure(base, backbone, extra, args.batches, args.repeats)
        print(f"{backbone:9s} {' '.join(extra) or 'reference settings':36s} CPU ms per training batch: "
              f"whole batch {r['whole']:7.1f}, length buckets {r['buckets']:7.1f}  "
              f"({r['whole'] / r['buckets']:.2f}x; mean padded width {r['width']:.0f})")
    print(f"load average after {loadavg()}; {args.threads} thread(s)")


if __name__ == "__main__":
    main()
