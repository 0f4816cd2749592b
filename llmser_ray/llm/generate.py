"""``generate``: chat requests (a Ray Dataset) -> the same rows with replies, on either backend.

Actor pools are explicit about failures: ``max_restarts=-1`` replaces a dead actor (an engine
killed mid-run) as often as needed over a long run, and ``max_task_retries`` sends its batch to
the replacement, bounded so that a batch which kills every engine it meets fails the job instead
of looping forever. Actors take fractional CPUs (``llm.cpus_per_engine``) so that on a small
machine the read and map tasks feeding them are never starved.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from llmser_ray.config import LLMConfig

# Retries of one batch after its actor died (each on a restarted actor).
BATCH_RETRIES = 3
# The OpenAI client only waits on sockets.
OPENAI_ACTOR_CPUS = 0.25
ROW_INDEX = "__llmser_row"


def _callable(cfg: LLMConfig, cache_dir: str | None) -> tuple[type, dict[str, Any], float, float]:
    if cfg.backend == "vllm":
        from llmser_ray.llm.models import resolve_llm
        from llmser_ray.llm.vllm_backend import VLLMBatch, check_engine_config

        check_engine_config(cfg)
        path = resolve_llm(cfg)  # convert / validate once, on the driver, before any actor starts
        return (VLLMBatch, {"cfg": cfg.model_dump(mode="json"), "model_path": path, "cache_dir": cache_dir},
                cfg.cpus_per_engine, cfg.gpus_per_engine)
    from llmser_ray.llm.openai_backend import OpenAIBatch, check_openai_config

    check_openai_config(cfg)
    return (OpenAIBatch, {"cfg": cfg.model_dump(mode="json"), "cache_dir": cache_dir}, OPENAI_ACTOR_CPUS, 0.0)


def restartable_map_batches(ds: Any, fn: Any, *, max_task_retries: int, **kwargs: Any) -> Any:
    """``map_batches`` whose actors are restarted when they die and whose batches are retried.

    Ray 2.60 has no named parameter for these actor options and warns that the catch-all
    ``**ray_remote_args`` goes away in 2.64; they are still the documented way to set them
    (ActorPoolMapOperator), so the warning is silenced here, in the one place that needs it.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*is deprecated")
        return ds.map_batches(fn, max_restarts=-1, max_task_retries=max_task_retries, **kwargs)


def generate(ds: Any, cfg: LLMConfig, cache_dir: str | Path | None = None) -> Any:
    """Add ``reply``, ``finish_reason``, ``status``, ``error``, ``prompt_tokens``,
    ``completion_tokens`` and ``cached`` to every request row (lazily, like any Ray Data map)."""
    import ray

    cache = str(Path(cache_dir).expanduser().resolve()) if cache_dir is not None else None
    fn, kwargs, cpus, gpus = _callable(cfg, cache)
    return restartable_map_batches(
        ds, fn, fn_constructor_kwargs=kwargs,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_engines),
        num_cpus=cpus, num_gpus=gpus or None,
        batch_size=cfg.batch_size, batch_format="pyarrow",
        max_task_retries=BATCH_RETRIES,
    )


def generate_rows(rows: list[dict[str, Any]], cfg: LLMConfig,
                  cache_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """``generate`` for a list of request dicts; returns them in input order with replies added."""
    import ray

    if not rows:
        return []
    items = [{"guided_json": "", "guided_choice": [], **r, ROW_INDEX: i} for i, r in enumerate(rows)]
    # Several blocks, so that every engine of the pool gets a share of the rows.
    blocks = max(1, min(math.ceil(len(items) / cfg.batch_size), 4 * cfg.num_engines, len(items)))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    out = generate(ds, cfg, cache_dir).take_all()
    out.sort(key=lambda r: r[ROW_INDEX])
    for r in out:
        r.pop(ROW_INDEX)
    return out
