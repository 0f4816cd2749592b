"""Top-K scoring of many users by a trained backbone, as a Ray Data actor pool.

Used twice: the collaborative candidate generator (the reverse model reading each user's
history backwards) and ARV (the forward model reading the augmented prefix). Each actor loads
the model once from safetensors; Ray Data streams user batches through the pool, so the same
code scores Beauty on a laptop and ten million users across a cluster's GPUs.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llmser_ray.data.padding import pad_left


def topk_scores(model: Any, inputs: list[np.ndarray], exclude: list[np.ndarray], k: int,
                device: str = "cpu", batch_size: int = 512, trim: bool = False
                ) -> tuple[np.ndarray, np.ndarray]:
    """``[n, k]`` best items (and scores) per input, never padding, an excluded item or a NaN
    score; slots beyond the eligible items hold item 0 and score -inf.

    The one top-k of the project: the augmentation stages score every user with it, and the
    server scores each request batch with it (``serving.state``), so a served ranking is the
    stage's ranking. ``trim`` pads each batch only to its longest input (at most
    ``model.max_len``) instead of ``model.max_len``: the same scores up to float rounding, and
    far less work for the short ad-hoc histories a server sees.
    """
    n = len(inputs)
    items = np.zeros((n, k), dtype=np.int64)
    scores = np.full((n, k), -np.inf, dtype=np.float32)
    model.eval()
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            stop = min(start + batch_size, n)
            chunk = inputs[start:stop]
            width = max(1, min(model.max_len, max(len(x) for x in chunk))) if trim else model.max_len
            seqs = torch.from_numpy(pad_left(chunk, width)).to(device)
            s = model.score_all(seqs).float()
            s.masked_fill_(s.isnan(), -torch.inf)
            s[:, 0] = -torch.inf
            ex = exclude[start:stop]
            longest = max((len(e) for e in ex), default=0)
            if longest:
                mask = torch.from_numpy(pad_left(ex, longest)).to(device)
                s.scatter_(1, mask, -torch.inf)
                s[:, 0] = -torch.inf
            top = torch.topk(s, min(k, s.shape[1] - 1), dim=1)
            items[start:stop, : top.indices.shape[1]] = top.indices.cpu().numpy()
            scores[start:stop, : top.values.shape[1]] = top.values.cpu().numpy()
    items[~np.isfinite(scores)] = 0  # fewer than k eligible items
    return items, scores


class TopKScorer:
    """Ray Data callable class: ``inputs`` (+ optional ``exclude``) columns -> ``topk``/``topk_scores``."""

    def __init__(self, model_dir: str, k: int, torch_threads: int = 1) -> None:
        from llmser_ray.models.checkpoint import load_trained

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model, _ = load_trained(model_dir)
        self.model.to(self.device)
        self.k = k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        inputs = [np.asarray(x, dtype=np.int64) for x in batch["inputs"]]
        exclude = ([np.asarray(x, dtype=np.int64) for x in batch["exclude"]]
                   if "exclude" in batch else [np.zeros(0, np.int64)] * len(inputs))
        items, scores = topk_scores(self.model, inputs, exclude, self.k, self.device)
        out = dict(batch)
        out["topk"] = list(items)
        out["topk_scores"] = list(scores)
        return out
