"""Fetching public datasets when the machine is online, and saying how to supply them when not.

Downloads land in ``data.cache_dir`` (default ``~/.cache/llmser-ray``), are written to a
temporary file and renamed when complete, and are reused afterwards; the manifest records their
checksums like any other source. ``data.download_url`` points at a mirror instead.
"""

from __future__ import annotations

import os
import shutil
import urllib.error
import urllib.request
import uuid
import zipfile
from pathlib import Path

from llmser_ray.config import DataConfig
from llmser_ray.errors import DataError

PUBLIC = {
    "ml-100k": ("https://files.grouplens.org/datasets/movielens/ml-100k.zip", "ml-100k"),
    "ml-1m": ("https://files.grouplens.org/datasets/movielens/ml-1m.zip", "ml-1m"),
    "beauty": ("https://raw.githubusercontent.com/aHuiWang/CIKM2020-S3Rec/master/data/Beauty.txt",
               "Beauty.txt"),
}
TIMEOUT_S = 60


def fetch(cfg: DataConfig) -> str:
    """Return a local path for ``cfg.download``, downloading it on first use."""
    assert cfg.download is not None
    url, name = PUBLIC[cfg.download]
    url = cfg.download_url or url
    cache = Path(cfg.cache_dir).expanduser()
    target = cache / name
    if target.exists():
        return str(target)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{name}.{uuid.uuid4().hex[:8]}.part"
    how = ("download it on a machine with internet access"
           + (" and unzip it" if url.endswith(".zip") else "")
           + f", then pass --set data.path=<{'folder' if url.endswith('.zip') else 'file'}> "
           + "(or place it at " + str(target) + ")")
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as resp, open(tmp, "wb") as f:
            shutil.copyfileobj(resp, f)
        if url.endswith(".zip"):
            unpack = cache / f".{name}.{uuid.uuid4().hex[:8]}.unzip"
            with zipfile.ZipFile(tmp) as z:
                for member in z.namelist():  # no absolute paths or .. in a downloaded archive
                    if member.startswith("/") or ".." in Path(member).parts:
                        raise DataError(f"unsafe path {member!r} in {url}", "use the official archive")
                z.extractall(unpack)
            inner = unpack / name if (unpack / name).is_dir() else unpack
            os.replace(inner, target)
            shutil.rmtree(unpack, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except (urllib.error.URLError, OSError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot download {cfg.download} from {url} ({e})", how) from None
    finally:
        tmp.unlink(missing_ok=True)
    return str(target)
