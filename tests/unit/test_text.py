"""safe(): outside text shown on the admin's terminal, every dangerous character made visible,
and the escaping reversible, so what is shown says exactly what was there."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from labvm.text import cell, safe, storable, word


def unescape(shown: str) -> str:
    """The inverse of safe(), written from its documented escapes."""
    def one(match: re.Match) -> str:
        escape = match.group(0)
        if escape == "\\\\":
            return "\\"
        code = int(escape[2:], 16)
        if escape[1] == "x" and code >= 0x80:
            return chr(0xDC00 + code)  # an undecodable byte, as surrogateescape holds it
        return chr(code)

    return re.sub(r"\\\\|\\x[0-9a-f]{2}|\\u[0-9a-f]{4}|\\U[0-9a-f]{8}", one, shown)


def undecodable(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


@pytest.mark.parametrize(
    "raw, shown",
    [
        ("plain name.txt", "plain name.txt"),
        ("caf\u00e9 \u4e2d\u6587", "caf\u00e9 \u4e2d\u6587"),
        ("[/]", "[/]"),
        ("\x1b[2J\x1b[H", "\\x1b[2J\\x1b[H"),
        ("\x1b]8;;http://evil/\x1b\\click\x1b]8;;\x1b\\", "\\x1b]8;;http://evil/\\x1b\\\\click\\x1b]8;;\\x1b\\\\"),
        ("bell\x07 cr\r bs\x08 nul\x00 del\x7f", "bell\\x07 cr\\x0d bs\\x08 nul\\x00 del\\x7f"),
        ("line\nbreak\ttab", "line\\x0abreak\\x09tab"),
        ("c1 csi \x9b31m", "c1 csi \\u009b31m"),
        ("\u202eevil\u202c \u2066x\u2069", "\\u202eevil\\u202c \\u2066x\\u2069"),
        ("a\\x1b", "a\\\\x1b"),
        (undecodable(b"bad \xff\xfe bytes"), "bad \\xff\\xfe bytes"),
        ("\ud800", "\\ud800"),
    ],
)
def test_dangerous_characters_become_visible_escapes(raw, shown):
    assert safe(raw) == shown
    assert unescape(shown) == raw


def test_keep_lines_keeps_newlines_and_tabs_only():
    assert safe("a\nb\tc\r\x1b", keep_lines=True) == "a\nb\tc\\x0d\\x1b"


def test_anything_is_shown_as_printable_text():
    assert safe(None) == "None" and safe(42) == "42"
    assert cell(None).plain == "" and cell("[red]x[/]").plain == "[red]x[/]"


@given(st.one_of(st.text(), st.binary().map(undecodable)))
def test_safe_output_is_printable_and_says_exactly_what_was_there(raw):
    shown = safe(raw)
    assert shown.isprintable()
    shown.encode("utf-8")  # never a lone surrogate: any terminal or pipe takes it
    assert unescape(shown) == raw


@given(st.one_of(st.text(), st.binary().map(undecodable)))
def test_storable_text_encodes(raw):
    storable(raw).encode("utf-8")


@pytest.mark.parametrize("raw", ["alice", "a b", "x\\x20y", "tab\there", "\x1b[2J now", "\u202eevil"])
def test_word_is_one_printable_word_that_reads_back(raw):
    shown = word(raw)
    assert " " not in shown and shown.isprintable()
    assert unescape(shown) == raw
