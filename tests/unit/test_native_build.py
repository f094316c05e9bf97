"""Native tools in a source checkout: compiled once per source into the user's cache, or a clear
error saying what is missing."""

import shutil
from pathlib import Path

import pytest

from labvm.errors import StateError
from labvm.remote import helpers

REPO = Path(__file__).resolve().parents[2]
SOURCE = REPO / "native" / "labvm_merge.c"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "labvm" / "native"


def test_a_source_is_compiled_once_into_the_cache(tmp_path, cache):
    source = tmp_path / "labvm_merge.c"
    shutil.copy(SOURCE, source)
    first = helpers.compiled_from_source(source)
    assert first.parent.parent == cache and first.name == "labvm_merge"
    assert first.stat().st_mode & 0o777 == 0o755
    built_at = first.stat().st_mtime_ns
    assert helpers.compiled_from_source(source) == first
    assert first.stat().st_mtime_ns == built_at
    assert [p.name for p in first.parent.iterdir()] == ["labvm_merge"], "a temporary file was left behind"


def test_an_edited_source_gets_a_build_of_its_own(tmp_path, cache):
    source = tmp_path / "labvm_merge.c"
    shutil.copy(SOURCE, source)
    first = helpers.compiled_from_source(source)
    source.write_text(source.read_text() + "\n/* edited */\n")
    assert helpers.compiled_from_source(source) != first


def test_a_source_that_does_not_compile_says_why(tmp_path, cache):
    source = tmp_path / "broken.c"
    source.write_text("int main(void) { return undeclared; }\n")
    with pytest.raises(StateError, match="cannot build broken from .*undeclared"):
        helpers.compiled_from_source(source)
    assert not any(p.is_file() for p in cache.rglob("*"))


def test_without_a_compiler_the_error_names_what_to_install(tmp_path, cache, monkeypatch):
    source = tmp_path / "labvm_merge.c"
    shutil.copy(SOURCE, source)
    monkeypatch.setattr(helpers.shutil, "which", lambda name: None)
    with pytest.raises(StateError, match="no C compiler .* install gcc"):
        helpers.compiled_from_source(source)


def test_a_tool_neither_installed_nor_buildable_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(helpers, "checkout_root", lambda: tmp_path)
    monkeypatch.setattr(helpers.resources, "files", lambda package: tmp_path / "installed")
    with pytest.raises(StateError, match="labvm_merge is missing from this labvm installation"):
        helpers.native_tool("labvm_merge")


def test_an_installed_tool_is_taken_as_built(tmp_path, monkeypatch):
    installed = tmp_path / "installed" / "native"
    installed.mkdir(parents=True)
    (installed / "labvm_merge").write_bytes(b"\x7fELF built by setup.py")
    monkeypatch.setattr(helpers.resources, "files", lambda package: tmp_path / "installed")
    assert helpers.native_tool("labvm_merge") == b"\x7fELF built by setup.py"
