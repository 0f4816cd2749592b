"""Does ARV's reliability predict anything? (issue 18 item 3)

r_u is meant to say for which users the pseudo-prior can be trusted. If it does, the users it
rates higher should be the ones the augmentation helped: per augmented user, compare the rank of a
held-out item under the plain baseline and under the dual-channel model trained on the
augmentation, and correlate that change with every reliability column ``reliability.parquet``
holds (``r_u`` and, where written, ``r_cosine``, ``skill``, ``r_random``, ``r_best``), by
Spearman's rho with a 95% bootstrap interval over users. A reliability that predicts nothing has
rho near 0 with an interval across it.

    python bench/arv_signal.py --workdir runs/ablation-beauty \\
        --baseline sasrec-s42 --augmented sasrec-llmser-s42 --out runs/ablation-beauty/arv_signal.json

The change is measured on the validation item by default (``--split test`` for the test item):
``rank_gain = log2(rank_base + 1) - log2(rank_aug + 1)`` (positive: the augmented model ranks the
item higher; the log keeps a jump from rank 5,000 to 4,000 from outweighing one from 20 to 2),
and ``ndcg_gain`` of NDCG@10 (zero for most users, both ranks past 10). Full ranking, the real
history masked, the augmented model reading the pseudo-prior prefix exactly as evaluation does.

``--reliability PATH`` reads r_u from another run's ``reliability.parquet`` instead, for a model
trained with ``dual.pseudo_source=candidates`` on the SAME pseudo items (``augment.selector=
collaborative`` picks the reverse model's top items, which is what the candidates arms read): the
question "does r_u say who gains from this prefix?" needs only the prefix, not weights trained on
r_u. The script checks, user by user, that the judged prefix is the model's and refuses otherwise.
ARV may have run on a sample of the users (``augment.max_users``): only they are scored.

    python bench/arv_signal.py --workdir runs/ablation-beauty --baseline sasrec \\
        --augmented sasrec-candidates-context-s42 --reliability runs/arv-sample/reliability.parquet \\
        --out runs/ablation-beauty/arv_signal_context.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from llmser_ray.augment.selection import spearman_ci
from llmser_ray.augment.weights import augmentation_dir, load_augmentation, split_list_column
from llmser_ray.config import DualConfig, load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.errors import LLMSeRError
from llmser_ray.evaluation import ndcg_at, rank_targets
from llmser_ray.models.checkpoint import load_trained

COLUMNS = ("r_u", "r_cosine", "skill", "r_random", "r_best")


def signal(r: dict[str, np.ndarray], rank_base: np.ndarray, rank_aug: np.ndarray,
           seed: int = 0) -> dict[str, object]:
    """Spearman's rho (95% bootstrap interval) of each reliability column against both gains."""
    gains = {"rank_gain": np.log2(rank_base + 1.0) - np.log2(rank_aug + 1.0),
             "ndcg_gain": ndcg_at(rank_aug, 10) - ndcg_at(rank_base, 10)}
    out: dict[str, object] = {"users": len(rank_base),
                              "mean": {k: float(v.mean()) for k, v in gains.items()},
                              "improved_share": float((rank_aug < rank_base).mean())}
    for col, values in r.items():
        out[col] = {"mean": float(np.mean(values))} | {
            g: dict(zip(("rho", "lo", "hi"), (round(x, 4) if np.isfinite(x) else None  # JSON has no NaN
                                              for x in spearman_ci(values, v, seed)),
                        strict=True)) for g, v in gains.items()}
    return out


def same_prefix_mismatches(users: np.ndarray, judged: list[np.ndarray], read: list[np.ndarray]) -> int:
    """Users whose first judged pseudo items are not the items the model reads. As sets: the
    candidates prefix puts the best item last, the LLM's in its own order; and ARV judged all
    stored items (``augment.ask_items``), the model reads the first ``dual.num_pseudo``."""
    bad = 0
    for u, items in zip(users, judged, strict=True):
        prefix = read[u - 1]
        bad += len(prefix) == 0 or set(np.asarray(items[:len(prefix)]).tolist()) != set(prefix.tolist())
    return bad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--config", default=None, help="the YAML the models were trained with, if any")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--baseline", required=True, help="model name under <workdir>/models (plain)")
    ap.add_argument("--augmented", required=True, help="model name of the dual-channel model")
    ap.add_argument("--split", choices=("valid", "test"), default="valid")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reliability", type=Path, default=None,
                    help="r_u from this reliability.parquet (same pseudo items as the model's)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    cfg = load_config(args.config, [f"workdir={Path(args.workdir).resolve()}", *args.set])
    ds = load_dataset(cfg.workdir_path / "dataset")
    base, _ = load_trained(cfg.workdir_path / "models" / args.baseline)
    aug, meta = load_trained(cfg.workdir_path / "models" / args.augmented)
    if not meta.get("dual"):
        sys.exit(f"error: {args.augmented} is not a dual-channel model. Fix: name the LLMSeR model "
                 "(trained with dual.enabled=true) as --augmented")
    aug_cfg = cfg.model_copy(update={"dual": DualConfig.model_validate(meta["dual"])})
    path = args.reliability or augmentation_dir(aug_cfg) / "reliability.parquet"
    if not path.is_file() or (args.reliability is None and aug_cfg.dual.pseudo_source != "llm"):
        sys.exit(f"error: no ARV reliabilities for {args.augmented} ({path}). Fix: train it with "
                 "dual.pseudo_source=llm after `llmser-ray augment`, or name one with --reliability")
    table = pq.read_table(path)
    users = table.column("user_id").to_numpy()
    r = {c: table.column(c).to_numpy(zero_copy_only=False).astype(np.float64)
         for c in COLUMNS if c in table.column_names}

    inputs, targets = ds.split(args.split)
    augmentation = load_augmentation(aug_cfg, ds)
    if args.reliability is not None:
        judged = split_list_column(table.column("pseudo_items"))
        if bad := same_prefix_mismatches(users, judged, augmentation.pseudo):
            sys.exit(f"error: {path} judged other pseudo items than {args.augmented} reads for "
                     f"{bad} of {len(users)} users. Fix: run ARV with the selector and candidates "
                     "the model's augmentation came from (augment.selector=collaborative)")
    pick = users - 1
    real = [inputs[i] for i in pick]
    aug_inputs = augmentation.inputs(inputs) if aug_cfg.dual.infer_augmented else inputs
    ecfg = cfg.eval.model_copy(update={"protocol": "full"})
    rank_base = rank_targets(base, real, targets[pick], ecfg, ds.num_items, seen=real)
    rank_aug = rank_targets(aug, [aug_inputs[i] for i in pick], targets[pick], ecfg, ds.num_items, seen=real)
    report = {"workdir": str(cfg.workdir_path), "baseline": args.baseline, "augmented": args.augmented,
              "split": args.split, "reliability": str(path), "dual": meta["dual"],
              **signal(r, rank_base.astype(np.float64), rank_aug.astype(np.float64), args.seed)}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    try:
        main()
    except LLMSeRError as e:  # a missing model or dataset: one line, not a traceback
        sys.exit(f"error: {e}")
