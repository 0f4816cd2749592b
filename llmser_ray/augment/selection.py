"""The scoring math of the selectors (``augment.selector``): pure NumPy, no stage, no model.

Why a module of its own: every selector ends the same way (one score per candidate -> the N best
candidate ids, never a duplicate, never an id that is not a candidate), and the parts that decide
a selection's quality (PMI calibration, per-user normalisation, fusion) must be testable on
hand-made numbers, independently of an LLM, an embedding model or Ray.

Order independence: :func:`top_n` breaks ties by candidate id, not by position in the list, so a
selector whose scores do not depend on the order shown (``score``, ``embedding``) gives the same
choice for any permutation of the same candidates. ``collaborative`` is the one selector that is
*defined* by an order (the reverse model's rank, which its ``scores`` column carries).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def pmi(cond_logprob: np.ndarray, base_logprob: np.ndarray, alpha: float = 1.0) -> np.ndarray:
    """Calibrated LLM score of each candidate title: ``log p(t | history) - alpha * log p(t)``.

    Both terms are the MEAN log-probability per title token (length-normalised), so a long title
    is not penalised for having more tokens. The baseline ``log p(t)`` is the title's likelihood
    under the same prompt without the user's history: it removes what the model thinks of the
    title anyway (short, generic, frequent words), which otherwise dominates the ranking and is
    the same for every user. ``alpha = 0`` is the uncalibrated likelihood, ``1`` the pointwise
    mutual information (per token).
    """
    return np.asarray(cond_logprob, dtype=np.float64) - alpha * np.asarray(base_logprob, dtype=np.float64)


def zscore(x: np.ndarray) -> np.ndarray:
    """Per-user standardisation of one score vector, so two scores on different scales (reverse
    model logits, cosines) can be added. A constant vector (one candidate, or no information)
    becomes all zeros: it then contributes nothing to a fusion instead of dividing by zero.
    Non-finite entries are treated as the worst score."""
    x = np.asarray(x, dtype=np.float64).copy()
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros_like(x)
    x[~finite] = x[finite].min()
    sd = x.std()
    return np.zeros_like(x) if sd < 1e-12 else (x - x.mean()) / sd


def rank_scores(n: int) -> np.ndarray:
    """A score that reproduces a given order (the first is best): ``n, n-1, ..., 1``."""
    return np.arange(n, 0, -1, dtype=np.float64)


def fuse(collaborative: np.ndarray, semantic: np.ndarray, weight: float) -> np.ndarray:
    """``weight * z(collaborative) + (1 - weight) * z(semantic)``; weight 1 is the collaborative
    order, 0 the semantic one."""
    return weight * zscore(collaborative) + (1.0 - weight) * zscore(semantic)


def top_n(candidates: np.ndarray, scores: np.ndarray, n: int,
          tiebreak: np.ndarray | None = None) -> np.ndarray:
    """The ``n`` best candidate ids by score, best first, without duplicates.

    Ties (and NaN, which counts as worst) are broken by ``tiebreak`` (a second score attached to
    each candidate, e.g. the reverse model's), then by the smaller candidate id, never by the
    position in the list, so the choice does not depend on the order the candidates came in.
    A candidate listed twice counts once (its best score). Id 0 (padding) is never returned.
    """
    cands = np.asarray(candidates, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    t = np.zeros(len(cands)) if tiebreak is None else np.asarray(tiebreak, dtype=np.float64)
    if cands.shape != s.shape or cands.shape != t.shape:
        raise ValueError(f"{len(cands)} candidates but {len(s)} scores / {len(t)} tie-breaks")
    s = np.where(np.isnan(s), -np.inf, s)
    t = np.where(np.isnan(t), -np.inf, t)
    keep = cands > 0
    cands, s, t = cands[keep], s[keep], t[keep]
    order = np.lexsort((cands, -t, -s))  # score descending, then tie-break descending, then id
    seen: set[int] = set()
    out: list[int] = []
    for i in order:
        c = int(cands[i])
        if c in seen:
            continue
        seen.add(c)
        out.append(c)
        if len(out) == n:
            break
    return np.asarray(out, dtype=np.int64)


def history_similarity(cand_vecs: np.ndarray, hist_vecs: np.ndarray) -> np.ndarray:
    """Cosine of each candidate's (L2-normalised) text vector to the user's history profile, the
    normalised mean of the history's vectors. An empty history (or one without text) has no
    profile: every candidate gets 0, and the selectors fall back on their tie-break."""
    if len(hist_vecs) == 0 or len(cand_vecs) == 0:
        return np.zeros(len(cand_vecs))
    profile = np.asarray(hist_vecs, dtype=np.float64).mean(axis=0)
    norm = np.linalg.norm(profile)
    if norm < 1e-12:
        return np.zeros(len(cand_vecs))
    return np.asarray(cand_vecs, dtype=np.float64) @ (profile / norm)


def recall_ndcg(picks: np.ndarray, truth: set[int], n: int) -> tuple[float, float]:
    """Recall@n (hits / |truth|) and NDCG@n (binary gains, ideal = min(|truth|, n) hits first)
    of a ranked pick list against a set of true items; (nan, nan) for an empty truth."""
    if not truth:
        return float("nan"), float("nan")
    picks = list(picks)[:n]
    hits = np.array([int(p) in truth for p in picks], dtype=np.float64)
    disc = 1.0 / np.log2(np.arange(2, len(picks) + 2))
    dcg = float((hits * disc).sum()) if len(picks) else 0.0
    ideal = float((1.0 / np.log2(np.arange(2, min(len(truth), n) + 2))).sum())
    return float(hits.sum() / len(truth)), dcg / ideal


def simulate_tail_users(sequences: list[np.ndarray], tail_lengths: np.ndarray, n_users: int, prior: int,
                        min_prior: int, seed: int) -> dict[str, Any]:
    """Simulated tail users whose true prior items are known (the selection benchmark).

    Each long user (leave-one-out training part longer than any tail length) gets a visible
    training length ``L`` drawn from ``tail_lengths`` (the real tail users' training lengths);
    the user's sequence is cut to its last ``L`` training items plus the validation and test
    items, and the up to ``prior`` training items right before the cut are the ground truth,
    less any item that is still visible (a repeat purchase is not a hidden prior). Users left
    with fewer than ``min_prior`` true items are not simulated. Returns the chosen users (0-based
    indices into ``sequences``), their ``L``, their truncated sequences and their truth, and the
    full list of truncated sequences for every user (others unchanged): nothing before the cut
    of a simulated user is in it, so neither a model trained on it nor a prompt built from it can
    see a held-out interaction.
    """
    rng = np.random.default_rng(seed)
    tail_lengths = np.asarray(tail_lengths, dtype=np.int64)
    if len(tail_lengths) == 0:
        raise ValueError("no tail users to draw visible lengths from")
    longest_tail = int(tail_lengths.max())
    long_users = [i for i, s in enumerate(sequences) if len(s) - 2 > longest_tail]
    order = rng.permutation(len(long_users))
    chosen, lengths, truths = [], [], []
    for j in order:
        i = long_users[j]
        s = np.asarray(sequences[i], dtype=np.int64)
        visible_len = int(rng.choice(tail_lengths))
        cut = len(s) - 2 - visible_len
        visible = set(s[cut:].tolist())
        window = s[max(0, cut - prior):cut]
        truth = np.asarray(list(dict.fromkeys(int(x) for x in window[::-1] if int(x) not in visible)),
                           dtype=np.int64)  # nearest first, no repeats
        if len(truth) < min_prior:
            continue
        chosen.append(i)
        lengths.append(visible_len)
        truths.append(truth)
        if len(chosen) == n_users:
            break
    truncated = [np.asarray(s, dtype=np.int64) for s in sequences]
    for i, visible_len in zip(chosen, lengths, strict=True):
        truncated[i] = truncated[i][len(truncated[i]) - 2 - visible_len:]
    return {"users": np.asarray(chosen, dtype=np.int64), "visible_len": np.asarray(lengths, dtype=np.int64),
            "truth": truths, "sequences": truncated}


def expected_random(pool: np.ndarray, truth: set[int], n: int) -> tuple[float, float]:
    """Expected recall@n and NDCG@n of n candidates drawn uniformly at random (without
    replacement) from ``pool``: every position holds a true item with probability h / K."""
    if not truth:
        return float("nan"), float("nan")
    k = len(pool)
    if k == 0:
        return 0.0, 0.0
    h = sum(int(p) in truth for p in set(int(x) for x in pool))
    m = min(n, k)
    disc = 1.0 / np.log2(np.arange(2, m + 2))
    ideal = float((1.0 / np.log2(np.arange(2, min(len(truth), n) + 2))).sum())
    return h * m / k / len(truth), float((h / k) * disc.sum()) / ideal


def bootstrap_ci(values: np.ndarray, seed: int = 0, rounds: int = 2000,
                 level: float = 0.95) -> tuple[float, float, float]:
    """Mean and percentile-bootstrap interval over users (NaN users, i.e. without truth, dropped)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), size=(rounds, len(v)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(v.mean()), float(lo), float(hi)


def bootstrap_ratio(a: np.ndarray, b: np.ndarray, seed: int = 0, rounds: int = 2000,
                    level: float = 0.95) -> tuple[float, float, float]:
    """mean(a) / mean(b) over the same users, with a paired percentile-bootstrap interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) == 0 or b.sum() == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(rounds, len(a)))
    ratios = a[idx].mean(axis=1) / np.maximum(b[idx].mean(axis=1), 1e-12)
    lo, hi = np.quantile(ratios, [(1 - level) / 2, 1 - (1 - level) / 2])
    return float(a.mean() / b.mean()), float(lo), float(hi)


def spearman_ci(x: np.ndarray, y: np.ndarray, seed: int = 0, rounds: int = 2000,
                level: float = 0.95) -> tuple[float, float, float]:
    """Spearman's rank correlation of paired per-user values with a percentile-bootstrap interval
    over users: whether a per-user reliability (ARV's r_u) orders users by what the augmentation
    did for them. Ties get their average rank; pairs with a non-finite value are dropped."""
    from scipy.stats import rankdata  # imported here: only this analysis needs it

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3:
        return float("nan"), float("nan"), float("nan")

    def corr(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # Pearson of the ranks, per row
        a, b = rankdata(a, axis=-1), rankdata(b, axis=-1)
        a = a - a.mean(axis=-1, keepdims=True)
        b = b - b.mean(axis=-1, keepdims=True)
        den = np.sqrt((a * a).sum(axis=-1) * (b * b).sum(axis=-1))
        return np.where(den > 0, (a * b).sum(axis=-1) / np.where(den > 0, den, 1.0), np.nan)

    rho = float(corr(x, y))
    rng = np.random.default_rng(seed)
    chunks = [min(100, rounds - start) for start in range(0, rounds, 100)]  # bounded memory
    boot = np.concatenate([corr(x[i], y[i]) for i in
                           (rng.integers(0, len(x), size=(c, len(x))) for c in chunks)])
    boot = boot[np.isfinite(boot)]
    if len(boot) == 0:
        return rho, float("nan"), float("nan")
    lo, hi = np.quantile(boot, [(1 - level) / 2, 1 - (1 - level) / 2])
    return rho, float(lo), float(hi)


def judge_skill(picked_sim: np.ndarray, random_sim: np.ndarray, best_sim: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, float]:
    """ARV's reliability as the judge's skill over a random pick from the same list.

    Per user, ``s_u = (sim(picked, hidden) - mean_c sim(c, hidden)) / (max_c sim(c, hidden) -
    mean_c sim(c, hidden))``: 0 for the similarity a uniformly random pick of the list gets on
    average, 1 for the best pick the list allows (a list whose items are all equally similar
    leaves nothing to judge: 0). The raw cosine measured mostly the forward model's list, not
    the judge (docs/AUGMENTATION.md: a random pick scored 0.338 against ARV's 0.325).

    One pick per user is noisy and clipping it at 0 would hand a useless judge positive weights
    (half its users beat the random pick by chance), so the clipped per-user skills are rescaled
    to average the judge's overall skill, ``S = mean_u s_u`` (unclipped, itself clipped to
    [0, 1]): ``r_u = clip(s_u, 0, 1) * S / mean_u clip(s_u, 0, 1)``. A judge no better than
    chance gets weights near 0 for everyone; a perfect one keeps ``r_u = s_u = 1``; users the
    judge served better keep higher weights than the others. Returns (r_u, s_u, S).
    """
    picked_sim = np.asarray(picked_sim, dtype=np.float64)
    random_sim = np.asarray(random_sim, dtype=np.float64)
    best_sim = np.asarray(best_sim, dtype=np.float64)
    spread = best_sim - random_sim
    s = np.where(spread > 1e-9, (picked_sim - random_sim) / np.where(spread > 1e-9, spread, 1.0), 0.0)
    if len(s) == 0:
        return s, s, 0.0
    overall = float(np.clip(s.mean(), 0.0, 1.0))
    clipped = np.clip(s, 0.0, 1.0)
    scale = overall / clipped.mean() if clipped.mean() > 1e-12 else 0.0
    return clipped * scale, s, overall


def mean_logprob(reply: str) -> float:
    """Mean log-probability per token of a scoring reply (``{"logprob_sum", "tokens"}``, the
    llm layer's answer to a request with a ``continuation``); NaN for a failed or odd reply, which
    ranks last. Per token, so a long title is not penalised for its length."""
    import json

    try:
        d = json.loads(reply)
        return float(d["logprob_sum"]) / max(int(d["tokens"]), 1)
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        return float("nan")
