"""TSLRec's library (Liu et al., arXiv 2406.00333): targets, prompts, loss, LoRA model, hidden states.

Below the stages (``stages/tslrec_tune.py`` and ``stages/tslrec_embed.py`` run it); imports no stage.

Why these choices:
- Latent categories are k-means clusters of the pretrained forward model's item embeddings, so a
  category is collaborative information (items users consume together), not text similarity.
- A user's target is the distribution of the categories of their TRAINING items only
  (``SeqDataset.train_sequences``): the validation and test items never reach the LLM.
- The LLM's prediction is its next-token distribution after the prompt, restricted to K
  single-token labels (" A", " B", ...). No new parameter is added: the base model already
  predicts a distribution (so "base vs tuned" compares the same function before and after
  fine-tuning, not an untrained head), the LoRA adapter is the only trained state (the checkpoint
  is the adapter alone), and it works for any causal LM whose vocabulary has the labels. The
  loss is the cross-entropy of that distribution against the target (for an item: its one
  category), which differs from KL(target || prediction) by the target's entropy only.
- Only the logits of the last position are computed (``logits_to_keep=1`` on left-padded
  batches): a full-vocabulary logit tensor for every position would be B x T x 49k floats.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmser_ray.errors import ConfigError

LABELS = [f" {c}" for c in string.ascii_uppercase + string.ascii_lowercase]
# Short on purpose: every prompt token costs forward and backward time (CPU: ~200 tokens/s).
USER_PROMPT = "A shopper bought, oldest first:\n{history}\nThe shopper's category:"
ITEM_PROMPT = "Item: {item}\nThe item's category:"
ADAPTER_FILE = "adapter_model.safetensors"


# ----------------------------------------------------------------------------- targets


def kmeans(vectors: np.ndarray, k: int, iters: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding on the rows of ``vectors``: (labels, centroids).

    Plain NumPy: an item table (tens of thousands x 64) clusters in well under a second, and the
    result is a function of the seed alone (no thread-count-dependent library randomness).
    """
    x = np.asarray(vectors, dtype=np.float64)
    n = len(x)
    if n < k:
        raise ConfigError(f"k-means needs at least tslrec.n_categories={k} items, got {n}",
                          "lower tslrec.n_categories")
    rng = np.random.default_rng(seed)
    centroids = [x[rng.integers(n)]]
    d2 = ((x - centroids[0]) ** 2).sum(1)
    for _ in range(1, k):
        probs = d2 / d2.sum() if d2.sum() > 0 else np.full(n, 1.0 / n)
        centroids.append(x[rng.choice(n, p=probs)])
        d2 = np.minimum(d2, ((x - centroids[-1]) ** 2).sum(1))
    c = np.stack(centroids)
    labels = np.zeros(n, dtype=np.int64)
    for _ in range(iters):
        dist = (x ** 2).sum(1)[:, None] - 2 * x @ c.T + (c ** 2).sum(1)[None, :]
        new = dist.argmin(1)
        for j in range(k):
            members = x[new == j]
            # An emptied cluster takes the point farthest from its centroid (keeps K categories).
            c[j] = members.mean(0) if len(members) else x[dist.min(1).argmax()]
        if iters > 1 and np.array_equal(new, labels):
            break
        labels = new
    return labels, c


def item_categories(item_table: np.ndarray, k: int, iters: int, seed: int) -> np.ndarray:
    """Category of every item id, ``[num_items + 1]`` (row 0, padding, is -1), from a model's
    ``[num_items + 1, D]`` item embedding table."""
    labels, _ = kmeans(item_table[1:], k, iters, seed)
    return np.concatenate([[-1], labels]).astype(np.int64)


def user_distributions(train_seqs: Sequence[np.ndarray], categories: np.ndarray, k: int) -> np.ndarray:
    """Each user's share of training items per category, ``[U, K]`` (rows sum to 1; a user with
    no training item gets an all-zero row, which callers leave out)."""
    out = np.zeros((len(train_seqs), k), dtype=np.float64)
    for u, seq in enumerate(train_seqs):
        seq = np.asarray(seq, dtype=np.int64)
        seq = seq[seq > 0]
        if len(seq):
            out[u] = np.bincount(categories[seq], minlength=k)[:k] / len(seq)
    return out.astype(np.float32)


# ----------------------------------------------------------------------------- prompts


def item_texts(items: Any, mode: str, title_chars: int) -> list[str]:
    """What a prompt shows of each item, indexed by item id (entry 0 is padding).

    ``items`` is the dataset's ``items.parquet`` table. ``auto``: the item's ``text``; a table
    with no text at all is an error (the fix: ``ids``). ``ids``: ``item <original id>`` plus
    whatever attributes exist, for catalogues without titles (Sports).
    """
    table = items.to_pydict() if hasattr(items, "to_pydict") else items
    n = len(table["item_id"])
    if mode == "auto":
        texts = [str(t or "").strip() for t in table["text"]]
        if not any(texts):
            raise ConfigError("the item table has no text (no titles, no attributes) for TSLRec prompts",
                              "set tslrec.item_text=ids to describe items by id and attributes")
        out = [t[:title_chars] if t else f"item {o}" for t, o in zip(texts, table["original_item"],
                                                                     strict=True)]
    elif mode == "ids":
        attrs = table.get("attributes") or [[] for _ in range(n)]
        out = []
        for orig, at in zip(table["original_item"], attrs, strict=True):
            extra = ", ".join(str(a) for a in (at or []) if str(a).strip())
            out.append((f"item {orig}" + (f" ({extra})" if extra else ""))[:title_chars])
    else:
        raise ConfigError(f"tslrec.item_text '{mode}' is unknown", "use auto or ids")
    return ["", *out]


def user_prompt(history: np.ndarray, texts: Sequence[str], max_items: int) -> str:
    recent = [int(i) for i in history if i > 0][-max_items:]
    return USER_PROMPT.format(history="\n".join(f"- {texts[i]}" for i in recent))


def item_prompt(item: int, texts: Sequence[str]) -> str:
    return ITEM_PROMPT.format(item=texts[int(item)])


def label_token_ids(tokenizer: Any, k: int) -> list[int]:
    """Token id of each category label; every label must be one token of this vocabulary."""
    if k > len(LABELS):
        raise ConfigError(f"tslrec.n_categories={k} exceeds the {len(LABELS)} single-token labels",
                          f"set tslrec.n_categories <= {len(LABELS)}")
    ids = []
    for label in LABELS[:k]:
        toks = tokenizer.encode(label, add_special_tokens=False)
        if len(toks) != 1:
            raise ConfigError(f"the LLM's tokenizer splits the category label '{label}' "
                              f"into {len(toks)} tokens",
                              "use a model whose vocabulary has single-letter tokens, or fewer categories")
        ids.append(toks[0])
    return ids


# ----------------------------------------------------------------------------- model


def check_model_folder(folder: str | Path) -> Path:
    """A Hugging Face folder with a config and weights; one clear line otherwise."""
    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ConfigError(f"tslrec.model folder {path} has no config.json",
                          "point tslrec.model at a Hugging Face model folder (config.json + weights)")
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise ConfigError(f"tslrec.model folder {path} holds no weights (*.safetensors)",
                          "copy the model's weight files into it, or point tslrec.model at a complete folder")
    return path


def load_tokenizer(folder: str | Path) -> Any:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    tok.padding_side = "left"  # the last position is every row's last real token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_base_model(folder: str | Path, dtype: str = "float32") -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    check_model_folder(folder)
    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype),
                                                local_files_only=True)


def lora_model(base: Any, r: int, alpha: float, dropout: float, target_modules: list[str]) -> Any:
    """The base model with a fresh LoRA adapter (only the adapter is trainable)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("TSLRec fine-tuning needs the peft package, which is not installed",
                          'pip install "peft>=0.13" (the cpu/gpu extras include it)') from None
    names = {n.rsplit(".", 1)[-1] for n, _ in base.named_modules()}
    missing = [m for m in target_modules if m not in names]
    if missing:
        raise ConfigError(f"tslrec.target_modules {missing} are not modules of the LLM",
                          f"choose among e.g. {sorted(n for n in names if n.endswith('proj'))[:8]}")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def adapter_state(model: Any) -> dict[str, Any]:
    """The adapter's weights only (CPU, contiguous: ready for safetensors)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: Any, tensors: dict[str, Any]) -> None:
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(model, tensors)
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"adapter weights do not fit the model: unexpected {unexpected[:3]}")


def load_tuned(model_folder: str | Path, adapter_folder: str | Path, dtype: str = "float32") -> Any:
    """The base LLM with a saved adapter applied (peft's folder format), in eval mode."""
    from peft import PeftModel

    adapter = Path(adapter_folder)
    if not (adapter / ADAPTER_FILE).is_file():
        from llmser_ray.errors import StageError

        raise StageError(f"no LoRA adapter in {adapter}", "run `llmser-ray tslrec-tune` first")
    model = PeftModel.from_pretrained(load_base_model(model_folder, dtype), str(adapter))
    model.eval()
    return model


# ----------------------------------------------------------------------------- forward, loss


def encode(tokenizer: Any, prompts: Sequence[str], max_tokens: int) -> dict[str, Any]:
    """Left-padded batch, truncated from the LEFT (the prompt's question and the most recent
    items are at its end), with position ids that start at each row's first real token."""
    tokenizer.truncation_side = "left"
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True, truncation=True,
                    max_length=max_tokens)
    mask = enc["attention_mask"]
    enc["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
    return dict(enc)


def category_logprobs(model: Any, batch: dict[str, Any], label_ids: Sequence[int]) -> Any:
    """log P(category | prompt) ``[B, K]``: the next-token logits at the last position,
    restricted to the labels and renormalised."""
    import torch

    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=1)
    logits = out.logits[:, -1, :].float()
    return torch.log_softmax(logits[:, list(label_ids)], dim=-1)


def soft_cross_entropy(logp: Any, target: Any) -> Any:
    """Mean over rows of ``-sum_k target_k log p_k`` (a one-hot target gives the usual CE)."""
    return -(target * logp).sum(-1).mean()


@dataclass
class Reconstruction:
    """Quality of the category reconstruction on held-out users and items."""

    user_ce: float
    user_kl: float
    target_entropy: float
    top1_match: float  # argmax of the prediction == argmax of the target
    item_ce: float
    item_accuracy: float
    users: int
    items: int

    def as_dict(self) -> dict[str, float | int]:
        return dict(self.__dict__)


def evaluate(model: Any, tokenizer: Any, label_ids: Sequence[int], user_prompts: Sequence[str],
             user_targets: np.ndarray, item_prompts_: Sequence[str], item_labels: np.ndarray,
             batch_size: int, max_tokens: int, device: Any = "cpu") -> Reconstruction:
    """CE, KL and top-1 agreement of the predicted user distributions; CE and accuracy of the
    inferred item categories. No gradients; the model is put in eval mode and restored."""
    import torch

    was_training = model.training
    model.eval()

    def logps(prompts: Sequence[str]) -> np.ndarray:
        parts = []
        with torch.no_grad():
            for s in range(0, len(prompts), batch_size):
                batch = {k: v.to(device) for k, v in
                         encode(tokenizer, prompts[s:s + batch_size], max_tokens).items()}
                parts.append(category_logprobs(model, batch, label_ids).cpu().numpy())
        return np.concatenate(parts) if parts else np.zeros((0, len(label_ids)))

    try:
        lp_u = logps(user_prompts)
        lp_i = logps(item_prompts_) if len(item_prompts_) else np.zeros((0, len(label_ids)))
    finally:
        model.train(was_training)
    t = np.asarray(user_targets, dtype=np.float64)
    ce = float(-(t * lp_u).sum(1).mean())
    ent = float(-(np.where(t > 0, t * np.log(np.where(t > 0, t, 1.0)), 0.0)).sum(1).mean())
    top1 = float((lp_u.argmax(1) == t.argmax(1)).mean())
    labels = np.asarray(item_labels, dtype=np.int64)
    item_ce = float(-lp_i[np.arange(len(labels)), labels].mean()) if len(labels) else float("nan")
    item_acc = float((lp_i.argmax(1) == labels).mean()) if len(labels) else float("nan")
    return Reconstruction(ce, ce - ent, ent, top1, item_ce, item_acc, len(t), len(labels))


# ----------------------------------------------------------------------------- hidden states


def hidden_vectors(model: Any, tokenizer: Any, prompts: Sequence[str], layer: int, pooling: str,
                   max_tokens: int, device: Any = "cpu") -> np.ndarray:
    """One float32 vector per prompt from hidden layer ``layer`` (-1: the last): the last real
    token's state (``last``, the state that predicts the category) or the mean over real tokens."""
    import torch

    batch = {k: v.to(device) for k, v in encode(tokenizer, prompts, max_tokens).items()}
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    position_ids=batch["position_ids"], output_hidden_states=True, logits_to_keep=1)
    states = out.hidden_states
    if not -len(states) <= layer < len(states):
        raise ConfigError(f"tslrec.embed_layer={layer} is outside the model's {len(states)} hidden states",
                          f"use a layer in -{len(states)}..{len(states) - 1} (-1 = last)")
    h = states[layer].float()
    if pooling == "last":
        vec = h[:, -1, :]
    else:
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        vec = (h * m).sum(1) / m.sum(1).clamp(min=1)
    return vec.cpu().numpy().astype(np.float32)
