"""Quality of the three backbones on full Amazon Beauty: 3 seeds, full ranking, by user group.

Trains SASRec, GRU4Rec and BERT4Rec with seeds 42, 43, 44 through ``llmser_ray.stages.train.train``
(Ray Train, one worker) into ONE workdir, then aggregates the test metrics of the best
validation epoch (full ranking and the 100-negative protocol) into ``<workdir>/quality.json``
and ``<workdir>/quality.md``: HR@10 and NDCG@10, mean and sample standard deviation over the
seeds, overall and for tail/head users and tail/head items.

Why it is built this way:
- Runs take hours on two cores, so the script is resumable and append-safe: a finished model
  (``models/<backbone>-s<seed>/manifest.json``) is skipped, an interrupted one resumes from its
  last per-epoch Ray Train checkpoint, and the tables are rewritten after every run, so they
  always show what has finished. Seeds form the outer loop: after the first three runs every
  backbone has one seed.
- A finished run is recognised by its recorded config (the values of the model/train/eval
  sections this script sets), not only by ``train()``'s digest, so a new config field with a
  default added later does not silently retrain nine models.

    nohup .venv/bin/python bench/quality_backbones.py > runs/quality-beauty.log 2>&1 &
    # or one process per arm, in parallel, on ONE Ray (two local Rays break Ray Train's cleanup):
    export RAY_AUTH_MODE=token
    RAY_ADDRESS=127.0.0.1:6390 ray start --head --node-ip-address 127.0.0.1 --port 6390 \
        --num-cpus 4 --include-dashboard false
    for b in sasrec bert4rec; do
        nohup .venv/bin/python bench/quality_backbones.py --arms $b --address 127.0.0.1:6390 \
            > runs/quality-$b.log 2>&1 &
    done
    .venv/bin/python bench/quality_backbones.py --estimate       # one timed epoch per backbone
    .venv/bin/python bench/quality_backbones.py --aggregate-only # tables from finished runs
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from common import BEAUTY, beauty_sets, loadavg

GROUPS = ("overall", "tail_user", "head_user", "tail_item", "head_item")
SEEDS = [42, 43, 44]
HEADLINE = ("hr@10", "ndcg@10")

# The arms: a name and its overrides on top of the product's defaults (config.py: full-softmax
# CE, per-position reduction, hidden 64, 2 layers, 1 head, dropout 0.5, max_len 200, batch 128,
# Adam 1e-3, early stop on valid NDCG@10; BERT4Rec masks 60% as published). The model folder
# is <arm>-s<seed>. "sasrec-bce" is the LLMSeR / LLM-ESR papers' setting (BCE, one sampled
# negative), the baseline every figure in docs/ was measured on before issue 17. More arms:
# --arm NAME=key=value,key=value (e.g. a loss or dropout under study).
# "sasrec" and "sasrec-bce" pin the SASRec paper's sizes, the product default until the backbone
# search (docs/RESULTS.md section 1), so they still name the runs docs/quality_beauty.json holds;
# "sasrec-default" is whatever SASRec's defaults are now (config.BACKBONE_DEFAULTS).
SASREC_PAPER = ["model.hidden=64", "model.layers=2", "model.dropout=0.5", "model.max_len=200",
                "train.lr=0.001"]
ARMS: dict[str, list[str]] = {
    "sasrec": ["model.backbone=sasrec", *SASREC_PAPER],
    "gru4rec": ["model.backbone=gru4rec"],
    "bert4rec": ["model.backbone=bert4rec"],
    "sasrec-bce": ["model.backbone=sasrec", *SASREC_PAPER, "train.loss=bce"],
    "sasrec-default": ["model.backbone=sasrec"],
}
BACKBONE_SETTINGS = ARMS  # the name the JSON has always used for this table
BASELINE_NAMES = ("most_popular", "transitions")


def log(text: str) -> None:
    load = loadavg()
    sys.stdout.write(f"[quality {time.strftime('%Y-%m-%d %H:%M:%S')} load {load}] {text}\n")
    sys.stdout.flush()


def base_overrides(args: argparse.Namespace) -> list[str]:
    return [
        *beauty_sets(args.workdir, args.data),
        f"train.epochs={args.epochs}", f"train.torch_threads={args.threads}",
        f"train.cpus_per_worker={args.cpus_per_worker}", "ray.include_dashboard=false",
        "semantic.enabled=false",  # the plain backbones; the dual view is quality_llmesr's arm
        *([f"ray.address={args.address}"] if args.address else []),
    ]


def run_config(args: argparse.Namespace, arm: str, seed: int):
    from llmser_ray.config import load_config

    return load_config(None, [*base_overrides(args), f"train.seed={seed}", *ARMS[arm]])


def _subset_equal(recorded: Any, wanted: Any) -> bool:
    """True when every key both sides have holds the same value (new defaulted keys are ignored)."""
    if isinstance(recorded, dict) and isinstance(wanted, dict):
        return all(_subset_equal(recorded[k], wanted[k]) for k in recorded.keys() & wanted.keys())
    return recorded == wanted


def finished(cfg, name: str) -> dict[str, Any] | None:
    """The metrics of a complete run of this config, or None."""
    out = cfg.workdir_path / "models" / name
    if not (out / "manifest.json").is_file() or not (out / "metrics.json").is_file():
        return None
    metrics = json.loads((out / "metrics.json").read_text())
    want = cfg.model_dump(mode="json")
    same = all(_subset_equal(metrics.get("config", {}).get(s), want[s]) for s in ("model", "train", "eval"))
    return metrics if same else None


def mean_std(values: list[float]) -> tuple[float, float]:
    vals = [v for v in values if not math.isnan(v)]
    if not vals:
        return float("nan"), float("nan")
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else float("nan"))


def aggregate(args: argparse.Namespace) -> dict[str, Any]:
    """Collect every finished run into the JSON summary and the markdown table."""
    summary: dict[str, Any] = {"dataset": str(args.data), "workdir": str(Path(args.workdir).resolve()),
                               "settings": BACKBONE_SETTINGS, "epoch_cap": args.epochs, "backbones": {}}
    for backbone in ARMS:  # every arm, whichever this process trains
        runs = {}
        for seed in sorted(set(SEEDS) | set(args.seeds)):  # every run, whichever this process trains
            m = finished(run_config(args, backbone, seed), f"{backbone}-s{seed}")
            if m is None:
                continue
            runs[seed] = {"best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
                          "train_seconds": sum(h["epoch_s"] for h in m["history"]),
                          "stopped_early": m["epochs_run"] < args.epochs,
                          "valid": m["valid"]["overall"], "test": m["test"],
                          "valid_curve": [h["valid_ndcg@10"] for h in m["history"]],
                          "epoch_seconds": [h["epoch_s"] for h in m["history"]]}
        agg: dict[str, Any] = {}
        for protocol in ("full", "sampled"):
            agg[protocol] = {}
            for group in GROUPS:
                row = {}
                for metric in ("hr@5", "ndcg@5", "hr@10", "ndcg@10", "hr@20", "ndcg@20"):
                    mu, sd = mean_std([r["test"][protocol][group][metric] for r in runs.values()])
                    row[metric] = {"mean": mu, "std": sd}
                row["n"] = next((r["test"][protocol][group]["n"] for r in runs.values()), 0)
                agg[protocol][group] = row
        summary["backbones"][backbone] = {"seeds": sorted(runs), "runs": runs, "test": agg,
                                          "settings": ARMS[backbone]}
    summary["baselines"] = baselines(args)
    summary["time_to_quality"] = time_to_quality(summary, "sasrec-bce")
    out = Path(args.workdir)
    _write_atomic(out / "quality.json", json.dumps(summary, indent=2))
    _write_atomic(out / "quality.md", markdown(summary))
    return summary


def baselines(args: argparse.Namespace) -> dict[str, Any]:
    """Most-popular and item-to-item transitions on the same split (seconds; no seeds)."""
    from llmser_ray.stages.evaluate import evaluate_baseline

    cfg = run_config(args, next(iter(ARMS)), SEEDS[0])
    return {name: evaluate_baseline(cfg, name) for name in BASELINE_NAMES}


def time_to_quality(summary: dict[str, Any], reference: str) -> dict[str, Any]:
    """Per run: the first epoch whose validation NDCG@10 reaches the reference arm's best
    (mean over its seeds), and the wall seconds of training + validation up to it."""
    ref = summary["backbones"].get(reference, {}).get("runs", {})
    if not ref:
        return {}
    target = statistics.fmean(max(r["valid_curve"]) for r in ref.values())
    out: dict[str, Any] = {"reference": reference, "target_valid_ndcg@10": target, "runs": {}}
    for arm, b in summary["backbones"].items():
        for seed, r in b["runs"].items():
            hit = next((i for i, v in enumerate(r["valid_curve"]) if v >= target), None)
            out["runs"][f"{arm}-s{seed}"] = {
                "epoch": None if hit is None else hit + 1,
                "seconds": None if hit is None else sum(r["epoch_seconds"][:hit + 1])}
    return out


def _write_atomic(path: Path, text: str) -> None:
    """Several trainer processes (one per backbone) rewrite the tables: never leave half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cell(stat: dict[str, float]) -> str:
    if math.isnan(stat["mean"]):
        return "n/a"
    sd = "" if math.isnan(stat["std"]) else f" ± {stat['std']:.4f}"
    return f"{stat['mean']:.4f}{sd}"


def markdown(summary: dict[str, Any]) -> str:
    lines = []
    for protocol, title in (("full", "Full ranking (all 12,101 items, history masked)"),
                            ("sampled", "Sampled: 1 positive + 100 uniform unseen negatives")):
        lines += [f"**{title}**: test HR@10 / NDCG@10, mean ± sample std over seeds", ""]
        head = "| backbone | seeds | metric | " + " | ".join(GROUPS) + " |"
        lines += [head, "|" + "---|" * (3 + len(GROUPS))]
        for backbone, b in summary["backbones"].items():
            seeds = ",".join(str(s) for s in b["seeds"]) or "none"
            for metric in HEADLINE:
                cells = " | ".join(_cell(b["test"][protocol][g][metric]) for g in GROUPS)
                lines.append(f"| {backbone} | {seeds} | {metric.upper()} | {cells} |")
        for name, res in summary.get("baselines", {}).items():
            for metric in HEADLINE:
                cells = " | ".join(f"{res['test'][protocol][g][metric]:.4f}" for g in GROUPS)
                lines.append(f"| {name} (baseline) | - | {metric.upper()} | {cells} |")
        lines.append("")
    any_b = next(iter(summary["backbones"].values()), None)
    if any_b and any_b["seeds"]:
        ns = ", ".join(f"{g} {any_b['test']['full'][g]['n']}" for g in GROUPS)
        lines += [f"Users per group: {ns}.", ""]
    marks = [1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 150, 200]
    cap = summary["epoch_cap"]
    marks = [e for e in marks if e <= cap]
    lines += ["Validation NDCG@10 (full ranking) after epoch N, per run; '-' = stopped earlier:", "",
              "| run | " + " | ".join(str(e) for e in marks) + " | best |",
              "|" + "---|" * (len(marks) + 2)]
    for backbone, b in summary["backbones"].items():
        for seed, r in sorted(b["runs"].items()):
            curve = r["valid_curve"]
            cells = " | ".join(f"{curve[e - 1]:.4f}" if e <= len(curve) else "-" for e in marks)
            lines.append(f"| {backbone}-s{seed} | {cells} | {max(curve):.4f} @ {r['best_epoch']} |")
    lines.append("")
    lines += ["| backbone | seed | best epoch | epochs run | stopped early | train+valid time |",
              "|---|---|---|---|---|---|"]
    for backbone, b in summary["backbones"].items():
        for seed, r in sorted(b["runs"].items()):
            early = "yes" if r["stopped_early"] else "no (cap)"
            lines.append(f"| {backbone} | {seed} | {r['best_epoch']} | {r['epochs_run']} | {early} | "
                         f"{r['train_seconds'] / 60:.0f} min |")
    ttq = summary.get("time_to_quality") or {}
    if ttq:
        lines += ["", f"Time to quality: first epoch reaching {ttq['reference']}'s best validation "
                  f"NDCG@10 ({ttq['target_valid_ndcg@10']:.4f}, mean over its seeds), two cores:", "",
                  "| run | epoch | wall (train + validation) |", "|---|---|---|"]
        for run, t in ttq["runs"].items():
            reached = t["epoch"] is not None
            lines.append(f"| {run} | {t['epoch']} | {t['seconds'] / 60:.1f} min |" if reached
                         else f"| {run} | not reached | - |")
    return "\n".join(lines) + "\n"


def estimate(args: argparse.Namespace) -> None:
    """Time one epoch (training + full validation) per backbone with the run's own settings,
    in a plain loop on this process (the Ray worker runs the same code)."""
    import numpy as np
    import torch

    from llmser_ray.data.dataset import load_dataset
    from llmser_ray.evaluation import rank_targets
    from llmser_ray.models import build_model
    from llmser_ray.stages.train import LossModule, train_epoch, training_sequences

    torch.set_num_threads(args.threads)
    for backbone in args.backbones:
        cfg = run_config(args, backbone, args.seeds[0])
        ds = load_dataset(cfg.workdir_path / "dataset")
        torch.manual_seed(0)
        model = build_model(cfg.model, ds.num_items)
        opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
        seqs = [s for s in training_sequences(ds, False) if len(s) >= 2]
        order = np.random.default_rng(0).permutation(len(seqs))
        t0 = time.perf_counter()
        train_epoch(LossModule(model), opt, seqs, order, cfg, "cpu", torch.Generator().manual_seed(0))
        t1 = time.perf_counter()
        vi, vt = ds.split("valid")
        rank_targets(model, vi, vt, cfg.eval, ds.num_items)
        t2 = time.perf_counter()
        log(f"estimate {backbone}: train epoch {t1 - t0:.1f}s + validation {t2 - t1:.1f}s "
            f"= {t2 - t0:.1f}s per epoch")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/quality-beauty")
    ap.add_argument("--data", type=Path, default=BEAUTY)
    ap.add_argument("--backbones", "--arms", nargs="+", default=None,
                    help=f"arms to train (default: {' '.join(ARMS)})")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=K=V,K=V",
                    help="an extra arm: its name and overrides")
    ap.add_argument("--seeds", nargs="+", type=int, default=SEEDS)
    # 100, not the config's 200: see docs/RESULTS.md (cost on a shared two-core machine; the
    # validation curves show where each run's best epoch lies relative to the cap).
    ap.add_argument("--epochs", type=int, default=100, help="epoch cap (early stopping may end sooner)")
    # One thread: on this shared two-core machine (load average 25-45 from other engineers' tests)
    # two OpenMP threads made a SASRec batch 20-40x SLOWER than one (each of the thousands of tiny
    # ops per batch waits for the thread that is descheduled); see docs/BENCHMARKS.md.
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the Ray Train worker")
    ap.add_argument("--cpus-per-worker", type=float, default=1.0)
    # Several of these processes at once must share ONE Ray (`ray start --head` with RAY_ADDRESS
    # in its environment): with two local Rays on a machine, Ray Train's placement-group cleaner
    # cannot tell which to join ("Found multiple active Ray instances") and a run's worker dies.
    ap.add_argument("--address", default=None, help="an existing Ray cluster to run on")
    ap.add_argument("--estimate", action="store_true", help="time one epoch per backbone and exit")
    ap.add_argument("--aggregate-only", action="store_true", help="only rebuild the tables")
    args = ap.parse_args()
    args.data = args.data.resolve()
    for spec in args.arm:
        name, _, overrides = spec.partition("=")
        ARMS[name] = [o for o in overrides.split(",") if o]
    args.backbones = args.backbones or list(ARMS)
    unknown = [a for a in args.backbones if a not in ARMS]
    if unknown:
        ap.error(f"unknown arms {unknown}: define them with --arm NAME=key=value,...")

    # Ray starts its workers at niceness 15 (raylet's worker_niceness), so on a shared machine the
    # Train worker loses the CPU to every ordinary process; 0 gives it an ordinary share.
    os.environ.setdefault("RAY_worker_niceness", "0")
    from llmser_ray.stages.prepare import prepare
    from llmser_ray.stages.train import train

    prepare(run_config(args, args.backbones[0], args.seeds[0]))
    if args.estimate:
        estimate(args)
        return
    if not args.aggregate_only:
        for seed in args.seeds:
            for backbone in args.backbones:
                name = f"{backbone}-s{seed}"
                cfg = run_config(args, backbone, seed)
                if finished(cfg, name) is not None:
                    log(f"{name}: finished earlier, skipped")
                    continue
                log(f"{name}: training (settings {ARMS[backbone]})")
                t0 = time.perf_counter()
                res = train(cfg, name=name)
                full = res.test.get("full", {}).get("overall", {})
                log(f"{name}: done in {(time.perf_counter() - t0) / 60:.1f} min, best epoch "
                    f"{res.best_epoch}, test full HR@10 {full.get('hr@10', float('nan')):.4f} "
                    f"NDCG@10 {full.get('ndcg@10', float('nan')):.4f}")
                aggregate(args)
    summary = aggregate(args)
    log(f"tables: {Path(args.workdir) / 'quality.md'} and quality.json")
    print(markdown(summary))


if __name__ == "__main__":
    main()
