"""SASRec epoch time on full Amazon Beauty: a plain PyTorch loop vs Ray Train with one worker.

Both run the same model, batches, optimizer and per-epoch validation (`training.train_epoch`
and `evaluation.rank_targets`) with the same number of torch threads, in this one script, so
the ratio isolates what Ray Train adds (worker process, report, per-epoch checkpoint).

    .venv/bin/python bench/bench_train.py --epochs 4
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from llmser_ray.config import load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.data.prepare import prepare
from llmser_ray.evaluation import metrics_from_ranks, rank_targets
from llmser_ray.models import build_model
from llmser_ray.training import LossModule, train, train_epoch, training_sequences

BEAUTY = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon_beauty_2014_5core"


def plain_loop(cfg, epochs: int) -> list[float]:
    ds = load_dataset(cfg.workdir_path / "dataset")
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model, ds.num_items)
    wrapped = LossModule(model)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    seqs = [s for s in training_sequences(ds, False) if len(s) >= 2]
    val_in, val_t = ds.split("valid")
    gen = torch.Generator().manual_seed(0)
    times = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        order = np.random.default_rng(cfg.train.seed + epoch).permutation(len(seqs))
        loss = train_epoch(wrapped, opt, seqs, order, cfg, "cpu", gen)
        ranks = rank_targets(model, val_in, val_t, cfg.eval, ds.num_items)
        m = metrics_from_ranks(ranks, cfg.eval.ks)["overall"]
        times.append(time.perf_counter() - t0)
        print(f"  plain epoch {epoch}: {times[-1]:.2f}s loss {loss:.4f} ndcg@10 {m['ndcg@10']:.4f}")
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="runs/bench-beauty")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = [f"workdir={Path(args.workdir).resolve()}", "data.source=s3rec",
            f"data.path={BEAUTY / 'Beauty.txt'}", f"data.item_path={BEAUTY / 'items.jsonl'}",
            f"train.epochs={args.epochs}", f"train.patience={args.epochs + 1}",
            f"train.cpus_per_worker={args.threads}", f"train.torch_threads={args.threads}",
            "ray.include_dashboard=false"]
    cfg = load_config(None, base)
    prepare(cfg)

    print(f"plain PyTorch loop, {args.threads} threads")
    plain = plain_loop(cfg, args.epochs)

    print("Ray Train, 1 worker (TorchTrainer)")
    with tempfile.TemporaryDirectory() as tmp:
        rcfg = load_config(None, [*base, f"workdir={tmp}"])
        import shutil

        shutil.copytree(cfg.workdir_path / "dataset", Path(tmp) / "dataset")
        t0 = time.perf_counter()
        res = train(rcfg, name="bench", force=True)
        ray_total = time.perf_counter() - t0
        import json

        hist = json.loads((res.model_dir / "metrics.json").read_text())["history"]
    walls = [h["wall_time"] for h in hist]
    ray_epoch = [b - a for a, b in zip(walls, walls[1:], strict=False)]  # includes report + checkpoint
    ray_inner = [h["epoch_s"] for h in hist]

    # The first epoch of each warms caches; compare steady state (epochs 2..n).
    p = statistics.median(plain[1:])
    r = statistics.median(ray_epoch)
    print("\n== SASRec on Beauty (22,363 users, 12,101 items), hidden 64, 2 layers, max_len 200")
    print(f"plain PyTorch epoch (train + validation), median: {p:.2f} s")
    print(f"Ray Train epoch incl. report + checkpoint, median: {r:.2f} s "
          f"(inside the worker: {statistics.median(ray_inner[1:]):.2f} s)")
    print(f"ratio Ray / plain (steady state): {r / p:.3f}x   target <= 1.15x")
    print(f"Ray Train wall for {args.epochs} epochs incl. start-up and test eval: {ray_total:.1f} s "
          f"vs plain {sum(plain):.1f} s ({ray_total / sum(plain):.3f}x)")


if __name__ == "__main__":
    main()
