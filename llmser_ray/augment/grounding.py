"""From an LLM reply to real item ids, counting what could not be grounded.

Three ways (``augment.grounding``):
- ``constrained``: the reply is a JSON list of candidate numbers (decoding was constrained to
  it); each number maps to exactly one candidate.
- ``lines``: free text, one name per line; each line maps to the candidate with the same
  normalised title, else to its nearest candidate by text embedding if the cosine reaches
  ``augment.min_similarity``; otherwise the line is a hallucination and is COUNTED, not hidden.
- ``whole_response`` (the reference): the whole reply is embedded and the ``n`` nearest
  candidates are taken, so any reply, even a hallucinated one, yields ``n`` items. Kept for
  comparison; its diagnostics still count the lines that match nothing.

Statuses: ``ok``; ``empty`` (nothing to parse); ``truncated`` (the reply was cut by max_tokens:
the entries complete before the cut are kept, and the row says so); ``malformed`` (a reply that
names no candidate at all, or is not the JSON that was asked for); ``error`` (the LLM call
failed). Nothing becomes a valid answer without being counted.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field

import numpy as np

_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+\s*[.):\]]|\(\d+\))\s*")


@dataclass
class Grounded:
    items: list[int] = field(default_factory=list)
    status: str = "ok"
    n_lines: int = 0
    n_mapped: int = 0
    n_unmapped: int = 0
    n_duplicates: int = 0
    error: str = ""

    def row(self) -> dict[str, object]:
        d = asdict(self)
        d["pseudo_items"] = d.pop("items")
        return d


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w&+]+", " ", text.lower()).split())


def _add(out: Grounded, item: int | None, n: int) -> None:
    """Record one answer entry: a candidate (kept once, up to ``n``), a duplicate, or unmapped."""
    out.n_lines += 1
    if item is None:
        out.n_unmapped += 1
    elif item in out.items:
        out.n_duplicates += 1
    else:
        out.n_mapped += 1
        if len(out.items) < n:
            out.items.append(item)


def _finish(out: Grounded, truncated: bool) -> Grounded:
    if out.n_lines == 0:
        out.status = "truncated" if truncated else "empty"
    elif not out.items:
        out.status = "malformed"
        out.error = out.error or "no entry names a candidate"
    elif truncated:
        out.status = "truncated"
    return out


def ground_numbers(reply: str, candidates: np.ndarray, n: int, truncated: bool = False) -> Grounded:
    """``constrained``: a JSON list of 1-based candidate numbers."""
    out = Grounded()
    text = reply.strip()
    try:
        values = json.loads(text)
        if not isinstance(values, list):
            raise ValueError("not a JSON list")
    except (json.JSONDecodeError, ValueError) as e:
        if not truncated:
            if not text:
                return _finish(out, False)
            # One unparseable answer: counted as one entry that names nothing.
            out.status, out.error = "malformed", f"expected a JSON list of numbers: {e}"
            out.n_lines = out.n_unmapped = 1
            return out
        # Cut mid-list: keep the entries completed before the cut ("[3, 1, 1" -> 3, 1).
        body = text.lstrip("[")
        complete = body.rsplit(",", 1)[0] if "," in body else ""
        values = [v.strip() for v in complete.split(",") if v.strip()]
    for v in values:
        num = None  # JSON true is not 1
        if not isinstance(v, bool) and (isinstance(v, int) or (isinstance(v, str) and v.isdigit())
                                        or (isinstance(v, float) and v.is_integer())):
            num = int(v)
        item = int(candidates[num - 1]) if num is not None and 1 <= num <= len(candidates) else None
        _add(out, item, n)
    return _finish(out, truncated)


def split_lines(reply: str) -> list[str]:
    """Answer lines without bullets, numbering or quotes; blank lines dropped."""
    lines = []
    for raw in reply.splitlines():
        line = _BULLET.sub("", raw).strip().strip("\"'`*").strip()
        if line:
            lines.append(line)
    return lines


def ground_lines(lines: list[str], line_sim: np.ndarray, line_best: np.ndarray, candidates: np.ndarray,
                 titles: list[str], n: int, min_similarity: float, truncated: bool = False) -> Grounded:
    """``lines``: exact (normalised) title match first, else the nearest candidate above the bar.

    ``line_sim[i]``/``line_best[i]`` are the best cosine and the index into ``candidates`` of
    line i's nearest candidate (from the FAISS actors, restricted to this user's candidates).
    """
    out = Grounded()
    by_title = {normalise(t): int(c) for t, c in zip(titles, candidates, strict=True) if t}
    for i, line in enumerate(lines):
        item = by_title.get(normalise(line))
        if item is None and line_best[i] >= 0 and line_sim[i] >= min_similarity:
            item = int(candidates[int(line_best[i])])
        _add(out, item, n)
    return _finish(out, truncated)


def ground_whole(reply_sim: np.ndarray, candidates: np.ndarray, n: int, lines: list[str],
                 line_sim: np.ndarray, min_similarity: float, truncated: bool = False) -> Grounded:
    """``whole_response`` (reference): the ``n`` candidates nearest to the whole reply.

    ``reply_sim[j]`` is the cosine of the reply with candidate j. The diagnostics count the
    reply's lines that are not near any candidate, which the reference never looked at.
    """
    out = Grounded(n_lines=len(lines))
    out.n_unmapped = int(sum(1 for s in line_sim if s < min_similarity))
    out.n_mapped = out.n_lines - out.n_unmapped
    if not lines:
        return _finish(out, truncated)
    order = np.argsort(-np.asarray(reply_sim), kind="stable")[:n]
    out.items = [int(candidates[j]) for j in order]
    if truncated:
        out.status = "truncated"
    return out
