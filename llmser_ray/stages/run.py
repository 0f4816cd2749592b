"""The whole pipeline (``llmser-ray run``): every stage in order; each skips itself when current.

prepare -> pretrain (forward = baseline, reverse = candidate generator) -> [tslrec_tune ->
tslrec_embed, with ``tslrec.enabled``] -> [embed] -> augment
(CCG, then SIA's LLM selection) -> reliability (ARV) -> dual-channel train -> comparison with the
baseline. With ``dual.pseudo_source=candidates`` the LLM stages are skipped (the no-LLM
ablation). ``upstream`` is shared with ``tune``, which runs it once before its trials.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from llmser_ray.config import Config

GROUPS = ("overall", "tail_user", "head_user", "tail_item", "head_item")


def upstream(cfg: Config, console: Console | None = None) -> dict[str, Any]:
    """Every stage dual-channel training reads; returns the baseline's test metrics."""
    from llmser_ray.reporting import print_metrics, print_summary
    from llmser_ray.stages.candidates import generate_candidates
    from llmser_ray.stages.prepare import prepare
    from llmser_ray.stages.pretrain import pretrain
    from llmser_ray.stages.select import select_items

    console = console or Console()
    console.rule("prepare")
    res = prepare(cfg)
    console.print(f"dataset {'up to date' if res.skipped else 'written'}: {res.path}")
    console.print(" ".join(f"{k}={v}" for k, v in res.counts.items()))
    console.rule(f"pretrain {cfg.model.backbone}: forward (baseline) and reverse (candidates)")
    pre = pretrain(cfg)
    print_metrics(pre.forward, cfg, console)
    if cfg.tslrec.enabled:
        from llmser_ray.stages.tslrec_embed import tslrec_embed

        console.rule("TSLRec: LoRA information reconstruction, then LLM item embeddings")
        emb = tslrec_embed(cfg)  # runs tslrec_tune first when it is missing or stale
        console.print(f"LLM item embeddings: {emb.path} ({emb.items} items, dim {emb.dim})")
    llm = cfg.dual.pseudo_source == "llm"
    console.rule("augment: " + ("candidates + LLM selection (SIA)" if llm else "candidates only (no LLM)"))
    cand = generate_candidates(cfg)
    console.print(f"candidates: {cand.users} users ({cand.path})")
    out: dict[str, Any] = {"baseline": pre.forward.test.get("full"),
                           "baseline_dir": str(pre.forward.model_dir)}
    if llm:
        from llmser_ray.stages.reliability import score_reliability

        aug = select_items(cfg)
        print_summary("augmented", aug.path, aug.skipped, aug.summary, console)
        console.rule("reliability: adaptive reliability validation (ARV)")
        val = score_reliability(cfg)
        print_summary("reliability", val.path, val.skipped, val.summary, console)
        out["augment"], out["validate"] = aug.summary, val.summary
    return out


def comparison_table(baseline: dict[str, Any], augmented: dict[str, Any], metric: str, title: str) -> Table:
    table = Table(title=title)
    table.add_column("group")
    table.add_column(f"baseline {metric}", justify="right")
    table.add_column(f"augmented {metric}", justify="right")
    table.add_column("change", justify="right")
    for g in GROUPS:
        if g not in baseline or g not in augmented:
            continue
        b, a = baseline[g][metric], augmented[g][metric]
        change = f"{(a - b) / b * 100:+.1f}%" if b else "n/a"
        table.add_row(g, f"{b:.4f}", f"{a:.4f}", change)
    return table


def run_pipeline(cfg: Config) -> dict[str, Any]:
    from llmser_ray.ray_utils import init_ray
    from llmser_ray.reporting import print_metrics
    from llmser_ray.stages.train import train

    console = Console()
    init_ray(cfg.ray)
    up = upstream(cfg, console)
    dual = cfg.model_copy(update={"dual": cfg.dual.model_copy(update={"enabled": True})})
    console.rule(f"train {cfg.model.backbone}: dual-channel ({cfg.dual.pseudo_source})")
    res = train(dual)
    print_metrics(res, dual, console)
    if up.get("baseline") and res.test.get("full"):
        console.print(comparison_table(up["baseline"], res.test["full"], cfg.eval.metric,
                                       "test, full ranking: baseline vs dual-channel"))
    console.print(f"outputs in {cfg.workdir_path}")
    return {**up, "llmser": res.test.get("full"), "llmser_dir": str(res.model_dir)}
