"""Persistent, content-addressed response cache.

One JSON file per answer under ``DIR/ab/abcdef....json``, written atomically (temp file + rename),
so every actor on a machine shares it safely and a folder on a shared disk (NFS, a mounted bucket)
shares it across nodes. When nodes do not share a disk each node has its own cache: a repeated
request is a hit only on the node that answered it first; set ``cache.dir`` to a shared path to
get hits on every node.

The key hashes what changes the answer: the answer's source, provider kind, model, messages,
temperature, top_p, max_tokens, seed, JSON schema, how the schema reached the server (json_schema,
json_object or only the prompt: a provider with ``structured_output: auto`` may change mode
mid-job, and the replies differ) and the sample index (so m samples at temperature > 0 stay
distinct). Never keys, batch sizes or concurrency.

The source is the provider's ``cache_namespace`` when set, else its ``base_url`` (normalised: the
scheme and host in lower case, no trailing slash), else the SDK's default endpoint. So a config
pointed at another server never gets the first server's answers from the cache; entries that
really serve the same model under different URLs share answers by naming one ``cache_namespace``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .files import write_json_atomic
from .providers.base import Completion, Request


def default_cache_dir() -> Path:
    base = os.environ.get("EVORAY_CACHE_DIR") or os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / ("" if os.environ.get("EVORAY_CACHE_DIR") else "evoray")


def cache_key(kind: str, model: str, request: Request, source: str | None = None, variant: str | None = None) -> str:
    """The key of one request's answer (see the module docstring for what goes in)."""
    payload = {
        "v": 2,
        "source": source,
        "variant": variant,
        "kind": kind,
        "model": model,
        "messages": request.messages,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "max_tokens": request.max_tokens,
        "seed": request.seed,
        "json_schema": request.json_schema,
        "sample_index": request.sample_index,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ResponseCache:
    def __init__(self, directory: str | Path | None = None):
        self.dir = Path(directory) if directory else default_cache_dir()
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> Completion | None:
        try:
            data = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, OSError):
            return None
        c = Completion.from_dict(data)
        c.cached = True
        c.latency_s = 0.0
        c.attempts = 0
        return c

    def put(self, key: str, completion: Completion) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        data: dict[str, Any] = completion.to_dict()
        data["cached"] = False
        # no fsync: a cache entry lost to a power cut is only a miss
        write_json_atomic(path, data, fsync=False, ensure_ascii=False)
