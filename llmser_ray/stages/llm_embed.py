"""The ``llm_embed`` stage: item vectors from the BASE LLM's hidden states.

The dual view's second text source (``semantic.source=llm``, LLM-ESR's "LLM embeddings" read
from the LLM we ship instead of an embedding API) and TSLRec's "before fine-tuning" arm. It
runs exactly what ``tslrec_embed`` runs (the same item prompts, ``tslrec.embed_layer``,
``tslrec.pooling``, the same Ray Data actor pool) without the LoRA adapter, so the two outputs
differ only by the fine-tuning and their comparison measures it. Unlike ``tslrec_embed`` it
needs no pretrained recommender: only the dataset and the LLM.

Output ``<workdir>/llm_base_embeddings/`` (docs/SCHEMA.md#llm_item_embeddings: the same layout),
one unit-norm row per item id, row 0 zeros. Keyed by the LLM's weights (fingerprint), the prompt
settings, the layer, the pooling and the dataset; actor counts and batch sizes only change speed.
"""

from __future__ import annotations

import time

from llmser_ray.config import Config
from llmser_ray.io import read_manifest
from llmser_ray.stages.base import Stage, digest
from llmser_ray.stages.prepare import need_dataset
from llmser_ray.stages.tslrec_embed import VECTORS_FILE, LLMEmbedResult, embed_items_with_llm

STAGE = Stage(
    name="llm_embed", output="llm_base_embeddings", schema_version=1, inputs=("prepare",),
    identity=("LLM fingerprint (tslrec.model)", "tslrec.item_text", "tslrec.title_chars",
              "tslrec.max_prompt_tokens", "tslrec.embed_layer", "tslrec.pooling", "the dataset digest"),
    schema="docs/SCHEMA.md#llm_item_embeddings",
    summary="one item vector per item from the base LLM's hidden states (dual view source `llm`)")


def _key(cfg: Config, fingerprint: str, dataset_digest: str) -> str:
    t = cfg.tslrec
    return digest({"llm": fingerprint, "item_text": t.item_text, "title_chars": t.title_chars,
                   "max_prompt_tokens": t.max_prompt_tokens, "embed_layer": t.embed_layer,
                   "pooling": t.pooling, "dataset_digest": dataset_digest})


def _identity(cfg: Config) -> tuple[str, str, str, str]:
    """The LLM folder, its fingerprint, the dataset digest and the stage key."""
    from llmser_ray.llm.models import model_fingerprint
    from llmser_ray.stages.tslrec_tune import resolve_tslrec_model

    folder = resolve_tslrec_model(cfg)
    fingerprint = model_fingerprint(folder)
    dataset_digest = str((read_manifest(cfg.workdir_path / "dataset") or {}).get("config_digest", ""))
    return folder, fingerprint, dataset_digest, _key(cfg, fingerprint, dataset_digest)


def llm_embed_current(cfg: Config) -> bool:
    """Whether ``llm_base_embeddings/`` holds this LLM's vectors of the current dataset."""
    if read_manifest(cfg.workdir_path / "dataset") is None:
        return False
    try:
        key = _identity(cfg)[3]
    except Exception:
        return False
    out = STAGE.folder(cfg.workdir_path)
    return STAGE.current(out, key) is not None and (out / VECTORS_FILE).is_file()


def llm_embed(cfg: Config, force: bool = False) -> LLMEmbedResult:
    """Embed every item with the base LLM into ``<workdir>/llm_base_embeddings`` (skipped when
    current; a workdir without a dataset gets one prepared first)."""
    t0 = time.perf_counter()
    need_dataset(cfg, STAGE.name)
    folder, fingerprint, dataset_digest, key = _identity(cfg)
    out = STAGE.folder(cfg.workdir_path)
    done = STAGE.current(out, key, force)
    if done is not None and (out / VECTORS_FILE).is_file():
        return LLMEmbedResult(out, True, int(done["dim"]), int(done["counts"]["items"]),
                              float(done["seconds"]), float(done["items_per_s"]))
    return embed_items_with_llm(cfg, STAGE, out, key, folder, None, t0, model=cfg.tslrec.model,
                                model_fingerprint=fingerprint, adapter=None, dataset_digest=dataset_digest)
