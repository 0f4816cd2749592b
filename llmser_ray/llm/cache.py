"""Reply cache: answered requests are never sent to an engine again.

Layout: ``<cache_dir>/part-*.jsonl``, one file per answered batch, each written to a temporary
name, fsynced and renamed. So several actors (or nodes, on shared storage) write at once without
locks, and an interrupted run leaves only complete files: every batch answered before the
interruption is reused, nothing half-written is ever read. Only ``ok`` / ``empty`` /
``truncated`` replies are stored; errors are retried by the next run.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from llmser_ray.llm.requests import CACHEABLE, Reply

_FIELDS = ("reply", "finish_reason", "status", "prompt_tokens", "completion_tokens")


class ReplyCache:
    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder).expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._replies: dict[str, Reply] = {}
        self.reload()

    def reload(self) -> None:
        for part in sorted(self.folder.glob("part-*.jsonl")):
            with contextlib.suppress(OSError):  # a part deleted by a concurrent cleanup
                for line in part.read_text(encoding="utf-8").splitlines():
                    try:
                        rec = json.loads(line)
                        self._replies[rec["key"]] = Reply(**{k: rec[k] for k in _FIELDS}, error="",
                                                          cached=True)
                    except (json.JSONDecodeError, KeyError, TypeError):
                        continue  # written by an incompatible version: ignore, re-ask

    def __len__(self) -> int:
        return len(self._replies)

    def get(self, key: str) -> Reply | None:
        hit = self._replies.get(key)
        return None if hit is None else Reply(**asdict(hit))

    def put_many(self, items: list[tuple[str, Reply]]) -> int:
        """Persist the cacheable replies of one batch as one new part file; returns how many."""
        lines = []
        for key, r in items:
            if r.status not in CACHEABLE:
                continue
            lines.append(json.dumps({"key": key, **{k: getattr(r, k) for k in _FIELDS}}, ensure_ascii=False))
            self._replies[key] = Reply(**{**asdict(r), "cached": True, "error": ""})
        if not lines:
            return 0
        name = f"part-{time.time_ns()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
        tmp = self.folder / f".{name}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.folder / name)
        return len(lines)
