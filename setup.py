"""Builds labvm. setup.cfg holds the metadata; this file exists to compile native/.

Every native/*.c becomes an executable under labvm/native/ in the build, so an
installed labvm can push the tools to nodes along with its helpers.
"""

import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).parent


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
                ["cc", "-O2", "-Wall", "-Wextra", "-Werror", "-std=gnu11", "-o", str(output), str(source), "-lpthread"],
                check=True,
            )


setup(cmdclass={"build_py": build_py_with_native})
