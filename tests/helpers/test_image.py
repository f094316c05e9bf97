"""The image helper run as a subprocess: unpacking a desktop image into xfce_local (tiny
tarballs made here), refusing to swap a tree an overlay still uses (a real overlay mount),
and importing the docker base image through a fake dockerd."""

import base64
import fcntl
import hashlib
import io
import json
import subprocess
import tarfile

import pytest

MARKER = ".labvm-image.json"


def image(run_helper, action, params, check=False, **kwargs):
    return run_helper("image", {"action": action, "params": params, "check": check}, **kwargs)


def make_image(directory, name, files, desktop="minimal"):
    """A gzip image tarball of `files` (path -> text) plus etc/labvm-image; (path, sha256)."""
    root = directory / f"{name}-rootfs"
    for path, text in {**files, "etc/labvm-image": json.dumps({"desktop": desktop, "built": "2025-01-02T03:04:05Z"})}.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_text(text)
    tarball = directory / f"{name}.tar.gz"
    tar = ["tar", "--numeric-owner", "--xattrs", "--xattrs-include=*", "--acls", "-czf", str(tarball), "-C", str(root), "."]
    subprocess.run(tar, check=True)
    return tarball, hashlib.sha256(tarball.read_bytes()).hexdigest()


@pytest.fixture
def images(tmp_path):
    store = tmp_path / "images"
    store.mkdir()
    first = make_image(store, "first", {"etc/os-release": "first\n", "usr/bin/hello": "one\n"})
    second = make_image(store, "second", {"etc/os-release": "second\n", "usr/share/doc/x": "two\n"}, desktop="xfce")
    return first, second


@pytest.fixture
def xfce_local(tmp_path):
    parent = tmp_path / "var-lib-labvm"
    parent.mkdir()
    return parent / "xfce_local"


def unpack(run_helper, xfce_local, tarball_and_sha, check=False):
    tarball, sha256 = tarball_and_sha
    return image(run_helper, "ensure_unpacked", {"xfce_local": str(xfce_local), "tarball": str(tarball), "sha256": sha256}, check)


def siblings(xfce_local):
    return sorted(path.name for path in xfce_local.parent.iterdir())


def marker(xfce_local):
    return json.loads((xfce_local / MARKER).read_text())


# --- status and ensure_unpacked -----------------------------------------------------------


def test_status_of_a_node_without_an_image(run_helper, xfce_local):
    run = image(run_helper, "status", {"xfce_local": str(xfce_local)})
    assert run.exit_code == 0 and run.reply["changed"] is False
    assert run.data == {
        "xfce_local": str(xfce_local),
        "exists": False,
        "present": False,
        "sha256": None,
        "desktop": None,
        "built": None,
        "unpacked_at": None,
        "in_use_by": [],
    }


def test_unpacks_into_a_fresh_xfce_local(run_helper, xfce_local, images):
    first, _ = images
    run = unpack(run_helper, xfce_local, first)
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert (xfce_local / "usr/bin/hello").read_text() == "one\n"
    assert run.data["present"] is True and run.data["sha256"] == first[1]
    assert run.data["desktop"] == "minimal" and run.data["built"] == "2025-01-02T03:04:05Z"
    assert run.data["previous_sha256"] is None
    assert marker(xfce_local)["sha256"] == first[1]
    assert oct(xfce_local.stat().st_mode & 0o7777) == oct(0o755)
    # Nothing half-done is left beside it, and the uploaded tarball is the caller's to remove.
    assert siblings(xfce_local) == ["xfce_local", "xfce_local.lock"]
    assert first[0].exists()


def test_unpacking_the_same_image_again_changes_nothing(run_helper, xfce_local, images):
    first, _ = images
    unpack(run_helper, xfce_local, first)
    unpacked_at = marker(xfce_local)["unpacked_at"]
    again = unpack(run_helper, xfce_local, first)
    assert again.exit_code == 0 and again.reply["changed"] is False
    assert again.data["sha256"] == first[1] and again.data["unpacked_at"] == unpacked_at
    status = image(run_helper, "status", {"xfce_local": str(xfce_local)})
    assert status.data["present"] is True and status.data["sha256"] == first[1]


def test_a_new_image_replaces_the_old_tree_whole(run_helper, xfce_local, images):
    first, second = images
    unpack(run_helper, xfce_local, first)
    run = unpack(run_helper, xfce_local, second)
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert run.data["previous_sha256"] == first[1] and run.data["sha256"] == second[1]
    assert run.data["desktop"] == "xfce"
    assert (xfce_local / "etc/os-release").read_text() == "second\n"
    assert not (xfce_local / "usr/bin/hello").exists()
    assert siblings(xfce_local) == ["xfce_local", "xfce_local.lock"]


def test_check_mode_reports_the_change_and_makes_none(run_helper, xfce_local, images):
    first, second = images
    run = unpack(run_helper, xfce_local, first, check=True)
    assert run.exit_code == 0 and run.reply["changed"] is True
    assert run.data["wanted_sha256"] == first[1]
    assert not xfce_local.exists()
    unpack(run_helper, xfce_local, first)
    assert unpack(run_helper, xfce_local, first, check=True).reply["changed"] is False
    assert unpack(run_helper, xfce_local, second, check=True).reply["changed"] is True
    assert marker(xfce_local)["sha256"] == first[1]


def test_checksum_mismatch_changes_nothing(run_helper, xfce_local, images):
    first, second = images
    unpack(run_helper, xfce_local, first)
    run = unpack(run_helper, xfce_local, (second[0], "0" * 64))
    assert run.exit_code == 1
    assert run.error["code"] == "sha256_mismatch"
    assert f"has sha256 {second[1]}, not {'0' * 64}" in run.error["msg"]
    assert marker(xfce_local)["sha256"] == first[1]
    assert (xfce_local / "usr/bin/hello").read_text() == "one\n"
    assert siblings(xfce_local) == ["xfce_local", "xfce_local.lock"]


def test_a_tarball_tar_cannot_read_leaves_the_old_tree(run_helper, xfce_local, images, tmp_path):
    first, _ = images
    unpack(run_helper, xfce_local, first)
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(b"this is not gzip")
    run = unpack(run_helper, xfce_local, (broken, hashlib.sha256(broken.read_bytes()).hexdigest()))
    assert run.exit_code == 1 and run.error["code"] == "unpack_failed"
    assert marker(xfce_local)["sha256"] == first[1]
    assert siblings(xfce_local) == ["xfce_local", "xfce_local.lock"]


def test_missing_tarball_is_a_precondition(run_helper, xfce_local, tmp_path):
    run = unpack(run_helper, xfce_local, (tmp_path / "nowhere.tar.gz", "a" * 64))
    assert run.exit_code == 3 and run.error["code"] == "tarball_missing"
    assert not xfce_local.exists()


def test_leftovers_of_a_crashed_unpack_are_cleared(run_helper, xfce_local, images):
    first, _ = images
    for leftover in ("xfce_local.incoming-dead", "xfce_local.old-dead"):
        (xfce_local.parent / leftover / "etc").mkdir(parents=True)
    (xfce_local.parent / "xfce_local.older").mkdir()  # not ours: kept
    assert unpack(run_helper, xfce_local, first).exit_code == 0
    assert siblings(xfce_local) == ["xfce_local", "xfce_local.lock", "xfce_local.older"]


def test_an_unpack_already_running_is_a_retryable_busy(run_helper, xfce_local, images):
    first, _ = images
    with open(f"{xfce_local}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run = unpack(run_helper, xfce_local, first)
    assert run.exit_code == 75 and run.error["code"] == "image_busy" and run.error["retryable"] is True
    assert not xfce_local.exists()


def test_an_empty_directory_is_filled_but_a_foreign_tree_is_not_replaced(run_helper, xfce_local, images):
    first, _ = images
    xfce_local.mkdir()
    assert unpack(run_helper, xfce_local, first).reply["changed"] is True
    other = xfce_local.parent / "other"
    (other / "etc").mkdir(parents=True)
    (other / "etc/passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    run = unpack(run_helper, other, first)
    assert run.exit_code == 3 and run.error["code"] == "xfce_local_not_an_image"
    assert (other / "etc/passwd").exists() and not (other / MARKER).exists()


def test_a_symlinked_xfce_local_is_refused(run_helper, xfce_local, images):
    first, _ = images
    real = xfce_local.parent / "real"
    real.mkdir()
    xfce_local.symlink_to(real)
    run = unpack(run_helper, xfce_local, first)
    assert run.exit_code == 3 and run.error["code"] == "xfce_local_is_symlink"


# --- in use by an overlay -----------------------------------------------------------------


@pytest.fixture
def overlay_on(tmp_path):
    """overlay_on(lower) mounts a real overlay with `lower` as its lowest layer."""
    mounted = []

    def mount(lower):
        base = tmp_path / f"overlay{len(mounted)}"
        for name in ("upper", "work", "merged", "mid"):
            (base / name).mkdir(parents=True)
        options = f"lowerdir={base / 'mid'}:{lower},upperdir={base / 'upper'},workdir={base / 'work'}"
        result = subprocess.run(["mount", "-t", "overlay", "overlay", "-o", options, str(base / "merged")], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount an overlay here: {result.stderr.decode().strip()}")
        mounted.append(base / "merged")
        return base / "merged"

    yield mount
    for merged in reversed(mounted):
        subprocess.run(["umount", str(merged)], check=True)


def test_an_image_in_use_as_overlay_lower_is_not_replaced(run_helper, xfce_local, images, overlay_on):
    first, second = images
    unpack(run_helper, xfce_local, first)
    merged = overlay_on(xfce_local)
    status = image(run_helper, "status", {"xfce_local": str(xfce_local)})
    assert status.data["in_use_by"] == [str(merged)]
    for check in (True, False):
        run = unpack(run_helper, xfce_local, second, check=check)
        assert run.exit_code == 3 and run.error["code"] == "image_in_use"
        assert str(merged) in run.error["msg"] and "stop those desktops" in run.error["msg"]
    assert marker(xfce_local)["sha256"] == first[1]
    assert (merged / "usr/bin/hello").read_text() == "one\n"
    assert siblings(xfce_local) == ["xfce_local", "xfce_local.lock"]
    # The image it already holds is still "done": starting desktops must not be blocked.
    assert unpack(run_helper, xfce_local, first).reply["changed"] is False


def test_a_directory_inside_the_image_used_as_a_lower_counts_as_in_use(run_helper, xfce_local, images, overlay_on):
    first, second = images
    unpack(run_helper, xfce_local, first)
    overlay_on(xfce_local / "usr")
    assert unpack(run_helper, xfce_local, second).error["code"] == "image_in_use"


def test_an_overlay_of_a_sibling_with_a_common_prefix_is_not_a_user(run_helper, xfce_local, images, overlay_on):
    first, second = images
    unpack(run_helper, xfce_local, first)
    sibling = xfce_local.parent / "xfce_local2"
    sibling.mkdir()
    overlay_on(sibling)
    assert unpack(run_helper, xfce_local, second).reply["changed"] is True


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
    assert bundle.image.overlay_lowerdirs(options) == lowers


# --- malformed requests -------------------------------------------------------------------

GOOD_UNPACK = {"xfce_local": "/var/lib/labvm/xfce_local", "tarball": "/var/lib/labvm/incoming/x.tar.gz", "sha256": "a" * 64}


@pytest.mark.parametrize(
    "change, code, message",
    [
        ({"xfce_local": None}, "missing_param", "missing required param 'xfce_local'"),
        ({"tarball": None}, "missing_param", "missing required param 'tarball'"),
        ({"sha256": None}, "missing_param", "missing required param 'sha256'"),
        ({"xfce_local": "var/lib/labvm/xfce_local"}, "bad_param", "must be an absolute path"),
        ({"xfce_local": "/"}, "bad_param", "at least 2 directories deep"),
        ({"xfce_local": "/var/"}, "bad_param", "at least 2 directories deep"),
        ({"xfce_local": "/var/lib/labvm/xfce\nlocal"}, "bad_param", "must not contain NUL or line breaks"),
        ({"tarball": "x.tar.gz"}, "bad_param", "must be an absolute path"),
        ({"tarball": 7}, "bad_param", "must be a string path"),
        ({"sha256": "A" * 64}, "bad_param", "must be a sha256"),
        ({"sha256": "a" * 63}, "bad_param", "must be a sha256"),
        ({"sha256": "a" * 64 + "\n"}, "bad_param", "must be a sha256"),
        ({"sha256": 1}, "bad_param", "must be a sha256"),
        ({"mode": "force"}, "unknown_param", "unknown param(s) 'mode'"),
    ],
)
def test_bad_ensure_unpacked_params_are_refused(run_helper, change, code, message):
    params = {key: value for key, value in {**GOOD_UNPACK, **change}.items() if value is not None}
    run = image(run_helper, "ensure_unpacked", params)
    assert run.exit_code == 2
    assert run.error["code"] == code and message in run.error["msg"]


def test_unknown_image_action(run_helper):
    run = image(run_helper, "unpack", GOOD_UNPACK)
    assert run.exit_code == 2 and run.error["code"] == "unknown_action"
    assert "known: ensure_docker_base, ensure_unpacked, status" in run.error["msg"]


def test_status_takes_only_xfce_local(run_helper):
    run = image(run_helper, "status", GOOD_UNPACK)
    assert run.exit_code == 2 and run.error["code"] == "unknown_param"


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
