"""Item embedding throughput on all Amazon Beauty titles (all-MiniLM-L6-v2, CPU).

Two figures: the ``Embedder`` in this process (model loaded once, the pure encode rate), and the
``embed`` stage end to end through Ray Data's actor pool (actor start, model load per actor,
repartition, collection and the atomic write included). The machine may be shared: the load
average is printed with every figure.

    .venv/bin/python bench/bench_embed.py --actors 2 --cpus-per-actor 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from common import beauty_sets, loadavg

from llmser_ray.config import EmbedConfig, load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.ray_utils import loopback_node
from llmser_ray.stages.embed import embed_items
from llmser_ray.stages.prepare import prepare
from llmser_ray.text.embed import Embedder


def load() -> str:
    return f"load {loadavg()}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--cpus-per-actor", type=float, default=1.0)
    ap.add_argument("--workdir", default="runs/bench-beauty")
    args = ap.parse_args()
    base = beauty_sets(args.workdir)
    prepare(load_config(None, base))
    ds = load_dataset(Path(args.workdir).resolve() / "dataset")
    texts = ds.item_text[1:]
    print(f"machine: {os.cpu_count()} cores; {len(texts)} Beauty item texts; {load()}", flush=True)

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    emb = Embedder(EmbedConfig(device="cpu", batch_size=args.batch_size))
    load_s = time.perf_counter() - t0
    emb.encode(texts[:64])  # warm
    t0 = time.perf_counter()
    emb.encode(texts)
    enc_s = time.perf_counter() - t0
    print(f"in process ({args.threads} threads, batch {args.batch_size}): model load {load_s:.1f}s, "
          f"{len(texts) / enc_s:,.0f} items/s ({enc_s:.1f}s); {load()}", flush=True)
    del emb

    import ray

    with loopback_node():  # as the commands start a local Ray: every port on 127.0.0.1
        ray.init(num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "dataset").symlink_to(Path(args.workdir).resolve() / "dataset")
        cfg = load_config(None, [*base, f"workdir={tmp}", f"embed.num_actors={args.actors}",
                                 f"embed.cpus_per_actor={args.cpus_per_actor}",
                                 f"embed.batch_size={args.batch_size}"])
        res = embed_items(cfg, force=True)
    print(f"embed stage (Ray Data, {args.actors} actors x {args.cpus_per_actor} CPU): {res.seconds:.1f}s "
          f"end to end -> {len(texts) / res.seconds:,.0f} items/s; {load()}", flush=True)
    ray.shutdown()


if __name__ == "__main__":
    main()
