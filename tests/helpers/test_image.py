"""The image helper run as a subprocess: desktop images side by side in a store on the node,
<images>/<id>, unpacked from tiny tarballs made here; the tree of the labvm of one image per node
(legacy, xfce_local) recognised but never replaced; removing an image, refused while a real
overlay mount uses it; and importing the docker base image through a fake dockerd."""

import base64
import fcntl
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

from .conftest import detach_everything_under

MARKER = ".labvm-image.json"
BUILT = "2025-01-02T03:04:05Z"
# What `labvm image build` writes into etc/labvm-image; the marker keeps what describes the image.
METADATA = {"built": BUILT, "packages": ["xterm", "mousepad"], "package_count": 321, "suite": "bookworm",
            "mirror": "http://deb.example/debian", "recipe": 7}
MARKER_KEYS = {"sha256", "desktop", "built", "packages", "package_count", "suite", "unpacked_at"}


def image(run_helper, action, params, check=False, **kwargs):
    return run_helper("image", {"action": action, "params": params, "check": check}, **kwargs)


def make_image(directory, name, files, desktop="minimal", symlinks=None, metadata=True):
    """A gzip image tarball of `files` (path -> text), `symlinks` (path -> target) and, unless
    told not to, etc/labvm-image; (path, sha256)."""
    root = directory / f"{name}-rootfs"
    if metadata:
        files = {**files, "etc/labvm-image": json.dumps({**METADATA, "desktop": desktop})}
    for path, text in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    for path, target in (symlinks or {}).items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).symlink_to(target)
    root.mkdir(parents=True, exist_ok=True)
    tarball = directory / f"{name}.tar.gz"
    tar = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "-czf", str(tarball), "-C", str(root), "."]
    subprocess.run(tar, check=True)
    return tarball, hashlib.sha256(tarball.read_bytes()).hexdigest()


@pytest.fixture
def uploads(tmp_path):
    directory = tmp_path / "uploads"
    directory.mkdir()
    return directory


@pytest.fixture
def tarballs(uploads):
    first = make_image(uploads, "first", {"etc/os-release": "first\n", "usr/bin/hello": "one\n"})
    second = make_image(uploads, "second", {"etc/os-release": "second\n", "usr/share/doc/x": "two\n"}, desktop="xfce")
    return first, second


@pytest.fixture
def node(tmp_path):
    """/var/lib/labvm of a node: the image store and the legacy tree (neither exists yet). Every
    mount a test leaves under it is detached."""
    root = tmp_path / "var-lib-labvm"
    root.mkdir()
    state = SimpleNamespace(root=root, images=root / "images", legacy=root / "xfce_local")
    state.store = {"images": str(state.images), "legacy": str(state.legacy)}
    try:
        yield state
    finally:
        detach_everything_under(tmp_path)


def unpack(run_helper, node, tarball_and_sha, check=False):
    tarball, sha256 = tarball_and_sha
    return image(run_helper, "ensure_unpacked", {"store": node.store, "tarball": str(tarball), "sha256": sha256}, check)


def held(run_helper, node) -> list[dict]:
    run = image(run_helper, "status", {"store": node.store})
    assert run.exit_code == 0 and run.reply["changed"] is False
    return run.data["images"]


def remove(run_helper, node, image_id, check=False):
    return image(run_helper, "remove", {"store": node.store, "id": image_id}, check)


def entries(directory) -> list[str]:
    return sorted(os.listdir(directory))


def marker(tree) -> dict:
    return json.loads((Path(tree) / MARKER).read_text())


def tree_state(tree) -> dict:
    """Every entry of a tree with its inode, mode, mtime and content: an image left untouched
    keeps all of them."""
    state = {}
    for directory, dirnames, filenames in os.walk(tree):
        for name in [".", *dirnames, *filenames]:
            path = Path(directory) / name
            info = os.lstat(path)
            content = path.read_bytes() if path.is_file() and not path.is_symlink() else None
            state[str(path.relative_to(tree))] = (info.st_ino, info.st_mode, info.st_mtime_ns, content)
    return state


def in_legacy(run_helper, node, tarball_and_sha) -> Path:
    """The node as the labvm of one image per node left it: the image unpacked in xfce_local."""
    assert unpack(run_helper, node, tarball_and_sha).exit_code == 0
    (node.images / tarball_and_sha[1]).rename(node.legacy)
    return node.legacy


@contextmanager
def overlay_on(base: Path, lower: Path):
    """A real overlay mounted at base/merged with `lower` as its lowest layer, unmounted on leaving."""
    for name in ("upper", "work", "merged", "mid"):
        (base / name).mkdir(parents=True)
    options = f"lowerdir={base / 'mid'}:{lower},upperdir={base / 'upper'},workdir={base / 'work'}"
    result = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(base / "merged")], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount an overlay here: {result.stderr.decode().strip()}")
    try:
        yield base / "merged"
    finally:
        subprocess.run(["umount", str(base / "merged")], check=False)
        detach_everything_under(base)


# --- status and ensure_unpacked -----------------------------------------------------------


def test_status_of_a_node_without_images(run_helper, node):
    assert held(run_helper, node) == []
    assert entries(node.root) == []  # status only reads


def test_unpacks_into_the_store_under_its_id(run_helper, node, tarballs):
    first, _ = tarballs
    run = unpack(run_helper, node, first)
    assert run.exit_code == 0 and run.reply["changed"] is True
    tree = node.images / first[1]
    assert run.data == {"id": first[1], "path": str(tree)}
    assert (tree / "usr/bin/hello").read_text() == "one\n"
    written = marker(tree)
    assert set(written) == MARKER_KEYS
    assert (written["sha256"], written["desktop"], written["built"]) == (first[1], "minimal", BUILT)
    assert (written["packages"], written["package_count"]) == (["xterm", "mousepad"], 321)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", written["unpacked_at"])
    assert oct(tree.stat().st_mode & 0o7777) == oct(0o755)
    # Nothing half-done is left beside it, and the uploaded tarball is the caller's to remove.
    assert entries(node.images) == [".lock", first[1]]
    assert first[0].exists() and not node.legacy.exists()
    assert held(run_helper, node) == [
        {
            "id": first[1],
            "path": str(tree),
            "legacy": False,
            "desktop": "minimal",
            "built": BUILT,
            "packages": ["xterm", "mousepad"],
            "unpacked_at": written["unpacked_at"],
            "in_use_by": [],
        }
    ]


def test_a_second_image_goes_beside_the_first(run_helper, node, tarballs):
    first, second = tarballs
    unpack(run_helper, node, first)
    before = tree_state(node.images / first[1])
    run = unpack(run_helper, node, second)
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert run.data == {"id": second[1], "path": str(node.images / second[1])}
    assert tree_state(node.images / first[1]) == before
    assert (node.images / second[1] / "etc/os-release").read_text() == "second\n"
    assert not (node.images / second[1] / "usr/bin/hello").exists()
    assert entries(node.images) == sorted([".lock", first[1], second[1]])
    listed = {entry["id"]: entry for entry in held(run_helper, node)}
    assert set(listed) == {first[1], second[1]}
    assert (listed[first[1]]["desktop"], listed[second[1]]["desktop"]) == ("minimal", "xfce")


def test_an_image_pushed_while_another_is_in_use_leaves_it_and_its_overlay_alone(run_helper, node, tarballs, tmp_path):
    first, second = tarballs
    unpack(run_helper, node, first)
    before = tree_state(node.images / first[1])
    with overlay_on(tmp_path / "desktop", node.images / first[1]) as merged:
        run = unpack(run_helper, node, second)
        assert run.exit_code == 0 and run.reply["changed"] is True
        assert tree_state(node.images / first[1]) == before
        # The desktop on the first image still reads it and writes over it.
        assert (merged / "usr/bin/hello").read_text() == "one\n"
        (merged / "usr/bin/hello").write_text("mine\n")
        assert (merged / "usr/bin/hello").read_text() == "mine\n"
        assert (node.images / first[1] / "usr/bin/hello").read_text() == "one\n"
        users = {entry["id"]: entry["in_use_by"] for entry in held(run_helper, node)}
        assert users == {first[1]: [str(merged)], second[1]: []}


def test_the_same_image_again_changes_nothing(run_helper, node, tarballs):
    first, _ = tarballs
    unpack(run_helper, node, first)
    before = tree_state(node.images / first[1])
    first[0].unlink()  # held already: the tarball is not even looked at
    for check in (True, False):
        again = unpack(run_helper, node, first, check=check)
        assert again.exit_code == 0 and again.reply["changed"] is False
        assert again.data == {"id": first[1], "path": str(node.images / first[1])}
    assert tree_state(node.images / first[1]) == before


def test_an_image_held_in_the_legacy_tree_is_held(run_helper, node, tarballs):
    first, second = tarballs
    legacy = in_legacy(run_helper, node, first)
    before = tree_state(legacy)
    for check in (True, False):
        run = unpack(run_helper, node, first, check=check)
        assert run.exit_code == 0 and run.reply["changed"] is False
        assert run.data == {"id": first[1], "path": str(legacy)}
    assert entries(node.images) == [".lock"]
    # Another image goes into the store; the legacy tree is never replaced.
    assert unpack(run_helper, node, second).reply["changed"] is True
    assert entries(node.images) == [".lock", second[1]]
    assert tree_state(legacy) == before and marker(legacy)["sha256"] == first[1]


def test_require_answers_for_an_image_held_in_the_store_or_the_legacy_tree_and_changes_nothing(run_helper, node, tarballs):
    first, second = tarballs

    def require(sha256):
        return image(run_helper, "require", {"image": {"id": sha256, **node.store}})

    missing = require(first[1])
    assert missing.exit_code == 3 and missing.reply["error"]["code"] == "image_missing"
    assert first[1][:12] in missing.reply["error"]["msg"]
    assert entries(node.root) == []  # asking changes nothing, even on a bare node
    assert unpack(run_helper, node, second).exit_code == 0
    found = require(second[1])
    assert found.exit_code == 0 and found.reply["changed"] is False
    assert found.data == {"id": second[1], "tree": str(node.images / second[1])}
    legacy = in_legacy(run_helper, node, first)
    assert require(first[1]).data == {"id": first[1], "tree": str(legacy)}
    # A tree under the image's name whose marker names another image is not that image.
    (node.images / first[1]).mkdir()
    (node.images / first[1] / MARKER).write_text(json.dumps({"sha256": second[1]}))
    legacy.rename(legacy.with_name("elsewhere"))
    assert require(first[1]).reply["error"]["code"] == "image_missing"


def test_status_lists_the_store_and_the_legacy_tree_with_the_overlays_using_them(run_helper, node, tarballs, tmp_path):
    first, second = tarballs
    legacy = in_legacy(run_helper, node, first)
    unpack(run_helper, node, second)
    shutil.copytree(legacy, node.images / first[1], symlinks=True)  # the first in the store too
    with overlay_on(tmp_path / "on-legacy", legacy / "usr") as on_legacy, \
            overlay_on(tmp_path / "on-second", node.images / second[1]) as on_second:
        listed = held(run_helper, node)
    store_first, store_second = (str(node.images / sha) for sha in (first[1], second[1]))
    assert [(entry["id"], entry["path"], entry["legacy"], entry["in_use_by"]) for entry in listed] == [
        *sorted([(first[1], store_first, False, []), (second[1], store_second, False, [str(on_second)])]),
        (first[1], str(legacy), True, [str(on_legacy)]),
    ]
    assert listed[-1]["desktop"] == "minimal" and listed[-1]["built"] == BUILT
    assert all(entry["in_use_by"] == [] for entry in held(run_helper, node))


def test_a_legacy_tree_without_an_image_id_is_not_listed(run_helper, node):
    (node.legacy / "etc").mkdir(parents=True)
    (node.legacy / "etc/os-release").write_text("an old tree\n")
    assert held(run_helper, node) == []
    (node.legacy / MARKER).write_text(json.dumps({"desktop": "xfce"}))
    assert held(run_helper, node) == []
    (node.legacy / MARKER).write_text(json.dumps({"sha256": "not-an-id", "desktop": "xfce"}))
    assert held(run_helper, node) == []


def test_check_mode_reports_the_change_and_makes_none(run_helper, node, tarballs):
    first, second = tarballs
    run = unpack(run_helper, node, first, check=True)
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert run.data == {"id": first[1], "path": None}
    assert entries(node.root) == []
    unpack(run_helper, node, first)
    assert unpack(run_helper, node, second, check=True).reply["changed"] is True
    assert entries(node.images) == [".lock", first[1]]


def test_checksum_mismatch_changes_nothing(run_helper, node, tarballs):
    first, second = tarballs
    unpack(run_helper, node, first)
    before = tree_state(node.images)
    run = unpack(run_helper, node, (second[0], "0" * 64))
    assert run.exit_code == 1
    assert run.error["code"] == "sha256_mismatch"
    assert f"has sha256 {second[1]}, not {'0' * 64}" in run.error["msg"]
    assert tree_state(node.images) == before
    assert entries(node.images) == [".lock", first[1]]
    assert [entry["id"] for entry in held(run_helper, node)] == [first[1]]


def test_a_tarball_tar_cannot_read_leaves_nothing_behind(run_helper, node, tarballs, uploads):
    first, _ = tarballs
    unpack(run_helper, node, first)
    before = tree_state(node.images / first[1])
    broken = uploads / "broken.tar.gz"
    broken.write_bytes(b"this is not gzip")
    run = unpack(run_helper, node, (broken, hashlib.sha256(broken.read_bytes()).hexdigest()))
    assert run.exit_code == 1 and run.error["code"] == "unpack_failed"
    assert entries(node.images) == [".lock", first[1]]
    assert tree_state(node.images / first[1]) == before


def test_missing_tarball_is_a_precondition(run_helper, node, uploads):
    run = unpack(run_helper, node, (uploads / "nowhere.tar.gz", "a" * 64))
    assert run.exit_code == 3 and run.error["code"] == "tarball_missing"
    assert entries(node.root) == []


def crashed_leftovers(node, image_id) -> None:
    """What an unpack or a removal killed halfway leaves: in the store, and beside the legacy
    tree (a removal sets it aside there first)."""
    for leftover in (node.images / ".incoming-dead", node.images / f".old-{image_id}-0badf00d",
                     node.root / ".old-xfce_local-0badf00d"):
        (leftover / "etc").mkdir(parents=True)
        (leftover / "etc/os-release").write_text("half\n")
    for not_ours in (node.images / "notes", node.root / "xfce_local.old", node.root / ".old-xfce_local-mine"):
        not_ours.mkdir(parents=True)


def test_leftovers_of_a_crashed_unpack_or_removal_are_cleared_by_the_next_unpack(run_helper, node, tarballs):
    first, second = tarballs
    crashed_leftovers(node, second[1])
    assert held(run_helper, node) == []
    assert unpack(run_helper, node, first).exit_code == 0
    assert entries(node.images) == [".lock", first[1], "notes"]
    assert entries(node.root) == [".old-xfce_local-mine", "images", "xfce_local.old"]


def test_leftovers_of_a_crashed_removal_are_cleared_by_the_next_removal(run_helper, node, tarballs):
    first, second = tarballs
    unpack(run_helper, node, first)
    crashed_leftovers(node, second[1])
    assert remove(run_helper, node, first[1]).reply["changed"] is True
    assert entries(node.images) == [".lock", "notes"]
    assert entries(node.root) == [".old-xfce_local-mine", "images", "xfce_local.old"]


def test_an_unpack_already_running_is_a_retryable_busy(run_helper, node, tarballs):
    first, _ = tarballs
    node.images.mkdir()
    with open(node.images / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = unpack(run_helper, node, first)
    assert run.exit_code == 75 and run.error["code"] == "image_busy" and run.error["retryable"] is True
    assert entries(node.images) == [".lock"]


def damage(tree: Path, how: str, elsewhere: Path, image_id: str) -> None:
    """A tree at <images>/<id> that is not that image, made one of several ways."""
    if how == "tree_symlink":  # a symlink named like the id, to a tree that looks like the image
        (elsewhere / "etc").mkdir(parents=True)
        (elsewhere / MARKER).write_text(json.dumps({"sha256": image_id}))
        tree.symlink_to(elsewhere)
        return
    (tree / "etc").mkdir(parents=True)
    (tree / "etc/os-release").write_text("stale\n")
    if how == "other_id":
        (tree / MARKER).write_text(json.dumps({"sha256": "b" * 64, "desktop": "xfce"}))
    elif how == "not_json":
        (tree / MARKER).write_text('{"sha256": ')
    elif how == "not_an_object":
        (tree / MARKER).write_text(json.dumps([image_id]))
    elif how == "marker_symlink":
        elsewhere.mkdir()
        (elsewhere / "marker.json").write_text(json.dumps({"sha256": image_id}))
        (tree / MARKER).symlink_to(elsewhere / "marker.json")


@pytest.mark.parametrize("how", ["no_marker", "other_id", "not_json", "not_an_object", "marker_symlink", "tree_symlink"])
def test_a_tree_named_like_an_id_without_a_valid_marker_is_no_image(run_helper, node, tarballs, tmp_path, how):
    first, _ = tarballs
    tree = node.images / first[1]
    node.images.mkdir()
    damage(tree, how, tmp_path / "elsewhere", first[1])
    assert held(run_helper, node) == []
    removed = remove(run_helper, node, first[1])
    assert removed.exit_code == 0 and removed.reply["changed"] is False and os.path.lexists(tree)
    # A push of that image replaces it whole, never reading or deleting through a symlink.
    run = unpack(run_helper, node, first)
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert not tree.is_symlink() and marker(tree)["sha256"] == first[1]
    assert (tree / "etc/os-release").read_text() == "first\n"
    assert entries(node.images) == [".lock", first[1]]
    if how in ("marker_symlink", "tree_symlink"):
        assert entries(tmp_path / "elsewhere")  # what the symlink pointed at is still there
    assert [entry["id"] for entry in held(run_helper, node)] == [first[1]]


def test_a_tree_named_like_an_id_that_an_overlay_uses_is_not_replaced(run_helper, node, tarballs, tmp_path):
    first, _ = tarballs
    tree = node.images / first[1]
    damage(tree, "no_marker", tmp_path / "elsewhere", first[1])
    with overlay_on(tmp_path / "desktop", tree) as merged:
        for check in (True, False):
            run = unpack(run_helper, node, first, check=check)
            assert run.exit_code == 3 and run.error["code"] == "image_in_use"
            assert str(merged) in run.error["msg"]
        assert (tree / "etc/os-release").read_text() == "stale\n" and (merged / "etc/os-release").exists()
    assert unpack(run_helper, node, first).reply["changed"] is True


def test_a_symlinked_store_is_refused(run_helper, node, tarballs):
    first, _ = tarballs
    real = node.root / "real"
    real.mkdir()
    node.images.symlink_to(real)
    for check in (True, False):
        run = unpack(run_helper, node, first, check=check)
        assert run.exit_code == 3 and run.error["code"] == "store_is_symlink"
    assert entries(real) == []


def test_a_store_that_is_a_file_is_refused(run_helper, node, tarballs):
    first, _ = tarballs
    node.images.write_text("not a directory\n")
    run = unpack(run_helper, node, first)
    assert run.exit_code == 3 and run.error["code"] == "store_not_a_directory"
    assert held(run_helper, node) == []


def test_the_marker_reads_no_node_file_through_symlinks_in_the_image(run_helper, node, uploads, tmp_path):
    host = tmp_path / "host"
    host.mkdir()
    stolen = json.dumps({"desktop": "stolen", "built": "never", "packages": ["secret"]})
    (host / "labvm-image").write_text(stolen)
    (host / "marker.json").write_text(stolen)
    (host / "temporary").write_text("a file of the node\n")
    linked_file = make_image(uploads, "linked-file", {"etc/os-release": "x\n"}, metadata=False, symlinks={
        "etc/labvm-image": str(host / "labvm-image"),
        MARKER: str(host / "marker.json"),  # the unpack writes the marker: it replaces this, never writes through it
        MARKER + ".tmp": str(host / "temporary"),
    })
    linked_dir = make_image(uploads, "linked-dir", {"usr/bin/hello": "x\n"}, metadata=False, symlinks={"etc": str(host)})
    for tarball_and_sha in (linked_file, linked_dir):
        run = unpack(run_helper, node, tarball_and_sha)
        assert run.exit_code == 0, run.reply
        tree = node.images / tarball_and_sha[1]
        assert not (tree / MARKER).is_symlink() and not os.path.lexists(tree / (MARKER + ".tmp"))
        written = marker(tree)
        assert set(written) == {"sha256", "unpacked_at"} and written["sha256"] == tarball_and_sha[1]
    assert (host / "marker.json").read_text() == stolen and (host / "temporary").read_text() == "a file of the node\n"
    assert entries(host) == ["labvm-image", "marker.json", "temporary"]
    listed = held(run_helper, node)
    assert sorted(entry["id"] for entry in listed) == sorted([linked_file[1], linked_dir[1]])
    assert all((entry["desktop"], entry["built"], entry["packages"]) == (None, None, None) for entry in listed)


# --- remove -------------------------------------------------------------------------------


def test_remove_deletes_that_image_only(run_helper, node, tarballs):
    first, second = tarballs
    unpack(run_helper, node, first)
    unpack(run_helper, node, second)
    before = tree_state(node.images / second[1])
    run = remove(run_helper, node, first[1])
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert run.data == {"id": first[1], "removed": [str(node.images / first[1])]}
    assert entries(node.images) == [".lock", second[1]]
    assert tree_state(node.images / second[1]) == before
    assert [entry["id"] for entry in held(run_helper, node)] == [second[1]]
    again = remove(run_helper, node, first[1])
    assert again.exit_code == 0 and again.reply["changed"] is False and again.data == {"id": first[1], "removed": []}


def test_remove_deletes_the_store_tree_and_the_legacy_tree_of_that_id(run_helper, node, tarballs):
    first, second = tarballs
    legacy = in_legacy(run_helper, node, first)
    shutil.copytree(legacy, node.images / first[1], symlinks=True)
    unpack(run_helper, node, second)
    before = tree_state(node.images / second[1])
    run = remove(run_helper, node, first[1])
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert run.data["removed"] == [str(node.images / first[1]), str(legacy)]
    assert not os.path.lexists(legacy) and entries(node.images) == [".lock", second[1]]
    assert entries(node.root) == ["images"]  # nothing set aside is left beside the legacy tree
    assert tree_state(node.images / second[1]) == before


def test_remove_leaves_a_legacy_tree_of_another_image(run_helper, node, tarballs):
    first, second = tarballs
    legacy = in_legacy(run_helper, node, second)
    unpack(run_helper, node, first)
    before = tree_state(legacy)
    run = remove(run_helper, node, first[1])
    assert run.exit_code == 0 and run.data["removed"] == [str(node.images / first[1])]
    assert tree_state(legacy) == before
    assert [(entry["id"], entry["legacy"]) for entry in held(run_helper, node)] == [(second[1], True)]


def test_remove_in_check_mode_removes_nothing(run_helper, node, tarballs):
    first, second = tarballs
    legacy = in_legacy(run_helper, node, first)
    shutil.copytree(legacy, node.images / first[1], symlinks=True)
    before = tree_state(node.root)
    run = remove(run_helper, node, first[1], check=True)
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert run.data == {"id": first[1], "removed": [str(node.images / first[1]), str(legacy)]}
    absent = remove(run_helper, node, second[1], check=True)
    assert absent.exit_code == 0 and absent.reply["changed"] is False and absent.data["removed"] == []
    assert tree_state(node.root) == before


def test_remove_is_refused_while_an_overlay_uses_the_image(run_helper, node, tarballs, tmp_path):
    first, second = tarballs
    unpack(run_helper, node, first)
    unpack(run_helper, node, second)
    before = tree_state(node.images)
    with overlay_on(tmp_path / "desktop", node.images / first[1]) as merged:
        for check in (True, False):
            run = remove(run_helper, node, first[1], check=check)
            assert run.exit_code == 3 and run.error["code"] == "image_in_use"
            assert str(merged) in run.error["msg"] and first[1][:12] in run.error["msg"]
        assert tree_state(node.images) == before
        assert (merged / "usr/bin/hello").read_text() == "one\n"
        # Another image is not in use: it goes.
        assert remove(run_helper, node, second[1]).reply["changed"] is True
    run = remove(run_helper, node, first[1])
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert entries(node.images) == [".lock"]


def test_a_directory_inside_the_image_used_as_a_lower_counts_as_in_use(run_helper, node, tarballs, tmp_path):
    first, _ = tarballs
    unpack(run_helper, node, first)
    with overlay_on(tmp_path / "desktop", node.images / first[1] / "usr") as merged:
        assert held(run_helper, node)[0]["in_use_by"] == [str(merged)]
        run = remove(run_helper, node, first[1])
        assert run.exit_code == 3 and run.error["code"] == "image_in_use"
    assert (node.images / first[1] / "usr/bin/hello").exists()


def test_remove_is_refused_whole_while_an_overlay_uses_the_legacy_tree(run_helper, node, tarballs, tmp_path):
    first, _ = tarballs
    legacy = in_legacy(run_helper, node, first)
    shutil.copytree(legacy, node.images / first[1], symlinks=True)
    before = tree_state(node.root)
    with overlay_on(tmp_path / "desktop", legacy) as merged:
        run = remove(run_helper, node, first[1])
        assert run.exit_code == 3 and run.error["code"] == "image_in_use" and str(merged) in run.error["msg"]
    assert tree_state(node.root) == before
    assert remove(run_helper, node, first[1]).data["removed"] == [str(node.images / first[1]), str(legacy)]


def test_an_overlay_of_a_sibling_with_a_common_prefix_is_not_a_user(run_helper, node, tarballs, tmp_path):
    first, _ = tarballs
    legacy = in_legacy(run_helper, node, first)
    sibling = node.root / "xfce_local2"
    sibling.mkdir()
    with overlay_on(tmp_path / "desktop", sibling):
        assert held(run_helper, node)[0]["in_use_by"] == []
        run = remove(run_helper, node, first[1])
        assert run.exit_code == 0 and run.data["removed"] == [str(legacy)]


def test_a_removal_while_the_store_is_locked_is_a_retryable_busy(run_helper, node, tarballs):
    first, _ = tarballs
    unpack(run_helper, node, first)
    with open(node.images / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = remove(run_helper, node, first[1])
    assert run.exit_code == 75 and run.error["code"] == "image_busy"
    assert entries(node.images) == [".lock", first[1]]


# --- overlay lower layers -----------------------------------------------------------------


@pytest.mark.parametrize(
    "options, lowers",
    [
        (("rw", "lowerdir=/a:/b", "upperdir=/u"), ["/a", "/b"]),
        (("rw", "lowerdir=/with\\054comma:/b"), ["/with,comma", "/b"]),
        (("rw", "lowerdir=/with\\:colon:/b"), ["/with:colon", "/b"]),
        (("rw", "lowerdir=/sp\\040ace"), ["/sp ace"]),
        (("rw", "lowerdir+=/a", "lowerdir+=/b", "datadir+=/d"), ["/a", "/b", "/d"]),
        (("rw", "lowerdir=/a::/data"), ["/a", "/data"]),
        (("rw", "upperdir=/u"), []),
    ],
)
def test_overlay_lower_layers_are_read_from_mount_options(bundle, options, lowers):
    assert bundle.system.overlay_lowerdirs(options) == lowers


def test_overlays_using_a_tree_are_those_with_it_or_a_directory_in_it_as_a_lower(bundle):
    tree = "/var/lib/labvm/images/" + "a" * 64

    def mount(point, fstype, lowerdir):
        return SimpleNamespace(mount_point=point, fstype=fstype, super_options=("rw", f"lowerdir={lowerdir}"))

    entries_ = [
        mount("/m/exact", "overlay", f"/v/low:{tree}"),
        mount("/m/inside", "overlay", f"{tree}/usr:/v/other"),
        mount("/m/dotted", "overlay", f"/v/low:{tree}/./"),
        mount("/m/prefix", "overlay", f"/v/low:{tree}2"),
        mount("/m/parent", "overlay", "/var/lib/labvm/images"),
        mount("/m/bind", "ext4", tree),
    ]
    assert bundle.images.overlays_using(tree, entries_) == ["/m/exact", "/m/inside", "/m/dotted"]


# --- malformed requests -------------------------------------------------------------------

GOOD_STORE = {"images": "/var/lib/labvm/images", "legacy": "/var/lib/labvm/xfce_local"}
GOOD_UNPACK = {"store": GOOD_STORE, "tarball": "/var/lib/labvm/incoming/x.tar.gz", "sha256": "a" * 64}


@pytest.mark.parametrize(
    "change, code, message",
    [
        ({"store": None}, "missing_param", "missing required param 'store'"),
        ({"tarball": None}, "missing_param", "missing required param 'tarball'"),
        ({"sha256": None}, "missing_param", "missing required param 'sha256'"),
        ({"store": "/var/lib/labvm/images"}, "bad_param", "'store' must be an object with 'images' and 'legacy'"),
        ({"store": {"images": "/var/lib/labvm/images"}}, "bad_param", "must be an object with 'images' and 'legacy'"),
        ({"store": {**GOOD_STORE, "more": "/a/b"}}, "bad_param", "must be an object with 'images' and 'legacy'"),
        ({"store": {**GOOD_STORE, "images": "var/lib/labvm/images"}}, "bad_param", "'store.images' must be an absolute path"),
        ({"store": {**GOOD_STORE, "images": "/"}}, "bad_param", "at least 2 directories deep"),
        ({"store": {**GOOD_STORE, "images": "/var/"}}, "bad_param", "at least 2 directories deep"),
        ({"store": {**GOOD_STORE, "legacy": "/xfce_local"}}, "bad_param", "'store.legacy' must be at least 2"),
        ({"store": {**GOOD_STORE, "images": "/var/lib/a,b"}}, "bad_param", "must not contain ','"),
        ({"store": {**GOOD_STORE, "images": "/var/lib/a:b"}}, "bad_param", "must not contain ','"),
        ({"store": {**GOOD_STORE, "legacy": "/var/lib/a\\b"}}, "bad_param", "must not contain ','"),
        ({"store": {**GOOD_STORE, "images": "/var/lib/labvm/ima\nges"}}, "bad_param", "must not contain NUL or line breaks"),
        ({"store": {**GOOD_STORE, "legacy": 7}}, "bad_param", "'store.legacy' must be a string path"),
        ({"xfce_local": "/var/lib/labvm/xfce_local"}, "unknown_param", "unknown param(s) 'xfce_local'"),
        ({"tarball": "x.tar.gz"}, "bad_param", "must be an absolute path"),
        ({"tarball": 7}, "bad_param", "must be a string path"),
        ({"sha256": "A" * 64}, "bad_param", "must be an image id"),
        ({"sha256": "a" * 63}, "bad_param", "must be an image id"),
        ({"sha256": "a" * 64 + "\n"}, "bad_param", "must be an image id"),
        ({"sha256": 1}, "bad_param", "must be an image id"),
        ({"mode": "force"}, "unknown_param", "unknown param(s) 'mode'"),
    ],
)
def test_bad_ensure_unpacked_params_are_refused(run_helper, change, code, message):
    params = {key: value for key, value in {**GOOD_UNPACK, **change}.items() if value is not None}
    run = image(run_helper, "ensure_unpacked", params)
    assert run.exit_code == 2
    assert run.error["code"] == code and message in run.error["msg"]


@pytest.mark.parametrize(
    "params, code, message",
    [
        ({"store": GOOD_STORE}, "missing_param", "missing required param 'id'"),
        ({"id": "a" * 64}, "missing_param", "missing required param 'store'"),
        ({"store": GOOD_STORE, "id": "a" * 12}, "bad_param", "'id' must be an image id"),
        ({"store": GOOD_STORE, "id": "../" + "a" * 61}, "bad_param", "'id' must be an image id"),
        ({"store": {**GOOD_STORE, "legacy": "/"}, "id": "a" * 64}, "bad_param", "at least 2 directories deep"),
        ({"store": GOOD_STORE, "id": "a" * 64, "force": True}, "unknown_param", "unknown param(s) 'force'"),
    ],
)
def test_bad_remove_params_are_refused(run_helper, params, code, message):
    run = image(run_helper, "remove", params)
    assert run.exit_code == 2
    assert run.error["code"] == code and message in run.error["msg"]


def test_unknown_image_action(run_helper):
    run = image(run_helper, "unpack", GOOD_UNPACK)
    assert run.exit_code == 2 and run.error["code"] == "unknown_action"
    assert "known: ensure_docker_base, ensure_unpacked, remove, require, status" in run.error["msg"]


def test_status_takes_only_the_store(run_helper):
    run = image(run_helper, "status", GOOD_UNPACK)
    assert run.exit_code == 2 and run.error["code"] == "unknown_param"
    run = image(run_helper, "status", {})
    assert run.exit_code == 2 and run.error["code"] == "missing_param"


# --- ensure_docker_base -------------------------------------------------------------------


def small_tar() -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in ("etc", "tmp", "usr"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if name == "tmp" else 0o755
            tar.addfile(info)
    return buffer.getvalue()


TAG = "labvm/base:0123456789ab"


def docker_base(run_helper, fake_docker, check=False, **params):
    params = {"tag": TAG, "tar_b64": base64.b64encode(small_tar()).decode(), "docker_socket": fake_docker.socket_path, **params}
    return image(run_helper, "ensure_docker_base", params, check)


def test_base_image_is_imported_once(run_helper, fake_docker):
    run = docker_base(run_helper, fake_docker)
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert run.data == {"tag": TAG, "id": "sha256:" + hashlib.sha256(small_tar()).hexdigest()}
    [imported] = fake_docker.imported
    assert (imported["repo"], imported["tag"]) == ("labvm/base", "0123456789ab")
    assert imported["body"] == small_tar() and imported["content_type"] == "application/x-tar"
    again = docker_base(run_helper, fake_docker)
    assert again.exit_code == 0 and again.reply["changed"] is False and again.data == run.data
    assert len(fake_docker.imported) == 1


def test_base_image_check_mode_imports_nothing(run_helper, fake_docker):
    run = docker_base(run_helper, fake_docker, check=True)
    assert run.exit_code == 0 and run.reply["changed"] is True and run.data == {"tag": TAG, "id": None}
    assert fake_docker.imported == []
    assert [method for method, _ in fake_docker.requests] == ["GET"]


def test_an_import_error_in_the_progress_stream_is_a_failure(run_helper, fake_docker):
    fake_docker.import_error = "archive/tar: invalid tar header"
    run = docker_base(run_helper, fake_docker)
    assert run.exit_code == 1 and run.error["code"] == "docker_import_failed"
    assert "invalid tar header" in run.error["msg"]


def test_an_import_dockerd_does_not_keep_is_a_failure(run_helper, fake_docker):
    fake_docker.import_forgets = True
    run = docker_base(run_helper, fake_docker)
    assert run.exit_code == 1 and run.error["code"] == "docker_import_missing"


def test_docker_answering_an_error_is_reported_with_its_message(run_helper, fake_docker):
    fake_docker.inspect_error = (500, json.dumps({"message": "layer store broken"}))
    run = docker_base(run_helper, fake_docker)
    assert run.exit_code == 1 and run.error["code"] == "docker_error"
    assert f"GET /images/{TAG}/json answered HTTP 500: layer store broken" in run.error["msg"]
    assert fake_docker.imported == []


def test_missing_docker_socket_is_a_precondition(run_helper, tmp_path):
    params = {"tag": TAG, "tar_b64": base64.b64encode(small_tar()).decode(), "docker_socket": str(tmp_path / "docker.sock")}
    run = image(run_helper, "ensure_docker_base", params)
    assert run.exit_code == 3 and run.error["code"] == "docker_socket_missing"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tag": "labvm/base"}, "must be a docker image name with a tag"),
        ({"tag": "Labvm/base:1"}, "must be a docker image name with a tag"),
        ({"tag": "labvm/base:"}, "must be a docker image name with a tag"),
        ({"tag": "labvm/base:.x"}, "must be a docker image name with a tag"),
        ({"tag": "labvm/base:1 2"}, "must be a docker image name with a tag"),
        ({"tag": "labvm/base:1?fromSrc=http://x"}, "must be a docker image name with a tag"),
        ({"tag": "../base:1"}, "must be a docker image name with a tag"),
        ({"tag": "labvm//base:1"}, "must be a docker image name with a tag"),
        ({"tag": "a/" * 130 + "b:1"}, "must be a docker image name with a tag"),
        ({"tar_b64": "not base64!"}, "is not valid base64"),
        ({"tar_b64": ""}, "must decode to 1 to"),
        ({"tar_b64": base64.b64encode(b"hello").decode()}, "is not an uncompressed tar"),
        ({"tar_b64": 5}, "must be a base64 string"),
        ({"docker_socket": "docker.sock"}, "must be an absolute path"),
    ],
)
def test_bad_docker_base_params_are_refused(run_helper, fake_docker, change, message):
    run = docker_base(run_helper, fake_docker, **change)
    assert run.exit_code == 2 and message in run.error["msg"]
    assert fake_docker.requests == []
