"""Certificates and SuperNode keys for a TLS deployment with authenticated SuperNodes.

Layout written under ``out``::

    ca.crt, ca.key                 certificate authority (ca.key stays with whoever issues certs)
    server.pem, server.key         the coordinator's SuperLink TLS certificate (SANs from options)
    merchants/<name>.key, .pub     one SuperNode authentication key pair per merchant
    app-signing.key                the coordinator's Ed25519 key that signs every app it submits (coordinator only)
    trusted-entities.yaml          its public part, for `fedshop merchant start --trusted-entities` (every merchant)

SuperNode keys follow flwr 1.42: NIST EC keys, the private key in OpenSSH format (read by
``flower-supernode --auth-supernode-private-key`` with ``load_ssh_private_key``) and the public key in
OpenSSH format (read by ``flwr supernode register`` with ``load_ssh_public_key``).
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared.atomic import atomic_write_bytes
from simulations.deploy.app_signing import SIGNING_KEY_FILE, TRUSTED_FILE, write_signing_key

PRIVATE_MODE = 0o600
PUBLIC_MODE = 0o644
CA_VALID_DAYS = 3650
SERVER_VALID_DAYS = 825  # below the 2-year ceiling many TLS clients enforce for leaf certificates
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class CertsExistError(FileExistsError):
    """Refusing to overwrite key material: the message lists the files and the fix."""


@dataclass
class CertPaths:
    """Where one `write_certs` call put each file."""

    out: Path
    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    merchant_keys: dict[str, tuple[Path, Path]] = field(default_factory=dict)  # name -> (private, public)
    app_key: Path | None = None  # Ed25519 app-signing key (coordinator only)
    trusted_entities: Path | None = None  # its public part, installed by every merchant

    @classmethod
    def under(cls, out: str | Path, merchants: list[str] | None = None) -> CertPaths:
        """The standard file layout below ``out`` for the given merchant names."""
        out = Path(out)
        keys = {m: (out / "merchants" / f"{m}.key", out / "merchants" / f"{m}.pub") for m in merchants or []}
        return cls(out, out / "ca.crt", out / "ca.key", out / "server.pem", out / "server.key", keys,
                   out / SIGNING_KEY_FILE, out / TRUSTED_FILE)


def parse_merchants(spec: str) -> list[str]:
    """Turn ``"3"`` into merchant-1..3 or ``"a,b,c"`` into those names, validating each."""
    spec = spec.strip()
    if spec.isdigit():
        count = int(spec)
        if count < 1:
            raise ValueError(f"--merchants {spec}: need at least one merchant. Fix: pass a count >= 1 or names")
        return [f"merchant-{i}" for i in range(1, count + 1)]
    names = [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if not _NAME_RE.match(n)]
    if not names or bad:
        raise ValueError(f"--merchants '{spec}': invalid name(s) {bad or '(none given)'}. Fix: use letters, "
                         "digits, '-', '_' or '.', comma-separated, e.g. --merchants shop-a,shop-b")
    if len(set(names)) != len(names):
        raise ValueError(f"--merchants '{spec}': duplicate names. Fix: give each merchant a distinct name")
    return names


def _ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP384R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _validity(days: int) -> tuple[dt.datetime, dt.datetime]:
    now = dt.datetime.now(dt.UTC)
    return now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)


def make_ca(common_name: str = "fedshop coordinator CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA key and certificate that signs the coordinator's server certificate."""
    key = _ec_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start, end = _validity(CA_VALID_DAYS)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA384())
    )
    return key, cert


def make_server_cert(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, *, hosts: list[str],
                     ips: list[str]) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A TLS server certificate for the SuperLink, valid for the given DNS names and IP addresses."""
    if not hosts and not ips:
        raise ValueError("server certificate needs at least one --host or --ip. Fix: pass e.g. --ip 127.0.0.1")
    try:
        ip_sans = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    except ValueError as err:
        raise ValueError(f"--ip: {err}. Fix: pass literal addresses such as 127.0.0.1 or 10.0.0.5") from err
    key = _ec_key()
    start, end = _validity(SERVER_VALID_DAYS)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, (hosts or ips)[0])])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(h) for h in hosts] + ip_sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def make_supernode_keypair(comment: str = "") -> tuple[bytes, bytes]:
    """A SuperNode authentication key pair as (OpenSSH private key, OpenSSH public key line)."""
    key = _ec_key()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + (f" {comment}".encode() if comment else b"") + b"\n"


def key_fingerprint(path: str | Path) -> str:
    """``SHA256:...`` of a SuperNode key (OpenSSH private ``.key`` or public ``.pub``), as `ssh-keygen -l` prints it.

    The merchant's status shows it for its private key and the coordinator's for the registered public
    key, so an operator can tell whether the two belong together without moving any key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise FileNotFoundError(f"{path}: cannot read the key ({err.strerror}). Fix: pass the merchant's .key/.pub "
                                "from `fedshop certs`") from None
    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            public = serialization.load_ssh_private_key(data, password=None).public_key()
        else:
            public = serialization.load_ssh_public_key(data.strip())
    except (ValueError, TypeError, UnsupportedAlgorithm) as err:
        raise ValueError(f"{path}: not an OpenSSH key ({err}). Fix: pass the merchant's .key/.pub from "
                         "`fedshop certs`") from None
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    digest = hashlib.sha256(base64.b64decode(line.split()[1])).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


def _refuse_overwrite(paths: list[Path], force: bool) -> None:
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        raise CertsExistError(f"refusing to overwrite existing key material: {', '.join(existing)}. Fix: choose "
                              "another --out folder, or pass --force to replace them (registered SuperNode keys "
                              "and the CA that merchants trust will then change)")


def write_merchant_keys(out: str | Path, merchants: list[str], *, force: bool = False) -> CertPaths:
    """Write one SuperNode key pair per merchant (new merchants, or rotation with ``force``)."""
    paths = CertPaths.under(out, merchants)
    _refuse_overwrite([p for pair in paths.merchant_keys.values() for p in pair], force)
    for name, (private_path, public_path) in paths.merchant_keys.items():
        private, public = make_supernode_keypair(comment=f"fedshop-{name}")
        atomic_write_bytes(private_path, private, mode=PRIVATE_MODE)
        atomic_write_bytes(public_path, public, mode=PUBLIC_MODE)
    return paths


def write_certs(out: str | Path, merchants: list[str], *, hosts: list[str] | None = None,
                ips: list[str] | None = None, force: bool = False) -> CertPaths:
    """Write a CA, the coordinator's server certificate and key, its app-signing key, and merchant key pairs.

    The server certificate always names 127.0.0.1: the operator's `flwr` reaches the Control API over loopback.
    """
    hosts = ["localhost"] if hosts is None else hosts
    ips = ["127.0.0.1"] if ips is None else ips
    if "127.0.0.1" not in ips:
        ips = [*ips, "127.0.0.1"]
    paths = CertPaths.under(out, merchants)
    _refuse_overwrite([paths.ca_cert, paths.ca_key, paths.server_cert, paths.server_key, paths.app_key,
                       paths.trusted_entities]
                      + [p for pair in paths.merchant_keys.values() for p in pair], force)
    ca_key, ca_cert = make_ca()
    server_key, server_cert = make_server_cert(ca_key, ca_cert, hosts=hosts, ips=ips)
    pem = serialization.Encoding.PEM
    atomic_write_bytes(paths.ca_key, _pem_key(ca_key), mode=PRIVATE_MODE)
    atomic_write_bytes(paths.ca_cert, ca_cert.public_bytes(pem), mode=PUBLIC_MODE)
    atomic_write_bytes(paths.server_key, _pem_key(server_key), mode=PRIVATE_MODE)
    atomic_write_bytes(paths.server_cert, server_cert.public_bytes(pem), mode=PUBLIC_MODE)
    write_signing_key(out, private_mode=PRIVATE_MODE, public_mode=PUBLIC_MODE)
    write_merchant_keys(out, merchants, force=True)  # overwrite was already checked above
    return paths
