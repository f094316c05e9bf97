#!/usr/bin/python3 -IS
"""labvm's OCI runtime: runc, except that a desktop's root filesystem is its overlay.

A desktop is a Docker container, and docker stays its runtime: the API, device requests (GPUs),
resource limits, published ports, logs and restarts all work as for any container. Only its root
filesystem must not be docker's image layer but the desktop's overlay mount
<data_dir>/vms/<user>/merge_local, which the vm helper mounts and whose upper layer labvm syncs.

So dockerd knows this script as one more runtime (daemon.json "runtimes", the same pattern as
nvidia-container-runtime), installed on the node by the runtime helper as an executable copy,
with its settings beside it in <this file>.json:

    {"runtime": "/usr/sbin/runc", "data_dirs": ["/var/lib/labvm/data"]}

containerd's runc shim calls it exactly as it would call runc:

    labvm-runc [global options] COMMAND [options] [args]

The desktop's container carries the path of its overlay in its own spec, as a bind mount whose
destination is the sentinel /.labvm-rootfs. For `create` and `run` (and `restore`, which also
makes a container from the bundle) this script reads the bundle's config.json; when it holds
that sentinel mount, the source is checked:

  - an absolute, normalised path <D>/vms/<user>/merge_local for one D of data_dirs, with <user>
    a labvm member name;
  - no component of it is a symlink;
  - the mount table shows an overlay exactly there whose upperdir is <D>/vms/<user>/disk/up_local
    (the upper on the desktop's own disk image);

then root.path becomes that source, root.readonly false, the sentinel mount is dropped, the
config is written back atomically and the real runtime runs with the arguments unchanged.

Everything else passes through untouched: any other command, and any container whose spec does
not carry the sentinel, goes straight to the real runtime with execv. A refusal never runs the
runtime: it exits 1 after writing a runc-style error line to the --log file (containerd reads the
last error there and docker shows it) and to stderr.

Standard library only, no imports from the rest of the helper bundle: this runs on its own, with
the node's python3, for every runtime call of every desktop.
"""

import json
import os
import re
import stat
import sys
import tempfile
import time

SENTINEL = "/.labvm-rootfs"
PREFIX = "labvm runtime"
# Where runc lives when our settings cannot be read: existing containers must still be
# stoppable and deletable then.
FALLBACK_RUNTIMES = ("/usr/sbin/runc", "/usr/bin/runc", "/usr/local/sbin/runc", "/usr/local/bin/runc")
# Commands that make a container from the bundle's config.json.
CREATING_COMMANDS = ("create", "run", "restore")
MOUNTINFO_PATH = "/proc/self/mountinfo"
# The same rule as labvm's member names (_contract.USER_PATTERN).
USER_PATTERN = re.compile(r"[a-z](?:[a-z0-9-]{0,29}[a-z0-9])?")

# runc's global options that take a value ("--root X" or "--root=X"; Go also accepts one dash).
GLOBAL_VALUE_OPTIONS = ("root", "log", "log-format", "criu", "rootless")
# Options of create / run / restore that take a value; the rest are flags.
BUNDLE_OPTIONS = ("bundle", "b")
COMMAND_VALUE_OPTIONS = (
    "console-socket", "pid-file", "preserve-fds", "image-path", "work-path", "parent-path",
    "manage-cgroups-mode", "empty-ns", "lsm-profile", "lsm-mount-context", "page-server", "status-fd",
)  # fmt: skip
MESSAGE_LIMIT = 160


class Refusal(Exception):
    """The container must not start; the message says why."""


# --- messages -----------------------------------------------------------------------------


def shown(text, limit=MESSAGE_LIMIT):
    """Text from a container spec as a message may carry it: control and other unprintable
    characters escaped, clipped to `limit` characters."""
    if not isinstance(text, str):
        text = repr(text)
    out = []
    for char in text:
        if char == "\\":
            out.append("\\\\")
        elif char.isprintable():
            out.append(char)
        elif ord(char) <= 0xFF:
            out.append("\\x%02x" % ord(char))
        elif ord(char) <= 0xFFFF:
            out.append("\\u%04x" % ord(char))
        else:
            out.append("\\U%08x" % ord(char))
    escaped = "".join(out)
    return escaped if len(escaped) <= limit else escaped[: limit - 3] + "..."


def rfc3339_now():
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime()) + time_zone_suffix()


def time_zone_suffix():
    offset = time.localtime().tm_gmtoff or 0
    if offset == 0:
        return "Z"
    sign = "+" if offset > 0 else "-"
    offset = abs(offset)
    return "%s%02d:%02d" % (sign, offset // 3600, offset % 3600 // 60)


def log_line(message, log_format):
    now = rfc3339_now()
    if log_format == "json":
        return json.dumps({"level": "error", "msg": message, "time": now}, separators=(",", ":")) + "\n"
    quoted = message.replace("\\", "\\\\").replace('"', '\\"')
    return 'time="%s" level=error msg="%s"\n' % (now, quoted)


def report_error(message, options):
    """Where runc would put its own error: the --log file (as runc, appended) and stderr."""
    log_path = options.get("log")
    if log_path:
        try:
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, log_line(message, options.get("log-format", "text")).encode("utf-8", "backslashreplace"))
            finally:
                os.close(fd)
        except OSError:
            pass
    try:
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
    except (OSError, ValueError):
        pass


# --- arguments ----------------------------------------------------------------------------


def option_name(arg):
    """("name", value or None) for -name, --name, -name=value, --name=value; None otherwise."""
    if not arg.startswith("-") or arg in ("-", "--"):
        return None
    name, separator, value = arg.lstrip("-").partition("=")
    return name, (value if separator else None)


def split_args(args):
    """(global options {name: value}, command or None, index of the first argument after it)."""
    options = {}
    index = 0
    while index < len(args):
        arg = args[index]
        if arg == "--":
            index += 1
            break
        parsed = option_name(arg)
        if parsed is None:
            return options, arg, index + 1
        name, value = parsed
        if name in GLOBAL_VALUE_OPTIONS:
            if value is None:
                index += 1
                value = args[index] if index < len(args) else ""
            options[name] = value
        index += 1
    if index < len(args):
        return options, args[index], index + 1
    return options, None, len(args)


def bundle_of(command_args):
    """The --bundle / -b of create, run or restore (the last one wins, as in runc); default:
    the current directory."""
    bundle = None
    index = 0
    while index < len(command_args):
        arg = command_args[index]
        if arg == "--":
            break
        parsed = option_name(arg)
        if parsed is not None:
            name, value = parsed
            if name in BUNDLE_OPTIONS or name in COMMAND_VALUE_OPTIONS:
                if value is None:
                    index += 1
                    value = command_args[index] if index < len(command_args) else ""
                if name in BUNDLE_OPTIONS:
                    bundle = value
        index += 1
    return os.path.abspath(bundle or ".")


# --- settings -----------------------------------------------------------------------------


def read_settings(path, own_path):
    """(runtime, data_dirs) from our settings file; raises Refusal saying what is wrong."""
    try:
        with open(path, encoding="utf-8") as stream:
            settings = json.load(stream)
    except FileNotFoundError:
        raise Refusal("settings file %s is missing (the runtime helper's ensure_runtime writes it)" % path) from None
    except (OSError, ValueError) as error:
        raise Refusal("cannot read settings file %s: %s" % (path, shown(str(error)))) from None
    if not isinstance(settings, dict):
        raise Refusal("settings file %s is not a JSON object" % path)
    runtime = settings.get("runtime")
    if not isinstance(runtime, str) or not runtime.startswith("/"):
        raise Refusal("settings file %s names no absolute runtime path" % path)
    if os.path.realpath(runtime) == os.path.realpath(own_path):
        raise Refusal("settings file %s names this runtime itself (%s) as the real one" % (path, runtime))
    data_dirs = settings.get("data_dirs")
    if not isinstance(data_dirs, list) or not all(isinstance(item, str) and item.startswith("/") for item in data_dirs):
        raise Refusal("settings file %s: data_dirs must be a list of absolute paths" % path)
    return runtime, [os.path.normpath(item) for item in data_dirs]


def fallback_runtime():
    for path in FALLBACK_RUNTIMES:
        if os.access(path, os.X_OK):
            return path
    return None


# --- the root the spec asks for -----------------------------------------------------------


def sentinel_mounts(spec):
    mounts = spec.get("mounts")
    if not isinstance(mounts, list):
        return []
    return [mount for mount in mounts if isinstance(mount, dict) and mount.get("destination") == SENTINEL]


def expected_form(data_dirs):
    if not data_dirs:
        return "a desktop overlay (no data dir is configured for this runtime)"
    return "not a desktop overlay under " + " or ".join("%s/vms/<user>/merge_local" % d.rstrip("/") for d in data_dirs)


def desktop_of(source, data_dirs):
    """(data_dir, user) when source names <data_dir>/vms/<user>/merge_local; raises Refusal."""
    if not isinstance(source, str) or not source:
        raise Refusal("refusing root %s: the %s mount has no source path" % (shown(source), SENTINEL))
    refused = "refusing root %s" % shown(source)
    if any(not char.isprintable() for char in source):
        raise Refusal("%s: the path holds control characters" % refused)
    if not source.startswith("/"):
        raise Refusal("%s: not an absolute path" % refused)
    parts = source.split("/")[1:]
    if any(part in ("", ".", "..") for part in parts):
        raise Refusal("%s: not a normalised path (empty, . or .. components)" % refused)
    for data_dir in data_dirs:
        prefix = data_dir.rstrip("/") + "/vms/"
        suffix = "/merge_local"
        if source.startswith(prefix) and source.endswith(suffix) and len(source) > len(prefix) + len(suffix):
            user = source[len(prefix) : -len(suffix)]
            if "/" in user:
                continue
            if not USER_PATTERN.fullmatch(user):
                raise Refusal("%s: %s is not a labvm member name" % (refused, shown(user, 40)))
            return data_dir, user
    raise Refusal("%s: %s" % (refused, expected_form(data_dirs)))


def refuse_symlinks(path):
    walked = ""
    for part in path.split("/")[1:]:
        walked += "/" + part
        try:
            info = os.lstat(walked)
        except FileNotFoundError:
            raise Refusal("refusing root %s: %s does not exist" % (shown(path), shown(walked))) from None
        except OSError as error:
            raise Refusal("refusing root %s: cannot inspect %s: %s" % (shown(path), shown(walked), error.strerror)) from None
        if stat.S_ISLNK(info.st_mode):
            raise Refusal("refusing root %s: %s is a symlink" % (shown(path), shown(walked)))
        if not stat.S_ISDIR(info.st_mode):
            raise Refusal("refusing root %s: %s is not a directory" % (shown(path), shown(walked)))


OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field):
    """mountinfo writes space, tab, newline and backslash (and ',' in options) as \\ooo."""
    return OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def mounts_at(path, mountinfo_text):
    """[(mount id, parent id, fstype, {super option: value})] of the mounts exactly at path."""
    found = []
    for line in mountinfo_text.splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
            mount_id, parent_id = int(fields[0]), int(fields[1])
        except (ValueError, IndexError):
            continue
        if len(fields) < separator + 3 or unescape(fields[4]) != path:
            continue
        options = {}
        if len(fields) > separator + 3:
            for option in fields[separator + 3].split(","):
                key, _, value = option.partition("=")
                options[unescape(key)] = unescape(value)
        found.append((mount_id, parent_id, fields[separator + 1], options))
    return found


def visible_mount(mounts):
    """Of stacked mounts at one path, the one on top: no other mount there sits on it."""
    covered = {parent_id for _, parent_id, _, _ in mounts}
    on_top = [mount for mount in mounts if mount[0] not in covered]
    return (on_top or mounts or [None])[-1]


def refuse_unless_desktop_overlay(path, up_local):
    try:
        with open(MOUNTINFO_PATH, encoding="utf-8", errors="surrogateescape") as stream:
            text = stream.read()
    except OSError as error:
        raise Refusal("cannot read %s: %s" % (MOUNTINFO_PATH, error.strerror)) from None
    mount = visible_mount(mounts_at(path, text))
    refused = "refusing root %s" % shown(path)
    if mount is None:
        raise Refusal("%s: nothing is mounted there; the desktop's overlay must be mounted first" % refused)
    _, _, fstype, options = mount
    if fstype != "overlay":
        raise Refusal("%s: it is a %s mount, not the desktop's overlay" % (refused, shown(fstype, 40)))
    upper = options.get("upperdir")
    if upper is None or os.path.normpath(upper) != up_local:
        raise Refusal("%s: its overlay's upperdir is %s, not %s" % (refused, shown(upper), up_local))


def desktop_root(spec, data_dirs):
    """The checked overlay path the sentinel names, or None when the spec has no sentinel."""
    sentinels = sentinel_mounts(spec)
    if not sentinels:
        return None
    if len(sentinels) > 1:
        raise Refusal("refusing a container spec with %d %s mounts: it must name one root" % (len(sentinels), SENTINEL))
    source = sentinels[0].get("source")
    data_dir, user = desktop_of(source, data_dirs)
    refuse_symlinks(source)
    refuse_unless_desktop_overlay(source, "%s/vms/%s/disk/up_local" % (data_dir.rstrip("/"), user))
    return source


def rewritten(spec, root_path):
    spec = dict(spec)
    root = spec.get("root")
    root = dict(root) if isinstance(root, dict) else {}
    root["path"] = root_path
    root["readonly"] = False
    spec["root"] = root
    spec["mounts"] = [mount for mount in spec["mounts"] if not (isinstance(mount, dict) and mount.get("destination") == SENTINEL)]
    return spec


def write_atomically(path, data, like):
    """Replace path with data: a temporary file beside it, fsynced, then renamed over it, with
    the mode and owner of `like` (the file's stat before)."""
    directory = os.path.dirname(path)
    fd, temporary = tempfile.mkstemp(prefix=".config.json.", dir=directory)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fchmod(stream.fileno(), stat.S_IMODE(like.st_mode))
            if os.geteuid() == 0:
                os.fchown(stream.fileno(), like.st_uid, like.st_gid)
            os.fsync(stream.fileno())
        os.rename(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def prepare_bundle(bundle, data_dirs_or_refusal):
    """Rewrite the bundle's config.json when it carries the sentinel. `data_dirs_or_refusal` is
    the configured data dirs, or the Refusal our settings gave: a container that asks for a
    desktop root is refused then, any other passes."""
    config_path = os.path.join(bundle, "config.json")
    try:
        with open(config_path, "rb") as stream:
            like = os.fstat(stream.fileno())
            spec = json.loads(stream.read().decode("utf-8"))
    except (OSError, ValueError) as error:
        if not isinstance(error, OSError):
            raise Refusal("cannot parse %s: %s" % (shown(config_path), shown(str(error)))) from None
        raise Refusal("cannot read %s: %s" % (shown(config_path), error.strerror)) from None
    if not isinstance(spec, dict):
        raise Refusal("%s is not a JSON object" % shown(config_path))
    if not sentinel_mounts(spec):
        return
    if isinstance(data_dirs_or_refusal, Refusal):
        raise Refusal("cannot give the container its desktop root: %s" % data_dirs_or_refusal)
    root_path = desktop_root(spec, data_dirs_or_refusal)
    data = json.dumps(rewritten(spec, root_path)).encode("utf-8")
    try:
        write_atomically(config_path, data, like)
    except OSError as error:
        raise Refusal("cannot write %s: %s" % (shown(config_path), error.strerror)) from None


# --- entry --------------------------------------------------------------------------------


def main(args):
    own_path = os.path.abspath(sys.argv[0] if sys.argv and sys.argv[0] else __file__)
    options, command, after = split_args(args)
    try:
        runtime, data_dirs = read_settings(own_path + ".json", own_path)
        settings = data_dirs
    except Refusal as refusal:
        runtime, settings = fallback_runtime(), refusal
    try:
        if command in CREATING_COMMANDS:
            prepare_bundle(bundle_of(args[after:]), settings)
        if runtime is None:
            raise Refusal("cannot pass %s on to runc: %s, and runc is in none of %s"
                          % (command or "the call", settings, ", ".join(FALLBACK_RUNTIMES)))  # fmt: skip
        try:
            os.execv(runtime, [runtime] + list(args))
        except OSError as error:
            raise Refusal("cannot run %s: %s" % (runtime, error.strerror)) from None
    except Refusal as refusal:
        report_error("%s: %s" % (PREFIX, refusal), options)
        return 1
    except Exception as error:  # noqa: BLE001 - the caller must see why, in runc's log
        report_error("%s: internal error: %s: %s" % (PREFIX, type(error).__name__, shown(str(error))), options)
        return 1
    return 1  # not reached: execv does not return


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
