"""Every config in configs/ loads; typos and bad values are errors that name the key."""

from pathlib import Path

import pytest

from evoray.config import JobConfig
from evoray.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_there_are_configs_for_every_job_kind():
    text = " ".join(p.read_text() for p in CONFIGS)
    for stage in ("optimize", "evolve", "rate", "judge", "answer"):
        assert f"[{stage}" in text or f" {stage}]" in text or f", {stage}" in text, stage


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    cfg = JobConfig.from_yaml(path)
    assert cfg.providers and cfg.pipeline


def test_misspelt_key_is_named(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("providers:\n  - {name: a, kind: local}\nrate:\n  treshold: 4\n")
    with pytest.raises(ConfigError) as ei:
        JobConfig.from_yaml(p)
    msg = str(ei.value)
    assert "rate.treshold" in msg and f"{p}:4:3" in msg  # line and column of the misspelt key


def test_error_names_the_line_and_column_of_the_offending_value(tmp_path):
    """Two providers with ``rpm:``; the bad value is on the second: the error names its own line
    and column (read from the YAML node marks), not the first provider's."""
    p = tmp_path / "c.yaml"
    p.write_text(
        "providers:\n"
        "  - name: a\n"
        "    kind: openai\n"
        "    rpm: 600\n"
        "  - {name: b, kind: openai, rpm: -5}\n"
        "ray:\n"
        "  rater_actors: 2\n"
        "  evolver_actors: many\n")
    with pytest.raises(ConfigError) as ei:
        JobConfig.from_yaml(p)
    msg = str(ei.value)
    assert f"{p}:5:34: key 'providers.1.rpm'" in msg, msg
    assert f"{p}:8:19: key 'ray.evolver_actors'" in msg, msg


def test_error_from_an_override_names_the_override(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("providers:\n  - {name: a, kind: openai, rpm: 600}\n")
    with pytest.raises(ConfigError) as ei:
        JobConfig.from_yaml(p, overrides=["providers.0.rpm=-1"])
    assert "--set providers.0.rpm=-1: key 'providers.0.rpm'" in str(ei.value)


def test_invalid_yaml_names_line_and_column(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("providers:\n  - {name: a, kind: local\nrate: {threshold: 4}\n")
    with pytest.raises(ConfigError) as ei:
        JobConfig.from_yaml(p)
    assert f"{p}:3:" in str(ei.value) and "invalid YAML" in str(ei.value)


@pytest.mark.parametrize("yaml_text, fragment", [
    ("providers:\n  - {name: a, kind: local}\nray: {rater_actors: two}\n", "ray.rater_actors"),
    ("providers:\n  - {name: a, kind: openai, rpm: -5}\n", "providers.0.rpm"),
    ("providers:\n  - {name: a, kind: cohere}\n", "providers.0.kind"),
    ("providers: []\n", "at least one provider"),
    ("providers:\n  - {name: a, kind: local}\nroles: {rater: [b]}\n", "unknown provider 'b'"),
    ("providers:\n  - {name: a, kind: local}\n  - {name: a, kind: local}\n", "duplicate provider name"),
    ("providers:\n  - {name: a, kind: local}\nroles: {painter: [a]}\n", "unknown role 'painter'"),
    ("providers: [\n", "invalid YAML"),
])
def test_bad_configs_name_the_problem(tmp_path, yaml_text, fragment):
    p = tmp_path / "c.yaml"
    p.write_text(yaml_text)
    with pytest.raises(ConfigError) as ei:
        JobConfig.from_yaml(p)
    assert fragment in str(ei.value)


def test_set_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("providers:\n  - {name: a, kind: openai, model: m}\n")
    cfg = JobConfig.from_yaml(p, overrides=["rate.threshold=4", "providers.0.rpm=600", "ray.address=auto"])
    assert cfg.rate.threshold == 4 and cfg.providers[0].rpm == 600 and cfg.ray.address == "auto"
    with pytest.raises(ConfigError, match="rate.tresh"):
        JobConfig.from_yaml(p, overrides=["rate.tresh=4"])
    with pytest.raises(ConfigError, match="key.path=value"):
        JobConfig.from_yaml(p, overrides=["novalue"])


def test_keys_are_read_from_the_environment_only(monkeypatch):
    from evoray.errors import MissingKeyError

    cfg = JobConfig.from_dict({"providers": [{"name": "a", "kind": "anthropic", "model": "m", "api_key_env": "MY_KEY"}]})
    monkeypatch.delenv("MY_KEY", raising=False)
    with pytest.raises(MissingKeyError, match="MY_KEY"):
        cfg.providers[0].api_key()
    monkeypatch.setenv("MY_KEY", "sk-secret-value-123456")
    key = cfg.providers[0].api_key()
    assert "sk-secret" not in repr(key) and "sk-secret" not in cfg.model_dump_json()


def test_readme_has_the_current_configuration_reference():
    from evoray.docs import config_reference

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert config_reference().strip() in readme, "regenerate: (README head) + `evoray config-reference`"
