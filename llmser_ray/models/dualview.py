"""LLM-ESR's dual-view item representation (Liu et al., NeurIPS 2024, arXiv 2405.20646).

Any backbone of this package, unchanged, run twice per sequence:

- the collaborative view: the backbone's own ID table (``item_emb``), initialised from a PCA of
  the item-text embeddings (so similar texts start close) and trained as usual;
- the semantic view: the item-text table (the ``embed`` stage's MiniLM vectors by default),
  frozen, through a trainable adapter (text dim -> d/2 -> hidden, two linear layers as in the
  reference), fed to the same layers through ``forward(seqs, embeds=...)``.

With ``semantic.fusion=cross_attention`` each view's input sequence first attends to the
other's (``CrossAttention``, the paper's option). The two hidden states are concatenated
``[B, L, 2D]`` and the item table is the concatenation of both views ``[I + 1, 2D]``, so a
score is ``h_id . e_id + h_sem . e_sem``. Everything
downstream (losses, length buckets, evaluation, serving's top-k) sees an ordinary
``SeqRecModel`` of width ``2D``.

Why an item with no interactions can be recommended: its semantic row comes from its text
alone, so it scores against every user through the adapter even though its ID row never
received a gradient (docs/SERVING.md, "Cold items").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from llmser_ray.config import SemanticConfig
from llmser_ray.errors import ConfigError
from llmser_ray.models.base import SeqRecModel
from llmser_ray.models.sasrec import attention_mask


def pca_projection(vectors: np.ndarray, dim: int) -> np.ndarray:
    """``[n, dim]`` coordinates of ``vectors`` ``[n, d]`` on their top ``dim`` principal axes
    (centred, as scikit-learn's ``PCA.fit_transform``; signs as NumPy's SVD gives them)."""
    x = np.asarray(vectors, dtype=np.float64)
    if dim > min(x.shape):
        raise ValueError(f"a {dim}-d PCA needs at least {dim} items and {dim} text dimensions "
                         f"(got {x.shape[0]} x {x.shape[1]})")
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    return (centred @ vt[:dim].T).astype(np.float32)


class CrossAttention(nn.Module):
    """One view's sequence attending to the other's (LLM-ESR's optional fusion), with a residual:
    ``x + attn(q = x, k = v = y)``. Causal backbones get a causal mask, so position t never
    reads a later item through the other view; padded keys are masked as in the backbones."""

    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"semantic.cross_heads ({heads}) must divide model.hidden ({dim})")
        self.heads, self.dropout = heads, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.heads
        q = self.q(x).view(b, n, h, d // h).transpose(1, 2)
        k, v = self.kv(y).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
        return x + self.proj(out.transpose(1, 2).reshape(b, n, d))


class DualView(SeqRecModel):
    """A backbone over the collaborative and semantic views of the items, fused by concatenation."""

    # The catalogue-wide adapter pass is the dear part of ``item_embeddings``: a training step
    # computes it once for all its length buckets (stages/train.py ``LossModule``).
    table_once = True

    def __init__(self, backbone: SeqRecModel, text: torch.Tensor, cfg: SemanticConfig) -> None:
        super().__init__(backbone.num_items, backbone.max_len)
        n, d_text = text.shape
        if n != backbone.num_items + 1:
            raise ValueError(f"the text table has {n - 1} item rows, the model {backbone.num_items}")
        hidden = backbone.item_emb.embedding_dim
        self.backbone = backbone
        self.bucket_by_length = backbone.bucket_by_length
        self.text = nn.Embedding.from_pretrained(text.float(), freeze=cfg.freeze, padding_idx=0)
        mid = cfg.adapter_hidden or max(1, d_text // 2)
        self.adapter = nn.Sequential(nn.Linear(d_text, mid), nn.Linear(mid, hidden))
        self.cross = None
        if cfg.fusion == "cross_attention":
            dropout = float(getattr(getattr(backbone, "drop", None), "p", 0.0))
            self.cross = nn.ModuleList(CrossAttention(hidden, cfg.cross_heads, dropout)
                                       for _ in range(2))  # id <- semantic, semantic <- id
        self.causal = backbone.causal
        # Tokens beyond the items (BERT4Rec's [MASK]) have no text: a trainable semantic row each.
        extra = backbone.item_emb.num_embeddings - n
        self.extra = nn.Parameter(torch.randn(extra, hidden) * 0.02) if extra > 0 else None

    @property
    def item_emb(self) -> nn.Embedding:  # type: ignore[override]
        """The collaborative view: the backbone's ID table (registered once, under ``backbone``,
        so safetensors sees no shared tensor)."""
        return self.backbone.item_emb

    def init_from_pca(self) -> None:
        """ID rows ``1..I`` from the ``hidden``-d PCA of the text rows (the reference's init)."""
        hidden = self.item_emb.embedding_dim
        proj = pca_projection(self.text.weight[1:].detach().cpu().numpy(), hidden)
        with torch.no_grad():
            self.item_emb.weight[1:self.num_items + 1] = torch.from_numpy(proj)

    # The backbone's task and inference inputs (BERT4Rec's Cloze task and [MASK]) are the model's.
    def training_task(self, seqs: torch.Tensor, generator: torch.Generator | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.backbone.training_task(seqs, generator)

    def target_flags(self, flags: torch.Tensor) -> torch.Tensor:
        return self.backbone.target_flags(flags)

    def inference_inputs(self, seqs: torch.Tensor) -> torch.Tensor:
        return self.backbone.inference_inputs(seqs)

    def adapt(self, text: torch.Tensor) -> torch.Tensor:
        """The adapter on text rows ``[..., d_text] -> [..., D]``.

        Its two layers are linear (the reference's), so they are applied as their product
        ``W2 W1`` (``D x d_text``, built in microseconds): one pass over the catalogue costs
        ``d_text x D`` per item instead of ``d_text x d_text / 2 + d_text / 2 x D``, about 3x
        less for MiniLM, and it runs once per step. Same function, same gradients (to rounding).
        """
        first, second = self.adapter[0], self.adapter[1]
        weight = second.weight @ first.weight
        bias = second.weight @ first.bias + second.bias
        return nn.functional.linear(text, weight, bias)

    def semantic(self, ids: torch.Tensor) -> torch.Tensor:
        """Semantic-view embeddings of any ids (items, padding 0, extra tokens) ``[..., D]``;
        padding maps to zero (the adapter's bias would not)."""
        out = self.adapt(self.text(ids.clamp(max=self.num_items))) * (ids > 0).unsqueeze(-1)
        if self.extra is not None:
            beyond = ids > self.num_items
            out = torch.where(beyond.unsqueeze(-1),
                              self.extra[(ids - self.num_items - 1).clamp(min=0)], out)
        return out

    def forward(self, seqs: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        if embeds is not None:
            raise ValueError("DualView builds its own input embeddings")
        seqs = seqs[:, -self.max_len:]
        ids, sem = self.item_emb(seqs), self.semantic(seqs)
        if self.cross is not None:
            mask = attention_mask(seqs, causal=self.causal)
            keep = (seqs > 0).unsqueeze(-1)
            ids, sem = self.cross[0](ids, sem, mask) * keep, self.cross[1](sem, ids, mask) * keep
        return torch.cat([self.backbone(seqs, ids), self.backbone(seqs, sem)], dim=-1)

    def item_embeddings(self) -> torch.Tensor:
        """``[I + 1, 2D]``: both views of every item (the semantic one computed from text)."""
        sem = self.adapt(self.text.weight[1:self.num_items + 1])
        sem = torch.cat([sem.new_zeros(1, sem.shape[1]), sem])  # padding row: zero
        return torch.cat([self.backbone.item_embeddings(), sem], dim=-1)



def check_text_table(vectors: np.ndarray, num_items: int, hidden: int, cfg: SemanticConfig,
                     where: str) -> None:
    """Refuse a text table the dual view cannot use, in one line that says the fix: wrong shape
    (another dataset's or another model's vectors), too few dimensions for the PCA
    initialisation, non-finite values, or items without text (their semantic view would be the
    adapter's bias alone, the same for all of them) unless ``semantic.missing_text=allow``."""
    if vectors.ndim != 2 or vectors.shape[1] < 1:
        raise ConfigError(f"{where} holds a table of shape {vectors.shape}, not [items + 1, dim]",
                          "rerun `llmser-ray embed --force`")
    if vectors.shape[0] != num_items + 1:
        raise ConfigError(f"{where} holds {vectors.shape[0] - 1} item vectors but the dataset has "
                          f"{num_items} items", "rerun `llmser-ray embed --force` on this dataset")
    if cfg.pca_init and vectors.shape[1] < hidden:
        raise ConfigError(f"{where} holds {vectors.shape[1]}-d vectors: too few for a {hidden}-d "
                          "PCA initialisation of the ID embeddings",
                          "set semantic.pca_init=false, or a model.hidden of at most "
                          f"{vectors.shape[1]}, or a larger embed.model")
    if not np.isfinite(vectors).all():
        raise ConfigError(f"{where} holds non-finite values", "rerun `llmser-ray embed --force`")
    empty = np.flatnonzero(~vectors[1:].any(axis=1)) + 1
    if len(empty) and cfg.missing_text == "error":
        raise ConfigError(f"{len(empty)} items have no text, so no semantic view (e.g. item "
                          f"{int(empty[0])})", "give them a title or attributes "
                          "(data.item_path), or set semantic.missing_text=allow")
