"""A desktop in a real browser: noVNC over HTTPS from inside the desktop's container.

Chromium (driven by selenium and Debian's chromedriver) trusts labvm's CA through an NSS
database in a temporary HOME, so the desktop's certificate is checked as a member's browser
would check it; the page is behind HTTP Basic auth with the member's whole password.
"""

from __future__ import annotations

import base64
import http.client
import os
import re
import socket
import ssl
import subprocess
import time
import urllib.parse
from pathlib import Path

import pytest

from .conftest import make_admin, wipe_mfs_files

# Longer than 8 characters: VncAuth would check only "dora-Pw-".
DORA_PW = "dora-Pw-5521-long"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def web(testbed, tmp_path_factory):
    """An admin with the minimal image pushed and dora's desktop running on n1."""
    admin = make_admin(testbed, tmp_path_factory.mktemp("browser") / "admin")
    built = admin.labvm("image", "build", "--desktop", "minimal", timeout=1800)
    assert built.returncode == 0, built.stderr
    pushed = admin.labvm("image", "push", "n1", timeout=900)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    assert admin.labvm("user", "add", "dora", "--password-stdin", stdin=DORA_PW + "\n").returncode == 0
    wipe_mfs_files(admin, "dora")
    created = admin.labvm("create", "dora", "--gpus", "0", "--node", "n1", "--memory", "512m", "--cpus", "1", "--json")
    assert created.returncode == 0, created.stdout + created.stderr
    yield admin
    admin.labvm("rm", "dora", "--yes")


def desktop_of(admin, user: str) -> dict:
    status = admin.labvm_json("status")
    return next(d for d in status["desktops"] if d["user"] == user)


def tls_context(admin) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(admin.home / "ca.pem"))
    return context


def https_get(admin, url: str, user: str | None = None, password: str | None = None, host: str | None = None,
              headers: dict | None = None) -> http.client.HTTPResponse:
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPSConnection(host or parts.hostname, parts.port, context=tls_context(admin), timeout=20)
    sent = dict(headers or {})
    if user is not None:
        sent["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    connection.request("GET", parts.path + ("?" + parts.query if parts.query else ""), headers=sent)
    response = connection.getresponse()
    response.read()
    connection.close()
    return response


def wait_https(admin, url: str, deadline_s: float = 60) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            if https_get(admin, url, "dora", DORA_PW).status == 200:
                return
        except OSError:
            if time.monotonic() > end:
                raise
        if time.monotonic() > end:
            raise AssertionError(f"{url} never answered 200")
        time.sleep(1)


def test_status_and_create_show_the_https_address(web):
    desk = desktop_of(web, "dora")
    parts = urllib.parse.urlsplit(desk["https"])
    assert parts.scheme == "https" and parts.path == "/vnc.html" and "autoconnect=1" in parts.query
    node_host = desk["vnc"].rsplit(":", 1)[0]
    assert parts.hostname == node_host and parts.port != int(desk["vnc"].rsplit(":", 1)[1])
    shown = web.labvm("status")
    assert shown.returncode == 0 and f"https://{node_host}:{parts.port}/vnc.html" in shown.stdout
    started = web.labvm("start", "dora")
    assert started.returncode == 0, started.stderr
    assert f"https://{node_host}:{parts.port}/vnc.html" in started.stdout + started.stderr


def test_the_whole_password_opens_the_page_and_nothing_less(web):
    url = desktop_of(web, "dora")["https"]
    wait_https(web, url)
    assert https_get(web, url).status == 401
    refused = https_get(web, url, "dora", "not-her-password")
    assert refused.status == 401 and "Basic" in (refused.getheader("WWW-Authenticate") or "")
    # Same first 8 characters: VncAuth would let it in, the HTTPS does not.
    assert https_get(web, url, "dora", DORA_PW[:8] + "x" * (len(DORA_PW) - 8)).status == 401
    assert https_get(web, url, "dora", DORA_PW[:8]).status == 401
    assert https_get(web, url, "mallory", DORA_PW).status == 401
    assert https_get(web, url, "dora", DORA_PW).status == 200
    # The WebSocket upgrade is behind the same auth.
    upgrade = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(), "Sec-WebSocket-Protocol": "binary"}
    parts = urllib.parse.urlsplit(url)
    ws = f"https://{parts.hostname}:{parts.port}/websockify"
    assert https_get(web, ws, headers=upgrade).status == 401
    assert https_get(web, ws, "dora", DORA_PW[:8] + "zzzz", headers=upgrade).status == 401


def test_plain_http_and_another_name_get_nothing(web):
    parts = urllib.parse.urlsplit(desktop_of(web, "dora")["https"])
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    auth = "Basic " + base64.b64encode(f"dora:{DORA_PW}".encode()).decode()
    try:
        connection.request("GET", "/vnc.html", headers={"Authorization": auth})
        response = connection.getresponse()
        body = response.read()
        assert response.status != 200 and b"noVNC" not in body
    except (OSError, http.client.HTTPException):
        pass  # refused outright: TLS only
    finally:
        connection.close()
    # The certificate names the node's address only: any other name fails verification.
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            tls_context(web).wrap_socket(raw, server_hostname="another-name.example")
    # An unrelated CA's trust store refuses it too.
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            ssl.create_default_context().wrap_socket(raw, server_hostname=parts.hostname)


def browser(admin, tmp_path: Path, *extra: str):
    """Headless chromium whose NSS database trusts labvm's CA (extra: more command-line flags)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    home = tmp_path / "home"
    nssdb = home / ".pki" / "nssdb"
    nssdb.mkdir(parents=True)
    subprocess.run(["certutil", "-N", "-d", f"sql:{nssdb}", "--empty-password"], check=True, capture_output=True)
    subprocess.run(["certutil", "-A", "-d", f"sql:{nssdb}", "-n", "labvm", "-t", "C,,", "-i", str(admin.home / "ca.pem")],
                   check=True, capture_output=True)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path / 'profile'}", "--no-first-run", *extra):
        options.add_argument(arg)
    service = Service(executable_path=CHROMEDRIVER, env={**os.environ, "HOME": str(home)})
    return webdriver.Chrome(service=service, options=options)


# The colours of noVNC's canvas as the page itself reads them (every 4th pixel of every 4th
# row): a screenshot would count noVNC's own bars and messages over it too.
CANVAS_COLORS = """
const canvas = document.querySelector('#noVNC_container canvas');
if (!canvas || !canvas.width || !canvas.height) return 0;
const data = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
const seen = new Set();
for (let y = 0; y < canvas.height; y += 4)
  for (let x = 0; x < canvas.width; x += 4) {
    const i = (y * canvas.width + x) * 4;
    seen.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
  }
return seen.size;
"""


def canvas_colors(driver) -> int:
    return int(driver.execute_script(CANVAS_COLORS) or 0)


def wait_for_canvas(driver, more_than: int = 1, seconds: float = 60) -> int:
    """How many colours noVNC's canvas shows, once more than `more_than` or when time is up."""
    end, colors = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        colors = canvas_colors(driver)
        if colors > more_than:
            break
        time.sleep(1)
    return colors


def login_page(url: str, user: str, password: str, host: str | None = None) -> str:
    """The desktop's page with Basic auth in the URL (at `host` instead of the node's, if given)."""
    parts = urllib.parse.urlsplit(url)
    quoted = urllib.parse.quote(password, safe="")
    return f"https://{user}:{quoted}@{host or parts.hostname}:{parts.port}{parts.path}?{parts.query}"


def test_chromium_shows_the_desktop_over_https_with_the_whole_password(web, tmp_path):
    url = desktop_of(web, "dora")["https"]
    wait_https(web, url)
    # Basic auth from the URL, and nothing more: raw VNC is published here, so the server
    # asks VncAuth, and websockify answers it with the password of the Basic auth. The page's
    # query has no password, so noVNC would stop at its password prompt were it asked.
    driver = browser(web, tmp_path)
    try:
        driver.get(login_page(url, "dora", DORA_PW))
        assert "noVNC" in driver.title, driver.page_source[:500]
        colors = wait_for_canvas(driver)
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert colors > 1, f"the noVNC canvas stayed blank ({colors} colors); page: {tmp_path / 'page.png'}"
        # Chromium checked the certificate against labvm's CA: no interstitial, a secure origin.
        assert driver.execute_script("return window.isSecureContext") is True
    finally:
        driver.quit()


def test_with_raw_vnc_off_the_browser_is_the_only_way_in_and_asks_once(web, tmp_path):
    old = desktop_of(web, "dora")
    host, vnc_port = old["vnc"].rsplit(":", 1)
    text = web.config.read_text()
    web.config.write_text(text.replace("</labvm>", "  <vnc><listen>off</listen></vnc>\n</labvm>"))
    try:
        assert web.labvm("stop", "dora").returncode == 0
        started = web.labvm("start", "dora")
        assert started.returncode == 0, started.stdout + started.stderr
        desk = desktop_of(web, "dora")
        assert desk["vnc"] is None and desk["https"] == old["https"]
        with pytest.raises(OSError):
            socket.create_connection((host, int(vnc_port)), timeout=5).close()  # nothing publishes it
        url = desk["https"]
        wait_https(web, url)
        assert https_get(web, url, "dora", DORA_PW[:8] + "yyyyyyyyy").status == 401
        # No VNC password in the page: the server behind websockify asks for none.
        driver = browser(web, tmp_path)
        try:
            driver.get(login_page(url, "dora", DORA_PW))
            colors = wait_for_canvas(driver)
            assert colors > 1, f"the noVNC canvas stayed blank ({colors} colors)"
        finally:
            driver.quit()
    finally:
        web.config.write_text(text)


def test_chromium_refuses_the_certificate_under_another_name(web, tmp_path):
    """The same desktop, reached by a name its certificate does not hold: chromium stops at its
    certificate error page, and noVNC never loads."""
    url = desktop_of(web, "dora")["https"]
    wait_https(web, url)
    other = "another-name.example"
    driver = browser(web, tmp_path, f"--host-resolver-rules=MAP {other} {urllib.parse.urlsplit(url).hostname}")
    try:
        driver.get(login_page(url, "dora", DORA_PW, host=other))
        source = driver.page_source
        assert "ERR_CERT_COMMON_NAME_INVALID" in source, source[:800]
        assert "noVNC" not in driver.title
        # The control: the node's own name, in the same browser, loads noVNC.
        driver.get(login_page(url, "dora", DORA_PW))
        assert "noVNC" in driver.title, driver.page_source[:500]
    finally:
        driver.quit()


# Run as root inside the desktop (the member's own power there): every file outside /proc,
# /sys and /dev that holds a PEM private key, base64, one per line.
KEY_HUNT = r"""
import base64, os
for root, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(root, d) not in ("/proc", "/sys", "/dev")]
    for name in files:
        path = os.path.join(root, name)
        try:
            if os.path.islink(path) or not os.path.isfile(path) or os.path.getsize(path) > 65536:
                continue
            with open(path, "rb") as stream:
                data = stream.read()
        except OSError:
            continue
        if b"PRIVATE KEY-----" in data:
            print(path, base64.b64encode(data).decode())
"""


def test_the_desktops_tls_key_is_nowhere_in_the_desktop(web):
    """A member, root in their desktop, finds no private key of the certificate their HTTPS
    port serves: TLS ends in the node's stunnel, outside the container."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    parts = urllib.parse.urlsplit(desktop_of(web, "dora")["https"])
    wait_https(web, desktop_of(web, "dora")["https"])
    served = x509.load_pem_x509_certificate(ssl.get_server_certificate((parts.hostname, parts.port)).encode())
    wanted = served.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    # The control: a key planted in the desktop is found, so the hunt does look.
    from cryptography.hazmat.primitives.asymmetric import ec

    planted = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    plant = web.labvm("exec", "dora", "--", "sh", "-c", 'printf "%s" "$1" > /tmp/planted.key', "sh", planted.decode())
    assert plant.returncode == 0, plant.stderr
    hunted = web.labvm("exec", "dora", "--", "python3", "-c", KEY_HUNT, timeout=600)
    assert hunted.returncode == 0, hunted.stderr
    found = {}
    for line in hunted.stdout.splitlines():
        path, blob = line.rsplit(" ", 1)
        for match in re.finditer(rb"-----BEGIN ([A-Z ]*)PRIVATE KEY-----.+?-----END \1PRIVATE KEY-----",
                                 base64.b64decode(blob), re.S):
            try:
                key = serialization.load_pem_private_key(match.group(0), password=None)
            except (ValueError, TypeError, UnsupportedAlgorithm):
                continue
            found[path] = key.public_key().public_bytes(serialization.Encoding.DER,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    assert "/tmp/planted.key" in found, sorted(found)
    assert wanted not in found.values(), f"the desktop's TLS key is readable inside it: {sorted(found)}"
    web.labvm("exec", "dora", "--", "rm", "-f", "/tmp/planted.key")
    listed = web.labvm("exec", "dora", "--", "ls", "-A", "/run/labvm")
    assert listed.returncode == 0 and "tls." not in listed.stdout, listed.stdout


def test_ca_renew_puts_a_due_certificate_in_place_without_a_restart(web):
    """A certificate near its end is issued again by `labvm ca renew` (the daily cron job) and
    served at once by the running desktop's stunnel; the desktop itself runs on."""
    from labvm import ca

    url = desktop_of(web, "dora")["https"]
    wait_https(web, url)
    parts = urllib.parse.urlsplit(url)
    served = ssl.get_server_certificate((parts.hostname, parts.port))
    kept = web.home / ca.DESKTOP_CERTS_DIR
    assert x509_der(served) == x509_der((kept / "dora.pem").read_text())
    key, cert = ca.issue(ca.load(web.home), ["localhost"], [parts.hostname, "127.0.0.1"], days=3)
    (kept / "dora.key").write_bytes(key)
    (kept / "dora.pem").write_bytes(cert)
    before = web.labvm_json("status")
    planned = web.labvm_json("ca", "renew", "--dry-run")
    assert [(d["user"], d["renewed"]) for d in planned["due"]] == [("dora", False)]
    done = web.labvm_json("ca", "renew")
    assert [(d["user"], d["renewed"], d["error"]) for d in done["due"]] == [("dora", True, None)]
    renewed = (kept / "dora.pem").read_text()
    assert renewed != cert.decode()
    assert x509_der(ssl.get_server_certificate((parts.hostname, parts.port))) == x509_der(renewed)
    assert https_get(web, url, "dora", DORA_PW).status == 200
    after = web.labvm_json("status")
    up = {d["user"]: d["uptime_s"] for d in before["desktops"]}["dora"]
    assert {d["user"]: d["uptime_s"] for d in after["desktops"]}["dora"] >= up  # not restarted
    assert web.labvm_json("ca", "renew")["due"] == []


def x509_der(pem: str) -> bytes:
    return ssl.PEM_cert_to_DER_cert(pem)
