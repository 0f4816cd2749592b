"""The config model: defaults in one place, strict keys, readable errors."""

from __future__ import annotations

import pytest

from llmser_ray.config import Config, load_config
from llmser_ray.errors import ConfigError


def test_defaults_are_the_reference_hyperparameters() -> None:
    from llmser_ray.config import ModelConfig, TrainConfig

    model, train = ModelConfig(), TrainConfig()  # the shared defaults: SASRec's paper settings
    assert (model.hidden, model.layers, model.heads) == (64, 2, 1)
    assert (model.dropout, model.max_len) == (0.5, 200)
    assert (train.batch_size, train.lr, train.patience) == (128, 1e-3, 20)
    cfg = Config()  # the default backbone, SASRec, at its measured best (docs/RESULTS.md section 1)
    assert (cfg.model.hidden, cfg.model.layers, cfg.model.heads) == (128, 1, 1)
    assert (cfg.model.dropout, cfg.model.max_len, cfg.train.lr) == (0.3, 50, 3.8e-4)
    assert cfg.eval.protocol == "full" and cfg.eval.ks == [5, 10, 20]
    assert cfg.ray.dashboard_host == "127.0.0.1"


def test_yaml_and_overrides(tmp_path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  backbone: gru4rec\ntrain:\n  lr: 0.01\n")
    cfg = load_config(p, ["train.lr=0.002", "eval.ks=[1, 10]", "eval.metric=hr@1"])
    assert cfg.model.backbone == "gru4rec"
    assert cfg.train.lr == 0.002
    assert cfg.eval.ks == [1, 10]


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        (["train.lrr=0.1"], "unknown key 'train.lrr'"),
        (["bogus.x=1"], "unknown key 'bogus'"),
        (["train.lr=-1"], "'train.lr'"),
        (["model.dropout=1.5"], "'model.dropout'"),
        (["model.backbone=transformer"], "'model.backbone'"),
        (["model.hidden=65", "model.heads=2"], "divisible"),
        (["eval.metric=mrr@10"], "eval.metric"),
        (["data.source=csv"], "data.path is required"),
        (["train.lr"], "not key=value"),
    ],
)
def test_bad_values_name_the_problem_and_fix(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    msg = str(e.value)
    assert needle in msg
    assert "Fix:" in msg and "\n" not in msg


def test_missing_and_invalid_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


def test_digest_tracks_only_named_sections() -> None:
    a = Config()
    b = load_config(None, ["train.lr=0.01"])
    assert a.digest("model") == b.digest("model")
    assert a.digest("train") != b.digest("train")


def test_local_ray_has_room_for_a_stage_on_small_machines() -> None:
    """A 2-core machine still gets 4 logical CPUs: the augment stage's fractional actors plus Ray
    Data's own whole-CPU tasks do not fit in 2 and would wait forever."""
    from llmser_ray.config import RayConfig
    from llmser_ray.ray_utils import local_cpus

    assert local_cpus(RayConfig()) >= 4
    assert local_cpus(RayConfig(num_cpus=2)) == 2  # an explicit setting wins


def test_a_backbone_gets_its_own_measured_defaults_unless_the_config_sets_them(tmp_path) -> None:
    from llmser_ray.config import BACKBONE_DEFAULTS, ModelConfig, TrainConfig

    shared = {"model": ModelConfig(), "train": TrainConfig()}
    gru = load_config(None, ["model.backbone=gru4rec"])
    for backbone in ("sasrec", "gru4rec", "bert4rec"):
        resolved = load_config(None, [f"model.backbone={backbone}"])
        for dotted, value in BACKBONE_DEFAULTS[backbone].items():
            section, key = dotted.split(".")
            assert getattr(getattr(resolved, section), key) == value != getattr(shared[section], key)
    assert load_config(None, ["model.backbone=bert4rec"]).model.dropout == 0.2
    # A key no backbone default names keeps the shared default; those instances are not mutated.
    assert gru.model.hidden == shared["model"].hidden == ModelConfig().hidden == 64
    assert Config().model.hidden == 128 and ModelConfig().hidden == 64
    # An explicit value wins, from --set and from YAML, even when it equals the shared default.
    explicit = load_config(None, ["model.backbone=gru4rec", f"train.lr={shared['train'].lr}"])
    assert explicit.train.lr == shared["train"].lr
    (tmp_path / "c.yaml").write_text("model: {backbone: gru4rec, dropout: 0.5}\n")
    assert load_config(tmp_path / "c.yaml").model.dropout == 0.5
    # A resolved config round-trips unchanged (Ray workers and Tune trials rebuild it from a dump).
    assert Config.model_validate(gru.model_dump(mode="json")) == gru


def test_a_backbone_search_gives_each_trial_its_backbones_defaults(tmp_path) -> None:
    from llmser_ray.stages.tune import trial_base, trial_config

    search = 'tune.search={"model.backbone": {"grid": ["sasrec", "gru4rec"]}}'
    for start in ("sasrec", "gru4rec"):
        base = trial_base(load_config(None, [f"workdir={tmp_path}", f"model.backbone={start}", search]))
        gru = trial_config(base, {"model.backbone": "gru4rec"})
        sas = trial_config(base, {"model.backbone": "sasrec"})
        assert (gru.train.lr, gru.model.dropout) == (3e-3, 0.3), start
        assert (sas.train.lr, sas.model.dropout) == (Config().train.lr, Config().model.dropout), start
    # What the user set is every trial's, and without a backbone search nothing is dropped.
    base = trial_base(load_config(None, [f"workdir={tmp_path}", "train.lr=0.002", search]))
    assert trial_config(base, {"model.backbone": "gru4rec"}).train.lr == 0.002
    plain = trial_base(load_config(None, [f"workdir={tmp_path}", "model.backbone=gru4rec"]))
    assert plain["train"]["lr"] == 3e-3 and plain["model"]["dropout"] == 0.3
