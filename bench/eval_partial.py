"""Test metrics of an UNFINISHED training run: the best weights of its latest Ray Train
checkpoint, evaluated as the train stage evaluates a finished model (``evaluate_splits``: both
protocols, every group). For runs stopped by a deadline; the output says so (``stopped_at``).

    PYTHONPATH=. python bench/eval_partial.py --config /work/runs19/beauty.yaml \\
        --set semantic.enabled=true --model-dir /work/runs19/beauty/models/sasrec-dualview-s42 \\
        --out /work/runs19/sasrec-dualview-s42.partial.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from llmser_ray.config import load_config
from llmser_ray.data.dataset import load_dataset
from llmser_ray.models import build_model
from llmser_ray.models.naming import resolve_semantic
from llmser_ray.stages.evaluate import evaluate_splits
from llmser_ray.stages.train import semantic_table


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.set)
    ds = load_dataset(cfg.workdir_path / "dataset")
    cfg = resolve_semantic(cfg, ds.manifest)[0]  # as train decides semantic.enabled=auto
    states = sorted(Path(args.model_dir, "ray").glob("run-*/checkpoint_*/state.json"),
                    key=lambda p: json.loads(p.read_text())["epoch"])
    if not states:
        raise SystemExit(f"no checkpoint under {args.model_dir}/ray")
    latest = states[-1].parent
    state = json.loads((latest / "state.json").read_text())
    model = build_model(cfg.model, ds.num_items, cfg.semantic, semantic_table(cfg, ds), init=False)
    model.load_state_dict(load_file(str(latest / "best.safetensors")))
    model.eval()
    test = evaluate_splits(model, ds, cfg)
    out = {"stopped_at": state["epoch"], "best_epoch": state["best_epoch"],
           "best_valid": state["best_metric"], "history": state["history"], "test": test}
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps({"stopped_at": state["epoch"], "best_epoch": state["best_epoch"],
                      "full": {g: test["full"][g]["ndcg@10"] for g in test["full"]}}, indent=1))


if __name__ == "__main__":
    main()
