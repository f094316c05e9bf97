"""What a member name may be.

A name ends up as a Linux account inside a desktop (useradd), in the container's host name
(`NAME-desktop`: letters, digits and inner hyphens only), a container name, a directory on
MooseFS and an argument to the node helpers. So it is held to the narrowest common rule: a
lowercase letter, then lowercase letters, digits or '-', not ending in '-', at most 31
characters. No '_' (not in a host name) and no '.'. Nothing else can reach a shell or a path.

The node helpers keep the same pattern in scripts/node_helpers/_contract.py (they cannot import
labvm); a unit test holds the two equal.
"""

from __future__ import annotations

import re
from typing import Iterable

from .errors import BadInput

USER_NAME_PATTERN = r"[a-z](?:[a-z0-9-]{0,29}[a-z0-9])?"
USER_NAME_RE = re.compile(USER_NAME_PATTERN)

# Accounts and groups of the Debian desktop image (minimal and xfce: `labvm image build` also
# records the image's own /etc/passwd and /etc/group, see images.image_account_names), common
# system accounts of Debian and Ubuntu nodes, and names that read as roles rather than people.
# A member given one of these would share its uid, files and groups inside the desktop, and
# then be given sudo on top.
RESERVED_NAMES = frozenset(
    """
    root daemon bin sys sync games man lp mail news uucp proxy www-data backup list irc gnats
    nobody nogroup _apt messagebus sshd polkitd avahi avahi-autoipd colord lightdm pulse
    pulse-access rtkit saned usbmux tss uuidd dnsmasq geoclue tcpdump statd rpc rpcuser
    nvidia-persistenced postfix postdrop ntp ntpsec chrony _chrony sddm gdm speech-dispatcher
    cups-pk-helper kernoops whoopsie hplip fwupd-refresh landscape pollinate syslog uml-net
    nm-openvpn nm-openconnect lxd dhcpcd mysql postgres redis
    adm tty disk kmem dialout fax voice cdrom floppy tape sudo audio dip src shadow utmp video
    sasl plugdev staff users input kvm render netdev crontab sgx lpadmin bluetooth scanner
    ssl-cert systemd-journal _ssh wheel
    docker mfs labvm admin administrator operator guest user ubuntu debian xfce vnc ssh
    """.split()
)
RESERVED_PREFIXES = ("systemd-",)

PASSWORD_MIN = 8
PASSWORD_MAX = 128


def is_valid_user_name(name: object) -> bool:
    """The shape alone: what the node helpers accept."""
    return isinstance(name, str) and USER_NAME_RE.fullmatch(name) is not None


def is_reserved(name: str, image_accounts: Iterable[str] = ()) -> bool:
    return name in RESERVED_NAMES or name.startswith(RESERVED_PREFIXES) or name in set(image_accounts)


def validate_user_name(name: str, image_accounts: Iterable[str] = ()) -> str:
    """A name a new member may have. `image_accounts`: the accounts and groups of the built
    desktop images, refused like the static list."""
    if not is_valid_user_name(name):
        raise BadInput(
            f"invalid user name {name!r}: use a lowercase letter followed by up to 30 lowercase "
            "letters, digits or '-', not ending in '-' (no '_' or '.')"
        )
    if is_reserved(name, image_accounts):
        raise BadInput(f"user name {name!r} is reserved: the desktop image or the system has an account "
                       "or group of that name; pick another")
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
