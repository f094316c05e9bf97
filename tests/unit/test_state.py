"""The state database: password hashes, encrypted VNC secrets, file modes, migrations."""

import os
import re
import sqlite3
import stat

import pytest

from labvm import state as state_mod
from labvm.errors import AlreadyExists, BadInput, InsecureFile, NotFound, StateError
from labvm.secrets import SecretBox, hash_password, verify_password
from labvm.state import StateDB

PW = "correct horse battery"


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "admin"
    assert StateDB.create(home) is True
    return home


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_create_makes_private_files_and_is_idempotent(home):
    assert mode(home) == 0o700
    assert mode(home / "state.db") == 0o600
    assert mode(home / "secret.key") == 0o600
    key = (home / "secret.key").read_bytes()
    assert StateDB.create(home) is False
    assert (home / "secret.key").read_bytes() == key


def test_wal_side_files_are_private(home):
    with StateDB.open(home) as db:
        db.add_user("alice", PW)
        for side in ("state.db-wal", "state.db-shm"):
            if (home / side).exists():
                assert mode(home / side) == 0o600


@pytest.mark.parametrize("name", ["state.db", "secret.key"])
@pytest.mark.parametrize("bad_mode", [0o644, 0o640, 0o604, 0o620])
def test_refuses_files_others_can_read_or_write(home, name, bad_mode):
    os.chmod(home / name, bad_mode)
    with pytest.raises(InsecureFile, match=f"chmod 600 {home / name}"):
        StateDB.open(home)


def test_password_stored_only_as_scrypt_hash(home):
    with StateDB.open(home) as db:
        db.add_user("alice", PW)
        row = db.conn.execute("SELECT pw_hash, vnc_secret FROM users").fetchone()
        assert row["pw_hash"].startswith("scrypt$32768$8$1$")
        assert db.check_password("alice", PW)
        assert not db.check_password("alice", PW + "x")
        assert not db.check_password("bob", PW)
    for name in ("state.db", "state.db-wal"):
        if (home / name).exists():
            assert PW.encode() not in (home / name).read_bytes()


def test_vnc_secret_is_encrypted_and_needs_the_key(home, tmp_path):
    with StateDB.open(home) as db:
        db.add_user("alice", PW)
        token = db.conn.execute("SELECT vnc_secret FROM users").fetchone()["vnc_secret"]
        assert PW.encode() not in token
        assert db.vnc_secret("alice") == PW
    other = tmp_path / "other.key"
    SecretBox.create_key(other)
    with pytest.raises(StateError, match="does not decrypt"):
        SecretBox.from_file(other).decrypt(token)


def test_key_file_is_never_overwritten(home):
    with pytest.raises(FileExistsError):
        SecretBox.create_key(home / "secret.key")


def test_hash_is_salted_and_verifies():
    a, b = hash_password("pw-one-123", n=2**10), hash_password("pw-one-123", n=2**10)
    assert a != b
    assert verify_password("pw-one-123", a) and verify_password("pw-one-123", b)
    assert not verify_password("pw-one-124", a)
    assert not verify_password("pw-one-123", "md5$whatever")
    assert not verify_password("pw-one-123", "garbage")


def test_users_get_distinct_uids_and_duplicates_are_refused(home):
    with StateDB.open(home) as db:
        assert db.add_user("alice", PW).uid == 2000
        assert db.add_user("bob", PW).uid == 2001
        with pytest.raises(AlreadyExists):
            db.add_user("alice", PW)
        assert [u.name for u in db.list_users()] == ["alice", "bob"]
        db.remove_user("alice")
        with pytest.raises(NotFound):
            db.get_user("alice")
        assert db.add_user("carol", PW).uid == 2002


def test_bad_input_changes_nothing(home):
    with StateDB.open(home) as db:
        for name, pw in [("Root", PW), ("root", PW), ("al ice", PW), ("alice", "short"), ("alice", "line\nbreak-pw")]:
            with pytest.raises(BadInput):
                db.add_user(name, pw)
        assert db.list_users() == []


def test_passwd_changes_hash_and_secret(home):
    with StateDB.open(home) as db:
        db.add_user("alice", PW)
        db.set_password("alice", "a new password")
        assert db.check_password("alice", "a new password")
        assert not db.check_password("alice", PW)
        assert db.vnc_secret("alice") == "a new password"
        with pytest.raises(NotFound):
            db.set_password("nobody1", "whatever-123")


def test_user_with_a_desktop_cannot_be_removed(home):
    with StateDB.open(home) as db:
        db.add_user("alice", PW)
        db.conn.execute("INSERT INTO vms (user, node, state, created_at, updated_at) VALUES ('alice', 'n1', 'running', 0, 0)")
        with pytest.raises(StateError, match="labvm rm alice"):
            db.remove_user("alice")


def test_a_gpu_can_belong_to_one_vm_only(home):
    with StateDB.open(home) as db:
        for name in ("alice", "bobby"):
            db.add_user(name, PW)
            db.conn.execute("INSERT INTO vms (user, node, state, created_at, updated_at) VALUES (?, 'n1', 'running', 0, 0)", (name,))
        db.conn.execute("INSERT INTO gpu_assignments VALUES ('GPU-1', 'n1', 0, 'alice', 0)")
        with pytest.raises(sqlite3.IntegrityError):
            db.conn.execute("INSERT INTO gpu_assignments VALUES ('GPU-1', 'n1', 0, 'bobby', 0)")


def test_migrations_are_recorded_and_only_pending_ones_run(home, monkeypatch):
    with StateDB.open(home) as db:
        assert db.applied_migrations() == [name for name, _sql in state_mod.MIGRATIONS]
        assert db.pending_migrations() == []
    extra = ("9999_add_note", "ALTER TABLE users ADD COLUMN note TEXT NOT NULL DEFAULT ''")
    monkeypatch.setattr(state_mod, "MIGRATIONS", state_mod.MIGRATIONS + [extra])
    with StateDB.open(home) as db:
        with pytest.raises(StateError, match="9999_add_note pending"):
            db.require_current_schema()
        assert db.migrate() == ["9999_add_note"]
        assert db.migrate() == []
        db.add_user("alice", PW)
        assert db.conn.execute("SELECT note FROM users").fetchone()["note"] == ""
        assert db.applied_migrations()[-1] == "9999_add_note"
        assert db.applied_migrations() == [name for name, _sql in state_mod.MIGRATIONS]


def test_failed_migration_rolls_back_whole(home, monkeypatch):
    broken = ("0002_broken", "CREATE TABLE half (x INTEGER); THIS IS NOT SQL")
    monkeypatch.setattr(state_mod, "MIGRATIONS", state_mod.MIGRATIONS + [broken])
    with StateDB.open(home) as db:
        with pytest.raises(sqlite3.OperationalError):
            db.migrate()
        tables = {r[0] for r in db.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert "half" not in tables
        assert db.pending_migrations() == ["0002_broken"]


def test_open_without_init_says_what_to_do(tmp_path):
    with pytest.raises(StateError, match="labvm init"):
        StateDB.open(tmp_path)


def test_member_ids_migration_gives_existing_members_ids_and_their_unmarked_files(tmp_path, monkeypatch):
    """A database from before member ids: its members get distinct ids and keep owner records
    without one; members added afterwards get a fresh id and no claim on unmarked records."""
    home = tmp_path / "admin"
    before = [m for m in state_mod.MIGRATIONS if m[0] < "0004_member_ids"]
    monkeypatch.setattr(state_mod, "MIGRATIONS", before)
    StateDB.create(home)
    with StateDB.open(home) as db:
        for name, uid in (("alice", 2000), ("bob", 2001)):
            db.conn.execute("INSERT INTO users (name, uid, pw_hash, vnc_secret, created_at, updated_at) VALUES (?, ?, 'x', x'00', 0, 0)",
                            (name, uid))
    monkeypatch.undo()
    with StateDB.open(home) as db:
        assert db.pending_migrations() == [name for name, _sql in state_mod.MIGRATIONS if name >= "0004_member_ids"]
        db.migrate()
        alice, bob = db.get_user("alice"), db.get_user("bob")
        assert re.fullmatch(r"[0-9a-f]{32}", alice.member_id) and re.fullmatch(r"[0-9a-f]{32}", bob.member_id)
        assert alice.member_id != bob.member_id
        assert alice.owns_unmarked_files and bob.owns_unmarked_files
        assert alice.owns(None) and alice.owns(alice.member_id) and not alice.owns(bob.member_id)
        carol = db.add_user("carol", PW)
        assert db.get_user("carol") == carol
        assert re.fullmatch(r"[0-9a-f]{32}", carol.member_id) and carol.member_id not in (alice.member_id, bob.member_id)
        assert not carol.owns_unmarked_files and not carol.owns(None) and carol.owns(carol.member_id)
        with pytest.raises(sqlite3.IntegrityError):
            db.conn.execute("UPDATE users SET member_id = ? WHERE name = 'carol'", (alice.member_id,))


def test_a_name_given_again_gets_a_new_member_id(home):
    with StateDB.open(home) as db:
        first = db.add_user("alice", PW).member_id
        db.remove_user("alice")
        assert db.add_user("alice", PW).member_id != first


def test_a_removed_members_uid_is_never_given_again(home):
    with StateDB.open(home) as db:
        assert db.add_user("alice", PW).uid == 2000
        assert db.add_user("bob", PW).uid == 2001
        db.remove_user("bob")  # the highest uid
        assert db.add_user("carol", PW).uid == 2002
        db.remove_user("carol")
        db.remove_user("alice")  # nobody left
        assert db.add_user("dave", PW).uid == 2003


def test_the_uid_migration_starts_above_every_uid_given(tmp_path, monkeypatch):
    """A database from before the high-water mark: its next uid is above its members' uids."""
    home = tmp_path / "admin"
    monkeypatch.setattr(state_mod, "MIGRATIONS", [m for m in state_mod.MIGRATIONS if m[0] < "0008_uid_high_water"])
    StateDB.create(home)
    with StateDB.open(home) as db:
        db.add_user("alice", PW)
        assert db.add_user("bob", PW).uid == 2001
    monkeypatch.undo()
    with StateDB.open(home) as db:
        assert db.pending_migrations() == ["0008_uid_high_water"]
        db.migrate()
        db.remove_user("bob")
        assert db.add_user("carol", PW).uid == 2002
