"""The ``candidates`` stage: the Collaborative Candidate Generator (CCG, METHOD 1.1).

Output: ``<workdir>/candidates/``.

The reverse-trained backbone reads each chosen user's training sequence backwards and scores
every item as "what came before the first one"; its top K (excluding what the user already has,
unless configured like the reference) are the candidates the LLM chooses from. Users stream
through a Ray Data actor pool of scorers (``scoring.TopKScorer``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmser_ray.config import Config
from llmser_ray.data.dataset import SeqDataset, load_dataset
from llmser_ray.io import read_manifest
from llmser_ray.stages.base import Stage, digest
from llmser_ray.stages.pretrain import plain_config, pretrained_dir, reverse_model

STAGE = Stage(
    name="candidates", cli="augment", output="candidates", schema_version=1, inputs=("prepare", "pretrain"),
    identity=("augment.users", "augment.user_ids", "augment.max_users", "augment.seed",
              "augment.num_candidates", "augment.exclude_history", "reverse model run key", "dataset digest"),
    schema="docs/SCHEMA.md#candidates",
    summary="the reverse model's top-K items before each chosen user's history")
SCHEMA_VERSION = STAGE.schema_version


@dataclass
class CandidatesResult:
    path: Path
    skipped: bool
    users: int
    seconds: float


def chosen_users(cfg: Config, ds: SeqDataset) -> np.ndarray:
    """User ids (1-based) that get pseudo-prior items: tail users by default, or everyone."""
    mask = ds.is_tail_user if cfg.augment.users == "tail" else np.ones(ds.num_users, dtype=bool)
    users = ds.user_ids[mask]
    if cfg.augment.user_ids is not None:
        listed = np.asarray(cfg.augment.user_ids, dtype=np.int64)
        unknown = listed[(listed < 1) | (listed > ds.num_users)]
        if len(unknown):
            from llmser_ray.errors import ConfigError

            raise ConfigError(f"augment.user_ids names {len(unknown)} user id(s) not in the dataset "
                              f"(e.g. {int(unknown[0])}; ids are 1..{ds.num_users})",
                              "list dataset user ids (sequences.parquet user_id)")
        users = users[np.isin(users, listed)]
    cap = cfg.augment.max_users
    if cap is not None and len(users) > cap:
        users = np.sort(np.random.default_rng(cfg.augment.seed).choice(users, size=cap, replace=False))
    return users


def candidates_digest(cfg: Config, ds: SeqDataset, reverse_dir: Path) -> str:
    a = cfg.augment
    payload = {"users": a.users, "max_users": a.max_users, "seed": a.seed, "k": a.num_candidates,
               "exclude": a.exclude_history,
               "model": (read_manifest(reverse_dir) or {}).get("run_key"),
               "dataset": ds.manifest.get("config_digest")}
    if a.user_ids is not None:  # only when set, so outputs written before the key existed stay current
        payload["user_ids"] = sorted(set(a.user_ids))
    return digest(payload)


def candidates_current(cfg: Config) -> bool:
    """Whether ``candidates/`` is current, without training anything to find out."""
    from llmser_ray.stages.train import finished_metrics

    reverse = pretrained_dir(cfg, reverse=True)
    if read_manifest(cfg.workdir_path / "dataset") is None:
        return False
    if finished_metrics(plain_config(cfg, reverse=True), reverse) is None:
        return False
    key = candidates_digest(cfg, load_dataset(cfg.workdir_path / "dataset"), reverse)
    return STAGE.current(STAGE.folder(cfg.workdir_path), key) is not None


def generate_candidates(cfg: Config, force: bool = False) -> CandidatesResult:
    import ray

    from llmser_ray.augment.scoring import TopKScorer
    from llmser_ray.ray_utils import from_arrow_blocks, init_ray, iter_plain_batches, quiet_ray_data

    reverse_dir = reverse_model(cfg, "candidates")
    ds = load_dataset(cfg.workdir_path / "dataset")
    out = STAGE.folder(cfg.workdir_path)
    key = candidates_digest(cfg, ds, reverse_dir)
    done = STAGE.current(out, key, force)
    if done is not None:
        return CandidatesResult(out, True, done["counts"]["users"], 0.0)

    t0 = time.perf_counter()
    users = chosen_users(cfg, ds)
    history = [ds.sequences[u - 1][:-2] for u in users]
    table = pa.table({
        "user_id": pa.array(users, pa.int64()),
        # The reverse model reads the whole training sequence newest-first; its "next" item is
        # the one before the oldest.
        "inputs": pa.array([h[::-1].tolist() for h in history], pa.list_(pa.int64())),
        "exclude": pa.array([h.tolist() if cfg.augment.exclude_history else [] for h in history],
                            pa.list_(pa.int64())),
    })
    rows: list[pa.Table] = []
    if len(users):
        init_ray(cfg.ray)
        quiet_ray_data()
        a = cfg.augment
        blocks = max(1, min(len(users) // a.scorer_batch_size + 1, 4 * a.scorer_actors))
        scored = from_arrow_blocks(table, blocks).map_batches(
            TopKScorer, fn_constructor_kwargs={"model_dir": str(reverse_dir), "k": a.num_candidates},
            compute=ray.data.ActorPoolStrategy(size=a.scorer_actors), num_cpus=a.scorer_cpus,
            num_gpus=a.scorer_gpus or None, batch_size=a.scorer_batch_size)
        rows = list(iter_plain_batches(scored.select_columns(["user_id", "topk", "topk_scores"])))
    result = pa.concat_tables(rows) if rows else pa.table(
        {"user_id": pa.array([], pa.int64()), "topk": pa.array([], pa.list_(pa.int64())),
         "topk_scores": pa.array([], pa.list_(pa.float32()))})
    result = result.sort_by("user_id")
    cands = [np.asarray(c, dtype=np.int64) for c in result.column("topk").to_pylist()]
    scores = [np.asarray(c, dtype=np.float32) for c in result.column("topk_scores").to_pylist()]
    keep = [c > 0 for c in cands]  # 0 marks "fewer eligible items than K"
    final = pa.table({
        "user_id": result.column("user_id").cast(pa.int64()),
        "history": pa.array([ds.sequences[u - 1][:-2].tolist() for u in result.column("user_id").to_pylist()],
                            pa.list_(pa.int64())),
        "candidates": pa.array([c[m].tolist() for c, m in zip(cands, keep, strict=True)],
                               pa.list_(pa.int64())),
        "scores": pa.array([s[m].tolist() for s, m in zip(scores, keep, strict=True)],
                           pa.list_(pa.float32())),
    })
    seconds = time.perf_counter() - t0
    with STAGE.publish(out, key, reverse_model=str(reverse_dir), config=cfg.augment.model_dump(mode="json"),
                       counts={"users": final.num_rows, "k": cfg.augment.num_candidates},
                       seconds=seconds) as pub:
        pq.write_table(final, pub.dir / "candidates.parquet")
    return CandidatesResult(out, False, final.num_rows, seconds)
