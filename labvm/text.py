"""Text from outside labvm, made safe to show on the admin's terminal.

Anything a desktop, a node or the audit log says is a member's text: a file name, an error
from a helper, a sync daemon's last error. Printed as it is, an escape sequence in it would
drive the admin's terminal (move the cursor, rewrite the screen, plant a hyperlink), and a
bidi override would make it read differently from what it is. `safe` turns every such
character into a visible escape; rich markup is a separate matter: print the result with
markup off, or inside a `rich.text.Text` (what `cell` gives).
"""

from __future__ import annotations

from rich.text import Text

# str.isprintable() is False for what must not reach a terminal raw: controls (C0, DEL, C1),
# format characters (bidi overrides and isolates, zero-width ones), lone surrogates
# (undecodable bytes, or JSON's \udXXX), separators other than the space, unassigned code points.
_SURROGATE_ESCAPES = range(0xDC80, 0xDD00)


def _escape(char: str, keep_lines: bool) -> str:
    if char == "\\":
        return "\\\\"
    if keep_lines and char in "\n\t":
        return char
    if char.isprintable():
        return char
    code = ord(char)
    if code in _SURROGATE_ESCAPES:
        return f"\\x{code - 0xDC00:02x}"  # the byte that did not decode, as it was
    if code < 0x80:  # \x80-\xff stay for undecodable bytes; U+0080-U+009F is \u0080-\u009f
        return f"\\x{code:02x}"
    if code < 0x10000:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def safe(value, keep_lines: bool = False) -> str:
    """`value` as text a terminal shows as it is: controls, format characters and
    undecodable bytes become visible escapes (ESC is \\x1b, U+202E is \\u202e, a byte that was
    not UTF-8 is \\xNN, NN >= 80), and a backslash becomes \\\\, so an escape cannot be faked.
    keep_lines keeps newlines and tabs, for multi-line output."""
    text = value if isinstance(value, str) else str(value)
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text
    return "".join(_escape(char, keep_lines) for char in text)


def cell(value, style: str = "") -> Text:
    """A rich table cell (or printable) holding outside text, never read as markup."""
    return Text(safe("" if value is None else value), style=style)


def word(value) -> str:
    """Outside text as one word of a line whose columns are split on spaces: `safe`, and a
    space as \\x20 (a backslash in the text is \\\\, so that cannot be faked)."""
    return safe(value).replace(" ", "\\x20")


def storable(value: str) -> str:
    """Text any UTF-8 store takes: lone surrogates (undecodable bytes) spelled as escapes."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")
