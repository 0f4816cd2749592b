"""SIA and ARV on Amazon Beauty with the default local LLM: hallucination rate with and without
constrained decoding, and users/s of each stage on this machine (issue 4, item 7).

Steps, all through the real stages (Ray Data, the vLLM-CPU engine pool, FAISS actors):
1. ``pretrain``: the forward and reverse SASRec on full Beauty (capped at ``--pretrain-epochs``:
   the candidate quality hardly changes what is measured here, and 200 epochs take hours on CPU);
2. ``augment`` (SIA) for a seeded sample of ``--users`` long-tail users, once per grounding mode:
   ``constrained`` (vLLM structured outputs: a JSON list of candidate numbers) and ``lines``
   (free text, one title per line, grounded by embedding nearest neighbour above
   ``augment.min_similarity``); optionally the reference's ``whole_response`` matching;
3. ``validate`` (ARV) on the constrained augmentation.

Constrained runs last, so the workdir ends with the method's default augmentation and its ARV
weights: ``bench/quality_ablation.py`` with the same ``--workdir``, ``--epochs``, ``--max-users``
reuses them (and the pretrained models) instead of asking the LLM again.

``--engines 1,2,2:nobind,1@2`` measures instead the constrained SIA's users/s per vLLM engine
layout, side by side (the first arm is the baseline of the ratios): ``2`` = two engines, each bound
to its own core (``llm.cpu_bind``, the default); ``2:nobind`` = two engines left to vLLM's own
binding; ``1@2`` = one engine with ``llm.cpus_per_engine=2`` (its threads on both cores).

Every timed stage runs with ``force`` and the LLM reply cache off, so a rerun measures again
instead of reading cached replies. Tokens per user are printed too: they are what the GPU
projection in docs/AUGMENTATION.md scales.

    .venv/bin/python bench/bench_augment.py --users 400 --out docs/bench_augment.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from common import BEAUTY, beauty_sets, loadavg


def config(args: argparse.Namespace, extra: list[str]) -> Any:
    from llmser_ray.config import load_config

    return load_config(None, [
        *beauty_sets(args.workdir, args.data),
        "data.tail_user_threshold=9", "model.max_len=50", f"train.epochs={args.pretrain_epochs}",
        "train.torch_threads=1", f"augment.max_users={args.users}", "augment.seed=0",
        "llm.cache=false", *extra])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/bench-augment")
    ap.add_argument("--data", type=Path, default=BEAUTY)
    ap.add_argument("--users", type=int, default=400, help="seeded sample of tail users")
    ap.add_argument("--pretrain-epochs", type=int, default=30)
    ap.add_argument("--modes", default="lines,constrained",
                    help="grounding modes to compare (constrained, lines, whole_response)")
    ap.add_argument("--engines", default=None,
                    help="instead: constrained SIA users/s per engine layout, e.g. 1,2,2:nobind")
    ap.add_argument("--out", type=Path, default=None, help="also write the figures as JSON")
    args = ap.parse_args()

    from llmser_ray.stages.prepare import prepare
    from llmser_ray.stages.pretrain import pretrain
    from llmser_ray.stages.reliability import score_reliability as validate
    from llmser_ray.stages.select import select_items as augment

    base = config(args, [])
    print(f"machine: {platform.machine()}, {os.cpu_count()} logical CPUs, "
          f"Python {platform.python_version()}; LLM {base.llm.model} ({base.llm.backend}), "
          f"{args.users} sampled tail users")
    t0 = time.perf_counter()
    counts = prepare(base).counts
    pre = pretrain(base)
    print(f"prepare + pretrain (cached after the first run): {time.perf_counter() - t0:.0f} s; "
          f"forward test ndcg@10 {pre.forward.test['full']['overall']['ndcg@10']:.4f}; load {loadavg()}")

    if args.engines:
        engine_layouts(args, counts, base.llm.model)
        return
    figures: dict[str, Any] = {"users_sampled": args.users, "dataset": counts, "llm": base.llm.model,
                               "pretrain_epochs": args.pretrain_epochs, "sia": {}, "arv": None}
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        cfg = config(args, [f"augment.grounding={mode}"])
        before = loadavg()
        res = augment(cfg, force=True)
        s = res.summary
        n = max(int(s["users_processed_now"]), 1)
        row = {"users": s["users"], "users_per_s": s["users_per_s"] if "users_per_s" in s
               else n / s["seconds"], "seconds": s["seconds"],
               "hallucination_rate": s["hallucination_rate"], "duplicate_rate": s["duplicate_rate"],
               "positional_rate": s["positional_rate"], "status": s["status"],
               "mean_pseudo_len": s.get("mean_pseudo_len"),
               "prompt_tokens_per_user": s["prompt_tokens"] / n,
               "completion_tokens_per_user": s["completion_tokens"] / n,
               "load_before": before, "load_after": loadavg()}
        figures["sia"][mode] = row
        print(f"SIA {mode:>14}: {row['users_per_s']:.2f} users/s ({s['seconds']:.0f} s), hallucination "
              f"{row['hallucination_rate']:.3f}, duplicates {row['duplicate_rate']:.3f}, positional "
              f"{row['positional_rate']:.2f}, tokens/user {row['prompt_tokens_per_user']:.0f} in + "
              f"{row['completion_tokens_per_user']:.0f} out; status {row['status']}; "
              f"load {before} -> {loadavg()}")
        if mode == "constrained":
            before = loadavg()
            v = validate(cfg, force=True).summary
            arv = {k: v.get(k) for k in ("users", "users_per_s", "seconds", "r_u", "w_u_mean", "hit_rate",
                                         "top_position_share", "status")}
            arv.update(load_before=before, load_after=loadavg())
            figures["arv"] = arv
            print(f"ARV (constrained): {arv['users_per_s']:.2f} users/s ({arv['seconds']:.0f} s), "
                  f"r_u {arv['r_u']}, hit rate {arv['hit_rate']:.3f}, "
                  f"top-position share {arv['top_position_share']:.2f}; "
                  f"load {before} -> {loadavg()}")
    if args.out:
        args.out.write_text(json.dumps(figures, indent=2, default=str) + "\n")
        print(f"figures: {args.out}")


def engine_layouts(args: argparse.Namespace, counts: dict[str, Any], llm: str) -> None:
    """Constrained SIA once per engine layout on the same users, engine start included."""
    from llmser_ray.stages.select import select_items as augment

    rows = []
    for arm in [a.strip() for a in args.engines.split(",") if a.strip()]:
        layout, _, mode = arm.partition(":")
        n, _, cpus = layout.partition("@")
        cfg = config(args, ["augment.grounding=constrained", f"llm.num_engines={int(n)}",
                            f"llm.cpus_per_engine={float(cpus or 1)}", f"llm.cpu_bind={mode != 'nobind'}"])
        before = loadavg()
        s = augment(cfg, force=True).summary
        row = {"arm": arm, "engines": int(n), "cpus_per_engine": cfg.llm.cpus_per_engine,
               "cpu_bind": mode != "nobind", "users": s["users"],
               "seconds": s["seconds"], "users_per_s": s["users_per_s"], "status": s["status"],
               "load_before": before, "load_after": loadavg()}
        row["ratio"] = row["users_per_s"] / rows[0]["users_per_s"] if rows else 1.0
        rows.append(row)
        print(f"SIA constrained, engines {arm:>9}: {row['users_per_s']:.2f} users/s ({s['seconds']:.0f} s, "
              f"engine start included), x{row['ratio']:.2f} of {rows[0]['arm']}; status {s['status']}; "
              f"load {before} -> {loadavg()}", flush=True)
    if args.out:
        args.out.write_text(json.dumps({"users_sampled": args.users, "dataset": counts, "llm": llm,
                                        "engine_layouts": rows}, indent=2, default=str) + "\n")
        print(f"figures: {args.out}")


if __name__ == "__main__":
    main()
