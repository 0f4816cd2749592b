"""The one mechanism every stage runs on: identity digest, "is it current", atomic publish, upstream.

A stage turns versioned inputs (upstream stage outputs, files) and the config keys that make up
its identity into one output folder under the workdir, holding Parquet/JSON/safetensors files and
a ``manifest.json``. The folder is written into a temporary sibling and renamed into place when
complete (``io.atomic_dir``), so a reader sees a complete output or none, and a killed stage
leaves nothing a later run mistakes for a result; long stages resume from their own shards or
checkpoints (``augment.shards``, Ray Train checkpoints), keyed by the same digest.

Why one mechanism: each stage used to hand-write "digest, skip if current, publish" with its own
small differences (what is hashed, how a stale output is told apart, which stages run their
upstream silently and which refuse). Here the rule is one: a stage asks for each input with
:func:`needs`; a missing or stale input is produced first, and the console says so.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmser_ray.io import MANIFEST, atomic_dir, manifest_header, read_manifest, write_json


def digest(payload: dict[str, Any]) -> str:
    """The identity of an output: 16 hex digits of the SHA-256 of the payload's sorted JSON.

    Kept byte-for-byte what every stage hashed before the stages package existed, so outputs
    written then are still recognised as current.
    """
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def say(stage: str, text: str) -> None:
    """One console line for what the stage machinery decided (skip, upstream run, publish)."""
    sys.stdout.write(f"[{stage}] {text}\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class Stage:
    """What a stage declares: its name, its output folder, its inputs and identity, its schema.

    ``identity`` lists the config keys (and upstream digests) hashed into ``config_digest``;
    it is documentation that docs/STAGES.md prints and a test checks against the digest payload.
    """

    name: str
    output: str  # folder under the workdir
    schema_version: int
    inputs: tuple[str, ...] = ()
    identity: tuple[str, ...] = ()
    schema: str = ""  # where the output's files are documented
    summary: str = ""
    cli: str = ""  # the subcommand that runs it, where not the name with dashes

    def folder(self, workdir: Path) -> Path:
        return Path(workdir) / self.output

    @property
    def command(self) -> str:
        """The CLI subcommand that runs this stage, for the fix an error message names."""
        return "llmser-ray " + (self.cli or self.name.replace("_", "-"))

    def current(self, folder: Path, key: str, force: bool = False) -> dict[str, Any] | None:
        """The manifest of ``folder`` when it holds this stage's output for identity ``key``."""
        if force:
            return None
        done = read_manifest(folder)
        if done is None or done.get("config_digest") != key:
            return None
        return done

    @contextlib.contextmanager
    def publish(self, folder: Path, key: str, **fields: Any) -> Iterator[Publication]:
        """Yield a temporary folder to write into; on success its manifest is written last and
        the folder renamed into place. ``fields`` and ``Publication.manifest`` go into the
        manifest beside the standard header (stage, schema version, package version, time)."""
        with atomic_dir(folder) as tmp:
            pub = Publication(tmp, {**manifest_header(self.name, self.schema_version),
                                    "config_digest": key, **fields})
            yield pub
            write_json(tmp / MANIFEST, pub.manifest)


    def seal(self, folder: Path, key: str, key_field: str = "config_digest", **fields: Any) -> None:
        """Mark ``folder`` complete by writing its manifest, last, after every other file.

        For a stage whose folder cannot be renamed into place as a whole: a model folder also
        holds Ray Train's checkpoints (``ray/``), which must outlive a retraining, so the train
        stage publishes ``best/`` atomically and then seals the folder; a reader that finds no
        manifest with the right key treats it as absent, exactly as with :meth:`publish`.
        """
        write_json(Path(folder) / MANIFEST, {**manifest_header(self.name, self.schema_version),
                                             key_field: key, **fields})


@dataclass
class Publication:
    dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)


def needs(stage: str, upstream: str, is_current: Callable[[], bool], run: Callable[[], Any]) -> Any:
    """The upstream rule, the same for every stage: run what is missing and say so.

    ``is_current`` must be cheap (a manifest read and a digest); ``run`` is the upstream's own
    entry point, which skips itself when current, so calling it unconditionally is correct and
    the check only decides whether the console hears about it.
    """
    if not is_current():
        say(stage, f"needs {upstream}, which is missing or out of date: running it first")
    return run()
