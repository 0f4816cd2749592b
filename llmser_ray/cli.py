"""The ``llmser-ray`` command line: parse, validate the config, call one stage.

Every command takes the same ``--config FILE`` and ``--set section.key=value`` options, so the
CLI, YAML files and Tune describe a run with one vocabulary (``llmser_ray.config``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import yaml

from llmser_ray.config import Config, load_config
from llmser_ray.errors import LLMSeRError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="LLMSeR on Ray: LLM-based data augmentation for sequential recommenders.",
)

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (see tune_configs/).")
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable)."),
]
AddressOpt = Annotated[
    str | None, typer.Option("--address", help="Existing Ray cluster (default: start a local one).")
]
WorkdirOpt = Annotated[
    str | None, typer.Option("--workdir", "-w", help="Folder for all stage outputs.")
]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if up to date.")]

F = TypeVar("F", bound=Callable[..., Any])


def _user_errors(fn: F) -> F:
    """Turn input errors into one line on stderr and exit code 2, never a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LLMSeRError as e:
            typer.echo(f"error: {e}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: rerun the same command to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _config(config: Path | None, overrides: list[str] | None, workdir: str | None = None,
            address: str | None = None) -> Config:
    extra = list(overrides or [])
    if workdir:
        extra.append(f"workdir={workdir}")
    if address:
        extra.append(f"ray.address={address}")
    return load_config(config, extra)


@app.command("config")
@_user_errors
def config_cmd(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the fully resolved config (all defaults filled in) as YAML."""
    cfg = _config(config, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


@app.command()
@_user_errors
def prepare(config: ConfigOpt = None, set_: SetOpt = None, workdir: WorkdirOpt = None,
            force: ForceOpt = False) -> None:
    """Import raw interactions into the versioned Parquet dataset (<workdir>/dataset)."""
    from llmser_ray.data.prepare import prepare as run_prepare

    cfg = _config(config, set_, workdir)
    res = run_prepare(cfg, force=force)
    state = "up to date" if res.skipped else "written"
    typer.echo(f"dataset {state}: {res.path}")
    typer.echo(" ".join(f"{k}={v}" for k, v in res.counts.items()))


@app.command()
@_user_errors
def train(config: ConfigOpt = None, set_: SetOpt = None, workdir: WorkdirOpt = None,
          address: AddressOpt = None, name: Annotated[str | None, typer.Option(
              help="Model folder name under <workdir>/models (default: the backbone).")] = None,
          force: ForceOpt = False) -> None:
    """Train a backbone with Ray Train (DDP); resumes an interrupted run of the same config."""
    from llmser_ray.reporting import print_metrics
    from llmser_ray.training import train as run_train

    cfg = _config(config, set_, workdir, address)
    res = run_train(cfg, name=name, force=force)
    if res.skipped:
        typer.echo(f"model up to date: {res.model_dir}")
    print_metrics(res, cfg)
    typer.echo(f"metrics: {res.model_dir / 'metrics.json'}")


@app.command()
@_user_errors
def run(config: ConfigOpt = None, set_: SetOpt = None, workdir: WorkdirOpt = None,
        address: AddressOpt = None) -> None:
    """Run every stage in order, skipping those whose inputs and config are unchanged."""
    from llmser_ray.pipeline import run_pipeline

    cfg = _config(config, set_, workdir, address)
    run_pipeline(cfg)
