"""Lookup tables of the canonical evaluator, generated deterministically.

Every entry is the correctly rounded value of a real function at a fixed-point
input: `round_half_up(f(x) * 2**out_bits)`. Entries are first computed in
float64 and, wherever the float result lies within `_GUARD` of a rounding
boundary (where a last-bit error in a platform's libm could change the
rounded integer), recomputed with Python's `decimal` at 100 significant
digits. The result does not depend on the platform's libm; the tables'
SHA-256 is pinned in genesis and checked on load.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal, localcontext
from functools import cache

import numpy as np

# Fixed-point formats of the evaluation program (see docs/spec.md, "Evaluator").
SCORE_BITS = 10
"""Attention scores and logits are Q.10 before the exp tables."""
ATTENTION_EXP_MIN = -16
"""The attention exp table covers [-16, 0] at Q.10: 16,385 entries."""
ATTENTION_EXP_BITS = 20
"""Attention exp table output: Q.20."""
LOSS_EXP_MIN = -24
"""The cross-entropy exp table covers [-24, 0] at Q.10: 24,577 entries."""
LOSS_EXP_BITS = 32
"""Cross-entropy exp table output: Q.32."""
ACTIVATION_BITS = 11
"""Matmul inputs and GELU input/output: Q.11 in the int16 range."""
LOG_MANTISSA_BITS = 15
"""The log table covers mantissas m in [2**15, 2**16]: 32,769 entries."""
LOSS_BITS = 16
"""Logarithms and per-token losses: Q.16."""
LN2_MULTIPLES = 64
"""The ln2 table holds round(k * ln 2 * 2**16) for k in [0, 64)."""

_GUARD = 1e-3
_DECIMAL_DIGITS = 100


@dataclass(frozen=True)
class Tables:
    """All lookup tables, as int64 arrays."""

    attention_exp: np.ndarray
    """attention_exp[i] = round(exp((i - 16384) / 2**10) * 2**20), i in [0, 16384]."""
    loss_exp: np.ndarray
    """loss_exp[i] = round(exp((i - 24576) / 2**10) * 2**32), i in [0, 24576]."""
    gelu: np.ndarray
    """gelu[i] = round(gelu((i - 32768) / 2**11) * 2**11), i in [0, 65535]."""
    log: np.ndarray
    """log[i] = round(ln(1 + i / 2**15) * 2**16), i in [0, 32768]."""
    ln2_multiples: np.ndarray
    """ln2_multiples[k] = round(k * ln 2 * 2**16), k in [0, 64)."""

    def named(self) -> list[tuple[str, np.ndarray]]:
        return [
            ("attention_exp", self.attention_exp),
            ("loss_exp", self.loss_exp),
            ("gelu", self.gelu),
            ("log", self.log),
            ("ln2_multiples", self.ln2_multiples),
        ]

    def sha256(self) -> str:
        """SHA-256 over each table's name, length and little-endian int64 values."""
        digest = hashlib.sha256()
        for name, values in self.named():
            digest.update(name.encode("ascii") + b"\x00")
            digest.update(len(values).to_bytes(8, "little"))
            digest.update(values.astype("<i8").tobytes())
        return digest.hexdigest()


def _round_half_up(value: Decimal) -> int:
    return int((value + Decimal("0.5")).to_integral_value(rounding=ROUND_FLOOR))


def _decimal_erf(x: Decimal) -> Decimal:
    """erf by its Taylor series; exact to the context's precision for |x| <= 12."""
    total = Decimal(0)
    term = x  # x^(2n+1) (-1)^n / n!
    n = 0
    while True:
        contribution = term / (2 * n + 1)
        total += contribution
        if contribution == 0 or abs(contribution) < Decimal(10) ** (-_DECIMAL_DIGITS):
            break
        n += 1
        term = -term * x * x / n
    return total * _two_over_sqrt_pi()


@cache
def _two_over_sqrt_pi() -> Decimal:
    with localcontext() as context:
        context.prec = _DECIMAL_DIGITS + 20
        return 2 / _decimal_pi().sqrt()


@cache
def _decimal_pi() -> Decimal:
    """pi by Machin's formula."""
    with localcontext() as context:
        context.prec = _DECIMAL_DIGITS + 30

        def arctan_inverse(n: int) -> Decimal:
            total = Decimal(0)
            power = Decimal(1) / n
            k = 0
            while power != 0:
                total += power / (2 * k + 1) * (-1 if k % 2 else 1)
                power /= n * n
                k += 1
            return total

        return 4 * (4 * arctan_inverse(5) - arctan_inverse(239))


def _generate(
    inputs: np.ndarray,
    out_bits: int,
    float_function: Callable[[np.ndarray], np.ndarray],
    exact_function: Callable[[Decimal], Decimal],
    input_scale_bits: int,
) -> np.ndarray:
    """round_half_up(f(i / 2**input_scale_bits) * 2**out_bits) for integer inputs i."""
    x = inputs.astype(np.float64) / (1 << input_scale_bits)
    scaled = float_function(x) * float(1 << out_bits)
    result = np.floor(scaled + 0.5).astype(np.int64)
    fraction = scaled - np.floor(scaled)
    near_boundary = np.abs(fraction - 0.5) < _GUARD
    with localcontext() as context:
        context.prec = _DECIMAL_DIGITS
        for index in np.flatnonzero(near_boundary):
            exact_input = Decimal(int(inputs[index])) / (1 << input_scale_bits)
            result[index] = _round_half_up(exact_function(exact_input) * (1 << out_bits))
    return result


def _exact_exp(x: Decimal) -> Decimal:
    return x.exp()


def _exact_gelu(x: Decimal) -> Decimal:
    with localcontext() as context:
        context.prec = _DECIMAL_DIGITS + 80  # the erf series cancels ~60 digits at |x| = 11.3
        root_two = Decimal(2).sqrt()
        return x / 2 * (1 + _decimal_erf(x / root_two))


def _float_gelu(x: np.ndarray) -> np.ndarray:
    erf = np.array([math.erf(value) for value in (x / math.sqrt(2.0)).tolist()], dtype=np.float64)
    return 0.5 * x * (1.0 + erf)


def _exact_log1p_fraction(x: Decimal) -> Decimal:
    return (1 + x).ln()


@cache
def build_tables() -> Tables:
    """Generate every table (about 0.1 s); the result is cached per process."""
    attention_inputs = np.arange(ATTENTION_EXP_MIN << SCORE_BITS, 1, dtype=np.int64)
    loss_inputs = np.arange(LOSS_EXP_MIN << SCORE_BITS, 1, dtype=np.int64)
    gelu_inputs = np.arange(-(1 << 15), 1 << 15, dtype=np.int64)
    log_inputs = np.arange(0, (1 << LOG_MANTISSA_BITS) + 1, dtype=np.int64)
    with localcontext() as context:
        context.prec = _DECIMAL_DIGITS
        ln2 = Decimal(2).ln()
        ln2_multiples = np.array(
            [_round_half_up(k * ln2 * (1 << LOSS_BITS)) for k in range(LN2_MULTIPLES)], dtype=np.int64
        )
    return Tables(
        attention_exp=_generate(attention_inputs, ATTENTION_EXP_BITS, np.exp, _exact_exp, SCORE_BITS),
        loss_exp=_generate(loss_inputs, LOSS_EXP_BITS, np.exp, _exact_exp, SCORE_BITS),
        gelu=_generate(gelu_inputs, ACTIVATION_BITS, _float_gelu, _exact_gelu, ACTIVATION_BITS),
        log=_generate(log_inputs, LOSS_BITS, np.log1p, _exact_log1p_fraction, LOG_MANTISSA_BITS),
        ln2_multiples=ln2_multiples,
    )
