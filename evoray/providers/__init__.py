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
    if kind not in _REGISTRY:
        raise ConfigError(f"unknown provider kind '{kind}' (known: {', '.join(sorted(_REGISTRY))})")
    return _REGISTRY[kind]


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

__all__ = ["Completion", "Provider", "Request", "build_provider", "register", "provider_class"]
