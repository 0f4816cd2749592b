"""Selection benchmark (issue 18): how well does each ``augment.selector`` find a user's real
prior items among the candidates?

Simulated tail users whose true prior items are known (``augment.selection.simulate_tail_users``):
long users are cut to a visible training length L drawn from the real tail users' lengths, and
the items right before the cut are held out as the truth. The truncated data set is written as
an S3-Rec file in the benchmark's own workdir and goes through the product's stages unchanged:
``prepare`` -> ``embed`` -> the reverse model (``train``, CE by default, epochs capped) ->
``candidates`` (for the simulated users only: ``augment.user_ids``) -> ``select`` once per
selector. The held-out interactions are not in that data set, so neither the candidate model nor
any prompt sees them. Scores: recall@N / NDCG@N of the truth among each selector's first N picks,
the pool ceiling (truth in the K candidates at all), the expected random pick from the pool (the
floor), with bootstrap intervals over users; the fusion weight is searched with Ray Tune on a
seeded half of the users ("tune split") and reported on both halves.

    PYTHONPATH=. .venv/bin/python bench/selection_benchmark.py --workdir ../runs18/selbench \\
        --users 1000 --llm-users 150 --out docs/selection_beauty.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BEAUTY, loadavg  # noqa: E402

from llmser_ray.augment.selection import (  # noqa: E402
    bootstrap_ci,
    bootstrap_ratio,
    expected_random,
    fuse,
    history_similarity,
    recall_ndcg,
    simulate_tail_users,
    top_n,
)
from llmser_ray.config import Config, load_config  # noqa: E402
from llmser_ray.data.dataset import load_dataset  # noqa: E402

NS = (5, 10, 12)
NO_LLM = ("collaborative", "embedding", "fusion")
LLM = ("score", "generate")


def common_sets(args: argparse.Namespace) -> list[str]:
    """Everything but the data paths: the same for the source and the truncated data set."""
    return [f"data.tail_user_threshold={args.tail_threshold}", f"model.max_len={args.max_len}",
            f"train.epochs={args.epochs}", f"train.patience={args.patience}",
            f"train.torch_threads={args.threads}", "ray.include_dashboard=false", f"augment.seed={args.seed}",
            "augment.shard_size=128", "llm.cpus_per_engine=2", *args.set]


def write_truncated(src: Any, sim: dict[str, Any], folder: Path) -> tuple[Path, Path]:
    """The simulated data set as an S3-Rec sequence file and an items.jsonl, in the source data
    set's ids (users and items keep their numbers unless an item is left with no interaction)."""
    folder.mkdir(parents=True, exist_ok=True)
    seq_path, item_path = folder / "sequences.txt", folder / "items.jsonl"
    with open(seq_path, "w", encoding="utf-8") as fh:
        for u, seq in zip(src.user_ids, sim["sequences"], strict=True):
            fh.write(" ".join(map(str, [int(u), *seq.tolist()])) + "\n")
    items = src.items_table.select(["item_id", "title", "attributes"]).to_pylist()
    with open(item_path, "w", encoding="utf-8") as fh:
        for rec in items:
            fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
    return seq_path, item_path


def truncated_dataset(src_cfg: Config, sim_sets: list[str], sim_folder: Path, users: int, prior: int,
                      min_prior: int, seed: int) -> dict[str, Any]:
    """Prepare the source, simulate tail users on it, prepare the truncated copy; map the
    simulated users and their truth into the truncated data set's ids and check that no
    held-out item is in the data set any stage reads (the candidate model's training data, the
    histories the prompts show)."""
    from llmser_ray.stages.prepare import prepare

    prepare(src_cfg)
    src = load_dataset(src_cfg.workdir_path / "dataset")
    tail_lengths = src.train_len[src.is_tail_user]
    sim = simulate_tail_users(src.sequences, tail_lengths, users, prior, min_prior, seed)
    seq_path, item_path = write_truncated(src, sim, sim_folder / "input")
    cfg = load_config(None, [f"workdir={sim_folder.resolve()}", "data.source=s3rec", f"data.path={seq_path}",
                             f"data.item_path={item_path}", *sim_sets])
    prepare(cfg)
    ds = load_dataset(cfg.workdir_path / "dataset")
    user_index = {u: i + 1 for i, u in enumerate(ds_users(ds))}
    item_index = {it: i + 1 for i, it in enumerate(ds.items_table.column("original_item").to_pylist())}
    sim_users = [user_index[str(int(src.user_ids[i]))] for i in sim["users"]]
    truth = {u: [item_index.get(str(int(t)), -1) for t in tr]
             for u, tr in zip(sim_users, sim["truth"], strict=True)}
    for u, visible_len in zip(sim_users, sim["visible_len"], strict=True):
        seq = ds.sequences[u - 1]
        if len(seq) - 2 != visible_len or set(seq.tolist()) & set(truth[u]):
            raise AssertionError(f"simulated user {u}: a held-out item is in the truncated data set")
    return {"cfg": cfg, "users": sim_users, "truth": truth, "visible_len": sim["visible_len"].tolist(),
            "tail_lengths": np.bincount(tail_lengths).tolist(), "source_users": int(src.num_users)}


def build_truncated(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Full Beauty (the source) -> the simulated, truncated Beauty in ``<workdir>/sim``."""
    data = Path(args.data)
    src_cfg = load_config(None, [f"workdir={(out / 'source').resolve()}", "data.source=s3rec",
                                 f"data.path={data / 'Beauty.txt'}", f"data.item_path={data / 'items.jsonl'}",
                                 *common_sets(args)])
    return truncated_dataset(src_cfg, common_sets(args), out / "sim", args.users, args.prior, args.min_prior,
                             args.seed)


def ds_users(ds: Any) -> list[str]:
    return pq.read_table(ds.path / "sequences.parquet", columns=["original_user"]).column(
        "original_user").to_pylist()


def selector_cfg(base: Config, selector: str, users: list[int], **augment: Any) -> Config:
    cfg = base.model_copy(deep=True)
    cfg.augment.user_ids = sorted(users)
    cfg.augment.selector = selector  # type: ignore[assignment]
    for k, v in augment.items():
        setattr(cfg.augment, k, v)
    return cfg


def run_selector(cfg: Config, out: Path, reuse: bool = False
                 ) -> tuple[dict[int, list[int]], dict[int, list[int]], dict[str, Any]]:
    """Run the select stage and keep a copy of its output and summary (the workdir holds one
    ``augmented/``); with ``reuse``, a kept copy is read instead (its users/s stays the measured
    one, where a rerun from the reply cache would time cache hits)."""
    from llmser_ray.stages.select import select_items

    keep = out / "results" / f"{cfg.augment.selector}.parquet"
    kept_summary = keep.with_suffix(".summary.json")
    if reuse and keep.is_file() and kept_summary.is_file():
        summary = json.loads(kept_summary.read_text())
    else:
        res = select_items(cfg)
        keep.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(res.path / "augmented.parquet", keep)
        summary = res.summary
        kept_summary.write_text(json.dumps(summary, indent=1))
    t = pq.read_table(keep, columns=["user_id", "pseudo_items", "candidates"]).to_pydict()
    picks = dict(zip(t["user_id"], t["pseudo_items"], strict=True))
    pools = dict(zip(t["user_id"], t["candidates"], strict=True))
    return picks, pools, summary


def metrics(picks: dict[int, list[int]], truth: dict[int, list[int]],
            users: list[int]) -> dict[str, np.ndarray]:
    m: dict[str, np.ndarray] = {}
    for n in NS:
        vals = np.array([recall_ndcg(np.asarray(picks.get(u, [])), set(truth[u]), n) for u in users])
        m[f"recall@{n}"], m[f"ndcg@{n}"] = vals[:, 0], vals[:, 1]
    return m


def summary_of(m: dict[str, np.ndarray], seed: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in m.items():
        mean, lo, hi = bootstrap_ci(v, seed)
        out[k] = {"mean": round(mean, 5), "ci95": [round(lo, 5), round(hi, 5)]}
    return out


def tune_fusion(cfg: Config, pools: dict[int, list[int]], truth: dict[int, list[int]], users: list[int],
                out: Path, grid: list[float]) -> dict[str, Any]:
    """Ray Tune grid over ``augment.fusion_weight`` on the tune split (recall@12 of the fusion
    picks), from the same scores the stage computes: reverse-model scores and embeddings."""
    import ray
    from ray import tune

    from llmser_ray.ray_utils import init_ray
    from llmser_ray.stages.candidates import generate_candidates
    from llmser_ray.stages.embed import embed_items
    from llmser_ray.text.embed import load_item_vectors

    generate_candidates(cfg)
    embed_items(cfg)
    cand = pq.read_table(cfg.workdir_path / "candidates" / "candidates.parquet").to_pydict()
    rows = {u: (np.asarray(h), np.asarray(c), np.asarray(s, dtype=np.float64))
            for u, h, c, s in zip(cand["user_id"], cand["history"], cand["candidates"], cand["scores"],
                                  strict=True) if u in set(users)}
    vecs = load_item_vectors(cfg.workdir_path)
    ph = cfg.augment.prompt_history
    sem = {u: history_similarity(vecs[c], vecs[h[-ph:]]) for u, (h, c, _) in rows.items()}
    init_ray(cfg.ray)
    ref = ray.put({"rows": rows, "sem": sem, "truth": {u: truth[u] for u in users}})

    def trial(params: dict[str, Any]) -> dict[str, float]:
        d = ray.get(ref)
        rec = [recall_ndcg(top_n(c, fuse(s, d["sem"][u], params["w"]), 12, tiebreak=s),
                           set(d["truth"][u]), 12)[0] for u, (_, c, s) in d["rows"].items()]
        return {"recall12": float(np.nanmean(rec))}

    tuner = tune.Tuner(trial, param_space={"w": tune.grid_search(grid)},
                       tune_config=tune.TuneConfig(metric="recall12", mode="max", max_concurrent_trials=1),
                       run_config=tune.RunConfig(storage_path=str((out / "tune").resolve()), name="fusion",
                                                 verbose=0))
    grid_res = tuner.fit()
    table = sorted((float(r.config["w"]), float(r.metrics["recall12"])) for r in grid_res)
    best = grid_res.get_best_result()
    return {"best_weight": float(best.config["w"]), "tune_split_recall@12": table}


def arg_parser() -> argparse.ArgumentParser:
    """The benchmark's options; bench/selection_consistency.py parses the same ones, so one set of
    flags names one simulated data set, its candidates and its splits."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="runs/selbench")
    p.add_argument("--data", default=str(BEAUTY))
    p.add_argument("--users", type=int, default=1000, help="simulated users (no-LLM selectors)")
    p.add_argument("--llm-users", type=int, default=150, help="the first this many of them for LLM selectors")
    p.add_argument("--selectors", default="collaborative,embedding,fusion,score,generate")
    p.add_argument("--prior", type=int, default=12, help="held-out items before the cut (the truth)")
    p.add_argument("--min-prior", type=int, default=3)
    p.add_argument("--tail-threshold", type=int, default=9)
    p.add_argument("--max-len", type=int, default=50)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--patience", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], help="extra config override (repeatable)")
    p.add_argument("--out", default="docs/selection_beauty.json")
    p.add_argument("--reuse", default="", help="selectors whose kept results (results/<name>.parquet and "
                   ".summary.json) are reported without rerunning them")
    return p


def main() -> None:
    args = arg_parser().parse_args()
    out = Path(args.workdir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    sim = build_truncated(args, out)
    cfg, users, truth = sim["cfg"], sim["users"], sim["truth"]
    rng = np.random.default_rng(args.seed)
    llm_users = sorted(users[: args.llm_users])
    tune_split = set(rng.choice(users, size=len(users) // 2, replace=False).tolist())
    report_split = [u for u in users if u not in tune_split]
    selectors = args.selectors.split(",")
    results: dict[str, Any] = {}
    per_user: dict[str, dict[str, np.ndarray]] = {}
    per_user_llm: dict[str, dict[str, np.ndarray]] = {}
    pools: dict[int, list[int]] = {}
    fusion_search = None
    for sel in selectors:
        sel_users = llm_users if sel in LLM else sorted(users)
        extra: dict[str, Any] = {}
        if sel == "fusion":
            fusion_search = tune_fusion(selector_cfg(cfg, "collaborative", sorted(users)), pools, truth,
                                        sorted(tune_split), out, [round(0.1 * i, 1) for i in range(11)])
            extra["fusion_weight"] = fusion_search["best_weight"]
        scfg = selector_cfg(cfg, sel, sel_users, **extra)
        t_sel = time.perf_counter()
        picks, sel_pools, summary = run_selector(scfg, out, reuse=sel in args.reuse.split(","))
        pools.update(sel_pools)
        m = metrics(picks, truth, sel_users)
        per_user[sel] = m
        results[sel] = {**summary_of(m, args.seed), "users": len(sel_users),
                        "users_per_s": summary.get("users_per_s"), "stage_seconds": summary.get("seconds"),
                        "wall_seconds": round(time.perf_counter() - t_sel, 1),
                        "positional_rate": summary.get("positional_rate"), "status": summary.get("status")}
        if sel == "fusion":
            results[sel]["fusion_weight"] = extra["fusion_weight"]
            results[sel]["report_split"] = summary_of(metrics(picks, truth, report_split), args.seed)
        if sel not in LLM:
            per_user_llm[sel] = metrics(picks, truth, llm_users)
        else:
            per_user_llm[sel] = m
        print(f"[selbench] {sel}: recall@12 {results[sel]['recall@12']} ({loadavg()})", flush=True)
        write_report(args, cfg, sim, users, llm_users, truth, pools, results, per_user, per_user_llm,
                     fusion_search, t0)


def write_report(args: argparse.Namespace, cfg: Config, sim: dict[str, Any], users: list[int],
                 llm_users: list[int], truth: dict[int, list[int]], pools: dict[int, list[int]],
                 results: dict[str, Any], per_user: dict[str, dict[str, np.ndarray]],
                 per_user_llm: dict[str, dict[str, np.ndarray]], fusion_search: dict[str, Any] | None,
                 t0: float) -> None:
    """The JSON report from what is measured so far (written after every selector, so an
    interrupted run keeps its finished selectors)."""
    results = dict(results)
    per_user = dict(per_user)
    # Ceiling and floor from the pools (the same candidates for every selector).
    all_users = sorted(users)
    ceil = {f"recall@{n}": np.array([min(len(set(pools[u]) & set(truth[u])), n) / len(truth[u])
                                     for u in all_users]) for n in NS}
    ceil["recall@pool"] = np.array([len(set(pools[u]) & set(truth[u])) / len(truth[u]) for u in all_users])
    for n in NS:
        ceil[f"ndcg@{n}"] = np.array([recall_ndcg(np.asarray(sorted(set(pools[u]) & set(truth[u]))[:n]),
                                                  set(truth[u]), n)[1] for u in all_users])
    results["ceiling"] = {**summary_of(ceil, args.seed), "users": len(all_users),
                          "note": "best possible selection from the K candidates"}
    rand: dict[str, np.ndarray] = {}
    for n in NS:
        vals = np.array([expected_random(np.asarray(pools[u]), set(truth[u]), n) for u in all_users])
        rand[f"recall@{n}"], rand[f"ndcg@{n}"] = vals[:, 0], vals[:, 1]
    results["random"] = {**summary_of(rand, args.seed), "users": len(all_users),
                         "note": "expected value of a uniform random pick of N from the pool"}
    per_user["random"] = rand
    # Paired comparisons with the collaborative order, on the LLM subset and on all users.
    comparisons: dict[str, Any] = {}
    if "collaborative" in per_user_llm:
        base_llm = per_user_llm["collaborative"]["recall@12"]
        for sel, m in per_user_llm.items():
            comparisons[f"{sel}/collaborative recall@12 (llm users)"] = [
                round(x, 4) for x in bootstrap_ratio(m["recall@12"], base_llm, args.seed)]
        base = per_user["collaborative"]["recall@12"]
        for sel in [s for s in per_user if s not in LLM]:
            comparisons[f"{sel}/collaborative recall@12 (all users)"] = [
                round(x, 4) for x in bootstrap_ratio(per_user[sel]["recall@12"], base, args.seed)]
        results["llm_users_subset"] = {s: summary_of(m, args.seed) for s, m in per_user_llm.items()}
    cfg_dump = cfg.model_dump(mode="json")
    report = {
        "selectors": results, "ratios_vs_collaborative": comparisons, "fusion_search": fusion_search,
        "setup": {"users": len(users), "llm_users": len(llm_users), "prior": args.prior,
                  "min_prior": args.min_prior, "seed": args.seed, "epochs_cap": args.epochs,
                  "patience": args.patience, "num_candidates": cfg.augment.num_candidates,
                  "ask_items": cfg.augment.ask_items, "tail_threshold": args.tail_threshold,
                  "tail_length_counts": sim["tail_lengths"],
                  "visible_len_mean": float(np.mean(sim["visible_len"])),
                  "truth_len_mean": float(np.mean([len(truth[u]) for u in users])),
                  "truth_items_gone_from_catalogue": int(sum(t < 0 for u in users for t in truth[u])),
                  "model": cfg_dump["model"]["backbone"], "loss": cfg_dump["train"]["loss"],
                  "llm": cfg.llm.model,
                  "embed": cfg.embed.model, "reverse_model_metrics": reverse_metrics(cfg)},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_end": loadavg()},
        "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(sys.argv),
    }
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: {m: v.get(m) for m in ("recall@12", "ndcg@12", "users_per_s")}
                      for k, v in results.items() if isinstance(v, dict) and "recall@12" in v}, indent=1))




def reverse_metrics(cfg: Config) -> dict[str, Any] | None:
    from llmser_ray.stages.pretrain import plain_config, pretrained_dir
    from llmser_ray.stages.train import finished_metrics

    m = finished_metrics(plain_config(cfg, reverse=True), pretrained_dir(cfg, reverse=True))
    keep = ("name", "best_epoch", "epochs_run", "valid", "test")
    return None if m is None else {k: v for k, v in m.items() if k in keep}


if __name__ == "__main__":
    main()
