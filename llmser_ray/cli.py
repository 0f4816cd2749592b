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
from llmser_ray.lock import workdir_lock

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


@app.callback()
def _global_options(verbose: Annotated[bool, typer.Option(
        "--verbose", help="Show all output of Ray, vLLM and the workers, unfiltered (else known-harmless "
                          "library noise is dropped; llmser_ray/console.py).")] = False) -> None:
    from llmser_ray import console

    console.setup(verbose)


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
    from llmser_ray.stages.prepare import prepare as run_prepare

    cfg = _config(config, set_, workdir)
    with workdir_lock(cfg.workdir_path):
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
    from llmser_ray.stages.train import train as run_train

    cfg = _config(config, set_, workdir, address)
    with workdir_lock(cfg.workdir_path):
        res = run_train(cfg, name=name, force=force)
    if res.skipped:
        typer.echo(f"model up to date: {res.model_dir}")
    print_metrics(res, cfg)
    typer.echo(f"metrics: {res.model_dir / 'metrics.json'}")


@app.command()
@_user_errors
def pretrain(config: ConfigOpt = None, set_: SetOpt = None, workdir: WorkdirOpt = None,
             address: AddressOpt = None, force: ForceOpt = False) -> None:
    """Train the plain forward backbone (the baseline, ARV's recommender) and the reverse one (CCG)."""
    from llmser_ray.reporting import print_metrics
    from llmser_ray.stages.pretrain import pretrain as run_pretrain

    cfg = _config(config, set_, workdir, address)
    with workdir_lock(cfg.workdir_path):
        res = run_pretrain(cfg, force=force)
    print_metrics(res.forward, cfg)
    typer.echo(f"forward: {res.forward.model_dir}\nreverse: {res.reverse.model_dir}")


@app.command()
@_user_errors
def embed(config: ConfigOpt = None, set_: SetOpt = None, workdir: WorkdirOpt = None,
          address: AddressOpt = None, force: ForceOpt = False) -> None:
    """Embed every item's text (<workdir>/embeddings) with a Ray Data actor pool."""
    from llmser_ray.stages.embed import embed_items

    cfg = _config(config, set_, workdir, address)
    with workdir_lock(cfg.workdir_path):
        res = embed_items(cfg, force=force)
    typer.echo(f"embeddings {'up to date' if res.skipped else 'written'}: {res.path} "
               f"(model={res.model} dim={res.dim}, {res.seconds:.1f}s)")


@app.command("tslrec-tune")
@_user_errors
def tslrec_tune_cmd(config: ConfigOpt = None, set_: SetOpt = None, workdir: WorkdirOpt = None,
                    address: AddressOpt = None, force: ForceOpt = False) -> None:
    """TSLRec stage 1: LoRA fine-tuning of tslrec.model to reconstruct users' latent-category
    preferences (Ray Train); resumes an interrupted run; prints base vs tuned on held-out users."""
    from llmser_ray.stages.tslrec_tune import tslrec_tune

    cfg = _config(config, set_, workdir, address)
    with workdir_lock(cfg.workdir_path):
        res = tslrec_tune(cfg, force=force)
    m = res.metrics
    typer.echo(f"adapter {'up to date' if res.skipped else 'written'}: {res.path / 'adapter'}")
    for which in ("base", "tuned"):
        r = m[which]
        typer.echo(f"{which:5s} held-out users={r['users']} CE={r['user_ce']:.4f} KL={r['user_kl']:.4f} "
                   f"top1={r['top1_match']:.3f} | items={r['items']} CE={r['item_ce']:.4f} "
                   f"accuracy={r['item_accuracy']:.3f}")
    typer.echo(f"{m['steps']} steps, {m['samples_per_s']:.2f} samples/s; "
               f"metrics: {res.path / 'metrics.json'}")


@app.command("tslrec-embed")
@_user_errors
def tslrec_embed_cmd(config: ConfigOpt = None, set_: SetOpt = None, workdir: WorkdirOpt = None,
                     address: AddressOpt = None, force: ForceOpt = False) -> None:
    """TSLRec stage 2: one item vector per item from the tuned LLM's hidden states (Ray Data)."""
    from llmser_ray.stages.tslrec_embed import tslrec_embed

    cfg = _config(config, set_, workdir, address)
    with workdir_lock(cfg.workdir_path):
        res = tslrec_embed(cfg, force=force)
    typer.echo(f"LLM item embeddings {'up to date' if res.skipped else 'written'}: {res.path} "
               f"(items={res.items} dim={res.dim}, {res.items_per_s:.1f} items/s)")


@app.command("llm-embed")
@_user_errors
def llm_embed_cmd(config: ConfigOpt = None, set_: SetOpt = None, workdir: WorkdirOpt = None,
                  address: AddressOpt = None, force: ForceOpt = False) -> None:
    """One item vector per item from the base LLM's hidden states (<workdir>/llm_base_embeddings):
    the dual view's `semantic.source=llm`; train runs it itself when that source is set."""
    from llmser_ray.stages.llm_embed import llm_embed

    cfg = _config(config, set_, workdir, address)
    with workdir_lock(cfg.workdir_path):
        res = llm_embed(cfg, force=force)
    typer.echo(f"base LLM item embeddings {'up to date' if res.skipped else 'written'}: {res.path} "
               f"(items={res.items} dim={res.dim}, {res.items_per_s:.1f} items/s)")


@app.command()
@_user_errors
def neighbours(config: ConfigOpt = None, set_: SetOpt = None, workdir: WorkdirOpt = None,
               address: AddressOpt = None, force: ForceOpt = False) -> None:
    """Embed each user's history titles and store its nearest users (<workdir>/user_neighbours),
    LLM-ESR's retrieval for self-distillation (train runs it itself when distill.enabled)."""
    from llmser_ray.stages.user_neighbours import user_neighbours

    cfg = _config(config, set_, workdir, address)
    with workdir_lock(cfg.workdir_path):
        res = user_neighbours(cfg, force=force)
    typer.echo(f"user neighbours {'up to date' if res.skipped else 'written'}: {res.path} "
               f"({res.seconds:.1f}s)")


@app.command()
@_user_errors
def augment(config: ConfigOpt = None, set_: SetOpt = None, workdir: WorkdirOpt = None,
            address: AddressOpt = None, force: ForceOpt = False,
            candidates_only: Annotated[bool, typer.Option(
                "--candidates-only", help="Only the collaborative candidates (no LLM).")] = False,
            skip_validate: Annotated[bool, typer.Option(
                "--skip-validate", help="Stop after SIA; run `reliability` later.")] = False) -> None:
    """SIA (candidates, LLM selection, grounding) then ARV reliability weights; resumable."""
    from llmser_ray.reporting import print_summary
    from llmser_ray.stages.candidates import generate_candidates
    from llmser_ray.stages.select import select_items

    cfg = _config(config, set_, workdir, address)
    with workdir_lock(cfg.workdir_path):
        cand = generate_candidates(cfg, force=force)
        typer.echo(f"candidates {'up to date' if cand.skipped else 'written'}: "
                   f"{cand.path} ({cand.users} users)")
        if candidates_only:
            return
        res = select_items(cfg, force=force)
        print_summary("augmented", res.path, res.skipped, res.summary)
        if not skip_validate:
            from llmser_ray.stages.reliability import score_reliability

            val = score_reliability(cfg, force=force)
            print_summary("reliability", val.path, val.skipped, val.summary)


@app.command()
@_user_errors
def reliability(config: ConfigOpt = None, set_: SetOpt = None, workdir: WorkdirOpt = None,
                address: AddressOpt = None, force: ForceOpt = False) -> None:
    """ARV: reliability r_u and weights w_u of the augmented users; resumable."""
    from llmser_ray.reporting import print_summary
    from llmser_ray.stages.reliability import score_reliability

    cfg = _config(config, set_, workdir, address)
    with workdir_lock(cfg.workdir_path):
        val = score_reliability(cfg, force=force)
    print_summary("reliability", val.path, val.skipped, val.summary)


# The stage's name before issue 21 ("validate" collided with the validation split); kept so
# existing scripts keep working.
app.command("validate", help="Same as `reliability` (its former name).")(reliability)


@app.command()
@_user_errors
def run(config: ConfigOpt = None, set_: SetOpt = None, workdir: WorkdirOpt = None,
        address: AddressOpt = None) -> None:
    """Run every stage in order, skipping those whose inputs and config are unchanged."""
    from llmser_ray.stages.run import run_pipeline

    cfg = _config(config, set_, workdir, address)
    with workdir_lock(cfg.workdir_path):
        run_pipeline(cfg)


@app.command()
@_user_errors
def tune(config: ConfigOpt = None, set_: SetOpt = None, workdir: WorkdirOpt = None,
         address: AddressOpt = None,
         fresh: Annotated[bool, typer.Option(
             "--fresh", help="Start a new experiment instead of restoring an interrupted one.")] = False
         ) -> None:
    """Ray Tune over dual-channel training (N, beta, T, lr, ...) on cached upstream stages."""
    from rich.console import Console

    from llmser_ray.stages.tune import summary_table
    from llmser_ray.stages.tune import tune as run_tune

    cfg = _config(config, set_, workdir, address)
    with workdir_lock(cfg.workdir_path):
        out = run_tune(cfg, fresh=fresh)
    console = Console(width=max(Console().width, 140))
    console.print(summary_table(out.table, cfg))
    if out.baseline and out.best:
        from llmser_ray.stages.run import comparison_table

        best = {g: {cfg.eval.metric: out.best.get(f"test_{g}_{cfg.eval.metric}") or float("nan")}
                for g in ("overall", "tail_user", "head_user", "tail_item", "head_item")}
        console.print(comparison_table(out.baseline, best, cfg.eval.metric,
                                       "test, full ranking: baseline vs best trial"))
    console.print(f"report: {out.report_dir / 'report.html'}")


@app.command("serve")
@_user_errors
def serve_cmd(config: ConfigOpt = None, set_: SetOpt = None, workdir: WorkdirOpt = None,
              address: AddressOpt = None,
              host: Annotated[str | None, typer.Option(
                  help="Bind address of the HTTP proxy (default serve.host, 127.0.0.1).")] = None,
              port: Annotated[int | None, typer.Option(help="HTTP port (default serve.port, 8000).")] = None,
              model: Annotated[str | None, typer.Option(
                  help="Model folder under <workdir>/models (default: <backbone>-llmser, else "
                       "<backbone>).")] = None,
              blocking: Annotated[bool, typer.Option(
                  "--blocking/--no-blocking",
                  help="Serve until Ctrl-C (default), or return once deployed (needs --address).")] = True
              ) -> None:
    """Deploy the trained recommender with Ray Serve: POST /recommend, docs at /docs."""
    from llmser_ray.stages.serve import serve as run_serve

    extra = [*(set_ or []), *([f"serve.host={host}"] if host else []),
             *([f"serve.port={port}"] if port is not None else []),
             *([f"serve.model={model}"] if model else [])]
    cfg = _config(config, extra, workdir, address)
    run_serve(cfg, blocking=blocking)
