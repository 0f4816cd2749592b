"""Reading the prepared dataset back (``<workdir>/dataset``, docs/SCHEMA.md).

Sequences are held as NumPy arrays split from Arrow's flat list buffer (no per-row Python
parsing), so loading Beauty takes milliseconds and every Ray worker can afford to load it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmser_ray.errors import StageError
from llmser_ray.io import read_manifest


def split_list_column(col: pa.ChunkedArray | pa.Array) -> list[np.ndarray]:
    """A ``list<int64>`` column as a list of int64 arrays (views into one flat buffer)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return []
    flat = arr.flatten().to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    offsets = arr.offsets.to_numpy() - arr.offsets[0].as_py()
    return np.split(flat, offsets[1:-1])


@dataclass
class SeqDataset:
    """Users' full chronological sequences plus item text and flags; ids start at 1."""

    path: Path
    manifest: dict[str, Any]
    user_ids: np.ndarray
    sequences: list[np.ndarray]
    train_len: np.ndarray
    is_tail_user: np.ndarray
    # Indexed by item id (row 0 is padding).
    is_tail_item: np.ndarray
    popularity: np.ndarray
    item_text: list[str]
    items_table: pa.Table

    @property
    def num_items(self) -> int:
        return len(self.is_tail_item) - 1

    @property
    def num_users(self) -> int:
        return len(self.sequences)

    def train_sequences(self) -> list[np.ndarray]:
        """Leave-one-out training parts: all but the last two items."""
        return [s[:-2] for s in self.sequences]

    def split(self, which: Literal["valid", "test"]) -> tuple[list[np.ndarray], np.ndarray]:
        """Inputs and targets: valid predicts ``s[-2]`` from ``s[:-2]``, test ``s[-1]`` from ``s[:-1]``."""
        if which == "valid":
            return [s[:-2] for s in self.sequences], np.array([s[-2] for s in self.sequences],
                                                               dtype=np.int64)
        if which == "test":
            return [s[:-1] for s in self.sequences], np.array([s[-1] for s in self.sequences],
                                                               dtype=np.int64)
        raise ValueError(f"unknown split '{which}' (expected 'valid' or 'test')")


def load_dataset(folder: str | Path) -> SeqDataset:
    folder = Path(folder)
    manifest = read_manifest(folder)
    if manifest is None or not (folder / "sequences.parquet").is_file():
        raise StageError(f"no prepared dataset in {folder}",
                         "run `llmser-ray prepare` with the same --workdir first")
    seqs = pq.read_table(folder / "sequences.parquet")
    items = pq.read_table(folder / "items.parquet")
    n_items = items.num_rows
    tail = np.zeros(n_items + 1, dtype=bool)
    tail[1:] = items.column("is_tail_item").to_numpy(zero_copy_only=False)
    pop = np.zeros(n_items + 1, dtype=np.int64)
    pop[1:] = items.column("popularity").to_numpy()
    return SeqDataset(
        path=folder, manifest=manifest,
        user_ids=seqs.column("user_id").to_numpy(),
        sequences=split_list_column(seqs.column("items")),
        train_len=seqs.column("train_len").to_numpy(),
        is_tail_user=seqs.column("is_tail_user").to_numpy(zero_copy_only=False),
        is_tail_item=tail, popularity=pop,
        item_text=["", *items.column("text").to_pylist()],
        items_table=items,
    )
