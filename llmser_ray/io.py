"""Stage outputs: written into a temporary sibling folder and renamed into place when complete.

A reader therefore either sees a complete, manifest-bearing output or nothing; an interrupted
stage leaves only a ``.tmp-*`` folder, which the next run deletes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        return None


def write_json(path: str | Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename) so a crash never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def clean_stale_tmp(final: Path) -> None:
    for stale in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temporary folder; on success replace ``final`` with it, on error delete it."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(final)
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
    os.replace(tmp, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def manifest_header(stage: str, schema_version: int) -> dict[str, Any]:
    from llmser_ray import __version__

    return {
        "stage": stage,
        "schema_version": schema_version,
        "llmser_ray_version": __version__,
        "created_unix": time.time(),
    }
