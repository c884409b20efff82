"""The layers only point down, and nothing below the Ray layer imports Ray.

Every module of evoray/, actors/ and cluster/ is given a layer in :data:`LAYERS` (README, "Layout").
The test reads each module's imports with ``ast`` (function-level imports included, since lazy
imports are imports too) and fails on an import of a higher layer, on ``ray`` (or actors/, cluster/)
imported below the Ray layer, and on a module that has no layer yet (a new module must be placed).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: layer number -> (name, module prefixes); a module takes the layer of its longest matching prefix
LAYERS: dict[int, tuple[str, tuple[str, ...]]] = {
    0: ("base", ("evoray", "evoray.errors", "evoray.config", "evoray.secrets", "evoray.schema", "evoray.failfast",
                 "evoray.progress", "evoray.files", "evoray.tokens")),
    1: ("llm", ("evoray.providers", "evoray.client", "evoray.gate", "evoray.limiter", "evoray.cache",
                "evoray.ledger", "evoray.batch")),
    2: ("data", ("evoray.io", "evoray.sinks", "evoray.seen", "evoray.export")),
    3: ("methods", ("evoray.prompts", "evoray.parsing", "evoray.rating", "evoray.selection", "evoray.judge",
                    "evoray.evolution", "evoray.answer", "evoray.ensemble", "evoray.measures", "evoray.plots")),
    4: ("stage parts", ("evoray.stage", "evoray.workers", "evoray.runtime", "evoray.estimate", "evoray.report", "evoray.resources",
                        "evoray.docs")),
    5: ("ray", ("actors", "evoray.raydata", "evoray.console", "evoray.jobs", "evoray.stages", "evoray.stagedefs",
                "evoray.batch_stage")),
    6: ("cluster", ("cluster",)),
    7: ("cli", ("evoray.cli", "evoray.commands")),
}
RAY_LAYER = 5
#: upward edges allowed on purpose, with the reason: a provider entry is validated against its kind's
#: class (key variable, base_url, structured-output modes), looked up in the providers' registry
#: inside the validator, since the providers themselves are built from the config
ALLOWED = {("evoray.config", "evoray.providers")}
#: evoray.stage (stage parts) loads the built-in stages (evoray.stagedefs, Ray layer: their drivers run
#: pools) by name with importlib the first time its registry is read, like an entry point; that is not
#: an import edge, and test_stage_registry checks the load pulls no Ray in
#: test helpers (fake servers, scripted providers) are not part of the product's layering
EXEMPT = ("evoray.testing",)


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for n, (_, prefixes) in LAYERS.items():
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best_len:
                best, best_len = n, len(p)
    return best


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file, relative ones resolved."""
    mod = module_name(path)
    package = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module:
                    out.append((node.lineno, target))
                else:  # from . import io: the imported names are modules
                    out += [(node.lineno, f"{target}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, node.module))
    return out


def product_files() -> list[Path]:
    return sorted(p for pkg in ("evoray", "actors", "cluster") for p in (ROOT / pkg).rglob("*.py")
                  if not module_name(p).startswith(EXEMPT))


def violations(files) -> list[str]:
    bad = []
    for path in files:
        mod = module_name(path)
        here = layer_of(mod)
        if here is None:
            bad.append(f"{mod}: no layer (add it to LAYERS in tests/test_layers.py and to README's layout)")
            continue
        for line, target in imports_of(path):
            top = target.split(".")[0]
            where = f"{path.relative_to(ROOT)}:{line}"
            if top == "ray":
                if here < RAY_LAYER:
                    bad.append(f"{where}: {mod} ({LAYERS[here][0]}) imports {target}")
                continue
            if top not in ("evoray", "actors", "cluster") or target.startswith(EXEMPT):
                continue
            there = layer_of(target)
            if there is not None and there > here and (mod, target) not in ALLOWED:
                bad.append(f"{where}: {mod} ({LAYERS[here][0]}) imports {target} ({LAYERS[there][0]}), a higher layer")
    return bad


def test_every_module_has_a_layer_and_imports_only_downward():
    files = product_files()
    assert len(files) > 40
    assert violations(files) == []


def test_the_check_catches_an_upward_and_a_ray_import(tmp_path, monkeypatch):
    """The walk itself: a fake rating module that imports ray and the stages is refused twice."""
    fake = ROOT / "evoray" / "_layer_probe_rating.py"
    monkeypatch.setitem(LAYERS, 3, ("methods", LAYERS[3][1] + ("evoray._layer_probe_rating",)))
    try:
        fake.write_text("def f():\n    import ray\n    from .stages import run_pipeline\n", encoding="utf-8")
        bad = violations([fake])
    finally:
        fake.unlink()
    assert len(bad) == 2
    assert "_layer_probe_rating.py:2: " in bad[0] and bad[0].endswith("imports ray")
    assert "evoray.stages (ray), a higher layer" in bad[1]
