"""Resumable, shard-by-shard output for the long LLM stages (SIA and ARV).

Users are cut into fixed shards (``augment.shard_size`` consecutive users of the sorted list).
Results stream back from the Ray Data pipeline in any order; a shard is written (atomically:
temp file + rename) as soon as all its users have arrived, so an interruption loses at most
the shards in flight, and a rerun skips every finished shard. The partial folder is named by the
stage's digest: a rerun with another config never mixes its shards with these.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


class ShardWriter:
    def __init__(self, folder: Path, user_ids: np.ndarray, shard_size: int) -> None:
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.users = np.sort(np.asarray(user_ids, dtype=np.int64))
        self.shard_size = shard_size
        self.n_shards = (len(self.users) + shard_size - 1) // shard_size
        self.done = {s for s in range(self.n_shards) if self._path(s).is_file()}
        self.reused = len(self.done)
        self._buffer: dict[int, list[pa.Table]] = {}
        self._count: dict[int, int] = {}
        for stale in self.folder.glob(".*.tmp"):
            stale.unlink(missing_ok=True)

    def _path(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:06d}.parquet"

    def _expected(self, shard: int) -> int:
        return min(self.shard_size, len(self.users) - shard * self.shard_size)

    def shard_of(self, user_ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.users, user_ids) // self.shard_size

    def pending_mask(self) -> np.ndarray:
        """Which of ``self.users`` still need work."""
        shards = np.arange(len(self.users)) // self.shard_size
        return ~np.isin(shards, list(self.done))

    def add(self, table: pa.Table) -> None:
        """Take result rows (any users, any order); write every shard that became complete."""
        if table.num_rows == 0:
            return
        shards = self.shard_of(table.column("user_id").to_numpy())
        for s in np.unique(shards):
            s = int(s)
            if s in self.done:
                continue
            part = table.filter(pa.array(shards == s))
            self._buffer.setdefault(s, []).append(part)
            self._count[s] = self._count.get(s, 0) + part.num_rows
            if self._count[s] >= self._expected(s):
                self._write(s)

    def _write(self, shard: int) -> None:
        table = pa.concat_tables(self._buffer.pop(shard), promote_options="default").sort_by("user_id")
        tmp = self.folder / f".{shard}.{uuid.uuid4().hex[:8]}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self._path(shard))
        self.done.add(shard)
        self._count.pop(shard, None)

    @property
    def complete(self) -> bool:
        return len(self.done) == self.n_shards

    def assemble(self) -> pa.Table:
        parts = [pq.read_table(self._path(s)) for s in sorted(self.done)]
        return pa.concat_tables(parts, promote_options="default").sort_by("user_id") if parts else None

    def cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
