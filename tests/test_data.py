"""The prepare stage: importers on the real shared files, filters, split, flags, bad input."""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from llmser_ray.config import load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.errors import DataError, StageError
from llmser_ray.stages.prepare import filter_interactions, prepare

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BEAUTY = SHARED / "amazon_beauty_2014_5core"
ML100K = SHARED / "movielens_100k"
ML1M = SHARED / "movielens_1m_metadata_only"
needs_shared = pytest.mark.skipif(not BEAUTY.is_dir(), reason="../shared/data is not present")


def _cfg(tmp: Path, *sets: str):
    return load_config(None, [f"workdir={tmp}", *sets])


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@needs_shared
def test_beauty_s3rec_with_item_text(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "data.source=s3rec", f"data.path={BEAUTY / 'Beauty.txt'}",
               f"data.item_path={BEAUTY / 'items.jsonl'}")
    res = prepare(cfg)
    assert res.counts["users"] == 22363 and res.counts["items"] == 12101
    assert res.counts["interactions"] == 198502 and res.counts["max_len"] == 204
    ds = load_dataset(res.path)
    # Beauty's ids are 1..12101 in the source; renumbering keeps them, so item text still joins.
    assert list(ds.sequences[0]) == [1, 2, 3, 4, 5]
    assert ds.item_text[1].startswith("OPI Nail Lacquer")
    items = pq.read_table(res.path / "items.parquet").to_pandas()
    # 7 items have no title in the source: their text falls back to the attributes.
    assert (items["title"] == "").sum() == 7
    assert (items["text"] != "").all()
    # Tail users: train length <= 9 (LLM-ESR's Beauty threshold).
    assert ds.is_tail_user.sum() == int((ds.train_len <= 9).sum()) == res.counts["tail_users"]
    # Head items are the 20% most popular by training occurrences.
    assert (~ds.is_tail_item[1:]).sum() == int(np.ceil(0.2 * 12101))
    assert ds.popularity[ds.is_tail_item].max() <= ds.popularity[~ds.is_tail_item][1:].min()
    manifest = json.loads((res.path / "manifest.json").read_text())
    assert len(manifest["sources"]) == 2 and manifest["schema_version"] == 1


@needs_shared
def test_movielens_100k_orders_by_timestamp(tmp_path: Path) -> None:
    res = prepare(_cfg(tmp_path, "data.source=movielens", f"data.path={ML100K}"))
    assert res.counts["users"] == 943 and res.counts["items"] == 1682
    assert res.counts["interactions"] == 100000
    ds = load_dataset(res.path)
    raw = pd.read_csv(ML100K / "u.data", sep="\t", names=["u", "i", "r", "t"])
    first = raw[raw.u == 1].sort_values("t", kind="stable")
    assert list(ds.sequences[0]) == first["i"].tolist()  # user 1 keeps id 1, items keep ids
    assert ds.item_text[1] == "Toy Story (1995)"
    items = pq.read_table(res.path / "items.parquet").to_pandas()
    assert set(items.loc[0, "attributes"]) == {"Animation", "Children's", "Comedy"}
    rated4 = prepare(_cfg(tmp_path / "r4", "data.source=movielens", f"data.path={ML100K}",
                          "data.min_rating=4"))
    assert rated4.counts["interactions"] == int((raw.r >= 4).sum())


@needs_shared
def test_movielens_1m_parser_and_missing_ratings(tmp_path: Path) -> None:
    # The shared ml-1m folder has only the metadata: the error must say what is missing.
    with pytest.raises(DataError, match=r"no MovieLens ratings .*movies.dat"):
        prepare(_cfg(tmp_path, "data.source=movielens", f"data.path={ML1M}"))
    # With a ratings file in the ml-1m format, the real movies.dat supplies the text.
    folder = tmp_path / "ml1m"
    folder.mkdir()
    shutil.copy(ML1M / "movies.dat", folder / "movies.dat")
    rows = [f"{u}::{i}::{(u + i) % 5 + 1}::{1000 + 10 * u + k}"
            for u in range(1, 6) for k, i in enumerate((1, 2, 3, 5, 6, 7))]
    _write(folder / "ratings.dat", "\n".join(rows) + "\n")
    res = prepare(_cfg(tmp_path / "w", "data.source=movielens", f"data.path={folder}"))
    ds = load_dataset(res.path)
    assert res.counts == {**res.counts, "users": 5, "items": 6, "interactions": 30}
    assert ds.item_text[1] == "Toy Story (1995)"


def test_csv_with_item_table_string_ids_and_dates(tmp_path: Path) -> None:
    inter = _write(tmp_path / "i.csv", "uid,asin,when\n"
                   "a,X1,2024-01-03\na,X2,2024-01-01\na,X3,2024-01-02\n"
                   "b,X1,2024-02-01\nb,X3,2024-02-02\nb,X2,2024-02-03\n")
    items = _write(tmp_path / "items.csv", "asin,name,tags\nX1,Kettle,kitchen|steel\nX2,Mug,\n")
    res = prepare(_cfg(tmp_path / "w", "data.source=csv", f"data.path={inter}",
                       "data.user_col=uid", "data.item_col=asin", "data.time_col=when",
                       f"data.item_path={items}", "data.title_col=name", "data.attributes_col=tags"))
    ds = load_dataset(res.path)
    # Items sorted as text: X1=1, X2=2, X3=3. User a in time order: X2, X3, X1.
    assert [list(s) for s in ds.sequences] == [[2, 3, 1], [1, 3, 2]]
    assert ds.item_text[1:] == ["Kettle", "Mug", ""]
    table = pq.read_table(res.path / "items.parquet").to_pandas()
    assert list(table.loc[0, "attributes"]) == ["kitchen", "steel"]


def test_parquet_source_and_file_order(tmp_path: Path) -> None:
    df = pd.DataFrame({"user": [7, 7, 7, 8, 8, 8, 8], "item": [30, 10, 20, 10, 20, 30, 10]})
    df.to_parquet(tmp_path / "i.parquet")
    res = prepare(_cfg(tmp_path / "w", "data.source=parquet", f"data.path={tmp_path / 'i.parquet'}",
                       "data.time_col=null"))
    ds = load_dataset(res.path)
    assert [list(s) for s in ds.sequences] == [[3, 1, 2], [1, 2, 3, 1]]
    assert list(ds.train_len) == [1, 2]


def test_kcore_is_iterative_and_single_pass_is_not() -> None:
    # u3 has 2 items; dropping u3 leaves item C with 1 user, which an iterative 2-core removes.
    df = pd.DataFrame({"user": ["u1", "u1", "u1", "u2", "u2", "u3", "u3"],
                       "item": ["A", "B", "C", "A", "B", "C", "D"], "ts": range(7)})
    cfg = load_config(None, ["data.filter=kcore", "data.user_core=3", "data.item_core=2"]).data
    kept = filter_interactions(df, cfg)
    assert kept.empty or set(kept["item"]) <= {"A", "B"}
    single = filter_interactions(df, cfg.model_copy(update={"filter": "single_pass"}))
    # One pass: users with >= 3 and items with >= 2 at the start -> u1's A, B, C survive.
    assert sorted(single["item"]) == ["A", "B", "C"]


def test_min_seq_len_and_split(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.txt", "1 1 2 3 4\n2 5 6 7\n3 1 2\n")
    res = prepare(_cfg(tmp_path / "w", "data.source=s3rec", f"data.path={path}",
                       "data.tail_user_threshold=1"))
    ds = load_dataset(res.path)
    assert ds.num_users == 2  # user 3 has 2 items: too short for leave-one-out
    inputs, targets = ds.split("valid")
    assert [list(x) for x in inputs] == [[1, 2], [5]] and list(targets) == [3, 6]
    inputs, targets = ds.split("test")
    assert [list(x) for x in inputs] == [[1, 2, 3], [5, 6]] and list(targets) == [4, 7]
    assert ds.num_items == 7
    assert list(ds.is_tail_user) == [False, True]


def test_synthetic_catalogue_is_long_tailed_and_deterministic(tmp_path: Path) -> None:
    a = prepare(_cfg(tmp_path / "a"))
    b = prepare(_cfg(tmp_path / "b"))
    assert a.counts == b.counts
    ds = load_dataset(a.path)
    assert 0.5 < ds.is_tail_user.mean() < 0.95
    assert ds.train_len.max() > 3 * np.median(ds.train_len)
    assert all(t for t in ds.item_text[1:])
    # Category-driven behaviour: consecutive items share a category far above chance.
    items = pq.read_table(a.path / "items.parquet").to_pandas()
    cat = {r.item_id: r.attributes[1] for r in items.itertuples()}
    pairs = [(s[i], s[i + 1]) for s in ds.sequences for i in range(len(s) - 1)]
    same = np.mean([cat[x] == cat[y] for x, y in pairs])
    assert same > 0.5, same


def test_rerun_is_noop_and_changed_input_is_noticed(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.txt", "1 1 2 3\n2 2 3 4\n")
    cfg = _cfg(tmp_path / "w", "data.source=s3rec", f"data.path={path}")
    assert not prepare(cfg).skipped
    assert prepare(cfg).skipped
    _write(path, "1 1 2 3\n2 2 3 4 1\n")
    res = prepare(cfg)
    assert not res.skipped and res.counts["interactions"] == 7
    assert not prepare(cfg, force=True).skipped


@pytest.mark.parametrize(
    ("content", "sets", "needle"),
    [
        ("1 1 2 x3\n", ["data.source=s3rec"], "'x3' is not an integer id"),
        ("", ["data.source=s3rec"], "holds no interactions"),
        ("1 1 2\n", ["data.source=s3rec", "data.min_seq_len=5"], "no users left after filtering"),
        ("user,item\n1,2\n", ["data.source=csv"], "column 'timestamp' not in"),
        ("u,item,timestamp\n1,2,3\n", ["data.source=csv"], "column 'user' not in"),
        ("", ["data.source=csv"], "is empty"),
        ("user,item,timestamp\n1,2,yesterday-ish\n", ["data.source=csv"], "neither a number nor a date"),
        ("user,item,timestamp\n1,,3\n", ["data.source=csv"], "empty user or item id"),
    ],
)
def test_bad_input_is_one_clear_error_and_leaves_nothing(tmp_path: Path, content: str,
                                                          sets: list[str], needle: str) -> None:
    path = _write(tmp_path / "in.txt", content)
    wd = tmp_path / "w"
    with pytest.raises(DataError) as e:
        prepare(_cfg(wd, f"data.path={path}", *sets))
    assert needle in str(e.value) and "Fix:" in str(e.value)
    assert "\n" not in str(e.value)
    assert not (wd / "dataset").exists()
    assert not list(wd.glob(".dataset.tmp-*"))


def test_missing_files_and_bad_item_table(tmp_path: Path) -> None:
    seq = _write(tmp_path / "s.txt", "1 1 2 3\n")
    with pytest.raises(DataError, match="file not found"):
        prepare(_cfg(tmp_path / "w", "data.source=s3rec", f"data.path={tmp_path / 'nope.txt'}"))
    with pytest.raises(DataError, match="file not found"):
        prepare(_cfg(tmp_path / "w", "data.source=s3rec", f"data.path={seq}",
                     f"data.item_path={tmp_path / 'nope.jsonl'}"))
    bad = _write(tmp_path / "items.jsonl", '{"item_id": 1, "title": "ok"}\n{not json\n')
    with pytest.raises(DataError, match=r"items.jsonl:2 is not valid JSON"):
        prepare(_cfg(tmp_path / "w", "data.source=s3rec", f"data.path={seq}", f"data.item_path={bad}"))
    assert not (tmp_path / "w" / "dataset").exists()


def test_existing_dataset_survives_a_failed_rerun(tmp_path: Path) -> None:
    path = _write(tmp_path / "s.txt", "1 1 2 3\n")
    cfg = _cfg(tmp_path / "w", "data.source=s3rec", f"data.path={path}")
    prepare(cfg)
    _write(path, "1 1 2 oops\n")
    with pytest.raises(DataError):
        prepare(cfg)
    assert load_dataset(tmp_path / "w" / "dataset").num_users == 1  # the old one is intact


def test_load_dataset_without_prepare_says_so(tmp_path: Path) -> None:
    with pytest.raises(StageError, match="llmser-ray prepare"):
        load_dataset(tmp_path / "dataset")


@needs_shared
def test_download_from_a_mirror_and_offline_message(tmp_path: Path) -> None:
    # A real HTTP server on 127.0.0.1 plays the mirror of the GroupLens archive.
    site = tmp_path / "site"
    site.mkdir()
    with zipfile.ZipFile(site / "ml-100k.zip", "w") as z:
        for name in ("u.data", "u.item"):
            z.write(ML100K / name, f"ml-100k/{name}")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(site))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/ml-100k.zip"
        sets = ["data.source=movielens", "data.download=ml-100k", f"data.cache_dir={tmp_path / 'c'}"]
        res = prepare(_cfg(tmp_path / "w", *sets, f"data.download_url={url}"))
        assert res.counts["users"] == 943
        assert (tmp_path / "c" / "ml-100k" / "u.data").is_file()
        dead = "http://127.0.0.1:9/ml-100k.zip"  # discard port: nothing listens
        with pytest.raises(DataError) as e:
            prepare(_cfg(tmp_path / "w2", *sets[:2], f"data.cache_dir={tmp_path / 'c2'}",
                         f"data.download_url={dead}"))
        assert "cannot download ml-100k" in str(e.value) and "data.path" in str(e.value)
    finally:
        server.shutdown()
