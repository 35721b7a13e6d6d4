"""Untrusted text made safe for where it goes.

Names and messages come from places we do not control: file names (bytes on POSIX, kept as
Python does with ``surrogateescape``), list files, and the server's answers. Each destination has
its own rule, and this module is the one place that applies them:

- **UTF-8 files and JSON** (:func:`valid_unicode`): a lone surrogate cannot be encoded, so an
  undecodable byte is written as ``\\xNN`` (readable; the exact bytes of a source travel in a field
  of their own, see :func:`raw_name`).
- **terminals** (:func:`for_terminal`): control characters (ESC, BEL, CR, C1, bidi overrides) are
  shown escaped, so a class name cannot set the window title, clear the screen or reorder text.
- **CSV cells** (:func:`csv_cell`): a cell starting with ``=``, ``+``, ``-``, ``@``, TAB or CR is
  prefixed with ``'``, as OWASP advises against formula injection in spreadsheets.
"""

from __future__ import annotations

import re
from typing import Any

__all__ = ["csv_cell", "for_terminal", "raw_name", "valid_unicode"]

_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 controls but newline, DEL, C1 controls, and the bidirectional overrides and isolates.
_TERMINAL_UNSAFE = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _escape_surrogate(match: re.Match[str]) -> str:
    code = ord(match.group())
    # U+DC80..U+DCFF is how surrogateescape keeps an undecodable byte 0x80..0xFF.
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"\\u{code:04x}"


def valid_unicode(text: str) -> str:
    """``text`` with every lone surrogate written out (``\\xe9`` for an undecodable byte), so
    it can be encoded as UTF-8."""
    if text.isascii():
        return text
    return _SURROGATE.sub(_escape_surrogate, text)


def raw_name(text: str) -> bytes | None:
    """The exact bytes of a name that is not valid UTF-8 (``None`` when it is: then the text
    itself is exact). Only names decoded with ``surrogateescape`` have bytes to give back."""
    if text.isascii() or _SURROGATE.search(text) is None:
        return None
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return None  # a surrogate that stands for no byte: there is nothing more exact


def _escape_control(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code <= 0xFF else f"\\u{code:04x}"


def for_terminal(text: str) -> str:
    """``text`` with control characters shown as escapes (newlines kept): safe to print."""
    return _TERMINAL_UNSAFE.sub(_escape_control, valid_unicode(text))


def csv_cell(value: Any) -> Any:
    """A CSV cell that a spreadsheet will not run as a formula (strings only are touched)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value
