"""Reading a trained model back: ``<model_dir>/best`` holds safetensors weights and a JSON header.

A library function, below the stages: the train stage writes the folder, and the candidate
scorer, ARV and serving read it without importing the train stage. No pickle and no torch file
is ever loaded: the architecture is rebuilt from the JSON and the weights come from safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from llmser_ray.config import ModelConfig
from llmser_ray.errors import StageError
from llmser_ray.models import build_model
from llmser_ray.models.base import SeqRecModel


def load_trained(folder: str | Path) -> tuple[SeqRecModel, dict[str, Any]]:
    """Rebuild a trained model from ``<model_dir>/best`` in eval mode, with its JSON header."""
    best = Path(folder) / "best"
    meta_path = best / "model.json"
    if not meta_path.is_file():
        raise StageError(f"no trained model in {folder}", "run `llmser-ray train` first")
    meta = json.loads(meta_path.read_text())
    model = build_model(ModelConfig.model_validate(meta["model"]), int(meta["num_items"]))
    model.load_state_dict(load_file(str(best / "model.safetensors")))
    model.eval()
    return model, meta
