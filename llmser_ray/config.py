"""One configuration model for the CLI, YAML files and Ray Tune.

Every default of the system lives here and nowhere else, so that a YAML file, a CLI flag and a
Tune trial all describe a run in the same vocabulary. Unknown keys are rejected (``extra="forbid"``)
because a misspelt option that is silently ignored produces a run the user did not ask for.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from llmser_ray.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SyntheticConfig(_Strict):
    """A generated catalogue, so the quickstart needs no download."""

    n_users: int = Field(1500, ge=10, le=10_000_000)
    n_items: int = Field(600, ge=20, le=10_000_000)
    n_categories: int = Field(12, ge=2, le=1000)
    # Pareto shape of sequence lengths: smaller means a longer tail of long users.
    length_alpha: float = Field(1.6, gt=0.1, le=10)
    min_len: int = Field(5, ge=3)
    max_len: int = Field(60, ge=5)
    # Probability that the next item stays in one of the user's favourite categories.
    category_stickiness: float = Field(0.85, ge=0, le=1)
    seed: int = 0

    @model_validator(mode="after")
    def _lengths(self) -> SyntheticConfig:
        if self.max_len < self.min_len:
            raise ValueError("max_len must be >= min_len")
        return self


class DataConfig(_Strict):
    """How raw interactions become the versioned Parquet dataset."""

    source: Literal["synthetic", "s3rec", "movielens", "csv", "parquet"] = "synthetic"
    # s3rec: the sequence file (``user item item ...``); movielens: the folder with u.data or
    # ratings.dat; csv/parquet: the interactions file.
    path: str | None = None
    # A public dataset to fetch when ``path`` is not given (needs a network; otherwise prepare
    # says where to get the files): "ml-100k" or "ml-1m" (GroupLens), "beauty" (S3-Rec's
    # Amazon Beauty sequences, no item text).
    download: Literal["ml-100k", "ml-1m", "beauty"] | None = None
    # Where downloads are kept; a mirror can replace the public address with download_url.
    cache_dir: str = "~/.cache/llmser-ray"
    download_url: str | None = None
    # Item text: items.jsonl (s3rec), or a CSV/Parquet table with item, title, attributes columns.
    item_path: str | None = None
    # Column names for csv/parquet sources.
    user_col: str = "user"
    item_col: str = "item"
    time_col: str | None = "timestamp"
    title_col: str = "title"
    attributes_col: str | None = "attributes"
    # MovieLens: ratings below this are dropped (0 keeps all, the sequential-rec convention).
    min_rating: float = Field(0.0, ge=0)
    # Filtering: "kcore" repeats until every user and item has at least the core count;
    # "single_pass" applies the counts once (the reference papers' filter); "none" skips.
    filter: Literal["none", "kcore", "single_pass"] = "none"
    user_core: int = Field(5, ge=1)
    item_core: int = Field(5, ge=1)
    # Users need 3 interactions for leave-one-out (>= 1 train, 1 validation, 1 test).
    min_seq_len: int = Field(3, ge=3)
    # Long-tail users: train length <= tail_user_threshold (T in the paper; LLM-ESR uses 9 on
    # Beauty). Long-tail items: all but the most popular head_item_share of items (Pareto 20%).
    tail_user_threshold: int = Field(9, ge=1)
    head_item_share: float = Field(0.2, gt=0, lt=1)
    synthetic: SyntheticConfig = SyntheticConfig()

    @model_validator(mode="after")
    def _needs_path(self) -> DataConfig:
        if self.source != "synthetic" and not self.path and not self.download:
            raise ValueError(
                f"data.path is required for source '{self.source}' "
                "(point it at the interactions file or folder, or set data.download)"
            )
        if self.download:
            wanted = "s3rec" if self.download == "beauty" else "movielens"
            if self.source != wanted:
                raise ValueError(f"data.download={self.download} needs data.source={wanted}")
        return self


class ModelConfig(_Strict):
    """Backbone architecture; defaults are the reference hyperparameters (METHOD.md)."""

    backbone: Literal["sasrec", "bert4rec", "gru4rec"] = "sasrec"
    hidden: int = Field(64, ge=8, le=4096)
    layers: int = Field(2, ge=1, le=48)
    heads: int = Field(1, ge=1, le=64)
    dropout: float = Field(0.5, ge=0, lt=1)
    max_len: int = Field(200, ge=2, le=4096)
    # SASRec as published (causal mask + feed-forward). "reference" reproduces the LLMSeR code's
    # defect (no mask, no feed-forward) for comparisons only.
    sasrec_variant: Literal["standard", "reference"] = "standard"
    # BERT4Rec Cloze masking probability.
    mask_prob: float = Field(0.2, gt=0, lt=1)
    # BERT4Rec: share of training sequences that mask only their last item (the paper's extra
    # samples matching next-item prediction).
    last_item_mask_prob: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _heads(self) -> ModelConfig:
        if self.hidden % self.heads:
            raise ValueError(f"model.hidden ({self.hidden}) must be divisible by model.heads")
        return self


class EvalConfig(_Strict):
    """Full ranking is the default because sampled metrics are biased (Krichene & Rendle 2020)."""

    protocol: Literal["full", "sampled"] = "full"
    num_negatives: int = Field(100, ge=1)
    ks: list[int] = Field(default_factory=lambda: [5, 10, 20])
    batch_size: int = Field(1024, ge=1)
    # Items of the input history get score -inf (the target itself is always ranked).
    mask_history: bool = True
    seed: int = 1234
    # The metric that selects the best epoch and drives early stopping / Tune.
    metric: str = "ndcg@10"

    @model_validator(mode="after")
    def _ks(self) -> EvalConfig:
        if not self.ks or any(k < 1 for k in self.ks):
            raise ValueError("eval.ks must be a non-empty list of positive integers")
        name, _, k = self.metric.partition("@")
        if name not in ("hr", "ndcg") or not k.isdigit() or int(k) not in self.ks:
            raise ValueError(f"eval.metric '{self.metric}' must be hr@K or ndcg@K with K in eval.ks")
        return self


class TrainConfig(_Strict):
    loss: Literal["bce", "ce"] = "bce"
    # Negatives per position for the BCE loss (reference: 1).
    num_negatives: int = Field(1, ge=1, le=1000)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    epochs: int = Field(200, ge=1)
    patience: int = Field(20, ge=1)
    seed: int = 42
    # Train on reversed sequences (the collaborative candidate generator of SIA).
    reverse: bool = False
    # Ray Train scaling.
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    # torch intra-op threads per worker (0 = leave torch's default).
    torch_threads: int = Field(0, ge=0)
    keep_checkpoints: int = Field(2, ge=1)


class RayConfig(_Strict):
    """Where the work runs: a local Ray by default, an existing cluster with ``address``."""

    address: str | None = None
    # Logical CPUs of a local Ray (None = the machine's cores). More logical CPUs than cores
    # lets fractional actors and feeders coexist on a two-core machine.
    num_cpus: float | None = None
    dashboard_host: str = "127.0.0.1"
    include_dashboard: bool = True


class Config(_Strict):
    """A whole run. ``workdir`` holds every stage's output (dataset/, models/, ...)."""

    workdir: str = "runs/quickstart"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    ray: RayConfig = RayConfig()

    @property
    def workdir_path(self) -> Path:
        return Path(self.workdir).expanduser().resolve()

    def digest(self, *sections: str) -> str:
        """Stable hash of some sections, used to decide whether a stage's output is current."""
        payload = {s: getattr(self, s).model_dump(mode="json") for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{p}' is not a section", "use section.key=value")
    node[leaf] = value


def _format_validation(err: ValidationError, origin: str) -> str:
    first = err.errors()[0]
    loc = ".".join(str(x) for x in first["loc"]) or "(top level)"
    if first["type"] == "extra_forbidden":
        return f"{origin}: unknown key '{loc}'"
    return f"{origin}: '{loc}': {first['msg']} (got {first.get('input')!r})"


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load YAML (optional) then apply ``section.key=value`` overrides (values parsed as YAML)."""
    tree: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}", "pass an existing YAML file with --config")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}", "fix the YAML syntax") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping", "write `section: {key: value}`")
        tree = loaded
        origin = str(p)
    for ov in overrides or []:
        key, sep, raw = ov.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{ov}' is not key=value", "write e.g. --set train.lr=0.001")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw) if raw else None)
        origin = f"{origin} + overrides"
    try:
        return Config.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(
            _format_validation(e, origin),
            "see `llmser-ray config --defaults` for valid keys and ranges",
        ) from None
