"""Provider registry: kind -> class. ``build_provider(config)`` is the only constructor callers use."""

from __future__ import annotations

from ..config import ProviderConfig
from ..errors import ConfigError
from .base import Completion, Provider, Request

_REGISTRY: dict[str, type[Provider]] = {}


def register(kind: str, cls: type[Provider]) -> None:
    if kind in _REGISTRY:
        raise ValueError(f"provider kind '{kind}' is already registered ({_REGISTRY[kind].__name__})")
    _REGISTRY[kind] = cls


def provider_class(kind: str) -> type[Provider]:
    """The class of a provider kind: what callers ask about a kind (``runs_locally``,
    ``default_key_env``, ``supports_json_schema``...) is a class attribute of it."""
    if kind not in _REGISTRY:
        raise ConfigError(f"unknown provider kind '{kind}' (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[kind]


def provider_kinds() -> dict[str, type[Provider]]:
    """Every registered kind and its class, in registration order."""
    return dict(_REGISTRY)


def runs_locally(config: ProviderConfig) -> bool:
    """Whether the provider entry's model runs inside the job (see ``Provider.runs_locally``)."""
    return provider_class(config.kind).runs_locally


def build_provider(config: ProviderConfig, **kwargs) -> Provider:
    return provider_class(config.kind)(config, **kwargs)


def _register_builtins() -> None:
    from .anthropic_provider import AnthropicProvider
    from .local import LocalProvider
    from .openai_provider import OpenAIProvider

    register("openai", OpenAIProvider)
    register("anthropic", AnthropicProvider)
    register("local", LocalProvider)


_register_builtins()

__all__ = ["Completion", "Provider", "Request", "build_provider", "provider_class", "provider_kinds", "register",
           "runs_locally"]
