"""Entry point of the labvm node helpers.

    python3 /var/lib/labvm/helpers/<sha256>/labvm_helper.py HELPER < request.json
    python3 /var/lib/labvm/helpers/<sha256>/labvm_helper.py batch < steps.json

The request is one JSON object, {"action": str, "params": {...}, "check": bool}; the reply is
one JSON object on stdout and the exit code says how it went. A batch runs several such
requests in one process (see _contract.py).
"""

import importlib
import os
import stat
import sys

BUNDLE_DIR = os.path.dirname(os.path.abspath(__file__))
# The bundle directory is named after its content hash: compiling into it would change it. An
# installed bundle (it has .complete) keeps its bytecode beside it instead, in the helpers
# root's .pycache, which only root may write: compiling the helpers on every call would cost
# each one tens of milliseconds.
sys.dont_write_bytecode = True
if os.path.isfile(os.path.join(BUNDLE_DIR, ".complete")) and os.geteuid() == 0:
    _cache = os.path.join(os.path.dirname(BUNDLE_DIR), ".pycache")
    try:
        os.mkdir(_cache, 0o700)
    except FileExistsError:
        pass
    except OSError:
        _cache = None
    if _cache is not None:
        _stat = os.lstat(_cache)
        if stat.S_ISDIR(_stat.st_mode) and _stat.st_uid == 0 and _stat.st_mode & 0o7077 == 0:
            sys.pycache_prefix = _cache
            sys.dont_write_bytecode = False
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
