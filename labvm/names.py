"""What a user name may be.

A name ends up as a Linux account inside a desktop, a container name, a
directory on MooseFS and an argument to helpers, so it is held to the
narrowest common rule: a lowercase letter, then lowercase letters, digits,
'_' or '-', at most 31 characters. Nothing else can reach a shell or a path.
"""

from __future__ import annotations

import re

from .errors import BadInput

USER_NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,30}")

# Accounts and groups that exist in a Debian desktop image or on a node, plus
# names that would read as roles rather than people.
RESERVED_NAMES = frozenset(
    """
    root daemon bin sys sync games man lp mail news uucp proxy www-data backup
    list irc gnats nobody nogroup _apt systemd-network systemd-resolve
    systemd-timesync systemd-journal systemd-coredump messagebus sshd polkitd
    avahi colord lightdm pulse rtkit saned usbmux tss uuidd dnsmasq geoclue
    adm tty disk kmem dialout fax voice cdrom floppy tape sudo audio dip src
    shadow utmp video sasl plugdev staff users input kvm render netdev crontab
    docker mfs labvm admin administrator operator guest user ubuntu debian
    xfce vnc ssh
    """.split()
)

PASSWORD_MIN = 8
PASSWORD_MAX = 128


def validate_user_name(name: str) -> str:
    if not isinstance(name, str) or not USER_NAME_RE.fullmatch(name):
        raise BadInput(
            f"invalid user name {name!r}: use a lowercase letter followed by up to 30 lowercase "
            "letters, digits, '_' or '-'"
        )
    if name in RESERVED_NAMES or name.startswith("systemd-"):
        raise BadInput(f"user name {name!r} is reserved for the system; pick another")
    return name


def validate_password(password: str) -> str:
    """Length and character rules only; the value itself never goes into a message."""
    if len(password) < PASSWORD_MIN:
        raise BadInput(f"password too short: at least {PASSWORD_MIN} characters")
    if len(password) > PASSWORD_MAX:
        raise BadInput(f"password too long: at most {PASSWORD_MAX} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in password):
        raise BadInput("password contains control characters (newline, tab, ...)")
    return password
