"""Password hashes and the encrypted VNC secret.

Login passwords are kept only as scrypt hashes. The VNC secret has to be
re-applied to a desktop after a restore, so it is kept encrypted with Fernet
under a key file that never leaves the admin host.
"""

from __future__ import annotations

import base64
import os
from pathlib import Path

from cryptography.exceptions import InvalidKey
from cryptography.fernet import Fernet, InvalidToken
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from .errors import StateError
from .fsutil import create_private, require_private

# n=2**15, r=8, p=1: about 32 MiB and tens of milliseconds per hash.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 1 << 15, 8, 1
SCRYPT_LEN = 32


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def hash_password(password: str, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P) -> str:
    salt = os.urandom(16)
    digest = Scrypt(salt=salt, length=SCRYPT_LEN, n=n, r=r, p=p).derive(password.encode())
    return f"scrypt${n}${r}${p}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
    except ValueError:
        return False
    if scheme != "scrypt":
        return False
    kdf = Scrypt(salt=base64.b64decode(salt), length=SCRYPT_LEN, n=int(n), r=int(r), p=int(p))
    try:
        kdf.verify(password.encode(), base64.b64decode(digest))
    except InvalidKey:
        return False
    return True


class SecretBox:
    """Encrypts small secrets with the admin host's key file."""

    def __init__(self, key: bytes):
        self._fernet = Fernet(key)

    @classmethod
    def create_key(cls, path: Path) -> None:
        create_private(path, Fernet.generate_key() + b"\n")

    @classmethod
    def from_file(cls, path: Path) -> "SecretBox":
        if not path.exists():
            raise StateError(f"{path}: key file missing; run `labvm init` (or restore the key from backup)")
        require_private(path)
        return cls(path.read_bytes().strip())

    def encrypt(self, secret: str) -> bytes:
        return self._fernet.encrypt(secret.encode())

    def decrypt(self, token: bytes) -> str:
        try:
            return self._fernet.decrypt(token).decode()
        except InvalidToken:
            raise StateError("a stored secret does not decrypt with this key file (wrong or replaced key?)") from None
