"""User names: one rule that useradd, the container's host name, docker and the node helpers
all accept; never anything a shell or a path could misread; never a system account."""

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from labvm.config import Node
from labvm.desktops import Limits, build_spec
from labvm.errors import BadInput
from labvm.names import USER_NAME_PATTERN, validate_password, validate_user_name

HELPERS = Path(__file__).resolve().parents[2] / "scripts" / "node_helpers"
# What the container's host name (`NAME-desktop`) must be: RFC 1123 labels, at most 63 characters.
HOSTNAME_LABEL = re.compile(r"(?=.{1,63}$)[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
# Debian's useradd (shadow) default rule for a login, at most 32 characters.
USERADD_NAME = re.compile(r"(?=.{1,32}$)[a-z_][a-z0-9_-]*\$?")


def helper_contract():
    """scripts/node_helpers/_contract.py as the helpers import it (it needs only the stdlib)."""
    spec = importlib.util.spec_from_file_location("labvm_test_contract", HELPERS / "_contract.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


def test_the_helpers_hold_the_same_rule():
    assert helper_contract().USER_PATTERN == USER_NAME_PATTERN


LIMITS = Limits(cpus=1.0, cpuset=None, memory=1 << 30, shm=1 << 26, pids=512, io_weight=None, io_read_bps=None, io_write_bps=None)
VALID = ["alice", "bob2", "a", "jean-luc", "li-wei-2", "x" * 31, "a" + "-" * 29 + "z"]


@pytest.mark.parametrize("name", VALID)
def test_valid_names(name):
    assert validate_user_name(name) == name


@pytest.mark.parametrize("name", VALID)
def test_every_valid_name_makes_a_host_name_an_account_and_passes_the_helpers(name):
    spec = build_spec(name, 2000, Node(name="n1", host="10.0.0.1"), "xfce", LIMITS, [], (20000, None))
    assert HOSTNAME_LABEL.fullmatch(spec["hostname"]) and spec["name"] == f"labvm-{name}"
    assert USERADD_NAME.fullmatch(name)
    contract = helper_contract()
    assert contract.user_name("user", name) == name


@pytest.mark.parametrize("name", ["a_b", "li_wei", "bob-", "a-", "x" * 32, "bob.smith"])
def test_names_a_host_name_or_useradd_would_refuse_are_refused_everywhere(name):
    with pytest.raises(BadInput, match="invalid user name"):
        validate_user_name(name)
    contract = helper_contract()
    with pytest.raises(contract.BadRequest):
        contract.user_name("user", name)


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
    "a_b",
    "alice-",
]


@pytest.mark.parametrize("name", INJECTIONS)
def test_injection_attempts_are_refused(name):
    with pytest.raises(BadInput, match="invalid user name"):
        validate_user_name(name)


# The accounts and groups of the Debian bookworm desktop image (minimal and xfce builds).
DEBIAN_DESKTOP_ACCOUNTS = """
    root daemon bin sys sync games man lp mail news uucp proxy www-data backup list irc gnats nobody
    _apt systemd-network systemd-resolve systemd-timesync systemd-journal systemd-coredump messagebus
    tcpdump statd sshd nvidia-persistenced avahi pulse polkitd lightdm colord rtkit usbmux dnsmasq
    postfix ntp adm tty disk kmem dialout fax voice cdrom floppy tape sudo audio dip shadow utmp
    video sasl plugdev staff users input kvm render netdev crontab nogroup
""".split()


@pytest.mark.parametrize("name", DEBIAN_DESKTOP_ACCOUNTS + ["systemd-oom", "docker", "labvm", "admin"])
def test_reserved_names_are_refused(name):
    with pytest.raises(BadInput) as refused:
        validate_user_name(name)
    assert "reserved" in str(refused.value) or "invalid" in str(refused.value)


def test_reserved_names_that_fit_the_rule_say_reserved():
    for name in ("tcpdump", "statd", "nvidia-persistenced", "messagebus", "systemd-timesync", "sshd"):
        with pytest.raises(BadInput, match=f"user name '{name}' is reserved"):
            validate_user_name(name)


def test_accounts_of_a_built_image_are_refused_too():
    assert validate_user_name("gamesd") == "gamesd"
    with pytest.raises(BadInput, match="reserved"):
        validate_user_name("gamesd", image_accounts={"gamesd", "other"})


def test_non_string_is_refused():
    with pytest.raises(BadInput):
        validate_user_name(None)


def test_password_rules_never_echo_the_password():
    for pw in ["Zq9!", "Zq9!" * 40, "has\nnewline!", "tab\there-12"]:
        with pytest.raises(BadInput) as err:
            validate_password(pw)
        assert pw not in str(err.value)
    assert validate_password("long enough") == "long enough"
