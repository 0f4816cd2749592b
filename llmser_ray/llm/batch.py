"""What every backend's Ray Data callable does around the model call.

Per batch: validate each row (a bad row becomes an ``error`` row, never a failed job), answer
what the cache already holds, send each distinct remaining request once, store the new replies,
and return the input table with the output columns. Backends only implement ``answer``.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import pyarrow as pa

from llmser_ray.config import LLMConfig
from llmser_ray.llm.cache import ReplyCache
from llmser_ray.llm.requests import (
    Reply,
    Request,
    parse_request,
    request_key,
    rows_of,
    sampling,
    with_replies,
)


class ReplyBatch:
    identity: str = ""

    def __init__(self, cfg: dict[str, Any], cache_dir: str | None = None) -> None:
        self.cfg = LLMConfig.model_validate(cfg)
        self.cache = ReplyCache(cache_dir) if cache_dir and self.cfg.cache else None
        self.sampling = sampling(self.cfg)

    def answer(self, requests: list[Request]) -> list[Reply]:
        raise NotImplementedError

    def __call__(self, table: pa.Table) -> pa.Table:
        rows = rows_of(table)
        replies: list[Reply | None] = [None] * len(rows)
        todo: dict[str, tuple[Request, list[int]]] = {}
        for i, row in enumerate(rows):
            try:
                req = parse_request(row)
            except ValueError as e:
                replies[i] = Reply.failed(str(e))
                continue
            key = request_key(self.identity, self.sampling, req)
            hit = self.cache.get(key) if self.cache is not None else None
            if hit is not None:
                replies[i] = hit
            else:
                todo.setdefault(key, (req, []))[1].append(i)
        if todo:
            keys = list(todo)
            answers = self.answer([todo[k][0] for k in keys])
            for key, ans in zip(keys, answers, strict=True):
                for i in todo[key][1]:
                    replies[i] = Reply(**asdict(ans))
            if self.cache is not None:
                self.cache.put_many(list(zip(keys, answers, strict=True)))
        return with_replies(table, [r if r is not None else Reply.failed("not answered") for r in replies])
