"""Rate examples/sample.jsonl through the real pipeline against the built-in fake LLM server.

No key and no model needed: the fake server speaks the OpenAI API on 127.0.0.1 and gives
ratings from the AlpaGasus paper's score distribution. Run from the project root:

    .venv/bin/python examples/rate_with_fake_server.py
"""

import os
import sys
from pathlib import Path

import yaml

from evoray.cli import main
from evoray.testing.fake_server import FakeLLMServer, FakeServerConfig
from evoray.testing.responders import PipelineResponder

HERE = Path(__file__).resolve().parent

if __name__ == "__main__":
    os.environ.setdefault("OPENAI_API_KEY", "sk-example-not-a-real-key")
    with FakeLLMServer(FakeServerConfig(latency_s=0.05, rpm=600), responder=PipelineResponder()) as srv:
        cfg = {
            "providers": [{"name": "fake", "kind": "openai", "model": "fake-model", "base_url": srv.openai_base_url,
                           "rpm": 600, "price": {"input_per_mtok": 0.15, "output_per_mtok": 0.6}}],
            "input": {"path": str(HERE / "sample.jsonl")},
            "output": {"dir": "out/example_rate"},
            "cache": {"dir": "out/example_cache"},
            "ray": {"rater_actors": 2, "num_cpus": 2},
            "pipeline": ["rate"],
        }
        path = Path("out/example_rate.yaml")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        code = main(["run", str(path)])
        print("server saw:", {k: srv.stats()[k] for k in ("requests", "ok", "rate_limited")})
    sys.exit(code)
