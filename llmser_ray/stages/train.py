"""The ``train`` stage: a backbone trained with Ray Train (DDP) on the prepared dataset.

Why this shape:
- One ``TorchTrainer`` run per model folder, named by the config digest, so rerunning the same
  command after an interruption resumes from Ray Train's latest checkpoint (Train V2 restores
  its checkpoint manager from ``storage_path``), while a changed config starts a fresh run
  instead of resuming incompatible weights.
- Workers shard users, not batches, and every rank runs the same number of steps so DDP's
  all-reduce never waits on a rank that ran out of data.
- Validation is computed on every rank's shard and gathered, so evaluation scales with the
  workers too; the test split is evaluated once on the driver with the best weights.
- Checkpoints hold safetensors weights (current and best), the optimizer state loaded with
  ``weights_only=True``, and JSON state: nothing is unpickled.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from llmser_ray.config import Config
from llmser_ray.data.dataset import SeqDataset, load_dataset
from llmser_ray.errors import ConfigError, StageError
from llmser_ray.evaluation import metrics_from_ranks, rank_targets
from llmser_ray.io import atomic_dir, read_manifest, write_json
from llmser_ray.models import build_model
from llmser_ray.models.base import SeqRecModel
from llmser_ray.models.batching import TrainBatch, by_length, training_batch
from llmser_ray.models.checkpoint import write_trained
from llmser_ray.models.losses import Distillation, Objective
from llmser_ray.models.naming import default_name, resolve_semantic, semantic_on
from llmser_ray.stages.base import Stage, digest, needs, say
from llmser_ray.stages.evaluate import evaluate_splits, split_groups
from llmser_ray.stages.prepare import need_dataset

SCHEMA_VERSION = 1
STAGE = Stage(
    name="train", output="models/<name>", schema_version=SCHEMA_VERSION,
    inputs=("prepare", "candidates", "select", "reliability", "embed", "user_neighbours"),
    identity=("model.*", "train.* except operational keys", "eval.*", "dataset digest",
              "dual.* and the augmentation's digest (dual-channel only)",
              "semantic.* and the embeddings' digest (dual-view only)",
              "distill.* and the neighbours' digest (self-distillation only)"),
    schema="docs/SCHEMA.md#models",
    summary="one backbone trained with Ray Train DDP, evaluated on the test split (metrics.json)")
TRAIN_SECTIONS = ("model", "train", "eval")
OPERATIONAL_TRAIN_KEYS = ("cpus_per_worker", "torch_threads", "ray_log_level", "max_failures",
                          "keep_checkpoints", "use_gpu")


@dataclass
class TrainResult:
    model_dir: Path
    skipped: bool
    best_epoch: int
    valid: dict[str, dict[str, float]]
    test: dict[str, dict[str, dict[str, float]]]


# ----------------------------------------------------------------------------- data plumbing


def training_sequences(ds: SeqDataset, reverse: bool) -> list[np.ndarray]:
    """Sequences the model learns from.

    Forward: the leave-one-out training part. Reverse (the candidate generator of SIA): the
    training part without its first item, reversed, so that "predict the first item from the
    rest, read backwards" stays a held-out validation task.
    """
    train = ds.train_sequences()
    if not reverse:
        return train
    return [s[1:][::-1].copy() for s in train]


def validation_split(ds: SeqDataset, reverse: bool) -> tuple[list[np.ndarray], np.ndarray]:
    if not reverse:
        return ds.split("valid")
    train = ds.train_sequences()
    return [s[1:][::-1].copy() for s in train], np.array([s[0] for s in train], dtype=np.int64)


@dataclass
class TrainingData:
    """Everything the loop iterates over, for plain or dual-channel training.

    ``aug_seqs``/``weights`` are None for plain training. Validation inputs are augmented for
    augmented users when ``dual.infer_augmented`` (the method reads the augmented sequence at
    inference); ``val_seen`` is always the real history, which is what ranking masks.
    """

    train_seqs: list[np.ndarray]
    aug_seqs: list[np.ndarray] | None
    weights: np.ndarray | None
    val_inputs: list[np.ndarray]
    val_targets: np.ndarray
    val_seen: list[np.ndarray]
    users: np.ndarray | None = None  # user id (1-based) of each training sequence

    @classmethod
    def build(cls, cfg: Config, ds: SeqDataset) -> TrainingData:
        seqs = training_sequences(ds, cfg.train.reverse)
        val_inputs, val_targets = validation_split(ds, cfg.train.reverse)
        val_seen = list(val_inputs)
        aug_seqs = weights = None
        if cfg.dual.enabled:
            if cfg.train.reverse:
                raise StageError("dual-channel training of a reverse model is not defined",
                                 "set dual.enabled=false for the reverse (candidate) model")
            from llmser_ray.augment.weights import load_augmentation

            aug = load_augmentation(cfg, ds)
            aug_seqs = aug.inputs(seqs, context_only=not cfg.dual.pseudo_targets)
            weights = aug.weight
            if cfg.dual.infer_augmented:
                val_inputs = aug.inputs(val_inputs)
        # A user trains if either channel has a target to predict.
        keep = [i for i, s in enumerate(seqs)
                if len(s) >= 2 or (weights is not None and weights[i] > 0)]
        return cls([seqs[i] for i in keep],
                   None if aug_seqs is None else [aug_seqs[i] for i in keep],
                   None if weights is None else weights[keep],
                   val_inputs, val_targets, val_seen, np.asarray(keep, dtype=np.int64) + 1)


def semantic_table(cfg: Config, ds: SeqDataset) -> torch.Tensor | None:
    """The dual view's item-text table ``[num_items + 1, dim]`` from the embed stage, checked
    against the dataset and the config (``dualview.check_text_table``); None when
    ``semantic.enabled`` is off. Read by the driver first, so a bad table fails there, in one
    line, and not inside a Ray worker."""
    if not semantic_on(cfg):
        return None
    from llmser_ray.models.dualview import check_text_table
    from llmser_ray.text.embed import load_item_vectors

    folder = semantic_folder(cfg)
    vectors = load_item_vectors(folder)
    check_text_table(vectors, ds.num_items, cfg.model.hidden, cfg.semantic, str(folder))
    return torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))


def semantic_folder(cfg: Config) -> Path:
    """The stage output ``semantic.source`` names: all three share the embeddings/ layout."""
    from llmser_ray.stages import embed, llm_embed, tslrec_embed

    stage = {"embed": embed.STAGE, "llm": llm_embed.STAGE, "tslrec": tslrec_embed.STAGE}[cfg.semantic.source]
    return stage.folder(cfg.workdir_path)


def need_semantic_table(cfg: Config) -> None:
    """Produce the dual view's text table first when its stage can (embed, llm); TSLRec's
    vectors are only read (``tslrec_vectors``)."""
    source = cfg.semantic.source
    if source == "embed":
        from llmser_ray.stages.embed import embed_current, embed_items

        needs("train", "embed", lambda: embed_current(cfg), lambda: embed_items(cfg))
    elif source == "llm":
        from llmser_ray.stages.llm_embed import llm_embed, llm_embed_current

        needs("train", "llm_embed", lambda: llm_embed_current(cfg), lambda: llm_embed(cfg))
    else:
        tslrec_vectors(cfg, "semantic.source=tslrec")


def tslrec_vectors(cfg: Config, needed_by: str) -> Path:
    """TSLRec's item vectors file, which train reads (``needed_by``: the dual view's table or the
    item-table initialisation) but, like the augmentation, never produces: they need a pretrained
    model and a fine-tuning, which must not run inside a training or a Tune trial."""
    from llmser_ray.stages.tslrec_embed import STAGE as TSLREC_EMBED
    from llmser_ray.stages.tslrec_embed import VECTORS_FILE

    path = TSLREC_EMBED.folder(cfg.workdir_path) / VECTORS_FILE
    if not path.is_file():
        raise StageError(f"{needed_by} needs the TSLRec item embeddings ({path})",
                         "run `llmser-ray tslrec-embed` with the same --workdir first")
    return path


def distillation(cfg: Config, ds: SeqDataset) -> Distillation | None:
    """LLM-ESR's self-distillation over the ``user_neighbours`` stage's output (None when off)."""
    if not cfg.distill.enabled:
        return None
    from llmser_ray.stages.user_neighbours import load_neighbours

    neighbours = load_neighbours(cfg, ds.num_users)
    applies = np.concatenate([[False], np.ones(ds.num_users, dtype=bool)
                              if cfg.distill.users == "all" else ds.is_tail_user.astype(bool)])
    return Distillation(torch.from_numpy(neighbours), torch.from_numpy(applies), cfg.distill.alpha)


class LossModule(torch.nn.Module):
    """The module DDP wraps: a backbone's per-sequence losses of one batch, in ONE ``forward``.

    Why the loss runs inside ``forward`` and not after ``model(seqs)``: a step calls the backbone
    once per length bucket, and ranks hold different buckets, so calling the DDP-wrapped
    backbone per bucket would run a different number of DDP forwards on each rank (each one may
    start collectives: buffer broadcast, the unused-parameter search of
    ``find_unused_parameters``), and DDP's contract is one forward per backward. The tied item
    table is used twice (input lookup and output scores); keeping both uses inside this
    ``forward`` makes the graph DDP sees hold every parameter, under any DDP option. (Two gloo
    ranks with a tied table used again outside ``forward``, and with several forwards per
    backward, still got the ranks' mean gradient, with ``find_unused_parameters`` on and off:
    that rests on DDP internals, not on its documented contract, so it is not relied on.)
    """

    def __init__(self, model: SeqRecModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, seqs: torch.Tensor, objective: Objective, generator: torch.Generator | None,
                with_states: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Loss sum and target count ``[B, 2]`` of each row of ``seqs`` (``Objective.per_sequence``),
        and with ``with_states`` each row's hidden state at its last position ``[B, D]`` too
        (what LLM-ESR's self-distillation pulls towards the neighbours'; no extra forward).

        Per length bucket, narrowest first: the training task (BERT4Rec draws its Cloze mask
        from ``generator`` here), the hidden states, the losses (sampled negatives are drawn
        here too). That order fixes which draw lands where, so a seed fixes the losses
        (``tests/test_training_step.py`` pins them). A model whose item table is computed
        (``table_once``: the dual view's adapter) computes it once for all buckets.
        """
        model = self.model
        table = model.item_embeddings() if model.table_once else None

        def per_sequence(sub: torch.Tensor) -> torch.Tensor:
            context = sub < 0  # pseudo items that are context only (dual.pseudo_targets=false)
            inputs, targets, valid = model.training_task(sub.abs(), generator)
            valid = valid & ~model.target_flags(context)
            h = model(inputs)
            items = table if table is not None else model.item_embeddings()
            stats = objective.per_sequence(h, items, targets, valid, generator)
            return torch.cat([stats, h[:, -1]], dim=1) if with_states else stats

        out = by_length(per_sequence, seqs, 2) if model.bucket_by_length else per_sequence(seqs)
        return (out[:, :2], out[:, 2:]) if with_states else out


def _shard(n: int, rank: int, world: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of the users, cut into equal shards (the tail wraps around)."""
    perm = rng.permutation(n)
    per = math.ceil(n / world)
    padded = np.concatenate([perm, perm[: per * world - n]]) if per * world > n else perm
    return padded[rank * per:(rank + 1) * per]


def _gather_ranks(local: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """Collect per-rank ranks into one array ordered like the validation users."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        out = np.empty(n, dtype=np.int64)
        out[index] = local
        return out
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (index, local))
    out = np.empty(n, dtype=np.int64)
    for idx, r in parts:
        out[idx] = r
    return out


def step_loss(wrapped: torch.nn.Module, batch: TrainBatch, objective: Objective,
              gen: torch.Generator | None, distill: Distillation | None = None) -> torch.Tensor:
    """The loss a step backpropagates: ``Objective.batch_loss`` of the rows' losses, plus
    LLM-ESR's self-distillation term on the original rows' last states when ``distill`` is given
    (and nonzero: alpha 0 adds nothing, so the loss is exactly the plain one)."""
    if distill is None:
        stats = wrapped(batch.seqs, objective, gen)  # [rows, 2]: hidden states -> per-sequence losses
        return objective.batch_loss(stats, batch.aug_users, batch.aug_weights)
    stats, states = wrapped(batch.seqs, objective, gen, True)
    loss = objective.batch_loss(stats, batch.aug_users, batch.aug_weights)
    term = distill.loss(states[:len(batch.users)], batch.users)
    return loss if term is None else loss + term


def train_step(wrapped: torch.nn.Module, opt: torch.optim.Optimizer, batch: TrainBatch,
               objective: Objective, gen: torch.Generator | None,
               distill: Distillation | None = None) -> float:
    """One optimizer step on ``batch``; returns its loss.

    ``wrapped`` is ``LossModule(model)``, possibly inside DDP: its forward gives each row's loss
    sum and target count, ``Objective.batch_loss`` reduces them (and weighs the dual channels)
    into the loss, whose backward DDP all-reduces before the step (``step_loss``).
    """
    loss = step_loss(wrapped, batch, objective, gen, distill)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


def batch_loss(wrapped: torch.nn.Module, idx: np.ndarray, train_seqs: list[np.ndarray], cfg: Config,
               device: torch.device | str, gen: torch.Generator | None,
               aug_seqs: list[np.ndarray] | None = None,
               weights: np.ndarray | None = None) -> torch.Tensor:
    """The loss ``train_step`` would backpropagate for users ``idx``, both channels weighted
    ``1 - w_u`` and ``w_u`` (for tests and benchmarks that inspect it without a step)."""
    objective = Objective.from_config(cfg.train)
    batch = training_batch(idx, train_seqs, cfg.model.max_len, aug_seqs, weights).to(device)
    return objective.batch_loss(wrapped(batch.seqs, objective, gen), batch.aug_users,
                                batch.aug_weights)


def train_epoch(wrapped: torch.nn.Module, opt: torch.optim.Optimizer, train_seqs: list[np.ndarray],
                order: np.ndarray, cfg: Config, device: torch.device | str,
                gen: torch.Generator | None, aug_seqs: list[np.ndarray] | None = None,
                weights: np.ndarray | None = None, users: np.ndarray | None = None,
                distill: Distillation | None = None) -> float:
    """One pass over ``order``, ``train.batch_size`` users a step; shared by the Ray worker loop
    and the plain-PyTorch benchmarks. Returns the mean step loss.

    With ``aug_seqs`` and ``weights`` (indexed like ``train_seqs``) it is a dual-channel epoch;
    with ``distill`` and ``users`` (the sequences' user ids) it adds LLM-ESR's self-distillation.
    """
    objective = Objective.from_config(cfg.train)
    wrapped.train()
    losses = []
    for start in range(0, len(order), cfg.train.batch_size):
        idx = order[start:start + cfg.train.batch_size]
        batch = training_batch(idx, train_seqs, cfg.model.max_len, aug_seqs, weights,
                               users).to(device)
        losses.append(train_step(wrapped, opt, batch, objective, gen, distill))
    return sum(losses) / max(len(losses), 1)


# ----------------------------------------------------------------------------- the worker loop


def quiet_ray_train(level: str) -> None:
    """Drop Ray Train's per-report INFO lines at their source (its level filter is bypassed by
    propagation to Ray's console handler in 2.60), so the epoch lines stay readable."""
    import logging

    try:  # a private module whose logger is named by its file path
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(getattr(logging, level))


def log_line(text: str) -> None:
    """One progress line on the worker's stdout (Ray forwards it to the driver). Not ``print``:
    Ray Train patches ``print`` into its logger, which then shows every line twice."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _train_loop(loop_cfg: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    cfg = Config.model_validate(loop_cfg["config"])
    quiet_ray_train(cfg.train.ray_log_level)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    threads = cfg.train.torch_threads or max(1, int(cfg.train.cpus_per_worker))
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.train.seed)

    ds = load_dataset(loop_cfg["dataset_dir"])
    data = TrainingData.build(cfg, ds)
    train_seqs, aug_seqs, weights = data.train_seqs, data.aug_seqs, data.weights
    val_inputs, val_targets, val_seen = data.val_inputs, data.val_targets, data.val_seen
    groups = split_groups(ds, val_targets)

    model = build_model(cfg.model, ds.num_items, cfg.semantic, semantic_table(cfg, ds))
    distill = distillation(cfg, ds)
    if loop_cfg.get("item_vectors"):  # tslrec.init_backbone (a resumed run loads its own weights below)
        from safetensors.numpy import load_file as load_numpy

        from llmser_ray.models.item_init import init_item_table

        init_item_table(model, load_numpy(loop_cfg["item_vectors"])["vectors"])
    wrapped = ray.train.torch.prepare_model(LossModule(model))
    device = ray.train.torch.get_device()
    opt = torch.optim.Adam(model.parameters(), lr=cfg.train.lr,
                           weight_decay=cfg.train.weight_decay)

    state = {"epoch": 0, "best_metric": -1.0, "best_epoch": -1, "bad_epochs": 0, "history": []}
    best_weights: dict[str, torch.Tensor] | None = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            model.load_state_dict(load_file(os.path.join(d, "model.safetensors")))
            opt.load_state_dict(torch.load(os.path.join(d, "optimizer.pt"), weights_only=True))
            best_weights = load_file(os.path.join(d, "best.safetensors"))
            state = json.loads(Path(d, "state.json").read_text())
        if rank == 0:
            log_line(f"[train] resumed after epoch {state['epoch']} "
                     f"(best {cfg.eval.metric}={state['best_metric']:.4f} at {state['best_epoch']})")

    gen = torch.Generator().manual_seed(cfg.train.seed * 1000 + rank)
    metric = cfg.eval.metric
    for epoch in range(state["epoch"] + 1, cfg.train.epochs + 1):
        if state["bad_epochs"] >= cfg.train.patience:
            break
        t0 = time.perf_counter()
        gen.manual_seed(cfg.train.seed * 100_003 + epoch * 101 + rank)
        order = _shard(len(train_seqs), rank, world, np.random.default_rng(cfg.train.seed + epoch))
        mean_loss = train_epoch(wrapped, opt, train_seqs, order, cfg, device, gen, aug_seqs, weights,
                                data.users, distill)
        train_s = time.perf_counter() - t0

        # Validation on this rank's slice of the users, gathered to every rank.
        val_idx = np.arange(rank, len(val_targets), world)
        local = rank_targets(model, [val_inputs[i] for i in val_idx], val_targets[val_idx],
                             cfg.eval, ds.num_items, device=str(device),
                             seen=[val_seen[i] for i in val_idx])
        ranks = _gather_ranks(local, val_idx, len(val_targets))
        val = metrics_from_ranks(ranks, cfg.eval.ks, groups)
        score = float(val["overall"][metric])
        improved = score > state["best_metric"]
        if improved:
            state.update(best_metric=score, best_epoch=epoch, bad_epochs=0)
            best_weights = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        state["epoch"] = epoch
        record = {"epoch": epoch, "train_loss": mean_loss, "train_s": train_s,
                  "epoch_s": time.perf_counter() - t0, "wall_time": time.time(),
                  **{f"valid_{k}": v for k, v in val["overall"].items() if k != "n"},
                  **{f"valid_{g}_{metric}": val[g][metric]
                     for g in ("tail_user", "head_user", "tail_item", "head_item")}}
        state["history"].append(record)

        with tempfile.TemporaryDirectory() as d:
            checkpoint = None
            if rank == 0:
                cpu_state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
                save_file(cpu_state, os.path.join(d, "model.safetensors"))
                save_file(best_weights or cpu_state, os.path.join(d, "best.safetensors"))
                torch.save(opt.state_dict(), os.path.join(d, "optimizer.pt"))
                Path(d, "state.json").write_text(json.dumps(state))
                checkpoint = ray.train.Checkpoint.from_directory(d)
                flag = "*" if improved else " "
                log_line(f"[train] epoch {epoch:4d} loss {record['train_loss']:.4f} "
                         f"valid {metric} {score:.4f}{flag} tail {val['tail_user'][metric]:.4f} "
                         f"({record['epoch_s']:.1f}s)")
            ray.train.report({**record, "best_metric": state["best_metric"],
                              "best_epoch": state["best_epoch"]}, checkpoint=checkpoint)


# ----------------------------------------------------------------------------- driver side


def ray_storage(cfg: Config, sub: str) -> str:
    """Where Ray Train/Tune persist checkpoints: ``<workdir>/<sub>/ray`` or, on a cluster,
    ``ray.storage_path/<sub>`` (an NFS path or an s3:// / gs:// URI every node can reach)."""
    if cfg.ray.storage_path:
        return f"{cfg.ray.storage_path.rstrip('/')}/{cfg.workdir_path.name}/{sub}"
    local = cfg.workdir_path / sub / "ray"
    local.mkdir(parents=True, exist_ok=True)
    return str(local)


def clear_run(storage_uri: str, run_name: str) -> None:
    import pyarrow.fs as pafs

    fs, path = pafs.FileSystem.from_uri(storage_uri) if "://" in storage_uri else \
        (pafs.LocalFileSystem(), storage_uri)
    with contextlib.suppress(FileNotFoundError, OSError):
        fs.delete_dir(f"{path}/{run_name}")


def model_dir(cfg: Config, name: str) -> Path:
    return cfg.workdir_path / "models" / name


# Keys added after models had been trained, with the value those models had in effect: at that
# value a key stays out of the run key, so the older models keep their keys (and stay resumable).
# tie_output: every model before it was tied; pseudo_targets: every dual-channel model before it
# predicted its pseudo items (the default is now false, so theirs is the explicit true).
LATER_KEYS = {"model": {"tie_output": True}, "dual": {"pseudo_targets": True}}


def key_section(cfg: Config, section: str) -> dict[str, Any]:
    """``cfg.<section>`` as it enters a run key (``LATER_KEYS`` at their old value left out)."""
    payload = getattr(cfg, section).model_dump(mode="json")
    for key, old in LATER_KEYS.get(section, {}).items():
        if payload.get(key) == old:
            del payload[key]
    return payload


def dual_key(cfg: Config) -> str:
    """The ``dual`` section's part of a dual-channel run's key."""
    return digest({"dual": key_section(cfg, "dual")})[:8]


def _run_key(cfg: Config, dataset_manifest: dict[str, Any]) -> str:
    """Identity of a training run: its config, its dataset and, for dual-channel runs, the
    augmentation it read (so new LLM output retrains instead of reusing a stale model)."""
    payload = {s: key_section(cfg, s) for s in TRAIN_SECTIONS}
    for op in OPERATIONAL_TRAIN_KEYS:  # how it runs, not what it learns: changing them resumes
        payload["train"].pop(op, None)
    # LLM-ESR's sections enter the identity only when on, so existing models keep their keys.
    on = {"semantic": semantic_on(cfg), "distill": cfg.distill.enabled}
    for section in ("semantic", "distill"):
        if on[section]:
            payload[section] = getattr(cfg, section).model_dump(mode="json")
    key = f"{digest(payload)}-{dataset_manifest.get('config_digest', 'na')[:8]}"
    upstreams = (("semantic", semantic_folder(cfg)), ("distill", cfg.workdir_path / "user_neighbours"))
    for section, folder in upstreams:
        if on[section]:  # new vectors or neighbours retrain
            upstream = read_manifest(folder) or {}
            key += f"-{str(upstream.get('config_digest', 'na'))[:8]}"
    if cfg.dual.enabled:
        from llmser_ray.augment.weights import augmentation_dir

        aug = read_manifest(augmentation_dir(cfg)) or {}
        key += f"-{dual_key(cfg)}-{str(aug.get('config_digest', 'na'))[:8]}"
    if cfg.tslrec.init_backbone:  # only then: every other run key stays what it was
        from llmser_ray.stages.tslrec_embed import STAGE as TSLREC_EMBED

        emb = read_manifest(TSLREC_EMBED.folder(cfg.workdir_path)) or {}
        key += f"-tslrec-{str(emb.get('config_digest', 'na'))[:8]}"
    return key


def _finished(folder: Path, key: str) -> dict[str, Any] | None:
    done = read_manifest(folder)
    metrics = folder / "metrics.json"
    if not done or done.get("run_key") != key or not metrics.is_file():
        return None
    return json.loads(metrics.read_text())


def finished_metrics(cfg: Config, folder: str | Path) -> dict[str, Any] | None:
    """``metrics.json`` of a complete model in ``folder`` trained with exactly ``cfg`` (same run
    key: config, dataset and augmentation), else None. A model left by another config is stale:
    reporting it as this config's result would mislabel a table."""
    dataset = read_manifest(cfg.workdir_path / "dataset")
    if dataset is None:
        return None
    return _finished(Path(folder), _run_key(resolve_semantic(cfg, dataset)[0], dataset))


def train(cfg: Config, name: str | None = None, force: bool = False,
          out_dir: Path | None = None, callbacks: list[Any] | None = None,
          storage_uri: str | None = None) -> TrainResult:
    """Train one backbone on ``<workdir>/dataset`` into ``<workdir>/models/<name>``.

    Plain training by default; dual-channel (METHOD stage 3) with ``dual.enabled``. Skips when a
    complete model with the same run key exists (unless ``force``); resumes from the latest Ray
    Train checkpoint when a previous run was interrupted. Tune passes ``out_dir`` (the trial's
    folder), ``callbacks`` (its report callback) and ``storage_uri`` (where the trial's Train
    checkpoints live).
    """
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from llmser_ray.ray_utils import init_ray

    dataset_dir = cfg.workdir_path / "dataset"
    need_dataset(cfg, "train")
    ds = load_dataset(dataset_dir)
    cfg, why = resolve_semantic(cfg, ds.manifest)
    if why and out_dir is None:  # Tune's trials would repeat it once per trial
        say("train", why)
    name = name or default_name(cfg)
    if cfg.dual.enabled:  # fail here, with the fix, rather than inside a Ray worker
        from llmser_ray.augment.weights import load_augmentation

        load_augmentation(cfg, ds)
    if semantic_on(cfg):  # LLM-ESR's dual view reads an item-text table (semantic.source)
        need_semantic_table(cfg)
        semantic_table(cfg, ds)
    if cfg.distill.enabled:  # and its self-distillation the users' neighbours
        from llmser_ray.stages.user_neighbours import neighbours_current, user_neighbours

        needs("train", "user_neighbours", lambda: neighbours_current(cfg),
              lambda: user_neighbours(cfg))
        distillation(cfg, ds)
    item_vectors = None
    if cfg.tslrec.init_backbone and semantic_on(cfg):
        raise ConfigError("tslrec.init_backbone and semantic.enabled both set the item table",
                          "use one: the dual view's collaborative table is initialised from its own PCA")
    if cfg.tslrec.init_backbone:
        item_vectors = tslrec_vectors(cfg, "tslrec.init_backbone")
    out = out_dir or model_dir(cfg, name)
    key = _run_key(cfg, ds.manifest)
    metrics = None if force else _finished(out, key)
    if metrics is not None:
        return TrainResult(out, True, metrics["best_epoch"], metrics["valid"], metrics["test"])

    init_ray(cfg.ray)
    run_name = f"run-{key}"
    storage_uri = storage_uri or ray_storage(cfg, f"models/{name}")
    if force:
        clear_run(storage_uri, run_name)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"config": cfg.model_dump(mode="json"), "dataset_dir": str(dataset_dir),
                           "item_vectors": str(item_vectors) if item_vectors else None},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker,
                                  **({"GPU": 1} if cfg.train.use_gpu else {})}),
        run_config=ray.train.RunConfig(
            name=run_name, storage_path=storage_uri,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            # A dead worker or node restarts the worker group from the latest checkpoint.
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            # Our per-epoch line is the progress display; Ray Train's per-report INFO lines drown it.
            logging_config=ray.train.LoggingConfig(log_level=cfg.train.ray_log_level),
            callbacks=callbacks or None),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise StageError(f"training of {name} produced no checkpoint", "check the worker logs above")

    with result.checkpoint.as_directory() as d:
        state = json.loads(Path(d, "state.json").read_text())
        best_state = load_file(os.path.join(d, "best.safetensors"))
    model = build_model(cfg.model, ds.num_items, cfg.semantic, semantic_table(cfg, ds), init=False)
    model.load_state_dict(best_state)
    model.eval()
    best_epoch = int(state["best_epoch"])
    best_record = next(h for h in state["history"] if h["epoch"] == best_epoch)
    group_keys = {f"valid_{g}_{cfg.eval.metric}": g
                  for g in ("tail_user", "head_user", "tail_item", "head_item")}
    valid = {"overall": {k.removeprefix("valid_"): v for k, v in best_record.items()
                         if k.startswith("valid_") and k not in group_keys}}
    valid.update({g: {cfg.eval.metric: best_record[k]} for k, g in group_keys.items() if k in best_record})
    test = evaluate_splits(model, ds, cfg) if not cfg.train.reverse else {}

    metrics = {"name": name, "best_epoch": best_epoch, "epochs_run": state["epoch"],
               "history": state["history"], "valid": valid, "test": test,
               "config": cfg.model_dump(mode="json")}
    # Publish best/, metrics.json and the manifest together: the manifest marks completeness, so
    # the old one goes first and a kill in between leaves a folder read as unfinished.
    (out / "manifest.json").unlink(missing_ok=True)
    with atomic_dir(out / "best") as tmp:
        write_trained(tmp, best_state, {"model": cfg.model.model_dump(mode="json"),
                                        "num_items": ds.num_items, "epoch": best_epoch,
                                        "reverse": cfg.train.reverse,
                                        "dual": (cfg.dual.model_dump(mode="json")
                                                 if cfg.dual.enabled else None),
                                        "semantic": (cfg.semantic.model_dump(mode="json")
                                                     if semantic_on(cfg) else None)})
    write_json(out / "metrics.json", metrics)
    STAGE.seal(out, key, key_field="run_key", status="complete", dataset=str(dataset_dir),
               dataset_digest=ds.manifest.get("config_digest"))
    return TrainResult(out, False, best_epoch, valid, test)
