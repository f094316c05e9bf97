"""The real desktop image: XFCE built with debootstrap, a desktop a member reaches over
VNC, over SSH and in a browser with their password. (The other desktop tests use the minimal
image.)"""

from __future__ import annotations

import time

import paramiko
from PIL import Image

from .conftest import make_admin, wipe_mfs_files
from .test_browser import browser, canvas_colors, login_page
from .test_desktops import wait_vnc

PW = "xfce-Pw-5150"


def ssh_login(host: str, port: int, user: str, password: str, deadline_s: float = 60) -> paramiko.SSHClient:
    end = time.monotonic() + deadline_s
    while True:
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())  # a fresh desktop's own key; nothing to pin yet
        try:
            client.connect(host, port=port, username=user, password=password, timeout=10, allow_agent=False, look_for_keys=False)
            return client
        except (paramiko.SSHException, OSError):
            client.close()
            if time.monotonic() > end:
                raise
            time.sleep(2)


def test_xfce_desktop_over_vnc_and_ssh(testbed, tmp_path):
    admin = make_admin(testbed, tmp_path / "admin")
    built = admin.labvm("image", "build", "--desktop", "xfce", "--json", timeout=1800)
    assert built.returncode == 0, built.stderr
    assert admin.labvm("image", "push", "n2", timeout=900).returncode == 0
    assert admin.labvm("user", "add", "dora", "--password-stdin", stdin=PW + "\n").returncode == 0
    wipe_mfs_files(admin, "dora")
    desktop = admin.labvm_json("create", "dora", "--node", "n2", "--gpus", "1", "--memory", "2g")
    try:
        shot = tmp_path / "xfce.png"
        end = time.monotonic() + 120
        while True:
            # VNC answers before the session has painted; wait for the desktop to appear.
            result = wait_vnc(desktop["vnc"], PW, shot, deadline_s=120)
            assert result.returncode == 0, result.stdout + result.stderr
            colors = Image.open(shot).convert("RGB").getcolors(maxcolors=1 << 20)
            if colors is None or len(colors) > 16 or time.monotonic() > end:
                break
            time.sleep(3)
        assert colors is None or len(colors) > 16, "an XFCE session paints more than a few colors"
        host = desktop["vnc"].rsplit(":", 1)[0]
        client = ssh_login(host, desktop["ssh_port"], "dora", PW)
        _, out, _ = client.exec_command("id -un; id -Gn; echo $HOME")
        assert out.read().decode().split("\n")[:3] == ["dora", "dora sudo", "/home/dora"]
        client.close()
        browser_shows_xfce(admin, desktop["https"], tmp_path)
    finally:
        admin.labvm("rm", "dora", "--yes")


def browser_shows_xfce(admin, url: str, tmp_path) -> None:
    """Chromium, trusting labvm's CA, opens the desktop's HTTPS page with dora's whole password,
    and noVNC's canvas shows the XFCE session: many colours, not a blank or a bare X root."""
    page = login_page(url, "dora", PW)
    driver = browser(admin, tmp_path)
    try:
        end, colors = time.monotonic() + 120, 0
        driver.get(page)
        while time.monotonic() < end:
            colors = canvas_colors(driver)
            if colors > 16:
                break
            if "noVNC" not in driver.title:  # websockify not up yet: ask again
                time.sleep(2)
                driver.get(page)
            time.sleep(1)
        driver.save_screenshot(str(tmp_path / "xfce-in-chromium.png"))
        assert colors > 16, f"noVNC's canvas shows {colors} colours; screenshot {tmp_path / 'xfce-in-chromium.png'}"
    finally:
        driver.quit()
