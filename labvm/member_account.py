"""The members' SSH account on the admin host: members help themselves with no daemon.

`labvm member setup --account lab` prepares one local account (say `lab`) whose
`~/.ssh/authorized_keys` labvm writes and rewrites. Each member key registered with `labvm
user key add` is one line of it, with a forced command that names the member:

    command="sudo -n LABVM --config FILE member alice",restrict,port-forwarding,permitopen="n1:20000" ssh-ed25519 AAAA... c

so whatever a member types after `ssh lab@ADMIN` never runs: sshd runs the forced command
(through the account's shell, `/bin/sh -c`, which is why the account has a real shell) and
puts what they typed in SSH_ORIGINAL_COMMAND, which `labvm member USER` parses strictly
(labvm/member_command.py). `restrict` turns off the pty, agent, X11 and port forwarding and
~/.ssh/rc; `port-forwarding` with one `permitopen` per port of the member's desktop gives back
`ssh -L` to those ports alone. The file follows the desktops: it is rewritten when keys change
and after every create, switch (drain too) and rm (`refresh_authorized_keys`).

labvm's state is root's alone, so the forced command runs labvm as root through sudo: one
rule in /etc/sudoers.d lets the account run exactly `LABVM --config FILE member *`, nothing
else, with sudo's env_reset as always. sudo resets the environment, so SSH_ORIGINAL_COMMAND is
kept by an `env_keep` scoped to that one command (standard input is not free for it: passwd
and put read the member's data from there).

The account's name, home and the labvm it runs are recorded in the admin home
(`member-account.json`); without that record the refresh does nothing.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .errors import BadInput, LabvmError, StateError, ToolMissing
from .fsutil import atomic_write
from .member_keys import MemberKey

RECORD = "member-account.json"
SUDOERS_FILE = Path("/etc/sudoers.d/labvm-members")
SHELL = "/bin/sh"
# Paths written into authorized_keys and sudoers: nothing that needs quoting in either.
_SAFE_PATH = re.compile(r"/[A-Za-z0-9/._+-]*")
_ACCOUNT = re.compile(r"[a-z_][a-z0-9_-]{0,30}")
_HOST = re.compile(r"[A-Za-z0-9.:-]+")


@dataclass(frozen=True)
class Account:
    """What `labvm member setup` set up: recorded in the admin home."""

    account: str
    home: str
    labvm: str
    config: str
    ssh_host: str
    ssh_port: int = 22
    sudoers: str = str(SUDOERS_FILE)

    @property
    def forced_command(self) -> str:
        return f"sudo -n {self.labvm} --config {self.config} member"


def safe_path(path: str, what: str) -> str:
    if not _SAFE_PATH.fullmatch(path) or "/../" in path + "/" or "//" in path:
        raise BadInput(f"{what} {path!r} must be an absolute path of letters, digits and / . _ + - only")
    return path


def check_account_name(name: str) -> str:
    if not _ACCOUNT.fullmatch(name) or name == "root":
        raise BadInput(f"account name {name!r}: a lowercase letter or _, then up to 30 lowercase letters, digits, _ or -; not root")
    return name


def labvm_executable() -> str:
    """The labvm the forced command runs: the one running now, as an absolute path."""
    found = shutil.which("labvm") if not sys.argv or not os.path.basename(sys.argv[0]) == "labvm" else sys.argv[0]
    if not found:
        raise ToolMissing(msg="cannot tell where the labvm executable is; run `labvm member setup` as the installed labvm")
    return os.path.abspath(found)


# -- the record -----------------------------------------------------------------------------
def load_account(home: Path) -> Account | None:
    path = Path(home) / RECORD
    try:
        data = json.loads(path.read_text())
        return Account(**data)
    except FileNotFoundError:
        return None
    except (ValueError, TypeError) as exc:
        raise StateError(f"{path}: not a record of `labvm member setup` ({exc}); run it again") from None


def save_account(home: Path, account: Account) -> None:
    atomic_write(Path(home) / RECORD, (json.dumps(asdict(account), indent=2) + "\n").encode(), 0o600)


# -- the files --------------------------------------------------------------------------------
def permitopen_host(host: str) -> str:
    if not _HOST.fullmatch(host):
        raise BadInput(f"node host {host!r} cannot be written into a permitopen option")
    return f"[{host}]" if ":" in host else host


def authorized_key_line(account: Account, user: str, key: MemberKey | dict, ports: list[tuple[str, int]]) -> str:
    """One member key with its forced command, `restrict`, and `ssh -L` to these ports only."""
    if isinstance(key, dict):
        key_type, b64, comment = key["key_type"], key["key_b64"], key["comment"]
    else:
        key_type, b64, comment = key.type, key.blob_b64, key.comment
    options = [f'command="{account.forced_command} {user}"', "restrict"]
    if ports:
        options.append("port-forwarding")
        options += [f'permitopen="{permitopen_host(host)}:{int(port)}"' for host, port in ports]
    return ",".join(options) + f" {key_type} {b64}" + (f" {comment}" if comment else "")


def authorized_keys_text(account: Account, keys: list[dict], ports_of: Callable[[str], list[tuple[str, int]]]) -> str:
    lines = ["# Written by labvm (`labvm user key add`, `labvm member setup`): edits here are overwritten."]
    for key in keys:
        lines.append(authorized_key_line(account, key["user"], key, ports_of(key["user"])))
    return "\n".join(lines) + "\n"


def sudoers_alias(account: str) -> str:
    return "LABVM_MEMBER_" + re.sub(r"[^A-Z0-9]", "_", account.upper())


def sudoers_text(account: Account) -> str:
    """The one rule the forced command needs: this account runs labvm's member command as root,
    nothing else; the environment is reset as always but for SSH_ORIGINAL_COMMAND, which is
    what the member typed and what the member command reads (its stdin is the member's data)."""
    alias = sudoers_alias(account.account)
    return (
        "# Written by `labvm member setup`: members' forced command (see labvm's README).\n"
        f"Cmnd_Alias {alias} = {account.labvm} --config {account.config} member *\n"
        f"Defaults!{alias} env_reset\n"
        f'Defaults!{alias} env_keep += "SSH_ORIGINAL_COMMAND"\n'
        f"Defaults!{alias} !requiretty\n"
        f"{account.account} ALL=(root) NOPASSWD: {alias}\n"
    )


def write_owned(directory: Path, name: str, data: bytes, uid: int, gid: int, mode: int = 0o600) -> None:
    """Write directory/name atomically as uid:gid with mode, never following a link the
    account's owner could have put in the directory's place or the file's."""
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        found = os.fstat(dir_fd)
        if found.st_uid not in (0, uid) or found.st_mode & 0o022:
            raise StateError(f"{directory} is not owned by the account or root, or is writable by others")
        tmp = f".{name}.{os.getpid()}.{os.urandom(4).hex()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dir_fd)
        try:
            os.fchown(fd, uid, gid)
            os.fchmod(fd, mode)
            os.write(fd, data)
            os.fsync(fd)
            os.close(fd)
            fd = -1
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            if fd >= 0:
                os.close(fd)
            try:
                os.unlink(tmp, dir_fd=dir_fd)
            except FileNotFoundError:
                pass
            raise
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def ssh_dir(account: Account) -> tuple[Path, int, int]:
    """The account's ~/.ssh, made 0700 and the account's if missing; its uid and gid."""
    try:
        entry = pwd.getpwnam(account.account)
    except KeyError:
        raise StateError(f"account {account.account!r} is gone; run `labvm member setup --account {account.account}` again") from None
    home = Path(account.home)
    directory = home / ".ssh"
    try:
        os.mkdir(directory, 0o700)
        os.chown(directory, entry.pw_uid, entry.pw_gid, follow_symlinks=False)
    except FileExistsError:
        pass
    return directory, entry.pw_uid, entry.pw_gid


def write_authorized_keys(account: Account, text: str) -> Path:
    directory, uid, gid = ssh_dir(account)
    write_owned(directory, "authorized_keys", text.encode(), uid, gid, 0o600)
    return directory / "authorized_keys"


# -- what the commands call ---------------------------------------------------------------------
def desktop_ports(home) -> Callable[[str], list[tuple[str, int]]]:
    """user -> [(node host, port)] a member may forward to: their desktop's HTTPS port, and its
    raw VNC port where <vnc><listen> publishes it on the node's address."""
    from .desktops import Desktops

    with home.state() as db:
        desktops = {d.user: d for d in Desktops(home).list(db)}
    cfg = home.config

    def ports_of(user: str) -> list[tuple[str, int]]:
        desktop = desktops.get(user)
        if desktop is None or not desktop.vnc_port:
            return []
        node = cfg.node(desktop.node)
        vnc = [(node.host, desktop.vnc_port)] if cfg.vnc.listen == "published" else []
        return [*vnc, (node.host, node.https_port(desktop.vnc_port))]

    return ports_of


def refresh_authorized_keys(home) -> Path | None:
    """Write the account's authorized_keys from the keys and desktops in the state database; a
    no-op where no account was set up."""
    account = load_account(home.home)
    if account is None:
        return None
    with home.state() as db:
        keys = db.member_keys()
    return write_authorized_keys(account, authorized_keys_text(account, keys, desktop_ports(home)))


def _warn(message: str) -> None:
    print(f"labvm: warning: {message}", file=sys.stderr)


def refresh_quietly(home, warn: Callable[[str], None] = _warn) -> None:
    """After keys changed or a desktop was created, moved or removed: what was done stands
    whatever happens here; a failure is a warning that names the fix."""
    try:
        refresh_authorized_keys(home)
    except (LabvmError, OSError) as exc:
        warn(f"members' authorized_keys not rewritten: {exc}; run `labvm member refresh`")


def ensure_account(name: str, home_dir: str | None, run=subprocess.run) -> tuple[str, bool]:
    """The account, created with useradd if missing (a real shell: sshd runs the forced command
    with `SHELL -c`; no usable password: `*`, which sshd still lets log in with a key, unlike a
    locked `!` without PAM). Returns its home and whether it was created."""
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        entry = None
    if entry is not None:
        if home_dir is not None and os.path.normpath(home_dir) != os.path.normpath(entry.pw_dir):
            raise BadInput(f"account {name} exists with home {entry.pw_dir}, not {home_dir}")
        if entry.pw_shell in ("", "/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false"):
            # The forced command runs through the shell: nologin would refuse every member.
            run(["usermod", "--shell", SHELL, name], check=True, capture_output=True)
        return entry.pw_dir, False
    if shutil.which("useradd") is None:
        raise ToolMissing(msg="useradd not found; create the account yourself and run this again")
    home_dir = home_dir or f"/home/{name}"
    result = run(["useradd", "--create-home", "--home-dir", home_dir, "--shell", SHELL, "--password", "*",
                  "--comment", "labvm members", name], capture_output=True, text=True)
    if result.returncode != 0:
        raise StateError(f"useradd {name} failed: {(result.stderr or '').strip()}")
    os.chmod(home_dir, 0o755)
    return home_dir, True


def install_sudoers(account: Account, run=subprocess.run) -> Path:
    """The sudoers rule, checked with visudo -c before it is put in place (mode 0440)."""
    target = Path(account.sudoers)
    if shutil.which("visudo") is None:
        raise ToolMissing(msg="visudo not found: install sudo (apt-get install sudo) and run this again")
    target.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".labvm-members.", dir=target.parent)
    try:
        os.fchmod(fd, 0o440)
        with os.fdopen(fd, "w") as f:
            f.write(sudoers_text(account))
        checked = run(["visudo", "-c", "-q", "-f", tmp], capture_output=True, text=True)
        if checked.returncode != 0:
            raise StateError(f"visudo refused the members' sudoers rule: {(checked.stderr or checked.stdout).strip()}")
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return target


def setup(home, account_name: str, home_dir: str | None = None, ssh_host: str | None = None, ssh_port: int = 22,
          sudoers: str | None = None, labvm: str | None = None) -> tuple[Account, list[str]]:
    """`labvm member setup`: the account, the sudoers rule, the record, the authorized_keys."""
    check_account_name(account_name)
    home.config.node_names()  # the cluster file is valid before anything names it
    with home.state() as db:  # and the state database is there and current
        db.member_keys()
    if home_dir is not None:
        safe_path(os.path.abspath(home_dir), "--home")
    done = []
    path, created = ensure_account(account_name, home_dir and os.path.abspath(home_dir))
    done.append(f"{'created' if created else 'kept'} account {account_name} (home {path}, shell {SHELL})")
    host = ssh_host or socket.getfqdn()
    if not _HOST.fullmatch(host):
        raise BadInput(f"--ssh-host {host!r} is not a host name or address")
    account = Account(account=account_name, home=path, labvm=safe_path(labvm or labvm_executable(), "labvm executable"),
                      config=safe_path(str(home.config_path), "cluster file"), ssh_host=host, ssh_port=ssh_port,
                      sudoers=safe_path(sudoers or str(SUDOERS_FILE), "--sudoers"))
    done.append(f"wrote {install_sudoers(account)}: {account_name} may run `{account.labvm} --config {account.config} member *` as root")
    save_account(home.home, account)
    written = refresh_authorized_keys(home)
    done.append(f"wrote {written} (0600, {account_name}'s): one line per member key")
    return account, done
