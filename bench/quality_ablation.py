"""Issue 5's ablation on full Amazon Beauty with SASRec: baseline vs candidates-only augmentation
(no LLM) vs LLMSeR (SIA + ARV + dual-channel), per seed, full ranking and 100 negatives.

The upstream stages run ONCE (seed ``--upstream-seed``): forward and reverse pretraining, the
collaborative candidates, SIA with the configured LLM and ARV. Each seed then trains three
models on that same augmentation, so the spread over seeds is the training noise, not the
LLM's: ``sasrec-s<seed>`` (plain, the baseline), ``sasrec-candidates-s<seed>`` (dual-channel
with the top-N collaborative candidates, constant weight) and ``sasrec-llmser-s<seed>``
(dual-channel with the LLM's pseudo items weighted by ARV's w_u).

Resumable like every stage: a finished model is skipped, an interrupted one resumes from its
last checkpoint; the tables (``<workdir>/ablation.json`` and ``ablation.md``) are rewritten
after every model, so they always show what has finished.

    nohup .venv/bin/python bench/quality_ablation.py > runs/ablation.log 2>&1 &
    .venv/bin/python bench/quality_ablation.py --aggregate-only
    # two trainings at a time (each uses one core: train.torch_threads=1, one Ray Train worker)
    .venv/bin/python bench/quality_ablation.py --jobs 2
    # a budget on two cores: a sample of the tail users gets LLM augmentation, fewer epochs
    .venv/bin/python bench/quality_ablation.py --max-users 2000 --epochs 60 --patience 10
    # LLMSeR with the best measured selector (docs/SELECTION.md) and the skill-based ARV weights:
    # no LLM for SIA, the LLM only judges ARV's 10 candidates per user (augment.arv_judge=score
    # is order-independent but scores every prompt token: far slower on CPU)
    .venv/bin/python bench/quality_ablation.py --set augment.selector=collaborative \\
        --set augment.arv_reliability=skill --jobs 2
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from common import BEAUTY, beauty_sets, loadavg

VARIANTS = ("baseline", "candidates", "llmser", "candidates-context", "llmser-context",
            "dualview", "candidates-context-dualview", "llmser-context-dualview")
# The issue-5 ablation; the "-context" arms (dual.pseudo_targets=false: pseudo items read as
# context, never predicted) and the "dualview" ones (LLM-ESR's dual-view SASRec,
# semantic.enabled=true, alone or under LLMSeR's dual channel: issue 19's combination) run when
# --variants names them.
DEFAULT_VARIANTS = VARIANTS[:3]
GROUPS = ("overall", "tail_user", "head_user", "tail_item", "head_item")
HEADLINE = ("ndcg@10", "hr@10")
# How an invocation runs, not what it measures: neither passed to --jobs children nor recorded.
INVOCATION = ("jobs", "child", "aggregate_only")


def log(text: str) -> None:
    load = loadavg()
    sys.stdout.write(f"[ablation {time.strftime('%H:%M:%S')} load {load}] {text}\n")
    sys.stdout.flush()


def config(args: argparse.Namespace, seed: int, extra: list[str] | None = None) -> Any:
    from llmser_ray.config import load_config

    return load_config(None, [
        *beauty_sets(args.workdir, args.data),
        "data.tail_user_threshold=9", "model.backbone=sasrec",
        "semantic.enabled=false",  # the same-code plain baseline LLMSeR's arms are compared with
        *([f"model.max_len={args.max_len}"] if args.max_len else []),
        f"train.epochs={args.epochs}", f"train.patience={args.patience}", f"train.seed={seed}",
        "train.torch_threads=1", f"dual.num_pseudo={args.num_pseudo}", f"dual.beta={args.beta}",
        *([f"augment.max_users={args.max_users}"] if args.max_users else []), *args.set, *(extra or [])])


def model_name(args: argparse.Namespace, seed: int, variant: str) -> str:
    if variant == "baseline":
        # The upstream seed's baseline IS the forward model pretraining trained (same config).
        return "sasrec" if seed == args.upstream_seed else f"sasrec-s{seed}"
    return f"sasrec-{variant}-s{seed}"


def variant_config(args: argparse.Namespace, seed: int, variant: str) -> Any:
    from llmser_ray.stages.pretrain import plain_config

    if variant == "baseline":
        return plain_config(config(args, seed), reverse=False)
    semantic = ["semantic.enabled=true"] if variant.endswith("dualview") else []
    if variant == "dualview":
        return config(args, seed, semantic)
    arm = variant.removesuffix("-dualview")
    source = "llm" if arm.startswith("llmser") else "candidates"
    # The method's arms predict their pseudo items (the papers' setting, explicit since the
    # product's default became context only); the "-context" arms read them as context.
    targets = "false" if arm.endswith("-context") else "true"
    return config(args, seed, ["dual.enabled=true", f"dual.pseudo_source={source}",
                               f"dual.pseudo_targets={targets}", *semantic])


def variant_of(key: str) -> str:
    """``candidates-context-s42`` -> ``candidates-context`` (a prefix match would count it as
    ``candidates`` too)."""
    return key.rsplit("-s", 1)[0]


def run_variant(args: argparse.Namespace, seed: int, variant: str) -> dict[str, Any]:
    from llmser_ray.stages.train import train

    return train(variant_config(args, seed, variant), name=model_name(args, seed, variant)).test


def workdir_seeds(workdir: str, seeds: list[int]) -> list[int]:
    """These seeds and those of every arm's model already under ``<workdir>/models``."""
    found = {int(m.group(1)) for d in (Path(workdir) / "models").glob("sasrec-*")
             if (m := re.fullmatch(r"sasrec(?:-.+)?-s(\d+)", d.name))}
    return sorted(set(seeds) | found)


def welch_t(a: list[float], b: list[float]) -> float | None:
    """Welch's t of mean(a) - mean(b); None below two runs each (no spread to compare with)."""
    if len(a) < 2 or len(b) < 2:
        return None
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    diff = statistics.fmean(a) - statistics.fmean(b)
    return diff / se if se else None


def welch_lines(results: dict[str, dict[str, Any]], protocol: str, out: dict[str, Any]) -> list[str]:
    """Whether a variant's change is larger than the seed noise: Welch's t against the baseline
    on NDCG@10 (with 3 seeds each, |t| below ~3 is not significant at 5%: Welch df is 2-4)."""
    def vals(v: str, g: str) -> list[float]:
        return [r[protocol][g]["ndcg@10"] for k, r in results.items() if variant_of(k) == v]

    lines = []
    for v in VARIANTS[1:]:
        ts = {g: welch_t(vals(v, g), vals("baseline", g)) for g in GROUPS[:4]}
        if all(t is None for t in ts.values()):
            continue
        out.setdefault("welch_t_ndcg@10", {}).setdefault(protocol, {})[v] = ts
        lines.append(f"- {v}: Welch t vs baseline, NDCG@10: " + ", ".join(
            f"{g} {t:+.1f}" if t is not None else f"{g} n/a" for g, t in ts.items()))
    return lines


def aggregate(args: argparse.Namespace, results: dict[str, dict[str, Any]], extra: dict[str, Any]) -> None:
    """Mean and sample std over finished seeds; the change of each variant against the baseline."""
    settings = {k: v for k, v in vars(args).items() if k not in INVOCATION}
    settings["seeds"] = ",".join(sorted({k.rsplit("-s", 1)[1] for k in results}, key=int))  # the table's
    out: dict[str, Any] = {"settings": settings | {"data": str(args.data)}, "upstream": extra,
                           "runs": results, "mean": {}}
    lines = [f"# Ablation on Amazon Beauty, SASRec (max_len {args.max_len}, epochs <= {args.epochs}, "
             f"patience {args.patience}, N = {args.num_pseudo}, beta = {args.beta}, "
             f"LLM-augmented tail users: {args.max_users or 'all'})", ""]
    for protocol in ("full", "sampled"):
        lines += [f"## {protocol} ranking" if protocol == "full" else "## 1 positive + 100 sampled negatives",
                  "", "| variant | seeds | "
                  + " | ".join(f"{g} {m}" for g in GROUPS[:4] for m in HEADLINE) + " |",
                  "|---|---|" + "---|" * (len(GROUPS[:4]) * len(HEADLINE))]
        for v in VARIANTS:
            runs = [r[protocol] for k, r in results.items() if variant_of(k) == v]
            if not runs:
                continue
            cells = []
            for g in GROUPS[:4]:
                for m in HEADLINE:
                    vals = [r[g][m] for r in runs]
                    mean = statistics.fmean(vals)
                    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                    out["mean"].setdefault(protocol, {}).setdefault(v, {}).setdefault(g, {})[m] = [mean, sd]
                    base = out["mean"].get(protocol, {}).get("baseline", {}).get(g, {}).get(m)
                    rel = (f" ({(mean - base[0]) / base[0] * 100:+.1f}%)"
                           if base and v != "baseline" and base[0] else "")
                    cells.append(f"{mean:.4f} ± {sd:.4f}{rel}")
            lines.append(f"| {v} | {len(runs)} | " + " | ".join(cells) + " |")
        lines += ["", *welch_lines(results, protocol, out), ""]
    wd = Path(args.workdir)
    (wd / "ablation.json").write_text(json.dumps(out, indent=2) + "\n")
    (wd / "ablation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def run_parallel(args: argparse.Namespace, jobs: list[tuple[int, str]],
                 after_each: Callable[[], object]) -> None:
    """Each (seed, variant) in a child process of this script, ``args.jobs`` at a time.

    Separate processes, not threads: every training starts its own local Ray and sets torch's
    thread count process-wide. A child's log goes to ``<workdir>/ablation-logs/``; a failed
    child fails the run once the others finished (their models are kept, a rerun resumes)."""
    logs = Path(args.workdir) / "ablation-logs"
    logs.mkdir(parents=True, exist_ok=True)
    # Every setting of this run, derived from args so that a new option reaches the children too.
    own = {"seeds", "variants", *INVOCATION}
    passthrough = [f"--{k.replace('_', '-')}={x}" for k, v in vars(args).items()
                   if k not in own and v is not None for x in (v if isinstance(v, list) else [v])]
    lock = threading.Lock()

    def one(job: tuple[int, str]) -> int:
        s, v = job
        t0 = time.perf_counter()
        log(f"seed {s}: {v} (log: {logs / f's{s}-{v}.log'})")
        with open(logs / f"s{s}-{v}.log", "a") as out:
            rc = subprocess.call([sys.executable, __file__, *passthrough, f"--seeds={s}", f"--variants={v}",
                                  "--child"], stdout=out, stderr=subprocess.STDOUT)
        status = "done" if rc == 0 else f"FAILED (exit {rc})"
        log(f"seed {s}: {v} {status} in {time.perf_counter() - t0:.0f} s")
        with lock:  # the tables are rebuilt from every finished model; one writer at a time
            after_each()
        return rc

    with ThreadPoolExecutor(args.jobs) as pool:
        failed = [job for job, rc in zip(jobs, pool.map(one, jobs), strict=True) if rc != 0]
    if failed:
        sys.exit(f"ablation: {len(failed)} training(s) failed: {failed}; see {logs}, then rerun to resume")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="runs/ablation-beauty")
    ap.add_argument("--data", type=Path, default=BEAUTY)
    ap.add_argument("--seeds", default="42,43,44")
    ap.add_argument("--upstream-seed", type=int, default=42)
    ap.add_argument("--epochs", type=int, default=200)
    # The product's backbone trained to convergence (docs/RESULTS.md section 1: patience 10,
    # model.max_len's default); issue 5's weak-backbone run was --max-len 50 --epochs 30 --patience 20.
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--max-len", type=int, default=None, help="model.max_len (default: the config's)")
    ap.add_argument("--num-pseudo", type=int, default=12)
    ap.add_argument("--beta", type=float, default=0.5)
    ap.add_argument("--max-users", type=int, default=None,
                    help="LLM-augment a seeded sample of this many tail users (default: all)")
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                    help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="any config key for every arm and the upstream stages, e.g. "
                         "augment.selector=collaborative augment.arv_reliability=skill (repeatable)")
    ap.add_argument("--aggregate-only", action="store_true")
    ap.add_argument("--jobs", type=int, default=1,
                    help="trainings run at once, each in its own process and local Ray (one core each)")
    # Internal: a --jobs child trains exactly its seed and variant, skipping upstream and tables.
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.jobs < 1:
        ap.error("--jobs must be at least 1")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    variants = [v for v in args.variants.split(",") if v]
    if unknown := sorted(set(variants) - set(VARIANTS)):
        ap.error(f"unknown variant(s) {', '.join(unknown)}: use {', '.join(VARIANTS)}")

    from llmser_ray.stages.train import finished_metrics, model_dir

    results: dict[str, Any] = {}
    upstream_info: dict[str, Any] = {}

    def collect() -> None:
        """Every model finished under THIS run's config, for every seed in the workdir (a run
        with ``--seeds 43`` must not leave a one-seed table behind); a stale one (other epochs,
        another augmentation) is left out of the table, not reported as this config's result."""
        for s in workdir_seeds(args.workdir, seeds):
            for v in VARIANTS:
                cfg = variant_config(args, s, v)
                metrics = finished_metrics(cfg, model_dir(cfg, model_name(args, s, v)))
                if metrics is not None:
                    results[f"{v}-s{s}"] = metrics["test"]
                else:
                    results.pop(f"{v}-s{s}", None)

    if args.child:
        for s in seeds:
            for v in variants:
                run_variant(args, s, v)
        return

    if not args.aggregate_only:
        from llmser_ray.stages.run import upstream

        t0 = time.perf_counter()
        # Without the llmser variant nothing asks the LLM: candidates only (SIA and ARV skipped).
        source = "llm" if any(v.startswith("llmser") for v in variants) else "candidates"
        llm_stages = ", SIA, ARV" if source == "llm" else ""
        log(f"upstream: prepare, pretrain (forward + reverse), candidates{llm_stages}")
        up = upstream(config(args, args.upstream_seed, [f"dual.pseudo_source={source}"]))
        upstream_info = {"augment": up.get("augment"), "validate": up.get("validate"),
                         "seconds": time.perf_counter() - t0}
        (Path(args.workdir) / "upstream.json").write_text(json.dumps(upstream_info, indent=2, default=str))
        log(f"upstream done in {upstream_info['seconds']:.0f} s")
        jobs = [(s, v) for s in seeds for v in variants]
        if args.jobs == 1:
            for s, v in jobs:
                t0 = time.perf_counter()
                log(f"seed {s}: {v}")
                run_variant(args, s, v)
                log(f"seed {s}: {v} done in {time.perf_counter() - t0:.0f} s")
                collect()
                aggregate(args, results, upstream_info)
        else:
            run_parallel(args, jobs, lambda: (collect(), aggregate(args, results, upstream_info)))
    up_file = Path(args.workdir) / "upstream.json"
    if up_file.is_file():
        upstream_info = json.loads(up_file.read_text())
    collect()
    aggregate(args, results, upstream_info)


if __name__ == "__main__":
    main()
