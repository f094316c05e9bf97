"""Members' SSH public keys, checked strictly before they go near an authorized_keys file.

A key is taken from one line in the OpenSSH public key format: `TYPE BASE64 [COMMENT]`. The
type must be one labvm knows, the base64 must decode to a key blob of that same type that is
read to its last byte (and, for the types the cryptography library knows, loads as a key), an
RSA key must have at least 3072 bits, and anything before the type (authorized_keys options
such as `command=` or `permitopen=`) is refused. What labvm keeps, and writes, is the type, the
base64 and a comment cut down to a few harmless characters: nothing a member gives can add an
option, a second key or a line to the file.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization

from .errors import BadInput

MAX_KEY_TEXT = 16 * 1024
RSA_MIN_BITS = 3072
COMMENT_MAX = 64

ECDSA_CURVES = {
    "ecdsa-sha2-nistp256": "nistp256",
    "ecdsa-sha2-nistp384": "nistp384",
    "ecdsa-sha2-nistp521": "nistp521",
}
SK_ECDSA = "sk-ecdsa-sha2-nistp256@openssh.com"
SK_ED25519 = "sk-ssh-ed25519@openssh.com"
KEY_TYPES = ("ssh-ed25519", *ECDSA_CURVES, "ssh-rsa", SK_ED25519, SK_ECDSA)

_BASE64 = re.compile(r"[A-Za-z0-9+/]+={0,2}")
_COMMENT_DROP = re.compile(r"[^A-Za-z0-9@._+:-]")


@dataclass(frozen=True)
class MemberKey:
    type: str
    blob_b64: str
    comment: str
    fingerprint: str
    bits: int | None = None

    @property
    def line(self) -> str:
        """The key as authorized_keys holds it, options aside."""
        return f"{self.type} {self.blob_b64}" + (f" {self.comment}" if self.comment else "")

    def as_dict(self) -> dict:
        return {"type": self.type, "fingerprint": self.fingerprint, "comment": self.comment, "bits": self.bits}


def fingerprint_of(blob: bytes) -> str:
    """As `ssh-keygen -l` shows it: SHA256: and the unpadded base64 of the blob's digest."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def sanitize_comment(text: str) -> str:
    return _COMMENT_DROP.sub("", text)[:COMMENT_MAX]


class _Reader:
    """The SSH wire format's strings, one after another; running short is a bad key."""

    def __init__(self, blob: bytes):
        self.blob, self.at = blob, 0

    def string(self) -> bytes:
        if self.at + 4 > len(self.blob):
            raise BadInput("the key's data ends too early: it is not a whole public key")
        (length,) = struct.unpack(">I", self.blob[self.at:self.at + 4])
        start, self.at = self.at + 4, self.at + 4 + length
        if self.at > len(self.blob):
            raise BadInput("the key's data ends too early: it is not a whole public key")
        return self.blob[start:self.at]

    def end(self) -> None:
        if self.at != len(self.blob):
            raise BadInput("the key's data has bytes after the key: it is not one public key")


def parse_public_key(text: str) -> MemberKey:
    """One public key line, checked as the module says, or BadInput saying what is wrong."""
    if not isinstance(text, str):
        raise BadInput("the key must be text")
    if len(text) > MAX_KEY_TEXT:
        raise BadInput(f"the key file is longer than {MAX_KEY_TEXT} characters: give one public key (the .pub file)")
    body = text[:-1] if text.endswith("\n") else text
    if "\n" in body or "\r" in body:
        raise BadInput("give exactly one key, on one line (the .pub file ssh-keygen wrote)")
    if "\0" in body or any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in body):
        raise BadInput("the key holds control characters")
    fields = body.split()
    if not fields:
        raise BadInput("the key file is empty")
    key_type = fields[0]
    if key_type not in KEY_TYPES:
        if any(option in body.split(" ", 1)[0] for option in ("=", ",")) or len(fields) >= 3 and fields[1] in KEY_TYPES:
            raise BadInput("the key begins with authorized_keys options; give the key alone (TYPE BASE64 [COMMENT])")
        raise BadInput(f"unknown key type {key_type[:40]!r}; labvm takes {', '.join(KEY_TYPES)} (RSA of {RSA_MIN_BITS} bits or more)")
    if len(fields) < 2 or not _BASE64.fullmatch(fields[1]):
        raise BadInput("the key's second field must be its base64 data")
    try:
        blob = base64.b64decode(fields[1], validate=True)
    except (binascii.Error, ValueError):
        raise BadInput("the key's base64 data does not decode") from None
    bits = _check_blob(key_type, blob)
    if key_type in ("ssh-ed25519", "ssh-rsa", *ECDSA_CURVES):
        try:
            serialization.load_ssh_public_key(f"{key_type} {fields[1]}".encode("ascii"))
        except (ValueError, TypeError):
            raise BadInput(f"the key's data is not a valid {key_type} public key") from None
    comment = sanitize_comment(" ".join(fields[2:]))
    # The base64 is written back in its canonical form, from the blob that was checked.
    return MemberKey(key_type, base64.b64encode(blob).decode("ascii"), comment, fingerprint_of(blob), bits)


def _check_blob(key_type: str, blob: bytes) -> int | None:
    r = _Reader(blob)
    inner = r.string()
    if inner != key_type.encode("ascii"):
        raise BadInput(f"the key says {key_type} but its data holds a {inner[:40].decode('ascii', 'replace')!r} key")
    bits = None
    if key_type == "ssh-rsa":
        _e, n = r.string(), r.string()
        bits = int.from_bytes(n, "big").bit_length()
        if bits < RSA_MIN_BITS:
            raise BadInput(f"an RSA key of {bits} bits is too weak: labvm takes {RSA_MIN_BITS} bits or more (or ssh-ed25519)")
    elif key_type in ECDSA_CURVES or key_type == SK_ECDSA:
        curve = r.string()
        if curve != ECDSA_CURVES.get(key_type, "nistp256").encode("ascii"):
            raise BadInput(f"the key's curve does not match its type {key_type}")
        if not r.string():
            raise BadInput("the key has no public point")
    elif key_type in ("ssh-ed25519", SK_ED25519):
        if len(r.string()) != 32:
            raise BadInput("an Ed25519 public key is 32 bytes")
    if key_type.startswith("sk-"):
        application = r.string()
        if not application.startswith(b"ssh:"):
            raise BadInput("a security key's application must begin with ssh:")
    r.end()
    return bits
