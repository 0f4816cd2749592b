"""The ``tslrec_embed`` stage: TSLRec's information augmentation, item vectors from the tuned LLM.

Each item's prompt (the one the fine-tuning taught to infer the item's latent category) goes
through the LLM with the LoRA adapter of ``tslrec/``; a hidden state (``tslrec.embed_layer``,
pooled by ``tslrec.pooling``) becomes the item's enhanced embedding. Items go through a Ray Data
actor pool as in the ``embed`` stage: each actor loads the model and adapter once and embeds many
batches, and the same code runs on GPUs (``tslrec.embed_gpus``). Output
``<workdir>/llm_item_embeddings/`` (docs/SCHEMA.md#llm_item_embeddings), one row per item id, in
the ``embeddings/`` layout, so any reader of item vectors (the dual-view model, a backbone's item
table initialisation) can take it. Keyed by the adapter's identity (which includes the LLM's),
the layer and the pooling; actor counts and batch sizes only change the speed.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmser_ray.config import Config, TSLRecConfig
from llmser_ray.errors import StageError
from llmser_ray.io import read_manifest
from llmser_ray.stages.base import Stage, digest, needs

STAGE = Stage(
    name="tslrec_embed", output="llm_item_embeddings", schema_version=1, inputs=("tslrec_tune",),
    identity=("the tslrec_tune digest (LLM, adapter, data)", "tslrec.embed_layer", "tslrec.pooling"),
    schema="docs/SCHEMA.md#llm_item_embeddings",
    summary="TSLRec stage 2: one item vector per item from the tuned LLM's hidden states (Ray Data actors)")
VECTORS_FILE = "items.safetensors"


@dataclass
class LLMEmbedResult:
    path: Path
    skipped: bool
    dim: int
    items: int
    seconds: float
    items_per_s: float


class LLMHiddenBatch:
    """Ray Data ``map_batches`` callable: adds ``vector`` (float32 [n, D], raw, not normalised).
    Without ``adapter_dir`` it reads the base LLM (the ``llm_embed`` stage)."""

    def __init__(self, cfg: dict[str, Any], model_dir: str, adapter_dir: str | None) -> None:
        import torch

        from llmser_ray.llm.lora import load_base_model, load_tokenizer, load_tuned

        self.cfg = TSLRecConfig.model_validate(cfg)
        os.environ["HF_HUB_OFFLINE"] = "1"  # local folders only: no hub lookups from an actor
        torch.set_num_threads(max(1, math.ceil(self.cfg.embed_cpus)))
        self.device = "cuda" if self.cfg.embed_gpus > 0 and torch.cuda.is_available() else "cpu"
        dtype = self.cfg.dtype if self.device == "cuda" else "float32"
        self.tok = load_tokenizer(model_dir)
        model = (load_tuned(model_dir, adapter_dir, dtype) if adapter_dir
                 else load_base_model(model_dir, dtype).eval())
        self.model = model.to(self.device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from llmser_ray.llm.lora import hidden_vectors

        prompts = [str(p) for p in batch["prompt"]]
        vecs = [hidden_vectors(self.model, self.tok, prompts[s:s + self.cfg.embed_batch_size],
                               self.cfg.embed_layer, self.cfg.pooling, self.cfg.max_prompt_tokens,
                               self.device)
                for s in range(0, len(prompts), self.cfg.embed_batch_size)]
        return {"item_id": batch["item_id"], "vector": np.concatenate(vecs)}


def embed_identity(cfg: Config, tune_key: str) -> str:
    return digest({"tslrec_tune": tune_key, "embed_layer": cfg.tslrec.embed_layer,
                   "pooling": cfg.tslrec.pooling})


def tslrec_embed(cfg: Config, force: bool = False) -> LLMEmbedResult:
    """Embed every item with the tuned LLM into ``<workdir>/llm_item_embeddings`` (skipped when
    current; the fine-tuning runs first, and says so, when it is missing or stale)."""
    from llmser_ray.stages.tslrec_tune import tslrec_current, tslrec_tune

    t0 = time.perf_counter()
    tuned = needs(STAGE.name, "tslrec_tune", lambda: tslrec_current(cfg), lambda: tslrec_tune(cfg))
    tune_manifest = read_manifest(tuned.path) or {}
    key = embed_identity(cfg, str(tune_manifest.get("config_digest")))
    out = STAGE.folder(cfg.workdir_path)
    done = STAGE.current(out, key, force)
    if done is not None and (out / VECTORS_FILE).is_file():
        return LLMEmbedResult(out, True, int(done["dim"]), int(done["counts"]["items"]),
                              float(done["seconds"]), float(done["items_per_s"]))

    model_dir, adapter_dir = str(tune_manifest["model_dir"]), str(tuned.path / "adapter")
    return embed_items_with_llm(
        cfg, STAGE, out, key, model_dir, adapter_dir, t0,
        model=tune_manifest.get("model"), model_fingerprint=tune_manifest.get("model_fingerprint"),
        adapter=adapter_dir, tslrec_tune_digest=tune_manifest.get("config_digest"),
        dataset_digest=tune_manifest.get("dataset_digest"))


def embed_items_with_llm(cfg: Config, stage: Stage, out: Path, key: str, model_dir: str,
                         adapter_dir: str | None, t0: float, **manifest: Any) -> LLMEmbedResult:
    """Every item's prompt through the LLM (with the adapter, or the base model without one) on a
    Ray Data actor pool; the unit-norm vectors published as ``stage``'s output. Shared by
    ``tslrec_embed`` and ``llm_embed``, so the tuned and base vectors differ only by the adapter."""
    import pyarrow as pa
    import ray

    from llmser_ray.data.dataset import load_dataset
    from llmser_ray.llm.generate import restartable_map_batches
    from llmser_ray.llm.lora import item_prompt, item_texts
    from llmser_ray.ray_utils import init_ray, quiet_ray_data

    ds = load_dataset(cfg.workdir_path / "dataset")
    texts = item_texts(ds.items_table, cfg.tslrec.item_text, cfg.tslrec.title_chars)
    n_items = ds.num_items
    ids = np.arange(1, n_items + 1, dtype=np.int64)
    table = pa.table({"item_id": ids, "prompt": [item_prompt(i, texts) for i in ids]})
    init_ray(cfg.ray)
    quiet_ray_data()  # progress every 30 s in a log, not Ray Data's per-operator chatter
    t = cfg.tslrec
    # As the embed stage: every actor gets work, no block over 16 batches, never more blocks than batches.
    blocks = max(1, min(math.ceil(n_items / t.embed_batch_size),
                        max(4 * t.embed_actors, math.ceil(n_items / (16 * t.embed_batch_size)))))
    t_embed = time.perf_counter()
    data = restartable_map_batches(
        ray.data.from_arrow(table).repartition(blocks), LLMHiddenBatch,
        fn_constructor_kwargs={"cfg": t.model_dump(mode="json"), "model_dir": model_dir,
                               "adapter_dir": adapter_dir},
        compute=ray.data.ActorPoolStrategy(size=t.embed_actors),
        num_cpus=t.embed_cpus, num_gpus=t.embed_gpus or None,
        batch_size=None, batch_format="numpy", max_task_retries=3)
    rerun = f"rerun `{stage.command} --force`"
    vectors: np.ndarray | None = None
    seen = np.zeros(n_items + 1, dtype=bool)
    for batch in data.iter_batches(batch_format="numpy", batch_size=None):
        bid = batch["item_id"].astype(np.int64)
        vecs = np.asarray(batch["vector"], dtype=np.float32)
        if vectors is None:
            vectors = np.zeros((n_items + 1, vecs.shape[1]), dtype=np.float32)
        if seen[bid].any():
            raise StageError("an item was embedded twice", rerun)
        seen[bid] = True
        vectors[bid] = vecs
    if vectors is None or not seen[1:].all():
        raise StageError(f"the LLM embedding missed {int((~seen[1:]).sum())} items", rerun)
    embed_s = time.perf_counter() - t_embed
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = np.divide(vectors, norms, out=np.zeros_like(vectors), where=norms > 0)
    seconds = time.perf_counter() - t0

    from safetensors.numpy import save_file

    with stage.publish(out, key, model_dir=model_dir, layer=t.embed_layer, pooling=t.pooling,
                       dim=int(vectors.shape[1]), counts={"items": n_items}, seconds=seconds,
                       embed_seconds=embed_s, items_per_s=n_items / max(embed_s, 1e-9), **manifest) as pub:
        save_file({"vectors": vectors}, str(pub.dir / VECTORS_FILE))
    return LLMEmbedResult(out, False, int(vectors.shape[1]), n_items, seconds, n_items / max(embed_s, 1e-9))


def load_llm_item_vectors(workdir: str | Path, stage: Stage = STAGE) -> np.ndarray:
    """The ``[num_items + 1, D]`` LLM item matrix of a workdir (row 0 zeros): TSLRec's tuned
    vectors, or ``stage``'s (``llm_embed.STAGE``: the base LLM's)."""
    path = Path(workdir).expanduser() / stage.output / VECTORS_FILE
    if not path.is_file():
        raise StageError(f"no {stage.name} item embeddings in {path.parent}",
                         f"run `{stage.command}` with the same --workdir")
    from safetensors.numpy import load_file

    return load_file(str(path))["vectors"]
