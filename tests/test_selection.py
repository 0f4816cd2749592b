"""Selectors (``augment.selector``) and the selection benchmark (issue 18).

The scoring math, the prompts and the no-LLM selector are tested on hand-made inputs (fast,
seconds). The benchmark's truncation, the selectors and resumption through the real stages (a
reverse model trained and the embed stage run on a small synthetic catalogue: ~2.5 min on two
cores) and the ``score`` selector with the real vLLM engine are marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from llmser_ray.augment.selection import (
    bootstrap_ci,
    expected_random,
    fuse,
    history_similarity,
    judge_skill,
    pmi,
    recall_ndcg,
    simulate_tail_users,
    top_n,
    zscore,
)
from llmser_ray.config import load_config
from llmser_ray.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def _bench(name: str = "selection_benchmark"):
    sys.path.insert(0, str(ROOT / "bench"))
    path = ROOT / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


# ----------------------------------------------------------------------------- the math
def test_spearman_matches_scipy_and_its_interval_covers_it() -> None:
    from scipy.stats import spearmanr

    from llmser_ray.augment.selection import spearman_ci

    rng = np.random.default_rng(3)
    x = rng.integers(0, 6, 400).astype(float)  # many ties, like clipped reliabilities
    y = x + rng.normal(0, 4, 400)
    rho, lo, hi = spearman_ci(x, y)
    assert rho == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    assert lo < rho < hi and hi - lo < 0.25
    noise, nlo, nhi = spearman_ci(x, rng.normal(size=400))
    assert nlo < 0 < nhi and abs(noise) < 0.15
    assert np.isnan(spearman_ci(np.ones(10), np.arange(10.0))[0])  # a constant has no order


def test_arv_signal_reads_a_reliability_that_tracks_the_gain() -> None:
    mod = _bench("arv_signal")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 3000, 500).astype(float)
    helped = rng.random(500)  # the share of the rank the augmentation removed, per user
    aug = np.floor(base * (1 - helped))
    out = mod.signal({"r_u": helped, "r_random": rng.random(500)}, base, aug)
    assert out["users"] == 500 and out["improved_share"] > 0.9
    assert out["r_u"]["rank_gain"]["lo"] > 0.5  # tracks the gain
    assert out["r_random"]["rank_gain"]["lo"] < 0 < out["r_random"]["rank_gain"]["hi"]  # does not
    # A judge with no skill gives every user r_u = 0: no order, reported as null (valid JSON).
    flat = mod.signal({"r_u": np.zeros(500)}, base, aug)["r_u"]["rank_gain"]
    assert flat == {"rho": None, "lo": None, "hi": None}
    json.dumps(flat, allow_nan=False)


def test_arv_signal_refuses_a_reliability_judged_on_other_pseudo_items() -> None:
    check = _bench("arv_signal").same_prefix_mismatches
    read = [np.zeros(0, np.int64), np.array([7, 5, 3]), np.array([4, 2, 1]), np.zeros(0, np.int64)]
    users = np.array([2, 3])
    # The same items in the LLM's order (best first) against the candidates' (best last), with
    # ARV having judged two more stored items: no mismatch.
    assert check(users, [np.array([3, 5, 7, 9, 8]), np.array([1, 2, 4, 6])], read) == 0
    assert check(users, [np.array([3, 5, 9, 7]), np.array([1, 2, 4])], read) == 1  # 9 is not read
    assert check(np.array([4]), [np.array([1, 2, 3])], read) == 1  # the model reads nothing for it




def test_pmi_calibration_prefers_what_the_history_explains() -> None:
    # A generic title the model likes anyway (same likelihood with or without the history) and a
    # specific one the history makes 4x more likely per token: raw likelihood picks the generic
    # one, PMI the specific one.
    cands = np.array([10, 20])
    cond = np.array([-1.0, -2.0])  # mean logprob per title token, after the history
    base = np.array([-1.0, -2.0 - np.log(4)])  # without the history
    assert list(top_n(cands, pmi(cond, base, alpha=0.0), 1)) == [10]
    np.testing.assert_allclose(pmi(cond, base), [0.0, np.log(4)])
    assert list(top_n(cands, pmi(cond, base), 1)) == [20]
    np.testing.assert_allclose(pmi(cond, base, alpha=0.5), cond - 0.5 * base)


def test_top_n_returns_only_candidates_without_duplicates() -> None:
    cands = np.array([5, 3, 5, 0, 9, 3])
    picks = top_n(cands, np.array([1.0, 2.0, 3.0, 9.0, np.nan, 0.5]), 10)
    assert list(picks) == [5, 3, 9]  # 5 at its best score, padding 0 never, NaN last
    assert len(set(picks)) == len(picks) and set(picks) <= set(cands[cands > 0])
    assert list(top_n(cands, np.zeros(6), 2)) == [3, 5]  # ties: by id, not by position
    assert list(top_n(np.array([4, 7]), np.zeros(2), 2, tiebreak=np.array([0.0, 1.0]))) == [7, 4]
    assert len(top_n(np.zeros(0, np.int64), np.zeros(0), 5)) == 0
    with pytest.raises(ValueError):
        top_n(np.array([1, 2]), np.array([1.0]), 1)


def test_pointwise_scores_give_the_same_choice_for_any_order() -> None:
    rng = np.random.default_rng(0)
    cands = rng.choice(np.arange(1, 500), size=20, replace=False)
    per_item = {int(c): float(s) for c, s in zip(cands, np.round(rng.normal(size=20), 1), strict=True)}
    collab = {int(c): float(rng.normal()) for c in cands}
    choices = set()
    for _ in range(30):
        perm = rng.permutation(cands)
        s = np.array([per_item[int(c)] for c in perm])
        t = np.array([collab[int(c)] for c in perm])
        choices.add(tuple(top_n(perm, s, 12, tiebreak=t)))
    assert len(choices) == 1  # rounded scores tie, and the ties too are order-independent


def test_normalisation_fusion_and_history_profile() -> None:
    np.testing.assert_allclose(zscore(np.array([1.0, 2.0, 3.0])), [-1.2247449, 0.0, 1.2247449], rtol=1e-6)
    assert (zscore(np.array([2.0, 2.0])) == 0).all() and (zscore(np.array([np.nan, np.inf])) == 0).all()
    np.testing.assert_allclose(zscore(np.array([0.0, 2.0, -np.inf])), zscore(np.array([0.0, 2.0, 0.0])))
    collab, sem = np.array([3.0, 2.0, 1.0]), np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(fuse(collab, sem, 1.0), zscore(collab))
    np.testing.assert_allclose(fuse(collab, sem, 0.0), zscore(sem))
    vec = np.eye(3)
    assert (history_similarity(vec, np.zeros((0, 3))) == 0).all()  # empty history: no profile
    np.testing.assert_allclose(history_similarity(vec, vec[[1]]), [0, 1, 0])  # one item
    np.testing.assert_allclose(history_similarity(vec, np.zeros((2, 3))), 0)  # history without text


def test_recall_ndcg_and_random_floor() -> None:
    assert recall_ndcg(np.array([1, 2, 3]), {1, 3}, 3)[0] == 1.0
    r, n = recall_ndcg(np.array([9, 1]), {1, 2}, 2)
    assert r == 0.5 and n == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))
    assert np.isnan(recall_ndcg(np.array([1]), set(), 1)[0])
    # 2 of a 4-item pool are true: a random pick of 2 finds 1 on average, recall 1/2.
    assert expected_random(np.array([1, 2, 3, 4]), {1, 2}, 2)[0] == pytest.approx(0.5)
    assert expected_random(np.array([1, 2, 3, 4]), {1, 2}, 4)[0] == pytest.approx(1.0)
    mean, lo, hi = bootstrap_ci(np.array([0.0, 1.0] * 50))
    assert mean == 0.5 and lo < 0.5 < hi


def test_judge_skill_gives_a_chance_judge_weights_near_zero() -> None:
    rng = np.random.default_rng(3)
    sims = rng.uniform(0, 1, size=(4000, 10))  # each user's list: similarity of each item to the hidden one
    rand, best = sims.mean(axis=1), sims.max(axis=1)
    chance = sims[np.arange(4000), rng.integers(0, 10, size=4000)]
    r, s, overall = judge_skill(chance, rand, best)
    assert abs(overall) < 0.03 and r.mean() < 0.03 and (r >= 0).all() and (r <= 1).all()
    assert np.clip(chance, 0, 1).mean() > 0.4  # what the raw cosine would have given this judge
    r, s, overall = judge_skill(best, rand, best)  # a perfect judge
    assert overall == 1.0 and np.allclose(r, 1.0) and np.allclose(s, 1.0)
    good = np.where(rng.uniform(size=4000) < 0.5, best, chance)  # right half the time
    r, _, overall = judge_skill(good, rand, best)
    assert 0.4 < overall < 0.6 and abs(r.mean() - overall) < 1e-9
    assert r[good == best].mean() > r[good != best].mean()  # served users keep higher weights
    r, s, _ = judge_skill(np.array([0.5]), np.array([0.5]), np.array([0.5]))  # nothing to judge
    assert r[0] == 0 and s[0] == 0


def test_simulated_tail_users_hide_their_prior_items() -> None:
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 300, size=int(n)) for n in rng.integers(3, 40, size=200)]
    tail = np.array([1, 1, 2, 3, 5])
    sim = simulate_tail_users(seqs, tail, n_users=40, prior=12, min_prior=3, seed=0)
    assert 0 < len(sim["users"]) <= 40
    for i, vis, truth in zip(sim["users"], sim["visible_len"], sim["truth"], strict=True):
        cut = sim["sequences"][i]
        assert len(cut) == vis + 2 and vis in set(tail.tolist())
        np.testing.assert_array_equal(cut, seqs[i][len(seqs[i]) - len(cut):])  # the most recent items
        assert not set(truth.tolist()) & set(cut.tolist()) and len(truth) >= 3
        held = seqs[i][: len(seqs[i]) - len(cut)]
        assert set(truth.tolist()) <= set(held[-12:].tolist())
    untouched = set(range(200)) - set(sim["users"].tolist())
    assert all(np.array_equal(sim["sequences"][i], seqs[i]) for i in untouched)


def test_selector_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="selector"):
        load_config(None, ["augment.selector=vote"])
    with pytest.raises(ConfigError, match="fusion_weight"):
        load_config(None, ["augment.fusion_weight=1.5"])


def test_score_requests_do_not_depend_on_the_candidate_order() -> None:
    from llmser_ray.stages.select import ScorePrompter

    texts = ["", "red lipstick", "nail polish", "face cream", "hair dryer", "eye shadow"]
    prompter = ScorePrompter(texts, prompt_history=15)

    def requests(cands: list[int], hist: list[int]) -> set[tuple[str, str, str]]:
        out = prompter({"user_id": np.array([7]), "history": [np.array(hist, dtype=np.int64)],
                        "candidates": [np.array(cands, dtype=np.int64)]})
        return {(k, m, c) for k, m, c in zip(out["kind"], out["messages"], out["continuation"], strict=True)}

    a, b = requests([2, 3, 4, 5], [1]), requests([5, 4, 3, 2], [1])
    assert a == b and len(a) == 8  # one conditional and one baseline request per candidate
    for kind, messages, _ in a:  # no prompt names another candidate; the baseline has no history
        assert not any(t in messages for t in texts[2:])
        assert ("red lipstick" in messages) == (kind == "cond")
    empty = requests([2, 3], [])  # an empty history: the conditional prompt IS the baseline
    assert {m for k, m, _ in empty if k == "cond"} == {m for k, m, _ in empty if k == "base"}


# ----------------------------------------------------------------------------- through the stages

SMALL = ["data.synthetic.n_users=300", "data.synthetic.n_items=120", "data.tail_user_threshold=5",
         "model.hidden=16", "model.max_len=20", "model.layers=1", "train.epochs=1", "train.torch_threads=1",
         "ray.num_cpus=4", "ray.include_dashboard=false", "augment.shard_size=4", "augment.num_candidates=10",
         "augment.ask_items=5", "dual.num_pseudo=5", "augment.scorer_batch_size=4",
         "llm.max_tokens=40", "llm.batch_size=40"]


@pytest.fixture(scope="module")
def simulated(tmp_path_factory, ray_local):
    bench = _bench()
    root = tmp_path_factory.mktemp("sel")
    src_cfg = load_config(None, [f"workdir={root / 'source'}", "data.source=synthetic", *SMALL])
    sim = bench.truncated_dataset(src_cfg, SMALL, root / "sim", users=16, prior=6, min_prior=2, seed=0)
    return bench, sim


def _run(bench, sim, selector: str, **augment):
    from llmser_ray.stages.select import select_items

    cfg = bench.selector_cfg(sim["cfg"], selector, sim["users"], **augment)
    return cfg, select_items(cfg)


@pytest.mark.slow
def test_truncation_never_shows_a_held_out_item(simulated) -> None:
    bench, sim = simulated
    from llmser_ray.data.dataset import load_dataset
    from llmser_ray.stages.candidates import generate_candidates

    cfg = bench.selector_cfg(sim["cfg"], "collaborative", sim["users"])
    ds = load_dataset(cfg.workdir_path / "dataset")
    for u in sim["users"]:  # the reverse model trains on these sequences; nothing else exists
        assert not set(ds.sequences[u - 1].tolist()) & set(sim["truth"][u])
    cand = pq.read_table(generate_candidates(cfg).path / "candidates.parquet").to_pydict()
    assert sorted(cand["user_id"]) == sorted(sim["users"])  # augment.user_ids: the simulated users only
    for u, hist in zip(cand["user_id"], cand["history"], strict=True):  # what every prompt shows
        assert not set(hist) & set(sim["truth"][u])


@pytest.mark.slow
@pytest.mark.parametrize("selector", ["collaborative", "embedding", "fusion"])
def test_no_llm_selectors_return_candidates_only(simulated, selector: str) -> None:
    bench, sim = simulated
    cfg, res = _run(bench, sim, selector, fusion_weight=0.3)
    t = pq.read_table(res.path / "augmented.parquet").to_pandas()
    assert len(t) == len(sim["users"]) and res.summary["selector"] == selector
    assert res.summary["users_per_s"] and set(t["status"]) == {"ok"}
    for row in t.itertuples():
        picks = list(row.pseudo_items)
        assert 0 < len(picks) <= 5 and len(set(picks)) == len(picks) and set(picks) <= set(row.candidates)
        assert len(json.loads(row.raw_reply)["scores"]) == len(row.candidates)
        if selector == "collaborative":
            assert picks == list(row.candidates)[: len(picks)]
    assert _run(bench, sim, selector, fusion_weight=0.3)[1].skipped  # cached


def test_selector_handles_empty_and_one_item_histories() -> None:
    from llmser_ray.stages.select import RankSelector

    vecs = np.eye(6)
    for selector in ("embedding", "fusion", "collaborative"):
        sel = RankSelector(selector, 3, 15, 0.5, vecs)
        out = sel({"user_id": np.array([1, 2]), "history": [np.zeros(0, np.int64), np.array([2])],
                   "candidates": [np.array([3, 4, 5]), np.array([2, 5])],
                   "scores": [np.array([0.3, 0.2, 0.1]), np.array([1.0, 0.5])]})
        assert list(out["pseudo_items"][0]) == [3, 4, 5]  # no profile: the reverse model's order
        assert sorted(out["pseudo_items"][1]) == [2, 5]


@pytest.mark.slow
def test_killed_selection_resumes_without_redoing_users(simulated, monkeypatch) -> None:
    bench, sim = simulated
    from llmser_ray.augment import shards

    class Killed(Exception):
        pass

    real = shards.ShardWriter._write
    calls = {"n": 0}

    def die_after_first(self, shard: int) -> None:
        real(self, shard)
        calls["n"] += 1
        if calls["n"] == 1:
            raise Killed

    monkeypatch.setattr(shards.ShardWriter, "_write", die_after_first)
    with pytest.raises(Killed):
        _run(bench, sim, "fusion", fusion_weight=0.8)
    monkeypatch.setattr(shards.ShardWriter, "_write", real)
    _, res = _run(bench, sim, "fusion", fusion_weight=0.8)
    assert res.summary["reused_shards"] == 1
    assert res.summary["users_processed_now"] == len(sim["users"]) - 4  # one shard of 4 not redone
    assert res.summary["users"] == len(sim["users"])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_score_selector_with_vllm_is_order_independent(simulated) -> None:
    bench, sim = simulated
    from llmser_ray.stages.select import select_items

    cfg, res = _run(bench, sim, "score")
    t = pq.read_table(res.path / "augmented.parquet").to_pandas()
    assert set(t["status"]) == {"ok"} and res.summary["users_per_s"]
    for row in t.itertuples():
        picks = list(row.pseudo_items)
        assert len(picks) == min(5, len(row.candidates)) and set(picks) <= set(row.candidates)
        assert len(set(picks)) == len(picks)
    # The same candidates listed in reverse order: the same choice (replies from the cache).
    cand_file = cfg.workdir_path / "candidates" / "candidates.parquet"
    c = pq.read_table(cand_file)
    rev = c.set_column(2, "candidates", pa.array([x[::-1] for x in c.column("candidates").to_pylist()],
                                                 pa.list_(pa.int64())))
    rev = rev.set_column(3, "scores", pa.array([x[::-1] for x in c.column("scores").to_pylist()],
                                               pa.list_(pa.float32())))
    pq.write_table(rev, cand_file)
    again = pq.read_table(select_items(cfg, force=True).path / "augmented.parquet").to_pandas()
    assert [list(p) for p in again["pseudo_items"]] == [list(p) for p in t["pseudo_items"]]
    pq.write_table(c, cand_file)


def test_ablation_tables_cover_every_seed_in_the_workdir(tmp_path: Path) -> None:
    mod = _bench("quality_ablation")
    for name in ("sasrec", "sasrec-reverse", "sasrec-s43", "sasrec-candidates-s42",
                 "sasrec-candidates-context-s44", "sasrec-llmser-s7"):
        (tmp_path / "models" / name).mkdir(parents=True)
    # A run with --seeds 45 still tabulates every seed finished before (the reverse model and
    # the upstream seed's baseline "sasrec" name none).
    assert mod.workdir_seeds(str(tmp_path), [45]) == [7, 42, 43, 44, 45]
    assert mod.variant_of("candidates-context-s44") == "candidates-context"


def test_ablation_arms_configure_what_their_names_say(tmp_path: Path) -> None:
    mod = _bench("quality_ablation")
    args = mod.argparse.Namespace(workdir=str(tmp_path), data=tmp_path / "Beauty.txt", max_len=None,
                                  epochs=5, patience=2, num_pseudo=12, beta=0.5, max_users=None, set=[])
    arms = {v: mod.variant_config(args, 42, v) for v in mod.VARIANTS}
    got = {v: (c.dual.enabled and c.dual.pseudo_source, c.dual.enabled and c.dual.pseudo_targets,
               c.semantic.enabled) for v, c in arms.items()}
    assert got == {"baseline": (False, False, False), "candidates": ("candidates", True, False),
                   "llmser": ("llm", True, False), "candidates-context": ("candidates", False, False),
                   "llmser-context": ("llm", False, False), "dualview": (False, False, True),
                   "candidates-context-dualview": ("candidates", False, True),
                   "llmser-context-dualview": ("llm", False, True)}
    assert {c.train.seed for c in arms.values()} == {42}
