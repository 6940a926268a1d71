"""The coordinator's app-signing key: it signs every FAB it submits, merchants run only signed FABs.

flwr 1.42 has the verifier (`flower-supernode --trusted-entities`: Ed25519 keys, Flower's
``create_message_to_sign(sha256(FAB), signed_at)``), but its SuperLink attaches verification records only to
Flower Hub apps; a FAB submitted with `flwr run` reaches the SuperNode with none and is refused. So the
coordinator signs the FAB in Flower's format and sends the record in the run config (``app-signature``);
the merchant's SuperNode launcher moves it into the FAB's verifications, and Flower's own check verifies it.
Files (beside the certificates)::

    app-signing.key          Ed25519 private key, OpenSSH format, 0600 (coordinator only)
    trusted-entities.yaml    {key-id: public key}, what `flower-supernode --trusted-entities` reads (every merchant)
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from pathlib import Path

import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from shared.atomic import atomic_write_bytes

SIGNATURE_KEY = "app-signature"  # run-config key that carries the signature record
SIGNING_KEY_FILE = "app-signing.key"
TRUSTED_FILE = "trusted-entities.yaml"


class AppSignatureError(ValueError):
    """A signature record that cannot be read; the message names the problem and the fix."""


def key_id(public: ed25519.Ed25519PublicKey) -> str:
    """Stable ID of a signing key: what the trusted-entities file and the signature record name it by."""
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "fedshop-app-" + hashlib.sha256(raw).hexdigest()[:16]


def write_signing_key(out: str | Path, *, private_mode: int = 0o600, public_mode: int = 0o644) -> tuple[Path, Path]:
    """Create the Ed25519 app-signing key and the trusted-entities file merchants install; their paths."""
    out = Path(out)
    key = ed25519.Ed25519PrivateKey.generate()
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    atomic_write_bytes(out / SIGNING_KEY_FILE, private, mode=private_mode)
    text = yaml.safe_dump({key_id(key.public_key()): public.decode() + " fedshop-coordinator"})
    atomic_write_bytes(out / TRUSTED_FILE, text.encode(), mode=public_mode)
    return out / SIGNING_KEY_FILE, out / TRUSTED_FILE


def load_signing_key(path: str | Path) -> ed25519.Ed25519PrivateKey:
    """The coordinator's Ed25519 signing key, with a clear error when it is missing or of another type."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no app-signing key. Fix: create it with `fedshop certs --out DIR` "
                                "and start the coordinator with "
                                "--certs DIR")
    key = serialization.load_ssh_private_key(path.read_bytes(), None)
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path}: not an Ed25519 key (flower-supernode --trusted-entities accepts only Ed25519). "
                         "Fix: recreate it with `fedshop certs --force`")
    return key


def build_fab(app: str | Path) -> bytes:
    """The FAB bytes `flwr run APP` builds (Flower's own builder; deterministic: fixed zip dates)."""
    from flwr.cli.build import build_fab_from_disk

    return build_fab_from_disk(Path(app).resolve())


def sign_fab(fab: bytes, key: ed25519.Ed25519PrivateKey, *, signed_at: int | None = None) -> str:
    """The run-config value that lets merchants verify ``fab``: ``KEY-ID:SIGNED-AT:SIGNATURE``.

    Plain text without quotes or spaces, because `flwr run --run-config` cannot pass either inside a value.
    """
    from flwr.supercore.primitives.asymmetric_ed25519 import create_message_to_sign

    signed_at = int(time.time()) if signed_at is None else signed_at
    signature = key.sign(create_message_to_sign(hashlib.sha256(fab).digest(), signed_at))
    return f"{key_id(key.public_key())}:{signed_at}:{base64.urlsafe_b64encode(signature).decode().rstrip('=')}"


def verification_record(value: str) -> dict[str, str]:
    """Flower's FAB verification entries (as the SuperLink sets them for Hub apps) from an ``app-signature``."""
    parts = value.split(":")
    if len(parts) != 3 or not parts[1].isdigit() or not parts[0] or not parts[2]:
        raise AppSignatureError(f"run config {SIGNATURE_KEY}: unreadable signature record {value[:80]!r} "
                                "(expected KEY-ID:SIGNED-AT:SIGNATURE)")
    signer, signed_at, signature = parts
    return {signer: json.dumps({"signature": signature, "signed_at": int(signed_at)}), "valid_license": "Valid"}


def read_trusted(path: str | Path) -> dict[str, str]:
    """The trusted-entities file, checked the way flower-supernode will read it (raises naming the fix)."""
    path = Path(path)
    try:
        entries = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise FileNotFoundError(f"{path}: cannot read the trusted-entities file ({err}). Fix: copy "
                                f"{TRUSTED_FILE} from the coordinator's certs folder") from None
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{path}: no trusted keys in it. Fix: copy {TRUSTED_FILE} from the coordinator's certs "
                         "folder")
    for name, text in entries.items():
        key = serialization.load_ssh_public_key(str(text).encode())
        if not isinstance(key, ed25519.Ed25519PublicKey):
            raise ValueError(f"{path}: key {name} is not Ed25519. Fix: copy {TRUSTED_FILE} from the coordinator")
    return {str(k): str(v) for k, v in entries.items()}

