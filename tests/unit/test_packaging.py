"""An installed labvm (a wheel, not this checkout) carries its node helpers, schema and starter file."""

import ast
import io
import stat
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from labvm.remote.helpers import NATIVE_CC_FLAGS, NATIVE_TOOLS, HelperBundle

REPO = Path(__file__).resolve().parents[2]


def test_wheel_ships_helpers_schema_and_starter(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, timeout=300, capture_output=True,
    )
    (wheel,) = tmp_path.glob("labvm-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"labvm/schema/bkConfxml.xsd", "labvm/schema/bkConfxml.xml", "labvm/schema/status.schema.json", "labvm/cli.py"} <= names
    bundle = HelperBundle.from_package()
    with zipfile.ZipFile(wheel) as zf:
        for name, data in bundle.files:
            if name not in bundle.executables:
                assert zf.read(f"labvm/node_helpers/{name}") == data
        for tool in NATIVE_TOOLS:
            info = zf.getinfo(f"labvm/native/{tool}")
            assert (info.external_attr >> 16) & stat.S_IXUSR, f"{tool} is not executable in the wheel"
            assert zf.read(info).startswith(b"\x7fELF")
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "labvm = labvm.cli:main" in entry_points


def test_setup_py_compiles_native_tools_as_the_checkout_bundle_does():
    tree = ast.parse((REPO / "setup.py").read_text())
    assigned = {
        target.id: node.value for node in tree.body if isinstance(node, ast.Assign) for target in node.targets
        if isinstance(target, ast.Name)
    }
    assert ast.literal_eval(assigned["NATIVE_CC_FLAGS"]) == NATIVE_CC_FLAGS


def test_the_bundle_carries_the_merge_engine_as_an_executable_member(tmp_path):
    bundle = HelperBundle.from_package()
    assert "labvm_merge" in bundle.executables
    with tarfile.open(fileobj=io.BytesIO(bundle.tarball), mode="r:gz") as tar:
        member = tar.getmember("labvm_merge")
        assert member.isfile() and member.mode == 0o755
        assert tar.getmember("labvm_helper.py").mode == 0o644
        tar.extract(member, tmp_path)
    result = subprocess.run([str(tmp_path / "labvm_merge"), "--help"], capture_output=True)
    assert result.returncode == 0 and b"usage: labvm_merge apply" in result.stdout


def test_the_command_modules_never_import_the_root_command_and_hold_no_sql():
    """labvm/cli.py is the root; the groups and their kit never import it back, and no SQL
    statement or node command line is written in any of them."""
    import ast
    from pathlib import Path

    package = Path(__file__).resolve().parents[2] / "labvm"
    modules = sorted(package.glob("cli_*.py"))
    assert {m.name for m in modules} >= {"cli_kit.py", "cli_desktops.py", "cli_nodes.py", "cli_members.py", "cli_images.py"}
    for module in [*modules, package / "cli.py"]:
        tree = ast.parse(module.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and module.name != "cli.py":
                assert not (node.level == 1 and node.module == "cli"), f"{module.name} imports labvm.cli"
                assert node.module != "labvm.cli", f"{module.name} imports labvm.cli"
            if isinstance(node, ast.Attribute):
                assert node.attr != "execute", f"{module.name} runs SQL itself (line {node.lineno})"
            if isinstance(node, ast.List) and node.elts and isinstance(node.elts[0], ast.Constant):
                assert node.elts[0].value not in ("docker", "ssh", "sudo"), \
                    f"{module.name} builds a node command line (line {node.lineno})"
