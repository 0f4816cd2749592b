"""The OpenAI-compatible backend: any ``/v1/chat/completions`` endpoint (vLLM's server, a hosted API).

Each actor of the pool runs its batch as concurrent requests on one asyncio loop, with
- a rate limit: attempts (retries included) start at least ``num_engines / requests_per_s``
  apart, so the pool as a whole stays under ``llm.requests_per_s``;
- bounded concurrency: ``ceil(max_concurrency / num_engines)`` requests in flight per actor;
- retries with exponential backoff and jitter on 408/409/429/5xx, timeouts and connection errors,
  honouring ``Retry-After``; any other HTTP error fails that request only;
- a per-request timeout (``llm.timeout_s``).

The API key is read from ``os.environ[llm.api_key_env]`` when the actor starts, sent only in the
``Authorization`` header, and scrubbed from every error text; it is never logged (optional: a local
server needs none). Structured outputs use what vLLM's server accepts in 0.32: a JSON schema as the
standard ``response_format`` (``json_schema``, also understood by hosted APIs) and a choice as
vLLM's ``structured_outputs: {"choice": [...]}`` extension.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import time
from typing import Any

from llmser_ray.config import LLMConfig
from llmser_ray.errors import ConfigError
from llmser_ray.llm.batch import ReplyBatch
from llmser_ray.llm.requests import Reply, Request

RETRY_STATUS = frozenset({408, 409, 429, 500, 502, 503, 504})
_DETAIL_CHARS = 300


def check_openai_config(cfg: LLMConfig) -> None:
    if not cfg.base_url or not cfg.base_url.startswith(("http://", "https://")):
        raise ConfigError(f"llm.base_url '{cfg.base_url}' is not an http(s) URL",
                          "set llm.base_url, e.g. http://127.0.0.1:8001/v1")


class OpenAIBatch(ReplyBatch):
    """Ray Data ``map_batches`` callable for the OpenAI-compatible backend."""

    # Backoff before retry n (0-based): uniform(0.5, 1) * min(cap, base * 2**n) seconds.
    backoff_base_s = 0.5
    backoff_cap_s = 30.0

    def __init__(self, cfg: dict[str, Any], cache_dir: str | None = None) -> None:
        super().__init__(cfg, cache_dir)
        check_openai_config(self.cfg)
        self.base_url = str(self.cfg.base_url).rstrip("/")
        self.identity = f"openai|{self.base_url}|{self.cfg.model}"
        engines = self.cfg.num_engines
        self.interval_s = engines / self.cfg.requests_per_s
        self.concurrency = max(1, math.ceil(self.cfg.max_concurrency / engines))
        self._key = os.environ.get(self.cfg.api_key_env) or None
        self._next_slot = 0.0

    # ------------------------------------------------------------------ request building

    def body(self, req: Request) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.cfg.model, "messages": req.messages,
                                "temperature": self.cfg.temperature, "top_p": self.cfg.top_p,
                                "max_tokens": self.cfg.max_tokens}
        if self.cfg.temperature > 0:
            body["seed"] = self.cfg.seed
        if req.guided_json:
            spec = {"name": "reply", "schema": json.loads(req.guided_json)}
            body["response_format"] = {"type": "json_schema", "json_schema": spec}
        elif req.guided_choice:
            body["structured_outputs"] = {"choice": list(req.guided_choice)}
        return body

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _detail(self, resp: Any) -> str:
        if resp.status_code in (401, 403):
            return f"authentication failed (check the key in ${self.cfg.api_key_env})"
        try:
            err = resp.json().get("error", resp.text)
            text = err.get("message", str(err)) if isinstance(err, dict) else str(err)
        except (ValueError, AttributeError):
            text = resp.text
        return self._scrub(" ".join(str(text).split()))[:_DETAIL_CHARS]

    # ------------------------------------------------------------------ sending

    def answer(self, requests: list[Request]) -> list[Reply]:
        # Scoring requests need prompt log-probabilities, which chat endpoints do not return.
        todo = [r for r in requests if not r.continuation]
        done = iter(asyncio.run(self._answer_all(todo)) if todo else [])
        return [Reply.failed("scoring requests need llm.backend=vllm") if r.continuation else next(done)
                for r in requests]

    async def _answer_all(self, requests: list[Request]) -> list[Reply]:
        import httpx

        headers = {"Authorization": f"Bearer {self._key}"} if self._key else {}
        sem = asyncio.Semaphore(self.concurrency)
        slot = asyncio.Lock()
        async with httpx.AsyncClient(
                base_url=self.base_url, headers=headers, timeout=httpx.Timeout(self.cfg.timeout_s),
                limits=httpx.Limits(max_connections=self.concurrency)) as client:
            return list(await asyncio.gather(*(self._one(client, sem, slot, r) for r in requests)))

    async def _throttle(self, slot: asyncio.Lock) -> None:
        # The lock is held through the wait and the next slot counts from the actual start, so a
        # stalled event loop (a busy machine) resumes at the configured pace instead of releasing
        # every overdue request at once.
        async with slot:
            wait = self._next_slot - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            self._next_slot = time.monotonic() + self.interval_s

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.backoff_cap_s, self.backoff_base_s * 2 ** attempt) * random.uniform(0.5, 1.0)
        return max(delay, min(retry_after, self.backoff_cap_s)) if retry_after else delay

    async def _one(self, client: Any, sem: asyncio.Semaphore, slot: asyncio.Lock, req: Request) -> Reply:
        import httpx

        try:
            body = self.body(req)
        except (ValueError, TypeError) as e:
            return Reply.failed(f"cannot build the request: {e}")
        last = ""
        attempts = self.cfg.max_retries + 1
        for attempt in range(attempts):
            retry_after: float | None = None
            async with sem:
                await self._throttle(slot)
                try:
                    resp = await client.post("/chat/completions", json=body)
                except httpx.TimeoutException:
                    last = f"timed out after {self.cfg.timeout_s:g}s"
                except httpx.TransportError as e:
                    last = self._scrub(f"connection failed ({type(e).__name__}: {e})")
                else:
                    if resp.status_code == 200:
                        return self._parse(resp)
                    if resp.status_code not in RETRY_STATUS:
                        return Reply.failed(f"HTTP {resp.status_code}: {self._detail(resp)}")
                    last = f"HTTP {resp.status_code}: {self._detail(resp)}"
                    retry_after = _retry_after(resp.headers.get("retry-after"))
            if attempt + 1 < attempts:
                await asyncio.sleep(self.backoff(attempt, retry_after))
        return Reply.failed(f"gave up after {attempts} attempt(s): {last}")

    def _parse(self, resp: Any) -> Reply:
        try:
            data = resp.json()
            choice = data["choices"][0]
            usage = data.get("usage") or {}
            return Reply.answered(choice["message"].get("content"), choice.get("finish_reason"),
                                  int(usage.get("prompt_tokens") or 0),
                                  int(usage.get("completion_tokens") or 0))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            text = self._scrub(resp.text[:_DETAIL_CHARS])
            return Reply.failed(f"malformed response ({type(e).__name__}): {text}")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
