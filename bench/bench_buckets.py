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
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from llmser_ray.config import load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.data.prepare import prepare
from llmser_ray.models import build_model
from llmser_ray.training import LossModule, _batch_tensor, training_sequences

BEAUTY = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon_beauty_2014_5core"
SETTINGS = {"sasrec": [], "gru4rec": [], "bert4rec": ["train.loss=ce", "model.mask_prob=0.6"]}


def measure(base: list[str], backbone: str, extra: list[str], n_batches: int,
            repeats: int) -> dict[str, float]:
    """Median CPU ms per training step, whole batch vs length buckets, and the padded width."""
    cfg = load_config(None, [*base, f"model.backbone={backbone}", *extra])
    ds = load_dataset(cfg.workdir_path / "dataset")
    torch.manual_seed(0)
    model = build_model(cfg.model, ds.num_items)
    wrapped = LossModule(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    seqs = [s for s in training_sequences(ds, False) if len(s) >= 2]
    order = np.random.default_rng(1).permutation(len(seqs))
    bs = cfg.train.batch_size
    batches = [_batch_tensor([seqs[i] for i in order[s:s + bs]], cfg.model.max_len)
               for s in range(0, bs * n_batches, bs)]
    gen = torch.Generator().manual_seed(0)

    def step(batch: torch.Tensor) -> None:
        loss = wrapped(batch, cfg.train.loss, cfg.train.num_negatives, gen).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

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
    base = [f"workdir={Path(args.workdir).resolve()}", "data.source=s3rec",
            f"data.path={BEAUTY / 'Beauty.txt'}", f"data.item_path={BEAUTY / 'items.jsonl'}"]
    prepare(load_config(None, base))
    print(f"load average before {'/'.join(f'{x:.1f}' for x in os.getloadavg())}")
    for backbone in args.backbones:
        extra = SETTINGS[backbone]
        r = measure(base, backbone, extra, args.batches, args.repeats)
        print(f"{backbone:9s} {' '.join(extra) or 'reference settings':36s} CPU ms per training batch: "
              f"whole batch {r['whole']:7.1f}, length buckets {r['buckets']:7.1f}  "
              f"({r['whole'] / r['buckets']:.2f}x; mean padded width {r['width']:.0f})")
    print(f"load average after {'/'.join(f'{x:.1f}' for x in os.getloadavg())}; {args.threads} thread(s)")


if __name__ == "__main__":
    main()
