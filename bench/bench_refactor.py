"""What a code change costs at the user's end: the quickstart's wall time and the training epoch
time of two commits, measured side by side on the same machine.

Each commit is checked out into its own ``git worktree`` and run with this repository's virtual
environment (``PYTHONPATH`` puts the worktree's package first, and Ray's workers inherit it).
The runs alternate (candidate, baseline, candidate, baseline ...) so that drifting machine load
falls on both sides; each run starts from an empty workdir, so nothing is cached between them
but the converted LLM (``.llmser/`` caches are per worktree: the first run of each side pays the
conversion, equally).

    .venv/bin/python bench/bench_refactor.py --baseline 5cb8a77 --candidate HEAD --rounds 1

Prints, per measure, both sides and the ratio candidate / baseline, and writes the raw figures
to ``--out`` (JSON). Epoch time is the median of the per-epoch seconds that ``llmser-ray train``
prints for full Amazon Beauty (first epoch dropped: Ray worker start, cold caches).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import beauty_sets, loadavg

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = ROOT / ".venv" / "bin"
EPOCH = re.compile(r"epoch\s+\d+.*\((\d+(?:\.\d+)?)s\)")


def worktree(rev: str, where: Path) -> Path:
    sha = subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], check=True,
                         capture_output=True, text=True).stdout.strip()
    path = where / sha[:10]
    if not path.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), sha],
                       check=True, capture_output=True)
    return path


def run(tree: Path, args: list[str], log: Path) -> tuple[float, str]:
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    t0 = time.perf_counter()
    res = subprocess.run([str(VENV_BIN / "llmser-ray"), *args], cwd=tree, env=env,
                         capture_output=True, text=True)
    wall = time.perf_counter() - t0
    out = res.stdout + res.stderr
    log.write_text(out)
    if res.returncode != 0:
        sys.exit(f"{' '.join(args[:1])} failed in {tree} (rc {res.returncode}); log: {log}")
    return wall, out


def quickstart(tree: Path, work: Path, log: Path) -> float:
    wall, _ = run(tree, ["tune", "--config", "tune_configs/quickstart.yaml", "-w", str(work)], log)
    return wall


def epochs(tree: Path, work: Path, n: int, log: Path) -> list[float]:
    sets = beauty_sets(work)
    args = ["--set", f"train.epochs={n}", "--set", "train.patience=100", "--set", "train.torch_threads=1"]
    for s in sets:
        args += ["--set", s]
    run(tree, ["prepare", *[a for s in sets for a in ("--set", s)]], log.with_suffix(".prepare.log"))
    _, out = run(tree, ["train", *args], log)
    times = [float(m.group(1)) for m in EPOCH.finditer(out)]
    if len(times) < 2:
        sys.exit(f"could not read epoch times from {log}")
    return times[1:]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", required=True, help="the commit to compare against")
    ap.add_argument("--candidate", default="HEAD")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--epochs", type=int, default=4, help="epochs per training run (first dropped)")
    ap.add_argument("--skip-quickstart", action="store_true")
    ap.add_argument("--trees", default="/tmp/llmser-bench-trees")
    ap.add_argument("--out", default="runs/bench-refactor.json")
    a = ap.parse_args()
    trees = Path(a.trees)
    trees.mkdir(parents=True, exist_ok=True)
    sides = {"candidate": worktree(a.candidate, trees), "baseline": worktree(a.baseline, trees)}
    res: dict[str, dict[str, list[float]]] = {s: {"quickstart_s": [], "epoch_s": []} for s in sides}
    print(f"load before: {loadavg()}", flush=True)
    for r in range(a.rounds):
        for side, tree in sides.items():
            work = Path(tempfile.mkdtemp(prefix=f"bench-{side}-"))
            try:
                logs = Path(a.out).resolve().parent / "bench-refactor-logs"
                logs.mkdir(parents=True, exist_ok=True)
                if not a.skip_quickstart:
                    q = quickstart(tree, work / "qs", logs / f"{side}-{r}-quickstart.log")
                    res[side]["quickstart_s"].append(q)
                    print(f"round {r} {side:9s} quickstart {q:7.1f} s  (load {loadavg()})", flush=True)
                e = epochs(tree, work / "beauty", a.epochs, logs / f"{side}-{r}-train.log")
                res[side]["epoch_s"] += e
                print(f"round {r} {side:9s} epochs {', '.join(f'{x:.1f}' for x in e)} s  (load {loadavg()})",
                      flush=True)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'measure':14s} {'baseline':>10s} {'candidate':>10s} {'ratio':>7s}")
    for m in ("quickstart_s", "epoch_s"):
        if not res["baseline"][m]:
            continue
        b, c = statistics.median(res["baseline"][m]), statistics.median(res["candidate"][m])
        print(f"{m:14s} {b:10.1f} {c:10.1f} {c / b:7.3f}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"baseline": a.baseline, "candidate": a.candidate,
                                       "sides": {s: str(t) for s, t in sides.items()}, **res}, indent=1))


if __name__ == "__main__":
    main()
