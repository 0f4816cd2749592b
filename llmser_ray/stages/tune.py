"""The ``tune`` stage: Ray Tune over dual-channel (or backbone) training, on cached upstream stages.

Why this shape:
- The upstream stages (prepare, pretrain, candidates, embed, select, reliability) run ONCE before the search.
  The LLM is asked for ``augment.ask_items`` pseudo items and every trial slices its own N, and
  ARV's r_u is reweighted per trial with the trial's beta/T (augment/weights.py), so no trial
  ever calls the LLM. A search over N beyond ask_items is rejected up front.
- Each trial is a function trainable that runs a TorchTrainer (Train V2) with Tune's report
  callback, so ASHA sees every epoch and can stop bad trials early; trials take 0.1 CPU
  themselves and their Train workers take the real resources, which bounds concurrency.
- The experiment is named by a digest of everything that defines it, so rerunning the same
  command after an interruption restores it (finished trials are kept, unfinished ones resume
  from their last Train checkpoint) and a changed search starts a new experiment.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from llmser_ray.config import Config, SearchSpec
from llmser_ray.errors import ConfigError
from llmser_ray.io import write_json
from llmser_ray.stages.base import Stage, digest

STAGE = Stage(
    name="tune", output="tune/<tune.name>-<digest>", schema_version=1,
    inputs=("prepare", "pretrain", "candidates", "select", "reliability"),
    identity=("data.*", "model.*", "train.*", "eval.*", "augment.*", "llm.*", "dual.*",
              "tune.* except max_concurrent_trials"),
    schema="docs/SCHEMA.md#tune", summary="a Ray Tune experiment (restorable) and its HTML/PNG report")

GROUPS = ("overall", "tail_user", "head_user", "tail_item", "head_item")


@dataclass
class TuneOutcome:
    experiment: str
    report_dir: Path
    table: pd.DataFrame
    best: dict[str, Any]
    baseline: dict[str, Any] | None


# ----------------------------------------------------------------------------- search space


def to_domain(spec: SearchSpec) -> Any:
    from ray import tune

    if spec.grid is not None:
        return tune.grid_search(spec.grid)
    if spec.choice is not None:
        return tune.choice(spec.choice)
    if spec.uniform is not None:
        return tune.uniform(*spec.uniform)
    if spec.loguniform is not None:
        return tune.loguniform(*spec.loguniform)
    assert spec.randint is not None
    return tune.randint(spec.randint[0], spec.randint[1] + 1)  # inclusive upper bound in YAML


def largest(spec: SearchSpec) -> float:
    values = spec.grid or spec.choice or spec.uniform or spec.loguniform or spec.randint or []
    return max(float(v) for v in values)


def absolute_paths(tree: dict[str, Any]) -> dict[str, Any]:
    """The config with its local paths absolute: Tune runs each trial in its own working folder,
    where a relative ``workdir`` (the quickstart's ``runs/quickstart``) would name nothing."""
    def fix(section: dict[str, Any], key: str) -> None:
        value = section.get(key)
        if isinstance(value, str) and value and "://" not in value:
            section[key] = str(Path(value).expanduser().resolve())

    fix(tree, "workdir")
    for key in ("path", "item_path", "cache_dir"):
        fix(tree["data"], key)
    fix(tree["ray"], "storage_path")
    fix(tree["llm"], "model_cache")
    return tree


def check_search(cfg: Config) -> None:
    """Reject searches that would need new LLM calls or name keys the config does not have."""
    base = cfg.model_dump(mode="json")
    for key in cfg.tune.search:
        node: Any = base
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ConfigError(f"tune.search: unknown key '{key}'",
                                  "search keys are dotted config keys, e.g. dual.num_pseudo or train.lr")
            node = node[part]
        if key.startswith(("data.", "augment.", "llm.", "embed.", "faiss.", "tune.", "ray.", "serve.",
                           "distill.retrieve", "distill.max_titles", "semantic.source")):
            raise ConfigError(f"tune.search: '{key}' would change a cached upstream stage",
                              "search only training-time keys (dual.*, train.*, model.*)")
    if cfg.tune.target == "backbone":
        dual = [k for k in cfg.tune.search if k.startswith("dual.")]
        if dual:
            raise ConfigError(f"tune.target=backbone trains without augmentation, but tune.search has {dual}",
                              "drop the dual.* keys, or set tune.target=dual")
        return
    n = cfg.tune.search.get("dual.num_pseudo")
    if n is not None and largest(n) > cfg.augment.ask_items:
        raise ConfigError(f"tune.search asks for dual.num_pseudo up to {largest(n):g} but the LLM is asked "
                          f"for augment.ask_items={cfg.augment.ask_items}",
                          f"set augment.ask_items >= {math.ceil(largest(n))} "
                          "so one augmentation serves all trials")
    t = cfg.dual.decay_threshold if cfg.dual.decay_threshold is not None else cfg.data.tail_user_threshold
    if ("dual.beta" in cfg.tune.search and "dual.decay_threshold" not in cfg.tune.search
            and cfg.augment.users == "tail" and t >= cfg.data.tail_user_threshold):
        # beta only scales the weight of users longer than T; tail users are never longer.
        raise ConfigError("tune.search varies dual.beta, which has no effect here: only tail users "
                          f"(length <= {cfg.data.tail_user_threshold}) are augmented and beta applies "
                          f"to users longer than T = {t}",
                          "set augment.users=all (the decay then weighs down long histories), or "
                          "search dual.decay_threshold below the tail threshold, or drop dual.beta")
    if n is not None and largest(n) > cfg.augment.num_candidates:
        raise ConfigError(f"tune.search asks for dual.num_pseudo up to {largest(n):g} but only "
                          f"augment.num_candidates={cfg.augment.num_candidates} candidates exist",
                          "raise augment.num_candidates or lower the search range")


# Keys a continuous search domain may hand over as floats.
INTEGER_KEYS = ("num_pseudo", "decay_threshold", "epochs", "num_negatives", "hidden", "layers",
                "heads", "max_len", "batch_size")


def trial_base(cfg: Config) -> dict[str, Any]:
    """The config every trial starts from. A search over ``model.backbone`` leaves out the keys
    with per-backbone defaults the user did not set (config.BACKBONE_DEFAULTS), so that each
    trial's backbone gets its own measured defaults, not the base backbone's."""
    base = absolute_paths(cfg.model_dump(mode="json"))
    if "model.backbone" in cfg.tune.search:
        for dotted in cfg.backbone_defaulted():
            section, key = dotted.split(".")
            del base[section][key]
    return base


def trial_config(base: dict[str, Any], params: dict[str, Any]) -> Config:
    tree = json.loads(json.dumps(base))
    for key, value in params.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = int(round(value)) if leaf in INTEGER_KEYS else value
    tree["dual"]["enabled"] = tree["tune"]["target"] == "dual"
    return Config.model_validate(tree)


def resolve_trials_semantic(cfg: Config) -> tuple[Config, str | None]:
    """``semantic.enabled=auto`` decided once, as every trial would decide it (trials train the
    dual channel exactly when ``tune.target=dual``), so the experiment's name says what the trials
    do; left to each trial only when the search varies the backbone, which the rule reads."""
    from llmser_ray.io import read_manifest
    from llmser_ray.models.naming import resolve_semantic

    if cfg.semantic.enabled != "auto" or "model.backbone" in cfg.tune.search:
        return cfg, None
    dual = cfg.dual.model_copy(update={"enabled": cfg.tune.target == "dual"})
    as_trial = cfg.model_copy(update={"dual": dual})
    resolved, why = resolve_semantic(as_trial, read_manifest(cfg.workdir_path / "dataset") or {})
    return cfg.model_copy(update={"semantic": resolved.semantic}), why


def llmesr_sections(cfg: Config) -> list[str]:
    """LLM-ESR's sections a search uses: enabled in the base config or searched."""
    return [s for s in ("semantic", "distill")  # an unresolved "auto" (backbone searched) may be on
            if getattr(cfg, s).enabled is not False or any(k.startswith(f"{s}.") for k in cfg.tune.search)]


def experiment_name(cfg: Config) -> str:
    """The experiment's folder under tune/: its identity, with ``semantic.enabled=auto`` decided
    as the trials decide it (so a caller with the unresolved config finds the same folder)."""
    cfg = resolve_trials_semantic(cfg)[0]
    payload = {s: cfg.model_dump(mode="json")[s] for s in ("data", "model", "train", "eval", "augment",
                                                            "llm", "dual", "tune",
                                                            *llmesr_sections(cfg))}
    payload["tune"].pop("max_concurrent_trials", None)  # resources, not the experiment's identity
    if cfg.tslrec.init_backbone:  # trials start from TSLRec's item vectors: another experiment
        payload["tslrec"] = cfg.model_dump(mode="json")["tslrec"]
    return f"{cfg.tune.name}-{digest(payload)[:10]}"


# ----------------------------------------------------------------------------- the trainable


def _trial(params: dict[str, Any], base: dict[str, Any], name: str) -> None:
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from llmser_ray.stages.train import ray_storage, train

    cfg = trial_config(base, params)
    # Stable locations (not Tune's session-local trial dir), so a restored experiment finds
    # each unfinished trial's Train checkpoints and resumes it instead of starting over.
    trial = tune.get_context().get_trial_id()
    out_dir = cfg.workdir_path / "tune" / name / "trials" / trial
    res = train(cfg, out_dir=out_dir, callbacks=[TuneReportCallback()],
                storage_uri=ray_storage(cfg, f"tune/{name}/trials/{trial}"))
    metrics = json.loads((res.model_dir / "metrics.json").read_text())
    final: dict[str, Any] = {"epoch": metrics["epochs_run"], "best_epoch": res.best_epoch,
                             "completed": 1, "model_dir": str(res.model_dir),
                             f"valid_{cfg.eval.metric}": res.valid["overall"][cfg.eval.metric]}
    for protocol, groups in res.test.items():
        for g, m in groups.items():
            for k, v in m.items():
                final[f"test_{protocol}_{g}_{k}"] = v
    tune.report(final)


def check_early_stop_cleanup(cfg: Config, ray_started: bool, wait_s: float = 30.0) -> None:
    """ASHA stops a trial by killing it, which kills its Ray Train controller; the CPUs of the
    trial's workers (a placement group that lives as long as the search's driver) are then freed
    only by Ray Train's cleaner actor, which asks the dashboard's state API whether the
    controller is still alive. Without the dashboard the cleaner never learns it died: every
    stopped trial keeps its CPUs, and once they add up to the cluster's the search waits
    forever (seen on 4 CPUs: 3.2 held after three ASHA stops, two trials pending 15 minutes,
    nothing in the log). So refuse that up front, before (local Ray) or after (a cluster) Ray
    starts, instead of hanging."""
    if cfg.tune.scheduler != "asha":  # FIFO trials end on their own and free their CPUs
        return
    fix = ("keep Ray's dashboard on (ray.include_dashboard=true, the default; on a cluster start the "
           "head with it) or set tune.scheduler=fifo")
    if not ray_started:
        from llmser_ray.ray_utils import cluster_address

        if not cfg.ray.include_dashboard and cluster_address(cfg.ray) is None:
            raise ConfigError("tune.scheduler=asha with ray.include_dashboard=false would hang: Ray Train "
                              "frees the CPUs of a trial ASHA stops only through the dashboard", fix)
        return
    import time

    from ray.util.state import list_actors

    deadline = time.monotonic() + wait_s  # a dashboard still starting answers within seconds
    while True:
        try:
            list_actors(limit=1, timeout=10, raise_on_missing_output=False)
            return
        except Exception as e:  # noqa: BLE001 - any failure means the cleaner cannot ask either
            last = e
        if time.monotonic() >= deadline:
            break
        time.sleep(2)
    raise ConfigError(f"tune.scheduler=asha needs Ray's state API (the dashboard), which does not "
                      f"answer ({type(last).__name__}): trials ASHA stops would keep their CPUs and "
                      "the search would hang", fix)


def _concurrency(cfg: Config) -> int:
    import ray

    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    per_trial = cfg.train.num_workers * cfg.train.cpus_per_worker + 0.1
    return max(1, int(ray.cluster_resources().get("CPU", 1) // per_trial))


def tune(cfg: Config, fresh: bool = False) -> TuneOutcome:
    """Run (or restore) the search and write the report; see the module docstring."""
    from ray import tune as rtune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from llmser_ray.ray_utils import init_ray, quiet_ray_data
    from llmser_ray.stages.run import upstream
    from llmser_ray.stages.train import ray_storage

    if not cfg.tune.search:
        raise ConfigError("tune.search is empty", "add a search space, e.g. "
                          "tune: {search: {dual.num_pseudo: {grid: [4, 8, 12]}}} (see tune_configs/)")
    check_search(cfg)
    check_early_stop_cleanup(cfg, ray_started=False)
    init_ray(cfg.ray)
    check_early_stop_cleanup(cfg, ray_started=True)
    quiet_ray_data()
    if cfg.tune.target == "dual":
        up = upstream(cfg)
    else:  # the backbone alone: its dataset is all it reads
        from llmser_ray.stages.prepare import prepare

        prepare(cfg)
        up = {}
    cfg, why = resolve_trials_semantic(cfg)
    if why:
        print(f"[tune] {why}", flush=True)
    # LLM-ESR's inputs once, here: trials running at once must not all produce them.
    if "semantic" in llmesr_sections(cfg):  # the table semantic.source names, as train asks for it
        from llmser_ray.stages.train import need_semantic_table

        need_semantic_table(cfg)
    if "distill" in llmesr_sections(cfg):
        from llmser_ray.stages.user_neighbours import user_neighbours

        user_neighbours(cfg)
    name = experiment_name(cfg)
    storage = ray_storage(cfg, "tune")
    path = f"{storage.rstrip('/')}/{name}"
    metric = f"valid_{cfg.eval.metric}"
    base = trial_base(cfg)
    trainable = rtune.with_resources(rtune.with_parameters(_trial, base=base, name=name), {"CPU": 0.1})
    if not fresh and rtune.Tuner.can_restore(path):
        print(f"[tune] restoring {path}", flush=True)
        tuner = rtune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        # max_t one past the epoch budget: ASHA stops a trial AT max_t, which would cut the
        # final report (test metrics) of every trial that trains to the end.
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs + 1,
                                   grace_period=cfg.tune.grace_period,
                                   reduction_factor=cfg.tune.reduction_factor)
                     if cfg.tune.scheduler == "asha" else FIFOScheduler())
        tuner = rtune.Tuner(
            trainable,
            param_space={k: to_domain(v) for k, v in cfg.tune.search.items()},
            tune_config=rtune.TuneConfig(metric=metric, mode="max", scheduler=scheduler,
                                         num_samples=cfg.tune.num_samples,
                                         max_concurrent_trials=_concurrency(cfg),
                                         trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
            run_config=rtune.RunConfig(name=name, storage_path=storage, verbose=1,
                                       failure_config=rtune.FailureConfig(max_failures=2)),
        )
    print(f"[tune] experiment {name}: {path}", flush=True)
    grid = tuner.fit()
    table = results_table(grid, cfg)
    baseline = up.get("baseline")
    report_dir = cfg.workdir_path / "tune" / name / "report"
    best = write_report(table, baseline, report_dir, cfg)
    return TuneOutcome(name, report_dir, table, best, baseline)


# ----------------------------------------------------------------------------- results


def results_table(grid: Any, cfg: Config) -> pd.DataFrame:
    rows = []
    metric = cfg.eval.metric
    for result in grid:
        if result.metrics is None:
            continue
        m = result.metrics
        df = result.metrics_dataframe
        row: dict[str, Any] = {"trial": m.get("trial_id", Path(result.path).name)}
        for key in cfg.tune.search:
            row[key] = (result.config or {}).get(key)
        best_valid = m.get("best_metric")
        if df is not None and f"valid_{metric}" in df:
            best_valid = float(df[f"valid_{metric}"].max())
            for g in ("tail_user", "head_user"):
                col = f"valid_{g}_{metric}"
                if col in df:
                    row[f"valid_{g}"] = float(df.loc[df[f"valid_{metric}"].idxmax(), col])
        row["valid_best"] = best_valid
        row["epochs"] = int(m.get("epoch", 0))
        row["status"] = ("completed" if m.get("completed")
                         else "error" if result.error else "stopped (ASHA)")
        for g in GROUPS:
            for k in (metric, f"hr@{metric.split('@')[1]}"):
                row[f"test_{g}_{k}"] = m.get(f"test_full_{g}_{k}")
        row[f"test_sampled_overall_{metric}"] = m.get(f"test_sampled_overall_{metric}")
        rows.append(row)
    return pd.DataFrame(rows).sort_values("valid_best", ascending=False, na_position="last")


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def write_report(table: pd.DataFrame, baseline: dict[str, Any] | None, out: Path,
                 cfg: Config) -> dict[str, Any]:
    """summary.csv/json, plots (PNG) and report.html with everything embedded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    metric = cfg.eval.metric
    table.to_csv(out / "summary.csv", index=False)
    completed = table[table["status"] == "completed"]
    best = completed.iloc[0].to_dict() if len(completed) else (table.iloc[0].to_dict() if len(table) else {})
    write_json(out / "summary.json", {"best": best, "baseline": baseline, "trials": table.to_dict("records")})

    images: dict[str, str] = {}
    for key in cfg.tune.search:
        if key not in table or table[key].isna().all() or not pd.api.types.is_numeric_dtype(table[key]):
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for col, label in (("valid_best", f"valid {metric}"), (f"test_tail_user_{metric}", "test tail users"),
                           (f"test_head_user_{metric}", "test head users")):
            if col in table and table[col].notna().any():
                sub = table[[key, col]].dropna()
                ax.scatter(sub[key], sub[col], label=label, alpha=0.8)
        if baseline:
            ax.axhline(baseline["tail_user"][metric], ls="--", color="grey", lw=1, label="baseline tail")
            ax.axhline(baseline["head_user"][metric], ls=":", color="grey", lw=1, label="baseline head")
        if key == "train.lr":
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel(metric)
        ax.legend(fontsize=7)
        ax.set_title(f"{metric} against {key}")
        images[key] = _png(fig)
        (out / f"{key.replace('.', '_')}.png").write_bytes(base64.b64decode(images[key]))
        plt.close(fig)
    if best and baseline:
        fig, ax = plt.subplots(figsize=(6, 3.6))
        xs = list(range(len(GROUPS)))
        base_v = [baseline[g][metric] for g in GROUPS]
        best_v = [best.get(f"test_{g}_{metric}") or 0.0 for g in GROUPS]
        ax.bar([x - 0.2 for x in xs], base_v, width=0.4, label="baseline")
        ax.bar([x + 0.2 for x in xs], best_v, width=0.4, label="best trial")
        ax.set_xticks(xs, GROUPS, fontsize=8)
        ax.set_ylabel(f"test {metric} (full ranking)")
        ax.legend(fontsize=8)
        ax.set_title("tail vs head: baseline and the best trial")
        images["groups"] = _png(fig)
        (out / "groups.png").write_bytes(base64.b64decode(images["groups"]))
        plt.close(fig)

    rows = ["<tr><td>baseline (no augmentation)</td>" + "".join(
        f"<td>{baseline[g][metric]:.4f}</td>" for g in GROUPS) + "</tr>"] if baseline else []
    page = [f"<html><head><meta charset='utf-8'><title>llmser-ray tune: {html.escape(cfg.tune.name)}</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}</style></head><body>",
            f"<h1>Tune report: {html.escape(cfg.tune.name)}</h1>",
            f"<p>Metric: validation {metric} (selection), test {metric} by group, full ranking.</p>",
            "<h2>Baseline vs best trial (test)</h2><table><tr><th></th>"
            + "".join(f"<th>{g}</th>" for g in GROUPS) + "</tr>", *rows]
    if best:
        page.append("<tr><td>best trial</td>" + "".join(
            f"<td>{(best.get(f'test_{g}_{metric}') or float('nan')):.4f}</td>" for g in GROUPS) + "</tr>")
    page.append("</table><h2>All trials</h2>")
    page.append(table.to_html(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))
    for key, data in images.items():
        page.append(f"<h3>{html.escape(key)}</h3><img src='data:image/png;base64,{data}'/>")
    page.append("<h2>Config</h2><pre>" + html.escape(json.dumps(cfg.model_dump(mode="json"), indent=2))
                + "</pre></body></html>")
    (out / "report.html").write_text("\n".join(page))
    return best


def summary_table(table: pd.DataFrame, cfg: Config, limit: int = 20) -> Any:
    """The trials as a readable rich table: searched keys, status, validation and test by group."""
    from rich.table import Table

    metric = cfg.eval.metric
    out = Table(title=f"trials (sorted by validation {metric})")
    cols = [*cfg.tune.search, "status", "epochs", "valid_best", f"test_overall_{metric}",
            f"test_tail_user_{metric}", f"test_head_user_{metric}", f"test_tail_item_{metric}"]
    cols = [c for c in cols if c in table]
    for c in cols:
        out.add_column(c.replace(f"_{metric}", "").replace("test_", "test "), justify="right")
    for _, row in table.head(limit).iterrows():
        cells = []
        for c in cols:
            v = row[c]
            cells.append("-" if v is None or (isinstance(v, float) and math.isnan(v))
                         else f"{v:.4f}" if isinstance(v, float) else str(v))
        out.add_row(*cells)
    return out
