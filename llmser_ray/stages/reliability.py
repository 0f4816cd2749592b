"""The ``reliability`` stage: Adaptive Reliability Validation (ARV, METHOD 2) -> ``<workdir>/reliability/``.

For each augmented user: hide one known item, let the FORWARD backbone propose its top
``augment.arv_candidates`` from the augmented prefix (pseudo items + the rest of the history),
let the LLM pick one (decoding constrained to a candidate number), and take
``r_u = cosine(text(picked), text(hidden))`` from the FAISS actors. ``w_u`` applies the length
decay; training recomputes it with its own settings (augment/weights.py).

With ``augment.arv_judge=score`` the LLM does not name a number: each candidate's title is
scored as the next item by PMI (as ``augment.selector=score`` does), so the candidate order
cannot decide the pick. With ``augment.arv_reliability=skill`` ``r_u`` is the judge's
skill over a random pick of the same list (``augment.selection.judge_skill``), so a judge no
better than chance gives weights near 0; ``r_cosine``, ``r_random`` and ``r_best`` are kept.

The hidden item is the LAST TRAINING item by default. The reference hides the validation item,
which puts the validation label into the training weights; that variant exists only as
``augment.hide=validation_LEAKS_LABEL``, named so that nobody picks it by accident.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from llmser_ray.augment.prompts import (
    request_row,
    scoring_messages,
    scoring_title,
    validation_choices,
    validation_messages,
)
from llmser_ray.augment.selection import judge_skill, mean_logprob, pmi, top_n
from llmser_ray.augment.shards import ShardWriter
from llmser_ray.augment.weights import decay_weights
from llmser_ray.config import Config
from llmser_ray.data.dataset import load_dataset, split_list_column
from llmser_ray.errors import StageError
from llmser_ray.io import read_manifest, write_json
from llmser_ray.stages.base import Stage, digest, needs
from llmser_ray.stages.pretrain import forward_model
from llmser_ray.stages.select import llm_identity, select_current, select_items

STAGE = Stage(
    name="reliability", output="reliability", schema_version=1, inputs=("select", "pretrain", "embed"),
    identity=("augmented digest", "augment.hide", "augment.arv_candidates", "augment.prompt_history",
              "augment.arv_judge", "augment.arv_reliability", "augment.pmi_alpha (score judge)",
              "llm identity", "forward model run key", "embeddings digest"),
    schema="docs/SCHEMA.md#reliability", summary="each augmented user's reliability r_u and weight w_u")
SCHEMA_VERSION = STAGE.schema_version
STREAM_COLUMNS = ["user_id", "hidden_item", "arv_candidates", "picked_item", "raw_reply", "status",
                  "error", "r_u", "r_random", "r_best"]


@dataclass
class ReliabilityResult:
    path: Path
    skipped: bool
    summary: dict[str, Any]


def hidden_and_prefix(original: np.ndarray, pseudo: np.ndarray, validation_item: int,
                      hide: str) -> tuple[int, np.ndarray]:
    """The item to hide and the augmented prefix the forward model reads."""
    if hide == "validation_LEAKS_LABEL":
        return int(validation_item), np.concatenate([pseudo, original])
    return int(original[-1]), np.concatenate([pseudo, original[:-1]])


class ARVPrompter:
    def __init__(self, texts: Any, prompt_history: int) -> None:
        import ray

        self.texts = ray.get(texts) if isinstance(texts, ray.ObjectRef) else texts
        self.prompt_history = prompt_history

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        reqs = []
        for user, prefix, cands in zip(batch["user_id"], batch["inputs"], batch["topk"], strict=True):
            cands = [int(c) for c in cands if c > 0]
            titles = [self.texts[i] for i in np.asarray(prefix)[-self.prompt_history:]]
            msgs = validation_messages(titles, [self.texts[c] for c in cands])
            reqs.append(request_row(f"arv-{int(user)}", msgs, choices=validation_choices(len(cands))))
        out = dict(batch)
        out["arv_candidates"] = [np.asarray([c for c in t if c > 0], dtype=np.int64) for t in batch["topk"]]
        for key in ("request_id", "messages", "guided_json", "guided_choice"):
            out[key] = [r[key] for r in reqs]
        return out


def parse_choice(reply: str, candidates: np.ndarray) -> tuple[int, str, str]:
    """(picked item or 0, status, error) from a one-number answer."""
    text = reply.strip().strip(".").strip()
    if not text:
        return 0, "empty", "empty reply"
    if not text.isdigit():
        return 0, "malformed", f"expected a candidate number, got {text[:40]!r}"
    num = int(text)
    if not 1 <= num <= len(candidates):
        return 0, "malformed", f"candidate {num} does not exist (1..{len(candidates)})"
    return int(candidates[num - 1]), "ok", ""


class ReliabilityScorer:
    """Parse the pick and score it against the hidden item with the FAISS actors."""

    def __init__(self, faiss_handles: list[Any]) -> None:
        self.faiss = faiss_handles

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import ray

        n = len(batch["user_id"])
        picked = np.zeros(n, dtype=np.int64)
        status, errors = [], []
        for i in range(n):
            if str(batch["status"][i]) == "error":
                status.append("error")
                errors.append(str(batch["error"][i]))
                continue
            item, st, err = parse_choice(str(batch["reply"][i]), np.asarray(batch["arv_candidates"][i]))
            if str(batch["status"][i]) == "truncated" and st != "ok":
                st = "truncated"
            picked[i] = item
            status.append(st)
            errors.append(err)
        hidden = np.asarray(batch["hidden_item"], dtype=np.int64)
        # One FAISS call for every (candidate, hidden) pair of the batch: the picked item's
        # similarity, and what a random pick (the mean) or the best pick of the list would get.
        lists = [np.asarray(c, dtype=np.int64) for c in batch["arv_candidates"]]
        flat = np.concatenate(lists) if lists else np.zeros(0, np.int64)
        hid = np.repeat(hidden, [len(c) for c in lists]) if lists else np.zeros(0, np.int64)
        sims = (np.clip(np.asarray(ray.get(random.choice(self.faiss).cosine.remote(flat, hid)),
                                   dtype=np.float64), 0.0, 1.0) if len(flat) else np.zeros(0))
        r, r_random, r_best = np.zeros(n), np.zeros(n), np.zeros(n)
        start = 0
        for i, c in enumerate(lists):
            part = sims[start:start + len(c)]
            start += len(c)
            if len(part):
                r_random[i], r_best[i] = part.mean(), part.max()
            if picked[i] > 0:
                r[i] = part[np.flatnonzero(c == picked[i])[0]]
        return {"user_id": batch["user_id"], "hidden_item": hidden,
                "arv_candidates": batch["arv_candidates"], "picked_item": picked,
                "raw_reply": batch["reply"], "status": status, "error": errors, "r_u": r,
                "r_random": r_random, "r_best": r_best}


class ARVScorePrompter:
    """ARV's scoring judge: each user's candidates -> one scoring request per candidate (its title
    as the next item after the augmented history) and its history-free baseline."""

    def __init__(self, texts: Any, prompt_history: int) -> None:
        import ray

        self.texts = ray.get(texts) if isinstance(texts, ray.ObjectRef) else texts
        self.prompt_history = prompt_history

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        base = scoring_messages([], next_item=True)
        cols = ("user_id", "hidden_item", "arv_candidates", "position", "kind", "request_id", "messages",
                "guided_json", "guided_choice", "continuation")
        out: dict[str, list[Any]] = {k: [] for k in cols}
        for user, hidden, prefix, topk in zip(batch["user_id"], batch["hidden_item"], batch["inputs"],
                                              batch["topk"], strict=True):
            cands = np.asarray([c for c in topk if c > 0], dtype=np.int64)
            msgs = scoring_messages([self.texts[i] for i in np.asarray(prefix)[-self.prompt_history:]],
                                    next_item=True)
            for pos, c in enumerate(cands):
                for kind, m in (("cond", msgs), ("base", base)):
                    row = request_row(f"arvs-{int(user)}-{pos}-{kind}", m,
                                      continuation=scoring_title(self.texts[c]))
                    for k, v in (("user_id", int(user)), ("hidden_item", int(hidden)),
                                 ("arv_candidates", cands), ("position", pos), ("kind", kind)):
                        out[k].append(v)
                    for k in ("request_id", "messages", "guided_json", "guided_choice", "continuation"):
                        out[k].append(row[k])
        return out


def _score_judge(cfg: Config, scored: Any, texts: Any, pool: Any, writer: ShardWriter) -> set[int]:
    """Stream the scoring requests, regroup them per user in the driver, pick by PMI (ties: the
    forward model's rank, then the item id), then score the picks like the generating judge."""
    import json

    import ray

    from llmser_ray.llm import generate
    from llmser_ray.ray_utils import iter_plain_batches

    a = cfg.augment
    requests = scored.map_batches(
        ARVScorePrompter, fn_constructor_kwargs={"texts": texts, "prompt_history": a.prompt_history},
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.1, batch_size=8)
    replies = generate(requests, cfg.llm, cache_dir=cfg.workdir_path / "llm_cache")
    judge = ReliabilityScorer(pool.handles)
    got: dict[int, dict[str, Any]] = {}
    arrived: set[int] = set()
    cols = ["user_id", "hidden_item", "arv_candidates", "position", "kind", "reply", "status", "error"]
    for batch in iter_plain_batches(replies.select_columns(cols)):
        done = []
        for row in batch.to_pylist():
            u = int(row["user_id"])
            cands = np.asarray(row["arv_candidates"], dtype=np.int64)
            g = got.setdefault(u, {"cands": cands, "hidden": int(row["hidden_item"]),
                                   "cond": np.full(len(cands), np.nan), "base": np.full(len(cands), np.nan),
                                   "n": 0, "errors": []})
            if row["status"] != "ok":
                g["errors"].append(row["error"] or row["status"])
            lp = mean_logprob(row["reply"]) if row["status"] == "ok" else np.nan
            g[row["kind"]][int(row["position"])] = lp
            g["n"] += 1
            if g["n"] == 2 * len(cands):
                done.append(u)
        if not done:
            continue
        rows: dict[str, list[Any]] = {k: [] for k in ("user_id", "hidden_item", "arv_candidates", "reply",
                                                       "status", "error")}
        raw = []
        for u in done:
            g = got.pop(u)
            sc = pmi(g["cond"], g["base"], a.pmi_alpha)
            rank = -np.arange(len(g["cands"]), dtype=np.float64)  # the forward model's order breaks ties
            pick = top_n(g["cands"], sc, 1, tiebreak=rank)
            ok = not g["errors"] and len(pick)
            num = int(np.flatnonzero(g["cands"] == pick[0])[0]) + 1 if ok else 0
            for k, v in (("user_id", u), ("hidden_item", g["hidden"]), ("arv_candidates", g["cands"]),
                         ("reply", str(num) if ok else ""), ("status", "ok" if ok else "error"),
                         ("error", "" if ok else f"scoring failed: {(g['errors'] or ['no pick'])[0]}")):
                rows[k].append(v)
            raw.append(json.dumps({"pick": num, "scores": [round(float(x), 6) if np.isfinite(x) else None
                                                             for x in sc]}))
        judged = judge(rows)
        judged["raw_reply"] = raw
        writer.add(pa.table({c: _plain(judged[c]) for c in STREAM_COLUMNS}))
        arrived.update(done)
    return arrived


def _plain(values: Any) -> Any:
    if isinstance(values, np.ndarray):
        return values
    return [np.asarray(v, dtype=np.int64) if isinstance(v, np.ndarray) else v for v in values]


def _skipped_rows(rows: pa.Table) -> pa.Table:
    n = rows.num_rows
    return pa.table({
        "user_id": rows.column("user_id"), "hidden_item": rows.column("hidden_item"),
        "arv_candidates": pa.array([[]] * n, pa.list_(pa.int64())),
        "picked_item": pa.array([0] * n, pa.int64()), "raw_reply": pa.array([""] * n, pa.string()),
        "status": pa.array(["empty"] * n, pa.string()),
        "error": pa.array(["no candidates to choose from"] * n, pa.string()),
        "r_u": pa.array([0.0] * n, pa.float64()), "r_random": pa.array([0.0] * n, pa.float64()),
        "r_best": pa.array([0.0] * n, pa.float64()),
    })


def score_reliability(cfg: Config, force: bool = False) -> ReliabilityResult:
    """ARV over ``augmented/`` (produced first, with its upstream, when missing or stale)."""
    import ray

    from llmser_ray.augment.scoring import TopKScorer
    from llmser_ray.llm import generate
    from llmser_ray.ray_utils import from_arrow_blocks, init_ray, iter_plain_batches, quiet_ray_data
    from llmser_ray.stages.embed import embed_current, embed_items
    from llmser_ray.text.embed import load_item_vectors
    from llmser_ray.text.faiss_index import FaissPool

    aug = needs("reliability", "select", lambda: select_current(cfg), lambda: select_items(cfg))
    aug_dir = aug.path
    aug_manifest = read_manifest(aug_dir) or {}
    forward = forward_model(cfg, "reliability")
    emb = needs("reliability", "embed", lambda: embed_current(cfg), lambda: embed_items(cfg))
    ds = load_dataset(cfg.workdir_path / "dataset")
    a = cfg.augment
    # The reference ARV (generate + cosine) hashes what it hashed before these keys existed, so
    # existing reliability/ outputs stay current; any other judge or r_u is its own identity.
    keys = ["hide", "arv_candidates", "prompt_history"]
    if a.arv_judge != "generate":
        keys.append("arv_judge")
    if a.arv_reliability != "cosine":
        keys.append("arv_reliability")
    if a.arv_judge == "score":
        keys.append("pmi_alpha")
    arv_cfg = {k: getattr(a, k) for k in keys}
    key = digest({"augmented": aug_manifest.get("config_digest"), "arv": arv_cfg,
                  "llm": llm_identity(cfg), "forward": (read_manifest(forward) or {}).get("run_key"),
                  "embeddings": (read_manifest(emb.path) or {}).get("config_digest"),
                  "v": SCHEMA_VERSION})
    out = STAGE.folder(cfg.workdir_path)
    if STAGE.current(out, key, force) is not None:
        import json

        return ReliabilityResult(out, True, json.loads((out / "summary.json").read_text()))

    t0 = time.perf_counter()
    aug_table = pq.read_table(aug_dir / "augmented.parquet")
    users = aug_table.column("user_id").to_numpy()
    pseudo = [np.asarray(p, dtype=np.int64) for p in split_list_column(aug_table.column("pseudo_items"))]
    original = [ds.sequences[u - 1][:-2] for u in users]
    todo = np.array([len(p) > 0 for p in pseudo])
    hidden, prefixes = [], []
    for u, o, p in zip(users, original, pseudo, strict=True):
        h, pre = hidden_and_prefix(o, p, ds.sequences[u - 1][-2], a.hide)
        hidden.append(h)
        prefixes.append(pre)
    rows = pa.table({
        "user_id": pa.array(users[todo], pa.int64()),
        "hidden_item": pa.array(np.asarray(hidden, dtype=np.int64)[todo], pa.int64()),
        "inputs": pa.array([prefixes[i].tolist() for i in np.flatnonzero(todo)], pa.list_(pa.int64())),
        "exclude": pa.array([prefixes[i].tolist() for i in np.flatnonzero(todo)], pa.list_(pa.int64())),
    })
    writer = ShardWriter(cfg.workdir_path / ".partial" / f"validate-{key}",
                         rows.column("user_id").to_numpy(), a.shard_size)
    pending = rows.filter(pa.array(writer.pending_mask()))
    if pending.num_rows:
        init_ray(cfg.ray)
        quiet_ray_data()
        texts = ray.put(ds.item_text)
        pool = FaissPool(load_item_vectors(emb.path), cfg.faiss)
        blocks = max(1, min(pending.num_rows // max(cfg.llm.batch_size, 1) + 1, 64))
        scored = from_arrow_blocks(pending, blocks).map_batches(
            TopKScorer, fn_constructor_kwargs={"model_dir": str(forward), "k": a.arv_candidates},
            compute=ray.data.ActorPoolStrategy(size=a.scorer_actors), num_cpus=a.scorer_cpus,
            num_gpus=a.scorer_gpus or None, batch_size=a.scorer_batch_size)
        # A prefix with no eligible candidate (tiny catalogues) is answered without the LLM.
        scored = scored.filter(lambda row: bool((np.asarray(row["topk"]) > 0).any()))
        arrived: set[int] = set()
        if a.arv_judge == "score":
            arrived = _score_judge(cfg, scored, texts, pool, writer)
        else:
            requests = scored.map_batches(
                ARVPrompter, fn_constructor_kwargs={"texts": texts, "prompt_history": a.prompt_history},
                compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.1, batch_size=256)
            replies = generate(requests, cfg.llm, cache_dir=cfg.workdir_path / "llm_cache")
            judged = replies.map_batches(
                ReliabilityScorer, fn_constructor_kwargs={"faiss_handles": pool.handles},
                compute=ray.data.ActorPoolStrategy(size=1), num_cpus=0.1, batch_size=a.scorer_batch_size)
            for batch in iter_plain_batches(judged.select_columns(STREAM_COLUMNS)):
                arrived.update(batch.column("user_id").to_pylist())
                writer.add(batch)
        pool.shutdown()
        # Users filtered out for lack of candidates never arrive: close their shards as "empty".
        ids = pending.column("user_id").to_numpy()
        missing = ~np.isin(ids, np.fromiter(arrived, dtype=np.int64, count=len(arrived)))
        writer.add(_skipped_rows(pending.filter(pa.array(missing))))
    streamed = writer.assemble()
    if not writer.complete or (streamed is not None and streamed.num_rows != rows.num_rows):
        raise StageError(f"validation finished {len(writer.done)}/{writer.n_shards} shards",
                         "rerun the same command: finished shards are kept and reused")
    table = _assemble(cfg, ds, aug_table, users, original, pseudo, hidden, streamed)
    summary = summarise(table, time.perf_counter() - t0, pending.num_rows)
    with STAGE.publish(out, key, config=arv_cfg, llm=llm_identity(cfg),
                       counts={"users": table.num_rows}) as pub:
        pq.write_table(table, pub.dir / "reliability.parquet")
        write_json(pub.dir / "summary.json", summary)
    writer.cleanup()
    return ReliabilityResult(out, False, summary)


def _assemble(cfg: Config, ds: Any, aug: pa.Table, users: np.ndarray, original: list[np.ndarray],
              pseudo: list[np.ndarray], hidden: list[int], streamed: pa.Table | None) -> pa.Table:
    """One row per augmented user; users without pseudo items get r_u = 0 and status 'skipped'."""
    by_user: dict[int, dict[str, Any]] = {}
    if streamed is not None:
        for row in streamed.to_pylist():
            by_user[int(row["user_id"])] = row
    train_len = np.array([len(o) for o in original], dtype=np.int64)
    r_cos = np.array([float(by_user.get(int(u), {}).get("r_u") or 0.0) for u in users])
    r_rand = np.array([float(by_user.get(int(u), {}).get("r_random") or 0.0) for u in users])
    r_best = np.array([float(by_user.get(int(u), {}).get("r_best") or 0.0) for u in users])
    judged = np.array([by_user.get(int(u), {}).get("status") == "ok" for u in users])
    skill = np.zeros(len(users))
    r = r_cos.copy()
    if judged.any():
        r_sk, s_u, _ = judge_skill(r_cos[judged], r_rand[judged], r_best[judged])
        skill[judged] = s_u
        if cfg.augment.arv_reliability == "skill":
            r = np.zeros(len(users))
            r[judged] = r_sk
    elif cfg.augment.arv_reliability == "skill":
        r = np.zeros(len(users))
    w = decay_weights(r, train_len, cfg.dual.decay, cfg.dual.beta, cfg.decay_threshold)

    def col(name: str, default: Any) -> list[Any]:
        return [by_user.get(int(u), {}).get(name, default) for u in users]

    return pa.table({
        "user_id": pa.array(users, pa.int64()),
        "original": pa.array([o.tolist() for o in original], pa.list_(pa.int64())),
        "pseudo_items": pa.array([p.tolist() for p in pseudo], pa.list_(pa.int64())),
        "candidates": aug.column("candidates").cast(pa.list_(pa.int64())),
        "hidden_item": pa.array(hidden, pa.int64()),
        "arv_candidates": pa.array([list(c or []) for c in col("arv_candidates", [])], pa.list_(pa.int64())),
        "picked_item": pa.array([int(x or 0) for x in col("picked_item", 0)], pa.int64()),
        "raw_reply": pa.array([str(x or "") for x in col("raw_reply", "")], pa.string()),
        "status": pa.array([str(x) for x in col("status", "skipped")], pa.string()),
        "error": pa.array([str(x or "") for x in col("error", "")], pa.string()),
        "r_u": pa.array(r, pa.float64()),
        "w_u": pa.array(w, pa.float64()),
        "r_cosine": pa.array(r_cos, pa.float64()), "r_random": pa.array(r_rand, pa.float64()),
        "r_best": pa.array(r_best, pa.float64()), "skill": pa.array(skill, pa.float64()),
        "train_len": pa.array(train_len, pa.int64()),
    })


def summarise(table: pa.Table, seconds: float, new_users: int) -> dict[str, Any]:
    df = table.to_pandas()
    r = df["r_u"].to_numpy()
    return {
        "users": len(df), "users_validated_now": new_users, "status": df["status"].value_counts().to_dict(),
        "r_u": {"mean": float(r.mean()) if len(r) else 0.0,
                **{f"q{int(q * 100)}": float(np.quantile(r, q)) if len(r) else 0.0
                   for q in (0.1, 0.25, 0.5, 0.75, 0.9)},
                "share_zero": float((r == 0).mean()) if len(r) else 0.0},
        "w_u_mean": float(df["w_u"].mean()) if len(df) else 0.0,
        # The judge against chance on the same lists: mean similarity of its picks, of a random
        # pick (the list mean) and of the best pick, and its mean skill (0 = chance, 1 = best).
        "judge": _judge_summary(df),
        "hit_rate": float((df["picked_item"] == df["hidden_item"]).mean()) if len(df) else 0.0,
        # How concentrated the picks are on one position of the candidate list: near 1.0 means the
        # LLM answers by position, not by content, and r_u measures the recommender, not the LLM.
        "top_position_share": _top_position_share(df),
        "seconds": seconds, "users_per_s": new_users / seconds if seconds > 0 else None,
    }


def _top_position_share(df: Any) -> float:
    positions = [list(c).index(p) for p, c in zip(df["picked_item"], df["arv_candidates"], strict=True)
                 if p and p in list(c)]
    if not positions:
        return 0.0
    return float(np.bincount(positions).max() / len(positions))


def _judge_summary(df: Any) -> dict[str, float]:
    ok = df[df["status"] == "ok"]
    if not len(ok):
        return {"users": 0}
    return {"users": len(ok), "r_cosine_mean": float(ok["r_cosine"].mean()),
            "r_random_mean": float(ok["r_random"].mean()), "r_best_mean": float(ok["r_best"].mean()),
            "skill_mean": float(ok["skill"].mean()),
            "skill_mean_clipped": float(np.clip(ok["skill"].mean(), 0.0, 1.0))}
