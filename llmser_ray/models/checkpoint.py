"""Reading a trained model back: ``<model_dir>/best`` holds safetensors weights and a JSON header.

A library function, below the stages: the train stage writes the folder, and the candidate
scorer, ARV and serving read it without importing the train stage. No pickle and no torch file
is ever loaded: the architecture is rebuilt from the JSON and the weights come from safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from llmser_ray.config import ModelConfig, SemanticConfig
from llmser_ray.errors import StageError
from llmser_ray.io import write_json
from llmser_ray.models import build_model
from llmser_ray.models.base import SeqRecModel


def write_trained(best: Path, state: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Write ``best/``: the weights as safetensors (a dual view's frozen text table included: the
    model is rebuilt from this folder alone) and the JSON header ``load_trained`` rebuilds from."""
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
              str(Path(best) / "model.safetensors"))
    write_json(Path(best) / "model.json", meta)


def load_trained(folder: str | Path) -> tuple[SeqRecModel, dict[str, Any]]:
    """Rebuild a trained model from ``<model_dir>/best`` in eval mode, with its JSON header."""
    best = Path(folder) / "best"
    meta_path = best / "model.json"
    if not meta_path.is_file():
        raise StageError(f"no trained model in {folder}", "run `llmser-ray train` first")
    meta = json.loads(meta_path.read_text())
    weights = load_file(str(best / "model.safetensors"))
    semantic = SemanticConfig.model_validate(meta["semantic"]) if meta.get("semantic") else None
    text = None
    if semantic is not None:  # LLM-ESR's dual view: its frozen text table is in the weights
        if "text.weight" not in weights:
            raise StageError(f"{best} says the model is dual-view but its weights hold no text table",
                             "retrain it (`llmser-ray train --force`)")
        text = torch.zeros_like(weights["text.weight"])
    model = build_model(ModelConfig.model_validate(meta["model"]), int(meta["num_items"]),
                        semantic, text, init=False)
    model.load_state_dict(weights)
    model.eval()
    return model, meta
