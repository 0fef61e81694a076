"""ECVRF-EDWARDS25519-SHA512-TAI: the RFC 9381 test vectors, proofs that must fail, and RFC 9381's exact
treatment of points with a small-order component, checked against a plain affine reference of edwards25519."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from nacl import bindings

from chain import vrf
from chain.crypto import PrivateKey


@dataclass(frozen=True)
class Vector:
    """One example of RFC 9381 Appendix B.3, with its intermediate H (the output of encode_to_curve).

    The proof is written as Gamma (32 bytes), c (16 bytes) and s (32 bytes)."""

    secret_key: str
    public_key: str
    alpha: str
    hash_point: str
    proof: str
    output: str


# RFC 9381 Appendix B.3, Examples 16, 17 and 18 (ECVRF-EDWARDS25519-SHA512-TAI).
RFC_9381_VECTORS = [
    Vector(
        secret_key="9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        public_key="d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
        alpha="",
        hash_point="91bbed02a99461df1ad4c6564a5f5d829d0b90cfc7903e7a5797bd658abf3318",
        proof="8657106690b5526245a92b003bb079ccd1a92130477671f6fc01ad16f26f723f"
        "26f8a57ccaed74ee1b190bed1f479d97"
        "27d2d0f9b005a6e456a35d4fb0daab1268a1b0db10836d9826a528ca76567805",
        output="90cf1df3b703cce59e2a35b925d411164068269d7b2d29f3301c03dd757876ff"
        "66b71dda49d2de59d03450451af026798e8f81cd2e333de5cdf4f3e140fdd8ae",
    ),
    Vector(
        secret_key="4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb",
        public_key="3d4017c3e843895a92b70aa74d1b7ebc9c982ccf2ec4968cc0cd55f12af4660c",
        alpha="72",
        hash_point="5b659fc3d4e9263fd9a4ed1d022d75eaacc20df5e09f9ea937502396598dc551",
        proof="f3141cd382dc42909d19ec5110469e4feae18300e94f304590abdced48aed593"
        "3bf0864a62558b3ed7f2fea45c92a465"
        "301b3bbf5e3e54ddf2d935be3b67926da3ef39226bbc355bdc9850112c8f4b02",
        output="eb4440665d3891d668e7e0fcaf587f1b4bd7fbfe99d0eb2211ccec90496310eb"
        "5e33821bc613efb94db5e5b54c70a848a0bef4553a41befc57663b56373a5031",
    ),
    Vector(
        secret_key="c5aa8df43f9f837bedb7442f31dcb7b166d38535076f094b85ce3a2e0b4458f7",
        public_key="fc51cd8e6218a1a38da47ed00230f0580816ed13ba3303ac5deb911548908025",
        alpha="af82",
        hash_point="bf4339376f5542811de615e3313d2b36f6f53c0acfebb482159711201192576a",
        proof="9bc0f79119cc5604bf02d23b4caede71393cedfbb191434dd016d30177ccbf80"
        "96bb474e53895c362d8628ee9f9ea3c0"
        "e52c7a5c691b6c18c9979866568add7a2d41b00b05081ed0f58ee5e31b3a970e",
        output="645427e5d00c62a23fb703732fa5d892940935942101e456ecca7bb217c61c45"
        "2118fec1219202a0edcf038bb6373241578be7217ba85a2687f7a0310b2df19f",
    ),
]

FIRST = RFC_9381_VECTORS[0]
SECOND = RFC_9381_VECTORS[1]


# A plain affine edwards25519 (-x^2 + y^2 = 1 + d x^2 y^2), written independently of chain.vrf's libsodium
# calls, to check the products that chain.vrf computes for points outside the prime-order subgroup.
AffinePoint = tuple[int, int]
PRIME = 2**255 - 19
CURVE_D = -121665 * pow(121666, -1, PRIME) % PRIME
NEUTRAL: AffinePoint = (0, 1)


def reference_decode(encoded: bytes) -> AffinePoint | None:
    """RFC 8032 5.1.3 decoding into coordinates, with the square root taken as in RFC 8032's sample code."""
    value = int.from_bytes(encoded, "little")
    sign, y_coordinate = value >> 255, value & ((1 << 255) - 1)
    if y_coordinate >= PRIME:
        return None
    x_squared = (y_coordinate**2 - 1) * pow(CURVE_D * y_coordinate**2 + 1, -1, PRIME) % PRIME
    x_coordinate = pow(x_squared, (PRIME + 3) // 8, PRIME)
    if x_coordinate * x_coordinate % PRIME != x_squared:
        x_coordinate = x_coordinate * pow(2, (PRIME - 1) // 4, PRIME) % PRIME
    if x_coordinate * x_coordinate % PRIME != x_squared or (x_coordinate == 0 and sign == 1):
        return None
    if x_coordinate % 2 != sign:
        x_coordinate = PRIME - x_coordinate
    return x_coordinate, y_coordinate


def reference_encode(point: AffinePoint) -> bytes:
    """RFC 8032 5.1.2 encoding: y, with the low bit of x as bit 255."""
    x_coordinate, y_coordinate = point
    return (y_coordinate | (x_coordinate % 2) << 255).to_bytes(32, "little")


def reference_add(first: AffinePoint, second: AffinePoint) -> AffinePoint:
    """The twisted Edwards addition law (complete on edwards25519)."""
    (x1, y1), (x2, y2) = first, second
    product = CURVE_D * x1 * x2 * y1 * y2 % PRIME
    return (
        (x1 * y2 + x2 * y1) * pow(1 + product, -1, PRIME) % PRIME,
        (y1 * y2 + x1 * x2) * pow(1 - product, -1, PRIME) % PRIME,
    )


def reference_multiply(scalar: int, point: AffinePoint) -> AffinePoint:
    """scalar * point by double-and-add."""
    result = NEUTRAL
    while scalar:
        if scalar & 1:
            result = reference_add(result, point)
        point = reference_add(point, point)
        scalar >>= 1
    return result


def order_eight_point() -> AffinePoint:
    """A point of order 8: L times a point with a full-order torsion component."""
    for counter in range(256):
        candidate = reference_decode(hashlib.sha512(b"torsion" + bytes([counter])).digest()[:32])
        if candidate is None:
            continue
        torsion = reference_multiply(vrf.GROUP_ORDER, candidate)
        if reference_multiply(4, torsion) != NEUTRAL:
            return torsion
    raise AssertionError("no point of order 8 found")


TORSION = order_eight_point()
SMALL_ORDER_POINTS = [reference_multiply(multiple, TORSION) for multiple in range(8)]
ORDER_TWO_POINT = reference_multiply(4, TORSION)


@pytest.mark.parametrize("vector", RFC_9381_VECTORS, ids=["example16", "example17", "example18"])
def test_rfc_9381_vectors(vector: Vector) -> None:
    seed, public_key, alpha = (
        bytes.fromhex(vector.secret_key),
        bytes.fromhex(vector.public_key),
        bytes.fromhex(vector.alpha),
    )
    proof, output = bytes.fromhex(vector.proof), bytes.fromhex(vector.output)
    assert PrivateKey(seed).public_key == public_key
    assert vrf._encode_to_curve(public_key, alpha).hex() == vector.hash_point
    assert vrf.prove(seed, alpha) == proof
    assert PrivateKey(seed).prove_vrf(alpha) == proof
    assert vrf.proof_to_hash(proof) == output
    assert vrf.verify(public_key, proof, alpha) == output


def test_every_flipped_bit_of_a_proof_fails() -> None:
    proof = bytearray.fromhex(FIRST.proof)
    public_key, alpha = bytes.fromhex(FIRST.public_key), bytes.fromhex(FIRST.alpha)
    for bit in range(8 * vrf.PROOF_BYTES):
        proof[bit // 8] ^= 1 << (bit % 8)
        assert vrf.verify(public_key, bytes(proof), alpha) is None, f"bit {bit}"
        proof[bit // 8] ^= 1 << (bit % 8)
    assert vrf.verify(public_key, bytes(proof), alpha) == bytes.fromhex(FIRST.output)


def test_another_key_or_another_alpha_fails() -> None:
    proof = bytes.fromhex(FIRST.proof)
    assert vrf.verify(bytes.fromhex(SECOND.public_key), proof, bytes.fromhex(FIRST.alpha)) is None
    assert vrf.verify(bytes.fromhex(FIRST.public_key), proof, b"\x00") is None
    assert vrf.verify(bytes.fromhex(FIRST.public_key), bytes.fromhex(SECOND.proof), bytes.fromhex(SECOND.alpha)) is None


def test_public_keys_of_small_order_fail() -> None:
    """validate_key (RFC 9381 5.4.5): under a key of small order anyone can prove, with the secret scalar 0, and
    beta is a constant everybody knows. The proofs made here would verify without that check."""
    encodings = {reference_encode(point) for point in SMALL_ORDER_POINTS}
    assert len(encodings) == 8 and bytes.fromhex("01" + "00" * 31) in encodings
    for encoding in encodings:
        assert vrf._is_point_encoding(encoding)
        forged = forge_proof(bytes(32), encoding, b"round 3", NEUTRAL, lambda challenge: challenge % 8 == 0)
        assert vrf.verify(encoding, forged, b"round 3") is None
    # Non-canonical encodings of the identity: y = p + 1, and x = 0 with the sign bit set.
    proof = bytes.fromhex(FIRST.proof)
    for encoding in ((PRIME + 1).to_bytes(32, "little"), (1 | 1 << 255).to_bytes(32, "little")):
        assert not vrf._is_point_encoding(encoding)
        assert vrf.verify(encoding, proof, b"") is None


def test_non_canonical_scalar_fails() -> None:
    proof = bytes.fromhex(FIRST.proof)
    response = int.from_bytes(proof[48:], "little")
    # s + L multiplies every point of the subgroup as s does: only the range check rejects it.
    stretched = proof[:48] + (response + vrf.GROUP_ORDER).to_bytes(32, "little")
    assert vrf.verify(bytes.fromhex(FIRST.public_key), stretched, bytes.fromhex(FIRST.alpha)) is None
    with pytest.raises(ValueError):
        vrf.proof_to_hash(stretched)


def test_gamma_that_is_not_a_point_fails() -> None:
    proof = bytes.fromhex(FIRST.proof)
    not_a_point = next(
        candidate for value in range(2, 100) if not vrf._is_point_encoding(candidate := value.to_bytes(32, "little"))
    )
    assert reference_decode(not_a_point) is None
    assert vrf.verify(bytes.fromhex(FIRST.public_key), not_a_point + proof[32:], b"") is None
    with pytest.raises(ValueError):
        vrf.proof_to_hash(not_a_point + proof[32:])


def test_wrong_lengths_fail() -> None:
    public_key, proof = bytes.fromhex(FIRST.public_key), bytes.fromhex(FIRST.proof)
    for short_or_long_key in (b"", public_key[:31], public_key + b"\x00"):
        assert vrf.verify(short_or_long_key, proof, b"") is None
    for short_or_long_proof in (b"", proof[:79], proof + b"\x00"):
        assert vrf.verify(public_key, short_or_long_proof, b"") is None
        with pytest.raises(ValueError):
            vrf.proof_to_hash(short_or_long_proof)
    with pytest.raises(ValueError):
        vrf.prove(bytes(31), b"")


def test_private_key_proves_under_its_public_key() -> None:
    key = PrivateKey(hashlib.sha256(b"a validator").digest())
    proof = key.prove_vrf(b"round 7")
    assert len(proof) == vrf.PROOF_BYTES
    output = vrf.verify(key.public_key, proof, b"round 7")
    assert output is not None and len(output) == vrf.OUTPUT_BYTES
    assert output == vrf.proof_to_hash(proof)
    assert vrf.verify(key.public_key, proof, b"round 8") is None


@settings(max_examples=40, deadline=None)
@given(seed=st.binary(min_size=32, max_size=32), alpha=st.binary(max_size=64))
def test_prove_then_verify_round_trips(seed: bytes, alpha: bytes) -> None:
    public_key = PrivateKey(seed).public_key
    proof = vrf.prove(seed, alpha)
    assert vrf.verify(public_key, proof, alpha) == vrf.proof_to_hash(proof)
    assert vrf.verify(public_key, proof, alpha + b"\x00") is None


@settings(max_examples=25, deadline=None)
@given(scalar=st.integers(min_value=0, max_value=2**256 - 1), multiple=st.integers(min_value=0, max_value=7))
def test_multiplying_any_point_matches_the_reference(scalar: int, multiple: int) -> None:
    base = reference_decode(bindings.crypto_scalarmult_ed25519_base_noclamp((1).to_bytes(32, "little")))
    assert base is not None
    for point in (reference_add(base, SMALL_ORDER_POINTS[multiple]), SMALL_ORDER_POINTS[multiple], base):
        expected = reference_encode(reference_multiply(scalar, point))
        assert vrf._multiply_any_point(scalar, reference_encode(point)) == expected
        assert vrf._multiply_by_cofactor(reference_encode(point)) == reference_encode(reference_multiply(8, point))


def forge_proof(
    secret_scalar: bytes, public_key: bytes, alpha: bytes, gamma_offset: AffinePoint, wanted: Callable[[int], bool]
) -> bytes:
    """A proof with this secret scalar x, presented under `public_key`: Gamma = x * H + gamma_offset, and the
    first nonce whose challenge c is `wanted` (RFC 9381 leaves the choice of nonce to the prover)."""
    hash_point = vrf._encode_to_curve(public_key, alpha)
    gamma_point = reference_decode(vrf._multiply_subgroup_point(secret_scalar, hash_point))
    assert gamma_point is not None
    gamma = reference_encode(reference_add(gamma_point, gamma_offset))
    for nonce_value in range(1, 1000):
        nonce = nonce_value.to_bytes(32, "little")
        challenge = vrf._generate_challenge(
            public_key, hash_point, gamma, vrf._multiply_base(nonce), vrf._multiply_subgroup_point(nonce, hash_point)
        )
        if wanted(int.from_bytes(challenge, "little")):
            response = bindings.crypto_core_ed25519_scalar_add(
                nonce, bindings.crypto_core_ed25519_scalar_mul(challenge + bytes(16), secret_scalar)
            )
            return gamma + challenge + response
    raise AssertionError("no nonce gave a wanted challenge")


def test_gamma_with_a_small_order_component_gives_the_same_output() -> None:
    """RFC 9381 decodes Gamma as any point on the curve. Gamma + T, with T of order 8, verifies when 8 divides
    c, and beta, a hash of 8 * Gamma, is the honest one: the proof is not unique, its output is."""
    seed, public_key, alpha = bytes.fromhex(FIRST.secret_key), bytes.fromhex(FIRST.public_key), b"round 1"
    honest_proof, secret_scalar = vrf.prove(seed, alpha), vrf._expand_seed(seed)[0]
    forged = forge_proof(secret_scalar, public_key, alpha, TORSION, lambda challenge: challenge % 8 == 0)
    assert forged[:32] != honest_proof[:32]
    assert vrf.verify(public_key, forged, alpha) == vrf.proof_to_hash(honest_proof)
    refused = forge_proof(secret_scalar, public_key, alpha, TORSION, lambda challenge: challenge % 8 != 0)
    assert vrf.verify(public_key, refused, alpha) is None


def test_public_key_with_a_small_order_component_is_accepted() -> None:
    """validate_key (RFC 9381 5.4.5) rejects only keys of small order: Y + T, with T of order 2, passes, and a
    proof under it verifies when c is even."""
    secret_scalar, alpha = vrf._expand_seed(bytes.fromhex(SECOND.secret_key))[0], b"round 2"
    public_point = reference_decode(bytes.fromhex(SECOND.public_key))
    assert public_point is not None
    mixed_key = reference_encode(reference_add(public_point, ORDER_TWO_POINT))
    proof = forge_proof(secret_scalar, mixed_key, alpha, NEUTRAL, lambda challenge: challenge % 2 == 0)
    assert vrf.verify(mixed_key, proof, alpha) == vrf.proof_to_hash(proof)
    refused = forge_proof(secret_scalar, mixed_key, alpha, NEUTRAL, lambda challenge: challenge % 2 == 1)
    assert vrf.verify(mixed_key, refused, alpha) is None
