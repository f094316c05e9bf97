"""labvm's certificate authority: what it signs is what a browser (and openssl) accepts, its key
stays private, and the CLI around it."""

import datetime as dt
import ipaddress
import json
import os
import shutil
import stat
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from labvm import ca
from labvm.cli import main
from labvm.errors import BadInput, StateError

NAMES = ["gpu1.lab.example", "gpu1"]
IPS = ["10.213.0.11", "fd00::11"]


@pytest.fixture
def authority(tmp_path):
    made, created = ca.init(tmp_path / "admin", "testlab")
    assert created
    return made


def leaf(authority, names=NAMES, ips=IPS, days=ca.LEAF_DAYS):
    key_pem, cert_pem = ca.issue(authority, names, ips, days)
    return key_pem, x509.load_pem_x509_certificate(cert_pem)


def ext(cert, kind):
    return cert.extensions.get_extension_for_class(kind)


def test_the_ca_certificate_is_a_p256_ca_for_ten_years(authority):
    cert = authority.cert
    assert cert.subject.rfc4514_string() == "CN=labvm CA testlab" == cert.issuer.rfc4514_string()
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca and constraints.value.path_length == 0
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign and not usage.value.digital_signature
    ski = ext(cert, x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    cert.verify_directly_issued_by(cert)
    life = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert dt.timedelta(days=3650) <= life <= dt.timedelta(days=3653)
    assert authority.fingerprint == cert.fingerprint(hashes.SHA256()).hex(":").upper() and len(authority.fingerprint) == 95


def test_a_node_certificate_verifies_against_the_ca_as_a_browser_checks_it(authority):
    _key, cert = leaf(authority)
    store = Store([authority.cert])
    for subject in [x509.DNSName("gpu1.lab.example"), x509.DNSName("gpu1"),
                    x509.IPAddress(ipaddress.ip_address("10.213.0.11")), x509.IPAddress(ipaddress.ip_address("fd00::11"))]:
        chain = PolicyBuilder().store(store).build_server_verifier(subject).verify(cert, [])
        assert chain[-1] == authority.cert
    with pytest.raises(VerificationError, match="no matching subjectAltName"):
        PolicyBuilder().store(store).build_server_verifier(x509.DNSName("gpu2")).verify(cert, [])


def test_openssl_verifies_a_node_certificate_for_its_names_and_addresses(authority, tmp_path):
    openssl = shutil.which("openssl")
    assert openssl, "openssl is needed for this test: apt-get install openssl"
    key_pem, cert_pem = ca.issue(authority, NAMES, IPS)
    (tmp_path / "leaf.pem").write_bytes(cert_pem)
    base = [openssl, "verify", "-CAfile", str(authority.cert_path), "-purpose", "sslserver"]
    for check in (["-verify_hostname", "gpu1.lab.example"], ["-verify_ip", "10.213.0.11"], ["-verify_ip", "fd00::11"]):
        result = subprocess.run([*base, *check, str(tmp_path / "leaf.pem")], capture_output=True, text=True, timeout=30)
        assert result.returncode == 0 and result.stdout.strip().endswith(": OK"), (check, result.stdout, result.stderr)
    result = subprocess.run([*base, "-verify_hostname", "gpu2", str(tmp_path / "leaf.pem")], capture_output=True, text=True,
                            timeout=30)
    assert result.returncode != 0
    key = serialization.load_pem_private_key(key_pem, password=None)
    assert key.public_key() == x509.load_pem_x509_certificate(cert_pem).public_key()


def test_a_node_certificate_is_a_server_leaf_of_ninety_days(authority):
    before = dt.datetime.now(dt.timezone.utc)
    _key, cert = leaf(authority)
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical and not constraints.value.ca
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical and usage.value.digital_signature and not usage.value.key_cert_sign and not usage.value.key_encipherment
    assert list(ext(cert, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    assert ext(cert, x509.AuthorityKeyIdentifier).value.key_identifier == ext(authority.cert, x509.SubjectKeyIdentifier).value.digest
    assert dt.timedelta(minutes=1) <= before - cert.not_valid_before_utc <= dt.timedelta(minutes=10)
    assert dt.timedelta(days=89) < cert.not_valid_after_utc - before <= dt.timedelta(days=90)
    assert cert.issuer == authority.cert.subject
    assert leaf(authority)[1].serial_number != cert.serial_number


def test_the_san_holds_exactly_the_names_and_addresses_asked(authority):
    _key, cert = leaf(authority, ["GPU1.Lab.example", "gpu1", "gpu1.lab.example"], ["10.213.0.11", "fd00:0::11", "10.213.0.11"])
    san = ext(cert, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["gpu1.lab.example", "gpu1"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.213.0.11"), ipaddress.ip_address("fd00::11")]
    assert len(list(san)) == 4
    _key, only_ip = leaf(authority, [], ["192.0.2.7"])
    assert [str(n.value) for n in ext(only_ip, x509.SubjectAlternativeName).value] == ["192.0.2.7"]


def test_lifetimes_past_the_browsers_limit_are_refused(authority):
    assert leaf(authority, days=397)[1].not_valid_after_utc - dt.datetime.now(dt.timezone.utc) > dt.timedelta(days=396)
    for days in (0, -1, 398, 3650):
        with pytest.raises(BadInput, match="1 to 397 days"):
            ca.issue(authority, NAMES, IPS, days)


@pytest.mark.parametrize("names, ips, message", [
    (["*.lab.example"], [], "invalid host name"),
    (["under_score"], [], "invalid host name"),
    (["trailing.dot."], [], "invalid host name"),
    (["-lead"], [], "invalid host name"),
    (["a..b"], [], "invalid host name"),
    (["x" * 64], [], "invalid host name"),
    (["a." * 126 + "bc"], [], "invalid host name"),
    (["host name"], [], "invalid host name"),
    (["gpu1\n"], [], "invalid host name"),
    (["héllo"], [], "invalid host name"),
    (["\u212aelvin"], [], "invalid host name"),  # KELVIN SIGN, which lower() would make a 'k'
    ([""], [], "invalid host name"),
    (["10.0.0.1"], [], "is an IP address"),
    ([], ["10.0.0.256"], "invalid IP address"),
    ([], ["gpu1"], "invalid IP address"),
    ([], ["fe80::1%eth0"], "invalid IP address"),
    ([], ["010.0.0.1"], "invalid IP address"),
    ([], ["10.0.0.0/24"], "invalid IP address"),
    ([], [167772161], "invalid IP address"),
    (["gpu1"], ["10.0.0.1", " 10.0.0.2"], "invalid IP address"),
    ([], [], "at least one host name or IP address"),
])
def test_bad_names_and_addresses_are_refused_before_anything_is_made(authority, monkeypatch, names, ips, message):
    before = sorted(os.listdir(authority.key_path.parent))
    monkeypatch.setattr(ec, "generate_private_key", lambda *_: pytest.fail("a key was made for a refused request"))
    with pytest.raises(BadInput, match=message):
        ca.issue(authority, names, ips)
    with pytest.raises(BadInput, match=message):
        ca.needs_renewal(b"", authority, names, ips)
    assert sorted(os.listdir(authority.key_path.parent)) == before


def test_the_key_file_is_0600_from_its_first_byte_even_under_a_loose_umask(tmp_path, monkeypatch):
    home = tmp_path / "admin"
    opened, linked = [], []
    real_open, real_link = os.open, os.link

    def watch_open(path, flags, mode=0o777, *args, **kwargs):
        if flags & os.O_CREAT:
            opened.append((os.path.basename(path), flags, mode))
        return real_open(path, flags, mode, *args, **kwargs)

    def watch_link(src, dst, *args, **kwargs):
        linked.append((os.path.basename(dst), stat.S_IMODE(os.stat(src).st_mode)))
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "open", watch_open)
    monkeypatch.setattr(os, "link", watch_link)
    old = os.umask(0)
    try:
        made, _ = ca.init(home, "testlab")
    finally:
        os.umask(old)
    key_opens = [(flags, mode) for name, flags, mode in opened if "ca.key" in name]
    assert key_opens and all(flags & os.O_EXCL and mode == 0o600 for flags, mode in key_opens), opened
    assert linked == [("ca.key", 0o600)]
    assert stat.S_IMODE(os.stat(made.key_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(made.cert_path).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(home).st_mode) == 0o700
    assert sorted(os.listdir(home)) == ["ca.key", "ca.pem"]  # no temp file left behind
    assert b"PRIVATE KEY" not in made.cert_path.read_bytes()


def test_init_again_keeps_the_same_ca(authority):
    again, created = ca.init(authority.key_path.parent, "other")
    assert not created
    assert again.fingerprint == authority.fingerprint and again.subject == "CN=labvm CA testlab"


def test_a_key_whose_certificate_is_gone_gets_it_again_and_still_verifies_old_leaves(authority):
    _key, old_leaf = leaf(authority)
    key_before = authority.key_path.read_bytes()
    authority.cert_path.unlink()
    again, created = ca.init(authority.key_path.parent, "testlab")
    assert created and authority.key_path.read_bytes() == key_before
    old_leaf.verify_directly_issued_by(again.cert)
    assert ca.needs_renewal(old_leaf.public_bytes(serialization.Encoding.PEM), again, NAMES, IPS) is None


def test_a_certificate_without_its_key_or_with_another_key_is_refused(authority, tmp_path):
    other, _ = ca.init(tmp_path / "other", "other")
    home = authority.key_path.parent
    authority.key_path.write_bytes(other.key_path.read_bytes())
    with pytest.raises(StateError, match="is not the key of"):
        ca.load(home)
    authority.key_path.unlink()
    with pytest.raises(StateError, match="cannot sign: restore it from backup"):
        ca.init(home)
    with pytest.raises(StateError, match="labvm ca init"):
        ca.load(tmp_path / "nowhere")


def test_needs_renewal_says_why(authority, tmp_path):
    fresh = ca.issue(authority, NAMES, IPS)[1]
    assert ca.needs_renewal(fresh, authority, NAMES, IPS) is None
    assert ca.needs_renewal(fresh, authority, ["GPU1", "gpu1.lab.example"], list(reversed(IPS))) is None

    expiring = ca.issue(authority, NAMES, IPS, days=20)[1]
    reason = ca.needs_renewal(expiring, authority, NAMES, IPS)
    assert reason and reason.startswith("it expires on ") and "within 30 days" in reason
    assert ca.needs_renewal(expiring, authority, NAMES, IPS, within_days=10) is None

    other, _ = ca.init(tmp_path / "other", "testlab")  # the same subject: only the signature tells
    foreign = ca.issue(other, NAMES, IPS)[1]
    with pytest.raises(VerificationError):
        PolicyBuilder().store(Store([authority.cert])).build_server_verifier(x509.DNSName("gpu1")).verify(
            x509.load_pem_x509_certificate(foreign), [])
    assert ca.needs_renewal(foreign, authority, NAMES, IPS) == "it was not signed by this labvm CA (CN=labvm CA testlab)"

    assert ca.needs_renewal(fresh, authority, ["gpu1"], IPS) == (
        "it names gpu1, gpu1.lab.example, 10.213.0.11, fd00::11, not gpu1, 10.213.0.11, fd00::11")
    assert "not gpu1, gpu1.lab.example, 10.213.0.12" in ca.needs_renewal(fresh, authority, NAMES, ["10.213.0.12"])
    assert ca.needs_renewal(b"garbage", authority, NAMES, IPS) == "it is not a PEM certificate"


def test_an_expired_certificate_says_when_it_expired(authority):
    now = dt.datetime.now(dt.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(authority.cert.subject).issuer_name(authority.cert.subject)
            .public_key(key.public_key()).serial_number(1)
            .not_valid_before(now - dt.timedelta(days=100)).not_valid_after(now - dt.timedelta(days=10))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("gpu1")]), critical=False)
            .sign(authority.key, hashes.SHA256()))
    reason = ca.needs_renewal(cert.public_bytes(serialization.Encoding.PEM), authority, ["gpu1"], [])
    assert reason == f"it expired on {(now - dt.timedelta(days=10)):%Y-%m-%d}"


# -- the CLI -------------------------------------------------------------------
@pytest.fixture
def home(tmp_path, monkeypatch):
    config = tmp_path / "admin" / "bkConfxml.xml"
    monkeypatch.setenv("LABVM_CONFIG", str(config))
    assert main(["init"]) == 0
    return config.parent


def fits(text: str, *paths) -> bool:
    """Every line within 80 columns, once the test's long temp paths read as /etc/labvm does."""
    for path in paths:
        text = text.replace(str(path), "/etc/labvm")
    return all(len(line) <= 80 for line in text.splitlines())


@pytest.mark.parametrize("argv", [["ca", "show"], ["ca", "show", "--json"], ["ca", "export"]])
def test_without_a_ca_the_commands_say_to_run_ca_init(home, capsys, argv):
    capsys.readouterr()
    assert main(argv) == 6
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"labvm: error: no labvm CA in {home}; create it with `labvm ca init`\n"


def test_ca_init_creates_once_and_then_keeps_it(home, capsys):
    capsys.readouterr()
    assert main(["ca", "init"]) == 0
    first = capsys.readouterr().out
    assert first.startswith(f"created the labvm CA: {home / 'ca.pem'} (key {home / 'ca.key'}, mode 0600)\n")
    assert main(["ca", "init"]) == 0
    second = capsys.readouterr().out
    assert second.startswith(f"the labvm CA exists already: {home / 'ca.pem'}\n")
    fingerprint = ca.load(home).fingerprint
    for out in (first, second):
        assert fits(out, home) and "SHA-256 fingerprint: " in out
        assert "".join(out.split("SHA-256 fingerprint:")[1].split()) == fingerprint
    assert os.stat(home / "ca.key").st_mode & 0o777 == 0o600


def test_ca_show_in_text_and_json(home, capsys):
    main(["ca", "init"])
    authority = ca.load(home)
    capsys.readouterr()
    assert main(["ca", "show", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown == {"subject": authority.subject, "fingerprint_sha256": authority.fingerprint,
                     "not_after": authority.not_after.isoformat(), "key_file": str(home / "ca.key"),
                     "certificate_file": str(home / "ca.pem")}
    assert main(["ca", "show"]) == 0
    text = capsys.readouterr().out
    assert fits(text, home)
    assert f"subject      {authority.subject}\n" in text and f"key file     {home / 'ca.key'}\n" in text
    assert f"not after    {authority.not_after:%Y-%m-%d %H:%M} UTC\n" in text
    assert authority.fingerprint[:48] in text and authority.fingerprint[48:] in text


def test_ca_export_to_stdout_and_to_a_file(home, capsys, tmp_path):
    main(["ca", "init"])
    capsys.readouterr()
    assert main(["ca", "export"]) == 0
    assert capsys.readouterr().out.encode() == (home / "ca.pem").read_bytes()
    assert main(["ca", "export", str(tmp_path / "labvm-ca.pem")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"wrote the labvm CA certificate to {tmp_path / 'labvm-ca.pem'}\n") and fits(out, tmp_path)
    assert (tmp_path / "labvm-ca.pem").read_bytes() == (home / "ca.pem").read_bytes()
    assert os.stat(tmp_path / "labvm-ca.pem").st_mode & 0o777 == 0o644
    assert main(["ca", "export", str(tmp_path)]) == 2
    assert main(["ca", "export", str(tmp_path / "no" / "such" / "dir.pem")]) == 2
    assert capsys.readouterr().err.endswith(f"labvm: error: cannot write {tmp_path / 'no' / 'such' / 'dir.pem'}: "
                                            "No such file or directory\n")


def test_the_private_key_never_shows(home, capsys):
    main(["ca", "init"])
    for argv in (["ca", "init"], ["ca", "show"], ["ca", "show", "--json"], ["ca", "export"], ["log", "--json"]):
        assert main(argv) == 0
    captured = capsys.readouterr()
    key_pem = (home / "ca.key").read_bytes().decode()
    body = "".join(key_pem.splitlines()[1:-1])
    for text in (captured.out, captured.err, (home / "audit.log").read_text()):
        assert "PRIVATE KEY" not in text and body[:40] not in text.replace("\n", "")


def test_an_unsafe_ca_key_is_refused_naming_the_fix(home, capsys):
    main(["ca", "init"])
    os.chmod(home / "ca.key", 0o640)
    capsys.readouterr()
    for argv in (["ca", "show"], ["ca", "export"], ["ca", "init"]):
        assert main(argv) == 6
        assert capsys.readouterr().err == (f"labvm: error: {home / 'ca.key'} is readable or writable by others "
                                           f"(mode 0640); run: chmod 600 {home / 'ca.key'}\n")


def test_ca_init_is_audited_and_show_and_export_are_not(home, capsys):
    for argv in (["ca", "show"], ["ca", "init"], ["ca", "init"], ["ca", "show"], ["ca", "export"]):
        main(argv)
    capsys.readouterr()
    assert main(["log", "--json"]) == 0
    assert [(e["command"], e["result"]) for e in json.loads(capsys.readouterr().out)] == [
        ("labvm init", "ok"), ("labvm ca init", "ok"), ("labvm ca init", "ok")]


@pytest.mark.parametrize("argv", [["ca"], ["ca", "init"], ["ca", "export"], ["ca", "show"]])
def test_the_help_fits_80_columns_and_export_says_how_to_trust_it(argv, capsys):
    assert main([*argv, "--help"]) == 0
    text = capsys.readouterr().out
    assert fits(text)
    if argv[-1] == "export":
        for words in ("chrome://settings/certificates", "Firefox", "update-ca-certificates", "/usr/local/share/ca-certificates/",
                      "labvm ca show"):
            assert words in text


def test_a_private_file_is_never_clobbered_and_leaves_no_temp_file(tmp_path):
    from labvm.fsutil import create_private

    create_private(tmp_path / "k", b"first")
    with pytest.raises(FileExistsError):
        create_private(tmp_path / "k", b"second")
    assert (tmp_path / "k").read_bytes() == b"first" and os.listdir(tmp_path) == ["k"]


# --- a desktop's certificate, kept in the admin home and renewed at start ------------------


def test_ensure_leaf_issues_once_then_keeps_it(authority, tmp_path):
    where = tmp_path / "admin" / ca.DESKTOP_CERTS_DIR
    first = ca.ensure_leaf(authority, where, "dora", [], ["10.213.0.11"])
    assert first.reason == "there was none"
    assert stat.S_IMODE(os.stat(where / "dora.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(where).st_mode) == 0o700
    again = ca.ensure_leaf(authority, where, "dora", [], ["10.213.0.11"])
    assert again.reason is None and again.cert_pem == first.cert_pem and again.key_pem == first.key_pem


def test_ensure_leaf_renews_for_another_host_a_near_expiry_another_ca_or_a_foreign_key(authority, tmp_path):
    where = tmp_path / "certs"
    ca.ensure_leaf(authority, where, "dora", [], ["10.213.0.11"])
    moved = ca.ensure_leaf(authority, where, "dora", ["gpu2.lab.example"], [])
    assert moved.reason and "not gpu2.lab.example" in moved.reason
    assert x509.load_pem_x509_certificate(moved.cert_pem).subject.rfc4514_string() == "CN=gpu2.lab.example"
    short = ca.ensure_leaf(authority, tmp_path / "short", "dora", [], ["10.213.0.11"], days=10)
    assert short.reason == "there was none"
    renewed = ca.ensure_leaf(authority, tmp_path / "short", "dora", [], ["10.213.0.11"])
    assert renewed.reason and "within 30 days" in renewed.reason and renewed.cert_pem != short.cert_pem
    other, _ = ca.init(tmp_path / "other", "elsewhere")
    assert "not signed by this labvm CA" in ca.ensure_leaf(other, where, "dora", ["gpu2.lab.example"], []).reason
    (where / "dora.key").write_bytes(ca.issue(other, [], ["10.0.0.1"])[0])
    assert ca.ensure_leaf(other, where, "dora", ["gpu2.lab.example"], []).reason == "its key is not the certificate's"
