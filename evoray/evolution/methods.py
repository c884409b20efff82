"""Evolving methods as data: text with one instruction slot, identified by a hash of the text.

A :class:`Method` is what Evol-Instruct calls an evolving method and what Auto Evol-Instruct
optimizes. Its text holds the slot :data:`~evoray.prompts.evolution.SLOT` (``{instruction}``);
:func:`render` replaces the slot with the instruction by plain string replacement (not
``str.format``), so instructions holding braces or markers are inserted verbatim, and text the
optimizer LLM writes may contain braces freely.

Built-ins (:data:`BUILTINS`): ``initial`` (the universal initial method), the in-depth operations
``add_constraints``, ``deepening``, ``concretizing``, ``increase_reasoning``, ``complicate_input``,
and the in-breadth ``breadth``.

:func:`load_method` takes a built-in name or a file (such as ``best_method.txt`` written by the
optimizer). A file whose text has no slot gets one appended after a marker line,
:data:`APPENDED_SLOT`, so the instruction follows the method text in the prompt.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError
from ..prompts.evolution import BREADTH_METHOD, IN_DEPTH_METHODS, INITIAL_METHOD, SLOT

APPENDED_SLOT = f"\n\n#Instruction#:\n{SLOT}\n"
"""Appended to method text that has no slot (a hand-written file, an optimizer reply)."""

_SLOT_VARIANTS = re.compile(r"\{\{\s*instruction\s*\}\}|\{\s*instruction\s*\}", re.IGNORECASE)
_MARKER_TOKEN = re.compile(r"#[A-Za-z][^#\n]{1,60}#")


def method_id(text: str) -> str:
    """Short stable id of a method: the first 12 hex digits of sha256 of its text."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def has_slot(text: str) -> bool:
    """True when the text holds the slot or a variant of it (``{Instruction}``, ``{{instruction}}``)."""
    return _SLOT_VARIANTS.search(text) is not None


def ensure_slot(text: str) -> str:
    """Method text with exactly the canonical slot: variants such as ``{Instruction}`` or
    ``{{instruction}}`` become ``{instruction}``; text without any slot gets :data:`APPENDED_SLOT`."""
    text = _SLOT_VARIANTS.sub(SLOT, text)
    if SLOT not in text:
        text = text.rstrip() + APPENDED_SLOT
    return text


@dataclass(frozen=True)
class Method:
    """An evolving method. ``id`` is computed from ``text`` when not given (and checked when it is)."""

    name: str
    text: str
    id: str = field(default="")

    def __post_init__(self):
        if SLOT not in self.text:
            raise ValueError(f"method '{self.name}' has no instruction slot {SLOT} (use ensure_slot() or load_method())")
        real = method_id(self.text)
        if not self.id:
            object.__setattr__(self, "id", real)
        elif self.id != real:
            raise ValueError(f"method '{self.name}': id {self.id} does not match its text (expected {real})")

    @classmethod
    def from_text(cls, name: str, text: str) -> "Method":
        """A method from any text: the slot is normalized or appended (see :func:`ensure_slot`)."""
        return cls(name, ensure_slot(text))

    @property
    def markers(self) -> list[str]:
        """The ``#...#`` marker tokens of the text, in order (e.g. ``#Finally Rewritten Instruction#``)."""
        return _MARKER_TOKEN.findall(self.text.replace(SLOT, "\n"))

    @property
    def final_marker(self) -> str | None:
        """The last marker that names a final result (contains "final"), if the text has one."""
        finals = [m for m in self.markers if "final" in m.lower()]
        return finals[-1] if finals else None

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "id": self.id, "text": self.text}


def _builtins() -> dict[str, Method]:
    texts = {"initial": INITIAL_METHOD, **IN_DEPTH_METHODS, "breadth": BREADTH_METHOD}
    return {name: Method(name, text) for name, text in texts.items()}


BUILTINS: dict[str, Method] = _builtins()
IN_DEPTH = tuple(IN_DEPTH_METHODS)
IN_BREADTH = ("breadth",)


def load_method(name_or_path: str | Path) -> Method:
    """A built-in method by name, or the method whose text is in a file.

    Built-in names win over same-named files in the working folder. A file without the slot gets
    the instruction appended after an ``#Instruction#:`` marker line. Unknown names and empty files
    are :class:`~evoray.errors.ConfigError` (exit code 2), naming the built-ins.
    """
    key = str(name_or_path)
    if key in BUILTINS:
        return BUILTINS[key]
    path = Path(key)
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: method file is not UTF-8 text ({e.reason} at byte {e.start})") from None
        if not text.strip():
            raise ConfigError(f"{path}: method file is empty")
        return Method.from_text(path.stem, text)
    raise ConfigError(
        f"unknown evolving method '{key}': not a built-in ({', '.join(BUILTINS)}) and no such file"
    )


def render(method: Method, instruction: str) -> list[dict[str, str]]:
    """The request messages that evolve ``instruction`` with ``method``.

    Plain replacement of the slot in the method text: the instruction is inserted verbatim and is
    not scanned again, whatever braces or markers it holds.
    """
    return [{"role": "user", "content": method.text.replace(SLOT, instruction)}]
