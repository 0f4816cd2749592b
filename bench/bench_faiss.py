"""FAISS k-NN vs NumPy (matmul + argpartition) on the same vectors, in this one script.

Vectors: the real Amazon Beauty item embeddings (all-MiniLM-L6-v2, the ``embed`` stage's model),
then a larger synthetic matrix of unit vectors. Queries are the items themselves. Both sides use
all cores by default (FAISS's OpenMP via ``--threads``, NumPy's BLAS its default) and must return
the same scores.
Also timed: the allowed-set path (each query restricted to 20 candidates, as in grounding) against
a per-query NumPy loop, and the same calls through a ``FaissPool`` of Ray actors. The machine may be
shared: the load average is printed with every figure.

    .venv/bin/python bench/bench_faiss.py --threads 2
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from common import beauty_sets, loadavg

from llmser_ray.config import EmbedConfig, FaissConfig, load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.ray_utils import loopback_node
from llmser_ray.stages.prepare import prepare
from llmser_ray.text.embed import Embedder
from llmser_ray.text.faiss_index import FaissPool, ItemIndex


def load() -> str:
    return f"load {loadavg()}"


def numpy_knn(vectors: np.ndarray, q: np.ndarray, k: int, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The straightforward alternative: scores against every item, argpartition, sort the top k."""
    base = vectors[1:]
    out_s = np.empty((len(q), k), np.float32)
    out_i = np.empty((len(q), k), np.int64)
    for a in range(0, len(q), chunk):
        s = q[a:a + chunk] @ base.T
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        ps = np.take_along_axis(s, part, 1)
        order = np.argsort(-ps, axis=1)
        out_s[a:a + chunk] = np.take_along_axis(ps, order, 1)
        out_i[a:a + chunk] = np.take_along_axis(part, order, 1) + 1
    return out_s, out_i


def best_of(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def compare(name: str, vectors: np.ndarray, n_queries: int, k: int, repeat: int) -> None:
    q = vectors[1:n_queries + 1]
    index = ItemIndex(vectors, FaissConfig())
    tf, (fs, _) = best_of(lambda: index.knn(q, k), repeat)
    tn, (ns, _) = best_of(lambda: numpy_knn(vectors, q, k), repeat)
    np.testing.assert_allclose(fs, ns, atol=1e-4)  # same top-k scores: both exact
    print(f"{name}: {len(vectors) - 1} x {vectors.shape[1]}, {len(q)} queries, k={k}: "
          f"faiss flat {len(q) / tf:,.0f} q/s ({tf:.3f}s), numpy {len(q) / tn:,.0f} q/s ({tn:.3f}s) "
          f"-> faiss/numpy {tn / tf:.2f}x; {load()}", flush=True)


def allowed_sets(vectors: np.ndarray, n_queries: int, repeat: int) -> None:
    rng = np.random.default_rng(0)
    n_items = len(vectors) - 1
    q = vectors[rng.integers(1, n_items + 1, n_queries)]
    allowed = [rng.choice(np.arange(1, n_items + 1), 20, replace=False) for _ in range(n_queries)]
    index = ItemIndex(vectors, FaissConfig())
    tb, (bs, _) = best_of(lambda: index.knn(q, 5, allowed=allowed), repeat)

    def loop() -> np.ndarray:
        return np.stack([np.sort(vectors[a] @ qi)[::-1][:5] for qi, a in zip(q, allowed, strict=True)])

    tl, ls = best_of(loop, repeat)
    np.testing.assert_allclose(bs, ls, atol=1e-5)
    print(f"allowed sets (20 candidates per query), {n_queries} queries, k=5: "
          f"batched {n_queries / tb:,.0f} q/s, per-query numpy loop {n_queries / tl:,.0f} q/s "
          f"-> {tl / tb:.2f}x; {load()}", flush=True)


def pool(vectors: np.ndarray, n_queries: int, actors: int, threads: int) -> None:
    import ray

    with loopback_node():  # as the commands start a local Ray: every port on 127.0.0.1
        ray.init(num_cpus=4, include_dashboard=False)
    cfg = FaissConfig(num_actors=actors, cpus_per_actor=0.5, threads=max(1, threads // actors))
    fp = FaissPool(vectors, cfg)
    q = vectors[1:n_queries + 1]
    fp.knn(q[:10], 10)  # warm
    t, _ = best_of(lambda: fp.knn(q, 10), 3)
    a, b = np.arange(1, n_queries + 1), np.roll(np.arange(1, n_queries + 1), 1)
    tc, _ = best_of(lambda: fp.cosine(a, b), 3)
    print(f"FaissPool ({actors} actors x {cfg.threads} threads): knn {n_queries / t:,.0f} q/s, "
          f"cosine {n_queries / tc:,.0f} pairs/s (includes Ray transfer); {load()}", flush=True)
    fp.shutdown()
    ray.shutdown()


def beauty_vectors(workdir: Path) -> np.ndarray:
    cfg = load_config(None, beauty_sets(workdir))
    prepare(cfg)
    cache = workdir / "bench-vectors.npy"
    if cache.is_file():
        return np.load(cache, allow_pickle=False)
    ds = load_dataset(workdir / "dataset")
    vecs = Embedder(EmbedConfig(device="cpu")).encode(ds.item_text)
    np.save(cache, vecs, allow_pickle=False)
    return vecs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--synthetic", type=int, default=200_000, help="items in the synthetic matrix")
    ap.add_argument("--queries", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--actors", type=int, default=2)
    ap.add_argument("--workdir", default="runs/bench-beauty")
    args = ap.parse_args()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    print(f"machine: {os.cpu_count()} cores; faiss {faiss.__version__}, {args.threads} threads; {load()}")
    beauty = beauty_vectors(Path(args.workdir).resolve())
    compare("beauty (real embeddings)", beauty, min(args.queries, len(beauty) - 1), 10, args.repeat)
    rng = np.random.default_rng(0)
    synth = rng.standard_normal((args.synthetic + 1, beauty.shape[1]), dtype=np.float32)
    synth /= np.linalg.norm(synth, axis=1, keepdims=True)
    synth[0] = 0
    compare("synthetic", synth, args.queries, 10, args.repeat)
    del synth
    allowed_sets(beauty, args.queries, args.repeat)
    pool(beauty, min(args.queries, len(beauty) - 1), args.actors, args.threads)


if __name__ == "__main__":
    main()
