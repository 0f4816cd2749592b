"""The generation layer without an engine: request validation, statuses, the reply cache, and the
OpenAI-compatible client against a scripted local HTTP server (retries, backoff, rate limit,
concurrency, timeout, key hygiene). Engine-backed tests live in test_llm.py."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from llmser_ray.config import LLMConfig
from llmser_ray.llm.cache import ReplyCache
from llmser_ray.llm.openai_backend import OpenAIBatch
from llmser_ray.llm.requests import Reply, classify, parse_request, request_key, sampling

SECRET = "sk-test-7f3a9c-DO-NOT-LEAK"


def msgs(text: str) -> str:
    return json.dumps([{"role": "user", "content": text}])


def table(rows: list[dict[str, Any]]) -> pa.Table:
    full = [{"guided_json": "", "guided_choice": [], **r} for r in rows]
    return pa.Table.from_pylist(full, schema=pa.schema([
        ("request_id", pa.string()), ("messages", pa.string()), ("guided_json", pa.string()),
        ("guided_choice", pa.list_(pa.string()))]))


# ----------------------------------------------------------------------------- contract helpers


@pytest.mark.parametrize(("text", "reason", "status"), [
    ("1, 2, 3", "stop", "ok"), ("  \n ", "stop", "empty"), ("", "stop", "empty"),
    ("1, 2,", "length", "truncated"), ("   ", "length", "truncated"), ("x", "abort", "error"),
])
def test_status_classification(text: str, reason: str, status: str) -> None:
    assert classify(text, reason) == status
    r = Reply.answered(text, reason, 3, 4)
    assert r.status == status and r.reply == text  # verbatim, whatever the status
    assert (r.error != "") == (status == "error")


@pytest.mark.parametrize(("row", "needle"), [
    ({"messages": ""}, "messages is empty"),
    ({"messages": "[{"}, "not valid JSON"),
    ({"messages": "[]"}, "non-empty"),
    ({"messages": json.dumps([{"role": "robot", "content": "x"}])}, "role"),
    ({"messages": msgs("x"), "guided_json": "{oops"}, "guided_json is not valid JSON"),
    ({"messages": msgs("x"), "guided_json": "[1]"}, "schema object"),
    ({"messages": msgs("x"), "guided_json": "{}", "guided_choice": ["a"]}, "not both"),
])
def test_invalid_requests_are_rejected_with_a_reason(row: dict[str, Any], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        parse_request(row)


def test_request_key_covers_model_sampling_messages_and_constraint() -> None:
    cfg = LLMConfig()
    req = parse_request({"messages": msgs("hi"), "guided_choice": ["a", "b"]})
    base = request_key("m", sampling(cfg), req)
    # Whitespace in the JSON encoding does not matter; content does.
    same = parse_request({"messages": json.dumps([{"content": "hi", "role": "user"}], indent=2),
                          "guided_choice": ["a", "b"]})
    assert request_key("m", sampling(cfg), same) == base
    assert request_key("other", sampling(cfg), req) != base
    assert request_key("m", sampling(cfg.model_copy(update={"max_tokens": 5})), req) != base
    assert request_key("m", sampling(cfg), parse_request({"messages": msgs("hi")})) != base
    assert request_key("m", sampling(cfg), parse_request({"messages": msgs("hi!"),
                                                          "guided_choice": ["a", "b"]})) != base


def test_reply_cache_is_safe_with_concurrent_writers_and_interruptions(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    writers = [ReplyCache(folder) for _ in range(4)]

    def write(w: int) -> None:
        for b in range(10):
            writers[w].put_many([(f"k{w}-{b}-{i}", Reply.answered(f"r{w}{b}{i}", "stop", 1, 1))
                                 for i in range(5)])

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # A write interrupted before its rename leaves a temporary file that readers ignore.
    (folder / ".part-123.jsonl.tmp").write_text('{"key": "half"')
    fresh = ReplyCache(folder)
    assert len(fresh) == 4 * 10 * 5
    hit = fresh.get("k2-7-3")
    assert hit is not None and hit.reply == "r273" and hit.cached and hit.status == "ok"
    assert fresh.get("half") is None
    # Errors are never stored: the next run asks again.
    assert fresh.put_many([("bad", Reply.failed("boom"))]) == 0
    assert ReplyCache(folder).get("bad") is None


# ----------------------------------------------------------------------------- a scripted server


@dataclass
class Scripted:
    """Replies to POST /v1/chat/completions from a script (then a default), recording every call."""

    script: list[tuple[int, Any, dict[str, str], float]] = field(default_factory=list)
    default: tuple[int, Any, dict[str, str], float] | None = None
    calls: list[dict[str, Any]] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def next(self) -> tuple[int, Any, dict[str, str], float]:
        with self.lock:
            if self.script:
                return self.script.pop(0)
        return self.default or (200, completion("hello"), {}, 0.0)


def completion(content: str | None, finish: str = "stop") -> dict[str, Any]:
    return {"id": "x", "object": "chat.completion", "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": finish}],
            "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}}


@pytest.fixture()
def server() -> Iterator[tuple[Scripted, str]]:
    state = Scripted()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("content-length", 0))
            body = json.loads(self.rfile.read(length) or b"{}")
            with state.lock:
                state.in_flight += 1
                state.max_in_flight = max(state.max_in_flight, state.in_flight)
                state.calls.append({"t": time.monotonic(), "path": self.path, "body": body,
                                    "auth": self.headers.get("authorization")})
            status, payload, headers, delay = state.next()
            time.sleep(delay)
            data = (payload if isinstance(payload, str) else json.dumps(payload)).encode()
            try:
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client timed out and left
            finally:
                with state.lock:
                    state.in_flight -= 1

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state, f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def client(url: str, cache_dir: Path | None = None, **over: Any) -> OpenAIBatch:
    cfg = LLMConfig(backend="openai", base_url=url, model="served-model", **over)
    batch = OpenAIBatch(cfg.model_dump(mode="json"), str(cache_dir) if cache_dir else None)
    batch.backoff_base_s = 0.05  # keep the test fast; the schedule's shape is what is checked
    return batch


def run(batch: OpenAIBatch, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch(table(rows)).to_pylist()


def test_retries_429_twice_then_succeeds_with_backoff(server: tuple[Scripted, str]) -> None:
    state, url = server
    state.script = [(429, {"error": {"message": "slow down"}}, {}, 0.0),
                    (429, {"error": {"message": "slow down"}}, {"retry-after": "0.3"}, 0.0)]
    out = run(client(url, max_retries=3), [{"request_id": "a", "messages": msgs("hi")}])
    assert out[0]["status"] == "ok" and out[0]["reply"] == "hello"
    assert (out[0]["prompt_tokens"], out[0]["completion_tokens"]) == (11, 7)
    t = [c["t"] for c in state.calls]
    assert len(t) == 3
    assert t[1] - t[0] >= 0.5 * 0.05 * 0.9  # jittered backoff, attempt 0
    assert t[2] - t[1] >= 0.3 * 0.9  # Retry-After is honoured


def test_gives_up_after_max_retries_on_5xx(server: tuple[Scripted, str]) -> None:
    state, url = server
    state.default = (503, {"error": {"message": "overloaded"}}, {}, 0.0)
    out = run(client(url, max_retries=2), [{"request_id": "a", "messages": msgs("hi")}])
    assert out[0]["status"] == "error" and out[0]["reply"] == ""
    assert "gave up after 3 attempt(s)" in out[0]["error"] and "503" in out[0]["error"]
    assert len(state.calls) == 3


def test_client_errors_are_not_retried_and_fail_only_their_row(server: tuple[Scripted, str]) -> None:
    state, url = server
    state.script = [(400, {"error": {"message": "bad schema"}}, {}, 0.0)]
    out = run(client(url, max_concurrency=1), [{"request_id": "a", "messages": msgs("one")},
                                               {"request_id": "b", "messages": msgs("two")}])
    statuses = sorted((r["status"], r["error"]) for r in out)
    assert statuses[0][0] == "error" and "HTTP 400: bad schema" in statuses[0][1]
    assert statuses[1] == ("ok", "")
    assert len(state.calls) == 2


def test_per_request_timeout_is_retried_then_reported(server: tuple[Scripted, str]) -> None:
    state, url = server
    state.default = (200, completion("late"), {}, 1.5)
    t0 = time.monotonic()
    out = run(client(url, timeout_s=0.2, max_retries=1), [{"request_id": "a", "messages": msgs("hi")}])
    assert out[0]["status"] == "error" and "timed out after 0.2s" in out[0]["error"]
    assert len(state.calls) == 2
    assert time.monotonic() - t0 < 1.4  # did not wait for the slow server


def test_rate_limit_spaces_attempts(server: tuple[Scripted, str]) -> None:
    """Spacing is checked where the limiter acts (request starts); arrival times at the server
    also carry connection-setup jitter, which a busy CI machine makes arbitrary."""
    state, url = server
    batch = client(url, requests_per_s=10, max_concurrency=8)
    starts: list[float] = []
    throttle = batch._throttle

    async def recording(slot):  # type: ignore[no-untyped-def]
        await throttle(slot)
        starts.append(time.monotonic())

    batch._throttle = recording  # type: ignore[method-assign]
    t0 = time.monotonic()
    out = run(batch, [{"request_id": str(i), "messages": msgs(f"q{i}")} for i in range(6)])
    assert all(r["status"] == "ok" for r in out) and len(state.calls) == 6
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    assert min(gaps) >= 0.1 * 0.99, gaps
    assert time.monotonic() - t0 >= 0.5


def test_concurrency_is_bounded(server: tuple[Scripted, str]) -> None:
    state, url = server
    state.default = (200, completion("ok"), {}, 0.3)
    out = run(client(url, requests_per_s=1000, max_concurrency=2),
              [{"request_id": str(i), "messages": msgs(f"q{i}")} for i in range(6)])
    assert all(r["status"] == "ok" for r in out)
    assert state.max_in_flight == 2


def test_finish_reasons_map_to_statuses_and_replies_stay_verbatim(server: tuple[Scripted, str]) -> None:
    state, url = server
    state.script = [(200, completion("1, 2, 3 and", "length"), {}, 0.0),
                    (200, completion(" \n "), {}, 0.0),
                    (200, completion(None), {}, 0.0),
                    (200, "{not json", {}, 0.0)]
    rows = [{"request_id": str(i), "messages": msgs(f"q{i}")} for i in range(4)]
    out = run(client(url, max_concurrency=1, requests_per_s=1000), rows)
    assert [(r["status"], r["reply"]) for r in out] == [
        ("truncated", "1, 2, 3 and"), ("empty", " \n "), ("empty", ""), ("error", "")]
    assert "malformed response" in out[3]["error"]


def test_openai_cache_skips_answered_rows_and_retries_errors(server: tuple[Scripted, str],
                                                             tmp_path: Path) -> None:
    state, url = server
    state.script = [(400, {"error": {"message": "nope"}}, {}, 0.0)]
    rows = [{"request_id": "a", "messages": msgs("first")}, {"request_id": "b", "messages": msgs("second")}]
    first = run(client(url, tmp_path / "c", max_concurrency=1), rows)
    assert sorted(r["status"] for r in first) == ["error", "ok"]
    assert not any(r["cached"] for r in first)
    n = len(state.calls)
    again = run(client(url, tmp_path / "c", max_concurrency=1), rows)
    # The answered row comes from the cache; only the failed one is asked again.
    assert len(state.calls) == n + 1
    by_id = {r["request_id"]: r for r in again}
    ok_id = next(r["request_id"] for r in first if r["status"] == "ok")
    bad_id = next(r["request_id"] for r in first if r["status"] == "error")
    assert by_id[ok_id]["cached"] and by_id[ok_id]["reply"] == "hello"
    assert not by_id[bad_id]["cached"] and by_id[bad_id]["status"] == "ok"


def test_api_key_is_sent_but_never_logged_or_reported(server: tuple[Scripted, str], monkeypatch,
                                                      caplog, capfd) -> None:
    state, url = server
    monkeypatch.setenv("LLMSER_TEST_KEY", SECRET)
    state.script = [(401, {"error": {"message": f"Incorrect API key provided: {SECRET}"}}, {}, 0.0),
                    (500, {"error": {"message": f"internal error for key {SECRET}"}}, {}, 0.0),
                    (404, {"error": {"message": f"no model for {SECRET}"}}, {}, 0.0)]
    caplog.set_level(logging.DEBUG)
    out = run(client(url, api_key_env="LLMSER_TEST_KEY", max_retries=0, max_concurrency=1),
              [{"request_id": str(i), "messages": msgs(f"q{i}")} for i in range(3)])
    assert all(r["status"] == "error" for r in out)
    assert all(c["auth"] == f"Bearer {SECRET}" for c in state.calls)  # the key is used...
    captured = capfd.readouterr()
    everything = " ".join([r["error"] for r in out] + [caplog.text, captured.out, captured.err])
    assert SECRET not in everything  # ...and appears nowhere else
    assert "authentication failed" in everything and "***" in everything


def test_without_a_key_no_authorization_header_is_sent(server: tuple[Scripted, str], monkeypatch) -> None:
    state, url = server
    monkeypatch.delenv("LLMSER_TEST_KEY", raising=False)
    run(client(url, api_key_env="LLMSER_TEST_KEY"), [{"request_id": "a", "messages": msgs("hi")}])
    assert state.calls[0]["auth"] is None
