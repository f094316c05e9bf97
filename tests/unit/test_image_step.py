"""The image step of a desktop's bring-up, on the stateful fake cluster: asking the node for the
desktop's image is the first call of the round trip the bring-up shares, so a start on a node
that holds it makes no call of its own for it; where the node lacks it, nothing else has run,
the image is sent and the round trip made again (plan.Step.recover)."""

from __future__ import annotations

from pathlib import Path

import pytest

from labvm.admin import AdminHome
from labvm.desktops import Desktops
from labvm.errors import LabvmError

from .fake_cluster import IMAGE, FakeCluster
from .plan_faults import admin_template, copied_home, seeded_cluster

UP_CALLS = [("image", "require"), ("mfs", "ensure_mounted")]


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """alice's desktop on n1 (version 3), bob's on n2."""
    return admin_template(tmp_path_factory, ("alice", "bob"), (("alice", "n1", 3), ("bob", "n2", 1)),
                          (("GPU-n1-0", "n1", 0, "alice"), ("GPU-n2-0", "n2", 0, "bob")))


@pytest.fixture
def home(template, tmp_path, monkeypatch) -> AdminHome:
    return copied_home(template, tmp_path, monkeypatch)


@pytest.fixture
def cluster(home, monkeypatch) -> FakeCluster:
    fake = seeded_cluster(home, monkeypatch)
    with home.state() as db:
        db.set_desktop_state("alice", "stopped")
    fake.seed(home, "alice")
    return fake


def journal(home: AdminHome) -> list[tuple[str, str]]:
    with home.state() as db:
        op = db.conn.execute("SELECT id FROM operations WHERE user = 'alice' ORDER BY id DESC LIMIT 1").fetchone()
        return [(r["name"], r["state"]) for r in db.operation_steps(op["id"])]


def calls(node) -> list[tuple[str, str]]:
    return [(c.helper, c.action) for c in node.calls]


def state(home: AdminHome) -> str:
    with home.state() as db:
        return db.desktop_row("alice")["state"]


def test_a_start_on_a_node_that_holds_the_image_asks_for_it_in_its_one_round_trip(home, cluster):
    n1 = cluster["n1"]
    n1.calls.clear()
    Desktops(home).start("alice")
    assert calls(n1)[:2] == UP_CALLS, calls(n1)
    assert ("image", "status") not in calls(n1) and calls(n1).count(("image", "require")) == 1
    assert n1.desks["alice"].container.running and state(home) == "running"
    assert [name for name, _ in journal(home)].count("image") == 1 and ("image", "done") in journal(home)


def test_a_start_on_a_node_without_the_image_sends_it_then_makes_the_round_trip_again(home, cluster):
    n1 = cluster["n1"]
    n1.images.discard(IMAGE)
    n1.calls.clear()
    Desktops(home).start("alice")
    made = calls(n1)
    # The first round trip stopped at its first call; nothing else ran before the image was sent.
    assert made[0] == ("image", "require") and made[1] == ("image", "status"), made
    sent = made.index(("image", "ensure_unpacked"))
    assert ("vm", "ensure_stack") not in made[:sent]
    assert made[sent + 2:sent + 4] == UP_CALLS, made
    assert IMAGE in n1.images and n1.desks["alice"].container.running and state(home) == "running"
    # The journal shows the step once, done: the failure it recovered from is not a failure.
    assert [name for name, _ in journal(home)].count("image") == 1 and ("image", "done") in journal(home)
    assert all(s == "done" for _, s in journal(home)), journal(home)


def test_a_start_whose_image_cannot_be_sent_fails_with_nothing_else_done(home, cluster):
    n1 = cluster["n1"]
    n1.images.discard(IMAGE)
    n1.fail("image", "ensure_unpacked")
    n1.calls.clear()
    with pytest.raises(LabvmError, match="injected"):
        Desktops(home).start("alice")
    assert ("vm", "ensure_stack") not in calls(n1) and ("mfs", "ensure_mounted") not in calls(n1)
    assert "alice" not in n1.desks or n1.desks["alice"].container is None or not n1.desks["alice"].container.running
    assert state(home) == "stopped" and ("image", "failed") in journal(home)


def test_a_failure_other_than_a_missing_image_is_not_recovered(home, cluster):
    n1 = cluster["n1"]
    n1.fail("image", "require")
    n1.calls.clear()
    with pytest.raises(LabvmError, match="injected"):
        Desktops(home).start("alice")
    assert calls(n1) == [("image", "require")] and state(home) == "stopped"
