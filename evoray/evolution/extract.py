"""Getting the evolved instruction out of an evolution reply, and a method out of an optimizer reply.

:func:`extract_instruction` looks only at the reply. The evolved instruction is the text after the
**last** final-marker line of the reply, which makes it immune to markers that appear earlier
(for example inside an echoed original instruction); given the ``original`` instruction, markers
inside a verbatim copy of it anywhere in the reply are ignored too, so a row that carries the
marker cannot supply its own "evolved instruction". Accepted marker lines, case-insensitive,
with or without a colon, bold (``**``), heading hashes or a ``Step 4`` prefix:

1. the method's own final marker (the last ``#...#`` token of its text that contains "final");
2. ``Finally Rewritten Instruction`` / ``Final Rewritten Instruction`` / ``Final Instruction``
   (also with ``Prompt``);
3. only when none of those is present: ``Rewritten Instruction`` / ``Rewritten Prompt`` /
   ``Evolved Instruction`` / ``New Instruction`` / ``Created Prompt``.

A marker must start its line (after the prefixes above); only when no such line exists is a
marker of kind 1 or 2 in the middle of a line used, and only when styled as one (followed by
``#``, ``**`` or ``:``), so a refusal that merely mentions "the final rewritten instruction" is
not taken for one. The text after it may sit on the same line or the next ones,
or inside a fenced block; it stops at a following ``#Section#`` heading line. Missing, empty or
without a single letter or digit is a
:class:`~evoray.errors.ParseError` carrying the raw reply.
"""

from __future__ import annotations

import re

from ..errors import ParseError
from .methods import Method, ensure_slot, has_slot

_PREFIX = r"^[ \t]*(?:[-*>]+[ \t]*)?(?:(?:step[ \t]*)?\d+[ \t]*[.:)\-]?[ \t]*)?[*_# \t]*"
_SUFFIX = r"\b[#*_ \t]*:?[#*_ \t]*"
_FINAL_WORDS = r"final(?:ly)?(?:[ \t]+(?:rewritten|evolved))?[ \t]+(?:instruction|prompt)"
_OTHER_WORDS = r"(?:rewritten|evolved|new|created)[ \t]+(?:instruction|prompt)"
_SECTION_LINE = re.compile(r"^[ \t]*#[A-Za-z][^#\n]{0,60}#", re.MULTILINE)
_FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.MULTILINE | re.DOTALL)


def _patterns(words: str) -> tuple[re.Pattern, re.Pattern]:
    anchored = re.compile(_PREFIX + words + _SUFFIX, re.IGNORECASE | re.MULTILINE)
    # mid-line only when styled as a marker: followed by "#", "**" or ":"
    loose = re.compile(r"[*_#]*" + words + r"\b[ \t]*(?:#|\*\*|:)[#*_ \t]*:?[#*_ \t]*", re.IGNORECASE)
    return anchored, loose


_FINAL = _patterns(_FINAL_WORDS)
_OTHER = _patterns(_OTHER_WORDS)


def _method_patterns(method: Method | None) -> tuple[re.Pattern, re.Pattern] | None:
    marker = method.final_marker if method is not None else None
    if not marker:
        return None
    core = re.escape(marker.strip("#").strip())
    hashed = r"#[ \t]*" + core + r"[ \t]*#"
    # at a line start: "#Marker#" or a bare "Marker" ending the line or followed by a colon
    words = r"(?:" + hashed + r"|" + core + r"(?=[*_ \t]*(?::|$)))"
    return (re.compile(_PREFIX + words + r"[*_ \t]*:?[*_ \t]*", re.IGNORECASE | re.MULTILINE),
            re.compile(r"[*_]*" + hashed + r"[*_ \t]*:?[*_ \t]*", re.IGNORECASE))


def _last_end(reply: str, groups: list[tuple[re.Pattern, re.Pattern]], loose: bool = True) -> int | None:
    for which in ((0, 1) if loose else (0,)):  # anchored lines first, then anywhere
        ends = [m.end() for g in groups for m in g[which].finditer(reply)]
        if ends:
            return max(ends)
    return None


def _clean(rest: str, scan: str | None = None) -> str:
    """The text after a marker; ``scan`` is the same text with echoed row data blanked, where a
    following ``#Section#`` heading is looked for."""
    scan = rest if scan is None else scan
    lead = len(rest) - len(rest.lstrip())
    rest, scan = rest.strip(), scan[lead:]
    if rest.startswith("```"):
        m = _FENCE.match(rest)
        rest = m.group(1) if m else rest.strip("`")
    else:
        sec = _SECTION_LINE.search(scan)
        if sec:
            rest = rest[: sec.start()]
    rest = rest.strip()
    for a, b in (("**", "**"), ('"', '"'), ("\u201c", "\u201d")):
        if len(rest) > len(a) + len(b) and rest.startswith(a) and rest.endswith(b) and a not in rest[len(a):-len(b)]:
            rest = rest[len(a):-len(b)].strip()
    return rest


def _mask_echoes(reply: str, original: str | None, groups: list[tuple[re.Pattern, re.Pattern]]) -> str:
    """``reply`` with verbatim copies of ``original`` blanked (same length), when ``original`` itself
    holds a marker: markers that came with the row's data are not the reply's own."""
    if not original or _last_end(original, groups + [_OTHER]) is None:
        return reply
    return reply.replace(original, "\0" * len(original))


def extract_instruction(reply: str, method: Method | None = None, original: str | None = None) -> str:
    """The evolved instruction in ``reply``: the text after its last final marker (see the module).

    ``original`` (the instruction that was evolved): markers inside a verbatim echo of it in the
    reply are ignored, so an instruction that carries ``#Finally Rewritten Instruction#`` cannot
    pass its own text off as the reply's answer."""
    reply = reply or ""
    first = [p for p in (_method_patterns(method), _FINAL) if p is not None]
    scan = _mask_echoes(reply, original, first)
    end = _last_end(scan, first)
    if end is None:
        end = _last_end(scan, [_OTHER], loose=False)
    if end is None:
        raise ParseError("the evolution reply has no final rewritten instruction marker", raw=reply)
    text = _clean(reply[end:], scan[end:])
    if not re.search(r"\w", text):
        raise ParseError("the evolution reply's final rewritten instruction is empty", raw=reply)
    return text


_BLOCK = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)


def extract_method(reply: str) -> str:
    """The method text in an optimizer reply: the last fenced block that holds the instruction slot
    (or, when none does, the last fenced block with the slot appended, see
    :func:`~evoray.evolution.methods.ensure_slot`). No complete fenced block is a ParseError."""
    blocks = [m.group(1) for m in _BLOCK.finditer(reply or "")]
    blocks = [b for b in blocks if b.strip()]
    if not blocks:
        raise ParseError("the optimizer reply has no complete fenced block with a method", raw=reply or "")
    with_slot = [b for b in blocks if has_slot(b)]
    chosen = ensure_slot(with_slot[-1] if with_slot else blocks[-1])
    return chosen.strip("\n") + "\n"
