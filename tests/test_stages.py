"""The shared stage mechanism: identity, "is it current", atomic publish, and the upstream rule."""

from __future__ import annotations

import ast
import hashlib
import json
from pathlib import Path

import pytest

from llmser_ray.io import read_manifest
from llmser_ray.stages import MODULES, all_stages
from llmser_ray.stages.base import Stage, digest, needs

ROOT = Path(__file__).resolve().parents[1]


def test_digest_is_the_hash_every_stage_used_before() -> None:
    payload = {"b": [1, 2], "a": {"z": None, "y": "x"}}
    old = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
    assert digest(payload) == old  # outputs written before the refactor stay current
    assert digest({**payload, "a": {"z": None, "y": "w"}}) != old


def test_publish_is_atomic_and_current_matches_the_key(tmp_path: Path) -> None:
    stage = Stage(name="demo", output="demo", schema_version=3)
    out = stage.folder(tmp_path)
    assert stage.current(out, "k1") is None
    with stage.publish(out, "k1", counts={"n": 1}) as pub:
        (pub.dir / "x.txt").write_text("one")
        pub.manifest["extra"] = True
    m = read_manifest(out)
    assert m is not None and m["stage"] == "demo" and m["schema_version"] == 3
    assert m["config_digest"] == "k1" and m["counts"] == {"n": 1} and m["extra"] is True
    assert stage.current(out, "k1") == m
    assert stage.current(out, "k2") is None and stage.current(out, "k1", force=True) is None
    # A failing rewrite leaves the published output untouched and no temporary folder behind.
    with pytest.raises(RuntimeError), stage.publish(out, "k2") as pub:
        (pub.dir / "x.txt").write_text("two")
        raise RuntimeError("killed")
    assert (out / "x.txt").read_text() == "one" and stage.current(out, "k1") is not None
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_needs_runs_the_upstream_and_says_so_only_when_missing(capsys: pytest.CaptureFixture[str]) -> None:
    calls: list[str] = []
    assert needs("b", "a", lambda: True, lambda: calls.append("run") or 1) == 1
    assert capsys.readouterr().out == "" and calls == ["run"]
    needs("b", "a", lambda: False, lambda: calls.append("run"))
    assert "[b] needs a, which is missing or out of date: running it first" in capsys.readouterr().out
    assert calls == ["run", "run"]


def test_every_stage_declares_itself_once() -> None:
    stages = all_stages()
    assert [s.name for s in stages] == list(MODULES)
    assert len({s.output for s in stages}) == len(stages)
    names = {s.name for s in stages} | {"embed (free-text grounding)"}
    for s in stages:
        assert s.identity and s.schema.startswith(("docs/SCHEMA.md", "docs/SERVING.md")) and s.summary
        assert set(s.inputs) <= names, s.name
    from llmser_ray.cli import app

    commands = {(c.name or c.callback.__name__).replace("_", "-") for c in app.registered_commands}
    assert {s.command.removeprefix("llmser-ray ") for s in stages} <= commands  # fixes name real commands
    doc = (ROOT / "docs" / "STAGES.md").read_text()
    for s in stages:
        assert f"`{s.name}`" in doc and f"`{s.output}`" in doc, s.name


def test_library_packages_import_no_stage() -> None:
    offenders = []
    for pkg in ("data", "models", "text", "llm", "augment", "serving"):
        for path in (ROOT / "llmser_ray" / pkg).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                mods = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                        else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
                offenders += [f"{path.name}: {m}" for m in mods if m.startswith("llmser_ray.stages")]
    assert offenders == []


def test_a_prepared_dataset_is_never_replaced_by_a_later_commands_default_data(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`prepare -w W --set data...` then `embed -w W` (no data flags): the dataset stays W's.
    Only a workdir without a dataset gets one prepared first, and the console says so."""
    from llmser_ray.config import load_config
    from llmser_ray.stages.prepare import need_dataset, prepare

    small = ["data.synthetic.n_users=60", "data.synthetic.n_items=40"]
    prepare(load_config(None, [f"workdir={tmp_path}", *small]))
    before = read_manifest(tmp_path / "dataset")
    need_dataset(load_config(None, [f"workdir={tmp_path}"]), "embed")  # default data section
    assert read_manifest(tmp_path / "dataset") == before and capsys.readouterr().out == ""
    fresh = tmp_path / "fresh"
    need_dataset(load_config(None, [f"workdir={fresh}", *small]), "train")
    assert "[train] needs prepare" in capsys.readouterr().out
    assert read_manifest(fresh / "dataset") is not None
