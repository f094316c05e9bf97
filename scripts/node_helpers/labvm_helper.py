"""Entry point of the labvm node helpers.

    python3 /var/lib/labvm/helpers/<sha256>/labvm_helper.py HELPER < request.json

The request is one JSON object, {"action": str, "params": {...}, "check": bool}; the reply is
one JSON object on stdout and the exit code says how it went (see _contract.py).
"""

import importlib
import os
import sys

# The bundle directory is named after its content hash: compiling into it would change it.
sys.dont_write_bytecode = True
BUNDLE_DIR = os.path.dirname(os.path.abspath(__file__))
# First on the path: run with `python3 -P` or `-I` the siblings would not be importable, and
# a same-named module elsewhere on the path must not shadow them.
sys.path.insert(0, BUNDLE_DIR)

from _contract import BadRequest, main  # noqa: E402 - needs the path set up above

# Helper name -> module in this bundle. A fixed table: nothing from the request is imported.
HELPER_MODULES = {
    "probe": "probe",
    "mfs": "mfs",
    "image": "image",
    "vm": "vm",
    "files": "files",
    "merge": "merge",
    "metrics": "metrics",
    "sync": "sync",
    "net": "net",
    "runtime": "runtime",
}


def load_actions(helper: str):
    module_name = HELPER_MODULES.get(helper)
    if module_name is None:
        raise BadRequest(f"unknown helper {helper[:60]!r}; known: {', '.join(sorted(HELPER_MODULES))}", "unknown_helper")
    return importlib.import_module(module_name).ACTIONS


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], load_actions))
