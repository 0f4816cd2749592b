"""The HTTP contract: request and response models, and every 4xx the API can answer.

Kept apart from the model state so that what a client may send, and what it is told when it
is wrong, reads in one place. Every 4xx body is ``{"error", "fix", "details"}``; bodies are
size-limited before parsing (413), validated strictly (``"5"`` is not an item id), and rendered
with ``ensure_ascii`` so that even a lone surrogate in an echoed title cannot turn into a 500.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

MAX_TITLE_CHARS = 1000
EXAMPLE_BODY = '{"item_ids": [1, 2, 3], "k": 10}'


class ApiError(Exception):
    """A client error: rendered as ``{"error": problem, "fix": fix}`` with ``status``."""

    def __init__(self, status: int, problem: str, fix: str, details: list[dict[str, Any]] | None = None):
        super().__init__(problem)
        self.status = status
        self.problem = problem
        self.fix = fix
        self.details = details or []


class SafeJSONResponse(JSONResponse):
    """JSON that cannot fail to encode: ASCII-escaped (lone surrogates survive), no NaN."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


def _error(status: int, problem: str, fix: str, details: list[dict[str, Any]] | None = None,
           headers: dict[str, str] | None = None) -> SafeJSONResponse:
    return SafeJSONResponse({"error": problem, "fix": fix, "details": details or []}, status_code=status,
                            headers=headers)


def _clip(value: Any, n: int = 80) -> str:
    """A short, printable rendering of a client's value for an error message."""
    text = json.dumps(value, ensure_ascii=True, default=str)
    return text if len(text) <= n else text[: n - 3] + "..."


def _loc(loc: tuple[Any, ...]) -> str:
    """``("body", "item_ids", 3)`` -> ``item_ids[3]``."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "path", "query") else loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"

class RecommendedItem(BaseModel):
    item_id: int
    title: str
    score: float


class ResolvedTitle(BaseModel):
    title: str
    item_id: int
    match: Literal["exact", "embedding"]
    similarity: float


class RecommendResponse(BaseModel):
    items: list[RecommendedItem] = Field(
        description="Best first; fewer than k when fewer items are eligible.")
    model: str = Field(description="The model folder that produced the scores.")
    source: Literal["user", "item_ids", "titles"]
    history_len: int = Field(
        description="Real items read (a known user's whole sequence, or the ad-hoc history).")
    pseudo_items: list[int] = Field(
        description="Pseudo-prior items prepended before the history (oldest first).")
    pseudo_source: Literal["none", "augmentation", "candidates", "llm"]
    resolved_titles: list[ResolvedTitle] | None = Field(
        None, description="For a titles request: the item each title resolved to, in order.")


class ErrorResponse(BaseModel):
    error: str = Field(description="What is wrong with the request.")
    fix: str = Field(description="How to fix it.")
    details: list[dict[str, Any]] = Field(default_factory=list)


class HealthResponse(BaseModel):
    status: Literal["ok"]
    model: str
    num_items: int
    num_users: int
    augmented_users: int
    pseudo_for_short: int
    reverse_model: bool
    title_embeddings: bool
    max_k: int
    max_history: int
    batches: dict[str, int]
    ingress: Literal["haproxy", "direct", "proxy", "bare"] = Field(
        description="how requests reach this replica: haproxy (HAProxy straight to the replica's own "
                    "HTTP server), direct (the replica's own port, no balancer), proxy (Serve's "
                    "Python HTTP proxy), bare (no Ray Serve)")


class ItemResponse(BaseModel):
    item_id: int
    title: str
    attributes: list[str]
    original_item: str
    popularity: int


class _RecommendBase(BaseModel):
    """Shared rules of the (per-deployment) request model: strict types, no unknown fields, no
    explicit nulls, exactly one of ``user_id`` / ``item_ids`` / ``titles``."""

    model_config = ConfigDict(extra="forbid", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _no_nulls(cls, data: Any) -> Any:
        if isinstance(data, dict):
            nulls = [k for k, v in data.items() if v is None]
            if nulls:
                raise ValueError(f"'{nulls[0]}' is null: leave the field out instead")
        return data

    @model_validator(mode="after")
    def _one_source(self) -> _RecommendBase:
        given = [k for k in ("user_id", "item_ids", "titles") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of user_id, item_ids or titles "
                             f"(got {', '.join(given) if given else 'none'})")
        return self


def _optional(schema: dict[str, Any]) -> None:
    """An optional field's schema without ``"default": null``: absent is the only way to omit it."""
    schema.pop("default", None)


def request_model(num_users: int, num_items: int, max_k: int, max_history: int) -> type[BaseModel]:
    """The ``/recommend`` body with this deployment's limits in its JSON schema.

    The three sources are typed without ``| None`` (their default, None, means "absent" and is
    never validated), so the schema says exactly what is accepted and errors point at the field,
    not at a branch of a union; ``oneOf`` states that exactly one source is given.
    """
    item = Annotated[int, Field(ge=1, le=num_items)]
    title = Annotated[str, Field(min_length=1, max_length=MAX_TITLE_CHARS)]
    one_of = [{"required": [k]} for k in ("user_id", "item_ids", "titles")]
    examples = [{"item_ids": [1, 2, 3], "k": 10}, {"user_id": 1, "k": 5},
                {"titles": ["some item title"], "k": 10, "exclude": [2]}]
    base = type("_RecommendLimits", (_RecommendBase,), {"model_config": ConfigDict(
        extra="forbid", strict=True, json_schema_extra={"oneOf": one_of, "examples": examples})})
    return create_model(  # type: ignore[call-overload,no-any-return]
        "RecommendRequest",
        __base__=base,
        user_id=(int, Field(
            None, ge=1, le=num_users, json_schema_extra=_optional,
            description=f"A known user (1..{num_users}): served from the user's whole sequence.")),
        item_ids=(list[item], Field(
            None, min_length=1, max_length=max_history, json_schema_extra=_optional,
            description=f"An ad-hoc history of item ids (1..{num_items}), oldest first.")),
        titles=(list[title], Field(
            None, min_length=1, max_length=max_history, json_schema_extra=_optional,
            description="An ad-hoc history of item titles, oldest first: matched exactly (ignoring case "
                        "and spacing), else by text embedding when the index exists.")),
        k=(int, Field(min(10, max_k), ge=1, le=max_k, description="How many items to return.")),
        exclude=(list[item], Field(default_factory=list, max_length=max_history,
                                   description="Item ids never to return.")),
        exclude_history=(bool, Field(True, description="Never return items of the real history.")),
        pseudo=(Literal["auto", "on", "off"], Field(
            "auto", description="Pseudo-prior items: auto = a known augmented user's stored prefix, or "
                                "collaborative candidates for an ad-hoc history of at most "
                                "serve.pseudo_for_short items; on = always; off = never.")),
    )


def _validation_error(exc: RequestValidationError, fixes: dict[str, str],
                      fields: list[str]) -> SafeJSONResponse:
    errors = list(exc.errors())
    details = [{"loc": _loc(tuple(e.get("loc", ()))), "type": e.get("type", ""), "msg": e.get("msg", "")}
               for e in errors[:20]]
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    kind, loc = first.get("type", ""), tuple(first.get("loc", ()))
    where = _loc(loc)
    if kind == "json_invalid":
        ctx = first.get("ctx") or {}
        pos = loc[1] if len(loc) > 1 else "?"
        return _error(400, f"the request body is not valid JSON ({ctx.get('error', 'decode error')} at "
                           f"character {pos})", f"send a JSON object, e.g. {EXAMPLE_BODY}", details)
    if loc == ("body",) and isinstance(exc.body, bytes | bytearray):
        return _error(415, "the request body was not sent as JSON",
                      f"send it with 'Content-Type: application/json', e.g. {EXAMPLE_BODY}", details)
    if loc == ("body",) and kind in ("missing", "model_type", "dict_type", "model_attributes_type"):
        return _error(422, "the request body must be a JSON object", f"send e.g. {EXAMPLE_BODY}", details)
    if kind == "extra_forbidden":
        return _error(422, f"unknown field '{where}'", f"allowed fields: {', '.join(fields)}", details)
    field_name = next((str(p) for p in loc[1:] if isinstance(p, str)), "")
    fix = fixes.get(field_name, f"see the request schema at /docs, e.g. {EXAMPLE_BODY}")
    msg = str(first.get("msg", "")).removeprefix("Value error, ")
    if kind == "value_error" and loc in (("body",), ()):
        problem = msg
        fix = f"send e.g. {EXAMPLE_BODY}"
    elif "input" in first and kind != "missing":
        problem = f"{where}: {msg} (got {_clip(first['input'])})"
    else:
        problem = f"{where}: {msg}"
    return _error(422, problem, fix, details)


class _BodyLimit:
    """Reject bodies over ``limit`` bytes with a 413 before anything parses them: by the
    Content-Length header when there is one, by counting the streamed chunks otherwise."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        fix = f"send at most {self.limit} bytes (serve.max_body_bytes): a shorter history or fewer exclusions"
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    await _error(400, "the Content-Length header is not a number",
                                 "send a valid Content-Length")(scope, receive, send)
                    return
                if declared > self.limit:
                    problem = f"the request body has {declared} bytes, over the limit of {self.limit}"
                    await _error(413, problem, fix, headers={"connection": "close"})(scope, receive, send)
                    return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.limit:
                await _error(413, f"the request body exceeds the limit of {self.limit} bytes", fix,
                             headers={"connection": "close"})(scope, receive, send)
                return
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
