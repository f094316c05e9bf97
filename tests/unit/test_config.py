"""The cluster file: the shipped example, and broken files with line-accurate errors."""

import re
from importlib import resources
from pathlib import Path

import pytest

from labvm.config import (
    Monitoring,
    Node,
    add_node_to_file,
    check_new_node,
    parse_config,
    parse_duration,
    parse_size,
    remove_node_from_file,
)
from labvm.errors import BadInput, ConfigError, NotFound

EXAMPLE = resources.files("labvm").joinpath("schema/bkConfxml.xml").read_text()

GOOD = """<?xml version="1.0"?>
<labvm version="1">
  <!-- keep me -->
  <storage>
    <mfs_master>10.0.0.2</mfs_master>
    <mfs_mount>/mnt/labvm-mfs</mfs_mount>
    <mfs_dir>/labvm</mfs_dir>
  </storage>
  <xfce_local>/var/lib/labvm/xfce_local</xfce_local>
  <nodes>
    <node name="n1">
      <host>10.0.0.11</host>
      <docker_port_base>30000</docker_port_base>
    </node>
  </nodes>
  <vm_defaults>
    <cpus>1.5</cpus>
    <memory>2g</memory>
    <gpus>1</gpus>
  </vm_defaults>
</labvm>
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bkConfxml.xml"
    path.write_text(text)
    return path


def test_repo_example_is_the_shipped_starter_and_valid(tmp_path):
    repo_file = Path(__file__).resolve().parents[2] / "bkConfxml.xml"
    assert repo_file.read_text() == EXAMPLE
    cfg = parse_config(write(tmp_path, EXAMPLE))
    assert cfg.storage.mfs_dir == "/labvm"
    assert cfg.xfce_local == "/var/lib/labvm/xfce_local"
    assert cfg.nodes == ()
    assert cfg.vm_defaults.memory == 16 << 30
    assert cfg.retention.keep_daily == 14
    assert cfg.monitoring == Monitoring(idle_after=168 * 3600, idle_cpu_percent=5.0, status_timeout=5.0)


def test_commented_example_node_is_valid_when_uncommented(tmp_path):
    # The documented <node> sits in a comment in the starter file; it must stay valid.
    block = re.search(r"<!-- Example.*?\n(.*?)-->", EXAMPLE, re.S).group(1)
    node_xml = "\n".join(line for line in block.splitlines() if line.strip().startswith("<"))
    text = EXAMPLE.replace("  </nodes>", node_xml + "\n  </nodes>")
    cfg = parse_config(write(tmp_path, text))
    (node,) = cfg.nodes
    assert (node.name, node.host, node.port, node.user) == ("gpu1", "gpu1.lab", 22, "root")
    assert (node.docker_port_base, node.docker_user_port_num, node.docker_port_slots) == (20000, 2, 50)


def test_good_file_parses_with_defaults(tmp_path):
    cfg = parse_config(write(tmp_path, GOOD))
    assert cfg.storage.mfs_port == 9421
    assert cfg.node("n1").port == 22 and cfg.node("n1").user == "root"
    assert cfg.node("n1").docker_port_base == 30000
    assert cfg.vm_defaults.cpus == 1.5 and cfg.vm_defaults.memory == 2 << 30
    assert cfg.vm_defaults.shm == 1 << 30  # default
    assert cfg.monitoring == Monitoring()  # no <monitoring>: the old tool's week, 5 % CPU, 5 s per node
    assert cfg.home == tmp_path
    with pytest.raises(NotFound, match="unknown node 'n9'.*known: n1"):
        cfg.node("n9")


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    "needle, replacement, expect",
    [
        ("<memory>2g</memory>", "<memory>lots</memory>", r"element /labvm/vm_defaults/memory: Element 'memory': The value 'lots' is not valid; expected a byte size"),
        ("<host>10.0.0.11</host>", "<host>a;rm -rf /</host>", r"element /labvm/nodes/node/host: Element 'host'"),
        ("<gpus>1</gpus>", "<gpus>-1</gpus>", r"Element 'gpus'"),
        ("<mfs_dir>/labvm</mfs_dir>", "<mfs_dir>labvm</mfs_dir>", r"Element 'mfs_dir'"),
        ("<cpus>1.5</cpus>", "<cpuz>1.5</cpuz>", r"Element 'cpuz': This element is not expected"),
        ('<node name="n1">', '<node name="N 1">', r"attribute 'name'"),
        ("<docker_port_base>30000</docker_port_base>", "<docker_port_base>70000</docker_port_base>", r"Element 'docker_port_base'"),
    ],
)
def test_invalid_values_name_file_line_and_element(tmp_path, needle, replacement, expect):
    text = GOOD.replace(needle, replacement)
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        parse_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line_of(text, replacement.split('>')[0])}:"), message
    assert re.search(expect, message), message


def test_missing_required_element_is_named(tmp_path):
    text = GOOD.replace("    <mfs_master>10.0.0.2</mfs_master>\n", "")
    with pytest.raises(ConfigError, match=r":4: element /labvm/storage: .*mfs_master"):
        parse_config(write(tmp_path, text))


def test_not_well_formed_gives_line(tmp_path):
    text = GOOD.replace("<xfce_local>/var/lib/labvm/xfce_local</xfce_local>", "<xfce_local>/x</xfce>")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"{path}:9: not well-formed XML"):
        parse_config(path)


def test_port_range_past_65535_is_refused(tmp_path):
    text = GOOD.replace("<docker_port_base>30000</docker_port_base>", "<docker_port_base>65500</docker_port_base>")
    with pytest.raises(ConfigError, match=r":11: element .*n1.*65500-65649 goes past 65535"):
        parse_config(write(tmp_path, text))


def test_missing_file_says_what_to_do(tmp_path):
    with pytest.raises(NotFound, match="labvm init"):
        parse_config(tmp_path / "nope.xml")


def test_external_entities_are_not_expanded(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    text = GOOD.replace('<?xml version="1.0"?>', f'<?xml version="1.0"?>\n<!DOCTYPE labvm [<!ENTITY x SYSTEM "file://{secret}">]>')
    text = text.replace("<mfs_dir>/labvm</mfs_dir>", "<mfs_dir>/&x;</mfs_dir>")
    with pytest.raises(ConfigError, match=r":1: a DOCTYPE declaration is not allowed") as err:
        parse_config(write(tmp_path, text))
    assert "TOPSECRET" not in str(err.value)


def test_node_add_and_remove_keep_comments_and_validate(tmp_path):
    path = write(tmp_path, GOOD)
    add_node_to_file(path, Node(name="n2", host="10.0.0.12", port=2222, user="labadm"))
    text = path.read_text()
    assert "<!-- keep me -->" in text
    cfg = parse_config(path)
    assert cfg.node_names() == ["n1", "n2"]
    assert cfg.node("n2").port == 2222 and cfg.node("n2").user == "labadm"
    remove_node_from_file(path, "n1")
    assert parse_config(path).node_names() == ["n2"]
    assert "<!-- keep me -->" in path.read_text()


def test_new_node_checked_against_schema_before_writing(tmp_path):
    path = write(tmp_path, GOOD)
    before = path.read_bytes()
    with pytest.raises(BadInput, match="node 'n2'.*Element 'host'"):
        check_new_node(path, Node(name="n2", host="$(reboot)"))
    with pytest.raises(BadInput, match="already exists"):
        add_node_to_file(path, Node(name="n1", host="10.0.0.13"))
    with pytest.raises(BadInput, match="attribute 'name'"):
        add_node_to_file(path, Node(name="Bad Name", host="10.0.0.13"))
    assert path.read_bytes() == before


@pytest.mark.parametrize("text, value", [("0", 0), ("512", 512), ("4k", 4096), ("2G", 2 << 30), ("1t", 1 << 40)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "g", "1.5g", "-1", "1gb", "1 g"])
def test_parse_size_rejects(text):
    with pytest.raises(BadInput):
        parse_size(text)


@pytest.mark.parametrize(
    "element, expect",
    [
        ("<idle_after>1 week</idle_after>", r"Element 'idle_after': The value '1 week' is not valid; expected a duration"),
        ("<status_timeout>0</status_timeout>", r"Element 'status_timeout'"),
        ("<idle_cpu_percent>-1</idle_cpu_percent>", r"Element 'idle_cpu_percent'"),
    ],
)
def test_invalid_monitoring_values_name_the_line(tmp_path, element, expect):
    text = GOOD.replace("</vm_defaults>", f"</vm_defaults>\n  <monitoring>\n    {element}\n  </monitoring>")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:{line_of(text, element)}: element /labvm/monitoring.*{expect}"):
        parse_config(path)


def test_monitoring_settings_are_read(tmp_path):
    text = GOOD.replace("</vm_defaults>", "</vm_defaults>\n  <monitoring>\n    <idle_after>30m</idle_after>\n"
                        "    <idle_cpu_percent>12.5</idle_cpu_percent>\n    <status_timeout>2.5</status_timeout>\n  </monitoring>")
    assert parse_config(write(tmp_path, text)).monitoring == Monitoring(idle_after=1800, idle_cpu_percent=12.5, status_timeout=2.5)
    partial = GOOD.replace("</vm_defaults>", "</vm_defaults>\n  <monitoring><idle_after>45s</idle_after></monitoring>")
    assert parse_config(write(tmp_path, partial)).monitoring == Monitoring(idle_after=45)


@pytest.mark.parametrize("text, seconds", [("45s", 45), ("30m", 1800), ("168h", 604800), ("2d", 172800), ("1d12h", 129600), ("0s", 0)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "168", "h", "1.5h", "-1h", "1w", "1 h"])
def test_parse_duration_rejects(text):
    with pytest.raises(BadInput, match="not a duration"):
        parse_duration(text)


@pytest.mark.parametrize("element, value", [
    (element, value)
    for element in ("data_dir", "mfs_mount", "mfs_dir", "xfce_local")
    for value in ("/", "//", "/var/lib/../../etc", "/var/..", "/var/./lib", "/var//lib", "/var/lib/", "/.", "/..")
])
def test_paths_must_be_absolute_normalised_and_not_root(tmp_path, element, value):
    text = GOOD.replace("      <docker_port_base>", "      <data_dir>/var/lib/labvm/data</data_dir>\n      <docker_port_base>")
    old = re.search(rf"<{element}>[^<]*</{element}>", text).group(0)
    text = text.replace(old, f"<{element}>{value}</{element}>")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        parse_config(path)
    message = str(err.value)
    assert message.startswith(f"{path}:{line_of(text, f'<{element}>')}: element "), message
    assert f"Element '{element}': The value '{value}' is not valid; expected an absolute, normalised path other than /" in message


@pytest.mark.parametrize("value", ["/a", "/var/lib/labvm/data", "/srv/.hidden/x", "/srv/..x/y...", "/a.b/c..d"])
def test_plain_absolute_paths_are_accepted(tmp_path, value):
    text = GOOD.replace("<xfce_local>/var/lib/labvm/xfce_local</xfce_local>", f"<xfce_local>{value}</xfce_local>")
    assert parse_config(write(tmp_path, text)).xfce_local == value


@pytest.mark.parametrize("second, port", [("10.0.0.11", ""), ("10.0.0.11", "<port>22</port>")])
def test_two_nodes_at_one_address_are_refused_at_the_second(tmp_path, second, port):
    node = f'    <node name="n2">\n      <host>{second}</host>{port}\n    </node>\n'
    text = GOOD.replace("  </nodes>", node + "  </nodes>")
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        parse_config(path)
    line = line_of(text, '<node name="n2">')
    assert str(err.value) == (f"{path}:{line}: element /labvm/nodes/node[@name='n2']: "
                              f"{second}:22 is already node 'n1'; each node needs its own host")


def test_one_host_on_two_ssh_ports_is_two_nodes(tmp_path):
    node = '    <node name="n2">\n      <host>10.0.0.11</host>\n      <port>2222</port>\n    </node>\n'
    cfg = parse_config(write(tmp_path, GOOD.replace("  </nodes>", node + "  </nodes>")))
    assert [(n.host, n.port) for n in cfg.nodes] == [("10.0.0.11", 22), ("10.0.0.11", 2222)]


def test_node_add_refuses_a_data_dir_of_root(tmp_path):
    path = write(tmp_path, GOOD)
    with pytest.raises(BadInput, match="The value '/' is not valid; expected an absolute, normalised path"):
        check_new_node(path, Node(name="n2", host="10.0.0.12", data_dir="/"))


def test_disk_size_default_and_override_and_the_quota_that_follows_it(tmp_path):
    from labvm.config import member_quota_for

    cfg = parse_config(write(tmp_path, GOOD))
    assert cfg.vm_defaults.disk == 100 << 30
    assert cfg.storage.member_quota is None
    # Backups kept by each rule, and as many versions made by other operations as keep_last.
    kept = 2 * cfg.retention.keep_last + cfg.retention.keep_daily + cfg.retention.keep_weekly
    # No <member_quota>: room for every kept version, the synced upper and one being made.
    assert member_quota_for(cfg, 10 << 30) == (10 << 30) * (kept + 2)
    text = GOOD.replace("<gpus>1</gpus>", "<gpus>1</gpus><disk>20g</disk>").replace(
        "<mfs_dir>/labvm</mfs_dir>", "<mfs_dir>/labvm</mfs_dir><member_quota>3t</member_quota>")
    cfg = parse_config(write(tmp_path, text))
    assert cfg.vm_defaults.disk == 20 << 30
    assert member_quota_for(cfg, 10 << 30) == 3 << 40  # set for every member


def test_a_bad_disk_size_names_its_line(tmp_path):
    text = GOOD.replace("<gpus>1</gpus>", "<gpus>1</gpus>\n    <disk>lots</disk>")
    with pytest.raises(ConfigError, match="disk"):
        parse_config(write(tmp_path, text))


@pytest.mark.parametrize(
    "needle, replacement, expect",
    [
        ('<node name="n1">', '<node name="N1">',
         "Element 'node', attribute 'name': The value 'N1' is not valid; expected a lowercase letter, then up to 31 "
         "lowercase letters, digits or -"),
        ('<labvm version="1">', '<labvm version="2">',
         "Element 'labvm', attribute 'version': The value '2' is not an element of the set {'1'}"),
    ],
)
def test_schema_messages_keep_quantifiers_and_sets(tmp_path, needle, replacement, expect):
    path = write(tmp_path, GOOD.replace(needle, replacement))
    with pytest.raises(ConfigError) as err:
        parse_config(path)
    assert str(err.value).endswith(expect), str(err.value)


def test_a_pattern_without_words_is_quoted_whole_and_only_namespaces_go():
    from labvm.config import _tidy_schema_message

    raw = "Element '{http://example.org/ns}user': [facet 'pattern'] The value 'Root' is not accepted by the pattern '[a-z_][a-z0-9_-]{0,29}'."
    assert _tidy_schema_message(raw) == "Element 'user': The value 'Root' is not accepted by the pattern '[a-z_][a-z0-9_-]{0,29}'"
    raw = "Element 'x': [facet 'enumeration'] The value '{z}' is not an element of the set {'a', 'b'}."
    assert _tidy_schema_message(raw) == "Element 'x': The value '{z}' is not an element of the set {'a', 'b'}"


def test_vnc_listen_is_read_and_checked(tmp_path):
    from labvm.config import VncSettings

    assert parse_config(write(tmp_path, GOOD)).vnc == VncSettings(listen="published")
    for value in ("published", "loopback", "off"):
        text = GOOD.replace("</labvm>", f"  <vnc><listen>{value}</listen></vnc>\n</labvm>")
        assert parse_config(write(tmp_path, text)).vnc.listen == value
    bad = GOOD.replace("</labvm>", "  <vnc><listen>public</listen></vnc>\n</labvm>")
    with pytest.raises(ConfigError, match=r"element /labvm/vnc: .*listen.*public"):
        parse_config(write(tmp_path, bad))


def test_the_https_port_follows_the_slot_past_the_slots():
    node = Node(name="n1", host="10.0.0.1", docker_port_base=20000, docker_user_port_num=2, docker_port_slots=50)
    assert [node.https_port(vnc) for vnc in (20000, 20002, 20098)] == [20100, 20101, 20149]
