"""FAISS over the item embeddings: k-NN and pairwise cosine, served by Ray actors.

Why this shape:
- Rows of the ``embeddings/`` matrix are item ids. Only items with a non-zero vector are put in
  the index (the padding row 0 and items with empty text have nothing to match), and results are
  translated back to item ids, so callers never see a FAISS position or the padding id.
- Exact inner product (``IndexFlatIP``) is the default: on normalised rows it is exact cosine,
  and a catalogue below a few million items searches fast enough. IVF and HNSW are there for
  larger ones (config ``faiss.index``).
- Restricting a query to an allowed set (a user's 20 candidates) is computed exactly over that
  set: gathering the few allowed rows costs ``|allowed| * dim`` per query, never more than a flat
  search, is exact for every index type, and batches many queries into one NumPy call. FAISS's
  ``IDSelectorBatch`` needs one search call per query (a selector applies to a whole call) and on
  HNSW a very selective filter hurts recall, so it is used only for large allowed sets
  (above ``EXACT_ALLOWED_MAX`` ids), where gathering would cost more than searching.
- The vectors go into the object store once; every actor of a ``FaissPool`` maps them from there.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import ray

from llmser_ray.config import FaissConfig
from llmser_ray.errors import ConfigError, DataError

# Per-query allowed sets up to this size are scored exactly by gathering their rows.
EXACT_ALLOWED_MAX = 2048
# Memory bound for one gathered chunk (queries x allowed x dim float32).
_CHUNK_BYTES = 64 << 20


def _gpu_available() -> bool:
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def build_index(vectors: np.ndarray, cfg: FaissConfig) -> Any:
    """A FAISS index over ``vectors`` (inner product). Positions are rows of ``vectors``.

    The caller decides which rows go in (``ItemIndex`` passes the non-zero item rows). IVF is
    trained on the same rows; nlist is capped so every list gets about 39 training points (FAISS's
    own minimum), which keeps a small catalogue from producing empty lists.
    """
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, d = vectors.shape
    if cfg.index == "flat":
        index = faiss.IndexFlatIP(d)
    elif cfg.index == "ivf":
        nlist = max(1, min(cfg.nlist, n // 39))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(vectors)
        index.nprobe = min(cfg.nprobe, nlist)  # FAISS's wrapper keeps ``quantizer`` alive
    else:
        index = faiss.IndexHNSWFlat(d, cfg.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = cfg.ef_search
    index.add(vectors)

    want_gpu = cfg.use_gpu == "always" or (cfg.use_gpu == "auto" and _gpu_available())
    if not want_gpu:
        return index
    if not _gpu_available():
        raise ConfigError("faiss.use_gpu=always but faiss-gpu is not installed or no GPU is visible",
                          "install the `gpu` extra (faiss-gpu-cu12) and give the actor a GPU, "
                          "or set faiss.use_gpu=auto")
    if cfg.index == "hnsw":
        if cfg.use_gpu == "always":
            raise ConfigError("faiss.index=hnsw has no GPU implementation",
                              "use faiss.index=flat or ivf on GPU, or faiss.use_gpu=auto")
        return index
    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
    gpu_index._gpu_resources = res  # the resources must outlive the index
    return gpu_index


class ItemIndex:
    """The item vectors plus a FAISS index over the non-empty ones; all answers in item ids."""

    def __init__(self, vectors: np.ndarray, cfg: FaissConfig) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or len(vectors) < 1:
            raise DataError(f"item vectors must be a [num_items + 1, dim] matrix (got {vectors.shape})",
                            "load them with llmser_ray.text.embed.load_item_vectors")
        self.cfg = cfg
        self.matrix = vectors
        self.num_items = len(vectors) - 1
        norms = np.linalg.norm(vectors, axis=1)
        norms[0] = 0.0  # padding is never a result, whatever row 0 holds
        self.item_ids = np.nonzero(norms > 0)[0].astype(np.int64)
        self.indexable = norms > 0
        self.index = build_index(vectors[self.item_ids], cfg) if len(self.item_ids) else None
        # The exact allowed-set path gathers rows of ``matrix`` with an extra zero row as filler.
        self._padded = np.vstack([vectors, np.zeros((1, vectors.shape[1]), np.float32)])
        self._cpu_index: Any = None

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def _check_ids(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() > self.num_items):
            raise DataError(f"item id {int(ids.max() if ids.max() > self.num_items else ids.min())} "
                            f"is outside 0..{self.num_items} of the embeddings",
                            "the embeddings are older than the dataset: rerun `llmser-ray embed`")
        return ids

    def _check_queries(self, queries: np.ndarray) -> np.ndarray:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise DataError(f"queries must be [n, {self.dim}] (got {np.shape(queries)})",
                            "embed queries with the model of the `embed` stage")
        return q

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return self.matrix[self._check_ids(ids)]

    def cosine(self, a_ids: np.ndarray, b_ids: np.ndarray) -> np.ndarray:
        """Row-wise cosine of item pairs; 0 where either side is padding or has empty text."""
        a, b = self._check_ids(a_ids), self._check_ids(b_ids)
        if a.shape != b.shape:
            raise DataError(f"cosine needs two id arrays of one shape (got {a.shape} and {b.shape})",
                            "pass aligned arrays of item ids")
        # Rows are unit or zero vectors, so the dot product is the cosine and zeros give 0.
        out = np.einsum("ij,ij->i", self.matrix[a.ravel()], self.matrix[b.ravel()]).astype(np.float32)
        out[(a.ravel() == 0) | (b.ravel() == 0)] = 0.0
        return out.reshape(a.shape)

    def knn(self, queries: np.ndarray, k: int,
            allowed: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-k items per query by inner product, padded with ``-inf`` / ``-1``."""
        if k < 1:
            raise DataError(f"k must be >= 1 (got {k})", "ask for at least one neighbour")
        q = self._check_queries(queries)
        scores = np.full((len(q), k), -np.inf, dtype=np.float32)
        ids = np.full((len(q), k), -1, dtype=np.int64)
        if allowed is not None:
            if len(allowed) != len(q):
                raise DataError(f"allowed has {len(allowed)} sets for {len(q)} queries",
                                "pass one array of item ids per query (or None)")
            self._knn_allowed(q, k, allowed, scores, ids)
        elif self.index is not None and len(q):
            kk = min(k, len(self.item_ids))
            s, pos = self.index.search(q, kk)
            found = pos >= 0
            scores[:, :kk] = np.where(found, s, -np.inf)
            ids[:, :kk] = np.where(found, self.item_ids[np.maximum(pos, 0)], -1)
        return scores, ids

    def _clean_allowed(self, allowed: np.ndarray) -> np.ndarray:
        a = np.unique(self._check_ids(np.asarray(allowed).ravel()))
        return a[self.indexable[a]]  # drops padding and empty-text items: they are never results

    def _knn_allowed(self, q: np.ndarray, k: int, allowed: list[np.ndarray],
                     scores: np.ndarray, ids: np.ndarray) -> None:
        sets = [self._clean_allowed(a) for a in allowed]
        small = [i for i, s in enumerate(sets) if len(s) <= EXACT_ALLOWED_MAX]
        large = [i for i, s in enumerate(sets) if len(s) > EXACT_ALLOWED_MAX]
        if small:
            width = max(1, max(len(sets[i]) for i in small))
            chunk = max(1, _CHUNK_BYTES // (width * self.dim * 4))
            filler = len(self._padded) - 1
            for start in range(0, len(small), chunk):
                rows = small[start:start + chunk]
                cand = np.full((len(rows), width), filler, dtype=np.int64)
                for r, i in enumerate(rows):
                    cand[r, :len(sets[i])] = sets[i]
                s = np.einsum("nd,nmd->nm", q[rows], self._padded[cand])
                s[cand == filler] = -np.inf
                kk = min(k, width)
                # Highest score first; ties broken by the smaller item id, like a flat index.
                order = np.lexsort((cand, -s), axis=1)[:, :kk]
                top_s = np.take_along_axis(s, order, 1)
                top_i = np.take_along_axis(cand, order, 1)
                valid = np.isfinite(top_s)
                scores[rows, :kk] = np.where(valid, top_s, -np.inf)
                ids[rows, :kk] = np.where(valid, top_i, -1)
        for i in large:
            s, found = self._search_selected(q[i:i + 1], min(k, len(sets[i])), sets[i])
            scores[i, :len(s)] = s
            ids[i, :len(found)] = found

    def _search_selected(self, q: np.ndarray, k: int, allowed_items: np.ndarray) -> tuple[np.ndarray,
                                                                                          np.ndarray]:
        import faiss

        if self._cpu_index is None:
            # Selectors need a CPU index; a GPU index is rebuilt on CPU once, on first use.
            on_cpu = self.cfg.model_copy(update={"use_gpu": "never"})
            self._cpu_index = (self.index if not hasattr(self.index, "getDevice")
                               else build_index(self.matrix[self.item_ids], on_cpu))
        positions = np.searchsorted(self.item_ids, allowed_items).astype(np.int64)
        sel = faiss.IDSelectorBatch(positions)
        if self.cfg.index == "ivf":
            params: Any = faiss.SearchParametersIVF(sel=sel, nprobe=self._cpu_index.nprobe)
        elif self.cfg.index == "hnsw":
            params = faiss.SearchParametersHNSW(sel=sel, efSearch=max(self.cfg.ef_search, k))
        else:
            params = faiss.SearchParameters(sel=sel)
        s, pos = self._cpu_index.search(q, k, params=params)
        found = pos[0] >= 0
        return (np.where(found, s[0], -np.inf).astype(np.float32),
                np.where(found, self.item_ids[np.maximum(pos[0], 0)], -1))


def _set_threads(cfg: FaissConfig) -> None:
    if cfg.threads > 0:
        import faiss

        faiss.omp_set_num_threads(cfg.threads)


@ray.remote(max_restarts=3, max_task_retries=3)
class FaissActor(ItemIndex):
    """An ``ItemIndex`` in a Ray actor. Every method is read-only, so retries after a restart are safe."""

    def __init__(self, vectors: np.ndarray, cfg: dict[str, Any]) -> None:
        fcfg = FaissConfig.model_validate(cfg)
        _set_threads(fcfg)
        super().__init__(vectors, fcfg)

    def ready(self) -> int:
        return len(self.item_ids)


class FaissPool:
    """``cfg.num_actors`` FaissActors sharing one copy of the vectors; calls block and are split
    across the actors (large batches) or rotated between them (small ones)."""

    def __init__(self, vectors: np.ndarray, cfg: FaissConfig) -> None:
        vectors = np.asarray(vectors, dtype=np.float32)
        self.cfg = cfg
        self.dim = int(vectors.shape[1])
        self._vectors_ref = ray.put(vectors)  # kept: a restarted actor rebuilds from it
        self._actors = [
            FaissActor.options(num_cpus=cfg.cpus_per_actor).remote(self._vectors_ref,
                                                                   cfg.model_dump(mode="json"))
            for _ in range(cfg.num_actors)
        ]
        ray.get([a.ready.remote() for a in self._actors])
        self._next = 0

    @property
    def handles(self) -> list[Any]:
        return list(self._actors)

    def _split(self, n: int) -> list[tuple[int, int]]:
        parts = min(len(self._actors), max(1, n))
        step = math.ceil(n / parts) if n else 0
        return [(s, min(n, s + step)) for s in range(0, n, step)] if n else [(0, 0)]

    def _rotate(self) -> Any:
        actor = self._actors[self._next % len(self._actors)]
        self._next += 1
        return actor

    def knn(self, queries: np.ndarray, k: int,
            allowed: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = np.asarray(queries, dtype=np.float32)
        if q.ndim == 1:
            q = q[None, :]
        refs = [self._rotate().knn.remote(q[a:b], k, None if allowed is None else list(allowed[a:b]))
                for a, b in self._split(len(q))]
        parts = ray.get(refs)
        return (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    def cosine(self, a_ids: np.ndarray, b_ids: np.ndarray) -> np.ndarray:
        a, b = np.asarray(a_ids, dtype=np.int64).ravel(), np.asarray(b_ids, dtype=np.int64).ravel()
        if a.shape != b.shape:
            raise DataError(f"cosine needs two id arrays of one shape (got {a.shape} and {b.shape})",
                            "pass aligned arrays of item ids")
        refs = [self._rotate().cosine.remote(a[s:e], b[s:e]) for s, e in self._split(len(a))]
        return np.concatenate(ray.get(refs)).reshape(np.shape(a_ids))

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        return ray.get(self._rotate().vectors.remote(np.asarray(ids, dtype=np.int64)))

    def shutdown(self) -> None:
        for a in self._actors:
            ray.kill(a)
        self._actors = []
