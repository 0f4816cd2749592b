"""The request/reply contract of the generation layer, shared by every backend.

A request row carries ``request_id``, ``messages`` (JSON list of chat messages), ``guided_json``
(a JSON schema or "") and ``guided_choice`` (list of strings, empty for none). A backend adds
the ``OUTPUT`` columns. Statuses are decided here, in one place, so that no backend can turn a
truncated or empty answer into a valid one: ``truncated`` (the token limit cut the reply),
``empty`` (nothing but whitespace), ``error`` (this request failed; ``error`` says why), else
``ok``. The reply itself is always kept verbatim.

Scoring requests (``continuation`` non-empty): nothing is generated; the backend returns how
likely ``continuation`` is as the start of the assistant's answer to ``messages``, as the JSON
reply ``{"logprob_sum": float, "tokens": int}`` (prompt log-probabilities of the continuation's
tokens, vLLM only). The ``score`` selector ranks candidates with it (docs/SELECTION.md).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa

from llmser_ray.config import LLMConfig
from llmser_ray.errors import DataError

REQUIRED = ("request_id", "messages")
OUTPUT = pa.schema([
    ("reply", pa.string()), ("finish_reason", pa.string()), ("status", pa.string()),
    ("error", pa.string()), ("prompt_tokens", pa.int64()), ("completion_tokens", pa.int64()),
    ("cached", pa.bool_()),
])
CACHEABLE = ("ok", "empty", "truncated")
ROLES = ("system", "user", "assistant")


@dataclass
class Reply:
    reply: str = ""
    finish_reason: str = ""
    status: str = "error"
    error: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached: bool = False

    @classmethod
    def failed(cls, error: str) -> Reply:
        return cls(status="error", error=error)

    @classmethod
    def answered(cls, text: str | None, finish_reason: str | None, prompt_tokens: int,
                 completion_tokens: int) -> Reply:
        text = text or ""
        reason = finish_reason or ""
        return cls(reply=text, finish_reason=reason, status=classify(text, reason),
                   error="" if reason in ("stop", "length") else f"generation ended with '{reason}'",
                   prompt_tokens=int(prompt_tokens), completion_tokens=int(completion_tokens))


def classify(text: str, finish_reason: str) -> str:
    """``length`` wins over ``empty``: a reply cut off while emitting whitespace (a known failure
    of JSON-constrained decoding) ran out of tokens; it did not choose to say nothing."""
    if finish_reason == "length":
        return "truncated"
    if finish_reason != "stop":
        return "error"
    return "empty" if not text.strip() else "ok"


@dataclass
class Request:
    """One validated request: parsed messages and at most one structured-output constraint."""

    messages: list[dict[str, str]]
    guided_json: str
    guided_choice: list[str]
    # Non-empty: a scoring request (log-likelihood of this text as the answer), not a generation.
    continuation: str = ""

    @property
    def structured(self) -> dict[str, Any] | None:
        """vLLM's ``StructuredOutputsParams`` fields (0.32: ``json`` / ``choice``)."""
        if self.guided_json:
            return {"json": self.guided_json}
        if self.guided_choice:
            return {"choice": list(self.guided_choice)}
        return None


def parse_request(row: dict[str, Any]) -> Request:
    """Validate one row; raises ``ValueError`` with a message meant for the row's ``error``."""
    raw = row.get("messages")
    if not isinstance(raw, str) or not raw.strip():
        raise ValueError("messages is empty (expected a JSON list of {role, content} objects)")
    try:
        messages = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"messages is not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty JSON list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{\"role\": one of {list(ROLES)}, \"content\": string}}")
    guided_json = row.get("guided_json") or ""
    choice = [str(c) for c in (row.get("guided_choice") or [])]
    if guided_json:
        try:
            schema = json.loads(guided_json)
        except json.JSONDecodeError as e:
            raise ValueError(f"guided_json is not valid JSON ({e.msg} at char {e.pos})") from None
        if not isinstance(schema, dict):
            raise ValueError("guided_json must be a JSON schema object")
        if choice:
            raise ValueError("give guided_json or guided_choice, not both")
    continuation = row.get("continuation") or ""
    if not isinstance(continuation, str):
        raise ValueError("continuation must be a string")
    if continuation and (guided_json or choice):
        raise ValueError("a scoring request (continuation) takes no guided_json / guided_choice")
    return Request([{"role": m["role"], "content": m["content"]} for m in messages], guided_json, choice,
                   continuation)


def sampling(cfg: LLMConfig) -> dict[str, Any]:
    """The sampling parameters every backend sends (and the cache key includes)."""
    return {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens,
            "seed": cfg.seed}


def request_key(identity: str, sampling_params: dict[str, Any], req: Request) -> str:
    """sha256 over everything that can change a reply: model, sampling, messages, constraint."""
    payload = {"model": identity, "sampling": sampling_params, "messages": req.messages,
               "guided_json": json.loads(req.guided_json) if req.guided_json else None,
               "guided_choice": req.guided_choice}
    if req.continuation:  # only for scoring requests: generation keys stay what they were
        payload["continuation"] = req.continuation
        payload["sampling"] = {"score": "prompt_logprobs"}  # sampling cannot change a likelihood
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def rows_of(table: pa.Table) -> list[dict[str, Any]]:
    missing = [c for c in REQUIRED if c not in table.column_names]
    if missing:
        raise DataError(f"request rows lack the column(s) {missing}",
                        "give every row request_id and messages (guided_json / guided_choice optional)")
    cols = [c for c in ("request_id", "messages", "guided_json", "guided_choice", "continuation")
            if c in table.column_names]
    return table.select(cols).to_pylist()


def with_replies(table: pa.Table, replies: list[Reply]) -> pa.Table:
    """The input table (all its columns) plus the output columns, replacing any stale ones."""
    keep = [c for c in table.column_names if c not in OUTPUT.names]
    out = table.select(keep)
    records = [asdict(r) for r in replies]
    for field in OUTPUT:
        out = out.append_column(field, pa.array([r[field.name] for r in records], type=field.type))
    return out
