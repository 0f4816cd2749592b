"""Which model a config trains: ``semantic.enabled=auto`` decided against the prepared dataset,
and the model's default folder name.

Pure functions of the config and the dataset manifest, in the library (not in ``stages/train``)
because serving needs them too: ``serve`` answers with the model its config trains, and the
library packages import no stage (tests/test_stages.py).
"""

from __future__ import annotations

from typing import Any

from llmser_ray.config import Config


def resolve_semantic(cfg: Config, dataset_manifest: dict[str, Any]) -> tuple[Config, str | None]:
    """``cfg`` with ``semantic.enabled="auto"`` decided (config.py says the rule), and why, for the
    console; an explicit true/false passes through with no reason. The rule follows what was
    measured: the dual view beat the plain backbone for SASRec on Beauty (3 seeds), under
    LLMSeR's dual channel it did worse than alone (docs/RESULTS.md section 3), and nothing else has
    been measured, so everything else keeps the setting it was measured with."""
    if cfg.semantic.enabled != "auto":
        return cfg, None
    counts = dataset_manifest.get("counts", {})
    items, with_text = int(counts.get("items", 0)), int(counts.get("items_with_text", 0))
    off = (f"{cfg.model.backbone} (measured for sasrec only)" if cfg.model.backbone != "sasrec"
           else "the reverse candidate model" if cfg.train.reverse
           else "LLMSeR's dual-channel training (measured worse with it)" if cfg.dual.enabled
           else "tslrec.init_backbone" if cfg.tslrec.init_backbone
           else "the dataset records no item text" if not with_text
           else (f"{items - with_text} of {items} items have no text (semantic.enabled=true with "
                 "semantic.missing_text=allow uses it anyway)") if with_text < items
           else None)
    on = off is None
    why = ("semantic.enabled=auto: dual view on (every item has text; "
           "semantic.enabled=false for the plain backbone)" if on
           else f"semantic.enabled=auto: dual view off: {off}")
    return cfg.model_copy(update={"semantic": cfg.semantic.model_copy(update={"enabled": on})}), why


def semantic_on(cfg: Config) -> bool:
    """Whether the dual view is on; an unresolved "auto" is a bug of the caller, never read as on."""
    if cfg.semantic.enabled == "auto":
        raise RuntimeError("semantic.enabled=auto must be resolved against the dataset first "
                           "(models/naming.py resolve_semantic)")
    return bool(cfg.semantic.enabled)


def default_name(cfg: Config) -> str:
    """``sasrec`` (plain = the baseline), ``sasrec-reverse`` (candidate generator),
    ``sasrec-llmser`` (dual-channel LLMSeR), ``sasrec-candidates`` (dual-channel, no LLM); LLM-ESR
    adds ``-dualview`` (semantic only), ``-distill`` (distillation only) or ``-llmesr`` (both)."""
    if cfg.train.reverse:
        return f"{cfg.model.backbone}-reverse"
    name = cfg.model.backbone
    if cfg.dual.enabled:
        name += f"-{'llmser' if cfg.dual.pseudo_source == 'llm' else 'candidates'}"
    semantic = semantic_on(cfg)
    if semantic or cfg.distill.enabled:
        name += ("-llmesr" if semantic and cfg.distill.enabled
                 else "-dualview" if semantic else "-distill")
    return name + ("-tslrec" if cfg.tslrec.init_backbone else "")  # item table initialised by TSLRec
