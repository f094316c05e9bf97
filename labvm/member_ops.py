"""The operations behind a member's own commands (labvm/member_command.py), on their desktop.

Each goes through what the admin's command of the same name uses (Desktops, Storage, the
files helper, Switcher), so the same plans, checks, journal and per-desktop locks hold: a
member's `stop` while the admin's `switch` runs waits for nothing and exits 75, as a second
admin command would.
"""

from __future__ import annotations

import datetime as dt

from .admin import AdminHome
from .member_account import load_account, permitopen_host
from .text import safe

LOCAL_VNC_PORT = 5901
LOCAL_HTTPS_PORT = 6901


def _when(ts) -> str:
    try:
        return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")
    except (TypeError, ValueError, OverflowError, OSError):
        return "-"


class LabOps:
    def __init__(self, home: AdminHome):
        self.home = home

    def _desktops(self):
        from .desktops import Desktops

        return Desktops(self.home)

    def _desktop(self, user: str):
        with self.home.state() as db:
            return self._desktops().get(db, user)

    def _connect(self, desktop) -> str:
        page = desktop.https_url(self.home.config)
        return (f"{desktop.user}'s desktop runs on {desktop.node}" + (f": {page}" if page else "")
                + "\n(password: your labvm password; `tunnel` prints how to reach it over SSH)")

    def status(self, user: str) -> str:
        desktops = self._desktops()
        with self.home.state() as db:
            desktop = desktops.get(db, user)
            capacities = desktops.capacities(db, list(self.home.config.nodes))
        shown = desktop.as_dict(self.home.config)
        gpus = ", ".join(f"{g['index']} ({g['uuid']})" for g in desktop.gpus) or "none"
        lines = [
            f"{user}'s desktop: {desktop.state} on {desktop.node}",
            f"  browser: {desktop.https_url(self.home.config) or '-'}",
            f"  VNC: {shown.get('vnc') or '-'}",
            f"  image: {desktop.image[:12] if desktop.image else '-'}",
            f"  GPUs: {gpus}",
            "free GPUs:",
        ]
        for cap in capacities:
            if cap.error:
                lines.append(f"  {cap.node.name}: unreachable")
            else:
                lines.append(f"  {cap.node.name}: {cap.free_gpus} of {len(cap.gpus)}")
        return safe("\n".join(lines), keep_lines=True)

    def start(self, user: str) -> str:
        return safe(self._connect(self._desktops().start(user)))

    def stop(self, user: str) -> str:
        self._desktops().stop(user)
        return f"stopped {user}'s desktop"

    def restart(self, user: str) -> str:
        desktops = self._desktops()
        desktops.stop(user)
        return safe(self._connect(desktops.start(user)))

    def passwd(self, user: str, password: str) -> str:
        self._desktops().passwd(user, password)
        return f"password of {user} changed"

    def versions(self, user: str) -> str:
        from .storage import Storage

        desktop, verdicts = Storage(self.home).versions(user)
        lines = [f"versions of {user}'s files (newest first):"]
        for v in verdicts:
            mark = " (in use)" if v.version.number == desktop.version else ""
            lines.append(f"  v{v.version.number}{mark}  {_when(v.version.created)}  {v.version.reason or '-'}  "
                         f"{v.kept_by or 'pruned by the next backup'}")
        return safe("\n".join(lines), keep_lines=True)

    def restore(self, user: str, version: int) -> str:
        from .storage import Storage

        Storage(self.home).restore(user, version)
        return f"restored {user}'s desktop to version {version}"

    def get(self, user: str, path: str) -> bytes:
        from .files import read_file

        return read_file(self.home, user, path)

    def put(self, user: str, path: str, content: bytes) -> str:
        from .files import write_content

        changed = write_content(self.home, user, content, path)
        return safe(f"wrote {path} ({len(content)} bytes)" if changed else f"{path} already has that content")

    def switch(self, user: str, node: str) -> str:
        from .switch import Switcher

        result = Switcher(self.home).switch(user, node)
        down = f"; downtime {result.downtime_s:.1f} s" if result.downtime_s is not None else ""
        return safe(f"moved {user}'s desktop from {result.source} to {result.target}{down}")

    def tunnel(self, user: str) -> str:
        from .desktops import NOVNC_PAGE

        desktop = self._desktop(user)
        if not desktop.vnc_port:
            return f"{user}'s desktop has no ports yet: start it first"
        cfg = self.home.config
        node = cfg.node(desktop.node)
        host = permitopen_host(node.host)
        account = load_account(self.home.home)
        login = f"{account.account}@{account.ssh_host}" if account else "lab@ADMIN"
        port = f" -p {account.ssh_port}" if account and account.ssh_port != 22 else ""
        vnc = cfg.vnc.listen == "published"
        forwards = f"-L {LOCAL_HTTPS_PORT}:{host}:{node.https_port(desktop.vnc_port)}"
        if vnc:
            forwards = f"-L {LOCAL_VNC_PORT}:{host}:{desktop.vnc_port} " + forwards
        lines = [
            f"ssh -N {forwards}{port} {login}",
            f"then open https://localhost:{LOCAL_HTTPS_PORT}/{NOVNC_PAGE} in a browser that trusts labvm's CA",
        ]
        if vnc:
            lines.append(f"or point a VNC client at localhost:{LOCAL_VNC_PORT}")
        else:
            lines.append(f"(raw VNC is {'bound to the node itself' if cfg.vnc.listen == 'loopback' else 'off'}: "
                         "the browser is the way in)")
        lines.append("password: your labvm password")
        return "\n".join(lines)
