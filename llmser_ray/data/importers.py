"""Raw formats into one shape: an interaction table and an item-text table.

Every importer returns ``Raw``: ``interactions`` with columns ``user`` (str), ``item`` (str),
``ts`` (float: a timestamp, or the position in the file where the format has no time) and
``items`` with ``item`` (str), ``title`` (str), ``attributes`` (list of str). Ids stay strings
until ``prepare`` renumbers them, so an ASIN and a MovieLens id go through the same code.

Errors name the file, the line or column, and the config key that fixes it: a research user
pointing at the wrong file should learn that in one line, not from a pandas traceback.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from llmser_ray.config import DataConfig
from llmser_ray.errors import DataError

ITEM_COLUMNS = ["item", "title", "attributes"]


@dataclass
class Raw:
    interactions: pd.DataFrame
    items: pd.DataFrame
    # Files read, for the manifest's checksums.
    sources: list[Path] = field(default_factory=list)


def empty_items() -> pd.DataFrame:
    return pd.DataFrame({"item": pd.Series(dtype=str), "title": pd.Series(dtype=str),
                         "attributes": pd.Series(dtype=object)})


def _need_file(path: str | Path, key: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"file not found: {p}", f"point {key} at an existing file")
    return p


def _need_int(token: str, where: str) -> str:
    if not token.lstrip("-").isdigit():
        raise DataError(f"{where}: '{token}' is not an integer id",
                        "this format needs numeric ids; use data.source=csv for string ids")
    return str(int(token))


# ----------------------------------------------------------------------------- S3-Rec / P5


def read_s3rec(cfg: DataConfig) -> Raw:
    """``user item item ...`` per line, chronological; optional ``items.jsonl`` text table."""
    path = _need_file(cfg.path or "", "data.path")
    users, items, order = [], [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            tokens = line.split()
            if not tokens:
                continue
            where = f"{path}:{lineno}"
            user = _need_int(tokens[0], where)
            for pos, tok in enumerate(tokens[1:]):
                users.append(user)
                items.append(_need_int(tok, where))
                order.append(pos)
    inter = pd.DataFrame({"user": users, "item": items, "ts": np.asarray(order, dtype=float)})
    raw = Raw(inter, empty_items(), [path])
    if cfg.item_path:
        raw.items = read_item_table(cfg, numeric_ids=True)
        raw.sources.append(Path(cfg.item_path).expanduser())
    return raw


# ----------------------------------------------------------------------------- MovieLens


def read_movielens(cfg: DataConfig) -> Raw:
    """The GroupLens files: ml-100k (``u.data``, ``u.item``) or ml-1m (``ratings.dat``, ``movies.dat``).

    ``data.path`` is the folder (or the ratings file itself). Ratings below ``data.min_rating``
    are dropped. Item files are Latin-1, as GroupLens ships them.
    """
    root = Path(cfg.path or "").expanduser()
    folder = root if root.is_dir() else root.parent
    if (folder / "u.data").is_file():
        ratings, sep, item_file = folder / "u.data", "\t", folder / "u.item"
    elif (folder / "ratings.dat").is_file():
        ratings, sep, item_file = folder / "ratings.dat", "::", folder / "movies.dat"
    else:
        found = sorted(p.name for p in folder.glob("*")) if folder.is_dir() else []
        raise DataError(
            f"no MovieLens ratings (u.data or ratings.dat) in {folder} "
            f"(found: {', '.join(found) or 'nothing'})",
            "point data.path at the unzipped ml-100k or ml-1m folder, or set data.download=ml-100k")
    try:
        df = pd.read_csv(ratings, sep=sep, header=None, engine="python" if sep == "::" else "c",
                         names=["user", "item", "rating", "ts"], dtype=str)
    except pd.errors.EmptyDataError:
        raise DataError(f"{ratings} is empty", "point data.path at a complete MovieLens folder") from None
    bad = df[~df["user"].str.isdigit() | ~df["item"].str.isdigit()]
    if len(bad):
        raise DataError(f"{ratings}: row {bad.index[0] + 1} has a non-numeric id "
                        f"({bad.iloc[0]['user']!r}, {bad.iloc[0]['item']!r})",
                        "check that the file is an unmodified GroupLens ratings file")
    df["rating"] = pd.to_numeric(df["rating"], errors="coerce")
    df["ts"] = pd.to_numeric(df["ts"], errors="coerce")
    broken = df["ts"].isna() | df["rating"].isna()
    if broken.any():
        raise DataError(f"{ratings}: non-numeric rating or timestamp in row {int(broken.idxmax()) + 1}",
                        "check that the file is an unmodified GroupLens ratings file")
    df = df[df["rating"] >= cfg.min_rating]
    inter = df[["user", "item", "ts"]].reset_index(drop=True)
    inter["user"] = inter["user"].astype(int).astype(str)
    inter["item"] = inter["item"].astype(int).astype(str)
    sources = [ratings]
    items = empty_items()
    if item_file.is_file():
        items = _movielens_items(item_file)
        sources.append(item_file)
    return Raw(inter, items, sources)


def _movielens_items(path: Path) -> pd.DataFrame:
    rows = []
    genres_100k = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
                   "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
                   "Romance", "Sci-Fi", "Thriller", "War", "Western"]
    with open(path, encoding="latin-1") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                continue
            if "::" in line:  # ml-1m movies.dat: id::title::Genre|Genre
                mid, title, genres = line.split("::", 2)
                attrs = [g for g in genres.split("|") if g]
            else:  # ml-100k u.item: id|title|date|video date|url|19 genre flags
                parts = line.split("|")
                mid, title = parts[0], parts[1]
                flags = parts[5:5 + len(genres_100k)]
                attrs = [g for g, flag in zip(genres_100k, flags, strict=False) if flag == "1"]
            rows.append((str(int(mid)), title.strip(), attrs))
    return pd.DataFrame(rows, columns=ITEM_COLUMNS)


# ----------------------------------------------------------------------------- CSV / Parquet


def _read_frame(path: Path, kind: str) -> pd.DataFrame:
    try:
        if kind == "parquet" or path.suffix == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise DataError(f"{path} is empty", "point the path at a file with a header and rows") from None
    except (ValueError, OSError) as e:
        raise DataError(f"cannot read {path} as {kind}: {e}",
                        f"check that it is a valid {kind} file") from None


def _need_columns(df: pd.DataFrame, path: Path, wanted: dict[str, str]) -> None:
    """``wanted`` maps a column name to the config key that names it."""
    for col, key in wanted.items():
        if col not in df.columns:
            raise DataError(f"column '{col}' not in {path} (columns: {', '.join(map(str, df.columns))})",
                            f"set {key} to the right column name")


def _id_strings(s: pd.Series) -> pd.Series:
    """Ids as canonical strings: 7, 7.0 and '7' are one item; missing ids are an error upstream."""
    if pd.api.types.is_float_dtype(s) and (s.dropna() == s.dropna().round()).all():
        s = s.astype("Int64")
    return s.astype(str).str.strip()


def read_table(cfg: DataConfig) -> Raw:
    """Generic interactions (user, item, optional timestamp) with an optional item table."""
    path = _need_file(cfg.path or "", "data.path")
    df = _read_frame(path, cfg.source)
    wanted = {cfg.user_col: "data.user_col", cfg.item_col: "data.item_col"}
    if cfg.time_col:
        wanted[cfg.time_col] = "data.time_col (or data.time_col=null to keep the file order)"
    _need_columns(df, path, wanted)
    inter = pd.DataFrame({"user": _id_strings(df[cfg.user_col]),
                          "item": _id_strings(df[cfg.item_col])})
    blank = ["", "nan", "<NA>", "None"]
    missing = inter["user"].isin(blank) | inter["item"].isin(blank)
    if missing.any():
        raise DataError(f"{path}: row {int(np.argmax(missing.to_numpy())) + 1} has an empty user or item id",
                        "remove rows without ids")
    if cfg.time_col:
        ts = df[cfg.time_col]
        num = pd.to_numeric(ts, errors="coerce")
        if num.isna().any():  # not numbers: try dates
            num = pd.to_datetime(ts, errors="coerce", utc=True)
            if num.isna().any():
                row = int(np.argmax(num.isna().to_numpy())) + 1
                raise DataError(f"{path}: column '{cfg.time_col}' row {row} is neither a number nor a date "
                                f"({ts.iloc[row - 1]!r})",
                                "fix the value, or set data.time_col=null to use the file order")
            num = num.astype("int64") / 1e9
        inter["ts"] = num.to_numpy(dtype=float)
    else:
        inter["ts"] = np.arange(len(inter), dtype=float)
    raw = Raw(inter, empty_items(), [path])
    if cfg.item_path:
        raw.items = read_item_table(cfg, numeric_ids=False)
        raw.sources.append(Path(cfg.item_path).expanduser())
    return raw


def read_item_table(cfg: DataConfig, numeric_ids: bool) -> pd.DataFrame:
    """Item text: JSON lines (``item_id``/``item``, ``title``, ``attributes``) or CSV/Parquet."""
    path = _need_file(cfg.item_path or "", "data.item_path")
    if path.suffix in (".jsonl", ".json"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg})",
                                    "give one JSON object per line") from None
                item = rec.get("item_id", rec.get("item"))
                if item is None:
                    raise DataError(f"{path}:{lineno} has no 'item_id' field",
                                    "each line needs item_id, title and optionally attributes")
                attrs = rec.get("attributes") or []
                rows.append((str(item), str(rec.get("title") or "").strip(),
                             [str(a) for a in attrs] if isinstance(attrs, list) else [str(attrs)]))
        df = pd.DataFrame(rows, columns=ITEM_COLUMNS)
    else:
        raw = _read_frame(path, "parquet" if path.suffix == ".parquet" else "csv")
        _need_columns(raw, path, {cfg.item_col: "data.item_col", cfg.title_col: "data.title_col"})
        attrs = (raw[cfg.attributes_col] if cfg.attributes_col and cfg.attributes_col in raw.columns
                 else pd.Series([[]] * len(raw)))
        df = pd.DataFrame({
            "item": _id_strings(raw[cfg.item_col]),
            "title": raw[cfg.title_col].fillna("").astype(str).str.strip(),
            "attributes": [_split_attributes(a) for a in attrs],
        })
    if numeric_ids:
        for i, item in enumerate(df["item"]):
            _need_int(item, f"{path} row {i + 1}")
        df["item"] = df["item"].astype(int).astype(str)
    return df.drop_duplicates("item", keep="first").reset_index(drop=True)


def _split_attributes(value: object) -> list[str]:
    """Attributes may be a list (Parquet) or a ``|``/``;``-separated string (CSV)."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return []
    if isinstance(value, (list, tuple, np.ndarray)):
        return [str(v) for v in value if str(v)]
    text = str(value)
    for sep in ("|", ";"):
        if sep in text:
            return [t.strip() for t in text.split(sep) if t.strip()]
    return [text.strip()] if text.strip() else []
