"""Item embeddings (the real MiniLM model on real Beauty titles) and the FAISS actors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from llmser_ray.config import Config, EmbedConfig, FaissConfig, load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.errors import ConfigError, DataError, StageError
from llmser_ray.stages.embed import embed_items
from llmser_ray.stages.prepare import prepare
from llmser_ray.text import faiss_index
from llmser_ray.text.embed import Embedder, load_item_vectors, resolve_embedding_model
from llmser_ray.text.faiss_index import FaissPool, ItemIndex

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BEAUTY = SHARED / "amazon_beauty_2014_5core"

pytestmark = pytest.mark.skipif(not BEAUTY.is_dir(), reason="../shared/data is not present")


def _cfg(workdir: Path, extra: list[str] | None = None) -> Config:
    return load_config(None, [
        f"workdir={workdir}", "data.source=s3rec", f"data.path={workdir / 'Beauty.txt'}",
        f"data.item_path={BEAUTY / 'items.jsonl'}", "ray.num_cpus=4", "ray.include_dashboard=false",
        "embed.num_actors=2", "embed.cpus_per_actor=0.5", "embed.batch_size=64", *(extra or [])])


@pytest.fixture(scope="module")
def small_beauty(tmp_path_factory) -> Path:
    """The first 40 users of Beauty: a few hundred real items with their real titles."""
    wd = tmp_path_factory.mktemp("beauty-small")
    lines = (BEAUTY / "Beauty.txt").read_text().splitlines()[:40]
    (wd / "Beauty.txt").write_text("\n".join(lines) + "\n")
    prepare(_cfg(wd))
    return wd


@pytest.fixture(scope="module")
def embedded(ray_local, small_beauty: Path) -> tuple[Path, np.ndarray]:
    res = embed_items(_cfg(small_beauty))
    assert not res.skipped
    return small_beauty, load_item_vectors(small_beauty)


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return Embedder(EmbedConfig(device="cpu", batch_size=32))


# ----------------------------------------------------------------------------- embeddings


def test_bundled_model_resolves_offline_and_bad_names_fail_clearly(tmp_path: Path, monkeypatch) -> None:
    assert (Path(resolve_embedding_model("all-MiniLM-L6-v2")) / "modules.json").is_file()
    with pytest.raises(ConfigError, match="not a model folder"):
        resolve_embedding_model(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no sentence-transformers model"):
        resolve_embedding_model(str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        resolve_embedding_model("someone/some-model")


def test_encode_is_normalised_float32_and_empty_text_is_zero(embedder: Embedder) -> None:
    texts = ["OPI Nail Lacquer, Simmer and Shimmer", "", "   ", "Maybelline mascara, black"]
    v = embedder.encode(texts)
    assert v.dtype == np.float32 and v.shape == (4, 384)
    assert np.all(np.isfinite(v))
    np.testing.assert_allclose(np.linalg.norm(v[[0, 3]], axis=1), 1.0, atol=1e-5)
    assert not v[1].any() and not v[2].any()
    # The same text embeds the same way alone and in a batch (no cross-talk between rows).
    np.testing.assert_allclose(embedder.encode([texts[3]])[0], v[3], atol=1e-5)


def test_embed_stage_writes_the_schema_and_reruns_as_noop(embedded: tuple[Path, np.ndarray],
                                                         embedder: Embedder) -> None:
    wd, vectors = embedded
    ds = load_dataset(wd / "dataset")
    assert vectors.shape == (ds.num_items + 1, 384) and vectors.dtype == np.float32
    assert not vectors[0].any()
    np.testing.assert_allclose(np.linalg.norm(vectors[1:], axis=1), 1.0, atol=1e-5)
    # Row i is item i's text, whichever actor embedded it.
    probe = [1, ds.num_items // 2, ds.num_items]
    np.testing.assert_allclose(vectors[probe], embedder.encode([ds.item_text[i] for i in probe]), atol=1e-4)
    manifest = json.loads((wd / "embeddings" / "manifest.json").read_text())
    assert manifest["model"] == "all-MiniLM-L6-v2" and manifest["dim"] == 384
    assert manifest["dataset_digest"] == ds.manifest["config_digest"]
    assert manifest["counts"] == {"items": ds.num_items, "empty_texts": 0}
    before = (wd / "embeddings" / "items.safetensors").stat().st_mtime_ns
    again = embed_items(_cfg(wd, ["embed.num_actors=1"]))  # scaling differently changes nothing
    assert again.skipped and again.dim == 384
    assert (wd / "embeddings" / "items.safetensors").stat().st_mtime_ns == before
    # load_item_vectors accepts the embeddings folder itself, too.
    np.testing.assert_array_equal(load_item_vectors(wd / "embeddings"), vectors)


@pytest.mark.parametrize("n, actors", [(12_101, 2), (10_000_000, 16), (300, 4), (10, 1)])
def test_embed_blocks_feed_every_actor_and_bound_the_length_sort_window(n: int, actors: int) -> None:
    """Each map call embeds one whole block (so the model's length sort spans it): blocks must
    give every actor work, stay within SORT_WINDOW_BATCHES batches, and not outnumber the batches."""
    from llmser_ray.stages.embed import SORT_WINDOW_BATCHES, _num_blocks

    cfg = EmbedConfig(num_actors=actors, batch_size=256)
    blocks = _num_blocks(n, cfg)
    rows = -(-n // blocks)
    assert rows <= SORT_WINDOW_BATCHES * 256 + 1
    assert blocks >= min(4 * actors, -(-n // 256))
    assert blocks <= -(-n // 256)  # no more blocks than encode batches


def test_missing_inputs_name_the_stage_to_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(StageError, match="llmser-ray embed"):
        load_item_vectors(tmp_path)
    # No dataset yet: embed runs prepare first (the one upstream rule), whose bad input is the error.
    missing = tmp_path / "missing.txt"
    with pytest.raises(DataError, match="file not found"):
        embed_items(load_config(None, [f"workdir={tmp_path}", "data.source=s3rec", f"data.path={missing}"]))
    assert "[embed] needs prepare" in capsys.readouterr().out


# ----------------------------------------------------------------------------- FAISS


def _numpy_topk(vectors: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    scores = q @ vectors[1:].T
    return -np.sort(-scores, axis=1)[:, :k]


def test_flat_index_is_exact_against_numpy(embedded: tuple[Path, np.ndarray]) -> None:
    _, vectors = embedded
    index = ItemIndex(vectors, FaissConfig())
    q = vectors[1:41]
    scores, ids = index.knn(q, 10)
    np.testing.assert_allclose(scores, _numpy_topk(vectors, q, 10), atol=1e-5)
    assert ids.dtype == np.int64 and (ids >= 1).all() and (ids <= len(vectors) - 1).all()
    # Every returned id really has the returned score (ids are item ids, not FAISS positions).
    np.testing.assert_allclose(np.einsum("nd,nkd->nk", q, vectors[ids]), scores, atol=1e-5)
    assert (ids[:, 0] == np.arange(1, 41)).mean() > 0.9  # an item is (nearly always) its own best match
    assert all(len(set(row)) == 10 for row in ids.tolist())


def test_padding_and_empty_texts_are_never_results_and_short_results_are_padded() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(6, 8)).astype(np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    v[0] = 0
    v[3] = 0  # an item with empty text
    index = ItemIndex(v, FaissConfig())
    scores, ids = index.knn(v[[1]], 7)
    assert sorted(ids[0, :4].tolist()) == [1, 2, 4, 5]
    assert (ids[0, 4:] == -1).all() and np.isneginf(scores[0, 4:]).all()
    s2, i2 = index.knn(v[[1]], 3, allowed=[np.array([0, 3, 5, 5])])
    assert i2[0].tolist() == [5, -1, -1] and np.isneginf(s2[0, 1:]).all()
    with pytest.raises(DataError, match="rerun `llmser-ray embed`"):
        index.cosine(np.array([1]), np.array([99]))


@pytest.mark.parametrize("exact_limit", [faiss_index.EXACT_ALLOWED_MAX, 0])
def test_allowed_sets_restrict_each_query(embedded: tuple[Path, np.ndarray], monkeypatch,
                                          exact_limit: int) -> None:
    """Both paths: the exact gather (small sets) and FAISS's IDSelectorBatch (large sets)."""
    monkeypatch.setattr(faiss_index, "EXACT_ALLOWED_MAX", exact_limit)
    _, vectors = embedded
    rng = np.random.default_rng(1)
    n_items = len(vectors) - 1
    allowed = [rng.choice(np.arange(1, n_items + 1), size=20, replace=False) for _ in range(30)]
    q = vectors[rng.integers(1, n_items + 1, size=30)]
    for cfg in (FaissConfig(), FaissConfig(index="hnsw"), FaissConfig(index="ivf", nlist=8, nprobe=8)):
        scores, ids = ItemIndex(vectors, cfg).knn(q, 5, allowed=allowed)
        for i in range(30):
            assert set(ids[i].tolist()) <= set(allowed[i].tolist()) | {-1}
            if cfg.index == "hnsw" and exact_limit == 0:
                continue  # a graph search under a 20-item filter is approximate (the module says so)
            expect = np.sort(q[i] @ vectors[allowed[i]].T)[::-1][:5]
            np.testing.assert_allclose(scores[i], expect, atol=1e-5)


def test_cosine_matches_numpy_and_is_zero_for_padding(embedded: tuple[Path, np.ndarray]) -> None:
    _, vectors = embedded
    index = ItemIndex(vectors, FaissConfig())
    a = np.array([1, 2, 3, 0, 5])
    b = np.array([4, 2, 9, 7, 0])
    c = index.cosine(a, b)
    expect = np.einsum("ij,ij->i", vectors[a], vectors[b])
    expect[3:] = 0
    np.testing.assert_allclose(c, expect, atol=1e-6)
    assert c[1] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(("cfg", "min_recall"), [
    (FaissConfig(index="ivf", nlist=16, nprobe=4), 0.8),
    (FaissConfig(index="hnsw", hnsw_m=16, ef_search=64), 0.95),
])
def test_approximate_indexes_reach_their_recall(embedded: tuple[Path, np.ndarray], cfg: FaissConfig,
                                                min_recall: float) -> None:
    _, vectors = embedded
    exact = ItemIndex(vectors, FaissConfig())
    approx = ItemIndex(vectors, cfg)
    q = vectors[1::3]
    _, truth = exact.knn(q, 10)
    _, got = approx.knn(q, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(truth.tolist(), got.tolist(), strict=True)])
    assert recall >= min_recall, recall
    assert recall < 1.0 or cfg.index == "hnsw"  # IVF with nprobe < nlist really is approximate


def test_gpu_always_without_faiss_gpu_is_a_config_error(embedded: tuple[Path, np.ndarray]) -> None:
    if faiss_index._gpu_available():
        pytest.skip("a GPU is visible")
    _, vectors = embedded
    with pytest.raises(ConfigError, match="faiss-gpu"):
        ItemIndex(vectors, FaissConfig(use_gpu="always"))
    assert ItemIndex(vectors, FaissConfig(use_gpu="auto")).index is not None  # falls back to CPU


def test_faiss_pool_spreads_calls_and_matches_the_local_index(embedded: tuple[Path, np.ndarray]) -> None:
    _, vectors = embedded
    cfg = FaissConfig(num_actors=2, cpus_per_actor=0.25, threads=1)
    local = ItemIndex(vectors, cfg)
    pool = FaissPool(vectors, cfg)
    try:
        assert len(pool.handles) == 2
        q = vectors[1:51]
        allowed = [np.arange(i + 1, i + 21) for i in range(50)]
        for args in ((q, 8, None), (q, 8, allowed), (q[:1], 3, None)):
            ps, pi = pool.knn(*args)
            ls, li = local.knn(*args)
            np.testing.assert_array_equal(pi, li)
            np.testing.assert_allclose(ps, ls, atol=1e-6)
        a, b = np.arange(1, 41), np.arange(41, 81)
        np.testing.assert_allclose(pool.cosine(a, b), local.cosine(a, b), atol=1e-6)
        np.testing.assert_array_equal(pool.vectors(np.array([0, 3])), vectors[[0, 3]])
    finally:
        pool.shutdown()
