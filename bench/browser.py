#!/usr/bin/env python3
"""The desktop in a browser: noVNC's first painted frame against a native VNC client's.

One desktop on the testbed (the minimal image, <vnc><listen>published), measured in one run,
each the median of --runs, the two kinds interleaved so both see the same machine:

  browser  headless chromium (Debian's, driven by selenium and chromedriver; its NSS database
           trusts labvm's CA), a fresh profile each run, so nothing is cached: from the
           navigation's start (performance.timeOrigin) to the first animation frame whose noVNC
           canvas shows the desktop. That is TLS, HTTP Basic auth, the page and its scripts,
           the WebSocket through websockify, VncAuth and the first framebuffer update drawn.
  native   vncsnapshot (TightVNC's client, in C) on the desktop's raw VNC port: from its exec to
           its exit with the first full frame written (TCP, VncAuth, the first framebuffer
           update in zlib or hextile, its JPEG file).

Reported: browser / native. Run as root, holding the testbed lock:

    flock /tmp/labvm-testbed.lock .venv/bin/python bench/browser.py [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TESTBED = REPO / "scripts" / "testbed"
LABVM = REPO / ".venv" / "bin" / "labvm"
TESTBED_DIR = Path(os.environ.get("LABVM_TESTBED_DIR", "/var/lib/labvm-testbed"))
ADMIN_FILES = ("bkConfxml.xml", "known_hosts", "id_ed25519", "id_ed25519.pub")
USER, PASSWORD = "benchweb", "bench-Web-Pw-7310"
NODE = "n1"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"

# Installed before the page's own scripts: each animation frame, the noVNC canvas scaled down
# to 160x100 (cheap to read back), and the time of the first frame with more than one colour.
FIRST_FRAME = """
(() => {
  const probe = document.createElement('canvas');
  probe.width = 160; probe.height = 100;
  const step = () => {
    const canvas = document.querySelector('#noVNC_container canvas');
    if (canvas && canvas.width && canvas.height) {
      const ctx = probe.getContext('2d', {willReadFrequently: true});
      ctx.drawImage(canvas, 0, 0, 160, 100);
      const data = ctx.getImageData(0, 0, 160, 100).data;
      for (let i = 4; i < data.length; i += 4)
        if (data[i] !== data[0] || data[i + 1] !== data[1] || data[i + 2] !== data[2]) {
          window.__labvmFirstFrame = performance.now();
          return;
        }
    }
    requestAnimationFrame(step);
  };
  requestAnimationFrame(step);
})();
"""


def run(argv, env=None, timeout=3600, stdin="", check=True) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, env=env, input=stdin, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        sys.exit(f"{' '.join(map(str, argv))} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def labvm(env, *args, stdin="", timeout=3600) -> str:
    return run([str(LABVM), *args], env=env, stdin=stdin, timeout=timeout).stdout


def on_node(*argv, check=True) -> subprocess.CompletedProcess:
    return run([sys.executable, str(TESTBED), "exec", NODE, "--", *argv], check=check)


def browser_home(ca_pem: Path, where: Path) -> Path:
    """A HOME whose NSS database trusts labvm's CA, as a member's browser would after
    `labvm ca export`."""
    nssdb = where / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    run(["certutil", "-N", "-d", f"sql:{nssdb}", "--empty-password"])
    run(["certutil", "-A", "-d", f"sql:{nssdb}", "-n", "labvm", "-t", "C,,", "-i", str(ca_pem)])
    return where


def browser_first_frame(url: str, home: Path, profile: Path) -> float:
    """Seconds from navigation start to the first painted desktop frame, in a fresh chromium."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                f"--user-data-dir={profile}", "--no-first-run"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER, env={**os.environ, "HOME": str(home)}),
                              options=options)
    try:
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": FIRST_FRAME})
        driver.get(url)
        deadline = time.monotonic() + 60
        while True:
            first = driver.execute_script("return window.__labvmFirstFrame || null")
            if first is not None:
                return float(first) / 1000
            if time.monotonic() > deadline:
                sys.exit(f"the noVNC canvas showed no desktop within 60 s; title {driver.title!r}")
            time.sleep(0.1)
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def native_first_frame(host: str, port: int, passwd_file: Path, out: Path) -> float:
    """Seconds vncsnapshot takes from exec to exit with the first frame written (HOST::PORT
    names a port; HOST:N would be display N, port 5900 + N)."""
    out.unlink(missing_ok=True)
    started = time.monotonic()
    # Not its Tight decoder: it waits forever on TigerVNC's LastRect updates.
    result = subprocess.run(["vncsnapshot", "-quiet", "-allowblank", "-encodings", "zlib hextile copyrect raw",
                             "-passwd", str(passwd_file),
                             f"{host}::{port}", str(out)], capture_output=True, text=True, timeout=60)
    took = time.monotonic() - started
    if result.returncode != 0 or not out.exists() or out.stat().st_size == 0:
        sys.exit(f"vncsnapshot failed ({result.returncode}): {result.stderr.strip()}")
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="first frames of each kind (default 5); the median counts")
    args = parser.parse_args()
    run([sys.executable, str(TESTBED), "down"], timeout=900)
    run([sys.executable, str(TESTBED), "up"], timeout=900)
    home = Path(tempfile.mkdtemp(prefix="labvm-bench-browser-"))
    try:
        admin = home / "admin"
        admin.mkdir(mode=0o700)
        for name in ADMIN_FILES:
            shutil.copy2(TESTBED_DIR / "admin" / name, admin / name)
        env = {**os.environ, "LABVM_CONFIG": str(admin / "bkConfxml.xml"), "COLUMNS": "200"}
        labvm(env, "init")
        image = json.loads(labvm(env, "image", "build", "--desktop", "minimal", "--json"))["sha256"]
        labvm(env, "image", "push", image)
        labvm(env, "node", "check", NODE)  # mounts MooseFS there, for the wipe below
        labvm(env, "user", "add", USER, "--password-stdin", stdin=PASSWORD + "\n")
        on_node("rm", "-rf", f"/mnt/labvm-mfs/vms/{USER}", f"/var/lib/labvm/data/vms/{USER}", check=False)
        labvm(env, "create", USER, "--node", NODE, "--memory", "1g", "--gpus", "0")
        desktop = next(d for d in json.loads(labvm(env, "status", "--json"))["desktops"] if d["user"] == USER)
        vnc_host, vnc_port = desktop["vnc"].rsplit(":", 1)
        page = urllib.parse.urlsplit(desktop["https"])
        quoted = urllib.parse.quote(PASSWORD, safe="")
        # Basic auth in the URL: websockify answers the VNC server's VncAuth with it.
        url = f"https://{USER}:{quoted}@{page.hostname}:{page.port}{page.path}?{page.query}"
        secrets = home / "secrets"
        secrets.mkdir(mode=0o700)
        passwd_file = secrets / "vncpasswd"
        with open(passwd_file, "wb") as out:
            subprocess.run(["vncpasswd", "-f"], input=PASSWORD.encode() + b"\n", stdout=out, check=True)
        chrome_home = browser_home(admin / "ca.pem", home / "chrome-home")

        browser_first_frame(url, chrome_home, home / "warm-profile")  # untimed: the desktop's first client
        native_first_frame(vnc_host, int(vnc_port), passwd_file, home / "frame.jpg")
        browser_s, native_s = [], []
        for n in range(args.runs):
            browser_s.append(browser_first_frame(url, chrome_home, home / f"profile-{n}"))
            native_s.append(native_first_frame(vnc_host, int(vnc_port), passwd_file, home / "frame.jpg"))
        browser_m, native_m = statistics.median(browser_s), statistics.median(native_s)
        print(f"native VNC client (vncsnapshot), first frame:  median {native_m:.3f} s  "
              f"({', '.join(f'{t:.3f}' for t in native_s)})")
        print(f"browser (chromium, noVNC over HTTPS), first frame: median {browser_m:.3f} s  "
              f"({', '.join(f'{t:.3f}' for t in browser_s)})")
        print(f"browser / native = {browser_m / native_m:.2f}")
        labvm(env, "rm", USER, "--yes")
        on_node("rm", "-rf", f"/mnt/labvm-mfs/vms/{USER}")
        return 0
    finally:
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
