"""Passphrases as people type, paste and export them: the check both the CLI and the key nodes apply.

Standard library only, so the CLI can check a passphrase before it imports torch.
"""
from __future__ import annotations

import unicodedata

#: Unicode categories of characters that cannot be seen at the start or end of a passphrase: control (a newline),
#: format (a zero-width space), and space, line and paragraph separators.
INVISIBLE_CATEGORIES = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def describe_char(ch: str) -> str:
    """"U+000A LINE FEED" style name of one character (control characters have no Unicode name)."""
    return f"U+{ord(ch):04X} {unicodedata.name(ch, 'CONTROL CHARACTER')}"


def invisible_edge(secret: str) -> str | None:
    """"starts with U+0020 SPACE" (or "ends with …") when ``secret`` begins or ends with whitespace or an
    invisible character (control, format such as a zero-width space, separator); else None."""
    for where, ch in (("starts", secret[:1]), ("ends", secret[-1:])):
        if ch and (ch.isspace() or unicodedata.category(ch) in INVISIBLE_CATEGORIES):
            return f"{where} with {describe_char(ch)}"
    return None
