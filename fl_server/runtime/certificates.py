"""TLS certificates for a Flower deployment, generated at run time.

Flower's SuperLink serves its Fleet, Control and Runtime APIs over one HTTPS
port; SuperNodes, the ``flwr`` CLI and the ServerApp process verify it against
a root CA certificate. For a run on this machine we make a throw-away CA and a
server certificate signed by it, valid for the loopback names, in a git-ignored
folder: nothing secret is ever committed, and every run gets fresh keys.

For real machines, make the server certificate for the SuperLink's public name
or address (``hosts``) and copy only ``ca.crt`` to the SuperNodes.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Certificates:
    """Paths of a CA certificate and of a server certificate + key it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    def superlink_args(self) -> list[str]:
        """``flower-superlink`` flags that switch TLS on with these files."""
        return [
            "--ssl-ca-certfile", str(self.ca_cert),
            "--ssl-certfile", str(self.server_cert),
            "--ssl-keyfile", str(self.server_key),
        ]


def _name(common_name: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedcontinuum (generated at run time)"),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _subject_alt_names(hosts: tuple[str, ...]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:  # not an IP: a DNS name
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def _write_key(key: ec.EllipticCurvePrivateKey, path: Path) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def generate_certificates(
    dest: Path, hosts: tuple[str, ...] = LOOPBACK_HOSTS, valid_days: int = 2
) -> Certificates:
    """Create a CA and a server certificate for ``hosts`` in ``dest``.

    Parameters
    ----------
    dest : Path
        Folder for ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key``
        (created; keys are readable by the owner only).
    hosts : tuple of str
        IP addresses and DNS names the SuperLink is reached at; each becomes a
        subject alternative name (TLS clients check the address against them).
    valid_days : int
        Validity; short by default since the files are made per run.

    Returns
    -------
    Certificates
        The paths, ready for :meth:`Certificates.superlink_args`.
    """
    dest.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedcontinuum run-time CA"))
        .issuer_name(_name("fedcontinuum run-time CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                key_encipherment=False, data_encipherment=False, key_agreement=False,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(_subject_alt_names(hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    paths = Certificates(dest / "ca.crt", dest / "server.pem", dest / "server.key")
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_key(ca_key, dest / "ca.key")
    _write_key(server_key, paths.server_key)
    return paths


def main(argv: list[str] | None = None) -> int:
    """``python -m fl_server.runtime.certificates DEST HOST [HOST ...]``: certificates for real machines."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m fl_server.runtime.certificates",
        description="Make a CA and a SuperLink server certificate (copy only ca.crt to the SuperNodes).",
    )
    parser.add_argument("dest", type=Path, help="output folder (keep it out of git)")
    parser.add_argument("hosts", nargs="+", help="the SuperLink's IP addresses / DNS names")
    parser.add_argument("--valid-days", type=int, default=30)
    args = parser.parse_args(argv)
    certs = generate_certificates(args.dest, tuple(args.hosts), args.valid_days)
    print(f"CA certificate:      {certs.ca_cert}\nserver certificate:  {certs.server_cert}\n"
          f"server key:          {certs.server_key}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
