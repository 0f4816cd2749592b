"""The ``prepare`` stage: raw interactions -> the versioned Parquet dataset (docs/SCHEMA.md).

Steps: import (``importers`` / ``synthetic``) -> order each user's interactions by time (stable,
so ties keep the file order) -> filter (k-core, single pass, or none) -> drop users shorter
than ``min_seq_len`` -> renumber users and items to 1..N -> leave-one-out split -> popularity
and long-tail flags -> write atomically with a manifest.

The manifest's ``config_digest`` hashes the ``data`` config together with the checksums of the
source files, so a changed input file changes the digest of every stage downstream.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from llmser_ray.config import Config, DataConfig
from llmser_ray.errors import DataError
from llmser_ray.io import read_manifest, sha256_file
from llmser_ray.stages.base import Stage, digest, needs

STAGE = Stage(
    name="prepare", output="dataset", schema_version=1, inputs=(),
    identity=("data.* except cache_dir", "sha256 of every source file"), schema="docs/SCHEMA.md#dataset",
    summary="the versioned dataset: sequences.parquet and items.parquet, leave-one-out split")
SCHEMA_VERSION = STAGE.schema_version


@dataclass
class PrepareResult:
    path: Path
    skipped: bool
    counts: dict[str, Any]


def load_raw(cfg: DataConfig):
    from llmser_ray.data import importers, synthetic

    if cfg.download and not cfg.path:
        from llmser_ray.data.download import fetch

        cfg = cfg.model_copy(update={"path": fetch(cfg)})
    if cfg.source == "synthetic":
        return synthetic.generate(cfg.synthetic)
    if cfg.source == "s3rec":
        return importers.read_s3rec(cfg)
    if cfg.source == "movielens":
        return importers.read_movielens(cfg)
    return importers.read_table(cfg)


def filter_interactions(df: pd.DataFrame, cfg: DataConfig) -> pd.DataFrame:
    """k-core (repeat until stable), a single pass (the reference papers), or nothing."""
    if cfg.filter == "none":
        return df
    for _ in range(10_000 if cfg.filter == "kcore" else 1):
        ucount = df.groupby("user")["item"].transform("size")
        icount = df.groupby("item")["user"].transform("size")
        keep = (ucount >= cfg.user_core) & (icount >= cfg.item_core)
        if keep.all():
            break
        df = df[keep]
    return df


def _digest(cfg: DataConfig, sources: dict[str, str]) -> str:
    payload = {"data": cfg.model_dump(mode="json"), "sources": sorted(sources.values())}
    payload["data"].pop("cache_dir", None)
    return digest(payload)


def _source_checksums(cfg: DataConfig) -> dict[str, str]:
    """Checksums of the inputs, computed before importing so an unchanged rerun is cheap."""
    if cfg.source == "synthetic":
        return {}
    paths: list[Path] = []
    p = Path(cfg.path).expanduser() if cfg.path else None
    if p is not None:
        if p.is_dir():
            paths += [q for q in sorted(p.iterdir())
                      if q.name in ("u.data", "u.item", "ratings.dat", "movies.dat")]
        elif p.is_file():
            paths.append(p)
    if cfg.item_path and Path(cfg.item_path).expanduser().is_file():
        paths.append(Path(cfg.item_path).expanduser())
    return {str(q.resolve()): sha256_file(q) for q in paths}


def build_tables(raw, cfg: DataConfig) -> tuple[pa.Table, pa.Table, dict[str, Any]]:
    inter = raw.interactions
    if inter.empty:
        where = ", ".join(str(s) for s in raw.sources) or "the source"
        raise DataError(f"{where} holds no interactions", "point data.path at a non-empty file")
    n_raw_users = inter["user"].nunique()
    inter = inter.reset_index(drop=True)
    inter["_row"] = np.arange(len(inter))
    inter = inter.sort_values(["user", "ts", "_row"], kind="stable")
    inter = filter_interactions(inter, cfg)
    lengths = inter.groupby("user")["item"].transform("size")
    inter = inter[lengths >= cfg.min_seq_len]
    if inter.empty:
        raise DataError(
            f"no users left after filtering ({n_raw_users} users before; filter={cfg.filter}, "
            f"user_core={cfg.user_core}, item_core={cfg.item_core}, min_seq_len={cfg.min_seq_len})",
            "lower data.user_core / data.item_core / data.min_seq_len or use data.filter=none")

    item_ids = _ordered_ids(inter["item"])
    user_ids = _ordered_ids(inter["user"])
    item_index = {k: i + 1 for i, k in enumerate(item_ids)}
    user_index = {k: i + 1 for i, k in enumerate(user_ids)}
    inter = inter.assign(uid=inter["user"].map(user_index), iid=inter["item"].map(item_index))
    inter = inter.sort_values(["uid", "ts", "_row"], kind="stable")
    grouped = inter.groupby("uid", sort=True)["iid"].apply(lambda s: s.to_numpy(dtype=np.int64))
    seqs = grouped.tolist()
    train_len = np.array([len(s) - 2 for s in seqs], dtype=np.int64)

    num_items = len(item_ids)
    popularity = np.zeros(num_items + 1, dtype=np.int64)
    train_items = np.concatenate([s[:-2] for s in seqs]) if seqs else np.zeros(0, np.int64)
    np.add.at(popularity, train_items, 1)
    n_head = max(1, math.ceil(cfg.head_item_share * num_items))
    order = np.lexsort((np.arange(1, num_items + 1), -popularity[1:]))  # by popularity, then id
    is_tail_item = np.ones(num_items + 1, dtype=bool)
    is_tail_item[order[:n_head] + 1] = False
    is_tail_user = train_len <= cfg.tail_user_threshold

    text = raw.items.set_index("item") if len(raw.items) else None
    titles, attributes = [], []
    for key in item_ids:
        if text is not None and key in text.index:
            row = text.loc[key]
            titles.append(str(row["title"]))
            attributes.append([str(a) for a in row["attributes"]])
        else:
            titles.append("")
            attributes.append([])
    texts = [t if t else ", ".join(a) for t, a in zip(titles, attributes, strict=True)]

    sequences = pa.table({
        "user_id": pa.array(np.arange(1, len(seqs) + 1), pa.int64()),
        "original_user": pa.array(user_ids, pa.string()),
        "items": pa.array(seqs, pa.list_(pa.int64())),
        "train_len": pa.array(train_len, pa.int64()),
        "is_tail_user": pa.array(is_tail_user, pa.bool_()),
    })
    items = pa.table({
        "item_id": pa.array(np.arange(1, num_items + 1), pa.int64()),
        "original_item": pa.array(item_ids, pa.string()),
        "title": pa.array(titles, pa.string()),
        "attributes": pa.array(attributes, pa.list_(pa.string())),
        "text": pa.array(texts, pa.string()),
        "popularity": pa.array(popularity[1:], pa.int64()),
        "is_tail_item": pa.array(is_tail_item[1:], pa.bool_()),
    })
    full_len = train_len + 2
    counts = {
        "users": len(seqs), "items": num_items, "interactions": int(full_len.sum()),
        "tail_users": int(is_tail_user.sum()), "tail_items": int(is_tail_item[1:].sum()),
        "items_with_text": int(sum(bool(t) for t in texts)),
        "mean_len": round(float(full_len.mean()), 3), "median_len": float(np.median(full_len)),
        "max_len": int(full_len.max()), "raw_users": int(n_raw_users),
    }
    return sequences, items, counts


def _ordered_ids(ids: pd.Series) -> list[str]:
    """Numeric ids keep their numeric order (Beauty's 1..12101 stay 1..12101); others sort as text."""
    uniq = pd.unique(ids)
    if all(str(u).lstrip("-").isdigit() for u in uniq):
        return [str(u) for u in sorted(uniq, key=int)]
    return sorted(str(u) for u in uniq)


def _check_paths(dcfg: DataConfig) -> None:
    if not dcfg.download or dcfg.path:
        for key, value in (("data.path", dcfg.path), ("data.item_path", dcfg.item_path)):
            if value and not Path(value).expanduser().exists():
                raise DataError(f"file not found: {Path(value).expanduser()}",
                                f"point {key} at an existing file or folder")


def prepare_current(cfg: Config) -> bool:
    """Whether ``<workdir>/dataset`` holds this data config's dataset (cheap: checksums only)."""
    try:
        _check_paths(cfg.data)
    except DataError:
        return False
    key = _digest(cfg.data, _source_checksums(cfg.data))
    return STAGE.current(STAGE.folder(cfg.workdir_path), key) is not None


def need_dataset(cfg: Config, stage: str) -> None:
    """The upstream rule for the dataset: prepare it first (and say so) only when the workdir
    has none.

    A dataset already in the workdir is that workdir's data, whatever this command's ``data``
    section says: after ``prepare -w runs/beauty --set data.source=s3rec ...`` the later
    commands do not repeat the data flags, and re-preparing from their default (synthetic)
    ``data`` section would replace the user's dataset. To change the data, run ``prepare``.
    """
    if read_manifest(STAGE.folder(cfg.workdir_path)) is None:
        needs(stage, "prepare", lambda: False, lambda: prepare(cfg))


def prepare(cfg: Config, force: bool = False) -> PrepareResult:
    """Write ``<workdir>/dataset``; a no-op when the data config and source files are unchanged."""
    out = STAGE.folder(cfg.workdir_path)
    dcfg = cfg.data
    _check_paths(dcfg)
    sources = _source_checksums(dcfg)
    done = STAGE.current(out, _digest(dcfg, sources), force)
    if done is not None:
        return PrepareResult(out, True, done["counts"])

    raw = load_raw(dcfg)
    sources = {str(Path(p).resolve()): sha256_file(p) for p in raw.sources} or sources
    sequences, items, counts = build_tables(raw, dcfg)
    with STAGE.publish(out, _digest(dcfg, sources), sources=sources,
                       config=dcfg.model_dump(mode="json"), counts=counts) as pub:
        pq.write_table(sequences, pub.dir / "sequences.parquet")
        pq.write_table(items, pub.dir / "items.parquet")
    return PrepareResult(out, False, counts)
