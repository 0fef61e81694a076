"""ECVRF-EDWARDS25519-SHA512-TAI (RFC 9381): a verifiable random function on validators' Ed25519 keys.

What it is. A VRF is a keyed hash that only the holder of the secret key can compute and that anyone holding
the public key can check: `prove(seed, alpha)` returns an 80-byte proof pi, `proof_to_hash(pi)` the 64-byte
output beta, and `verify(public_key, pi, alpha)` returns beta when pi is a valid proof for alpha under
public_key, and None otherwise. This is ciphersuite ECVRF-EDWARDS25519-SHA512-TAI of RFC 9381 (suite_string
0x03), which uses the Ed25519 key pair unchanged: the secret scalar is the clamped first half of SHA-512 of
the 32-byte seed (RFC 8032 section 5.1.5) and the public key is the Ed25519 public key, so a validator needs
no new key.

Why. A random seed for the consensus protocol must not be grindable. An Ed25519 signature cannot serve: its
nonce is deterministic only by convention, and a verifier cannot tell a deterministic signature from one made
with a chosen nonce, so a signer can try many valid signatures and publish the one it likes best. ECVRF has
full uniqueness (RFC 9381 section 3.1): for one public key that passes validate_key and one alpha, only one
beta can be made to verify. The proof pi may take many forms (its nonce is free), but beta is a hash of
8 * Gamma = 8 * x * H, which the proof pins down and the prover cannot choose, so neither the prover nor
anyone else can grind beta; and without the secret key no one can predict it.

Group arithmetic. Scalar multiplication, point addition and scalar arithmetic modulo the group order L come
from libsodium through PyNaCl (`nacl.bindings`), which is well kept, constant time, and already installed
here. libsodium's scalar multiplication accepts only canonical points of the prime-order subgroup, while RFC
9381 works with any point on the curve: the try-and-increment hash decodes an arbitrary 32-byte string and
multiplies it by the cofactor 8, and verify must accept a public key or a Gamma with a small-order component
(validate_key rejects only keys of small order). So three small pieces are written out here: point decoding
per RFC 8032 section 5.1.3 in pure Python (libsodium's point addition would also take non-canonical
encodings, which RFC 8032 rejects), multiplication by the cofactor as three doublings with libsodium's point
addition (which takes any point on the curve), and, for verification only, the product of a scalar c and a
point P outside the subgroup as floor(c / 8) * (8 * P) + (c mod 8) * P, where 8 * P lies in the prime-order
subgroup. The prover multiplies its secret scalars only by the subgroup points B and H, and computes
s = k + c * x mod L, with libsodium's constant-time functions.
"""

from __future__ import annotations

import hashlib

from nacl import bindings
from nacl.exceptions import RuntimeError as SodiumError

SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
POINT_BYTES = 32
CHALLENGE_BYTES = 16
SCALAR_BYTES = 32
PROOF_BYTES = POINT_BYTES + CHALLENGE_BYTES + SCALAR_BYTES
OUTPUT_BYTES = 64

SUITE_STRING = b"\x03"
"""ECVRF-EDWARDS25519-SHA512-TAI."""
ENCODE_TO_CURVE_FRONT = b"\x01"
CHALLENGE_GENERATION_FRONT = b"\x02"
PROOF_TO_HASH_FRONT = b"\x03"
DOMAIN_SEPARATOR_BACK = b"\x00"

FIELD_PRIME = 2**255 - 19
GROUP_ORDER = 2**252 + 27742317777372353535851937790883648493
"""L, the order of the prime-order subgroup that the base point B generates."""
COFACTOR = 8
CURVE_D = -121665 * pow(121666, -1, FIELD_PRIME) % FIELD_PRIME
SQUARE_ROOT_OF_MINUS_ONE = pow(2, (FIELD_PRIME - 1) // 4, FIELD_PRIME)
IDENTITY = (1).to_bytes(POINT_BYTES, "little")
"""The encoding of the neutral element (x, y) = (0, 1)."""
MAXIMUM_ENCODE_TO_CURVE_TRIES = 256
"""ctr is one octet (RFC 9381 section 5.4.1.1); each try fails with probability about 1/2."""


def prove(seed: bytes, alpha: bytes) -> bytes:
    """The 80-byte proof pi that the holder of this Ed25519 seed computed the VRF on alpha (RFC 9381 5.1)."""
    if len(seed) != SEED_BYTES:
        raise ValueError(f"an Ed25519 seed is {SEED_BYTES} bytes, got {len(seed)}")
    secret_scalar, nonce_prefix = _expand_seed(seed)
    public_key = _multiply_base(secret_scalar)
    hash_point = _encode_to_curve(public_key, alpha)
    gamma = _multiply_subgroup_point(secret_scalar, hash_point)
    nonce = _generate_nonce(nonce_prefix, hash_point)
    challenge = _generate_challenge(
        public_key, hash_point, gamma, _multiply_base(nonce), _multiply_subgroup_point(nonce, hash_point)
    )
    challenge_scalar = challenge + bytes(SCALAR_BYTES - CHALLENGE_BYTES)
    response = bindings.crypto_core_ed25519_scalar_add(
        nonce, bindings.crypto_core_ed25519_scalar_mul(challenge_scalar, secret_scalar)
    )
    return gamma + challenge + response


def proof_to_hash(proof: bytes) -> bytes:
    """The 64-byte VRF output beta of a proof (RFC 9381 5.2).

    This only decodes the proof; it does not check it. Use `verify` for a proof that came from someone else.
    Raises ValueError when the proof does not decode.
    """
    decoded = _decode_proof(proof)
    if decoded is None:
        raise ValueError("not an ECVRF-EDWARDS25519-SHA512-TAI proof")
    gamma, _, _ = decoded
    return _gamma_to_hash(gamma)


def verify(public_key: bytes, proof: bytes, alpha: bytes) -> bytes | None:
    """beta when `proof` is a valid proof for alpha under `public_key` (RFC 9381 5.3, with validate_key),
    None for anything else: wrong lengths, an invalid or non-canonical point, a public key of small order,
    a scalar s >= L, or a proof that does not check out."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(proof) != PROOF_BYTES:
        return None
    if not _is_point_encoding(public_key) or _multiply_by_cofactor(public_key) == IDENTITY:
        return None
    decoded = _decode_proof(proof)
    if decoded is None:
        return None
    gamma, challenge, response = decoded
    hash_point = _encode_to_curve(public_key, alpha)
    response_bytes = response.to_bytes(SCALAR_BYTES, "little")
    first_commitment = bindings.crypto_core_ed25519_sub(
        _multiply_base(response_bytes), _multiply_any_point(challenge, public_key)
    )
    second_commitment = bindings.crypto_core_ed25519_sub(
        _multiply_any_point(response, hash_point), _multiply_any_point(challenge, gamma)
    )
    expected = _generate_challenge(public_key, hash_point, gamma, first_commitment, second_commitment)
    if int.from_bytes(expected, "little") != challenge:
        return None
    return _gamma_to_hash(gamma)


def _expand_seed(seed: bytes) -> tuple[bytes, bytes]:
    """The secret scalar x reduced modulo L, and the second half of SHA-512(seed) (RFC 8032 5.1.5)."""
    digest = hashlib.sha512(seed).digest()
    clamped = bytearray(digest[:32])
    clamped[0] &= 248
    clamped[31] &= 127
    clamped[31] |= 64
    secret_scalar: bytes = bindings.crypto_core_ed25519_scalar_reduce(bytes(clamped) + bytes(32))
    return secret_scalar, digest[32:]


def _is_point_encoding(encoded: bytes) -> bool:
    """Whether RFC 8032 5.1.3 decodes these 32 bytes to a point on the curve (string_to_point succeeds).

    The decoding is strict: y must be below p, and x = 0 must come with sign bit 0, so only canonical
    encodings pass. Every point on the curve passes, whatever its order.
    """
    y_coordinate = int.from_bytes(encoded, "little")
    sign = y_coordinate >> 255
    y_coordinate &= (1 << 255) - 1
    if y_coordinate >= FIELD_PRIME:
        return False
    numerator = (y_coordinate * y_coordinate - 1) % FIELD_PRIME
    denominator = (CURVE_D * y_coordinate * y_coordinate + 1) % FIELD_PRIME
    x_coordinate = (
        numerator
        * pow(denominator, 3, FIELD_PRIME)
        * pow(numerator * pow(denominator, 7, FIELD_PRIME), (FIELD_PRIME - 5) // 8, FIELD_PRIME)
        % FIELD_PRIME
    )
    square_times_denominator = denominator * x_coordinate * x_coordinate % FIELD_PRIME
    if square_times_denominator == (-numerator) % FIELD_PRIME:
        x_coordinate = x_coordinate * SQUARE_ROOT_OF_MINUS_ONE % FIELD_PRIME
    elif square_times_denominator != numerator:
        return False
    return not (x_coordinate == 0 and sign == 1)


def _multiply_by_cofactor(point: bytes) -> bytes:
    """8 * point, for any point on the curve, as three doublings."""
    for _ in range(3):
        point = bindings.crypto_core_ed25519_add(point, point)
    return point


def _multiply_base(scalar: bytes) -> bytes:
    """scalar * B for a scalar reduced modulo L, in constant time."""
    try:
        product: bytes = bindings.crypto_scalarmult_ed25519_base_noclamp(scalar)
    except SodiumError:
        # libsodium refuses to return the identity, which is the product exactly when the scalar is 0 mod L.
        return IDENTITY
    return product


def _multiply_subgroup_point(scalar: bytes, point: bytes) -> bytes:
    """scalar * point for a point of the prime-order subgroup other than the identity, in constant time."""
    try:
        product: bytes = bindings.crypto_scalarmult_ed25519_noclamp(scalar, point)
    except SodiumError:
        # As in _multiply_base: for such a point, libsodium fails only when the product is the identity.
        return IDENTITY
    return product


def _multiply_any_point(scalar: int, point: bytes) -> bytes:
    """scalar * point for any point on the curve. Not constant time: for public values only.

    For a point of the prime-order subgroup, the common case, libsodium computes (scalar mod L) * point. For
    any other point it refuses, and the product is (scalar // 8) * (8 * point) + (scalar % 8) * point, where
    8 * point lies in the prime-order subgroup.
    """
    try:
        product: bytes = bindings.crypto_scalarmult_ed25519_noclamp(
            (scalar % GROUP_ORDER).to_bytes(SCALAR_BYTES, "little"), point
        )
    except SodiumError:
        pass  # a point outside the subgroup or of small order, or a product that is the identity
    else:
        return product
    quotient, remainder = divmod(scalar, COFACTOR)
    quotient %= GROUP_ORDER
    cofactor_multiple = _multiply_by_cofactor(point)
    if quotient == 0 or cofactor_multiple == IDENTITY:
        product = IDENTITY
    else:
        product = _multiply_subgroup_point(quotient.to_bytes(SCALAR_BYTES, "little"), cofactor_multiple)
    for _ in range(remainder):
        product = bindings.crypto_core_ed25519_add(product, point)
    return product


def _encode_to_curve(public_key: bytes, alpha: bytes) -> bytes:
    """H, by ECVRF_encode_to_curve_try_and_increment with encode_to_curve_salt = public key (RFC 9381 5.4.1.1)."""
    for counter in range(MAXIMUM_ENCODE_TO_CURVE_TRIES):
        hash_string = hashlib.sha512(
            SUITE_STRING + ENCODE_TO_CURVE_FRONT + public_key + alpha + bytes([counter]) + DOMAIN_SEPARATOR_BACK
        ).digest()
        candidate = hash_string[:POINT_BYTES]
        if _is_point_encoding(candidate):
            hash_point = _multiply_by_cofactor(candidate)
            if hash_point != IDENTITY:
                return hash_point
    raise ValueError("encode_to_curve found no point in 256 tries")  # probability about 2**-256


def _generate_nonce(nonce_prefix: bytes, hash_point: bytes) -> bytes:
    """k = SHA-512(second half of SHA-512(seed) || H) mod L (RFC 9381 5.4.2.2)."""
    nonce: bytes = bindings.crypto_core_ed25519_scalar_reduce(hashlib.sha512(nonce_prefix + hash_point).digest())
    return nonce


def _generate_challenge(
    public_key: bytes, hash_point: bytes, gamma: bytes, first_commitment: bytes, second_commitment: bytes
) -> bytes:
    """c_string, the first 16 bytes of the challenge hash over Y, H, Gamma, U and V (RFC 9381 5.4.3)."""
    digest = hashlib.sha512(
        SUITE_STRING
        + CHALLENGE_GENERATION_FRONT
        + public_key
        + hash_point
        + gamma
        + first_commitment
        + second_commitment
        + DOMAIN_SEPARATOR_BACK
    ).digest()
    return digest[:CHALLENGE_BYTES]


def _decode_proof(proof: bytes) -> tuple[bytes, int, int] | None:
    """(Gamma, c, s) of an 80-byte proof, or None when Gamma is not a point or s >= L (RFC 9381 5.4.4)."""
    if len(proof) != PROOF_BYTES:
        return None
    gamma = proof[:POINT_BYTES]
    challenge = int.from_bytes(proof[POINT_BYTES : POINT_BYTES + CHALLENGE_BYTES], "little")
    response = int.from_bytes(proof[POINT_BYTES + CHALLENGE_BYTES :], "little")
    if not _is_point_encoding(gamma) or response >= GROUP_ORDER:
        return None
    return gamma, challenge, response


def _gamma_to_hash(gamma: bytes) -> bytes:
    """beta = SHA-512(suite_string || 0x03 || 8 * Gamma || 0x00) (RFC 9381 5.2)."""
    return hashlib.sha512(
        SUITE_STRING + PROOF_TO_HASH_FRONT + _multiply_by_cofactor(gamma) + DOMAIN_SEPARATOR_BACK
    ).digest()
