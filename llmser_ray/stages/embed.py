"""The ``embed`` stage: item text -> L2-normalised vectors in ``<workdir>/embeddings/`` (docs/SCHEMA.md).

Item shards go through a Ray Data actor pool (``text.embed.EmbedBatch``): each actor loads the
model once and embeds many batches, and the same code scales to GPUs (``embed.gpus_per_actor``)
on a cluster. The stage is keyed by the model and the dataset digest only: actor counts, batch
size and device change how fast the vectors are computed, not which vectors, so scaling out does
not invalidate a finished stage.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmser_ray.config import Config, EmbedConfig
from llmser_ray.errors import StageError
from llmser_ray.io import read_manifest
from llmser_ray.stages.base import Stage, digest
from llmser_ray.text.embed import VECTORS_FILE, EmbedBatch, resolve_embedding_model

STAGE = Stage(
    name="embed", output="embeddings", schema_version=1, inputs=("prepare",),
    identity=("embed.model", "dataset digest"), schema="docs/SCHEMA.md#embeddings",
    summary="one L2-normalised text vector per item (sentence-transformers, Ray Data actors)")
# Embed fields that change the vectors (the rest only changes speed).
KEY_FIELDS = ("model",)


@dataclass
class EmbedResult:
    path: Path
    skipped: bool
    model: str
    dim: int
    seconds: float


def embed_digest(cfg: EmbedConfig, dataset_digest: str) -> str:
    return digest({"embed": {k: getattr(cfg, k) for k in KEY_FIELDS}, "dataset_digest": dataset_digest})


# Rows per map call, in encode batches: each call embeds a whole block, and sentence-transformers
# sorts a call's texts by length before cutting them into batches, so a batch pads to texts of
# about its own length. Cut into calls of one batch each, a batch of random titles pads to its
# longest (Beauty: 20 tokens on average, 164 at most): measured 3x slower (bench_embed.py).
SORT_WINDOW_BATCHES = 16


def _num_blocks(n_items: int, cfg: EmbedConfig) -> int:
    # Enough blocks that every actor gets work (and a restarted actor loses little), none over
    # SORT_WINDOW_BATCHES encode batches (bounded memory per call), never more blocks than batches.
    wanted = max(4 * cfg.num_actors, math.ceil(n_items / (SORT_WINDOW_BATCHES * cfg.batch_size)))
    return max(1, min(math.ceil(n_items / cfg.batch_size), wanted))


def embed_items(cfg: Config, force: bool = False) -> EmbedResult:
    """Embed every item's ``text`` into ``<workdir>/embeddings`` (skipped when current)."""
    from llmser_ray.stages.prepare import need_dataset

    t0 = time.perf_counter()
    need_dataset(cfg, "embed")
    dataset_dir = cfg.workdir_path / "dataset"
    items_path = dataset_dir / "items.parquet"
    ds_manifest = read_manifest(dataset_dir)
    if ds_manifest is None or not items_path.is_file():
        raise StageError(f"no prepared dataset in {dataset_dir}",
                         "rerun `llmser-ray prepare --force` with the same --workdir")
    dataset_digest = str(ds_manifest.get("config_digest", ""))
    key = embed_digest(cfg.embed, dataset_digest)
    out = STAGE.folder(cfg.workdir_path)
    done = STAGE.current(out, key, force)
    if done is not None and (out / VECTORS_FILE).is_file():
        return EmbedResult(out, True, done["model"], int(done["dim"]), time.perf_counter() - t0)

    import pyarrow.parquet as pq
    import ray

    from llmser_ray.llm.generate import restartable_map_batches
    from llmser_ray.ray_utils import init_ray, quiet_ray_data

    resolve_embedding_model(cfg.embed.model)  # fail on the driver, in one line, before Ray starts
    n_items = pq.read_metadata(items_path).num_rows
    init_ray(cfg.ray)
    quiet_ray_data()  # progress every 30 s in a log, not Ray Data's per-operator chatter
    ds = ray.data.read_parquet(str(items_path)).select_columns(["item_id", "text"])
    # A crashed actor is replaced and its batch retried (explicit, whatever Ray's defaults become).
    ds = restartable_map_batches(
        ds.repartition(_num_blocks(n_items, cfg.embed)), EmbedBatch,
        fn_constructor_kwargs={"cfg": cfg.embed.model_dump(mode="json")},
        compute=ray.data.ActorPoolStrategy(size=cfg.embed.num_actors),
        num_cpus=cfg.embed.cpus_per_actor,
        num_gpus=cfg.embed.gpus_per_actor or None,
        batch_size=None,  # one call per block: the length sort spans the block (_num_blocks)
        batch_format="numpy",
        max_task_retries=3,
    )
    vectors: np.ndarray | None = None
    seen = np.zeros(n_items + 1, dtype=bool)
    for batch in ds.select_columns(["item_id", "vector"]).iter_batches(batch_format="numpy",
                                                                       batch_size=None):
        ids = batch["item_id"].astype(np.int64)
        vecs = np.asarray(batch["vector"], dtype=np.float32)
        if vectors is None:
            vectors = np.zeros((n_items + 1, vecs.shape[1]), dtype=np.float32)
        if ids.min(initial=1) < 1 or ids.max(initial=0) > n_items or seen[ids].any():
            raise StageError(f"{items_path} has item ids outside 1..{n_items} or duplicated",
                             "rerun `llmser-ray prepare --force` to rewrite the dataset")
        seen[ids] = True
        vectors[ids] = vecs
    if vectors is None or not seen[1:].all():
        raise StageError(f"embedding {items_path} missed {int((~seen[1:]).sum())} items",
                         "rerun `llmser-ray embed --force`")
    empty = int((~vectors[1:].any(axis=1)).sum())
    seconds = time.perf_counter() - t0

    from safetensors.numpy import save_file

    with STAGE.publish(out, key, model=cfg.embed.model,
                       model_location=resolve_embedding_model(cfg.embed.model),
                       dim=int(vectors.shape[1]), dataset=str(dataset_dir),
                       dataset_digest=dataset_digest, config=cfg.embed.model_dump(mode="json"),
                       counts={"items": n_items, "empty_texts": empty}, seconds=seconds) as pub:
        save_file({"vectors": vectors}, str(pub.dir / VECTORS_FILE))
    return EmbedResult(out, False, cfg.embed.model, int(vectors.shape[1]), seconds)


def embed_current(cfg: Config) -> bool:
    """Whether ``embeddings/`` holds this model's vectors of the current dataset."""
    ds_manifest = read_manifest(cfg.workdir_path / "dataset")
    if ds_manifest is None:
        return False
    key = embed_digest(cfg.embed, str(ds_manifest.get("config_digest", "")))
    out = STAGE.folder(cfg.workdir_path)
    return STAGE.current(out, key) is not None and (out / VECTORS_FILE).is_file()
