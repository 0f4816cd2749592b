"""The generation layer with real engines: vLLM (SmolLM2-135M-Instruct on CPU) through a Ray Data
actor pool, the reply cache, an engine actor killed mid-run, and the OpenAI backend against vLLM's
own OpenAI server. Each engine start costs 20-30 s on a quiet two-core machine, so one module-scoped
run answers every kind of request at once and the tests inspect its rows."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from llmser_ray.config import LLMConfig, load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.errors import ConfigError
from llmser_ray.llm import generate, generate_rows, resolve_llm
from llmser_ray.llm.models import SMOLLM2
from llmser_ray.ports import pick_port
from llmser_ray.stages.prepare import prepare

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
BEAUTY = SHARED / "amazon_beauty_2014_5core"

pytestmark = pytest.mark.skipif(not BEAUTY.is_dir(), reason="../shared/data is not present")

# Small engine: enough for these prompts, quick to start. Greedy decoding, so replies are stable.
ENGINE = {"max_tokens": 40, "max_model_len": 512, "max_num_seqs": 16, "cpu_kv_cache_gib": 0.5,
          "cpus_per_engine": 1.0, "batch_size": 16}
LONG_LIST = "List 100 beauty products, one per line, numbered."
SELECT_SCHEMA = {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 10},
                 "minItems": 3, "maxItems": 5}


def msgs(text: str, system: str | None = None) -> str:
    m = [{"role": "system", "content": system}] if system else []
    return json.dumps([*m, {"role": "user", "content": text}])


@pytest.fixture(scope="module")
def titles(tmp_path_factory) -> list[str]:
    """Real Beauty titles, in the order a user bought them (the first users' histories)."""
    wd = tmp_path_factory.mktemp("beauty-llm")
    lines = (BEAUTY / "Beauty.txt").read_text().splitlines()[:30]
    (wd / "Beauty.txt").write_text("\n".join(lines) + "\n")
    prepare(load_config(None, [f"workdir={wd}", "data.source=s3rec", f"data.path={wd / 'Beauty.txt'}",
                               f"data.item_path={BEAUTY / 'items.jsonl'}"]))
    ds = load_dataset(wd / "dataset")
    return [ds.item_text[i] for s in ds.sequences for i in s if ds.item_text[i]]


def selection_prompt(history: list[str], candidates: list[str], n: int) -> str:
    """SIA's selection prompt (METHOD.md) with numbered candidates."""
    hist = "\n".join(f"- {t}" for t in history)
    cands = "\n".join(f"{i}. {t}" for i, t in enumerate(candidates, 1))
    return (f"The user has bought these beauty products:\n{hist}\n\nCandidates:\n{cands}\n\n"
            f"Select the {n} candidates the user most likely bought before. "
            "Reply with a JSON list of candidate numbers.")


@pytest.fixture(scope="module")
def requests(titles: list[str]) -> list[dict[str, Any]]:
    hist, cands = titles[:5], titles[5:15]
    long_text = " ".join(titles * 4)  # far beyond max_model_len=512 tokens
    return [
        {"request_id": "plain", "user_id": 1,
         "messages": msgs(f"In one sentence, what is this product? {titles[0]}")},
        {"request_id": "choice", "user_id": 2,
         "messages": msgs(f"A user bought: {hist[0]}. Which product will they buy next? "
                          f"Options: {'; '.join(cands[:4])}"), "guided_choice": cands[:4]},
        {"request_id": "choice-again", "user_id": 3,
         "messages": msgs(f"A user bought: {hist[0]}. Which product will they buy next? "
                          f"Options: {'; '.join(cands[:4])}"), "guided_choice": cands[:4]},
        {"request_id": "json", "user_id": 4, "messages": msgs(selection_prompt(hist, cands, 4)),
         "guided_json": json.dumps(SELECT_SCHEMA)},
        {"request_id": "empty", "user_id": 5, "messages": msgs("Say nothing at all."),
         "guided_choice": [" "]},
        {"request_id": "truncated", "user_id": 6, "messages": msgs(LONG_LIST)},
        {"request_id": "too-long", "user_id": 7, "messages": msgs(long_text)},
        {"request_id": "bad-schema", "user_id": 8, "messages": msgs("hi"),
         "guided_json": json.dumps({"type": "objectx"})},
        {"request_id": "bad-messages", "user_id": 9, "messages": "[{\"role\": \"user\"}"},
    ]


def _full(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"guided_json": "", "guided_choice": [], **r} for r in rows]


@pytest.fixture(scope="module")
def answered(ray_local, requests: list[dict[str, Any]], tmp_path_factory) -> tuple[dict[str, dict], Path]:
    """One engine start answers every kind of request, through ``generate`` on a Ray Dataset."""
    import ray

    cache = tmp_path_factory.mktemp("reply-cache")
    ds = ray.data.from_items(_full(requests), override_num_blocks=2)
    out = generate(ds, LLMConfig(**ENGINE), cache_dir=cache).take_all()
    return {r["request_id"]: r for r in out}, cache


def test_model_is_converted_once_and_cached(tmp_path: Path) -> None:
    cfg = LLMConfig()
    path = Path(resolve_llm(cfg))
    assert (path / "model.safetensors").is_file() and (path / "chat_template.jinja").is_file()
    t0 = time.perf_counter()
    assert Path(resolve_llm(cfg)) == path
    assert time.perf_counter() - t0 < 1.0  # cached: no second conversion
    with pytest.raises(ConfigError, match="not a model folder"):
        resolve_llm(LLMConfig(model=str(tmp_path / "nope")))


def test_every_row_comes_back_with_its_columns(answered, requests) -> None:
    by_id, _ = answered
    assert set(by_id) == {r["request_id"] for r in requests}
    for r in requests:
        row = by_id[r["request_id"]]
        assert row["user_id"] == r["user_id"]  # extra columns pass through
        assert row["status"] in ("ok", "empty", "truncated", "error")
        assert row["cached"] is False
        assert (row["error"] != "") == (row["status"] == "error")


def test_plain_generation(answered) -> None:
    row = answered[0]["plain"]
    assert row["status"] == "ok" and row["finish_reason"] == "stop" and row["reply"].strip()
    assert row["prompt_tokens"] > 10 and 0 < row["completion_tokens"] <= ENGINE["max_tokens"]


def test_guided_choice_constrains_the_reply(answered, requests) -> None:
    by_id, _ = answered
    choices = requests[1]["guided_choice"]
    assert by_id["choice"]["status"] == "ok" and by_id["choice"]["reply"] in choices
    assert by_id["choice-again"]["reply"] == by_id["choice"]["reply"]  # greedy: same request, same reply


def test_guided_json_constrains_the_reply(answered) -> None:
    row = answered[0]["json"]
    assert row["status"] == "ok", row
    picked = json.loads(row["reply"])
    assert isinstance(picked, list) and 3 <= len(picked) <= 5
    assert all(isinstance(x, int) and 1 <= x <= 10 for x in picked)


def test_empty_and_truncated_are_reported_not_hidden(answered) -> None:
    by_id, _ = answered
    assert by_id["empty"]["status"] == "empty" and not by_id["empty"]["reply"].strip()
    assert by_id["empty"]["finish_reason"] == "stop"
    t = by_id["truncated"]
    assert t["status"] == "truncated" and t["finish_reason"] == "length"
    assert t["completion_tokens"] == ENGINE["max_tokens"] and t["reply"].strip()  # verbatim, partial


def test_bad_requests_fail_alone(answered) -> None:
    by_id, _ = answered
    assert "maximum" in by_id["too-long"]["error"] or "longer" in by_id["too-long"]["error"]
    assert "objectx" in by_id["bad-schema"]["error"]
    assert "not valid JSON" in by_id["bad-messages"]["error"]
    for rid in ("too-long", "bad-schema", "bad-messages"):
        assert by_id[rid]["status"] == "error" and by_id[rid]["reply"] == ""


def test_rerun_is_served_from_the_cache_without_an_engine(answered, requests) -> None:
    by_id, cache = answered
    done = [r for r in requests if by_id[r["request_id"]]["status"] != "error"]
    # A KV cache no machine has: if an engine were started, it would fail and so would this call.
    impossible = LLMConfig(**{**ENGINE, "cpu_kv_cache_gib": 100_000})
    t0 = time.perf_counter()
    again = generate_rows(_full(done), impossible, cache_dir=cache)
    assert [r["request_id"] for r in again] == [r["request_id"] for r in done]  # input order
    for row in again:
        first = by_id[row["request_id"]]
        assert row["cached"] is True
        assert (row["reply"], row["status"], row["completion_tokens"]) == \
            (first["reply"], first["status"], first["completion_tokens"])
    assert time.perf_counter() - t0 < 120


def test_engine_settings_are_checked_before_any_actor_starts() -> None:
    with pytest.raises(ConfigError, match="needs GPUs"):
        generate_rows([{"request_id": "a", "messages": msgs("x")}], LLMConfig(tensor_parallel_size=2))


# ----------------------------------------------------------------------------- slow: faults, server


def _map_worker_pids() -> set[int]:
    """Engine actors of this test's Ray (descendants of this process: the local raylet is our child),
    not those of anyone else sharing the machine."""
    import psutil

    pids = set()
    for p in psutil.Process().children(recursive=True):
        try:
            if "MapBatches(VLLMBatch)" in " ".join(p.cmdline()):
                pids.add(p.pid)
        except psutil.Error:
            continue
    return pids


def _engine_core_of(actor_pid: int) -> int:
    import psutil

    for child in psutil.Process(actor_pid).children(recursive=True):
        text = child.name() + " " + " ".join(child.cmdline())
        if "EngineCore" in text:
            return child.pid
    raise AssertionError(f"no vLLM EngineCore process under actor {actor_pid}")


@pytest.mark.slow
@pytest.mark.parametrize("victim_kind", ["actor", "engine_core"])
def test_engine_killed_mid_run_still_answers_every_row(ray_local, titles, tmp_path: Path,
                                                       victim_kind: str) -> None:
    """SIGKILL the actor process (Ray restarts it and retries its batch), or only its vLLM engine
    core (the actor sees EngineDeadError and exits so that the same happens)."""
    cache = tmp_path / "cache"
    rows = [{"request_id": f"r{i}", "messages": msgs(f"Describe this product in one sentence: {t}")}
            for i, t in enumerate(titles[:24])]
    cfg = LLMConfig(**{**ENGINE, "batch_size": 4})
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["rows"] = generate_rows(rows, cfg, cache_dir=cache)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 600
    while not list(cache.glob("part-*.jsonl")):  # the first batch is answered: the engine runs
        assert time.monotonic() < deadline and worker.is_alive(), result
        time.sleep(0.2)
    actors = _map_worker_pids()
    assert len(actors) == 1
    actor = actors.pop()
    os.kill(actor if victim_kind == "actor" else _engine_core_of(actor), signal.SIGKILL)
    worker.join(timeout=900)
    assert not worker.is_alive()
    assert "error" not in result, result.get("error")
    out = result["rows"]
    assert sorted(r["request_id"] for r in out) == sorted(r["request_id"] for r in rows)
    assert all(r["status"] in ("ok", "truncated") for r in out), [r for r in out if r["status"] == "error"]
    # Part files carry the writer's pid: the first actor answered some batches, its replacement the rest.
    writers = [int(p.name.split("-")[2]) for p in cache.glob("part-*.jsonl")]
    assert actor in writers and any(w != actor for w in writers), writers
    assert writers.count(actor) < len(rows) // cfg.batch_size


@pytest.mark.slow
def test_openai_backend_against_vllms_openai_server(ray_local, titles, tmp_path: Path) -> None:
    """The OpenAI backend talks to a real server speaking the API: vLLM's, on CPU, on 127.0.0.1."""
    import httpx

    model_dir = resolve_llm(LLMConfig())
    port = pick_port()
    env = {**os.environ, "VLLM_LOGGING_LEVEL": "WARNING"}
    env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    log = open(tmp_path / "server.log", "w")  # noqa: SIM115 - closed in finally
    server = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir,
         "--served-model-name", SMOLLM2, "--host", "127.0.0.1", "--port", str(port),
         "--max-model-len", "512", "--max-num-seqs", "8", "--enforce-eager",
         "--kv-cache-memory-bytes", str(1 << 29)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while True:
            assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "vLLM's server did not come up"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        cands = titles[5:15]
        rows = [
            {"request_id": "plain", "messages": msgs(f"In one sentence, what is this product? {titles[0]}")},
            {"request_id": "choice", "messages": msgs(f"Which one is a nail product? {'; '.join(cands[:4])}"),
             "guided_choice": cands[:4]},
            {"request_id": "json", "messages": msgs(selection_prompt(titles[:5], cands, 4)),
             "guided_json": json.dumps(SELECT_SCHEMA)},
            {"request_id": "truncated", "messages": msgs(LONG_LIST)},
        ]
        cfg = LLMConfig(backend="openai", base_url=f"http://127.0.0.1:{port}/v1", model=SMOLLM2,
                        max_tokens=40, api_key_env="LLMSER_NO_SUCH_KEY", max_concurrency=4)
        out = {r["request_id"]: r for r in generate_rows(_full(rows), cfg, cache_dir=tmp_path / "cache")}
        # A free-text answer may run past max_tokens: either way it is a real, recorded answer.
        assert out["plain"]["status"] in ("ok", "truncated") and out["plain"]["prompt_tokens"] > 10
        assert out["plain"]["reply"].strip() and out["plain"]["completion_tokens"] > 0
        assert out["choice"]["status"] == "ok" and out["choice"]["reply"] in cands[:4]
        picked = json.loads(out["json"]["reply"])
        assert 3 <= len(picked) <= 5 and all(1 <= x <= 10 for x in picked)
        assert out["truncated"]["status"] == "truncated" and out["truncated"]["completion_tokens"] == 40
        assert not any(r["cached"] for r in out.values())
        again = generate_rows(_full(rows), cfg, cache_dir=tmp_path / "cache")
        assert all(r["cached"] for r in again)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        log.close()


def test_openai_structured_outputs_match_vllms_protocol() -> None:
    """Field names checked against the installed vLLM's own request model (no server needed)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    from llmser_ray.llm.openai_backend import OpenAIBatch
    from llmser_ray.llm.requests import parse_request

    batch = OpenAIBatch(LLMConfig(backend="openai", base_url="http://127.0.0.1:9/v1").model_dump(mode="json"))
    j = batch.body(parse_request({"messages": msgs("x"), "guided_json": json.dumps(SELECT_SCHEMA)}))
    c = batch.body(parse_request({"messages": msgs("x"), "guided_choice": ["red", "blue"]}))
    so_json = ChatCompletionRequest(**j).extract_structured_outputs()
    so_choice = ChatCompletionRequest(**c).extract_structured_outputs()
    assert so_json is not None and json.loads(json.dumps(so_json.json)) == SELECT_SCHEMA
    assert so_choice is not None and so_choice.choice == ["red", "blue"]
    assert ChatCompletionRequest(**batch.body(parse_request({"messages": msgs("x")}))
                                 ).extract_structured_outputs() is None


_RACE = """
import sys
from pathlib import Path
from llmser_ray.config import LLMConfig
from llmser_ray.llm import models

real = models.convert_gguf
def counting(gguf, out):
    with open(sys.argv[2], "a") as fh:
        fh.write("converted\\n")
    real(gguf, out)
models.convert_gguf = counting
print(models.resolve_llm(LLMConfig(model_cache=sys.argv[1])))
"""


@pytest.mark.slow
def test_concurrent_first_use_converts_the_model_once(tmp_path: Path) -> None:
    cache, log = tmp_path / "models", tmp_path / "conversions.txt"
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(cache), str(log)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=900)[0].strip().splitlines()[-1] for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert outs[0] == outs[1] and (Path(outs[0]) / "model.safetensors").is_file()
    assert log.read_text().splitlines() == ["converted"]  # the second process waited and reused it
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]


def test_cpu_engines_claim_disjoint_cores_released_on_exit(tmp_path: Path) -> None:
    """Two CPU engines on one node each bind to their own cores: a claim skips held cores, fails
    whole (binding left to vLLM) when too few are free, and a killed holder frees its cores."""
    from llmser_ray.llm.vllm_backend import claim_cores

    cores = sorted(os.sched_getaffinity(0))
    first, locks = claim_cores(1, tmp_path)
    assert first == cores[:1] and len(locks) == 1
    assert claim_cores(len(cores), tmp_path) == ([], [])  # one is held: not enough left
    if len(cores) > 1:
        second, locks2 = claim_cores(1, tmp_path)
        assert second == cores[1:2]
        for f in locks2:
            f.close()
    for f in locks:
        f.close()
    # A holder that dies (SIGKILL: no cleanup runs) releases its cores.
    code = ("import time; from pathlib import Path; from llmser_ray.llm.vllm_backend import claim_cores\n"
            f"c, held = claim_cores(1, Path({str(tmp_path)!r})); print(c, flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == str(cores[:1])
        assert claim_cores(len(cores), tmp_path) == ([], [])
    finally:
        holder.kill()
        holder.wait()
    again, locks = claim_cores(1, tmp_path)
    assert again == cores[:1]
    for f in locks:
        f.close()


def test_cpu_bind_sets_vllms_binding_unless_the_user_did(monkeypatch, tmp_path: Path) -> None:
    from llmser_ray.llm import vllm_backend

    monkeypatch.setattr(vllm_backend.tempfile, "gettempdir", lambda: str(tmp_path))
    seen = {}

    class FakeLLM:  # the engine's constructor only: what matters is the env it starts under
        def __init__(self, **kw: Any) -> None:
            seen["bind"] = os.environ.get("VLLM_CPU_OMP_THREADS_BIND")

    import vllm

    monkeypatch.setattr(vllm, "LLM", FakeLLM)
    monkeypatch.setattr(vllm_backend.VLLMBatch, "_watch_engine_processes", lambda self: None)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    cfg = LLMConfig(cpus_per_engine=1.0).model_dump(mode="json")
    vllm_backend.VLLMBatch(cfg, "/nonexistent")._engine()
    assert seen["bind"] == str(min(os.sched_getaffinity(0)))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    vllm_backend.VLLMBatch(cfg, "/nonexistent")._engine()
    assert seen["bind"] == "nobind"
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND")
    vllm_backend.VLLMBatch({**cfg, "cpu_bind": False}, "/nonexistent")._engine()
    assert seen["bind"] is None
