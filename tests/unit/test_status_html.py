"""`labvm status --html`: the members' page from a fixed snapshot and a day of samples (tables,
one graph per node and GPU, escaping, no external asset, no secret), the usage samples in the
state database (recorded per run, pruned after 48 hours, a busy database costing only the
sample), the migration, the cron entry, and the page as headless chromium draws it."""

from __future__ import annotations

import html
import math
import os
import re
import shutil
import sqlite3
import stat
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from labvm import monitor
from labvm import state as state_mod
from labvm.admin import AdminHome
from labvm.cli import main
from labvm.config import Node, add_node_to_file
from labvm.errors import NodeUnreachable
from labvm.state import StateDB
from labvm.status_page import DAY_S, render_page, segments
from labvm.storage import cron_text
from tests.unit.test_monitor import FakeSessions, n1_sample, n2_sample
from tests.unit.test_view import document

PASSWORD = "a good password"
NOW = monitor.document_time(document())  # 2024-05-02 10:00 UTC
HOSTILE = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "'><svg onload=alert(1)>&amp;"]
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "h1", "h2", "p", "time", "div", "table", "thead", "tbody",
                "tr", "th", "td", "span", "strong", "br", "svg", "rect", "line", "polyline", "circle", "text"}


def day_of_samples(doc: dict, every_s: float = 300.0) -> monitor.History:
    """A sample every 5 minutes for the 24 hours before the document, of every node (the one
    not answering now too) and every GPU: waves, so every graph has a shape."""
    history: monitor.History = {}
    steps = int(DAY_S // every_s)
    for n, node in enumerate(doc["nodes"]):
        keys = [(None, 0), *((g["uuid"], 1 + g["index"]) for g in node["gpus"] or [])]
        for uuid, phase in keys:
            history[(node["name"], uuid)] = [
                (NOW - DAY_S + i * every_s, round(50 + 45 * math.sin(i / 20 + phase + n), 1), round(40 + 30 * math.cos(i / 30 + n), 1))
                for i in range(1, steps + 1)]
    return history


class Tags(HTMLParser):
    def __init__(self, page: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def classes(self, tag: str) -> list[str]:
        return [attrs.get("class", "") for name, attrs in self.tags if name == tag]


# -- the page from a fixed snapshot ------------------------------------------------------------------
def test_the_page_has_the_tables_and_one_graph_per_node_and_gpu():
    doc = document()
    page = render_page(doc, day_of_samples(doc))
    tags = Tags(page)
    graphs = tags.classes("svg")
    assert graphs.count("spark node") == 3, "one for each node, the one not answering too"
    assert graphs.count("spark gpu") == 8, "one for each GPU of the two nodes that answered"
    assert len(graphs) == 11 and "no samples yet" not in page
    assert tags.classes("polyline").count("cpu") == 3 and tags.classes("polyline").count("use") == 8
    assert "generated <time" in page and "2024-05-02 10:00:00 UTC" in page
    assert "<h2>Nodes</h2>" in page and "<h2>Desktops</h2>" in page
    assert "3 nodes" in page and "8 GPUs" in page and "7 desktops, 4 running" in page
    for name in ("gpu-node-a1", "gpu-node-b2", "n3", "maximilian-von-und-zu-schmidt", "evangeline-montgomery", "zoe"):
        assert f"<strong>{name}</strong>" in page
    rows = {re.search(r"<strong>(.*?)</strong>", r)[1]: r for r in re.findall(r"<tr><td>.*?</tr>", page)}
    assert '<span class="free">#3</span>' in rows["gpu-node-a1"] and "72% of 64" in rows["gpu-node-a1"]
    assert '<span class="dim">none</span>' in rows["gpu-node-b2"], "b2 has no free GPU"
    assert "unreachable: 10.20.30.3:22: Connection refused" in rows["n3"]
    assert "97%" in page and "maximilian-von-und-zu-schmidt" in page.split("GPU #0")[1]
    assert "sync: mfs write failed: No space left on device" in page
    assert "switch #41 interrupted" in page


def test_a_gap_in_the_samples_breaks_the_line_and_an_empty_history_says_so():
    points = [(NOW - DAY_S + i * 300, 50.0) for i in range(1, 100)] + [(NOW - 3600 + i * 300, 10.0) for i in range(12)]
    lines = segments(points, NOW - DAY_S, NOW)
    assert len(lines) == 2 and len(lines[0]) > 80 and len(lines[1]) >= 8
    assert max(y for _x, y in lines[0]) < max(y for _x, y in lines[1]), "10% is drawn lower than 50%"
    assert segments([(NOW - 2 * DAY_S, 50.0), (NOW - 60, None)], NOW - DAY_S, NOW) == [], "older and unknown are left out"
    page = render_page(document(), {})
    assert page.count("no samples yet") == 11 and "<polyline" not in page


def test_text_from_members_and_nodes_is_escaped():
    doc = document()
    a1, b2, n3 = doc["nodes"]
    n3["error"] = HOSTILE[0]
    a1["docker_error"], a1["gpu_error"] = HOSTILE[1], HOSTILE[2]
    b2["name"] = HOSTILE[1]
    b2["gpus"][0]["assigned_to"] = HOSTILE[0]
    b2["gpus"][1]["processes"] = [{"pid": 7, "used_memory": 1, "user": HOSTILE[2], "container": None}]
    b2["gpus"][2]["name"] = HOSTILE[0]
    doc["desktops"][0]["user"] = HOSTILE[1]
    doc["desktops"][1]["node"] = HOSTILE[0]
    doc["desktops"][5]["sync"]["last_error"] = HOSTILE[1]
    doc["desktops"][4]["running_on"] = [HOSTILE[2]]
    page = render_page(doc, day_of_samples(doc))
    assert "<script" not in page and "<img" not in page and "<svg onload" not in page
    for text in HOSTILE:
        assert html.escape(text, quote=True) in page
    tags = Tags(page)
    assert {name for name, _attrs in tags.tags} <= ALLOWED_TAGS
    attributes = {key for _name, attrs in tags.tags for key in attrs}
    assert not any(key.startswith("on") for key in attributes) and "src" not in attributes and "href" not in attributes
    assert len(tags.classes("svg")) == 11


def test_control_characters_are_shown_as_on_the_terminal():
    doc = document()
    doc["nodes"][2]["error"] = "\x1b[2Jgone\u202e"
    page = render_page(doc, {})
    assert "\x1b" not in page and "\u202e" not in page and "\\x1b[2Jgone\\u202e" in page


EXTERNAL = re.compile(r"""(?:src|href|action|xlink:href)\s*=\s*["']?\s*[a-z][a-z0-9+.-]*:""", re.IGNORECASE)


def test_the_page_needs_nothing_from_outside():
    doc = document()
    page = render_page(doc, day_of_samples(doc))
    assert not EXTERNAL.search(page)
    assert "url(" not in page and "@import" not in page and "<script" not in page and "<link" not in page
    assert "http" not in page.replace('http-equiv="refresh"', "")


# -- the command, over fake nodes and a real state database ---------------------------------------------
@pytest.fixture
def home(tmp_path, monkeypatch) -> AdminHome:
    config = tmp_path / "admin" / "bkConfxml.xml"
    monkeypatch.setenv("LABVM_CONFIG", str(config))
    assert main(["init"]) == 0
    for i in (1, 2):
        add_node_to_file(config, Node(name=f"n{i}", host=f"10.0.0.{i}"))
    home = AdminHome(config)
    with home.state() as db:
        for user, node, gpus, port in (("alice", "n1", [("GPU-a", 0)], 20000), ("bobby", "n1", [("GPU-b", 1)], 20002),
                                       ("carol", "n2", [], 20000), ("dave", "n2", [], 20002)):
            db.add_user(user, PASSWORD)
            db.conn.execute("INSERT INTO vms (user, node, state, vnc_port, ssh_port, limits, version, created_at, updated_at) "
                            "VALUES (?, ?, 'running', ?, ?, '{}', 0, 0, 0)", (user, node, port, port + 1))
            for uuid, index in gpus:
                db.conn.execute("INSERT INTO gpu_assignments VALUES (?, ?, ?, ?, 0)", (uuid, node, index, user))
    return home


@pytest.fixture
def nodes(monkeypatch):
    answers = {"n1": n1_sample(bobby_gpu_util=60), "n2": n2_sample()}
    monkeypatch.setattr("labvm.cli_monitor.NodeSessions", lambda _home, timeout: FakeSessions(answers, timeout))
    return answers


@pytest.fixture
def clock(monkeypatch):
    now = [NOW]
    monkeypatch.setattr(monitor.time, "time", lambda: now[0])
    return now


def samples(home) -> list[tuple]:
    with home.state() as db:
        return [tuple(r) for r in db.usage_since(0)]


def test_each_status_run_records_one_sample_per_node_and_gpu(home, nodes, clock, capsys):
    assert main(["status", "--json"]) == 0
    assert sorted(samples(home), key=str) == sorted([
        ("n1", None, NOW, 12.5, 25.0), ("n1", "GPU-a", NOW, 0.0, 0.9), ("n1", "GPU-b", NOW, 60.0, 0.9),
        ("n2", None, NOW, 12.5, 25.0)], key=str)
    nodes["n2"] = NodeUnreachable(node="n2", msg="Connection refused")
    clock[0] += 300
    assert main(["status"]) == 7
    assert [s[:2] for s in samples(home) if s[2] == NOW + 300] == [("n1", None), ("n1", "GPU-a"), ("n1", "GPU-b")]
    nodes["n1"] = NodeUnreachable(node="n1", msg="Connection refused")
    clock[0] += 300
    assert main(["status"]) == 7
    assert len(samples(home)) == 7, "a run that reached no node records nothing"


def test_samples_older_than_48_hours_are_pruned(home, nodes, clock, capsys):
    for hours in (0, 1, 47, 49, 97):
        clock[0] = NOW + hours * 3600
        assert main(["status"]) == 0
    assert sorted({s[2] for s in samples(home)}) == [NOW + 49 * 3600, NOW + 97 * 3600]


def test_a_busy_database_costs_the_sample_not_the_status(home, nodes, clock, monkeypatch, capsys):
    monkeypatch.setattr(monitor, "USAGE_WAIT_S", 0.2)
    other = sqlite3.connect(home.home / "state.db", isolation_level=None)

    def collect_then_another_writes(*args):
        document = monitor.collect_status(*args)
        other.execute("BEGIN IMMEDIATE")  # another command writes, and holds the database until the run ends
        return document

    monkeypatch.setattr("labvm.cli_monitor.collect_status", collect_then_another_writes)
    page = home.home.parent / "www" / "status.html"
    page.parent.mkdir()
    try:
        assert main(["status"]) == 0
        other.execute("ROLLBACK")
        captured = capsys.readouterr()
        assert [line.split()[0] for line in captured.out.splitlines()][:3] == ["NODE", "n1", "n2"]
        assert captured.err.count("warning") == 1 and "usage sample was not recorded (database is locked)" in captured.err
        assert main(["status", "--html", str(page)]) == 0
        other.execute("ROLLBACK")
        assert "<h2>Nodes</h2>" in page.read_text() and capsys.readouterr().err.count("warning") == 1
    finally:
        other.close()
    monkeypatch.setattr("labvm.cli_monitor.collect_status", monitor.collect_status)
    assert samples(home) == []
    assert main(["status"]) == 0 and len(samples(home)) == 4


def test_status_html_writes_the_page_0644_with_no_secret(home, nodes, clock, capsys):
    www = home.home.parent / "www"
    www.mkdir()
    page = www / "status.html"
    page.write_text("old page")
    os.chmod(page, 0o600)
    assert main(["status", "--html", str(page)]) == 0
    assert capsys.readouterr().out == "", "the page instead of the tables"
    assert stat.S_IMODE(os.stat(page).st_mode) == 0o644 and sorted(p.name for p in www.iterdir()) == ["status.html"]
    text = page.read_text()
    assert "bobby" in text and text.count('<svg class="spark') == 4, "n1, its two GPUs and n2"
    with home.state() as db:
        secret = db.vnc_secret("alice")
    assert secret == PASSWORD and PASSWORD not in text and "secret" not in text.lower()
    assert "scrypt" not in text and "10.0.0.1:20000" not in text, "no password hash, and no VNC address either"


def test_status_html_graphs_the_day_before(home, nodes, clock, capsys):
    for minutes in range(0, 180, 10):
        clock[0] = NOW + minutes * 60
        assert main(["status", "--html", "-"]) == 0
    page = capsys.readouterr().out.split("<!DOCTYPE html>")[-1]
    assert page.count("<polyline") == 8, "CPU and memory of n1 and n2, use and memory of n1's two GPUs"
    assert "no samples yet" not in page and samples(home)[-1][2] == NOW + 170 * 60


def test_status_html_and_json_together_are_refused(home, nodes, capsys):
    assert main(["status", "--html", "-", "--json"]) == 2
    assert "--html and --json" in capsys.readouterr().err
    assert samples(home) == [], "refused before any node is asked"


def test_status_html_to_a_missing_directory_says_so(home, nodes, tmp_path, capsys):
    assert main(["status", "--html", str(tmp_path / "nowhere" / "status.html")]) == 2
    assert "cannot write the status page to" in capsys.readouterr().err


# -- the migration ------------------------------------------------------------------------------
def test_the_usage_migration_applies_to_an_existing_database(tmp_path, monkeypatch):
    home = tmp_path / "admin"
    monkeypatch.setattr(state_mod, "MIGRATIONS", [m for m in state_mod.MIGRATIONS if m[0] < "0006_usage_samples"])
    StateDB.create(home)
    with StateDB.open(home) as db:
        db.add_user("alice", PASSWORD)
    monkeypatch.undo()
    with StateDB.open(home) as db:
        assert db.pending_migrations()[0] == "0006_usage_samples"
        db.migrate()
        assert db.pending_migrations() == [] and db.check_password("alice", PASSWORD)
        indexes = [r["name"] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'usage_samples'")]
        assert "usage_samples_at" in indexes
        db.record_usage([("n1", None, 100.0, 5.0, 6.0), ("n1", "GPU-a", 100.0, None, 1.5)], keep_after=0, wait_s=1)
        assert [tuple(r) for r in db.usage_since(50)] == [("n1", None, 100.0, 5.0, 6.0), ("n1", "GPU-a", 100.0, None, 1.5)]


# -- cron -----------------------------------------------------------------------------------------
def test_cron_refreshes_the_page_every_5_minutes():
    text = cron_text(Path("/etc/labvm/bkConfxml.xml"), "17 3 * * *", None, Path("/var/log/l"), command=["labvm"],
                     status_page=Path("/var/www/html/lab status.html"))
    assert text.splitlines()[-1] == ("*/5 * * * * root labvm --config /etc/labvm/bkConfxml.xml status --html "
                                     "'/var/www/html/lab status.html' >> /var/log/l 2>&1")
    assert "status" not in cron_text(Path("/c.xml"), "17 3 * * *", None, Path("/l"), command=["labvm"])


def test_cron_install_status_html(home, tmp_path, capsys):
    cron_file = tmp_path / "cron.d" / "labvm"
    cron_file.parent.mkdir()
    www = tmp_path / "www"
    assert main(["cron", "install", "--file", str(cron_file), "--status-html", str(www / "s.html")]) == 2
    assert "is not a directory; create it first" in capsys.readouterr().err and not cron_file.exists()
    www.mkdir()
    assert main(["cron", "install", "--file", str(cron_file), "--status-html", str(www / "s.html")]) == 0
    out = capsys.readouterr().out
    assert "backup --all" in out and f"status --html {www / 's.html'}" in out
    assert stat.S_IMODE(os.stat(cron_file).st_mode) == 0o644
    assert cron_file.read_text().splitlines()[-1].startswith("*/5 * * * * root ")


# -- the page in a real browser -------------------------------------------------------------------------
BACKGROUND = (0xEE, 0xF2, 0xF8)  # .spark .bg
LINES = [(0x1F, 0x63, 0xC6), (0xE0, 0x70, 0x00), (0x8A, 0x2B, 0xE2)]  # .cpu, .mem, .use


def near(pixel, colour, tolerance=60) -> bool:
    return sum((a - b) ** 2 for a, b in zip(pixel[:3], colour, strict=True)) <= tolerance ** 2


def bands(rows: list[int]) -> list[tuple[int, int]]:
    """Runs of consecutive row numbers, as (first, last)."""
    found: list[tuple[int, int]] = []
    for y in rows:
        if found and y == found[-1][1] + 1:
            found[-1] = (found[-1][0], y)
        else:
            found.append((y, y))
    return found


def test_chromium_draws_the_page_with_its_graphs(tmp_path):
    from PIL import Image

    chromium = shutil.which("chromium")
    assert chromium, "chromium is not installed: apt-get install chromium (scripts/install-deps installs it)"
    doc = document()
    page = tmp_path / "status.html"
    page.write_text(render_page(doc, day_of_samples(doc)))
    shot = tmp_path / "status.png"
    argv = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--force-device-scale-factor=1",
            "--force-color-profile=srgb", f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}",
            "--window-size=1200,1600", page.as_uri()]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120, env={**os.environ, "HOME": str(tmp_path)})
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1200, 1600)
    width, height = image.size
    pixels = image.load()
    assert len(image.getcolors(maxcolors=1 << 16) or range(1 << 16)) > 20, "not blank"
    rows = [y for y in range(height) if any(pixels[x, y] == BACKGROUND for x in range(0, width, 2))]
    graphs = [b for b in bands(rows) if b[1] - b[0] >= 20]
    assert len(graphs) == 11, f"one graph per node and GPU, found rows {bands(rows)}"
    for top, bottom in graphs:
        xs = [x for x in range(width) if pixels[x, top + 2] == BACKGROUND]
        left, right = min(xs), max(xs)
        drawn = [x for x in range(left, right + 1) for y in range(top, bottom + 1) if any(near(pixels[x, y], c) for c in LINES)]
        assert len(drawn) > 200, f"the graph at rows {top}-{bottom} has hardly any line in it"
        assert max(drawn) - min(drawn) > 0.9 * (right - left), "a day of samples spans the whole graph"
