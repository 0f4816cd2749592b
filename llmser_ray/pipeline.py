"""``llmser-ray run``: every stage in order; each stage skips itself when its output is current."""

from __future__ import annotations

from rich.console import Console

from llmser_ray.config import Config


def run_pipeline(cfg: Config) -> None:
    from llmser_ray.data.prepare import prepare
    from llmser_ray.reporting import print_metrics
    from llmser_ray.training import train

    console = Console()
    console.rule("prepare")
    res = prepare(cfg)
    console.print(f"dataset {'up to date' if res.skipped else 'written'}: {res.path}")
    console.rule(f"train {cfg.model.backbone}")
    tr = train(cfg)
    print_metrics(tr, cfg, console)
    console.print(f"outputs in {cfg.workdir_path}")
