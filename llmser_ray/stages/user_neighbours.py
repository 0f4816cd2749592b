"""The ``user_neighbours`` stage: one text embedding per user and its most similar users (FAISS).

LLM-ESR's retrieval-augmented self-distillation (models/losses.py ``Distillation``) pulls each
user's state towards the mean state of users with similar taste; "similar" is decided once,
here, from text: a user's text is its most recent training-history titles (never the
validation or test item, which would leak the labels into training), embedded by the
``embed`` model, and the ``distill.retrieve`` nearest users by cosine (exact FAISS inner
product on normalised vectors) are stored, best first, the user itself removed. Training uses
the first ``distill.k``. Output schema: docs/SCHEMA.md#user_neighbours.

Users are embedded in this process, not on a Ray Data actor pool like the items: one pass of
tens of thousands of short texts (Beauty: 22,363 users) takes about a minute on one core, less
than an actor pool takes to start on a small machine.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmser_ray.config import Config
from llmser_ray.data.dataset import SeqDataset, load_dataset
from llmser_ray.errors import StageError
from llmser_ray.io import read_manifest
from llmser_ray.stages.base import Stage, digest, needs

SCHEMA_VERSION = 1
STAGE = Stage(
    name="user_neighbours", cli="neighbours", output="user_neighbours", schema_version=SCHEMA_VERSION,
    inputs=("prepare",),
    identity=("embed.model", "distill.retrieve", "distill.max_titles", "dataset digest"),
    schema="docs/SCHEMA.md#user_neighbours",
    summary="a text embedding per user (history titles) and its nearest users by FAISS")
NEIGHBOURS_FILE = "neighbours.parquet"
VECTORS_FILE = "users.safetensors"
PROMPT = "The user has visited the following items: "


@dataclass
class NeighboursResult:
    path: Path
    skipped: bool
    seconds: float


def _key(cfg: Config, dataset_digest: str) -> str:
    return digest({"embed": {"model": cfg.embed.model},
                   "distill": {"retrieve": cfg.distill.retrieve,
                               "max_titles": cfg.distill.max_titles},
                   "dataset_digest": dataset_digest})


def user_texts(ds: SeqDataset, max_titles: int) -> list[str]:
    """Each user's text: the most recent ``max_titles`` item texts of its training part."""
    texts = ds.item_text
    return [PROMPT + "; ".join(texts[i] for i in s[-max_titles:]) for s in ds.train_sequences()]


def nearest_users(vectors: np.ndarray, retrieve: int) -> tuple[np.ndarray, np.ndarray]:
    """``[n, retrieve]`` nearest rows of each row of ``vectors`` (L2-normalised) by inner
    product, best first, the row itself excluded; as 1-based user ids (0 pads when fewer
    exist) and their cosines."""
    import faiss

    n = vectors.shape[0]
    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    want = min(retrieve + 1, n)
    scores, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), want)
    out = np.zeros((n, retrieve), dtype=np.int64)
    sims = np.zeros((n, retrieve), dtype=np.float32)
    for row in range(n):
        # Drop the user itself wherever it landed (ties may put another user first), never by
        # position: a duplicate history must not remove a real neighbour.
        keep = (ids[row] != row) & (ids[row] >= 0)
        got = ids[row][keep][:retrieve]
        out[row, :len(got)] = got + 1
        sims[row, :len(got)] = scores[row][keep][:retrieve]
    return out, sims


def user_neighbours(cfg: Config, force: bool = False) -> NeighboursResult:
    """Embed every user's history titles and store its nearest users (skipped when current)."""
    from llmser_ray.stages.prepare import prepare, prepare_current

    t0 = time.perf_counter()
    needs(STAGE.name, "prepare", lambda: prepare_current(cfg), lambda: prepare(cfg))
    dataset_dir = cfg.workdir_path / "dataset"
    manifest = read_manifest(dataset_dir)
    if manifest is None:
        raise StageError(f"no prepared dataset in {dataset_dir}", "run `llmser-ray prepare` first")
    dataset_digest = str(manifest.get("config_digest", ""))
    key = _key(cfg, dataset_digest)
    out = STAGE.folder(cfg.workdir_path)
    if STAGE.current(out, key, force) is not None and (out / NEIGHBOURS_FILE).is_file():
        return NeighboursResult(out, True, time.perf_counter() - t0)

    import pyarrow as pa
    import pyarrow.parquet as pq
    from safetensors.numpy import save_file

    from llmser_ray.text.embed import Embedder

    ds = load_dataset(dataset_dir)
    texts = user_texts(ds, cfg.distill.max_titles)
    t_embed = time.perf_counter()
    vectors = Embedder(cfg.embed).encode(texts)
    embed_s = time.perf_counter() - t_embed
    t_knn = time.perf_counter()
    ids, sims = nearest_users(vectors, cfg.distill.retrieve)
    knn_s = time.perf_counter() - t_knn
    n = len(texts)
    table = pa.table({
        "user_id": pa.array(np.arange(1, n + 1, dtype=np.int64)),
        "neighbours": pa.array(list(ids), type=pa.list_(pa.int64())),
        "scores": pa.array(list(sims), type=pa.list_(pa.float32())),
    })
    padded = np.zeros((n + 1, vectors.shape[1]), dtype=np.float32)
    padded[1:] = vectors
    with STAGE.publish(out, key, model=cfg.embed.model, dim=int(vectors.shape[1]),
                       retrieve=cfg.distill.retrieve, max_titles=cfg.distill.max_titles,
                       dataset_digest=dataset_digest, counts={"users": n},
                       embed_seconds=embed_s, users_per_s=n / max(embed_s, 1e-9),
                       knn_seconds=knn_s, seconds=time.perf_counter() - t0) as pub:
        pq.write_table(table, pub.dir / NEIGHBOURS_FILE)
        save_file({"vectors": padded}, str(pub.dir / VECTORS_FILE))
    return NeighboursResult(out, False, time.perf_counter() - t0)


def neighbours_current(cfg: Config) -> bool:
    manifest = read_manifest(cfg.workdir_path / "dataset")
    if manifest is None:
        return False
    out = STAGE.folder(cfg.workdir_path)
    key = _key(cfg, str(manifest.get("config_digest", "")))
    return STAGE.current(out, key) is not None and (out / NEIGHBOURS_FILE).is_file()


def load_neighbours(cfg: Config, num_users: int) -> np.ndarray:
    """``[num_users + 1, distill.k]`` neighbour ids (row 0 and missing neighbours: 0)."""
    import pyarrow.parquet as pq

    path = STAGE.folder(cfg.workdir_path) / NEIGHBOURS_FILE
    if not path.is_file():
        raise StageError(f"no user neighbours in {path.parent}",
                         "run `llmser-ray train` with distill.enabled=true (it produces them)")
    table = pq.read_table(path)
    users = table.column("user_id").to_numpy()
    if len(users) != num_users or users.max(initial=0) != num_users:
        raise StageError(f"{path} holds {len(users)} users, the dataset {num_users}",
                         "rerun it on this dataset (train with --force, or delete the folder)")
    out = np.zeros((num_users + 1, cfg.distill.k), dtype=np.int64)
    for u, nb in zip(users, table.column("neighbours").to_pylist(), strict=True):
        nb = nb[:cfg.distill.k]
        out[u, :len(nb)] = nb
    return out
