"""The desktop's container: made from a spec that labvm built (_spec.py), its root the
desktop's overlay (merge_local, through the labvm OCI runtime, runtime.py), the runtime dir
(_runtime_dir.py) bound at /run/labvm.

A container carries the hash of its spec as a label: one made from another spec, or in an
older form, is replaced while stopped and refused while it runs or is paused. Here are the vm helper's
actions ensure_container, set_password, stop_container, remove_container, freeze and thaw,
and what status and the stack ask of dockerd.
"""

import hashlib
import json
import os
import re
import socket
import time
from typing import Any

from _contract import BadRequest, Failed, PreconditionFailed, Result, TemporaryFailure, log
from _disk import refuse_symlinks
from _docker import (
    api_url,
    container_logs_tail,
    docker_call,
    docker_json_call,
    docker_message,
    exec_in_container,
    inspect_container,
    quoted,
    unexpected,
)
from _images import read_marker
from _images import resolve as resolve_image
from _layout import VMS_DIR, VmPaths
from _owner import claim_or_refuse
from _runtime_dir import (
    APPLY_PASSWORD_PATH,
    INIT_PATH,
    RUNTIME_IN_CONTAINER,
    TINI_PATH,
    ensure_runtime_files,
    remove_secret,
    web_password_line,
    write_secret,
)
from _spec import CONTAINER_PREFIX, LABEL_SPEC_HASH, LABEL_USER
from _system import mount_at, read_mountinfo
from _web import WEB_CONTAINER_PORT, WebStarting, ensure_web, ensure_web_dir, find_stunnel, start_web, stop_web, tls_answers
from net import NETWORK_NAME as DESKTOP_NETWORK
from runtime import RUNTIME_NAME
from runtime import SENTINEL as ROOTFS_SENTINEL

VNC_CONTAINER_PORT = "5901/tcp"
SSH_CONTAINER_PORT = "22/tcp"
LOOPBACK = "127.0.0.1"
# 2: the root is the overlay, through the labvm runtime (1 bound merge_local's top-level dirs).
CONTAINER_FORM = 2
LOG_MAX_SIZE, LOG_MAX_FILES = "10m", "3"
VNC_WAIT_DEFAULT_S = 30
VNC_PROBE_TIMEOUT_S = 2.0
# A refused connection costs nothing; a start waits at most this long past the greeting.
VNC_POLL_S = 0.02
RFB_GREETING = b"RFB "
EXEC_TIMEOUT_S = 60.0


# --- the container and its state ----------------------------------------------------------


def container_name(user: str) -> str:
    return CONTAINER_PREFIX + user


def canonical_json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def spec_hash(spec: dict) -> str:
    """sha256 of the container's form and the validated spec (all keys present) as canonical
    JSON: sorted keys, no spaces, ASCII. A container made in an older form (its root from
    docker's layer, top-level directories bound in) never matches."""
    return hashlib.sha256(canonical_json({"form": CONTAINER_FORM, "spec": spec})).hexdigest()


# Of docker's default set, what a member's root needs least and could abuse most: raw packets
# (ARP spoofing a neighbour's session on the bridge), device nodes (raw disks through MooseFS
# on another node), file capabilities that outlive the desktop on MooseFS, and writing into
# the node's audit log. ping still works through ICMP datagram sockets, which docker allows.
DROPPED_CAPABILITIES = ("NET_RAW", "MKNOD", "SETFCAP", "AUDIT_WRITE")


def container_create_body(user: str, spec: dict, merge_local: str, runtime_dir: str) -> dict:
    """The body of POST /containers/create for this spec; pure, so tests can check it whole."""
    ports = spec["ports"]
    port_bindings = {}
    if spec["vnc_listen"] != "off":
        port_bindings[VNC_CONTAINER_PORT] = [{"HostIp": vnc_host(spec), "HostPort": str(ports["vnc"])}]
    if ports["ssh"] is not None:
        port_bindings[SSH_CONTAINER_PORT] = [{"HostIp": spec["bind_address"], "HostPort": str(ports["ssh"])}]
    # The HTTPS port is not docker's to publish: stunnel on the node serves it (_web.py).
    host_config = {
        # tini as PID 1 comes from the entrypoint (see TINI_PATH); false also overrides a
        # dockerd configured with `"init": true`, whose /sbin/docker-init would be hidden.
        "Init": False,
        # The container's root is the desktop's overlay: the labvm runtime (runtime.py) takes
        # it from this mount and drops the mount itself. docker's own layer is not used.
        "Runtime": RUNTIME_NAME,
        "Binds": [f"{merge_local}:{ROOTFS_SENTINEL}:ro", f"{runtime_dir}:{RUNTIME_IN_CONTAINER}:ro"],
        # /run holds this start's sockets and pid files, as on any Linux system: never persisted.
        "Tmpfs": {"/run": "rw,nosuid,nodev,mode=755"},
        # dockerd keeps what the desktop prints; capped, so a chatty desktop cannot fill the node.
        "LogConfig": {"Type": "json-file", "Config": {"max-size": LOG_MAX_SIZE, "max-file": LOG_MAX_FILES}},
        "Memory": spec["memory"],
        "MemorySwap": spec["memory"],  # the limit counts memory + swap: equal means no swap
        "PortBindings": port_bindings,
        # No restart by dockerd: after a node reboot the stack is not mounted yet, and a
        # restarted container would bind empty directories over its root. `labvm start`
        # mounts the layers first.
        "RestartPolicy": {"Name": "no", "MaximumRetryCount": 0},
        # The desktops' own network, which net.ensure_isolation walls off from MooseFS, the
        # nodes and each other.
        "NetworkMode": DESKTOP_NETWORK,
        "CapDrop": list(DROPPED_CAPABILITIES),
    }
    optional = {
        "NanoCpus": None if spec["cpus"] is None else round(spec["cpus"] * 1e9),
        "CpusetCpus": spec["cpuset"],
        "ShmSize": spec["shm"],
        "PidsLimit": spec["pids"],
        "BlkioWeight": spec["io_weight"],
        "BlkioDeviceReadBps": device_rate(spec, "io_read_bps"),
        "BlkioDeviceWriteBps": device_rate(spec, "io_write_bps"),
        "DeviceRequests": [{"Driver": "nvidia", "DeviceIDs": spec["gpus"], "Capabilities": [["gpu"]]}] if spec["gpus"] else None,
    }
    host_config.update({key: value for key, value in optional.items() if value is not None})
    return {
        "Image": spec["image"],
        "Hostname": spec["hostname"],
        "User": "0:0",
        # tini reaps the desktop's orphans and forwards docker stop's SIGTERM to init.
        "Entrypoint": [TINI_PATH, "--", INIT_PATH],
        "WorkingDir": "/",
        "Env": [f"{key}={value}" for key, value in sorted(container_env(user, spec).items())],
        "Labels": {**spec["labels"], LABEL_USER: user, LABEL_SPEC_HASH: spec_hash(spec)},
        "ExposedPorts": {port: {} for port in port_bindings},
        "StopSignal": "SIGTERM",
        "HostConfig": host_config,
    }


def vnc_host(spec: dict) -> str:
    """Where the raw VNC port is published on the node (not at all with vnc_listen off)."""
    return LOOPBACK if spec["vnc_listen"] == "loopback" else spec["bind_address"]


def device_rate(spec: dict, key: str) -> list[dict] | None:
    return None if spec[key] is None else [{"Path": spec["io_device"], "Rate": spec[key]}]


def container_env(user: str, spec: dict) -> dict:
    env = {"NVIDIA_DRIVER_CAPABILITIES": "all", **spec["env"]}
    if not spec["gpus"]:
        # Should nvidia be the default runtime, an unset variable could mean "all GPUs".
        env["NVIDIA_VISIBLE_DEVICES"] = "void"
    env.update(
        {
            "LABVM_USER": user,
            "LABVM_UID": str(spec["uid"]),
            "LABVM_VNC_GEOMETRY": spec["vnc_geometry"],
            "LABVM_DESKTOP_CMD": spec["desktop_cmd"],
            "LABVM_SSH": "1" if spec["ports"]["ssh"] is not None else "0",
            "LABVM_HTTPS": "1" if spec["ports"]["https"] is not None else "0",
            "LABVM_VNC_LISTEN": spec["vnc_listen"],
        }
    )
    return env


def container_state(container: dict) -> dict:
    state = container.get("State") or {}
    labels = (container.get("Config") or {}).get("Labels") or {}
    running = bool(state.get("Running")) and not state.get("Restarting")
    return {
        "exists": True,
        "id": container.get("Id"),
        "running": running,
        "status": state.get("Status"),
        "started_at": state.get("StartedAt") if running else None,
        "spec_hash": labels.get(LABEL_SPEC_HASH),
        "user_label": labels.get(LABEL_USER),
    }


NO_CONTAINER = {"exists": False, "id": None, "running": False, "status": None, "started_at": None, "spec_hash": None}


def inspect_ours(socket_path: str, user: str) -> dict | None:
    container = inspect_container(socket_path, container_name(user))
    if container is None:
        return None
    state = container_state(container)
    if state["user_label"] != user:
        raise PreconditionFailed(
            f"a container named {container_name(user)} exists but is not labvm's desktop of {user} "
            f"(label {LABEL_USER}={state['user_label']!r}); rename or remove it",
            "container_not_ours",
        )
    return state


def public_state(state: dict) -> dict:
    return {key: state[key] for key in NO_CONTAINER}


def container_status(socket_path: str, user: str) -> dict:
    """Like inspect_ours, but a status never fails for dockerd's sake: the error is reported."""
    try:
        state = inspect_ours(socket_path, user)
    except (Failed, PreconditionFailed, TemporaryFailure) as error:
        return {**NO_CONTAINER, "exists": None, "error": error.msg}
    return {**(public_state(state) if state else NO_CONTAINER), "error": None}


def refuse_running_container(socket_path: str, user: str) -> None:
    if not os.path.exists(socket_path):
        return  # no dockerd here, so no container either
    container = inspect_container(socket_path, container_name(user))
    if container is not None and container_state(container)["running"]:
        raise PreconditionFailed(
            f"container {container_name(user)} is running on this stack; stop it first (stop_container)", "container_running"
        )


# --- the stack it runs on -----------------------------------------------------------------


def mounted_stack_paths(data_dir: str | None, user: str) -> VmPaths:
    """The VM's paths under data_dir; without it, under the one data dir where the user's
    merge_local is mounted as an overlay."""
    if data_dir is not None:
        return VmPaths.of(data_dir, user)
    pattern = re.compile(rf"(/.+)/{VMS_DIR}/{re.escape(user)}/merge_local")
    found = sorted(
        {
            match.group(1)
            for entry in read_mountinfo()
            if entry.fstype == "overlay" and (match := pattern.fullmatch(entry.mount_point))
        }
    )
    if not found:
        raise PreconditionFailed(f"no stack of {user} is mounted on this node; run ensure_stack first", "stack_not_mounted")
    if len(found) > 1:
        raise PreconditionFailed(f"stacks of {user} are mounted under {', '.join(found)}; pass data_dir", "stack_ambiguous")
    return VmPaths.of(found[0], user)


def require_stack_mounted(paths: VmPaths) -> None:
    entry = mount_at(read_mountinfo(), paths.merge_local)
    if entry is None or entry.fstype != "overlay":
        raise PreconditionFailed(f"{paths.merge_local} is not mounted; run ensure_stack first", "stack_not_mounted")


# --- ensure_container ---------------------------------------------------------------------


def ensure_container(params: dict, check: bool) -> Result:
    user, spec, socket_path = params["user"], params["spec"], params["docker_socket"]
    if params["image_sessions"] is not None:
        chosen = params["image_sessions"]["by_desktop"].get(image_desktop(params["image_sessions"]["image"]) or "")
        spec = {**spec, "desktop_cmd": chosen or spec["desktop_cmd"]}
    if spec["name"] != container_name(user):
        raise BadRequest(f"param 'spec': 'name' must be {container_name(user)!r} for user {user!r}", "bad_param")
    if spec["labels"].get(LABEL_USER, user) != user:
        raise BadRequest(f"param 'spec': label {LABEL_USER!r} must be {user!r} if given", "bad_param")
    paths = mounted_stack_paths(params["data_dir"], user)
    refuse_symlinks(paths)
    require_stack_mounted(paths)
    if params["node"] is not None and params["mfs_mount"] is not None:
        claim_or_refuse(params["mfs_mount"], user, params["node"], check=True)
    wanted_hash = spec_hash(spec)
    state = inspect_ours(socket_path, user)
    if state is not None and state["spec_hash"] != wanted_hash and not state["running"] and state["status"] != "paused":
        # A stopped container holds nothing of the desktop's (its root is the overlay): one made
        # from another spec, or in an older form, is replaced.
        if check:
            return Result(changed=True, data={"name": spec["name"], "spec_hash": wanted_hash, "created": True,
                                              "started": False, "container": public_state(state), "replaces": state["spec_hash"]})
        log(f"replacing the stopped container {spec['name']}: it was made from another spec or in an older form")
        remove_container({"user": user, "docker_socket": socket_path, "timeout": 10}, False)
        state = None
    if state is not None and state["spec_hash"] != wanted_hash:
        raise PreconditionFailed(
            f"container {spec['name']} was created from another spec (hash {str(state['spec_hash'])[:12]}, "
            f"wanted {wanted_hash[:12]}); remove it (remove_container) to recreate it",
            "container_differs",
        )
    data = {"name": spec["name"], "spec_hash": wanted_hash, "created": state is None, "started": False}
    if state is not None and state["running"] and state["status"] == "paused" and not check:
        # A backup froze it and was killed before it could thaw it: starting it thaws it.
        pause_or_unpause({"user": user, "docker_socket": socket_path}, False, pause=False)
        state = inspect_ours(socket_path, user)
    secrets = params["secrets"]
    if state is not None and state["running"]:
        vnc = {**vnc_endpoint(spec), "ready": vnc_answers(spec) if spec["vnc_listen"] != "off" else None}
        if check:
            https = https_endpoint(spec, https_answers(spec) if spec["ports"]["https"] is not None else None)
            return Result(changed=False, data={**data, "container": public_state(state), "vnc": vnc, "https": https})
        changed = ensure_runtime_files(paths.runtime)
        # A renewed certificate, or a stunnel gone meanwhile, is taken care of here.
        changed = ensure_https(paths, user, spec, secrets, socket_path) or changed
        https = https_endpoint(spec, https_answers(spec) if spec["ports"]["https"] is not None else None)
        return Result(changed=changed, data={**data, "container": public_state(state), "vnc": vnc, "https": https})
    if spec["ports"]["https"] is not None and secrets["tls_key"] is not None:
        find_stunnel()  # a node without it fails here, before anything starts
    if check:
        return Result(changed=True, data={**data, "container": public_state(state) if state else dict(NO_CONTAINER)})
    ensure_runtime_files(paths.runtime)
    write_secret(paths.runtime, secrets["password"], web_line(paths, user, spec["ports"]["https"] is not None, secrets["password"]))
    try:
        if state is None:
            create_container(
                socket_path,
                container_create_body(user, spec, paths.merge_local, paths.runtime),
            )
        start_container(socket_path, spec["name"])
        # stunnel comes up while the desktop does; it is waited for last.
        starting = start_https(paths, user, spec, secrets, socket_path)
        wait_for_vnc(socket_path, spec, params["vnc_wait_s"])
        if starting is not None:
            starting.wait()
        https_up = True if starting is not None else None
    finally:
        remove_secret(paths.runtime)
    state = inspect_ours(socket_path, user) or dict(NO_CONTAINER)
    vnc = {**vnc_endpoint(spec), "ready": spec["vnc_listen"] != "off" or None}
    https = https_endpoint(spec, https_up if spec["ports"]["https"] is not None else None)
    return Result(changed=True, data={**data, "started": True, "container": public_state(state), "vnc": vnc, "https": https})


def web_line(paths: VmPaths, user: str, https: bool, password: str) -> str | None:
    """The HTTPS password's hash line the init copies (None without HTTPS): hashed on the node
    once for each new password, not in the container at every start."""
    if not https:
        return None
    return web_password_line(ensure_web_dir(paths.vm_dir), user, password)


def web_target(socket_path: str, name: str) -> str:
    """The running container's address, where stunnel sends the browser's requests."""
    address = container_address(inspect_container(socket_path, name))
    if address is None:
        raise Failed(f"container {name} has no address on the {DESKTOP_NETWORK} network", "https_not_listening")
    return address


def container_address(container: dict | None) -> str | None:
    """The container's address on the desktops' network, where the node reaches websockify."""
    networks = ((container or {}).get("NetworkSettings") or {}).get("Networks") or {}
    address = (networks.get(DESKTOP_NETWORK) or {}).get("IPAddress")
    return address if isinstance(address, str) and address else None


def ensure_https(paths: VmPaths, user: str, spec: dict, secrets: dict, socket_path: str) -> bool:
    """stunnel in front of the container's websockify, with the key and certificate labvm sent;
    True if it was (re)started. Nothing without an HTTPS port or a certificate."""
    starting = start_https(paths, user, spec, secrets, socket_path)
    if starting is None:
        return False
    starting.wait()
    return True


def start_https(paths: VmPaths, user: str, spec: dict, secrets: dict, socket_path: str) -> WebStarting | None:
    """ensure_https, not waiting for stunnel to answer: None if it was not (re)started."""
    if spec["ports"]["https"] is None or secrets["tls_key"] is None:
        return None
    address = web_target(socket_path, spec["name"])
    return start_web(paths.vm_dir, user, spec["bind_address"], spec["ports"]["https"], address,
                     secrets["tls_key"], secrets["tls_cert"], probe_address(spec["bind_address"]))


def vnc_endpoint(spec: dict) -> dict:
    if spec["vnc_listen"] == "off":
        return {"address": None, "port": None}
    return {"address": vnc_host(spec), "port": spec["ports"]["vnc"]}


def https_endpoint(spec: dict, ready: bool | None) -> dict:
    port = spec["ports"]["https"]
    return {"address": spec["bind_address"] if port else None, "port": port, "ready": ready}


def image_desktop(ref: dict) -> str | None:
    """The desktop kind the image's marker names, or None (no image, or an unreadable marker)."""
    tree = resolve_image(ref)
    kind = (read_marker(tree) or {}).get("desktop") if tree is not None else None
    return kind if isinstance(kind, str) else None


def create_container(socket_path: str, body: dict) -> str:
    name = body["Labels"][LABEL_USER]
    status, answer = docker_json_call(socket_path, "POST", api_url("/containers/create", {"name": container_name(name)}), body)
    if status == 404:
        raise PreconditionFailed(
            f"image {body['Image']} is not on this node: {docker_message(answer)}; run labvm image push", "image_missing"
        )
    if status == 409:
        raise TemporaryFailure(
            f"container {container_name(name)} appeared meanwhile: {docker_message(answer)}", "container_conflict"
        )
    if status != 201 or not isinstance(answer, dict):
        raise unexpected(f"creating container {container_name(name)}", status, answer, "container_create_failed")
    for warning in answer.get("Warnings") or []:
        log(f"dockerd: {warning}")
    return str(answer.get("Id"))


def start_container(socket_path: str, name: str) -> bool:
    """True if it was started, False if it was already running."""
    status, answer = docker_json_call(socket_path, "POST", api_url(f"/containers/{quoted(name)}/start"))
    if status == 304:
        return False
    if status != 204:
        raise unexpected(f"starting container {name}", status, answer, "container_start_failed")
    return True


def probe_address(host: str) -> str:
    # Published on every address (a node known by name): the node reaches it on its loopback.
    return LOOPBACK if host == "0.0.0.0" else host


def https_answers(spec: dict) -> bool:
    """stunnel does a TLS handshake on the desktop's HTTPS port."""
    return tls_answers(probe_address(spec["bind_address"]), spec["ports"]["https"])


def web_answers(address: str | None, timeout_s: float = VNC_PROBE_TIMEOUT_S) -> bool:
    """websockify in the container answers HTTP (a 401 will do: nothing is sent to pass)."""
    if address is None:
        return False
    try:
        with socket.create_connection((address, WEB_CONTAINER_PORT), timeout=timeout_s) as connection:
            connection.settimeout(timeout_s)
            connection.sendall(b"HEAD / HTTP/1.0\r\n\r\n")
            return connection.recv(5) == b"HTTP/"
    except OSError:
        return False


def desktop_answers(spec: dict, container: dict | None) -> bool:
    """The VNC server greets (unless raw VNC is off) and, with HTTPS, websockify answers."""
    if spec["vnc_listen"] != "off" and not vnc_answers(spec):
        return False
    return spec["ports"]["https"] is None or web_answers(container_address(container))


def vnc_answers(spec: dict, timeout_s: float = VNC_PROBE_TIMEOUT_S) -> bool:
    """A connection that gets an RFB greeting. A bare TCP connect is not enough: docker-proxy
    accepts connections on the published port before anything listens in the container."""
    try:
        address = (probe_address(vnc_host(spec)), spec["ports"]["vnc"])
        with socket.create_connection(address, timeout=timeout_s) as connection:
            connection.settimeout(timeout_s)
            greeting = b""
            while len(greeting) < len(RFB_GREETING):
                chunk = connection.recv(12)
                if not chunk:
                    break
                greeting += chunk
            return greeting.startswith(RFB_GREETING)
    except OSError:
        return False


def wait_for_vnc(socket_path: str, spec: dict, wait_s: int) -> None:
    """Init applies the password before it starts the VNC server and websockify, so a greeting
    (or with raw VNC off, websockify's HTTP answer) means the secret has been read. A container that
    stops meanwhile fails at once, with its log."""
    deadline = time.monotonic() + wait_s
    while True:
        container = inspect_container(socket_path, spec["name"]) if spec["ports"]["https"] is not None else None
        if desktop_answers(spec, container):
            return
        if container is None:
            container = inspect_container(socket_path, spec["name"])
        if container is None or not container_state(container)["running"]:
            logs = container_logs_tail(socket_path, spec["name"])
            raise Failed(
                f"container {spec['name']} stopped while starting its desktop; its log: {logs or '(empty)'}", "container_exited"
            )
        if time.monotonic() >= deadline:
            logs = container_logs_tail(socket_path, spec["name"])
            raise Failed(
                f"the desktop (VNC port {spec['ports']['vnc']}, HTTPS port {spec['ports']['https']}) on "
                f"{spec['bind_address']} did not answer within {wait_s} s; "
                f"container log: {logs or '(empty)'}",
                "vnc_not_listening",
            )
        time.sleep(VNC_POLL_S)


# --- renew_https --------------------------------------------------------------------------


def renew_https(params: dict, check: bool) -> Result:
    """A running desktop's stunnel with a new key and certificate (`labvm ca renew`); the
    container itself is not looked at beyond its address, so a desktop whose spec changed
    since its start (a new <vnc><listen>, say) is renewed all the same."""
    user, socket_path = params["user"], params["docker_socket"]
    state = inspect_ours(socket_path, user)
    if state is None or not state["running"]:
        raise PreconditionFailed(
            f"container {container_name(user)} is not running; its next start takes the new certificate",
            "container_not_running",
        )
    paths = mounted_stack_paths(params["data_dir"], user)
    refuse_symlinks(paths)
    find_stunnel()
    address = web_target(socket_path, container_name(user))
    host, port = params["bind_address"], params["https_port"]
    if check:
        return Result(changed=True, data={"https": {"address": host, "port": port, "ready": None}})
    tls = params["tls"]
    changed = ensure_web(paths.vm_dir, user, host, port, address, tls["tls_key"], tls["tls_cert"], probe_address(host))
    return Result(changed=changed, data={"https": {"address": host, "port": port, "ready": True}})


# --- set_password -------------------------------------------------------------------------


def set_password(params: dict, check: bool) -> Result:
    user, socket_path = params["user"], params["docker_socket"]
    state = inspect_ours(socket_path, user)
    if state is None or not state["running"]:
        raise PreconditionFailed(
            f"container {container_name(user)} is not running; start the desktop first", "container_not_running"
        )
    paths = mounted_stack_paths(params["data_dir"], user)
    refuse_symlinks(paths)
    data = {"name": container_name(user)}
    if check:
        return Result(changed=True, data=data)  # a password cannot be compared without applying it
    ensure_runtime_files(paths.runtime)
    container = inspect_container(socket_path, container_name(user)) or {}
    https = "LABVM_HTTPS=1" in ((container.get("Config") or {}).get("Env") or [])
    write_secret(paths.runtime, params["secrets"]["password"], web_line(paths, user, https, params["secrets"]["password"]))
    try:
        exit_code, output = exec_in_container(socket_path, container_name(user), [APPLY_PASSWORD_PATH], EXEC_TIMEOUT_S)
    finally:
        remove_secret(paths.runtime)
    if exit_code != 0:
        raise Failed(
            f"applying the password in {container_name(user)} failed (exit {exit_code}): {output[-400:] or 'no output'}",
            "password_not_applied",
        )
    return Result(changed=True, data=data)


# --- stop, remove -------------------------------------------------------------------------


def stop_container(params: dict, check: bool) -> Result:
    user, socket_path = params["user"], params["docker_socket"]
    state = inspect_ours(socket_path, user)
    if state is None or not state["running"]:
        if not check:
            stop_https(params)  # one left from a container that died on its own
        return Result(changed=False, data={"container": public_state(state) if state else dict(NO_CONTAINER)})
    if check:
        return Result(changed=True, data={"container": public_state(state)})
    stop_https(params)
    stopped = stop(socket_path, container_name(user), params["timeout"])
    after = inspect_ours(socket_path, user)
    return Result(changed=stopped, data={"container": public_state(after) if after else dict(NO_CONTAINER)})


def stop_https(params: dict) -> None:
    """The desktop's stunnel goes with its container (data_dir tells where its files are)."""
    if params.get("data_dir") is not None:
        stop_web(VmPaths.of(params["data_dir"], params["user"]).vm_dir)


def stop(socket_path: str, name: str, timeout: int) -> bool:
    """docker stop: SIGTERM, then SIGKILL after timeout seconds. True if it was running."""
    status, body = docker_call(
        socket_path, "POST", api_url(f"/containers/{quoted(name)}/stop", {"t": timeout}), timeout_s=timeout + 60.0
    )
    if status not in (204, 304, 404):
        raise unexpected(f"stopping container {name}", status, body, "container_stop_failed")
    return status == 204


def remove_container(params: dict, check: bool) -> Result:
    user, socket_path = params["user"], params["docker_socket"]
    state = inspect_ours(socket_path, user)
    if state is None:
        if not check:
            stop_https(params)
        return Result(changed=False, data={"container": dict(NO_CONTAINER)})
    if check:
        return Result(changed=True, data={"container": dict(NO_CONTAINER)})
    stop_https(params)
    name = container_name(user)
    if state["running"] or state["status"] == "restarting":
        # Stopped the way stop_container does, so the desktop gets its SIGTERM; never killed outright.
        stop(socket_path, name, params["timeout"])
    status, body = docker_call(socket_path, "DELETE", api_url(f"/containers/{quoted(name)}"))
    if status == 409:
        raise PreconditionFailed(f"dockerd refuses to remove {name}: {docker_message(body)}", "container_running")
    if status not in (204, 404):
        raise unexpected(f"removing container {name}", status, body, "container_remove_failed")
    return Result(changed=status == 204, data={"container": dict(NO_CONTAINER)})


# --- freeze, thaw -------------------------------------------------------------------------


def freeze(params: dict, check: bool) -> Result:
    """docker pause: the cgroup freezer stops every process of the desktop, so nothing writes
    while a backup flushes the sync and snapshots up_mfs. Pages already written are in the
    page cache, which the sync reads; the desktop sees only a pause of a second or two."""
    return pause_or_unpause(params, check, pause=True)


def thaw(params: dict, check: bool) -> Result:
    return pause_or_unpause(params, check, pause=False)


def pause_or_unpause(params: dict, check: bool, pause: bool) -> Result:
    user, socket_path = params["user"], params["docker_socket"]
    name = container_name(user)
    container = inspect_container(socket_path, name)
    if container is None:
        raise PreconditionFailed(f"container {name} does not exist", "no_container")
    state = container.get("State") or {}
    paused = bool(state.get("Paused"))
    if not state.get("Running"):
        raise PreconditionFailed(f"container {name} is not running", "container_not_running")
    if paused == pause or check:
        return Result(changed=paused != pause, data={"paused": paused if check else pause})
    verb = "pause" if pause else "unpause"
    status, body = docker_call(socket_path, "POST", api_url(f"/containers/{quoted(name)}/{verb}"))
    if status not in (204, 304):
        raise unexpected(f"{verb} of container {name}", status, body, f"container_{verb}_failed")
    return Result(changed=True, data={"paused": pause})
