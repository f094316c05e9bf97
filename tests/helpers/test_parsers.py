"""Pure parts of the helpers, imported from the bundle's files."""

import errno
import os
import time

import pytest

NVIDIA_LINE = "0, GPU-aaaa, NVIDIA H200, 143771, 512, 3"


# --- nvidia-smi ---------------------------------------------------------------------------


def test_gpu_query_parses_values_and_missing_ones(bundle):
    text = "0, GPU-aaaa, NVIDIA H200, 143771, 512, 3\r\n\n  1 ,GPU-bbbb ,  Tesla T4 , 15360 , [N/A] , [Not Supported]  \n"
    assert bundle.probe.parse_gpu_query(text) == [
        {
            "index": 0,
            "uuid": "GPU-aaaa",
            "name": "NVIDIA H200",
            "memory_total_mib": 143771,
            "memory_used_mib": 512,
            "utilization_gpu": 3,
        },
        {
            "index": 1,
            "uuid": "GPU-bbbb",
            "name": "Tesla T4",
            "memory_total_mib": 15360,
            "memory_used_mib": None,
            "utilization_gpu": None,
        },
    ]


def test_gpu_query_of_no_gpus_is_empty(bundle):
    assert bundle.probe.parse_gpu_query("") == []
    assert bundle.probe.parse_gpu_query("\n  \n") == []


@pytest.mark.parametrize(
    "text, message",
    [
        (NVIDIA_LINE + "\n0, GPU-bbbb, NVIDIA H200, 143771, 512\n", "line 2: expected 6 columns, got 5"),
        (NVIDIA_LINE + ", 7", "line 1: expected 6 columns, got 7"),
        ("No devices were found", "line 1: expected 6 columns, got 1"),
        ("[N/A], GPU-aaaa, NVIDIA H200, 143771, 512, 3", "line 1: index has no value"),
        ("0, , NVIDIA H200, 143771, 512, 3", "line 1: uuid has no value"),
        ("zero, GPU-aaaa, NVIDIA H200, 143771, 512, 3", "line 1: index is not an integer"),
        ("0, GPU-aaaa, NVIDIA H200, 143771 MiB, 512, 3", "line 1: memory.total is not an integer"),
        ("0, GPU-aaaa, NVIDIA H200, 143771, 512, -3", "line 1: utilization.gpu is negative"),
    ],
)
def test_gpu_query_refuses_what_it_does_not_understand(bundle, text, message):
    with pytest.raises(ValueError, match=message):
        bundle.probe.parse_gpu_query(text)


# --- /proc --------------------------------------------------------------------------------


def test_meminfo(bundle):
    text = (
        "MemTotal:       16305412 kB\nMemFree:          123456 kB\n"
        "MemAvailable:   8000000 kB\nHugePages_Total:       0\nbroken line\n"
    )
    assert bundle.probe.parse_meminfo(text) == {
        "MemTotal": 16305412,
        "MemFree": 123456,
        "MemAvailable": 8000000,
        "HugePages_Total": 0,
    }


def test_filesystems(bundle):
    text = "nodev\tsysfs\nnodev\toverlay\n\text4\nnodev\tfuse\n\tfuseblk\n"
    assert bundle.probe.parse_filesystems(text) == {"sysfs", "overlay", "ext4", "fuse", "fuseblk"}


MOUNTINFO = (
    "22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "49 22 0:40 / /mnt/labvm-mfs rw,relatime shared:30 master:2 - fuse mfs\\04310.213.0.2:9421 "
    "rw,user_id=0,group_id=0,allow_other\n"
    "50 22 0:41 / /srv/my\\040data rw,nosuid,nodev - tmpfs tmp\\011fs rw,size=1024k\n"
    "51 49 0:42 / /mnt/labvm-mfs/vms/alice rw - overlay overlay rw,lowerdir=/a,upperdir=/b\n"
    "this is not a mountinfo line\n"
    "52 49 0:43 / /mnt/labvm-mfs rw - tmpfs tmpfs rw\n"
)


def test_mountinfo_fields_and_escapes(bundle):
    entries = bundle.system.parse_mountinfo(MOUNTINFO)
    assert [entry.mount_point for entry in entries] == [
        "/",
        "/mnt/labvm-mfs",
        "/srv/my data",
        "/mnt/labvm-mfs/vms/alice",
        "/mnt/labvm-mfs",
    ]
    mfs = entries[1]
    assert (mfs.mount_id, mfs.parent_id, mfs.root) == (49, 22, "/")
    assert mfs.fstype == "fuse" and mfs.source == "mfs#10.213.0.2:9421"
    assert mfs.mount_options == ("rw", "relatime")
    assert "allow_other" in mfs.super_options
    assert entries[2].source == "tmp\tfs"
    assert entries[2].mount_options == ("rw", "nosuid", "nodev")


def test_mount_at_sees_the_top_of_stacked_mounts(bundle):
    entries = bundle.system.parse_mountinfo(MOUNTINFO)
    assert bundle.system.mount_at(entries, "/mnt/labvm-mfs").mount_id == 52
    assert bundle.system.mount_at(entries, "/srv/my data").fstype == "tmpfs"
    assert bundle.system.mount_at(entries, "/srv") is None
    below = bundle.system.mounts_below(entries, "/mnt/labvm-mfs")
    assert [entry.mount_id for entry in below] == [51]


def test_this_process_mount_table_has_a_root(bundle):
    root = bundle.system.mount_at(bundle.system.read_mountinfo(), "/")
    assert root is not None and root.fstype


# --- mfs ----------------------------------------------------------------------------------


def entry(bundle, fstype, source, options=("rw",)):
    return bundle.system.MountEntry(1, 0, "/", "/mnt/labvm-mfs", options, fstype, source, ())


def test_moosefs_is_recognised_by_its_fuse_source(bundle):
    assert bundle.mfs.is_moosefs(entry(bundle, "fuse", "mfs#10.213.0.2:9421"))
    assert bundle.mfs.is_moosefs(entry(bundle, "fuse.mfs", "MFS"))
    assert not bundle.mfs.is_moosefs(entry(bundle, "fuse.sshfs", "me@host:/"))
    assert not bundle.mfs.is_moosefs(entry(bundle, "ext4", "mfs#disk"))


def test_mfs_source(bundle):
    assert bundle.mfs.parse_mfs_source("mfs#10.213.0.2:9421") == ("10.213.0.2", 9421)
    assert bundle.mfs.parse_mfs_source("mfs#mfsmaster.lab:9521") == ("mfsmaster.lab", 9521)
    assert bundle.mfs.parse_mfs_source("MFS") is None


def test_mount_params_file(bundle):
    text = "mfsmaster: 10.213.0.2\nmfsport: 9421\nmfssubfolder: /labvm\nmfsbind: (not defined)\n"
    assert bundle.mfs.parse_mount_params(text) == {
        "mfsmaster": "10.213.0.2",
        "mfsport": "9421",
        "mfssubfolder": "/labvm",
        "mfsbind": "(not defined)",
    }


def test_required_options_are_appended_once(bundle):
    assert bundle.mfs.with_required_options(()) == ("nosuid", "nodev", "default_permissions")
    assert bundle.mfs.with_required_options(("nodev", "mfscachemode=DIRECT")) == (
        "nodev", "mfscachemode=DIRECT", "nosuid", "default_permissions")


def test_mount_options_accept_plain_key_values(bundle):
    value = "mfscachemode=DIRECT,,mfsattrcacheto=1.5,mfspreflabels=A+B"
    assert bundle.mfs.mount_options("options", value) == ("mfscachemode=DIRECT", "mfsattrcacheto=1.5", "mfspreflabels=A+B")
    assert bundle.mfs.mount_options("options", "") == ()


PARAMS = {"master": "10.213.0.2", "port": 9421, "subdir": "/labvm"}


@pytest.mark.parametrize(
    "output, error_class, code",
    [
        ('can\'t connect to mfsmaster ("10.213.0.2":"9421")', "TemporaryFailure", "mfs_master_unreachable"),
        ("can't resolve master hostname and/or portname (mfsmaster.lab:9421)", "TemporaryFailure", "mfs_master_unreachable"),
        ("mfsmaster register error: No such file or directory", "PreconditionFailed", "mfs_subdir_missing"),
        ("mfsmaster register error: Permission denied", "PreconditionFailed", "mfs_mount_refused"),
        ("fuse: device not found, try 'modprobe fuse' first", "Failed", "mfsmount_failed"),
    ],
)
def test_mfsmount_failures_map_to_errors_a_caller_can_act_on(bundle, output, error_class, code):
    error = bundle.mfs.mfsmount_failure(output, PARAMS)
    assert type(error).__name__ == error_class and error.code == code
    assert output in error.msg


def test_unreachable_message_names_the_master(bundle):
    error = bundle.mfs.mfsmount_failure("can't connect to mfsmaster", PARAMS)
    assert error.msg.startswith("MooseFS master 10.213.0.2:9421 not reachable: ")
    assert error.retryable is True


# --- contract -----------------------------------------------------------------------------


def test_secret_values_are_found_wherever_they_sit(bundle):
    document = {
        "action": "x",
        "params": {
            "password": "p1",
            "vnc_passwd": "p2",
            "api_token": 1234,
            "mount": "/mnt",
            "secrets": {"a": "s1", "b": ["s2", {"c": "s3"}], "enabled": True, "none": None},
            "nested": {"Secret_Key": "s4", "plain": "visible"},
        },
    }
    assert bundle.contract.secret_values(document) == {"p1", "p2", "1234", "s1", "s2", "s3", "s4"}


def test_redactor_scrubs_every_string_in_a_reply(bundle):
    redact = bundle.contract.Redactor({"hunter2", "hunter"})
    body = {"ok": False, "error": {"msg": 'bad "hunter2" and hunter', "retryable": False}, "list": ["xhunter2x", 3]}
    assert redact.scrub(body) == {
        "ok": False,
        "error": {"msg": 'bad "<redacted>" and <redacted>', "retryable": False},
        "list": ["x<redacted>x", 3],
    }


def test_validate_params_applies_defaults_and_validators(bundle):
    contract = bundle.contract
    spec = {
        "path": contract.Param(contract.absolute_path, required=True),
        "port": contract.Param(contract.integer_between(1, 10), default=5),
    }
    assert contract.validate_params(spec, {"path": "/a//b/../c/"}) == {"path": "/a/c", "port": 5}
    assert contract.validate_params(spec, {"path": "/a", "port": None}) == {"path": "/a", "port": 5}


def test_shown_value_hides_secret_names(bundle):
    assert bundle.contract.shown_value("db_password", "x") == "<redacted>"
    assert bundle.contract.shown_value("mount", "x") == "'x'"


def test_unexpected_exception_becomes_an_internal_error(bundle, capsys):
    contract = bundle.contract

    def explode(params, check):
        raise KeyError("gone")

    actions = {"go": contract.Action(run=explode)}
    reply = contract.handle_request(["h"], b'{"action": "go"}', lambda helper: actions)
    assert reply.exit_code == 1
    assert reply.body["error"]["code"] == "internal"
    assert "KeyError" in reply.body["error"]["msg"]
    assert "Traceback" in capsys.readouterr().err


def test_helper_errors_carry_their_exit_codes(bundle):
    contract = bundle.contract
    expected = {
        contract.Failed: (1, False),
        contract.BadRequest: (2, False),
        contract.PreconditionFailed: (3, False),
        contract.TemporaryFailure: (75, True),
    }
    for error_class, (exit_code, retryable) in expected.items():
        error = error_class("message", "some_code")
        assert (error.exit_code, error.retryable, error.code) == (exit_code, retryable, "some_code")


# --- commands and FUSE calls --------------------------------------------------------------


def test_run_command_passes_stdin_and_keeps_output_apart(bundle):
    result = bundle.system.run_command(["sh", "-c", "cat; echo oops >&2; exit 4"], 10, stdin_text="secret-on-stdin\n")
    assert (result.returncode, result.stdout, result.stderr) == (4, "secret-on-stdin\n", "oops\n")
    assert result.output_tail() == "oops"


def test_run_command_without_stdin_gets_eof(bundle):
    assert bundle.system.run_command(["cat"], 10).stdout == ""


def test_run_command_returns_when_a_daemonized_child_keeps_its_output_open(bundle):
    started = time.monotonic()
    result = bundle.system.run_command(["sh", "-c", "sleep 5 & echo started"], 10)
    assert result.stdout == "started\n"
    assert time.monotonic() - started < 3


def test_run_command_timeout_kills_the_whole_session(bundle, tmp_path):
    marker = tmp_path / "survived"
    started = time.monotonic()
    with pytest.raises(bundle.system.CommandTimedOut, match="sh did not finish within 0.5 s"):
        bundle.system.run_command(["sh", "-c", f"(sleep 2; touch {marker}) & sleep 30"], 0.5)
    assert time.monotonic() - started < 5
    time.sleep(2.5)
    assert not marker.exists()


def test_fuse_call_statvfs_and_read(bundle, tmp_path):
    (tmp_path / "f").write_text("mfsmaster: 10.213.0.2\n")
    stat = bundle.system.fuse_call("statvfs", str(tmp_path), 10)
    local = os.statvfs(tmp_path)
    assert stat["blocks"] == local.f_blocks and stat["frsize"] == local.f_frsize
    assert bundle.system.fuse_call("read", str(tmp_path / "f"), 10) == "mfsmaster: 10.213.0.2\n"


def test_fuse_call_reports_errno(bundle, tmp_path):
    with pytest.raises(OSError) as raised:
        bundle.system.fuse_call("read", str(tmp_path / "missing"), 10)
    assert raised.value.errno == errno.ENOENT


def test_tools_are_also_looked_up_in_the_standard_directories(bundle, monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    assert bundle.system.find_tool("sh") in ("/usr/bin/sh", "/bin/sh")


def test_block_device_of_takes_the_whole_disk_of_a_partition(bundle, tmp_path):
    st_dev = os.stat(tmp_path).st_dev
    devices = tmp_path / "sys" / "devices" / "vdz"
    (devices / "vdz1").mkdir(parents=True)
    (devices / "vdz1" / "partition").write_text("1\n")
    block = tmp_path / "sys" / "dev" / "block"
    block.mkdir(parents=True)
    (block / f"{os.major(st_dev)}:{os.minor(st_dev)}").symlink_to(devices / "vdz1")
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "vdz").touch()
    found = bundle.probe.block_device_of(str(tmp_path), sys_root=str(tmp_path / "sys"), dev_root=str(dev))
    assert found == str(dev / "vdz")
    (block / f"{os.major(st_dev)}:{os.minor(st_dev)}").unlink()
    assert bundle.probe.block_device_of(str(tmp_path), sys_root=str(tmp_path / "sys"), dev_root=str(dev)) is None


def test_listening_ports_come_from_proc_net_tcp(bundle):
    text = (
        "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n"
        "   0: 0B00D50A:4E21 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n"
        "   1: 0100007F:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1\n"
        "   2: 0B00D50A:0016 0100D50A:A2C4 01 00000000:00000000 02:00000000 00000000     0        0 3 1\n"
    )
    assert bundle.probe.parse_listening_ports(text) == {0x4E21, 22}  # the established connection is not listening


def test_quota_rows_are_read_with_and_without_a_hard_limit(bundle):
    text = (
        "/mnt/mfs/vms/alice: (current values | soft quota | hard quota) ; soft quota grace period: default\n"
        " inodes   |                    3 |                    - |                    - |\n"
        " length   |        1099532599296 |                    - |                    - |\n"
        " size     |             20987904 |                    - |           1073741824 |\n"
        " realsize |             20987904 |                    - |                    - |\n"
    )
    # The size row (chunks), not length: a sparse 1 TiB file counts what it holds.
    assert bundle.mfs.parse_quota(text) == (20987904, 1073741824)
    assert bundle.mfs.parse_quota(text.replace("1073741824", "-")) == (20987904, None)
    with pytest.raises(bundle.contract.Failed):
        bundle.mfs.parse_quota("mfsgetquota: something else\n")
