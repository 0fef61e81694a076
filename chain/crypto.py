"""Ed25519 keys and signatures over a domain of chain id, genesis hash and message type."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from enum import IntEnum

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from chain import vrf

PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64


class MessageType(IntEnum):
    """What a signature is for; part of its domain, so one never passes for another."""

    TRAINING_BLOCK = 1
    # 2 (validation block), 3 (attestation) and 4 (test seed) are retired with the
    # attestation finality; never reuse them.
    PROPOSAL = 5
    PREVOTE = 6
    PRECOMMIT = 7
    DECIDED_BLOCK = 8
    UPDATE_COMMITMENT = 9


@dataclass(frozen=True)
class Domain:
    """The network a signature belongs to."""

    chain_id: str
    """Genesis chain id."""
    genesis_hash: bytes
    """Genesis hash (32 bytes)."""

    def signing_message(self, message_type: MessageType, payload: bytes) -> bytes:
        """sha256(b"potchain-signature" || len(chain_id) || chain_id || genesis_hash || type || payload)."""
        chain = self.chain_id.encode("ascii")
        prefix = b"potchain-signature" + bytes([len(chain)]) + chain + self.genesis_hash + bytes([message_type])
        return hashlib.sha256(prefix + payload).digest()


class PrivateKey:
    """An Ed25519 signing key. Signatures are deterministic (RFC 8032)."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        self._seed = bytes(seed)
        self._key = Ed25519PrivateKey.from_private_bytes(seed)
        self.public_key = self._key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    def sign(self, domain: Domain, message_type: MessageType, payload: bytes) -> bytes:
        return self._key.sign(domain.signing_message(message_type, payload))

    def prove_vrf(self, alpha: bytes) -> bytes:
        """The 80-byte ECVRF proof for alpha (RFC 9381, ECVRF-EDWARDS25519-SHA512-TAI) under this key.

        `chain.vrf.verify(self.public_key, proof, alpha)` checks it and returns the 64-byte output beta,
        the one value that verifies for this key and alpha.
        """
        return vrf.prove(self._seed, alpha)


def verify(public_key: bytes, signature: bytes, domain: Domain, message_type: MessageType, payload: bytes) -> bool:
    """Whether `signature` is `public_key`'s signature of the payload in this domain."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, domain.signing_message(message_type, payload))
    except (InvalidSignature, ValueError):
        return False
    return True


def devnet_key(name: str) -> PrivateKey:
    """INSECURE: a key anyone can derive from its name, for devnets and tests only."""
    return PrivateKey(hashlib.sha256(b"potchain devnet insecure key: " + name.encode()).digest())
