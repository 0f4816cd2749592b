"""LLM throughput on SIA-style prompts from Amazon Beauty, three ways, in this one script:

1. reference: transformers ``generate``, one prompt at a time (the LLMSeR reference code's pattern);
2. pool: llmser-ray's generation layer (``llm.generate_rows``: a Ray Data actor pool of vLLM engines);
3. processor: Ray Data's own ``ray.data.llm`` vLLM processor on the same engine settings.

Same model (SmolLM2-135M-Instruct, converted once), same prompts (a user's history titles plus 20
numbered candidate titles, asking for 15 items, one per line), same greedy decoding and token
limit. Figures: prompts/s and generated tokens/s, end to end (model load / engine start
included) and steady state (excluded). Other engineers may share the machine: the load average
is printed before and after each run.

    .venv/bin/python bench/bench_llm.py --prompts 64
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import beauty_sets, loadavg

from llmser_ray.config import LLMConfig, load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.llm import generate_rows, resolve_llm
from llmser_ray.ray_utils import loopback_node
from llmser_ray.stages.prepare import prepare

SYSTEM = "You are a shopping assistant. Answer with product names only."


def load() -> str:
    return f"load {loadavg()}"


def sia_prompts(workdir: Path, n: int, seed: int = 0, n_candidates: int = 20, n_history: int = 15,
                ask: int = 15) -> list[list[dict[str, str]]]:
    """The SNF prompt of METHOD.md on real users: history titles, numbered candidate titles."""
    ds = load_dataset(workdir / "dataset")
    rng = np.random.default_rng(seed)
    users = rng.choice([u for u, s in enumerate(ds.train_sequences()) if len(s) >= 3], size=n, replace=False)
    prompts = []
    for u in users:
        hist = ds.train_sequences()[u][-n_history:]
        pool = np.setdiff1d(np.arange(1, ds.num_items + 1), ds.sequences[u])
        cands = rng.choice(pool, size=n_candidates, replace=False)
        text = ("The user has visited the following items:\n"
                + "\n".join(ds.item_text[i] for i in hist)
                + f"\n\nSelect {ask} items the user may have interacted with before from the candidate set:\n"
                + "\n".join(f"{k}. {ds.item_text[i]}" for k, i in enumerate(cands, 1))
                + "\n\nReply with only the names, one per line.")
        prompts.append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}])
    return prompts


def reference(model_dir: str, prompts: list[list[dict[str, str]]], max_tokens: int, dtype: str,
              threads: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    load_s = time.perf_counter() - t0
    t1, c1 = time.perf_counter(), time.process_time()
    gen_tokens = prompt_tokens = 0
    with torch.inference_mode():
        for msgs in prompts:
            ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
            prompt_tokens += ids["input_ids"].shape[1]
            gen_tokens += out.shape[1] - ids["input_ids"].shape[1]
    gen_s, cpu_s = time.perf_counter() - t1, time.process_time() - c1
    del model
    gc.collect()
    return {"load_s": load_s, "gen_s": gen_s, "cpu_s": cpu_s, "total_s": load_s + gen_s,
            "tokens": gen_tokens, "prompt_tokens": prompt_tokens}


class EngineCPU:
    """CPU seconds used by the engine actors and their vLLM subprocesses, sampled every 0.25 s.

    On a shared machine wall time mostly measures the neighbours; CPU time measures the work.
    """

    def __init__(self, marker: str = "MapBatches(VLLMBatch)") -> None:
        import threading

        self.marker, self.samples, self._stop = marker, [], threading.Event()
        self._seen: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        me = psutil.Process()
        while not self._stop.is_set():
            # Only this script's Ray (its raylet is our child), not other users' engines.
            for p in me.children(recursive=True):
                try:
                    if self.marker not in " ".join(p.cmdline()):
                        continue
                    for q in [p, *p.children(recursive=True)]:
                        t = q.cpu_times()
                        self._seen[q.pid] = max(self._seen.get(q.pid, 0.0), t.user + t.system)
                except psutil.Error:
                    continue
            self.samples.append((time.time_ns(), sum(self._seen.values())))
            self._stop.wait(0.25)

    def __enter__(self) -> EngineCPU:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def at(self, t_ns: int) -> float:
        return max((c for t, c in self.samples if t <= t_ns), default=0.0)

    @property
    def total(self) -> float:
        return self.samples[-1][1] if self.samples else 0.0


def pool(cfg: LLMConfig, prompts: list[list[dict[str, str]]]) -> dict[str, Any]:
    rows = [{"request_id": str(i), "messages": json.dumps(m)} for i, m in enumerate(prompts)]
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        with EngineCPU() as cpu:
            out = generate_rows(rows, cfg, cache_dir=cache)
        total = time.perf_counter() - t0
        # Part files are written per answered batch and named by time: the first one marks the
        # end of engine start + first batch; the span after it is steady-state generation.
        parts = sorted((int(p.name.split("-")[1]), [json.loads(x) for x in p.read_text().splitlines()])
                       for p in Path(cache).glob("part-*.jsonl"))
    tokens = sum(r["completion_tokens"] for r in out)
    steady = None
    if len(parts) >= 2:
        span = (parts[-1][0] - parts[0][0]) / 1e9
        after = [rec for _, recs in parts[1:] for rec in recs]
        after_tokens = sum(rec["completion_tokens"] for rec in after)
        steady = {"rows": len(after), "s": span, "prompts_per_s": len(after) / span,
                  "tokens_per_s": after_tokens / span, "tokens": after_tokens,
                  "cpu_s": cpu.at(parts[-1][0]) - cpu.at(parts[0][0])}
    statuses = {s: sum(r["status"] == s for r in out) for s in ("ok", "truncated", "empty", "error")}
    return {"total_s": total, "tokens": tokens, "steady": steady, "statuses": statuses,
            "cpu_s": cpu.total}


def processor(cfg: LLMConfig, model_dir: str, prompts: list[list[dict[str, str]]]) -> dict[str, Any]:
    import ray
    from ray.data.llm import build_processor, vLLMEngineProcessorConfig

    from llmser_ray.llm.vllm_backend import engine_kwargs

    kw = engine_kwargs(cfg, model_dir)
    kw.pop("model")
    small = {"num_cpus": 0.25, "concurrency": 1}
    pcfg = vLLMEngineProcessorConfig(
        model_source=model_dir, engine_kwargs=kw, batch_size=cfg.batch_size, concurrency=cfg.num_engines,
        placement_group_config={"bundles": [{"CPU": cfg.cpus_per_engine}]},
        chat_template_stage=small, tokenize_stage=small, detokenize_stage=small, log_engine_metrics=False)
    sampling = {"temperature": cfg.temperature, "top_p": cfg.top_p, "max_tokens": cfg.max_tokens}
    proc = build_processor(
        pcfg,
        preprocess=lambda row: {"messages": json.loads(row["messages"]), "sampling_params": sampling},
        postprocess=lambda row: {"reply": row["generated_text"], "tokens": row["num_generated_tokens"]},
        preprocess_map_kwargs={"num_cpus": 0.25}, postprocess_map_kwargs={"num_cpus": 0.25})
    rows = [{"messages": json.dumps(m)} for m in prompts]
    t0 = time.perf_counter()
    out = proc(ray.data.from_items(rows)).take_all()
    total = time.perf_counter() - t0
    return {"total_s": total, "tokens": int(sum(r["tokens"] for r in out)), "rows": len(out)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16, help="rows per engine call (pool and processor)")
    ap.add_argument("--engines", type=int, default=1)
    ap.add_argument("--cpus-per-engine", type=float, default=1.0)
    ap.add_argument("--ref-dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--ref-prompts", type=int, default=None, help="prompts for the reference (default all)")
    # 1 thread: vLLM's CPU worker binds one OpenMP thread per core it owns (one here), and on a shared
    # machine a 2-thread torch spins: measured 48 vs 11 CPU-s per prompt at load 40.
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip", nargs="*", default=[], choices=["reference", "pool", "processor"])
    ap.add_argument("--workdir", default="runs/bench-beauty")
    args = ap.parse_args()

    import ray

    cfg0 = load_config(None, beauty_sets(args.workdir))
    prepare(cfg0)
    prompts = sia_prompts(cfg0.workdir_path, args.prompts)
    cfg = LLMConfig(max_tokens=args.max_tokens, batch_size=args.batch_size, num_engines=args.engines,
                    cpus_per_engine=args.cpus_per_engine, max_model_len=2048, max_num_seqs=args.batch_size)
    model_dir = resolve_llm(cfg)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{len(prompts)} SIA prompts, max_tokens={cfg.max_tokens}, greedy; {load()}", flush=True)
    results: dict[str, Any] = {}
    if "reference" not in args.skip:
        ref_prompts = prompts[:args.ref_prompts] if args.ref_prompts else prompts
        r = reference(model_dir, ref_prompts, cfg.max_tokens, args.ref_dtype, args.threads)
        r["n"] = len(ref_prompts)
        results["reference"] = r
        print(f"reference (transformers, {args.ref_dtype}, {args.threads} threads, one prompt at a time): "
              f"load {r['load_s']:.1f}s, generate {r['gen_s']:.1f}s -> {r['n'] / r['gen_s']:.3f} prompts/s, "
              f"{r['tokens'] / r['gen_s']:.1f} tokens/s steady; {r['n'] / r['total_s']:.3f} prompts/s "
              f"end to end; CPU {r['cpu_s'] / r['n']:.1f}s/prompt, {r['tokens'] / r['cpu_s']:.1f} tokens "
              f"per CPU-second; {load()}", flush=True)
    with loopback_node():  # as the commands start a local Ray: every port on 127.0.0.1
        ray.init(num_cpus=max(4, os.cpu_count() or 2), include_dashboard=False)
    if "pool" not in args.skip:
        r = pool(cfg, prompts)
        results["pool"] = r
        st = r["steady"]
        steady = (f"{st['prompts_per_s']:.3f} prompts/s, {st['tokens_per_s']:.1f} tokens/s steady "
                  f"({st['rows']} rows in {st['s']:.1f}s after the first batch; CPU "
                  f"{st['cpu_s'] / st['rows']:.1f}s/prompt, {st['tokens'] / max(st['cpu_s'], 1e-9):.1f} "
                  f"tokens per CPU-second)") if st else "n/a"
        print(f"pool (llmser-ray, {cfg.num_engines} vLLM engine(s), batch {cfg.batch_size}): "
              f"{r['total_s']:.1f}s end to end -> {len(prompts) / r['total_s']:.3f} prompts/s, "
              f"{r['tokens'] / r['total_s']:.1f} tokens/s; {steady}; statuses {r['statuses']}; {load()}",
              flush=True)
    if "processor" not in args.skip:
        try:
            r = processor(cfg, model_dir, prompts)
            results["processor"] = r
            print(f"processor (ray.data.llm, same engine settings): {r['total_s']:.1f}s end to end -> "
                  f"{len(prompts) / r['total_s']:.3f} prompts/s, {r['tokens'] / r['total_s']:.1f} tokens/s; "
                  f"{load()}", flush=True)
        except Exception as e:  # noqa: BLE001 - a failed alternative is a result too
            results["processor"] = {"error": f"{type(e).__name__}: {e}"}
            print(f"processor (ray.data.llm) FAILED: {type(e).__name__}: {str(e)[:500]}", flush=True)
    ref, pl = results.get("reference"), results.get("pool")
    if ref and pl:
        ref_tps = ref["tokens"] / ref["gen_s"]
        e2e = (len(prompts) / pl["total_s"]) / (ref["n"] / ref["total_s"])
        line = f"ratio pool/reference: {e2e:.2f}x prompts/s end to end"
        if pl["steady"]:
            st = pl["steady"]
            line += (f", {st['prompts_per_s'] / (ref['n'] / ref['gen_s']):.2f}x prompts/s and "
                     f"{st['tokens_per_s'] / ref_tps:.2f}x tokens/s steady, "
                     f"{(ref['cpu_s'] / ref['n']) / (st['cpu_s'] / st['rows']):.2f}x fewer CPU-seconds "
                     "per prompt steady")
        print(line)
    proc = results.get("processor")
    if pl and proc and "total_s" in proc:
        print(f"ratio pool/processor: {proc['total_s'] / pl['total_s']:.2f}x (end to end, same prompts)")
    print(json.dumps({k: v for k, v in results.items()}, default=str))


if __name__ == "__main__":
    main()
