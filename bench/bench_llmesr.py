"""LLM-ESR's training cost on full Amazon Beauty: time per training step of the plain backbone,
the dual view, and the dual view with self-distillation, interleaved in rounds on the same
batches so that drifting load on a shared machine hits all three alike.

A training epoch is ``ceil(users / batch)`` such steps (Beauty: 175 at batch 128) plus one
validation pass; the step ratio is the training-time ratio, and validation is reported apart
(one pass over a sample of users, the same for each model, scaled to all users).

Needs a workdir with ``dataset/``, ``embeddings/`` and, for the distillation arm,
``user_neighbours/`` (``llmser-ray train`` with semantic/distill enabled produces them).

    PYTHONPATH=. python bench/bench_llmesr.py --config /work/runs19/beauty.yaml --steps 40 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch
from common import loadavg

from llmser_ray.config import Config, load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.evaluation import rank_targets
from llmser_ray.models import build_model
from llmser_ray.models.batching import training_batch
from llmser_ray.models.losses import Distillation, Objective
from llmser_ray.stages.train import LossModule, TrainingData, distillation, semantic_table, train_step


def arms(cfg: Config) -> dict[str, Config]:
    on = cfg.semantic.model_copy(update={"enabled": True})
    off = cfg.semantic.model_copy(update={"enabled": False})
    dist = cfg.distill.model_copy(update={"enabled": True})
    nodist = cfg.distill.model_copy(update={"enabled": False})
    return {"plain": cfg.model_copy(update={"semantic": off, "distill": nodist}),
            "dualview": cfg.model_copy(update={"semantic": on, "distill": nodist}),
            "dualview+distill": cfg.model_copy(update={"semantic": on, "distill": dist})}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--valid-users", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    ap.add_argument("--random-neighbours", action="store_true",
                    help="cost only: random neighbours instead of user_neighbours/ (the term's "
                         "cost does not depend on which users they are)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    base = load_config(args.config, args.set)
    ds = load_dataset(base.workdir_path / "dataset")
    data = TrainingData.build(base, ds)
    order = np.random.default_rng(0).permutation(len(data.train_seqs))
    setups = {}
    for name, cfg in arms(base).items():
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg.model, ds.num_items, cfg.semantic, semantic_table(cfg, ds))
        wrapped = LossModule(model).train()
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        if cfg.distill.enabled and args.random_neighbours:
            rng = np.random.default_rng(0)
            nb = torch.from_numpy(rng.integers(1, ds.num_users + 1, (ds.num_users + 1, cfg.distill.k)))
            distill = Distillation(nb, torch.ones(ds.num_users + 1, dtype=torch.bool), cfg.distill.alpha)
        else:
            distill = distillation(cfg, ds)
        setups[name] = (cfg, model, wrapped, opt, distill)
    step_s: dict[str, list[float]] = {n: [] for n in setups}
    valid_s: dict[str, list[float]] = {n: [] for n in setups}
    bs = base.train.batch_size
    vi = np.arange(min(args.valid_users, len(data.val_targets)))
    for r in range(args.rounds):
        start = (r * args.steps * bs) % len(order)
        for name, (cfg, model, wrapped, opt, distill) in setups.items():
            gen = torch.Generator().manual_seed(r)
            t0 = time.perf_counter()
            for s in range(args.steps):
                idx = order[(start + s * bs) % len(order):][:bs]
                batch = training_batch(idx, data.train_seqs, cfg.model.max_len, users=data.users)
                train_step(wrapped, opt, batch, Objective.from_config(cfg.train), gen, distill)
            step_s[name].append((time.perf_counter() - t0) / args.steps)
            t0 = time.perf_counter()
            rank_targets(model, [data.val_inputs[i] for i in vi], data.val_targets[vi], cfg.eval,
                         ds.num_items, seen=[data.val_seen[i] for i in vi])
            valid_s[name].append((time.perf_counter() - t0) * len(data.val_targets) / len(vi))
            wrapped.train()
            print(f"round {r} {name}: {step_s[name][-1] * 1000:.1f} ms/step, "
                  f"validation {valid_s[name][-1]:.1f} s (load {loadavg()})", flush=True)
    steps_per_epoch = -(-len(order) // bs)
    out = {"steps_per_round": args.steps, "random_neighbours": args.random_neighbours,
           "rounds": args.rounds, "threads": args.threads, "steps_per_epoch": steps_per_epoch,
           "arms": {}}
    for name in setups:
        # Round 0 warms caches and allocators; the median of the rest (all if only one round).
        s = statistics.median(step_s[name][1:] or step_s[name])
        v = statistics.median(valid_s[name][1:] or valid_s[name])
        out["arms"][name] = {"ms_per_step": s * 1000, "train_s_per_epoch": s * steps_per_epoch,
                             "valid_s_per_epoch": v, "epoch_s": s * steps_per_epoch + v}
    plain = out["arms"]["plain"]
    for a in out["arms"].values():
        a["train_ratio"] = a["train_s_per_epoch"] / plain["train_s_per_epoch"]
        a["epoch_ratio"] = a["epoch_s"] / plain["epoch_s"]
    print(json.dumps(out, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
