"""Builds labvm. setup.cfg holds the metadata; this file exists to compile native/.

Every native/*.c becomes an executable under labvm/native/ in the build, so an
installed labvm can push the tools to nodes along with its helpers.
"""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent

# -static: the binaries run on the GPU nodes, whose glibc may be older than the admin host's
# where they were built; a static binary needs none (checked with Debian 12's libc6-dev: the
# tools use no NSS or dlopen, so static glibc links them without warnings).
# labvm/remote/helpers.py compiles the same way in a source checkout: keep NATIVE_CC_FLAGS there
# equal to this (tests/unit/test_packaging.py checks it).
NATIVE_CC_FLAGS = ("-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-static")


class build_py_with_native(build_py):
    def run(self):
        super().run()
        sources = sorted((HERE / "native").glob("*.c"))
        if not sources:
            return
        target = Path(self.build_lib) / "labvm" / "native"
        target.mkdir(parents=True, exist_ok=True)
        for source in sources:
            output = target / source.stem
            self.announce(f"compiling {source.name} -> {output}", level=2)
            subprocess.run(
                ["cc", *NATIVE_CC_FLAGS, "-o", str(output), str(source), "-lpthread"],
                check=True,
            )


setup(cmdclass={"build_py": build_py_with_native})
