"""What a job will cost before it runs: requests, input and output tokens and dollars per stage.

``evoray estimate CONFIG`` and ``--dry-run`` print :func:`format_estimate` of :func:`estimate`.
Nothing is sent and no Ray is started: the input rows are read with :func:`evoray.io.iter_rows`
(``input.limit`` respected), the real prompt builders render the prompts of a sample of rows, and
the tokens of those prompts are counted here.

Input tokens
    The prompts of up to :data:`SAMPLE_ROWS` rows (a seeded reservoir sample of the input) are
    built with the same builders the stages use (:func:`~evoray.prompts.rating.build_rating_request`,
    :func:`~evoray.evolution.methods.render`, :func:`~evoray.prompts.evolution.answer_messages`,
    :func:`~evoray.answer.answer_request`, the optimizer's analysis and optimization messages,
    :func:`~evoray.prompts.judge.build_judge_request`); the mean per row is scaled to all rows.
    So the estimate follows the prompts when they change.

Counting tokens
    OpenAI models (``kind: openai`` and a model name tiktoken knows) are counted with tiktoken,
    but only when the model's encoding file is already in tiktoken's cache: tiktoken downloads
    encodings on first use, and the estimate must send nothing (and must not hang without a
    network). Everything else - Anthropic, local models, OpenAI-compatible servers with other
    model names, or an encoding that is not cached - uses evoray's one approximation
    (:func:`evoray.tokens.estimate_message_tokens`): ``len(text) / 4`` tokens per message plus
    :data:`~evoray.tokens.TOKENS_PER_MESSAGE` (4) for the message framing (tiktoken counts get the
    same framing). The table names the counter used for each line.

Output tokens
    Replies are not known in advance: each call is assumed to produce
    :data:`OUTPUT_FRACTION` (0.5) of its ``max_tokens``. Text a stage passes on (an evolved
    instruction, an answer, feedback) is assumed to be that long too.

Requests per stage (``n`` = rows entering the stage)
    * rate: ``n`` (parse retries are assumed not to happen: a lower bound if replies do not parse);
    * evolve: ``n * rounds`` evolutions, plus ``n`` answers when ``evolve.answer``, plus
      ``n * rounds`` equality checks when the rules include ``no_information_gain`` (the
      ``paper`` and ``strict`` sets do, unless ``evolve.equality_check`` is false);
    * answer: ``n``;
    * optimize (an upper bound: every one of ``steps`` steps runs, patience never stops early):
      per step ``batch * trajectory_length`` evolutions (and as many answers when
      ``evolve.answer``), ``2 * candidates`` optimizer calls (analysis + optimization) and
      ``(candidates + 1) * dev * 2`` dev-set calls (evolve + answer; the current method is measured
      again every step), and an equality check per evolution when the rules include it. A step
      whose proposals all fail asks once more (not counted). ``batch`` and ``dev`` are capped by
      the rows sampled, as the optimizer does;
    * judge: ``2 * pairs`` (both orders), pairs matched from ``judge.answers_a`` / ``answers_b``.

    A stage that consumes an earlier pipeline stage's output uses that stage's row count (every
    row that enters a stage leaves it, so the count is carried on; for rate's kept rows it is an
    upper bound), and its sample rows get an ``output`` of the expected answer length.

Dollars
    ``(input_tokens * input_per_mtok + output_tokens * output_per_mtok) / 1e6`` with the prices of
    the providers serving the call's role (``roles:``; optimize uses ``evol`` and ``optimizer``).
    With several providers the weight-averaged price is used (``weight:``) and the line says so.
    The rate, answer and judge stages can run in batch mode (``mode: batch``, see
    :mod:`evoray.batch`), so their cost is also shown at the providers' batch prices
    (``Price.batch_rates``: half the online price unless set); ``dollars`` is the online cost,
    ``batch_dollars`` the batch cost, and the total "as configured" follows each stage's ``mode``.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from .config import BATCH_STAGES, JobConfig, ProviderConfig
from .errors import ConfigError, UsageError
from .providers import provider_class
from .tokens import CHARS_PER_TOKEN, TOKENS_PER_MESSAGE, estimate_message_tokens, estimate_tokens

SAMPLE_ROWS = 200
"""Rows whose prompts are built and counted; token totals are scaled from their mean."""

OUTPUT_FRACTION = 0.5
"""Assumed share of ``max_tokens`` each reply uses."""


_TIKTOKEN_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
_FILLER_WORD = " the"  # one token in the OpenAI encodings, and 4 characters = 1 approximate token


# ---- results --------------------------------------------------------------------------------------

@dataclass
class CallEstimate:
    """One kind of call inside a stage (evolution, answer, rating, ...)."""

    kind: str
    role: str
    requests: int
    input_tokens: int
    output_tokens: int
    dollars: float
    input_per_mtok: float
    output_per_mtok: float
    counter: str  # "tiktoken:<encoding>" or "approx"
    price_note: str = ""
    batch_dollars: float | None = None  # at the batch price; None when the stage cannot run in batch mode


@dataclass
class StageEstimate:
    """The estimate of one stage: totals over its calls, with the calls and notes kept."""

    stage: str
    rows: int
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    dollars: float = 0.0  # online
    calls: list[CallEstimate] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    batch_dollars: float | None = None  # at the batch price (stages that can run in batch mode)
    mode: str = "online"  # the stage's mode in the config

    def add(self, call: CallEstimate) -> None:
        self.calls.append(call)
        self.requests += call.requests
        self.input_tokens += call.input_tokens
        self.output_tokens += call.output_tokens
        self.dollars += call.dollars
        if call.batch_dollars is not None:
            self.batch_dollars = (self.batch_dollars or 0.0) + call.batch_dollars

    @property
    def configured_dollars(self) -> float:
        """The cost in the stage's configured mode."""
        return self.batch_dollars if self.mode == "batch" and self.batch_dollars is not None else self.dollars

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "rows": self.rows, "requests": self.requests,
            "input_tokens": self.input_tokens, "output_tokens": self.output_tokens, "dollars": self.dollars,
            "batch_dollars": self.batch_dollars, "mode": self.mode,
            "calls": [c.__dict__ for c in self.calls], "notes": list(self.notes),
        }


# ---- token counting ---------------------------------------------------------------------------------

#: The approximation: ``len(text) / 4`` tokens, rounded up (the one rule, :mod:`evoray.tokens`).
approx_tokens = estimate_tokens


def _tiktoken_cache_dir() -> str | None:
    if "TIKTOKEN_CACHE_DIR" in os.environ:
        d = os.environ["TIKTOKEN_CACHE_DIR"]
    elif "DATA_GYM_CACHE_DIR" in os.environ:
        d = os.environ["DATA_GYM_CACHE_DIR"]
    else:
        d = os.path.join(tempfile.gettempdir(), "data-gym-cache")
    return d or None  # "" disables tiktoken's cache: every use would download


@lru_cache(maxsize=None)
def _tiktoken_encoding(model: str):
    """tiktoken's encoding for ``model`` when it can be had without a network, else None.

    tiktoken downloads encoding files on first use; we only load an encoding whose file is already
    in tiktoken's cache (same path rule as ``tiktoken.load.read_file_cached``), and while loading it
    any download is refused (tiktoken would fetch again a cached file whose hash does not match), so
    no request is ever sent and nothing waits on a network.
    """
    try:
        import tiktoken
        from tiktoken.model import encoding_name_for_model
    except ImportError:
        return None
    try:
        name = encoding_name_for_model(model)
    except KeyError:
        return None
    cache_dir = _tiktoken_cache_dir()
    if cache_dir is None:
        return None
    key = hashlib.sha1(_TIKTOKEN_URL.format(name=name).encode()).hexdigest()
    if not os.path.isfile(os.path.join(cache_dir, key)):
        return None
    # tiktoken re-downloads a cached file whose hash does not match: forbid any download while loading
    import tiktoken.load as _load

    original = _load.read_file

    def offline(blobpath: str) -> bytes:
        if "://" in blobpath:
            raise OSError("evoray estimate does not download tiktoken encodings")
        return original(blobpath)

    _load.read_file = offline
    try:
        return tiktoken.get_encoding(name)
    except Exception:  # a corrupt cache file, an unexpected layout: fall back, never fail the estimate
        return None
    finally:
        _load.read_file = original


class TokenCounter:
    """Counts the tokens of messages for one provider: tiktoken when possible, else the approximation."""

    def __init__(self, provider: ProviderConfig | None = None):
        self.encoding = None
        if provider is not None and provider_class(provider.kind).counts_with_tiktoken:
            self.encoding = _tiktoken_encoding(provider.model)
        self.name = f"tiktoken:{self.encoding.name}" if self.encoding is not None else "approx"

    def text(self, text: str) -> int:
        if self.encoding is not None:
            return len(self.encoding.encode(text, disallowed_special=()))
        return approx_tokens(text)

    def messages(self, messages: Sequence[dict[str, str]]) -> int:
        if self.encoding is None:
            return estimate_message_tokens(messages)
        return sum(self.text(m.get("content") or "") + TOKENS_PER_MESSAGE for m in messages)


def filler(n_tokens: int) -> str:
    """Stand-in text of about ``n_tokens`` tokens in both counters (a reply not yet written)."""
    return (_FILLER_WORD * max(0, int(n_tokens))).strip()


def _out(max_tokens: int) -> int:
    return int(round(max_tokens * OUTPUT_FRACTION))


# ---- prices ------------------------------------------------------------------------------------------

@dataclass
class _RolePricing:
    role: str
    providers: list[ProviderConfig]
    input_per_mtok: float
    output_per_mtok: float
    note: str
    counter: TokenCounter
    batch_input_per_mtok: float = 0.0
    batch_output_per_mtok: float = 0.0

    def dollars(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.input_per_mtok + output_tokens * self.output_per_mtok) / 1e6

    def batch_dollars(self, input_tokens: int, output_tokens: int) -> float:
        return (input_tokens * self.batch_input_per_mtok + output_tokens * self.batch_output_per_mtok) / 1e6


def role_pricing(config: JobConfig, role: str) -> _RolePricing:
    """Prices (weight-averaged over the role's providers) and the token counter of a role.

    With several providers the counter is the first provider's (they may tokenize differently;
    the note says which prices were averaged).
    """
    provs = config.providers_for(role)
    total_w = sum(p.weight for p in provs)
    pin = sum(p.price.input_per_mtok * p.weight for p in provs) / total_w
    pout = sum(p.price.output_per_mtok * p.weight for p in provs) / total_w
    if len(provs) > 1:
        note = "weighted average price of " + ", ".join(f"{p.name} (weight {p.weight:g})" for p in provs)
    else:
        note = ""
    bin_ = sum(p.price.batch_rates()[0] * p.weight for p in provs) / total_w
    bout = sum(p.price.batch_rates()[1] * p.weight for p in provs) / total_w
    return _RolePricing(role, provs, pin, pout, note, TokenCounter(provs[0]), bin_, bout)


# ---- reading rows --------------------------------------------------------------------------------------

@dataclass
class _Rows:
    count: int
    sample: list[dict[str, Any]]


def _read_rows(paths: str | Sequence[str], config: JobConfig, fmt: str | None = None,
               mapping: dict | None = None, seed: int = 0) -> _Rows:
    """Count the rows (``input.limit`` respected) and keep a seeded reservoir sample of them."""
    from .io import iter_rows

    if isinstance(paths, str):
        paths = [p.strip() for p in paths.split(",") if p.strip()]
    rng = random.Random(seed)
    sample: list[dict[str, Any]] = []
    n = 0
    rows = iter_rows(paths, fmt=fmt or config.input.format,
                     mapping=config.input.map if mapping is None else mapping,
                     skip_invalid=config.input.skip_invalid, limit=config.input.limit)
    for row in rows:
        n += 1
        if len(sample) < SAMPLE_ROWS:
            sample.append(row)
        else:
            j = rng.randrange(n)
            if j < SAMPLE_ROWS:
                sample[j] = row
    return _Rows(n, sample)


def _uses_equality(evolve_config) -> bool:
    """The evolve rules include the LLM no-information-gain check (one call per evolution)."""
    from .evolution.evolver import rules_from_config

    return any(r.name == "no_information_gain" for r in rules_from_config(evolve_config))


def _mean(values: Iterable[int]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else 0.0


# ---- per-stage estimates ----------------------------------------------------------------------------------

class _Builder:
    def __init__(self, config: JobConfig, method: str | None):
        self.config = config
        self.method_name = method
        self._pricing: dict[str, _RolePricing] = {}

    def pricing(self, role: str) -> _RolePricing:
        if role not in self._pricing:
            self._pricing[role] = role_pricing(self.config, role)
        return self._pricing[role]

    def call(self, st: StageEstimate, kind: str, role: str, requests: int,
             per_request_in: float, per_request_out: float) -> None:
        pr = self.pricing(role)
        tin = int(round(requests * per_request_in))
        tout = int(round(requests * per_request_out))
        batch = pr.batch_dollars(tin, tout) if st.stage in BATCH_STAGES else None
        st.add(CallEstimate(kind, role, int(requests), tin, tout, pr.dollars(tin, tout), pr.input_per_mtok,
                            pr.output_per_mtok, pr.counter.name, pr.note, batch))

    def method(self, st: StageEstimate, upstream_optimize: bool):
        from .evolution.methods import load_method

        name = self.method_name or self.config.evolve.method
        try:
            m = load_method(name)
        except ConfigError:
            m = load_method("initial")
            st.notes.append(f"method '{name}' does not exist yet; the built-in 'initial' method stands in for it")
            return m
        if upstream_optimize:
            st.notes.append("the optimized method is not known yet; the starting method stands in for it")
        return m

    # rate ---------------------------------------------------------------------------------------
    def rate(self, st: StageEstimate, rows: _Rows) -> None:
        from .prompts.rating import build_rating_request

        c = self.config.rate
        pr = self.pricing("rater")
        use_schema = c.json_scores and all(provider_class(p.kind).supports_json_schema for p in pr.providers)
        per_in = _mean(pr.counter.messages(build_rating_request(r, c.dimension, use_schema, c.max_tokens).messages)
                       for r in rows.sample)
        raters = len(pr.providers) if c.ensemble == "all" else 1
        self.call(st, "rating", "rater", rows.count * raters, per_in, _out(c.max_tokens))
        if raters > 1:
            st.notes.append(f"rate.ensemble all: every row rated by each of the {raters} raters "
                            f"(priced at the role's weight-averaged price)")
        st.notes.append("no parse retries assumed (each adds one request per unparsed reply)")

    # evolve ---------------------------------------------------------------------------------------
    def evolve(self, st: StageEstimate, rows: _Rows, upstream_optimize: bool) -> None:
        from .evolution.methods import render
        from .prompts.evolution import answer_messages, equality_messages

        c = self.config.evolve
        method = self.method(st, upstream_optimize)
        cnt = self.pricing("evol").counter
        evolved = filler(_out(c.max_tokens))
        per_evolve = _mean(cnt.messages(render(method, r["instruction"])) for r in rows.sample)
        self.call(st, "evolution", "evol", rows.count * c.rounds, per_evolve, _out(c.max_tokens))
        if c.rounds > 1:
            st.notes.append("rounds after the first are counted with the first round's prompt size")
        if _uses_equality(c):
            per_eq = _mean(cnt.messages(equality_messages(r["instruction"], evolved)) for r in rows.sample)
            self.call(st, "equality check", "evol", rows.count * c.rounds, per_eq, 8 * OUTPUT_FRACTION)
        if c.answer:
            per_ans = _mean(cnt.messages(answer_messages(evolved, r.get("input") or "")) for r in rows.sample)
            self.call(st, "answer", "evol", rows.count, per_ans, _out(c.answer_max_tokens))

    # answer ---------------------------------------------------------------------------------------
    def answer(self, st: StageEstimate, rows: _Rows) -> None:
        from .answer import answer_request

        c = self.config.answer
        cnt = self.pricing("answer").counter
        per_in = _mean(cnt.messages(answer_request(r, c).messages) for r in rows.sample)
        self.call(st, "answer", "answer", rows.count, per_in, _out(c.max_tokens))

    # optimize -------------------------------------------------------------------------------------
    def optimize(self, st: StageEstimate, rows: _Rows) -> None:
        from .evolution.methods import render
        from .prompts.evolution import answer_messages
        from .prompts.optimizer import analysis_messages, format_trajectories, optimization_messages

        c, ev = self.config.optimize, self.config.evolve
        method = self.method(st, False)
        pool = min(c.sample_size, rows.count)
        dev = min(c.dev_size, pool)
        train = pool - dev if pool >= c.dev_size + c.batch_size else pool
        batch = min(c.batch_size, train)
        evol_cnt = self.pricing("evol").counter
        opt_cnt = self.pricing("optimizer").counter
        evolved = filler(_out(ev.max_tokens))
        answer = filler(_out(ev.answer_max_tokens))
        per_evolve = _mean(evol_cnt.messages(render(method, r["instruction"])) for r in rows.sample)
        per_answer = _mean(evol_cnt.messages(answer_messages(evolved, r.get("input") or "")) for r in rows.sample)
        out_evolve, out_answer = _out(ev.max_tokens), _out(ev.answer_max_tokens)

        traj_evolutions = c.steps * batch * c.trajectory_length
        self.call(st, "trajectory evolution", "evol", traj_evolutions, per_evolve, out_evolve)
        if ev.answer:
            self.call(st, "trajectory answer", "evol", traj_evolutions, per_answer, out_answer)
        # the analysis prompt holds the method and a whole mini-batch of trajectories
        seeds = rows.sample[:batch] or rows.sample[:1]
        trajectories = [{"seed": r["instruction"],
                         "steps": [{"round": k, "evolved": evolved, "answer": answer if ev.answer else None,
                                    "failed": None} for k in range(1, c.trajectory_length + 1)]}
                        for r in seeds]
        feedback = filler(_out(c.max_tokens))
        per_analysis = opt_cnt.messages(analysis_messages(method.text, format_trajectories(trajectories)))
        per_optimization = opt_cnt.messages(optimization_messages(method.text, feedback))
        self.call(st, "analysis", "optimizer", c.steps * c.candidates, per_analysis, _out(c.max_tokens))
        self.call(st, "optimization", "optimizer", c.steps * c.candidates, per_optimization, _out(c.max_tokens))
        dev_evals = c.steps * (c.candidates + 1) * dev  # the current method is measured again every step
        self.call(st, "dev evolution", "evol", dev_evals, per_evolve, out_evolve)
        self.call(st, "dev answer", "evol", dev_evals, per_answer, out_answer)
        if _uses_equality(ev):
            from .prompts.evolution import equality_messages

            per_eq = _mean(evol_cnt.messages(equality_messages(r["instruction"], evolved)) for r in rows.sample)
            self.call(st, "equality check", "evol", traj_evolutions + dev_evals, per_eq, 8 * OUTPUT_FRACTION)
        st.notes.append(f"upper bound: all {c.steps} steps run (patience may stop earlier); "
                        f"dev set {dev}, mini-batch {batch}")

    # judge ----------------------------------------------------------------------------------------
    def judge(self, st: StageEstimate, upstream: _Rows | None) -> None:
        from .judge import pair_answers
        from .prompts.judge import build_judge_request, question_text

        c = self.config.judge
        cnt = self.pricing("judge").counter
        if c.answers_a and c.answers_b and Path(c.answers_a).exists() and Path(c.answers_b).exists():
            from .io import iter_rows

            # test sets are small: read both sides whole so the pairs are the judge's pairs
            pairs, only_a, only_b = pair_answers(iter_rows(c.answers_a), iter_rows(c.answers_b))
            n_pairs = len(pairs)
            sample = random.Random(0).sample(pairs, min(SAMPLE_ROWS, n_pairs))
            if only_a or only_b:
                st.notes.append(f"{len(only_a)} answers of A and {len(only_b)} of B have no partner (not judged)")
        elif upstream is not None:
            n_pairs = upstream.count
            sample = [{"instruction": r.get("instruction") or "", "input": r.get("input") or "",
                       "answer_a": r.get("output") or "", "answer_b": r.get("output") or ""} for r in upstream.sample]
            st.notes.append(f"answer files not found (judge.answers_a={c.answers_a!r}, answers_b={c.answers_b!r}): "
                            "the earlier stage's rows stand in for both sides")
        else:
            st.notes.append(f"answer files not found (judge.answers_a={c.answers_a!r}, answers_b={c.answers_b!r}): "
                            "no pairs to judge yet; estimate again once they exist")
            n_pairs, sample = 0, []
        st.rows = n_pairs
        per_in = _mean(
            (cnt.messages(build_judge_request(question_text(p), p["answer_a"], p["answer_b"], c.max_tokens).messages)
             + cnt.messages(build_judge_request(question_text(p), p["answer_b"], p["answer_a"], c.max_tokens).messages)) / 2
            for p in sample)
        self.call(st, "judgment (both orders)", "judge", 2 * n_pairs, per_in, _out(c.max_tokens))
        st.notes.append("no parse retries assumed")


def _passed_on(rows: _Rows, answer_tokens: int, instruction_tokens: int | None = None) -> _Rows:
    """The sample as an earlier stage passes it on: ``output`` = an answer of the expected length
    and, after evolution, ``instruction`` = an evolved instruction of the expected length."""
    text = filler(answer_tokens)
    upd: dict[str, Any] = {"output": text}
    if instruction_tokens is not None:
        upd["instruction"] = filler(instruction_tokens)
    return _Rows(rows.count, [dict(r, **upd) for r in rows.sample])


def estimate(config: JobConfig, input_path: str | None = None, stages: Sequence[str] | None = None,
             method: str | None = None) -> list[StageEstimate]:
    """Estimates for ``stages`` (default ``config.pipeline``), in order; sends nothing, starts no Ray.

    ``input_path`` overrides ``config.input.path`` (``-i``); ``method`` overrides
    ``evolve.method`` (``evoray evolve --method``). Raises :class:`~evoray.errors.UsageError` when a
    stage needs input rows and there is no input.
    """
    from .stage import get_stage, stage_names

    stages = list(stages) if stages is not None else list(config.pipeline)
    known = stage_names()
    unknown = [s for s in stages if s not in known]
    if unknown:
        raise UsageError(f"unknown stage(s) {', '.join(unknown)} (stages: {', '.join(known)})")
    needs_input = any(get_stage(s).reads_rows for s in stages)
    path = input_path or config.input.path
    rows: _Rows | None = None
    if path:
        rows = _read_rows(path, config, seed=config.optimize.seed)
    elif needs_input:
        raise UsageError("no input rows to estimate: set input.path in the config or pass -i INPUT")

    state = EstimateState(_Builder(config, method), rows)
    out: list[StageEstimate] = []
    current = rows  # the rows the next row-consuming stage receives
    for stage in stages:
        st = StageEstimate(stage, current.count if current is not None else 0, mode=config.stage_mode(stage))
        current = get_stage(stage).estimate(state.builder, st, current, state)
        state.seen.append(stage)
        out.append(st)
    return out


@dataclass
class EstimateState:
    """What a stage's estimate may read besides its own rows: the builder (prices, counters), the
    job's input rows and the stages estimated before it."""

    builder: _Builder
    rows: _Rows | None
    seen: list[str] = field(default_factory=list)


def _note_passed_on(st: StageEstimate, stage_input: _Rows | None, state: EstimateState) -> None:
    if stage_input is not state.rows and stage_input is not None:
        st.notes.append("rows come from an earlier stage's output: sample rows with texts of the expected length")


# ---- the stages' estimates (each stage object delegates here: evoray.stagedefs) ----------------------------

def estimate_ingest(b: _Builder, st: StageEstimate, rows: _Rows | None, state: EstimateState) -> _Rows | None:
    st.notes.append("reads and writes data only")
    return rows


def estimate_optimize(b: _Builder, st: StageEstimate, rows: _Rows | None, state: EstimateState) -> _Rows | None:
    b.optimize(st, rows)
    return rows


def estimate_evolve(b: _Builder, st: StageEstimate, rows: _Rows | None, state: EstimateState) -> _Rows | None:
    c = b.config.evolve
    b.evolve(st, rows, "optimize" in state.seen)
    out = _passed_on(rows, _out(c.answer_max_tokens) if c.answer else 0, _out(c.max_tokens))
    _note_passed_on(st, rows, state)
    return out


def estimate_answer(b: _Builder, st: StageEstimate, rows: _Rows | None, state: EstimateState) -> _Rows | None:
    b.answer(st, rows)
    out = _passed_on(rows, _out(b.config.answer.max_tokens))
    _note_passed_on(st, rows, state)
    return out


def estimate_rate(b: _Builder, st: StageEstimate, rows: _Rows | None, state: EstimateState) -> _Rows | None:
    b.rate(st, rows)
    st.notes.append("later stages get at most the rows rated (the kept rows)")
    _note_passed_on(st, rows, state)
    return rows


def estimate_judge(b: _Builder, st: StageEstimate, rows: _Rows | None, state: EstimateState) -> _Rows | None:
    b.judge(st, rows)
    return rows


# ---- printing ---------------------------------------------------------------------------------------------

def _fmt_int(n: int) -> str:
    return f"{n:,}"


def _fmt_usd(x: float) -> str:
    return f"${x:,.4f}" if x < 100 else f"${x:,.2f}"


def format_estimate(estimates: Sequence[StageEstimate], detail: bool = True) -> str:
    """The table ``evoray estimate`` prints: one line per stage and a total, online and batch cost
    side by side, then (``detail``) the calls of each stage, the token counter and price used, and
    the assumptions."""
    header = ("stage", "mode", "rows", "requests", "input tokens", "output tokens", "dollars", "batch dollars")

    def batch_cell(e: StageEstimate) -> str:
        return _fmt_usd(e.batch_dollars) if e.batch_dollars is not None else "-"

    lines_data = [(e.stage, e.mode, _fmt_int(e.rows), _fmt_int(e.requests), _fmt_int(e.input_tokens),
                   _fmt_int(e.output_tokens), _fmt_usd(e.dollars), batch_cell(e)) for e in estimates]
    batch_total = sum(e.batch_dollars if e.batch_dollars is not None else e.dollars for e in estimates)
    total = ("total", "", "", _fmt_int(sum(e.requests for e in estimates)),
             _fmt_int(sum(e.input_tokens for e in estimates)), _fmt_int(sum(e.output_tokens for e in estimates)),
             _fmt_usd(sum(e.dollars for e in estimates)), _fmt_usd(batch_total))
    rows = [header, *lines_data, total]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]

    def line(r):
        return "  ".join(r[i].ljust(widths[i]) if i < 2 else r[i].rjust(widths[i]) for i in range(len(r)))

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in lines_data]
    out += ["  ".join("-" * w for w in widths), line(total)]
    batched = [e.stage for e in estimates if e.mode == "batch"]
    configured = sum(e.configured_dollars for e in estimates)
    out.append(f"as configured: {_fmt_usd(configured)} "
               + (f"({', '.join(batched)} in batch mode)" if batched else "(every stage online)"))
    if detail:
        out.append("")
        for e in estimates:
            if not e.calls and not e.notes:
                continue
            out.append(f"{e.stage}:")
            for c in e.calls:
                price = f"${c.input_per_mtok:g}/${c.output_per_mtok:g} per Mtok in/out"
                extra = f"; {c.price_note}" if c.price_note else ""
                batch = f"; batch {_fmt_usd(c.batch_dollars)}" if c.batch_dollars is not None else ""
                out.append(f"  {c.kind:<24} role {c.role:<9} {_fmt_int(c.requests):>9} req  "
                           f"{_fmt_int(c.input_tokens):>12} in  {_fmt_int(c.output_tokens):>11} out  "
                           f"{_fmt_usd(c.dollars):>10}  [{c.counter}; {price}{batch}{extra}]")
            for n in e.notes:
                out.append(f"  note: {n}")
        out.append("")
        out.append(f"assumptions: replies use {OUTPUT_FRACTION:g} of max_tokens; tokens by tiktoken for OpenAI models "
                   f"whose encoding is cached, else ~{CHARS_PER_TOKEN} characters a token + {TOKENS_PER_MESSAGE} a message; "
                   f"prompts built for up to {SAMPLE_ROWS} sampled rows and scaled; batch dollars at the providers' "
                   f"batch prices (rate, answer and judge can run in batch mode; '-' = online only). Nothing was sent.")
    return "\n".join(out)


__all__ = [
    "CallEstimate", "OUTPUT_FRACTION", "SAMPLE_ROWS", "StageEstimate", "TOKENS_PER_MESSAGE", "TokenCounter",
    "approx_tokens", "estimate", "format_estimate", "role_pricing",
]
