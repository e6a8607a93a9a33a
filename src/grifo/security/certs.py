"""`grifo certs`: a local certificate authority for TLS between clients, gateways and points.

`grifo certs init DIR` makes the CA (`ca.pem`, `ca.key`; ECDSA P-256, ten years);
`grifo certs issue DIR NAME --host H ...` makes `NAME.pem` and `NAME.key` signed by it, for a
server (its host names and IP addresses as subject alternative names) or, with `--client`, for
a client such as a gateway that points require a certificate from (mutual TLS). Keys are written
readable by their owner only. For production, certificates from your own PKI work the same way.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported when used: the gateway's start-up does not need x509
    from cryptography.hazmat.primitives.asymmetric import ec


def init_ca(directory: Path, name: str = "grifo local CA") -> Path:
    """Create `ca.pem` and `ca.key` in `directory` (refuses to overwrite an existing CA)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "ca.pem", directory / "ca.key"
    if cert_path.exists() or key_path.exists():
        raise FileExistsError(f"{directory} already holds a CA; issue certificates with it")
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path


def issue(
    directory: Path,
    name: str,
    hosts: list[str],
    *,
    client: bool = False,
    days: int = 397,
) -> tuple[Path, Path]:
    """`NAME.pem` and `NAME.key` signed by the CA in `directory`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    names: list[x509.GeneralName] = []
    for host in hosts or ([] if client else ["localhost", "127.0.0.1"]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    key_path, cert_path = directory / f"{name}.key", directory / f"{name}.pem"
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    from cryptography.hazmat.primitives import serialization

    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    certs = sub.add_parser(
        "certs", help="a local CA and certificates for TLS and mutual TLS (see README, TLS)"
    )
    actions = certs.add_subparsers(dest="certs_command", required=True)
    init = actions.add_parser("init", help="create the CA: DIR/ca.pem and DIR/ca.key")
    init.add_argument("dir", type=Path)
    make = actions.add_parser("issue", help="a certificate signed by the CA in DIR")
    make.add_argument("dir", type=Path)
    make.add_argument("name", help="the certificate's name: DIR/NAME.pem and DIR/NAME.key")
    make.add_argument(
        "--host", action="append", default=[], help="a host name or IP it serves (repeat)"
    )
    make.add_argument("--client", action="store_true", help="a client certificate (mTLS)")
    make.add_argument("--days", type=int, default=397)


def run(args: argparse.Namespace) -> int:
    if args.certs_command == "init":
        try:
            print(init_ca(args.dir))
        except FileExistsError as exc:
            print(f"grifo: {exc}", file=sys.stderr)
            return 1
        return 0
    cert, key = issue(args.dir, args.name, args.host, client=args.client, days=args.days)
    print(f"{cert}\n{key}")
    return 0
