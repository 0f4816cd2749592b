"""The pipeline's stages, one module each, named after what they produce (docs/STAGES.md).

Every stage module declares ``STAGE`` (``stages.base.Stage``: output folder, inputs, identity,
schema) and one public entry point; all of them run on ``stages.base`` (digest, "is it current",
atomic publish, the upstream rule). Library packages (data, models, text, llm, augment, serving)
import no stage; ``serving`` is the package below the ``serve`` stage.
"""

from __future__ import annotations

import importlib

from llmser_ray.stages.base import Stage

MODULES = ("prepare", "embed", "llm_embed", "user_neighbours", "pretrain", "tslrec_tune", "tslrec_embed",
           "candidates", "select", "reliability", "train", "evaluate", "tune", "serve")


def all_stages() -> list[Stage]:
    """Every declared stage, in pipeline order (imports each stage module)."""
    return [importlib.import_module(f"llmser_ray.stages.{m}").STAGE for m in MODULES]
