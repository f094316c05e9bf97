"""merge: publish the next version of a desktop's files on MooseFS, and manage its versions.

Actions:
  publish         low_mfs.v<target> = low_mfs.v<base> with up_mfs (or a snapshot of it) applied,
                  as one layer that, over the desktop image, shows what the desktop showed;
                  target defaults to base + 1
  snapshot_upper  an instant's copy of up_mfs, <user dir>/.upper-<name>, for a later publish
  versions        the published versions and their metadata
  remove_version  delete one version; never the newest, never one mounted on this node
  changed_paths   what the member changed over the image: the paths in a version and up_mfs

Layout on MooseFS, per user:

    <mfs_mount>/vms/<user>/
        low_mfs.v<N>/         a version: the desktop's lower layer, its / as of that version
        low_mfs.v<N>.json     {"version", "base", "created", "files", "bytes", "reason", "image"}; beside
                              the tree, never in it: the tree is the desktop's /
        up_mfs/               the sync's copy of the desktop's upper layer
        .upper-<name>/        a snapshot_upper copy; the publish that names it uses it up
        .merge-*              work of a publish (or a removal) under way; a leftover of a
                              crashed one, which the next publish deletes first

A publish never writes to low_mfs.v<base> or to the upper it reads. It copies both
(`mfsmakesnapshot`: metadata only, no data copied; `cp -a` where the tree is not on MooseFS),
lets labvm_merge (from this bundle) move the upper copy's entries into the lower copy, writes
the metadata, and publishes with one rename(2). A crash at any point leaves the base, up_mfs
and every published version as they were, and the next publish starts clean.

A version is a layer over the desktop's image (_images.py), not a whole root: where the member
deleted or replaced something of the image, it keeps the whiteout or opaque directory that
hides it. Given `image`, the desktop's image (found on this node), the merge keeps exactly
those, and the version records that image's id; without
it, every whiteout stays, and one in a directory the image lacks shows in listings as a name
that cannot be opened.

`reason` says which operation published the version (PUBLISH_REASONS); retention counts
backups apart from the others. Version 0 lists as "create"; one published before versions had
a reason lists with none (null).

`files` counts regular files (a hard-linked file once per name) and `bytes` their length plus
the length of symlink targets, as `mfsdirinfo` counts them (checked with MooseFS 3.0.117).
"""

import json
import os
import posixpath
import re
import signal
import stat
import time

from _contract import (
    Action,
    BadRequest,
    Failed,
    Param,
    PreconditionFailed,
    Result,
    absolute_path,
    integer_between,
    layer_path,
    log,
    string_matching,
    user_name,
)
from _images import image_ref
from _images import require as require_image
from _layout import UP_MFS, VERSION_DIR_PATTERN, VmPaths, metadata_path, mfs_user_dir, version_path
from _system import (
    CommandTimedOut,
    MountEntry,
    find_tool,
    mount_at,
    read_mountinfo,
    refuse_symlinked_path,
    require_mfs_answers,
    run_command,
    write_atomically,
)
from _tree import open_dir, walk_tree
from _tree import remove_tree as remove_deep_tree
from mfs import is_moosefs, mfs_tool

ENGINE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "labvm_merge")
WORK_PREFIX = ".merge-"
UPPER_SNAPSHOT_PREFIX = ".upper-"
# labvm_merge moves what the lower copy loses into <upper copy> + this, a dir it makes beside it.
ENGINE_TRASH_SUFFIX = ".trash"
DEFAULT_JOBS = 8
SNAPSHOT_TIMEOUT_S = 600.0
# Without MooseFS the copies are real copies; with it only the merge itself takes time.
COPY_TIMEOUT_S = 3000.0
MERGE_TIMEOUT_S = 3000.0
DIRINFO_TIMEOUT_S = 300.0
VERSION_DIR = re.compile(VERSION_DIR_PATTERN)
VERSION_MAX = 2**31 - 1
# Why a version was published: labvm/retention.py holds the same words.
PUBLISH_REASONS = ("backup", "switch", "restore", "solidify", "rebase", "remove")
CREATE_REASON = "create"

# Crash tests stop the helper between its steps: LABVM_MERGE_HELPER_CRASH_AT=<step name>.
CRASH_AT_ENV = "LABVM_MERGE_HELPER_CRASH_AT"


# --- parameters ---------------------------------------------------------------------------

VERSION = integer_between(0, VERSION_MAX)
publish_reason = string_matching("|".join(PUBLISH_REASONS), "one of " + ", ".join(PUBLISH_REASONS))
snapshot_name = string_matching(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", "1-64 of A-Z a-z 0-9 _ . -, starting with a letter or digit")

USER_PARAMS = {"user": Param(user_name, required=True), "mfs_mount": Param(layer_path, required=True)}
PUBLISH_PARAMS = {
    **USER_PARAMS,
    "base": Param(VERSION, required=True),
    "reason": Param(publish_reason, required=True),
    "upper": Param(absolute_path),
    "target": Param(integer_between(1, VERSION_MAX)),
    "image": Param(image_ref),
    "jobs": Param(integer_between(1, 64), default=DEFAULT_JOBS),
}
SNAPSHOT_PARAMS = {**USER_PARAMS, "name": Param(snapshot_name, required=True)}
REMOVE_PARAMS = {**USER_PARAMS, "version": Param(VERSION, required=True)}
CHANGED_PARAMS = {**USER_PARAMS, "version": Param(VERSION, required=True), "data_dir": Param(layer_path),
                  "limit": Param(integer_between(1, 1_000_000), default=200_000)}


# --- where things are ---------------------------------------------------------------------


def crash_point(step: str) -> None:
    if os.environ.get(CRASH_AT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)


def mount_containing(entries: list[MountEntry], path: str) -> MountEntry | None:
    """The mount that holds path: the one at its longest mounted prefix."""
    candidates = [entry.mount_point for entry in entries if is_within(path, entry.mount_point)]
    return mount_at(entries, max(candidates, key=len)) if candidates else None


def is_within(path: str, directory: str) -> bool:
    return directory == "/" or path == directory or path.startswith(directory.rstrip("/") + "/")


def on_moosefs(path: str) -> bool:
    entry = mount_containing(read_mountinfo(), path)
    return entry is not None and is_moosefs(entry)


def user_directory(params: dict, must_exist: bool = True) -> str:
    """<mfs_mount>/vms/<user>, once something is mounted at mfs_mount and answers: unmounted,
    mfs_mount is a directory on the node's own disk, and a version published there would
    vanish under the next mount."""
    mfs_mount = params["mfs_mount"]
    if mount_at(read_mountinfo(), mfs_mount) is None:
        raise PreconditionFailed(
            f"MooseFS is not mounted at {mfs_mount}; run the mfs helper's ensure_mounted first", "mfs_not_mounted"
        )
    require_mfs_answers(mfs_mount)
    user_dir = mfs_user_dir(mfs_mount, params["user"])
    refuse_symlinked_path(user_dir)
    if must_exist and not os.path.isdir(user_dir):
        raise PreconditionFailed(f"{params['user']} has no files on MooseFS ({user_dir} is missing)", "user_dir_missing")
    return user_dir


def is_real_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except FileNotFoundError:
        return False


def read_metadata(user_dir: str, version: int) -> dict | None:
    try:
        with open(metadata_path(user_dir, version), encoding="utf-8") as stream:
            metadata = json.load(stream)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        log(f"ignoring unreadable {metadata_path(user_dir, version)}: {error}")
        return None
    return metadata if isinstance(metadata, dict) else None


def published_versions(user_dir: str) -> list[dict]:
    """Every low_mfs.v<N> directory, oldest first. One published by something else than a
    merge (version 0, made empty by the vm helper at create) has no metadata file: its
    directory's mtime stands in for its creation time."""
    versions = []
    for name in os.listdir(user_dir):
        match = VERSION_DIR.fullmatch(name)
        path = posixpath.join(user_dir, name)
        if match is None or not is_real_dir(path):
            continue
        number = int(match.group(1))
        metadata = read_metadata(user_dir, number)
        made_at_create = metadata is None and number == 0
        metadata = metadata or {}
        versions.append(
            {
                "version": number,
                "created": metadata.get("created", os.lstat(path).st_mtime),
                "files": metadata.get("files"),
                "bytes": metadata.get("bytes"),
                "base": metadata.get("base"),
                "reason": CREATE_REASON if made_at_create else metadata.get("reason"),
                "image": metadata.get("image"),
            }
        )
    return sorted(versions, key=lambda version: version["version"])


# --- copying and removing trees -----------------------------------------------------------


def copy_tree(source: str, destination: str, moosefs: bool) -> None:
    """A copy that keeps hard links, owners, modes, times, xattrs and holes. On MooseFS a
    snapshot: metadata only, about as fast for 20k files as for one."""
    if moosefs:
        # -p: without it a snapshot gives each name of a hard-linked file its own inode.
        argv = [mfs_tool("mfsmakesnapshot"), "-p", source, destination]
        timeout_s = SNAPSHOT_TIMEOUT_S
    else:
        argv = [find_tool("cp") or "cp", "-a", "--reflink=auto", "--", source, destination]
        timeout_s = COPY_TIMEOUT_S
    try:
        result = run_command(argv, timeout_s)
    except CommandTimedOut as error:
        raise Failed(f"copying {source} to {destination}: {error}", "copy_failed") from None
    if result.returncode != 0 or not is_real_dir(destination):
        raise Failed(f"copying {source} to {destination} failed: {result.output_tail() or 'no output'}", "copy_failed")


def remove_tree(path: str, moosefs: bool) -> None:
    """Delete a tree without following symlinks in it. On MooseFS, mfsrmsnapshot -f deletes
    in the master, in one call, what it can: a whole untouched snapshot, but it leaves (and
    still exits 0) what entries were renamed into or out of. remove_deep_tree deletes the
    rest, at any depth, taking what vanished meanwhile as deleted."""
    if not os.path.lexists(path):
        return
    if moosefs and is_real_dir(path):
        try:
            result = run_command([mfs_tool("mfsrmsnapshot"), "-f", path], SNAPSHOT_TIMEOUT_S)
            if result.returncode != 0:
                log(f"mfsrmsnapshot {path}: {result.output_tail()}; deleting file by file")
        except CommandTimedOut:
            log(f"mfsrmsnapshot {path} did not finish; deleting file by file")
    remove_deep_tree(path)


def remove_leftovers(user_dir: str, moosefs: bool) -> list[str]:
    """Work of publishes and removals that crashed: nothing else is named .merge-*."""
    removed = []
    for name in sorted(os.listdir(user_dir)):
        if name.startswith(WORK_PREFIX):
            log(f"removing {name}, left by an earlier publish that did not finish")
            remove_tree(posixpath.join(user_dir, name), moosefs)
            removed.append(name)
    return removed


# --- measuring a tree ---------------------------------------------------------------------


def tree_size(path: str, moosefs: bool) -> tuple[int, int]:
    """(regular files, their bytes). MooseFS keeps these counts in the master: mfsdirinfo
    answers in one call where a walk would stat every file over the network."""
    if moosefs:
        counted = mfsdirinfo_size(path)
        if counted is not None:
            return counted
    return walked_size(path)


def mfsdirinfo_size(path: str) -> tuple[int, int] | None:
    try:
        result = run_command([mfs_tool("mfsdirinfo"), "-n", path], DIRINFO_TIMEOUT_S)
    except CommandTimedOut:
        result = None
    values = parse_dirinfo(result.stdout) if result is not None and result.returncode == 0 else {}
    if "files" not in values or "length" not in values:
        log(f"mfsdirinfo gave no sizes for {path}; counting file by file")
        return None
    return values["files"], values["length"]


def parse_dirinfo(text: str) -> dict[str, int]:
    """`mfsdirinfo -n` prints 'PATH:' then ' key: number' lines (inodes, directories, files,
    chunks, length, size, realsize). The first line is skipped: the path may hold ': '."""
    values = {}
    for line in text.splitlines()[1:]:
        key, separator, value = line.strip().partition(":")
        if separator and value.strip().isdigit():
            values[key.strip()] = int(value.strip())
    return values


def walked_size(path: str) -> tuple[int, int]:
    files, total = 0, 0
    root_fd = open_dir(path)
    try:
        for _cursor, entry in walk_tree(root_fd):
            if entry.is_file(follow_symlinks=False):
                files += 1
                total += entry.stat(follow_symlinks=False).st_size
            elif entry.is_symlink():
                total += entry.stat(follow_symlinks=False).st_size
    finally:
        os.close(root_fd)
    return files, total


# --- publish ------------------------------------------------------------------------------


def publish(params: dict, check: bool) -> Result:
    user_dir = user_directory(params)
    base = params["base"]
    target = params["target"] if params["target"] is not None else base + 1
    if target <= base:
        raise BadRequest(f"param 'target' ({target}) must be newer than 'base' ({base})", "bad_param")
    upper = params["upper"] or posixpath.join(user_dir, UP_MFS)
    done = already_published(user_dir, base, target)
    if done is not None:
        if not check:
            # An earlier run published, then stopped before it had cleaned up.
            moosefs = on_moosefs(user_dir)
            remove_leftovers(user_dir, moosefs)
            remove_used_upper(user_dir, params["upper"], moosefs)
        return Result(changed=False, data={**done, "path": version_path(user_dir, target), "stats": None, "seconds": 0.0})
    base_dir = version_path(user_dir, base)
    require_sources(user_dir, base_dir, upper)
    image_tree = require_image(params["image"]) if params["image"] is not None else None
    planned = {"version": target, "base": base, "reason": params["reason"], "path": version_path(user_dir, target)}
    if check:
        return Result(changed=True, data=planned)
    started = time.monotonic()
    moosefs = on_moosefs(user_dir)
    remove_leftovers(user_dir, moosefs)
    metadata, stats = build_version(user_dir, base_dir, upper, target, base, moosefs, params, image_tree)
    os.rename(work_path(user_dir, target, "low"), version_path(user_dir, target))
    crash_point("published")
    remove_tree(work_path(user_dir, target, "up"), moosefs)
    remove_tree(work_path(user_dir, target, "up") + ENGINE_TRASH_SUFFIX, moosefs)
    remove_used_upper(user_dir, params["upper"], moosefs)
    seconds = round(time.monotonic() - started, 3)
    log(f"published {version_path(user_dir, target)} from v{base} in {seconds} s: {stats}")
    copied_with = "mfsmakesnapshot" if moosefs else "cp"
    data = {**metadata, "path": planned["path"], "stats": stats, "seconds": seconds, "copied_with": copied_with}
    return Result(changed=True, data=data)


def already_published(user_dir: str, base: int, target: int) -> dict | None:
    """The metadata of low_mfs.v<target> when an earlier run of this publish made it; None when
    it does not exist. Anything else at that name is not ours to replace."""
    path = version_path(user_dir, target)
    if not os.path.lexists(path):
        return None
    metadata = read_metadata(user_dir, target)
    if is_real_dir(path) and metadata is not None and metadata.get("version") == target and metadata.get("base") == base:
        return metadata
    origin = f"published from v{metadata.get('base')}" if metadata else "not published by a merge"
    raise PreconditionFailed(
        f"{path} already exists ({origin}); publish to another target version", "version_exists"
    )


def require_sources(user_dir: str, base_dir: str, upper: str) -> None:
    if not is_real_dir(base_dir):
        raise PreconditionFailed(f"base version {base_dir} does not exist", "version_missing")
    refuse_symlinked_path(upper)
    if not is_real_dir(upper):
        raise PreconditionFailed(f"upper layer {upper} does not exist or is not a directory", "upper_missing")
    if os.lstat(upper).st_dev != os.lstat(user_dir).st_dev:
        raise BadRequest(f"upper layer {upper} is not on the filesystem of {user_dir}", "bad_param")
    if not os.access(ENGINE, os.X_OK):
        raise PreconditionFailed(f"the merge engine {ENGINE} is missing from the helper bundle", "merge_engine_missing")


def work_path(user_dir: str, target: int, part: str) -> str:
    return posixpath.join(user_dir, f"{WORK_PREFIX}{target}.{part}")


def build_version(user_dir: str, base_dir: str, upper: str, target: int, base: int, moosefs: bool, params: dict,
                  image_tree: str | None):
    """.merge-<target>.low: the new version, complete with its metadata file, not yet published."""
    lower_copy, upper_copy = work_path(user_dir, target, "low"), work_path(user_dir, target, "up")
    copy_tree(base_dir, lower_copy, moosefs)
    crash_point("copied_lower")
    copy_tree(upper, upper_copy, moosefs)
    crash_point("copied_upper")
    stats = run_engine(upper_copy, lower_copy, params["jobs"], image_tree)
    crash_point("merged")
    files, size = tree_size(lower_copy, moosefs)
    created, reason = time.time(), params["reason"]
    metadata = {"version": target, "base": base, "created": created, "files": files, "bytes": size, "reason": reason}
    if params["image"] is not None:  # the image the version is a layer over
        metadata["image"] = params["image"]["id"]
    content = json.dumps(metadata, sort_keys=True).encode() + b"\n"
    temporary = posixpath.basename(work_path(user_dir, target, "json"))
    write_atomically(metadata_path(user_dir, target), content, 0o644, temporary=temporary)
    crash_point("described")
    return metadata, stats


def run_engine(upper_copy: str, lower_copy: str, jobs: int, image: str | None) -> dict:
    below = ["--below", image] if image is not None else []
    argv = [ENGINE, "apply", "--stats", "--jobs", str(jobs), *below, "--", upper_copy, lower_copy]
    try:
        result = run_command(argv, MERGE_TIMEOUT_S)
    except CommandTimedOut as error:
        raise Failed(f"merging {upper_copy} into {lower_copy}: {error}", "merge_failed") from None
    if result.returncode != 0:
        raise Failed(f"merging the upper layer failed: {result.output_tail() or 'no output'}", "merge_failed")
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise Failed(f"labvm_merge printed no statistics: {result.output_tail()}", "merge_failed") from None


def remove_used_upper(user_dir: str, upper: str | None, moosefs: bool) -> None:
    """A snapshot_upper copy exists for one publish: once that is done, nothing else reads it."""
    if upper is None or posixpath.dirname(upper) != user_dir:
        return
    if posixpath.basename(upper).startswith(UPPER_SNAPSHOT_PREFIX):
        remove_tree(upper, moosefs)


# --- snapshot_upper -----------------------------------------------------------------------


def snapshot_upper(params: dict, check: bool) -> Result:
    """Copy up_mfs as it is now. A snapshot left by an earlier try is replaced: what the caller
    wants is this instant (it froze the desktop for it)."""
    user_dir = user_directory(params)
    source = posixpath.join(user_dir, UP_MFS)
    refuse_symlinked_path(source)
    if not is_real_dir(source):
        raise PreconditionFailed(f"{source} does not exist", "upper_missing")
    destination = posixpath.join(user_dir, UPPER_SNAPSHOT_PREFIX + params["name"])
    if check:
        return Result(changed=True, data={"path": destination})
    moosefs = on_moosefs(user_dir)
    remove_tree(destination, moosefs)
    copy_tree(source, destination, moosefs)
    return Result(changed=True, data={"path": destination})


# --- versions and remove_version ----------------------------------------------------------


def list_versions(params: dict, check: bool) -> Result:
    user_dir = user_directory(params, must_exist=False)
    versions = published_versions(user_dir) if os.path.isdir(user_dir) else []
    return Result(changed=False, data={"versions": versions})


def changed_paths(params: dict, check: bool) -> Result:
    """The paths the member changed over the image: every entry but a directory in the version
    `version`, in up_mfs and, given the node's data_dir, in the desktop's up_local here (what
    the sync has not sent yet). Whiteouts too: a deletion is a change. Read only, without
    following any symlink; at most `limit` of them, sorted."""
    user_dir = user_directory(params, must_exist=False)
    found: set[str] = set()
    truncated = False
    trees = [version_path(user_dir, params["version"]), posixpath.join(user_dir, UP_MFS)]
    if params["data_dir"] is not None:
        trees.append(VmPaths.of(params["data_dir"], params["user"]).up_local)
    for tree in trees:
        try:
            root = open_dir(tree)
        except OSError:
            continue
        try:
            for cursor, entry in walk_tree(root):
                path = os.fsdecode(cursor.rel(entry.name))
                if path in found:  # changed in the version and again since: one path
                    continue
                if len(found) >= params["limit"]:
                    truncated = True
                    break
                found.add(path)
        finally:
            os.close(root)
        if truncated:
            break
    return Result(changed=False, data={"paths": sorted(found), "truncated": truncated})


def remove_version(params: dict, check: bool) -> Result:
    user_dir = user_directory(params, must_exist=False)
    version = params["version"]
    path, metadata = version_path(user_dir, version), metadata_path(user_dir, version)
    exists = os.path.lexists(path)
    data = {"version": version, "path": path, "removed": exists}
    if not exists:
        if os.path.lexists(metadata) and not check:
            os.unlink(metadata)
        return Result(changed=False, data=data)
    refuse_removing(user_dir, params["user"], version, path)
    if check:
        return Result(changed=True, data=data)
    moosefs = on_moosefs(user_dir)
    # One rename takes the version out of every listing at once; a crash while the tree is
    # being deleted then leaves a .merge-* leftover, never a half-deleted version.
    doomed = posixpath.join(user_dir, f"{WORK_PREFIX}removing.v{version}")
    remove_tree(doomed, moosefs)
    os.rename(path, doomed)
    if os.path.lexists(metadata):
        os.unlink(metadata)
    remove_tree(doomed, moosefs)
    return Result(changed=True, data=data)


def refuse_removing(user_dir: str, user: str, version: int, path: str) -> None:
    newest = max(entry["version"] for entry in published_versions(user_dir)) if is_real_dir(path) else None
    if newest == version:
        raise PreconditionFailed(f"v{version} is {user}'s newest version; it is never removed", "newest_version")
    suffix = "/" + posixpath.relpath(path, posixpath.dirname(posixpath.dirname(user_dir)))
    binds = [entry.mount_point for entry in read_mountinfo() if entry.root.endswith(suffix)]
    if binds:
        raise PreconditionFailed(
            f"v{version} of {user} is mounted on this node at {', '.join(binds[:3])}; stop the desktop first", "version_in_use"
        )


ACTIONS = {
    "publish": Action(run=publish, params=PUBLISH_PARAMS),
    "snapshot_upper": Action(run=snapshot_upper, params=SNAPSHOT_PARAMS),
    "versions": Action(run=list_versions, params=USER_PARAMS),
    "remove_version": Action(run=remove_version, params=REMOVE_PARAMS),
    "changed_paths": Action(run=changed_paths, params=CHANGED_PARAMS),
}
