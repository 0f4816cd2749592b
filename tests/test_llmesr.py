"""LLM-ESR (issue 19): the dual view, its PCA initialisation, the users' neighbours, the
self-distillation term, the checkpoint round trip and the refusals of bad input. All small and
CPU-only (a few seconds in all)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llmser_ray.config import Config, ModelConfig, SemanticConfig, load_config
from llmser_ray.errors import ConfigError
from llmser_ray.models import build_model
from llmser_ray.models.batching import training_batch
from llmser_ray.models.checkpoint import load_trained, write_trained
from llmser_ray.models.dualview import DualView, check_text_table, pca_projection
from llmser_ray.models.losses import Distillation, Objective
from llmser_ray.stages.train import LossModule, _run_key, default_name, resolve_semantic, step_loss
from llmser_ray.stages.user_neighbours import nearest_users

NUM_ITEMS, TEXT_DIM = 30, 24
BACKBONES = ["sasrec", "bert4rec", "gru4rec"]
SEQS = torch.tensor([[0, 0, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10], [0, 0, 0, 0, 3, 4], [0, 0, 0, 11, 30, 2]])


def _text(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.nn.functional.normalize(torch.randn(NUM_ITEMS + 1, TEXT_DIM, generator=g), dim=1)
    t[0] = 0
    return t


def _dual(backbone: str = "sasrec", **semantic: object) -> DualView:
    torch.manual_seed(0)
    cfg = ModelConfig(backbone=backbone, hidden=16, max_len=6, dropout=0.1)
    model = build_model(cfg, NUM_ITEMS, SemanticConfig(enabled=True, **semantic), _text())
    assert isinstance(model, DualView)
    return model


@pytest.mark.parametrize("backbone", BACKBONES)
def test_frozen_text_gets_no_gradient_and_the_adapter_does(backbone: str) -> None:
    model = _dual(backbone)
    stats = LossModule(model)(SEQS, Objective(), torch.Generator().manual_seed(0))
    Objective().batch_loss(stats).backward()
    assert not model.text.weight.requires_grad and model.text.weight.grad is None
    for p in model.adapter.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert model.item_emb.weight.grad is not None  # the collaborative view trains as usual
    assert model.score_all(SEQS).shape == (len(SEQS), NUM_ITEMS + 1)
    assert model.item_embeddings().shape == (NUM_ITEMS + 1, 32)  # both views, concatenated
    assert torch.equal(model.item_embeddings()[0], torch.zeros(32))  # padding stays zero
    # Unfrozen, the text table trains too.
    free = _dual(backbone, freeze=False)
    Objective().batch_loss(LossModule(free)(SEQS, Objective(), None)).backward()
    assert free.text.weight.grad is not None and free.text.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("backbone", BACKBONES)
def test_cross_attention_fusion_trains_and_stays_causal(backbone: str) -> None:
    model = _dual(backbone, fusion="cross_attention")
    Objective().batch_loss(LossModule(model)(SEQS, Objective(), None)).backward()
    for p in model.cross.parameters():
        assert p.grad is not None
    model.eval()
    a, b = SEQS.clone(), SEQS.clone()
    b[:, -1] = 12  # change only the newest item
    ha, hb = model(a), model(b)
    if model.causal:  # no position before the last may see the change, through either view
        assert torch.allclose(ha[:, :-1], hb[:, :-1], atol=1e-6)
    assert not torch.allclose(ha[:, -1], hb[:, -1])


def test_adapter_product_is_the_two_layers() -> None:
    """The adapter runs as its layers' product (3x cheaper): the same function."""
    model = _dual()
    text = _text()
    sequential = model.adapter(text)
    assert torch.allclose(model.adapt(text), sequential, atol=1e-6)


def test_pca_initialisation_matches_numpy() -> None:
    text = _text().numpy()[1:]
    proj = pca_projection(text, 16)
    # Independent: eigenvectors of the covariance, compared up to each axis's sign.
    centred = text.astype(np.float64) - text.mean(0)
    vals, vecs = np.linalg.eigh(centred.T @ centred)
    ref = centred @ vecs[:, np.argsort(vals)[::-1][:16]]
    signs = np.sign((proj * ref).sum(0))
    np.testing.assert_allclose(proj, ref * signs, atol=1e-5)
    model = _dual()
    assert np.allclose(model.item_emb.weight[1:].detach().numpy(), proj, atol=1e-6)
    assert torch.equal(model.item_emb.weight[0], torch.zeros(16))
    # Without pca_init the backbone keeps its N(0, 0.02) start, the same as a plain run.
    torch.manual_seed(0)
    plain = build_model(ModelConfig(hidden=16, max_len=6, dropout=0.1), NUM_ITEMS)
    assert torch.equal(_dual(pca_init=False).item_emb.weight, plain.item_emb.weight)


def test_neighbours_exclude_the_user_even_with_duplicates() -> None:
    rng = np.random.default_rng(0)
    v = rng.normal(size=(50, 8)).astype(np.float32)
    v[7] = v[3]  # two users with the same history text
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    ids, sims = nearest_users(v, 10)
    assert ids.shape == (50, 10)
    assert all((ids[u] != u + 1).all() for u in range(50))
    assert ids[3, 0] == 8 and ids[7, 0] == 4  # the duplicate is the best neighbour, kept
    assert (np.diff(sims, axis=1) <= 1e-6).all()
    exact = np.argsort(-(v @ v.T), axis=1)[:, 1:11] + 1
    assert (ids[:, :5] == exact[:, :5]).mean() > 0.95  # ties aside, the exact nearest


def _distill_batch() -> tuple[LossModule, object, Distillation]:
    model = _dual()
    seqs = [np.arange(1, 6), np.arange(3, 9), np.array([4, 5, 6]), np.array([2, 9, 11, 12])]
    users = np.array([1, 2, 3, 4])
    batch = training_batch(np.arange(4), seqs, 6, users=users)
    neighbours = torch.tensor([[0, 0], [2, 3], [1, 4], [1, 2], [3, 0]])
    return LossModule(model).eval(), batch, Distillation(neighbours, torch.ones(5, dtype=torch.bool), 0.1)


def test_alpha_zero_is_exactly_the_plain_loss_and_alpha_adds_the_mse() -> None:
    wrapped, batch, distill = _distill_batch()
    plain = step_loss(wrapped, batch, Objective(), None)
    for alpha in (0.0, 0.1):
        d = Distillation(distill.neighbours, distill.applies, alpha)
        first = step_loss(wrapped, batch, Objective(), None, d)  # bank empty: no term yet
        assert torch.equal(first, plain)
        second = step_loss(wrapped, batch, Objective(), None, d)
        if alpha == 0:
            assert torch.equal(second, plain)
            continue
        # By hand: every user's state against its neighbours' mean state from the bank.
        _, states = wrapped(batch.seqs, Objective(), None, True)
        states = states.detach()
        target = torch.stack([states[[1, 2]].mean(0), states[[0, 3]].mean(0), states[[0, 1]].mean(0),
                              states[2]])
        expected = plain + alpha * ((states - target) ** 2).mean()
        assert torch.allclose(second, expected, atol=1e-6)


def test_distillation_for_tail_users_only_and_gradient_flows() -> None:
    wrapped, batch, distill = _distill_batch()
    only_2 = Distillation(distill.neighbours, torch.tensor([False, False, True, False, False]), 1.0)
    step_loss(wrapped, batch, Objective(), None, only_2)
    wrapped.train()
    loss = step_loss(wrapped, batch, Objective(), None, only_2)
    plain = step_loss(wrapped.eval(), batch, Objective(), None)
    assert loss.item() != pytest.approx(plain.item())
    loss.backward()
    assert wrapped.model.adapter[0].weight.grad is not None


@pytest.mark.parametrize("backbone", BACKBONES)
def test_checkpoint_round_trips_in_safetensors(tmp_path: Path, backbone: str) -> None:
    model = _dual(backbone).eval()
    best = tmp_path / "best"
    best.mkdir()
    semantic = SemanticConfig(enabled=True)
    write_trained(best, model.state_dict(),
                  {"model": ModelConfig(backbone=backbone, hidden=16, max_len=6, dropout=0.1)
                   .model_dump(mode="json"), "num_items": NUM_ITEMS, "epoch": 1,
                   "semantic": semantic.model_dump(mode="json")})
    loaded, meta = load_trained(tmp_path)
    assert isinstance(loaded, DualView) and meta["semantic"]["enabled"]
    assert torch.equal(loaded.text.weight, model.text.weight)  # the frozen table travelled
    assert torch.equal(loaded.score_all(SEQS), model.score_all(SEQS))
    assert not (best / "model.json").read_text().count("pickle")
    assert json.loads((best / "model.json").read_text())["num_items"] == NUM_ITEMS


def test_bad_text_tables_get_one_line_errors() -> None:
    sem = SemanticConfig(enabled=True)
    good = _text().numpy()
    check_text_table(good, NUM_ITEMS, 16, sem, "embeddings/")
    with pytest.raises(ConfigError, match="29 item vectors but the dataset has 30"):
        check_text_table(good[:-1], NUM_ITEMS, 16, sem, "embeddings/")
    with pytest.raises(ConfigError, match="too few for a 32-d PCA"):
        check_text_table(good, NUM_ITEMS, 32, sem, "embeddings/")
    check_text_table(good, NUM_ITEMS, 32, SemanticConfig(enabled=True, pca_init=False), "e/")
    with pytest.raises(ConfigError, match=r"not \[items \+ 1, dim\]"):
        check_text_table(good[:, 0], NUM_ITEMS, 16, sem, "embeddings/")
    empty = good.copy()
    empty[5] = 0
    with pytest.raises(ConfigError, match="1 items have no text.*item 5") as err:
        check_text_table(empty, NUM_ITEMS, 16, sem, "embeddings/")
    assert "\n" not in str(err.value)
    check_text_table(empty, NUM_ITEMS, 16, SemanticConfig(enabled=True, missing_text="allow"), "e/")
    with pytest.raises(ValueError, match="29 item rows"):
        DualView(build_model(ModelConfig(hidden=16, max_len=6), NUM_ITEMS), _text()[:-1], sem)


def test_config_sections_and_run_key() -> None:
    with pytest.raises(ConfigError, match="distill.k"):
        load_config(overrides=["distill.k=20", "distill.retrieve=10"])
    cfg = Config()
    # The dual view is decided against the data (test_semantic_auto_...); distillation is off.
    assert cfg.semantic.enabled == "auto" and not cfg.distill.enabled
    with pytest.raises(RuntimeError, match="resolved"):  # never silently read as on or off
        default_name(cfg)
    cfg = cfg.model_copy(update={"semantic": SemanticConfig(enabled=False)})
    manifest = {"config_digest": "d" * 16}
    plain = _run_key(cfg, manifest)
    on = cfg.model_copy(update={"semantic": SemanticConfig(enabled=True)})
    assert _run_key(cfg.model_copy(update={"semantic": SemanticConfig(enabled=False, adapter_hidden=7)}),
                    manifest) == plain  # a disabled section does not change existing keys
    assert _run_key(on, manifest) != plain
    assert default_name(on) == "sasrec-dualview"


def test_tune_can_search_alpha_but_not_the_neighbours_stage() -> None:
    from llmser_ray.stages.tune import check_search, experiment_name, trial_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "tune_configs" / "llmesr_beauty.yaml")
    check_search(cfg)
    trial = trial_config(cfg.model_dump(mode="json"), {"distill.alpha": 0.5, "distill.users": "tail"})
    assert trial.distill.alpha == 0.5 and trial.semantic.enabled and not trial.dual.enabled
    other = cfg.model_copy(update={"semantic": cfg.semantic.model_copy(update={"freeze": False})})
    assert experiment_name(other) != experiment_name(cfg)  # LLM-ESR sections are its identity
    bad = load_config(overrides=["tune.search={distill.retrieve: {grid: [50, 100]}}"])
    with pytest.raises(ConfigError, match="cached upstream stage"):
        check_search(bad)


def test_serving_loads_the_dual_view_and_scores_a_cold_item_from_its_text(tmp_path: Path) -> None:
    """A cold item (its ID row never trained: zero) still scores, through its text: its score
    is exactly its semantic part, and without text it would be exactly zero."""
    import asyncio

    import httpx

    from llmser_ray.data.dataset import load_dataset
    from llmser_ray.serving import bare_app
    from llmser_ray.stages.prepare import prepare

    cfg = load_config(None, [f"workdir={tmp_path}", "data.synthetic.n_users=40",
                             "data.synthetic.n_items=30", "serve.max_k=100"])
    prepare(cfg)
    ds = load_dataset(tmp_path / "dataset")
    n = ds.num_items
    g = torch.Generator().manual_seed(1)
    text = torch.nn.functional.normalize(torch.randn(n + 1, TEXT_DIM, generator=g), dim=1)
    text[0] = 0
    mcfg = ModelConfig(hidden=16, max_len=8, dropout=0.1)
    torch.manual_seed(0)
    model = build_model(mcfg, n, SemanticConfig(enabled=True), text).eval()
    cold = 7
    with torch.no_grad():
        model.item_emb.weight[cold] = 0  # never interacted with: no collaborative signal
    best = tmp_path / "models" / "sasrec-dualview" / "best"
    best.mkdir(parents=True)
    write_trained(best, model.state_dict(), {"model": mcfg.model_dump(mode="json"), "num_items": n,
                                             "epoch": 1, "semantic": {"enabled": True}})
    app = bare_app(cfg.model_copy(update={"serve": cfg.serve.model_copy(
        update={"model": "sasrec-dualview"})}))
    history = [1, 2, 3]

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.post("/recommend", json={"item_ids": history, "k": n})

    r = asyncio.run(go())
    assert r.status_code == 200, r.text
    scores = {it["item_id"]: it["score"] for it in r.json()["items"]}
    assert cold in scores and r.json()["model"] == "sasrec-dualview"
    seqs = torch.tensor([history])
    with torch.no_grad():
        h = model.user_repr(seqs)[0]
        semantic_part = float(h[16:] @ model.item_embeddings()[cold, 16:])
    assert scores[cold] == pytest.approx(semantic_part, abs=1e-5) and semantic_part != 0


ALL_TEXT = {"counts": {"items": 30, "items_with_text": 30}}


@pytest.mark.parametrize(("sets", "manifest", "on", "why"), [
    ([], ALL_TEXT, True, "dual view on"),
    (["model.backbone=gru4rec"], ALL_TEXT, False, "measured for sasrec only"),
    (["model.backbone=bert4rec"], ALL_TEXT, False, "measured for sasrec only"),
    (["train.reverse=true"], ALL_TEXT, False, "reverse"),
    (["dual.enabled=true"], ALL_TEXT, False, "dual-channel"),
    (["tslrec.init_backbone=true"], ALL_TEXT, False, "tslrec.init_backbone"),
    ([], {"counts": {"items": 30, "items_with_text": 0}}, False, "no item text"),
    ([], {"counts": {"items": 30, "items_with_text": 29}}, False, "1 of 30 items have no text"),
    ([], {}, False, "no item text"),
])
def test_semantic_auto_follows_what_was_measured(sets: list[str], manifest: dict, on: bool, why: str) -> None:
    """The default turns the dual view on exactly where it was measured better (SASRec trained
    by itself on data whose every item has text) and says why either way; an explicit value is
    never overridden."""
    cfg, reason = resolve_semantic(load_config(None, sets), manifest)
    assert cfg.semantic.enabled is on and why in reason and "\n" not in reason
    assert default_name(cfg).endswith("-dualview") is on
    for forced in (True, False):
        explicit = load_config(None, [*sets, f"semantic.enabled={str(forced).lower()}"])
        assert resolve_semantic(explicit, manifest) == (explicit, None)


def test_default_train_is_the_dual_view_on_data_with_text(ray_local, tmp_path: Path) -> None:
    """A newcomer's `train` on a catalogue with item text gets the measured best, LLM-ESR's dual
    view (the embed stage runs first), under its own name; the same data without text trains the
    plain backbone. Real Ray Train, the bundled MiniLM."""
    from llmser_ray.data.dataset import load_dataset
    from llmser_ray.stages.prepare import prepare
    from llmser_ray.stages.train import finished_metrics, train

    small = ["data.synthetic.n_users=60", "data.synthetic.n_items=40", "model.hidden=16",
             "model.max_len=8", "train.epochs=1", "train.torch_threads=1", "ray.num_cpus=4",
             "ray.include_dashboard=false"]
    cfg = load_config(None, [f"workdir={tmp_path / 'text'}", *small])
    res = train(cfg)
    assert res.model_dir.name == "sasrec-dualview" and (tmp_path / "text" / "embeddings").is_dir()
    model, meta = load_trained(res.model_dir)
    assert isinstance(model, DualView) and meta["semantic"]["enabled"] is True
    assert finished_metrics(cfg, res.model_dir) is not None  # the unresolved config finds it

    seqs = tmp_path / "no_text.txt"  # S3-Rec lines, no item file: ids only (like Sports)
    seqs.write_text("".join(f"{u} " + " ".join(str(1 + (u + j) % 7) for j in range(6)) + "\n"
                            for u in range(1, 13)))
    bare = load_config(None, [f"workdir={tmp_path / 'bare'}", "data.source=s3rec",
                              f"data.path={seqs}", *small])
    prepare(bare)
    manifest = load_dataset(tmp_path / "bare" / "dataset").manifest
    resolved, why = resolve_semantic(bare, manifest)
    assert resolved.semantic.enabled is False and "no item text" in why


def test_tune_decides_auto_once_as_its_trials_would(tmp_path: Path) -> None:
    """Trials train the dual channel exactly when tune.target=dual, so the dual view is off for
    an LLMSeR search and on for a backbone search on data with text; a search over the backbone
    leaves the choice to each trial (the rule reads the backbone)."""
    from llmser_ray.stages.tune import experiment_name, llmesr_sections, resolve_trials_semantic

    (tmp_path / "dataset").mkdir()
    (tmp_path / "dataset" / "manifest.json").write_text(json.dumps(ALL_TEXT))
    search = 'tune.search={"train.lr": {"grid": [0.001, 0.002]}}'
    base = [f"workdir={tmp_path}", search]
    dual = resolve_trials_semantic(load_config(None, base))[0]
    backbone = resolve_trials_semantic(load_config(None, [*base, "tune.target=backbone"]))[0]
    assert dual.semantic.enabled is False and "semantic" not in llmesr_sections(dual)
    assert backbone.semantic.enabled is True and "semantic" in llmesr_sections(backbone)
    unresolved = load_config(None, [*base, "tune.target=backbone"])  # a caller's own config
    assert experiment_name(unresolved) == experiment_name(backbone) != experiment_name(dual)
    varied = load_config(None, [f"workdir={tmp_path}", "tune.target=backbone",
                                'tune.search={"model.backbone": {"grid": ["sasrec", "gru4rec"]}}'])
    assert resolve_trials_semantic(varied) == (varied, None)
    assert "semantic" in llmesr_sections(varied)  # its text table is produced once, before trials
