"""Collect LLM-ESR's quality runs into one JSON shaped like docs/ablation_beauty_3seeds.json:
``runs`` (each run's test metrics by protocol and group), ``mean`` (mean and sample sd over seeds
of NDCG@10 / HR@10 per arm and group) and, where two arms both have two seeds or more, Welch's t
of NDCG@10 against the baseline.

    python bench/quality_llmesr.py --out docs/llmesr_beauty_3seeds.json \\
        --run baseline-s42=docs/quality_beauty.json#sasrec/42 \\
        --run dualview-s42=/work/runs19/beauty/models/sasrec-dualview-s42 ...

A ``--run`` is a model folder (its metrics.json), the JSON of bench/eval_partial.py (an
unfinished run, marked so) or ``FILE#arm/seed``, the per-seed test metrics
stored in a quality JSON of bench/quality_backbones.py.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path
from typing import Any

GROUPS = ("overall", "tail_user", "head_user", "tail_item", "head_item")
METRICS = ("ndcg@10", "hr@10")


def load_run(spec: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Test metrics (protocol -> group -> metric) and a little about the run."""
    if "#" in spec:
        path, where = spec.split("#", 1)
        arm, seed = where.split("/")
        doc = json.loads(Path(path).read_text())
        entry = doc["backbones"][arm]
        runs = entry.get("runs") or entry.get("seeds") or entry
        run = runs[seed] if isinstance(runs, dict) else runs[int(seed)]
        return run["test"], {"source": spec, "best_epoch": run.get("best_epoch"),
                             "epochs_run": run.get("epochs_run")}
    if spec.endswith(".json"):  # bench/eval_partial.py: an unfinished run's best weights
        p = json.loads(Path(spec).read_text())
        return p["test"], {"source": spec, "UNFINISHED_stopped_at_epoch": p["stopped_at"],
                           "best_epoch": p["best_epoch"], "best_valid_ndcg@10": p["best_valid"],
                           "median_train_s": statistics.median(h["train_s"] for h in p["history"]),
                           "median_epoch_s": statistics.median(h["epoch_s"] for h in p["history"])}
    m = json.loads((Path(spec) / "metrics.json").read_text())
    hist = m["history"]
    return m["test"], {"source": spec, "best_epoch": m["best_epoch"], "epochs_run": m["epochs_run"],
                       "median_train_s": statistics.median(h["train_s"] for h in hist),
                       "median_epoch_s": statistics.median(h["epoch_s"] for h in hist)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", required=True, help="NAME-sSEED=folder or FILE#arm/seed")
    ap.add_argument("--settings", default="{}", help="JSON merged into 'settings'")
    ap.add_argument("--out", required=True)
    ap.add_argument("--against", action="append", default=[],
                    help="another arm every arm is also compared with (Welch t of NDCG@10)")
    args = ap.parse_args()
    runs, info = {}, {}
    for spec in args.run:
        name, src = spec.split("=", 1)
        runs[name], info[name] = load_run(src)
    arms: dict[str, list[str]] = {}
    for name in runs:
        arms.setdefault(name.rsplit("-s", 1)[0], []).append(name)
    mean: dict[str, Any] = {}
    for protocol in ("full", "sampled"):
        mean[protocol] = {}
        for arm, names in arms.items():
            mean[protocol][arm] = {}
            for g in GROUPS:
                mean[protocol][arm][g] = {}
                for k in METRICS:
                    vals = [runs[n][protocol][g][k] for n in names]
                    sd = statistics.stdev(vals) if len(vals) > 1 else None
                    mean[protocol][arm][g][k] = [statistics.fmean(vals), sd]
    welch = welch_t(runs, arms, "baseline")
    out = {"settings": json.loads(args.settings), "run_info": info, "runs": runs, "mean": mean,
           "welch_t_ndcg@10": welch}
    if args.against:
        out["welch_t_ndcg@10_against"] = {ref: welch_t(runs, arms, ref) for ref in args.against}
    Path(args.out).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    print(markdown(mean, welch, {arm: len(names) for arm, names in arms.items()}))
    for ref, t in out.get("welch_t_ndcg@10_against", {}).items():
        print(welch_lines(t, ref))


def welch_t(runs: dict[str, Any], arms: dict[str, list[str]], ref: str) -> dict[str, Any]:
    """Welch's t of NDCG@10, each arm with two seeds or more against ``ref``, by group."""
    welch: dict[str, Any] = {}
    base = arms.get(ref, [])
    for protocol in ("full", "sampled"):
        welch[protocol] = {}
        for arm, names in arms.items():
            if arm == ref or len(names) < 2 or len(base) < 2:
                continue
            welch[protocol][arm] = {}
            for g in GROUPS:
                a = [runs[n][protocol][g]["ndcg@10"] for n in names]
                b = [runs[n][protocol][g]["ndcg@10"] for n in base]
                se = math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))
                welch[protocol][arm][g] = (statistics.fmean(a) - statistics.fmean(b)) / se if se else None
    return welch


def welch_lines(welch: dict[str, Any], ref: str) -> str:
    return "\n".join(f"\nWelch t of NDCG@10, {arm} vs {ref} ({protocol}): "
                     + ", ".join(f"{g} {v:+.1f}" for g, v in t.items() if v is not None)
                     for protocol in ("full", "sampled") for arm, t in welch[protocol].items())


def markdown(mean: dict[str, Any], welch: dict[str, Any], seeds: dict[str, int]) -> str:
    """The docs/RESULTS.md tables: mean +- sd per arm and group, the change against the
    baseline's mean in brackets, then Welch's t of NDCG@10 against the baseline."""
    lines = []
    for protocol in ("full", "sampled"):
        base = mean[protocol].get("baseline")
        header = "| arm | seeds | metric | " + " | ".join(GROUPS) + " |"
        lines += ["", f"**{protocol}**", "", header, "|---|---|---|" + "---|" * len(GROUPS)]
        for k in METRICS:
            for arm, groups in mean[protocol].items():
                cells = []
                for g in GROUPS:
                    m, sd = groups[g][k]
                    cell = f"{m:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")
                    if base is not None and arm != "baseline":
                        cell += f" ({100 * (m / base[g][k][0] - 1):+.1f}%)"
                    cells.append(cell)
                lines.append(f"| {arm} | {seeds[arm]} | {k.upper()} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + welch_lines(welch, "baseline")


if __name__ == "__main__":
    main()
