"""labvm's own certificate authority, for the HTTPS that desktops' noVNC is served over.

A lab has no public name for each node, so no public CA will sign for them. labvm keeps a
small CA in the admin state directory instead: members import its certificate into their
browser once (`labvm ca export`), and every node certificate it issues is trusted from then
on. The key is ECDSA P-256, which every current browser takes. ca.key is a secret (0600,
created so from its first byte); ca.pem is public.

Node certificates live 90 days by default and never more than 397 (browsers refuse longer
ones); `needs_renewal` tells when one must be issued again.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import BadInput, StateError
from .fsutil import atomic_write, create_private, ensure_private_dir, require_private

CA_KEY = "ca.key"
CA_CERT = "ca.pem"
CA_DAYS = 3652  # ten years: members import the certificate once
LEAF_DAYS = 90
MAX_LEAF_DAYS = 397  # the browsers' limit on a server certificate's life
RENEW_WITHIN_DAYS = 30
BACKDATE = dt.timedelta(minutes=5)  # a node whose clock runs a little behind still accepts it

# One to 63 letters, digits or inner hyphens per label, at most 253 characters in all. No
# wildcard, no underscore, no trailing dot.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
DNS_NAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class CA:
    """The CA's key and certificate, as read from the admin state directory."""

    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate
    key_path: Path
    cert_path: Path

    @property
    def subject(self) -> str:
        return self.cert.subject.rfc4514_string()

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the certificate in colon hex, as browsers and `openssl x509 -fingerprint` show it."""
        return self.cert.fingerprint(hashes.SHA256()).hex(":").upper()

    @property
    def not_after(self) -> dt.datetime:
        return self.cert.not_valid_after_utc

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def load(home: Path) -> CA:
    """The CA in `home`; StateError, saying what to do, if it is missing or broken."""
    key_path, cert_path = home / CA_KEY, home / CA_CERT
    if not cert_path.exists():
        raise StateError(f"no labvm CA in {home}; create it with `labvm ca init`")
    if not key_path.exists():
        raise StateError(f"{key_path} is missing, so the CA cannot sign: restore it from backup, or remove "
                         f"{cert_path} and run `labvm ca init` for a new CA (members must import it again)")
    key, cert = _read_key(key_path), _read_cert(cert_path)
    if key.public_key() != cert.public_key():
        raise StateError(f"{key_path} is not the key of {cert_path}")
    return CA(key, cert, key_path, cert_path)


def init(home: Path, name: str | None = None) -> tuple[CA, bool]:
    """The CA in `home`, created if missing; True if this call created it.

    An existing key is never replaced. A key whose certificate is gone (an init cut short, or
    ca.pem removed) gets its certificate again: same subject and key, so what it signed stays
    trusted."""
    key_path, cert_path = home / CA_KEY, home / CA_CERT
    if cert_path.exists():
        return load(home), False
    ensure_private_dir(home)
    try:
        create_private(key_path, _key_pem(ec.generate_private_key(ec.SECP256R1())))
    except FileExistsError:
        pass  # kept: it may have signed certificates that members trust
    cert = _ca_cert(_read_key(key_path), name or socket.gethostname())
    atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return load(home), True


def _ca_cert(key: ec.EllipticCurvePrivateKey, name: str) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"labvm CA {name}"[:64])])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )


def issue(ca: CA, names: list[str], ips: list[str], days: int = LEAF_DAYS) -> tuple[bytes, bytes]:
    """A new key and server certificate (both PEM) for a node known by `names` and `ips`.

    Everything is checked before a key is made: a bad name, address or lifetime is BadInput."""
    dns, addresses = wanted_names(names, ips)
    if not 1 <= days <= MAX_LEAF_DAYS:
        raise BadInput(f"a node certificate lives 1 to {MAX_LEAF_DAYS} days (browsers refuse longer), not {days}")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    first = (dns or [str(a) for a in addresses])[0]
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first[:64])]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(min(now + dt.timedelta(days=days), ca.not_after))
        .add_extension(x509.SubjectAlternativeName([*map(x509.DNSName, dns), *map(x509.IPAddress, addresses)]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


DESKTOP_CERTS_DIR = "desktop-certs"  # in the admin home: USER.key (0600) and USER.pem of each desktop


@dataclass(frozen=True)
class Leaf:
    key_pem: bytes
    cert_pem: bytes
    reason: str | None  # why it was issued now; None: the one on file is still good


def leaf_due(ca: CA, directory: Path, stem: str, names: list[str], ips: list[str]) -> str | None:
    """Why directory/STEM.pem must be issued (again): there is none, its key is not the
    certificate's, or needs_renewal gives a reason; None while it is good."""
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
    if not (key_path.exists() and cert_path.exists()):
        return "there was none"
    require_private(key_path)
    key_pem, cert_pem = key_path.read_bytes(), cert_path.read_bytes()
    reason = needs_renewal(cert_pem, ca, names, ips)
    if reason is None and not _key_matches(key_pem, cert_pem):
        reason = "its key is not the certificate's"
    return reason


def ensure_leaf(ca: CA, directory: Path, stem: str, names: list[str], ips: list[str],
                days: int = LEAF_DAYS) -> Leaf:
    """The key and certificate kept as directory/STEM.key and STEM.pem, issued (again) when
    leaf_due gives a reason."""
    key_path, cert_path = directory / f"{stem}.key", directory / f"{stem}.pem"
    reason = leaf_due(ca, directory, stem, names, ips)
    if reason is None:
        return Leaf(key_path.read_bytes(), cert_path.read_bytes(), None)
    key_pem, cert_pem = issue(ca, names, ips, days)
    ensure_private_dir(directory)
    atomic_write(key_path, key_pem, 0o600)
    atomic_write(cert_path, cert_pem, 0o644)
    return Leaf(key_pem, cert_pem, reason)


def _key_matches(key_pem: bytes, cert_pem: bytes) -> bool:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        return key.public_key() == x509.load_pem_x509_certificate(cert_pem).public_key()
    except (ValueError, TypeError):
        return False


def needs_renewal(cert_pem: bytes, ca: CA, names: list[str], ips: list[str],
                  within_days: int = RENEW_WITHIN_DAYS) -> str | None:
    """Why a node's certificate must be issued again, or None while it is good for more than
    `within_days`, signed by this CA and names exactly `names` and `ips`."""
    dns, addresses = wanted_names(names, ips)
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        return "it is not a PEM certificate"
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return f"it was not signed by this labvm CA ({ca.subject})"
    left = cert.not_valid_after_utc - _now()
    if left <= dt.timedelta(days=within_days):
        when = cert.not_valid_after_utc.strftime("%Y-%m-%d")
        return f"it expired on {when}" if left <= dt.timedelta(0) else f"it expires on {when}, within {within_days} days"
    has = _san(cert)
    if has != (set(dns), set(addresses)):
        return f"it names {_listed(*has)}, not {_listed(set(dns), set(addresses))}"
    return None


def wanted_names(names: list[str], ips: list[str]) -> tuple[list[str], list[Address]]:
    """The DNS names (lowercased) and addresses a certificate is to hold, in order, once
    each; BadInput for the first that is not one, or for none at all."""
    dns: list[str] = []
    for name in names:
        lowered = name.lower() if isinstance(name, str) and name.isascii() else ""
        if not DNS_NAME_RE.fullmatch(lowered):
            raise BadInput(f"invalid host name {name!r} for a certificate: use letters, digits, '-' and '.' "
                           "(labels of 1 to 63, no '*', '_' or trailing '.')")
        if _address(lowered) is not None:
            raise BadInput(f"{name!r} is an IP address; give it as one, not as a host name")
        if lowered not in dns:
            dns.append(lowered)
    addresses: list[Address] = []
    for ip in ips:
        address = _address(ip)
        if address is None:
            raise BadInput(f"invalid IP address {ip!r} for a certificate")
        if address not in addresses:
            addresses.append(address)
    if not dns and not addresses:
        raise BadInput("a certificate needs at least one host name or IP address")
    return dns, addresses


def _address(text: str) -> Address | None:
    if not isinstance(text, str):  # ip_address would take a number too
        return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return None if getattr(address, "scope_id", None) else address


def _san(cert: x509.Certificate) -> tuple[set[str], set[Address]]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set(), set()
    return {n.lower() for n in san.get_values_for_type(x509.DNSName)}, set(san.get_values_for_type(x509.IPAddress))


def _listed(dns: set[str], addresses: set[Address]) -> str:
    return ", ".join([*sorted(dns), *sorted(map(str, addresses))]) or "nothing"


def _read_key(path: Path) -> ec.EllipticCurvePrivateKey:
    require_private(path)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (ValueError, TypeError):
        key = None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise StateError(f"{path} is not an unencrypted PEM EC private key")
    return key


def _read_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        raise StateError(f"{path} is not a PEM certificate") from None


def _key_usage(**uses: bool) -> x509.KeyUsage:
    names = ("digital_signature", "content_commitment", "key_encipherment", "data_encipherment", "key_agreement",
             "key_cert_sign", "crl_sign", "encipher_only", "decipher_only")
    return x509.KeyUsage(**{n: uses.get(n, False) for n in names})


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)

