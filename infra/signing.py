"""Ed25519 signing of bundle manifests.

The manifest lists every file of a bundle with its SHA-256, so one signature over the
manifest bytes vouches for the whole bundle. The publisher holds the private key; devices
hold only the public key. Keys are PEM files (PKCS#8 private, SubjectPublicKeyInfo public)
so standard tools (`openssl pkey -in KEY -text`) can read them.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from infra.errors import BundleVerificationError

__all__ = [
    "BundleVerificationError",
    "KeyPair",
    "generate_keypair",
    "key_id",
    "load_private_key",
    "load_public_key",
    "sign",
    "verify",
]

PRIVATE_KEY_NAME = "bundle-signing.key"
PUBLIC_KEY_NAME = "bundle-signing.pub"


@dataclass(frozen=True)
class KeyPair:
    """Where `generate_keypair` wrote the two PEM files, and the public key's short id."""

    private_key: Path
    public_key: Path
    key_id: str


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short stable id (16 hex chars of SHA-256 of the raw key) to tell keys apart in messages."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def generate_keypair(directory: str | Path) -> KeyPair:
    """Create a new Ed25519 key pair in `directory`; the private key file is mode 0600.

    Refuses to overwrite existing keys: replacing a signing key silently would make every
    device that holds the old public key reject new bundles.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    private_path = directory / PRIVATE_KEY_NAME
    public_path = directory / PUBLIC_KEY_NAME
    for path in (private_path, public_path):
        if path.exists():
            raise FileExistsError(
                f"{path} already exists; refusing to overwrite a signing key. "
                "Use another directory, or delete the old keys if you really mean to rotate them."
            )
    private = Ed25519PrivateKey.generate()
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # O_EXCL + mode 0600 at creation: the private key is never readable by others, not even briefly.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return KeyPair(private_path, public_path, key_id(private.public_key()))


def load_private_key(source: str | Path | Ed25519PrivateKey) -> Ed25519PrivateKey:
    """Load a PEM private key (or pass an already loaded key through)."""
    if isinstance(source, Ed25519PrivateKey):
        return source
    path = Path(source)
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"private key {path} not found; create one with `legodnn keys init DIR`"
        ) from None
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path} is not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 key; use `legodnn keys init`")
    return key


def load_public_key(source: str | Path | Ed25519PublicKey) -> Ed25519PublicKey:
    """Load a PEM public key (or pass an already loaded key through)."""
    if isinstance(source, Ed25519PublicKey):
        return source
    path = Path(source)
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"public key {path} not found; copy {PUBLIC_KEY_NAME} from the publisher's key directory"
        ) from None
    except ValueError as e:
        raise ValueError(f"{path} is not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} holds a {type(key).__name__}, not an Ed25519 public key")
    return key


def sign(manifest_bytes: bytes, private_key: str | Path | Ed25519PrivateKey) -> bytes:
    """The 64-byte Ed25519 signature of exactly these bytes."""
    return load_private_key(private_key).sign(manifest_bytes)


def verify(
    manifest_bytes: bytes,
    signature: bytes,
    public_key: str | Path | Ed25519PublicKey,
    *,
    what: str = "manifest",
) -> None:
    """Raise BundleVerificationError unless `signature` is `public_key`'s signature of the bytes.

    `what` names the object in the message (e.g. the manifest's URI), so an operator knows
    which bundle was refused.
    """
    key = load_public_key(public_key)
    try:
        key.verify(signature, manifest_bytes)
    except InvalidSignature:
        raise BundleVerificationError(
            f"{what}: signature does not verify with public key {key_id(key)}; the manifest was "
            "changed after signing or signed by another key. Refusing it: check that the device "
            "holds the publisher's current public key and that the bundle was not tampered with."
        ) from None
