"""Key files: encrypted keystores for Ed25519 seeds, legacy plaintext hex files, and the rule
for the INSECURE name-derived devnet keys.

A keystore is a JSON document:

    {"format": "potchain-keystore", "version": 1, "public_key": HEX,
     "kdf": {"name": "scrypt", "n": 131072, "r": 8, "p": 1, "salt": HEX},
     "cipher": {"name": "aes-256-gcm", "nonce": HEX, "ciphertext": HEX}}

The public key is in clear, so that showing it needs no passphrase. The seed is encrypted with
AES-256-GCM under the scrypt key of the passphrase, with the public key as associated data: a
wrong passphrase, a changed ciphertext, nonce, salt or KDF parameter, or a public key swapped
for another all fail the authentication. Files are written mode 0600, atomically.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from chain.crypto import PrivateKey
from chain.files import SECRET_MODE, write_atomically

KEYSTORE_FORMAT = "potchain-keystore"
KEYSTORE_VERSION = 1
CIPHER = "aes-256-gcm"
SALT_BYTES = 32
NONCE_BYTES = 12
SEED_BYTES = 32
TAG_BYTES = 16
MAX_SCRYPT_MEMORY = 1 << 30
"""The most memory (128 * n * r * p bytes) a keystore's KDF may ask for when it is opened: 1 GiB."""
DEVNET_CHAIN_PREFIX = "potchain-devnet"
"""Chain ids that begin with this name INSECURE development networks, the only ones on which a
node takes `devnet:NAME` keys (anyone can derive them from the name)."""


class KeystoreError(Exception):
    """A key file that cannot be read, written or opened; the message names the file and why."""


@dataclass(frozen=True)
class ScryptParameters:
    """scrypt's cost parameters (RFC 7914)."""

    n: int
    """CPU and memory cost: a power of two, at least 2."""
    r: int
    """Block size."""
    p: int
    """Parallelism."""

    @property
    def memory_bytes(self) -> int:
        """The memory one derivation needs: 128 * n * r * p bytes."""
        return 128 * self.n * self.r * self.p

    def problem(self) -> str | None:
        """Why these parameters are refused, or None."""
        if self.n < 2 or self.n & (self.n - 1):
            return f"kdf.n: got {self.n}, want a power of two, at least 2"
        if not 1 <= self.r <= 64:
            return f"kdf.r: got {self.r}, want 1 to 64"
        if not 1 <= self.p <= 16:
            return f"kdf.p: got {self.p}, want 1 to 16"
        if self.memory_bytes > MAX_SCRYPT_MEMORY:
            return f"kdf: 128 * n * r * p is {self.memory_bytes} bytes, want at most {MAX_SCRYPT_MEMORY}"
        return None


DEFAULT_SCRYPT = ScryptParameters(n=1 << 17, r=8, p=1)
"""128 MiB and about half a second a derivation on one core of a 2-core Xeon: what a new keystore uses."""


def is_devnet_chain_id(chain_id: str) -> bool:
    """Whether `chain_id` names an INSECURE development network (it begins with "potchain-devnet")."""
    return chain_id.startswith(DEVNET_CHAIN_PREFIX)


def _derive(passphrase: str, salt: bytes, scrypt: ScryptParameters) -> bytes:
    return Scrypt(salt=salt, length=32, n=scrypt.n, r=scrypt.r, p=scrypt.p).derive(passphrase.encode("utf-8"))


@dataclass(frozen=True)
class Keystore:
    """A keystore file as read: the public key in clear, the seed still encrypted."""

    path: Path
    """The file it was read from (named in every error)."""
    public_key: bytes
    """The Ed25519 public key (32 bytes), stored in clear."""
    scrypt: ScryptParameters
    """The KDF's cost parameters."""
    salt: bytes
    """The KDF's salt."""
    nonce: bytes
    """The AES-256-GCM nonce (12 bytes)."""
    ciphertext: bytes
    """The encrypted seed and its 16-byte tag."""

    def unlock(self, passphrase: str) -> PrivateKey:
        """The signing key; a wrong passphrase or a changed file is a KeystoreError."""
        key = _derive(passphrase, self.salt, self.scrypt)
        try:
            seed = AESGCM(key).decrypt(self.nonce, self.ciphertext, self.public_key)
        except InvalidTag:
            raise KeystoreError(
                f"{self.path}: wrong passphrase, or the keystore was changed (authentication failed)"
            ) from None
        private_key = PrivateKey(seed)
        if private_key.public_key != self.public_key:  # unreachable unless the writer was wrong
            raise KeystoreError(f"{self.path}: the seed's public key is not the stored public_key")
        return private_key

    def document(self) -> dict[str, Any]:
        return {
            "format": KEYSTORE_FORMAT,
            "version": KEYSTORE_VERSION,
            "public_key": self.public_key.hex(),
            "kdf": {
                "name": "scrypt",
                "n": self.scrypt.n,
                "r": self.scrypt.r,
                "p": self.scrypt.p,
                "salt": self.salt.hex(),
            },
            "cipher": {"name": CIPHER, "nonce": self.nonce.hex(), "ciphertext": self.ciphertext.hex()},
        }


def encrypt_seed(path: Path, seed: bytes, passphrase: str, scrypt: ScryptParameters = DEFAULT_SCRYPT) -> Keystore:
    """A keystore of the Ed25519 `seed` under `passphrase`, to be written at `path` (see write_keystore)."""
    if len(seed) != SEED_BYTES:
        raise KeystoreError(f"{path}: the seed is {len(seed)} bytes, want {SEED_BYTES}")
    if not passphrase:
        raise KeystoreError(f"{path}: the passphrase is empty, want at least one character")
    problem = scrypt.problem()
    if problem is not None:
        raise KeystoreError(f"{path}: {problem}")
    salt, nonce = secrets.token_bytes(SALT_BYTES), secrets.token_bytes(NONCE_BYTES)
    public_key = PrivateKey(seed).public_key
    ciphertext = AESGCM(_derive(passphrase, salt, scrypt)).encrypt(nonce, seed, public_key)
    return Keystore(path, public_key, scrypt, salt, nonce, ciphertext)


def write_private_file(path: Path, data: bytes) -> None:
    """Create `path` (mode 0600) holding `data`, atomically (chain/files.py: a temporary file in
    the same directory, fsynced, renamed into place, the directory fsynced). An existing file is
    an error: a key file is never overwritten."""
    if path.exists():
        raise KeystoreError(f"{path}: the file exists; not overwriting a key file")
    if not path.parent.is_dir():
        raise KeystoreError(f"{path}: no such directory {path.parent}")
    try:
        write_atomically(path, data, SECRET_MODE)
    except OSError as error:
        raise KeystoreError(f"{path}: cannot write the key file ({error.strerror or error})") from None


def write_keystore(path: Path, seed: bytes, passphrase: str, scrypt: ScryptParameters = DEFAULT_SCRYPT) -> Keystore:
    """Encrypt `seed` under `passphrase` and write it to a new file at `path` (mode 0600, atomically)."""
    keystore = encrypt_seed(path, seed, passphrase, scrypt)
    write_private_file(path, (json.dumps(keystore.document(), indent=1) + "\n").encode("ascii"))
    return keystore


def _hex_field(path: Path, fields: dict[str, Any], name: str, where: str, size: int | None) -> bytes:
    value = fields.get(name)
    if not isinstance(value, str):
        raise KeystoreError(f"{path}: {where}{name}: got {json.dumps(value)}, want a hex string")
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise KeystoreError(f"{path}: {where}{name}: not hex") from None
    if size is not None and len(data) != size:
        raise KeystoreError(f"{path}: {where}{name}: got {len(data)} bytes, want {size}")
    return data


def _integer_field(path: Path, fields: dict[str, Any], name: str) -> int:
    value = fields.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise KeystoreError(f"{path}: kdf.{name}: got {json.dumps(value)}, want an integer")
    return value


def parse_keystore(path: Path, text: str) -> Keystore:
    """A keystore from its JSON text; every problem is a KeystoreError naming `path` and the field."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise KeystoreError(f"{path}: not a keystore: bad JSON ({error})") from None
    if not isinstance(document, dict):
        raise KeystoreError(f"{path}: not a keystore: got a JSON {type(document).__name__}, want an object")
    if document.get("format") != KEYSTORE_FORMAT:
        raise KeystoreError(f"{path}: format: got {json.dumps(document.get('format'))}, want {KEYSTORE_FORMAT!r}")
    if document.get("version") != KEYSTORE_VERSION:
        raise KeystoreError(
            f"{path}: version: got {json.dumps(document.get('version'))}, want {KEYSTORE_VERSION} "
            "(a keystore of another version of potchain)"
        )
    public_key = _hex_field(path, document, "public_key", "", 32)
    kdf, cipher = document.get("kdf"), document.get("cipher")
    if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
        raise KeystoreError(f"{path}: kdf: got {json.dumps(kdf)}, want an object with name 'scrypt'")
    if not isinstance(cipher, dict) or cipher.get("name") != CIPHER:
        raise KeystoreError(f"{path}: cipher: got {json.dumps(cipher)}, want an object with name {CIPHER!r}")
    scrypt = ScryptParameters(*(_integer_field(path, kdf, name) for name in ("n", "r", "p")))
    problem = scrypt.problem()
    if problem is not None:
        raise KeystoreError(f"{path}: {problem}")
    salt = _hex_field(path, kdf, "salt", "kdf.", None)
    if not 16 <= len(salt) <= 64:
        raise KeystoreError(f"{path}: kdf.salt: got {len(salt)} bytes, want 16 to 64")
    nonce = _hex_field(path, cipher, "nonce", "cipher.", NONCE_BYTES)
    ciphertext = _hex_field(path, cipher, "ciphertext", "cipher.", SEED_BYTES + TAG_BYTES)
    return Keystore(path, public_key, scrypt, salt, nonce, ciphertext)


def parse_plaintext_seed(path: Path, text: str) -> bytes:
    """The seed of a legacy key file: 32 bytes as 64 hex characters (surrounding whitespace ignored)."""
    stripped = text.strip()
    try:
        seed = bytes.fromhex(stripped)
    except ValueError:
        raise KeystoreError(f"{path}: a plaintext key file holds 64 hex characters, this one is not hex") from None
    if len(seed) != SEED_BYTES:
        raise KeystoreError(f"{path}: a plaintext key file holds 64 hex characters, got {len(stripped)}")
    return seed


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise KeystoreError(f"{path}: no such key file") from None
    except OSError as error:
        raise KeystoreError(f"{path}: cannot read the key file ({error.strerror})") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise KeystoreError(f"{path}: neither a keystore (JSON) nor a plaintext key file (64 hex)") from None


def read_plaintext_seed(path: Path) -> bytes:
    """The seed in a legacy plaintext key file; a keystore is an error (it is encrypted already)."""
    text = _read_text(path)
    if text.lstrip().startswith(("{", "[")):
        raise KeystoreError(f"{path}: a keystore (encrypted) already, want a plaintext key file of 64 hex characters")
    return parse_plaintext_seed(path, text)


def read_key_file(path: Path) -> Keystore | PrivateKey:
    """A keystore (JSON, still locked) or the key of a legacy plaintext file (64 hex characters)."""
    text = _read_text(path)
    if text.lstrip().startswith(("{", "[")):
        return parse_keystore(path, text)
    return PrivateKey(parse_plaintext_seed(path, text))
