"""User names: Linux-valid only, never anything a shell or a path could misread."""

import pytest

from labvm.errors import BadInput
from labvm.names import validate_password, validate_user_name


@pytest.mark.parametrize("name", ["alice", "bob2", "a", "li_wei", "jean-luc", "x" * 31])
def test_valid_names(name):
    assert validate_user_name(name) == name


INJECTIONS = [
    "alice; rm -rf /",
    "$(reboot)",
    "`id`",
    "alice && true",
    "alice|cat",
    "a b",
    "alice\n",
    "alice\nroot",
    "../etc",
    "alice/..",
    "-rf",
    "--help",
    "Alice",
    "ALICE",
    "1alice",
    "_alice",
    "alice$",
    "ali'ce",
    'ali"ce',
    "al*",
    "alice\x00",
    "ålice",
    "аlice",  # Cyrillic а
    "x" * 32,
    "",
    " alice",
    "alice.bob",
    "${IFS}",
]


@pytest.mark.parametrize("name", INJECTIONS)
def test_injection_attempts_are_refused(name):
    with pytest.raises(BadInput, match="invalid user name"):
        validate_user_name(name)


@pytest.mark.parametrize("name", ["root", "daemon", "nobody", "www-data", "sshd", "docker", "sudo", "labvm", "systemd-oom"])
def test_reserved_names_are_refused(name):
    with pytest.raises(BadInput, match="reserved"):
        validate_user_name(name)


def test_non_string_is_refused():
    with pytest.raises(BadInput):
        validate_user_name(None)


def test_password_rules_never_echo_the_password():
    for pw in ["Zq9!", "Zq9!" * 40, "has\nnewline!", "tab\there-12"]:
        with pytest.raises(BadInput) as err:
            validate_password(pw)
        assert pw not in str(err.value)
    assert validate_password("long enough") == "long enough"
