"""Readable metric tables (rich) for the end of a stage; the JSON files stay the source of truth."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

GROUP_ORDER = ("overall", "tail_user", "head_user", "tail_item", "head_item")


def metrics_table(title: str, groups: dict[str, dict[str, float]], ks: list[int]) -> Table:
    table = Table(title=title)
    table.add_column("group")
    table.add_column("users", justify="right")
    for k in ks:
        table.add_column(f"HR@{k}", justify="right")
        table.add_column(f"NDCG@{k}", justify="right")
    for g in GROUP_ORDER:
        if g not in groups:
            continue
        m = groups[g]
        cells = []
        for k in ks:
            cells += [f"{m[f'hr@{k}']:.4f}", f"{m[f'ndcg@{k}']:.4f}"]
        table.add_row(g, str(int(m.get("n", 0))), *cells)
    return table


def print_metrics(result: Any, cfg: Any, console: Console | None = None) -> None:
    console = console or Console()
    console.print(f"best epoch {result.best_epoch} (validation {cfg.eval.metric} "
                  f"{result.valid['overall'][cfg.eval.metric]:.4f})")
    for protocol, groups in (result.test or {}).items():
        label = "full ranking" if protocol == "full" else \
            f"1 positive + {cfg.eval.num_negatives} sampled negatives"
        console.print(metrics_table(f"test, {label}", groups, cfg.eval.ks))


def print_summary(what: str, path: Any, skipped: bool, summary: dict[str, Any],
                  console: Console | None = None) -> None:
    """A stage summary (summary.json) as a two-column table."""
    console = console or Console()
    table = Table(title=f"{what}: {'up to date' if skipped else 'written'} ({path})")
    table.add_column("key")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        if isinstance(value, float):
            value = f"{value:.4f}"
        elif isinstance(value, dict):
            value = ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                              for k, v in value.items())
        table.add_row(key, str(value))
    console.print(table)
