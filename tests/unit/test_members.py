"""A member name given again: `labvm create` never hands an earlier member's files to a new one
unless --adopt, and `labvm user rm` makes the admin say what happens to the files. The node is a
fake that keeps MooseFS's owner record and versions for one name; nothing touches the network."""

import io
import sys
from contextlib import contextmanager

import pytest

from labvm import desktops as desktops_mod
from labvm import plan as plan_mod
from labvm.admin import AdminHome
from labvm.cli import main
from labvm.config import Node, add_node_to_file
from labvm.desktops import Desktops, PreviousFiles, previous_files
from labvm.errors import BadInput, FilesOfAnotherMember, NotFound, StateError
from labvm.members import Members
from labvm.state import StateDB, User

from .fake_cluster import IMAGE, plant_image
from .fake_node import TypedCalls

PW = "a good password"
OLD_ID, NEW_ID = "a" * 32, "b" * 32


class FakeMooseFS:
    """What MooseFS holds under member names, as the node helpers report and change it."""

    def __init__(self):
        self.owner: dict[str, dict] = {}
        self.versions: dict[str, list[int]] = {}
        self.calls: list[tuple[str, str, dict]] = []

    def answer(self, node: Node, helper: str, action: str, params: dict) -> dict:
        self.calls.append((helper, action, params))
        user = params.get("user")
        if (helper, action) == ("probe", "facts"):
            return {"gpus": [], "memory": {"total_mib": 65536}, "disk": {}, "listening_ports": []}
        if (helper, action) == ("image", "status"):
            return {"images": [{"id": IMAGE, "legacy": False, "desktop": "minimal", "in_use_by": []}]}
        if (helper, action) == ("merge", "versions"):
            return {"versions": [{"version": n, "created": 0} for n in self.versions.get(user, [])]}
        if (helper, action) == ("vm", "owner"):
            return {"owner": self.owner.get(user)}
        if (helper, action) == ("vm", "set_owner"):
            member = params.get("member") or (self.owner.get(user) or {}).get("member")
            self.owner[user] = {"node": params["node"], "op": None, "member": member}
        if (helper, action) == ("vm", "purge_mfs_data"):
            self.owner.pop(user, None)
            self.versions.pop(user, None)
        return {}

    def changes(self) -> list[tuple[str, str]]:
        reads = {("probe", "facts"), ("image", "status"), ("merge", "versions"), ("vm", "owner"), ("mfs", "ensure_mounted")}
        return [(h, a) for h, a, _p in self.calls if (h, a) not in reads]


class FakeSession(TypedCalls):
    def __init__(self, node: Node, mfs: FakeMooseFS):
        self.node, self.mfs = node, mfs

    def call(self, helper, action, params, timeout=180, check=False):
        return {"ok": True, "changed": False, "data": self.mfs.answer(self.node, helper, action, params)}


@pytest.fixture
def mfs(monkeypatch):
    fake = FakeMooseFS()

    @contextmanager
    def session(self, node):
        yield FakeSession(node, fake)

    monkeypatch.setattr(Desktops, "session", session)
    monkeypatch.setattr(plan_mod.Context, "_open_session", lambda self, name: FakeSession(self.cfg.node(name), fake))
    monkeypatch.setattr(desktops_mod.HelperBundle, "from_package", classmethod(lambda cls: None))
    return fake


@pytest.fixture
def home(tmp_path, monkeypatch) -> AdminHome:
    config = tmp_path / "admin" / "bkConfxml.xml"
    monkeypatch.setenv("LABVM_CONFIG", str(config))
    assert main(["init"]) == 0
    add_node_to_file(config, Node(name="n1", host="10.0.0.1"))
    home = AdminHome(config)
    plant_image(home, IMAGE)
    return home


def add_user(home: AdminHome, name: str) -> User:
    with home.state() as db:
        return db.add_user(name, PW)


def create(home: AdminHome, user: str, adopt: bool = False):
    return Desktops(home).create(user, node="n1", gpus="0", adopt=adopt)


def desktop_rows(home: AdminHome) -> list[str]:
    with home.state() as db:
        return [r["user"] for r in db.conn.execute("SELECT user FROM vms")]


def last_operation(home: AdminHome) -> tuple[str, str]:
    with home.state() as db:
        row = db.conn.execute("SELECT kind, state FROM operations ORDER BY id DESC LIMIT 1").fetchone()
        return row["kind"], row["state"]


# -- whose files: the rule alone ---------------------------------------------------------------
def member(member_id=NEW_ID, unmarked=False) -> User:
    return User("bob", 2000, member_id, unmarked, 0.0, 0.0)


def test_nothing_on_moosefs_is_a_fresh_start():
    assert previous_files(member(), None, [], adopt=False) == PreviousFiles(0)


def test_the_members_own_files_are_continued_from():
    record = {"node": None, "member": NEW_ID}
    assert previous_files(member(), record, [{"version": 2}, {"version": 5}], adopt=False) == PreviousFiles(5)


@pytest.mark.parametrize("record", [{"node": None, "member": OLD_ID}, {"node": None}, None])
def test_files_of_another_member_or_of_no_known_member_are_refused(record):
    with pytest.raises(FilesOfAnotherMember) as refused:
        previous_files(member(), record, [{"version": 3}], adopt=False)
    message = str(refused.value)
    assert "labvm create bob --adopt" in message and "labvm user rm bob --purge" in message and "v3" in message
    assert refused.value.exit_code == 5


def test_an_owner_record_alone_of_another_member_is_refused_too():
    with pytest.raises(FilesOfAnotherMember, match="no version yet"):
        previous_files(member(), {"node": None, "member": OLD_ID}, [], adopt=False)


def test_adopt_takes_them_over():
    assert previous_files(member(), {"member": OLD_ID}, [{"version": 3}], adopt=True) == PreviousFiles(3, adopted=True)


def test_a_member_from_before_ids_keeps_records_without_one_but_not_other_ids():
    old = member(unmarked=True)
    assert previous_files(old, {"node": None}, [{"version": 4}], adopt=False) == PreviousFiles(4)
    assert previous_files(old, None, [{"version": 4}], adopt=False) == PreviousFiles(4)
    with pytest.raises(FilesOfAnotherMember):
        previous_files(old, {"member": OLD_ID}, [{"version": 4}], adopt=False)


# -- create ------------------------------------------------------------------------------------
def test_create_refuses_an_earlier_members_files_before_changing_anything(home, mfs):
    add_user(home, "bob")
    mfs.owner["bob"] = {"node": None, "op": None, "member": OLD_ID}
    mfs.versions["bob"] = [1, 2]
    with pytest.raises(FilesOfAnotherMember, match="--adopt"):
        create(home, "bob")
    assert mfs.changes() == []
    assert mfs.owner["bob"]["member"] == OLD_ID
    assert desktop_rows(home) == []
    assert last_operation(home) == ("create", "refused")


def test_create_adopt_continues_from_them_and_records_the_new_member(home, mfs):
    bob = add_user(home, "bob")
    mfs.owner["bob"] = {"node": None, "op": None, "member": OLD_ID}
    mfs.versions["bob"] = [1, 2]
    desktop = create(home, "bob", adopt=True)
    assert desktop.version == 2 and desktop.state == "running"
    assert mfs.owner["bob"] == {"node": "n1", "op": None, "member": bob.member_id}
    # From now on they are this bob's: a later create needs no --adopt.
    Desktops(home).remove("bob")
    assert previous_files(bob, mfs.owner["bob"], [{"version": 2}], adopt=False) == PreviousFiles(2)


def test_create_of_a_fresh_member_marks_the_owner_record_with_their_id(home, mfs):
    alice = add_user(home, "alice")
    create(home, "alice")
    assert mfs.owner["alice"]["member"] == alice.member_id and desktop_rows(home) == ["alice"]


def test_create_refuses_a_reserved_name_left_by_an_older_rule(home, mfs):
    with home.state() as db:
        db.conn.execute("INSERT INTO users (name, uid, member_id, pw_hash, vnc_secret, created_at, updated_at) "
                        "VALUES ('tcpdump', 2000, ?, 'x', x'00', 0, 0)", (NEW_ID,))
    with pytest.raises(BadInput, match="reserved"):
        create(home, "tcpdump")
    assert mfs.calls == [] and desktop_rows(home) == []


# -- user rm -----------------------------------------------------------------------------------
def test_user_rm_requires_a_choice_and_says_both(home, mfs):
    add_user(home, "bob")
    for purge, keep in ((False, False), (True, True)):
        with pytest.raises(BadInput) as refused:
            Members(home).remove("bob", purge=purge, keep_files=keep)
        assert "--purge" in str(refused.value) and "--keep-files" in str(refused.value)
    with home.state() as db:
        assert db.has_user("bob")
    assert mfs.calls == []


def test_user_rm_dry_run_shows_the_versions_and_changes_nothing(home, mfs):
    add_user(home, "bob")
    mfs.versions["bob"] = [1, 3]
    plan = Members(home).remove("bob", purge=True, keep_files=False, dry_run=True)
    assert plan.versions == [1, 3]
    assert plan.lines == ["would delete bob's files on MooseFS (v1, v3)", "would remove user bob"]
    assert mfs.changes() == [] and mfs.versions["bob"] == [1, 3]
    with home.state() as db:
        assert db.has_user("bob")


def test_user_rm_purge_deletes_the_files_then_the_member(home, mfs):
    add_user(home, "bob")
    mfs.versions["bob"] = [1]
    plan = Members(home).remove("bob", purge=True, keep_files=False)
    assert mfs.changes() == [("vm", "purge_mfs_data")] and "bob" not in mfs.versions
    assert plan.lines[0] == "deleted bob's files on MooseFS"
    with home.state() as db:
        assert not db.has_user("bob")


def test_user_rm_keep_files_leaves_moosefs_alone_and_a_new_bob_must_adopt(home, mfs):
    add_user(home, "bob")
    create(home, "bob")
    mfs.versions["bob"] = [1]
    Desktops(home).remove("bob")
    Members(home).remove("bob", purge=False, keep_files=True)
    assert [c for c in mfs.changes() if c == ("vm", "purge_mfs_data")] == []
    add_user(home, "bob")
    with pytest.raises(FilesOfAnotherMember):
        create(home, "bob")
    assert create(home, "bob", adopt=True).version == 1


def test_user_rm_is_refused_while_a_desktop_exists(home, mfs):
    add_user(home, "bob")
    create(home, "bob")
    with pytest.raises(StateError, match="labvm rm bob"):
        Members(home).remove("bob", purge=False, keep_files=True)


def test_user_rm_cli_without_a_choice_exits_2_and_names_both(home, mfs, capsys):
    add_user(home, "bob")
    sys.stdin = io.StringIO("")
    try:
        assert main(["user", "rm", "bob", "--yes"]) == 2
    finally:
        sys.stdin = sys.__stdin__
    err = capsys.readouterr().err
    assert "--purge" in err and "--keep-files" in err and len(err.strip().splitlines()) == 1
    assert main(["user", "rm", "bob", "--keep-files", "--yes"]) == 0
    assert "kept bob's files on MooseFS" in capsys.readouterr().out
    with pytest.raises(NotFound):
        with StateDB.open(home.home) as db:
            db.get_user("bob")


def test_user_add_refuses_the_accounts_of_a_built_image(home, capsys):
    home.images_dir.mkdir(exist_ok=True)
    (home.images_dir / "labvm-xfce-20250101.tar.gz.accounts").write_text("root\ngamesd\n")
    sys.stdin = io.StringIO(PW + "\n")
    try:
        assert main(["user", "add", "gamesd", "--password-stdin"]) == 2
    finally:
        sys.stdin = sys.__stdin__
    assert "reserved" in capsys.readouterr().err
