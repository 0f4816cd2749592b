"""Left padding: the newest item sits at the last position, as SASRec-family models expect."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def pad_left(seqs: Sequence[np.ndarray], length: int) -> np.ndarray:
    """Stack sequences into an int64 [N, length] array, keeping the last ``length`` items.

    Position ``length - 1`` holds each sequence's newest item; 0 pads on the left.
    """
    out = np.zeros((len(seqs), length), dtype=np.int64)
    for i, s in enumerate(seqs):
        tail = np.asarray(s, dtype=np.int64)[-length:]
        if len(tail):
            out[i, length - len(tail):] = tail
    return out
