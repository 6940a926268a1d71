"""Certificates and SuperNode keys: formats Flower 1.42 accepts, permissions, no silent overwrite."""

from __future__ import annotations

import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
import typer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key
from flwr.cli.supernode.register import try_load_public_key
from typer.testing import CliRunner

from simulations.commands import deploy
from simulations.deploy.certs import CertsExistError, parse_merchants, write_certs, write_merchant_keys


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory):
    """One certificate set shared by the read-only tests."""
    return write_certs(tmp_path_factory.mktemp("certs"), ["shop-a", "shop-b"], hosts=["localhost", "coord.example"],
                       ips=["127.0.0.1", "10.1.2.3"])


def _cli() -> typer.Typer:
    app = typer.Typer()
    deploy.register(app)
    return app


def test_server_certificate_is_signed_by_ca_with_requested_sans(bundle) -> None:
    ca = x509.load_pem_x509_certificate(bundle.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(bundle.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost", "coord.example"]
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.1.2.3"]
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_private_keys_are_owner_only_and_public_files_readable(bundle) -> None:
    private = [bundle.ca_key, bundle.server_key, bundle.app_key] + [pair[0] for pair in bundle.merchant_keys.values()]
    for path in private:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    public = [bundle.ca_cert, bundle.server_cert, bundle.trusted_entities]
    for path in public + [pair[1] for pair in bundle.merchant_keys.values()]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path


def test_supernode_keys_use_the_openssh_ec_format_flower_reads(bundle) -> None:
    private_path, public_path = bundle.merchant_keys["shop-a"]
    private = load_ssh_private_key(private_path.read_bytes(), None)
    public = load_ssh_public_key(public_path.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and isinstance(public, ec.EllipticCurvePublicKey)
    assert private.public_key().public_numbers() == public.public_numbers()
    assert try_load_public_key(public_path)  # what `flwr supernode register` runs; exits on a bad key
    other = load_ssh_public_key(bundle.merchant_keys["shop-b"][1].read_bytes())
    assert other.public_numbers() != public.public_numbers()


def _serve_once(certfile: Path, keyfile: Path) -> tuple[int, threading.Thread]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(certfile, keyfile)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def accept() -> None:
        with listener:
            listener.settimeout(5)
            try:
                conn, _ = listener.accept()
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
            except (OSError, ssl.SSLError):
                pass

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    return port, thread


@pytest.mark.parametrize("server_name", ["127.0.0.1", "localhost"])
def test_tls_handshake_succeeds_only_with_the_ca(bundle, server_name: str) -> None:
    port, thread = _serve_once(bundle.server_cert, bundle.server_key)
    trusting = ssl.create_default_context(cafile=str(bundle.ca_cert))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with trusting.wrap_socket(raw, server_hostname=server_name) as tls:
            assert tls.version() is not None
            tls.sendall(b"x")
    thread.join(5)
    port, thread = _serve_once(bundle.server_cert, bundle.server_key)
    system_only = ssl.create_default_context()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            system_only.wrap_socket(raw, server_hostname=server_name)
    thread.join(5)


def test_app_signing_key_is_ed25519_and_its_public_part_is_what_supernodes_trust(bundle) -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from flwr.supernode.cli.flower_supernode import _try_obtain_trusted_entities, _validate_public_keys_ed25519

    from simulations.deploy.app_signing import key_id, load_signing_key

    key = load_signing_key(bundle.app_key)
    trusted = _try_obtain_trusted_entities(bundle.trusted_entities)  # what flower-supernode reads
    _validate_public_keys_ed25519(trusted)  # exits on a non-Ed25519 key
    assert list(trusted) == [key_id(key.public_key())]
    public = load_ssh_public_key(trusted[key_id(key.public_key())].encode())
    assert isinstance(public, ed25519.Ed25519PublicKey)
    assert public.public_bytes_raw() == key.public_key().public_bytes_raw()
    assert b"PRIVATE" not in bundle.trusted_entities.read_bytes()


def test_server_certificate_always_names_loopback_for_the_operator(tmp_path: Path) -> None:
    paths = write_certs(tmp_path, ["a"], hosts=["coord.example"], ips=["10.0.0.5"])
    server = x509.load_pem_x509_certificate(paths.server_cert.read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.0.0.5", "127.0.0.1"]


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    first = write_certs(tmp_path, ["a"])
    ca_before, app_before = first.ca_cert.read_bytes(), first.app_key.read_bytes()
    with pytest.raises(CertsExistError, match="ca.crt"):
        write_certs(tmp_path, ["a"])
    first.ca_cert.unlink()
    with pytest.raises(CertsExistError, match="app-signing.key"):
        write_certs(tmp_path, ["a"])
    assert first.app_key.read_bytes() == app_before and not first.ca_cert.exists()
    write_certs(tmp_path, ["a"], force=True)
    assert first.ca_cert.read_bytes() != ca_before and first.app_key.read_bytes() != app_before


def test_merchant_keys_only_rotates_a_key_and_keeps_the_ca(tmp_path: Path) -> None:
    paths = write_certs(tmp_path, ["a", "b"])
    ca, key_b = paths.ca_cert.read_bytes(), paths.merchant_keys["b"][1].read_bytes()
    old_a = paths.merchant_keys["a"][1].read_bytes()
    with pytest.raises(CertsExistError):
        write_merchant_keys(tmp_path, ["a"])
    write_merchant_keys(tmp_path, ["a"], force=True)
    write_merchant_keys(tmp_path, ["c"])
    assert paths.merchant_keys["a"][1].read_bytes() != old_a
    assert paths.ca_cert.read_bytes() == ca and paths.merchant_keys["b"][1].read_bytes() == key_b
    assert (tmp_path / "merchants" / "c.pub").exists()


def test_parse_merchants() -> None:
    assert parse_merchants("3") == ["merchant-1", "merchant-2", "merchant-3"]
    assert parse_merchants(" shop-a, shop_b ") == ["shop-a", "shop_b"]
    for bad in ("0", "a,a", "../etc", "a b", ","):
        with pytest.raises(ValueError, match="--merchants"):
            parse_merchants(bad)


def test_bad_ip_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--ip"):
        write_certs(tmp_path, ["a"], ips=["not-an-ip"])
    assert not (tmp_path / "ca.crt").exists()


def test_cli_certs_writes_then_refuses(tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "certs"
    first = runner.invoke(_cli(), ["certs", "--out", str(out), "--merchants", "2", "--host", "coord.local"])
    assert first.exit_code == 0, first.output
    assert (out / "merchants" / "merchant-2.pub").exists()
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["coord.local"]
    again = runner.invoke(_cli(), ["certs", "--out", str(out), "--merchants", "2"])
    assert again.exit_code == 1 and "refusing to overwrite" in again.output
