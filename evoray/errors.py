"""The typed error tree.

Errors are mapped at the boundary where they arise (config loading, input reading, provider
calls), stay picklable because they cross Ray process boundaries, and only become exit codes in
the CLI (``evoray.cli``: 0 done, 1 failed, 2 usage, 3 budget). Messages tell the user what to do. No message ever contains an API
key: provider errors carry provider name, model and status only.
"""

from __future__ import annotations


class EvorayError(Exception):
    """Base class. ``exit_code`` is what the CLI returns for it."""

    exit_code = 1

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.message = message

    def __reduce__(self):  # keep picklable for subclasses with extra fields
        return (self.__class__._rebuild, (self.__class__, self.__dict__.copy()))

    @staticmethod
    def _rebuild(cls, state):
        obj = cls.__new__(cls)
        Exception.__init__(obj, state.get("message", ""))
        obj.__dict__.update(state)
        return obj

    def __str__(self) -> str:
        return self.message


class UsageError(EvorayError):
    """Bad usage, config or input: exit code 2."""

    exit_code = 2


class ConfigError(UsageError):
    """A config file or override is wrong. The message names the key (and file)."""


class InputError(UsageError):
    """A data file is wrong. ``where`` is ``file:line`` or ``file[record N]``."""

    def __init__(self, message: str, where: str | None = None):
        super().__init__(f"{where}: {message}" if where else message)
        self.where = where
        self.reason = message


class MissingKeyError(UsageError):
    """A provider needs a key that is not set."""

    def __init__(self, provider: str, env_var: str):
        super().__init__(
            f"provider '{provider}' has no API key: set {env_var} "
            f"(or point the provider at another variable with api_key_env, or use kind: local)"
        )
        self.provider = provider
        self.env_var = env_var


class StopJob(EvorayError):
    """The job must stop (not just this row): the budget is spent or a provider is unusable.

    Row workers let it through instead of filing a failed row; finished rows are kept.
    """


class BudgetExceeded(StopJob):
    """The job's spend reached ``budget_usd``: exit code 3, finished rows are kept."""

    exit_code = 3


#: the ``reason`` prefix of a row a pool actor could not do because its provider was halted; the
#: driver stops the stage on the first such row (a picklable string crosses Ray where a live
#: exception in a row would not)
HALTED_PREFIX = "provider_halted: "


class ProviderHalted(StopJob):
    """A provider failed the same way every time (a wrong URL, key, model or setting): exit code 1.

    Raised by the retry layer (:mod:`evoray.client`) once the fail-fast rule has seen a provider's
    first ``fail_fast_after`` attempts, or its last ``fail_fast_window`` attempts, all fail with one
    deterministic error. The message quotes the server's error, names the provider and the config
    key that most likely fixes it.
    """

    def __init__(self, message: str, provider: str = "?", signature: str | None = None, hint: str | None = None):
        super().__init__(message)
        self.provider = provider
        self.signature = signature
        self.hint = hint


class ProviderError(EvorayError):
    """A call to a provider failed.

    ``status`` is the HTTP status when there was one (None for timeouts and connection errors),
    ``retryable`` says whether the retry layer may try again, ``retry_after`` is the advised wait
    in seconds from ``Retry-After`` / ``retry-after-ms`` when the server sent one, ``limits`` the
    reply's rate-limit headers (for the key's gate).
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str = "?",
        model: str = "?",
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        kind: str = "error",
        limits: dict | None = None,
    ):
        where = f"provider '{provider}' (model {model})"
        st = f" status {status}" if status is not None else ""
        super().__init__(f"{where}{st}: {message}")
        self.provider = provider
        self.model = model
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.kind = kind  # one of KINDS below
        self.limits = limits  # rate-limit headers of the reply (providers.base.rate_limit_info), if any
        self.detail = message  # the server's own words (or ours for transport failures), without the prefix

    #: what happened, by ``kind``: an HTTP status class, or a transport failure named for its cause
    KINDS = {
        "rate_limit": "HTTP 429: the provider's rate limit",
        "server": "HTTP 5xx: a server-side failure (overload, crash); retried",
        "validation": "the server rejected the request's shape (a 4xx, or a 5xx whose body is a validation error)",
        "client": "HTTP 4xx: the request was refused (key, model, path, parameters)",
        "refused": "connection refused: nothing listens at base_url's host and port",
        "dns": "DNS lookup failed: base_url's host name does not resolve",
        "tls": "TLS handshake failed: https to a plain-http port, or a certificate problem",
        "timeout": "no answer within timeout_s",
        "reset": "the connection was closed or reset before a complete answer",
        "connection": "another connection failure",
        "malformed": "the reply was not a valid answer body",
    }


class RetriesExhausted(EvorayError):
    """Every attempt failed; ``last`` is the last cause."""

    def __init__(self, attempts: int, last: BaseException | None):
        super().__init__(f"gave up after {attempts} attempt(s); last error: {last}")
        self.attempts = attempts
        self.last = str(last) if last is not None else None


class ParseError(EvorayError):
    """A model reply could not be parsed into what was asked for (kept with the raw text).

    ``kind`` says which: ``unparseable`` (no score where one belongs) or ``out_of_range`` (a number
    was found where the score belongs, but it is not on the asked scale: 9.5 on 0-5, 4.5/10).
    """

    def __init__(self, message: str, raw: str = "", kind: str = "unparseable"):
        super().__init__(message)
        self.raw = raw
        self.kind = kind


class StageFailed(EvorayError):
    """Too many rows of a stage failed (``max_failed_fraction``): exit code 1, its tables are kept."""


class RayLost(EvorayError):
    """Ray (the local Ray, a node or the cluster's head) stopped under the job: exit code 1.

    ``detail`` says what was noticed; the stage that was running keeps its finished rows.
    """

    def __init__(self, detail: str, message: str | None = None):
        super().__init__(message or f"Ray was lost under the job: {detail}")
        self.detail = detail
