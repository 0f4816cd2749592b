"""SASRec (Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018).

Item embeddings scaled by sqrt(D) plus learned positions, ``layers`` pre-LN blocks of causal
multi-head self-attention and a point-wise feed-forward network, a final LayerNorm, and scores
against the same item embedding table.

Positions are right-aligned: the newest item always gets position ``max_len - 1``, so a
sequence's output does not depend on how far its batch was padded.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from llmser_ray.config import ModelConfig
from llmser_ray.models.base import SeqRecModel


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``mask`` is ``[B, 1, L, L]`` with True = may attend, or None to attend everywhere."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    def __init__(self, dim: int, inner: int, dropout: float, activation: str = "relu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, inner)
        self.fc2 = nn.Linear(inner, dim)
        self.act = nn.GELU() if activation == "gelu" else nn.ReLU()
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Block(nn.Module):
    """Pre-LN transformer block; ``ffn=False`` is the reference code's block (its FFN never runs).

    Shared with BERT4Rec, which differs only in its mask and activation.
    """

    def __init__(self, dim: int, heads: int, dropout: float, ffn: bool = True,
                 activation: str = "relu", ffn_mult: int = 1) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads, dropout)
        self.drop = nn.Dropout(dropout)
        # Not built at all when unused, so DDP does not wait for gradients that never come.
        self.ln2 = nn.LayerNorm(dim) if ffn else None
        self.ffn = FeedForward(dim, ffn_mult * dim, dropout, activation) if ffn else None

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), mask))
        if self.ffn is not None:
            x = x + self.ffn(self.ln2(x))
        return x


def attention_mask(seqs: torch.Tensor, causal: bool) -> torch.Tensor:
    """``[B, 1, L, L]``: real keys (and earlier ones only, if causal), plus each query itself.

    The diagonal keeps padded query rows (whose keys are all padding under left padding) from a
    softmax over nothing, which would be NaN; those rows are zeroed afterwards anyway.
    """
    n = seqs.shape[1]
    allowed = (seqs > 0)[:, None, None, :]
    eye = torch.eye(n, dtype=torch.bool, device=seqs.device)
    if causal:
        allowed = allowed & torch.ones(n, n, dtype=torch.bool, device=seqs.device).tril()
    return allowed | eye


def init_weights(module: nn.Module) -> None:
    """BERT-style N(0, 0.02) init; the padding row starts (and, via padding_idx, stays) zero."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


class SASRec(SeqRecModel):
    def __init__(self, cfg: ModelConfig, num_items: int) -> None:
        super().__init__(num_items, cfg.max_len)
        d = cfg.hidden
        # REFERENCE VARIANT (comparisons only): the LLMSeR reference code runs attention with no
        # mask at all (no causal mask, padded keys attended) and never applies its feed-forward.
        self.reference = cfg.sasrec_variant == "reference"
        self.bucket_by_length = not self.reference  # attending to padding: not width-invariant
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(d, cfg.heads, cfg.dropout, ffn=not self.reference) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(d)
        self.apply(init_weights)

    def forward(self, seqs: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        seqs = seqs[:, -self.max_len:]
        n = seqs.shape[1]
        keep = (seqs > 0).unsqueeze(-1)
        positions = torch.arange(self.max_len - n, self.max_len, device=seqs.device)
        e = self.item_emb(seqs) if embeds is None else embeds[:, -n:]
        x = e * math.sqrt(self.item_emb.embedding_dim) + self.pos_emb(positions)
        x = self.drop(x) * keep
        mask = None if self.reference else attention_mask(seqs, causal=True)
        for block in self.blocks:
            x = block(x, mask) * keep
        return self.ln_f(x)
