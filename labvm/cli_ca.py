"""labvm ca: the certificate authority that signs the nodes' HTTPS certificates."""

from __future__ import annotations

from pathlib import Path

import click

from .admin import AdminHome
from .ca import CA
from .cli_kit import _emit_json, audited, dry_run_option, json_option, say
from .errors import BadInput, LabvmError
from .fsutil import atomic_write
from .text import safe


@click.group()
def ca():
    """labvm's own certificate authority, for the desktops' HTTPS.

    \b
    labvm ca init     create it (once; kept after that)
    labvm ca export   its certificate, for members to import into their browser
    labvm ca show     its subject, fingerprint, expiry and key file
    labvm ca renew    issue the due certificates of running desktops again

    It lives beside the cluster file: ca.key (secret, mode 0600) and ca.pem.
    """


@ca.command("init")
@click.pass_obj
@audited()
def ca_init(home: AdminHome):
    """Create the certificate authority, unless there is one.

    Its key is ECDSA P-256, its certificate valid for 10 years. Safe to run
    again: an existing CA is kept, so what members imported stays trusted.
    Prints the SHA-256 fingerprint, for members to compare.
    """
    authority, created = home.init_ca()
    if created:
        say(f"created the labvm CA: {authority.cert_path} (key {authority.key_path}, mode 0600)")
    else:
        say(f"the labvm CA exists already: {authority.cert_path}")
    _fingerprint_lines(authority)


@ca.command("export")
@click.argument("file", required=False, type=click.Path(dir_okay=False, writable=True, path_type=Path))
@click.pass_obj
def ca_export(home: AdminHome, file: Path | None):
    """Write the CA certificate (PEM) to FILE, or to standard output.

    Members import it once; their browsers then trust every desktop's HTTPS.
    They should compare its SHA-256 fingerprint with `labvm ca show` (or ask
    you) before they trust it.

    \b
    Chromium: chrome://settings/certificates, Authorities (or "Installed by
              you"), Import; trust it for identifying websites.
    Firefox:  about:preferences#privacy, View Certificates, Authorities,
              Import; tick "Trust this CA to identify websites".
    Debian, for curl, python and the like (browsers keep their own), as root:
      cp labvm-ca.pem /usr/local/share/ca-certificates/labvm-ca.crt
      update-ca-certificates
    """
    authority = home.ca()
    if file is None:
        click.echo(authority.pem().decode("ascii"), nl=False)
        return
    try:
        atomic_write(file, authority.pem(), 0o644)
    except OSError as exc:
        raise BadInput(f"cannot write {file}: {exc.strerror or exc}") from None
    say(f"wrote the labvm CA certificate to {file}")
    _fingerprint_lines(authority)


@ca.command("show")
@json_option
@click.pass_obj
def ca_show(home: AdminHome, as_json):
    """Show the CA's subject, SHA-256 fingerprint, expiry and key file."""
    authority = home.ca()
    if as_json:
        _emit_json({"subject": authority.subject, "fingerprint_sha256": authority.fingerprint,
                    "not_after": authority.not_after.isoformat(), "key_file": str(authority.key_path),
                    "certificate_file": str(authority.cert_path)})
        return
    first, second = _halves(authority.fingerprint)
    for label, value in (("subject", authority.subject), ("SHA-256", first), ("", second),
                         ("not after", authority.not_after.strftime("%Y-%m-%d %H:%M UTC")),
                         ("key file", str(authority.key_path)), ("certificate", str(authority.cert_path))):
        say(f"{label:12} {value}")


@ca.command("renew")
@dry_run_option
@json_option
@click.pass_obj
@audited()
def ca_renew(home: AdminHome, dry_run, as_json):
    """Issue again the HTTPS certificates of running desktops that are due.

    A desktop's certificate is due within 30 days of its end (it lives 90),
    when another CA signed it, or when it names other hosts than its node has
    now. Each due one is issued again and sent to its node, where the
    desktop's stunnel restarts with it; the desktop runs on, and open browser
    tabs reconnect. A stopped desktop gets its certificate at its next start.
    `labvm cron install` runs this daily.

    \b
    labvm ca renew --dry-run      which are due, and why
    labvm ca renew --json         what was done, as JSON
    """
    from .desktops import Desktops

    desktops = Desktops(home, say=lambda _m: None)
    with home.state() as db:
        due = desktops.certificates_due(db)
    results = []
    for user, node, reason in due:
        entry = {"user": user, "node": node, "reason": reason, "renewed": False, "error": None}
        if not dry_run:
            try:
                entry["renewed"] = desktops.renew_certificate(user)
            except LabvmError as exc:
                entry["error"] = str(exc)
        results.append(entry)
    if as_json:
        _emit_json({"dry_run": dry_run, "due": results})
    elif not results:
        say("no running desktop's certificate is due")
    for entry in [] if as_json else results:
        what = (f"{entry['user']} on {entry['node']}: due, {entry['reason']}" if dry_run else
                f"renewed {entry['user']}'s certificate on {entry['node']} ({entry['reason']})" if entry["renewed"] else
                f"{entry['user']} on {entry['node']}: not renewed: {entry['error']}")
        say(safe(what))
    if any(entry["error"] for entry in results):
        raise click.exceptions.Exit(1)


def _fingerprint_lines(authority: CA) -> None:
    """The fingerprint on two lines: in one, 95 characters would not fit 80 columns."""
    first, second = _halves(authority.fingerprint)
    say(f"SHA-256 fingerprint: {first}")
    say(f"                     {second}")


def _halves(fingerprint: str) -> tuple[str, str]:
    parts = fingerprint.split(":")
    return ":".join(parts[:16]) + ":", ":".join(parts[16:])


COMMANDS = (ca,)
