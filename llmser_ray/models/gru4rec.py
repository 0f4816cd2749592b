"""GRU4Rec (Hidasi et al., "Session-based Recommendations with Recurrent Neural Networks",
ICLR 2016), in the next-item form used by the sequential-recommendation literature.

Embedding, dropout, a ``layers``-layer GRU of width ``hidden`` and scores against the same item
embedding table (the GRU width equals the embedding width, so no projection is needed).

Left padding: a GRU run over leading padding would start the real items from a state the pads
have already moved away from zero. Each row is therefore rotated to right padding, packed with
its true length (the GRU stops at each row's last item), and rotated back, so position ``L - 1``
holds the state after exactly the real items.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from llmser_ray.config import ModelConfig
from llmser_ray.models.base import SeqRecModel
from llmser_ray.models.sasrec import init_weights


def _rotate(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Roll each row of ``x`` ([B, L, ...]) left by ``shift[b]`` positions."""
    n = x.shape[1]
    idx = (torch.arange(n, device=x.device) + shift.unsqueeze(1)) % n
    idx = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand_as(x)
    return x.gather(1, idx)


class GRU4Rec(SeqRecModel):
    # The packed GRU already runs each row for its real length only; length buckets would add
    # GRU calls and per-call embedding gradients for nothing (measured: 13% more CPU per batch
    # on Beauty, bench/bench_buckets.py).
    bucket_by_length = False

    def __init__(self, cfg: ModelConfig, num_items: int) -> None:
        super().__init__(num_items, cfg.max_len)
        d = cfg.hidden
        self.item_emb = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.drop = nn.Dropout(cfg.dropout)
        self.gru = nn.GRU(d, d, num_layers=cfg.layers, batch_first=True,
                          dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.item_emb.apply(init_weights)

    def forward(self, seqs: torch.Tensor, embeds: torch.Tensor | None = None) -> torch.Tensor:
        seqs = seqs[:, -self.max_len:]
        n = seqs.shape[1]
        lengths = (seqs > 0).sum(1)
        pad = n - lengths
        e = self.item_emb(seqs) if embeds is None else embeds[:, -n:]
        x = _rotate(self.drop(e), pad)  # real items first, padding after
        # Empty rows run one padding step (packing rejects length 0); their outputs are zeroed.
        packed = pack_padded_sequence(x, lengths.clamp_min(1).cpu(), batch_first=True,
                                      enforce_sorted=False)
        out, _ = self.gru(packed)
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=n)
        out = _rotate(out, (n - pad) % n)  # back to left padding
        return self.drop(out) * (seqs > 0).unsqueeze(-1)
