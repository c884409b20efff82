"""OpenAI Chat Completions through ``openai.AsyncOpenAI``.

With ``base_url`` the same class serves any OpenAI-compatible server (vLLM, llama.cpp's server,
hosted ones): that is configuration, not a new class. SDK retries are off (``max_retries=0``):
:mod:`evoray.client` is the one retry layer. The client is built lazily inside the process (and
event loop) that uses it, never shipped across Ray.
"""

from __future__ import annotations

from typing import Any

from ..config import ProviderConfig
from ..errors import ProviderError
from .base import Completion, Provider, Request, classify_status, parse_json_reply, retry_after_from_headers


def _strict_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": False}}


class OpenAIProvider(Provider):
    kind = "openai"
    supports_json_schema = True
    needs_key = True

    def __init__(self, config: ProviderConfig, environ: dict | None = None):
        super().__init__(config)
        self._key = config.api_key(environ)  # SecretStr; MissingKeyError names the variable
        self._client = None

    def _sdk(self):
        if self._client is None:
            import openai

            self._client = openai.AsyncOpenAI(
                api_key=self._key.get_secret_value(),
                base_url=self.config.base_url or None,
                max_retries=0,
                timeout=self.config.timeout_s,
            )
        return self._client

    def prepare(self) -> None:
        self._sdk().chat.completions  # builds the client and its resource objects

    async def complete(self, request: Request) -> Completion:
        import openai

        kwargs: dict[str, Any] = dict(
            model=self.model,
            messages=request.messages,
            temperature=request.temperature,
            top_p=request.top_p,
            max_tokens=request.max_tokens,
        )
        if request.seed is not None:
            kwargs["seed"] = request.seed
        if request.json_schema is not None:
            kwargs["response_format"] = _strict_schema(request.json_schema)
        try:
            resp = await self._sdk().chat.completions.create(**kwargs)
        except openai.APIStatusError as e:
            raise self._status_error(e) from None
        except openai.APITimeoutError:
            raise ProviderError("request timed out", provider=self.name, model=self.model, retryable=True, kind="timeout") from None
        except openai.APIConnectionError as e:
            raise ProviderError(f"connection error ({type(e.__cause__).__name__ if e.__cause__ else 'no detail'})",
                                provider=self.name, model=self.model, retryable=True, kind="connection") from None
        except openai.APIError as e:  # malformed bodies and other protocol surprises
            raise ProviderError(f"bad response: {type(e).__name__}", provider=self.name, model=self.model,
                                retryable=True, kind="malformed") from None
        except (ValueError, KeyError) as e:  # JSONDecodeError is a ValueError; a TypeError is our bug, not retried
            raise ProviderError(f"malformed response body ({type(e).__name__})", provider=self.name,
                                model=self.model, retryable=True, kind="malformed") from None
        choices = getattr(resp, "choices", None)
        if not choices:
            raise ProviderError("response has no choices", provider=self.name, model=self.model, retryable=True, kind="malformed")
        msg = choices[0].message
        text = (getattr(msg, "content", None) or "")
        usage = getattr(resp, "usage", None)
        parsed = parse_json_reply(text) if request.json_schema is not None else None
        return Completion(
            text=text,
            parsed=parsed,
            input_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            output_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            provider=self.name,
            model=getattr(resp, "model", None) or self.model,
            finish_reason=getattr(choices[0], "finish_reason", None),
        )

    def _status_error(self, e) -> ProviderError:
        status = getattr(e, "status_code", None)
        headers = getattr(getattr(e, "response", None), "headers", None)
        detail = _error_detail(getattr(e, "body", None))
        kind = "rate_limit" if status == 429 else ("server" if status and status >= 500 else "client")
        return ProviderError(
            detail or f"HTTP {status}",
            provider=self.name,
            model=self.model,
            status=status,
            retryable=classify_status(status),
            retry_after=retry_after_from_headers(headers),
            kind=kind,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            try:
                await self._client.close()
            except Exception:
                pass
            self._client = None


def _error_detail(body: Any) -> str:
    """A short error message from the body, with anything key-like removed."""
    msg = ""
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            msg = str(err.get("message") or err.get("type") or "")
        else:
            msg = str(err)
    from ..secrets import redact

    return redact(msg[:300])
