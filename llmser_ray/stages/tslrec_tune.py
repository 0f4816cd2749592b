"""The ``tslrec_tune`` stage: TSLRec's information reconstruction, LoRA fine-tuning on Ray Train.

The pretrained forward model defines K latent categories (k-means over its item embeddings);
the LLM (``tslrec.model``) is fine-tuned with a LoRA adapter to read a user's history and
reconstruct their distribution over the categories (built from TRAINING items only), and to
infer an item's category from its text. Library code: ``llm/lora.py`` (why restricted
next-token logits, why this loss). Output ``<workdir>/tslrec/`` (docs/SCHEMA.md#tslrec).

Why this shape (as the train stage): one ``TorchTrainer`` run named by the identity digest, so
rerunning after a kill resumes from Ray Train's latest checkpoint; checkpoints hold the adapter
in safetensors, the optimizer state loaded with ``weights_only=True`` and JSON state (nothing
is unpickled); the folder also holds Ray Train's storage (``ray/``), so it is not renamed into
place as a whole: ``adapter/`` is published atomically and the folder sealed by its manifest.
The base and the tuned model are scored on held-out users and items in the same run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmser_ray.config import Config, LLMConfig
from llmser_ray.errors import StageError
from llmser_ray.io import atomic_dir, read_manifest, write_json
from llmser_ray.stages.base import Stage, digest

STAGE = Stage(
    name="tslrec_tune", output="tslrec", schema_version=1, inputs=("prepare", "pretrain"),
    identity=("tslrec.* except operational keys", "LLM fingerprint", "forward model's run key",
              "dataset digest"),
    schema="docs/SCHEMA.md#tslrec",
    summary="TSLRec stage 1: LoRA fine-tuning of the LLM to reconstruct users' latent-category "
            "preferences (Ray Train)")
OPERATIONAL_KEYS = ("enabled", "init_backbone", "num_workers", "cpus_per_worker", "use_gpu",
                    "torch_threads", "keep_checkpoints", "max_failures", "eval_batch_size",
                    "embed_batch_size", "embed_actors", "embed_cpus", "embed_gpus", "embed_layer", "pooling")
TARGETS_FILE = "targets.parquet"
CATEGORIES_FILE = "categories.parquet"


@dataclass
class TuneResult:
    path: Path
    skipped: bool
    metrics: dict[str, Any]


def resolve_tslrec_model(cfg: Config) -> str:
    """The local folder of ``tslrec.model`` (the bundled SmolLM2 is converted once), checked for weights."""
    from llmser_ray.llm.lora import check_model_folder
    from llmser_ray.llm.models import resolve_llm

    folder = resolve_llm(LLMConfig(model=cfg.tslrec.model, model_cache=cfg.llm.model_cache))
    if not Path(folder).is_dir():
        raise StageError(f"tslrec.model '{cfg.tslrec.model}' is not a local folder",
                         "download the model into a folder and set tslrec.model to its path")
    return str(check_model_folder(folder))


def identity(cfg: Config, model_fingerprint: str, forward_key: str, dataset_digest: str) -> str:
    fields = {k: v for k, v in cfg.tslrec.model_dump(mode="json").items() if k not in OPERATIONAL_KEYS}
    return digest({"tslrec": fields, "llm": model_fingerprint, "forward": forward_key,
                   "dataset_digest": dataset_digest})


def _split(cfg: Config, n_users_eligible: np.ndarray, num_items: int) -> tuple[np.ndarray, np.ndarray,
                                                                               np.ndarray, np.ndarray]:
    """Held-out users first, then the tuning users; held-out items apart from the tuning items."""
    t = cfg.tslrec
    rng = np.random.default_rng(t.seed)
    users = rng.permutation(n_users_eligible)
    if len(users) <= t.eval_users:
        raise StageError(f"only {len(users)} users have training items, not more than "
                         f"tslrec.eval_users={t.eval_users}", "lower tslrec.eval_users")
    eval_users = np.sort(users[:t.eval_users])
    rest = users[t.eval_users:]
    tune_users = np.sort(rest if t.max_users is None else rest[:t.max_users])
    items = rng.permutation(np.arange(1, num_items + 1))
    n_eval_items = min(t.eval_items, num_items // 2)
    return tune_users, eval_users, np.sort(items[n_eval_items:]), np.sort(items[:n_eval_items])


def build_inputs(cfg: Config, ds: Any, item_table: np.ndarray, folder: Path) -> dict[str, int]:
    """Write the categories (k-means of the forward model's item table) and the users' target
    distributions (training items only) into ``folder``; returns counts."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmser_ray.llm.lora import item_categories, item_texts, user_distributions

    t = cfg.tslrec
    item_texts(ds.items_table, t.item_text, t.title_chars)  # bad item text fails here, in one line
    cats = item_categories(item_table, t.n_categories, t.kmeans_iters, t.seed)
    dists = user_distributions(ds.train_sequences(), cats, t.n_categories)
    eligible = np.flatnonzero(dists.sum(1) > 0)
    tune_users, eval_users, tune_items, eval_items = _split(cfg, eligible, ds.num_items)
    split = np.full(len(dists), "", dtype=object)
    split[tune_users], split[eval_users] = "tune", "eval"
    rows = np.flatnonzero(split != "")
    pq.write_table(pa.table({
        "user_id": pa.array(ds.user_ids[rows].astype(np.int64)),
        "split": pa.array(split[rows].astype(str)),
        "target": pa.array([dists[i].tolist() for i in rows], type=pa.list_(pa.float32())),
    }), folder / TARGETS_FILE)
    item_split = np.full(ds.num_items + 1, "tune", dtype=object)
    item_split[eval_items] = "eval"
    pq.write_table(pa.table({
        "item_id": pa.array(np.arange(1, ds.num_items + 1, dtype=np.int64)),
        "category": pa.array(cats[1:]),
        "split": pa.array(item_split[1:].astype(str)),
    }), folder / CATEGORIES_FILE)
    return {"tune_users": len(tune_users), "eval_users": len(eval_users),
            "tune_items": len(tune_items), "eval_items": len(eval_items), "items": ds.num_items}


@dataclass
class Examples:
    """Prompts and targets a worker trains and evaluates on (rebuilt from the stage's inputs)."""

    tune_prompts: list[str]
    tune_targets: np.ndarray
    eval_prompts: list[str]
    eval_targets: np.ndarray
    tune_item_prompts: list[str]
    tune_item_labels: np.ndarray
    eval_item_prompts: list[str]
    eval_item_labels: np.ndarray

    @classmethod
    def load(cls, cfg: Config, dataset_dir: str, folder: Path) -> Examples:
        import pyarrow.parquet as pq

        from llmser_ray.data.dataset import load_dataset
        from llmser_ray.llm.lora import item_prompt, item_texts, user_prompt

        t = cfg.tslrec
        ds = load_dataset(dataset_dir)
        texts = item_texts(ds.items_table, t.item_text, t.title_chars)
        train = ds.train_sequences()
        row_of = {int(u): i for i, u in enumerate(ds.user_ids)}
        tg = pq.read_table(folder / TARGETS_FILE).to_pydict()
        cat = pq.read_table(folder / CATEGORIES_FILE).to_pydict()
        parts: dict[str, tuple[list[str], list[list[float]]]] = {"tune": ([], []), "eval": ([], [])}
        for u, s, target in zip(tg["user_id"], tg["split"], tg["target"], strict=True):
            parts[s][0].append(user_prompt(train[row_of[int(u)]], texts, t.prompt_history))
            parts[s][1].append(target)
        items: dict[str, tuple[list[str], list[int]]] = {"tune": ([], []), "eval": ([], [])}
        for i, c, s in zip(cat["item_id"], cat["category"], cat["split"], strict=True):
            items[s][0].append(item_prompt(i, texts))
            items[s][1].append(c)
        k = t.n_categories

        def arr(x: list[list[float]]) -> np.ndarray:
            return np.asarray(x, dtype=np.float32).reshape(-1, k)

        return cls(parts["tune"][0], arr(parts["tune"][1]), parts["eval"][0], arr(parts["eval"][1]),
                   items["tune"][0], np.asarray(items["tune"][1], dtype=np.int64),
                   items["eval"][0], np.asarray(items["eval"][1], dtype=np.int64))


# ----------------------------------------------------------------------------- the worker loop


def _tune_loop(loop_cfg: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from safetensors.torch import load_file, save_file

    from llmser_ray.llm.lora import (
        adapter_state,
        category_logprobs,
        encode,
        evaluate,
        label_token_ids,
        load_adapter_state,
        load_base_model,
        load_tokenizer,
        lora_model,
        soft_cross_entropy,
    )
    from llmser_ray.stages.train import log_line, quiet_ray_train

    cfg = Config.model_validate(loop_cfg["config"])
    t = cfg.tslrec
    quiet_ray_train(cfg.train.ray_log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(t.torch_threads or max(1, int(t.cpus_per_worker)))
    torch.manual_seed(t.seed)

    ex = Examples.load(cfg, loop_cfg["dataset_dir"], Path(loop_cfg["inputs"]))
    tok = load_tokenizer(loop_cfg["model_dir"])
    labels = label_token_ids(tok, t.n_categories)
    model = lora_model(load_base_model(loop_cfg["model_dir"], t.dtype), t.lora_r, t.lora_alpha,
                       t.lora_dropout, t.target_modules)
    wrapped = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.lr,
                            weight_decay=t.weight_decay)

    def score() -> dict[str, Any]:
        return evaluate(model, tok, labels, ex.eval_prompts, ex.eval_targets, ex.eval_item_prompts,
                        ex.eval_item_labels, t.eval_batch_size, t.max_prompt_tokens, device).as_dict()

    state: dict[str, Any] = {"step": 0, "history": [], "base": None, "tuned": None,
                             "train_s": 0.0, "samples": 0}
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            load_adapter_state(model, load_file(os.path.join(d, "adapter.safetensors")))
            opt.load_state_dict(torch.load(os.path.join(d, "optimizer.pt"), weights_only=True))
            state = json.loads(Path(d, "state.json").read_text())
        if rank == 0:
            log_line(f"[tslrec_tune] resumed after step {state['step']}")
    if state["base"] is None and rank == 0:
        t0 = time.perf_counter()
        with model.disable_adapter():
            state["base"] = score()
        state["eval_s"] = time.perf_counter() - t0
        log_line(f"[tslrec_tune] base model on {state['base']['users']} held-out users: "
                 f"CE {state['base']['user_ce']:.4f} KL {state['base']['user_kl']:.4f}, item accuracy "
                 f"{state['base']['item_accuracy']:.3f} ({state['eval_s']:.0f}s)")

    wrapped.train()
    n_u, n_i = len(ex.tune_prompts), len(ex.tune_item_prompts)
    for step in range(state["step"] + 1, t.steps + 1):
        t0 = time.perf_counter()
        rng = np.random.default_rng(t.seed * 1_000_003 + step)
        # One global batch per step, cut into the ranks' slices (DDP averages their gradients).
        users = rng.choice(n_u, size=t.batch_size * world, replace=n_u < t.batch_size * world)
        users = users[rank * t.batch_size:(rank + 1) * t.batch_size]
        n_item = t.item_batch_size if t.item_loss_weight > 0 and n_i else 0
        items = rng.choice(n_i, size=n_item * world, replace=n_i < n_item * world) if n_item else \
            np.zeros(0, dtype=np.int64)
        items = items[rank * n_item:(rank + 1) * n_item]
        prompts = [ex.tune_prompts[i] for i in users] + [ex.tune_item_prompts[i] for i in items]
        batch = {k: v.to(device) for k, v in encode(tok, prompts, t.max_prompt_tokens).items()}
        logp = category_logprobs(wrapped, batch, labels)  # one forward for both tasks (DDP)
        user_loss = soft_cross_entropy(logp[:len(users)],
                                       torch.as_tensor(ex.tune_targets[users], device=device))
        loss = user_loss
        item_loss = torch.zeros((), device=device)
        if len(items):
            onehot = torch.nn.functional.one_hot(torch.as_tensor(ex.tune_item_labels[items]),
                                                 t.n_categories).float().to(device)
            item_loss = soft_cross_entropy(logp[len(users):], onehot)
            loss = loss + t.item_loss_weight * item_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state["train_s"] += time.perf_counter() - t0
        state["samples"] += len(prompts) * world
        state["step"] = step
        state["history"].append({"step": step, "loss": float(loss.detach()),
                                 "user_ce": float(user_loss.detach()), "item_ce": float(item_loss.detach())})
        last = step == t.steps
        if step % t.checkpoint_every and not last:
            continue
        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                if last:
                    t1 = time.perf_counter()
                    state["tuned"] = score()
                    state["eval_s"] = state.get("eval_s", 0.0) + time.perf_counter() - t1
                    model.save_pretrained(os.path.join(d, "adapter"), safe_serialization=True)
                save_file(adapter_state(model), os.path.join(d, "adapter.safetensors"))
                torch.save(opt.state_dict(), os.path.join(d, "optimizer.pt"))
                Path(d, "state.json").write_text(json.dumps(state))
                checkpoint = ray.train.Checkpoint.from_directory(d)
                recent = state["history"][-t.checkpoint_every:]
                log_line(f"[tslrec_tune] step {step:5d} loss {np.mean([h['loss'] for h in recent]):.4f} "
                         f"(user CE {np.mean([h['user_ce'] for h in recent]):.4f}) "
                         f"{state['samples'] / max(state['train_s'], 1e-9):.2f} samples/s")
            ray.train.report({"step": step, "loss": state["history"][-1]["loss"]}, checkpoint=checkpoint)


# ----------------------------------------------------------------------------- driver side


def tslrec_current(cfg: Config) -> bool:
    """Whether ``tslrec/`` holds a finished adapter for this config (cheap: manifests only)."""
    from llmser_ray.stages.pretrain import pretrained_dir

    try:
        folder = resolve_tslrec_model(cfg)
    except Exception:
        return False
    from llmser_ray.llm.models import model_fingerprint

    ds_manifest = read_manifest(cfg.workdir_path / "dataset")
    fwd = read_manifest(pretrained_dir(cfg, reverse=False))
    if ds_manifest is None or fwd is None:
        return False
    key = identity(cfg, model_fingerprint(folder), str(fwd.get("run_key")),
                   str(ds_manifest.get("config_digest", "")))
    out = STAGE.folder(cfg.workdir_path)
    return STAGE.current(out, key) is not None and (out / "adapter").is_dir()


def tslrec_tune(cfg: Config, force: bool = False) -> TuneResult:
    """Fine-tune ``tslrec.model`` with LoRA into ``<workdir>/tslrec`` (skipped when current,
    resumed from the latest checkpoint after an interruption)."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from llmser_ray.data.dataset import load_dataset
    from llmser_ray.llm.models import model_fingerprint
    from llmser_ray.models.checkpoint import load_trained
    from llmser_ray.ray_utils import init_ray
    from llmser_ray.stages.prepare import need_dataset
    from llmser_ray.stages.pretrain import forward_model
    from llmser_ray.stages.train import clear_run, ray_storage

    t0 = time.perf_counter()
    model_dir = resolve_tslrec_model(cfg)  # a bad model folder fails here, before anything runs
    need_dataset(cfg, STAGE.name)
    dataset_dir = cfg.workdir_path / "dataset"
    ds = load_dataset(dataset_dir)
    from llmser_ray.llm.lora import item_texts

    item_texts(ds.items_table, cfg.tslrec.item_text, cfg.tslrec.title_chars)  # bad text: fail early
    fwd_dir = forward_model(cfg, STAGE.name)
    fwd_manifest = read_manifest(fwd_dir) or {}
    key = identity(cfg, model_fingerprint(model_dir), str(fwd_manifest.get("run_key")),
                   str(ds.manifest.get("config_digest", "")))
    out = STAGE.folder(cfg.workdir_path)
    done = STAGE.current(out, key, force)
    if done is not None and (out / "metrics.json").is_file() and (out / "adapter").is_dir():
        return TuneResult(out, True, json.loads((out / "metrics.json").read_text()))

    (out / "manifest.json").unlink(missing_ok=True)
    inputs = out / f"inputs-{key}"
    if force or not (inputs / TARGETS_FILE).is_file():
        import torch

        fwd, _ = load_trained(fwd_dir)
        with torch.no_grad():
            table = fwd.item_embeddings().detach().float().cpu().numpy()
        with atomic_dir(inputs) as tmp:
            counts = build_inputs(cfg, ds, table, tmp)
            write_json(tmp / "counts.json", counts)
    counts = json.loads((inputs / "counts.json").read_text())

    init_ray(cfg.ray)
    run_name = f"run-{key}"
    storage_uri = ray_storage(cfg, STAGE.output)
    if force:
        clear_run(storage_uri, run_name)
    t = cfg.tslrec
    trainer = TorchTrainer(
        _tune_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "dataset_dir": str(dataset_dir),
                           "inputs": str(inputs), "model_dir": model_dir},
        scaling_config=ray.train.ScalingConfig(
            num_workers=t.num_workers, use_gpu=t.use_gpu,
            resources_per_worker={"CPU": t.cpus_per_worker, **({"GPU": 1} if t.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_uri,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=t.max_failures),
            logging_config=ray.train.LoggingConfig(log_level=cfg.train.ray_log_level)),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise StageError("TSLRec fine-tuning produced no checkpoint", "check the worker logs above")
    with result.checkpoint.as_directory() as d:
        state = json.loads(Path(d, "state.json").read_text())
        if state.get("tuned") is None or not Path(d, "adapter").is_dir():
            raise StageError("the last TSLRec checkpoint is not the final one",
                             "rerun the same command to finish the fine-tuning")
        with atomic_dir(out / "adapter") as tmp:
            for f in Path(d, "adapter").iterdir():
                shutil.copy2(f, tmp / f.name)
    for f in (TARGETS_FILE, CATEGORIES_FILE):
        shutil.copy2(inputs / f, out / f)
    metrics = {"base": state["base"], "tuned": state["tuned"], "steps": state["step"],
               "history": state["history"], "counts": counts,
               "train_seconds": state["train_s"], "samples": state["samples"],
               "samples_per_s": state["samples"] / max(state["train_s"], 1e-9),
               "eval_seconds": state.get("eval_s"), "seconds": time.perf_counter() - t0,
               "model": cfg.tslrec.model, "model_dir": model_dir, "forward_model": str(fwd_dir),
               "config": cfg.tslrec.model_dump(mode="json")}
    write_json(out / "metrics.json", metrics)
    shutil.rmtree(inputs, ignore_errors=True)
    STAGE.seal(out, key, model=cfg.tslrec.model, model_dir=model_dir,
               model_fingerprint=model_fingerprint(model_dir), forward_model=str(fwd_dir),
               forward_run_key=fwd_manifest.get("run_key"), dataset=str(dataset_dir),
               dataset_digest=ds.manifest.get("config_digest"), counts=counts)
    return TuneResult(out, False, metrics)
