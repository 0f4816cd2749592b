"""BERT4Rec (Sun et al., "BERT4Rec: Sequential Recommendation with Bidirectional Encoder
Representations from Transformer", CIKM 2019).

A bidirectional transformer trained with the Cloze task: random items are replaced by [MASK]
and predicted from both sides. To recommend, [MASK] is appended after the history and its
output is scored against the item embeddings (tied input/output table).

Vocabulary: 0 = padding, 1..num_items = items, num_items + 1 = [MASK]. The blocks are the
pre-LN blocks of ``sasrec.py`` with BERT's GELU and 4x feed-forward, followed by BERT's
masked-LM transform (dense + GELU + LayerNorm) before the tied output.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llmser_ray.config import ModelConfig
from llmser_ray.models.base import SeqRecModel
from llmser_ray.models.sasrec import Block, attention_mask, init_weights


def _rand(shape: tuple[int, ...], like: torch.Tensor,
          generator: torch.Generator | None) -> torch.Tensor:
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


class BERT4Rec(SeqRecModel):
    causal = False

    def __init__(self, cfg: ModelConfig, num_items: int) -> None:
        super().__init__(num_items, cfg.max_len)
        d = cfg.hidden
        self.mask_token = num_items + 1
        self.mask_prob = cfg.mask_prob
        self.last_item_mask_prob = cfg.last_item_mask_prob
        self.item_emb = nn.Embedding(num_items + 2, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            Block(d, cfg.heads, cfg.dropout, activation="gelu", ffn_mult=4)
            for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d))
        self.apply(init_weights)

    def forward(self, seqs: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        seqs = seqs[:, -self.max_len:]
        n = seqs.shape[1]
        keep = (seqs > 0).unsqueeze(-1)
        positions = torch.arange(self.max_len - n, self.max_len, device=seqs.device)
        e = self.item_emb(seqs) if embeds is None else embeds[:, -n:]
        x = self.drop(e + self.pos_emb(positions)) * keep
        mask = attention_mask(seqs, causal=False)
        for block in self.blocks:
            x = block(x, mask) * keep
        return self.head(self.ln_f(x))

    def inference_inputs(self, seqs: torch.Tensor) -> torch.Tensor:
        """A [MASK] appended after the last ``max_len - 1`` history items: its output is scored."""
        history = seqs[:, -(self.max_len - 1):]
        mask = torch.full_like(history[:, :1], self.mask_token)
        return torch.cat([history, mask], dim=1)

    def cloze_mask(self, seqs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Which positions to hide: each item with ``mask_prob``, at least one per non-empty row.

        With ``last_item_mask_prob`` a row instead hides only its last item, the paper's extra
        samples that match the inference task (predict what follows the history).
        """
        b, n = seqs.shape
        valid = seqs > 0
        masked = valid & (_rand((b, n), seqs, generator) < self.mask_prob)
        # Rows where chance hid nothing: hide one random real item.
        pick = torch.where(valid, _rand((b, n), seqs, generator), -1.0).argmax(1)
        fallback = nn.functional.one_hot(pick, n).bool() & valid
        masked = torch.where(masked.any(1, keepdim=True), masked, fallback)
        only_last = _rand((b, 1), seqs, generator) < self.last_item_mask_prob
        last = torch.zeros_like(masked)
        last[:, -1] = valid[:, -1]
        return torch.where(only_last, last, masked)

    def training_task(self, seqs: torch.Tensor, generator: torch.Generator | None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The Cloze task on the last ``max_len`` items: the input has [MASK] at the
        ``cloze_mask`` positions, which are the ones that count, each predicting its own item."""
        seqs = seqs[:, -self.max_len:]
        masked = self.cloze_mask(seqs, generator)
        return seqs.masked_fill(masked, self.mask_token), seqs, masked

    def target_flags(self, flags: torch.Tensor) -> torch.Tensor:
        """Cloze targets sit on their own items."""
        return flags[:, -self.max_len:]
