"""Fused CPU kernels for the evaluation program's elementwise steps.

Each kernel computes one step of docs/spec.md section 5 for a whole row in
one pass, in int64 arithmetic (numba follows Python's integer semantics:
`//` floors, `>>` is an arithmetic shift). Inputs come from float64 BLAS
products whose values are exact (multiples of a power of two below 2**53),
so converting them to int64 after adding 1/2 and flooring is exact. Rows run
in parallel; results do not depend on the thread count.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

_INT16_MIN = -32768
_INT16_MAX = 32767


@numba.njit(cache=True, parallel=True)
def layernorm(
    x: np.ndarray,
    products: np.ndarray,
    add: bool,
    gain: np.ndarray,
    limit: int,
    square_shift: int,
    eps: int,
    std_shift: int,
    out: np.ndarray,
) -> None:
    """out = LayerNorm(x) (section 5.4); x (n, C) Q.16, gain pre-scaled by 2**(13 - e), out Q.11.

    With `add`, first x += floor(products + 1/2) in place (the residual update
    that precedes every LayerNorm but the first), in the same pass.
    """
    rows, width = x.shape
    square_half = 1 << (square_shift - 1)
    for row in prange(rows):
        if add:
            for c in range(width):
                x[row, c] += math.floor(products[row, c] + 0.5)
        total = 0
        for c in range(width):
            total += min(max(np.int64(x[row, c]), -limit), limit)  # type: ignore[operator]
        mean = total // width
        squares = 0
        for c in range(width):
            d = min(max(np.int64(x[row, c]), -limit), limit) - mean
            squares += (d * d + square_half) >> square_shift
        value = (squares // width + eps) << std_shift
        root = np.int64(math.sqrt(np.float64(value)))
        if root * root > value:
            root -= 1
        if (root + 1) * (root + 1) <= value:
            root += 1
        half = root // 2
        divisor = np.float64(root)
        for c in range(width):
            d = min(max(x[row, c], -limit), limit) - mean
            quotient = math.floor((d * gain[c] + half) / divisor)
            out[row, c] = min(max(quotient, _INT16_MIN), _INT16_MAX)


@numba.njit(cache=True, parallel=True, fastmath=True)
def attention_weights(scores: np.ndarray, first_row: int, table: np.ndarray, totals: np.ndarray) -> None:
    """In place: scaled scores q.k * 2**-shift (bh, rows, columns) -> exp table values (Q.20).

    s = floor(score + 1/2); for each row, keys after the row's position get 0,
    the others attention_exp[max(s - max s, -16384) + 16384]; totals[b, row]
    receives the row's sum. With m = max s (an integer), the index is
    trunc(max(score + 1/2 - m + 16384, 0)), exact in float64.
    """
    heads, rows, columns = scores.shape
    offset = np.float64(len(table) - 1)
    for flat in prange(heads * rows):
        head = flat // rows
        row = flat % rows
        visible = min(first_row + row + 1, columns)
        line = scores[head, row]
        top = line[0]
        for u in range(1, visible):
            top = max(top, line[u])
        base = offset + 0.5 - math.floor(top + 0.5)
        total = 0
        for u in range(visible):
            entry = table[np.int64(max(line[u] + base, 0.0))]
            total += entry
            line[u] = entry
        for u in range(visible, columns):
            line[u] = 0.0
        totals[head, row] = total


@numba.njit(cache=True, parallel=True)
def round_clip_heads(product: np.ndarray, heads: int, query_scale: float) -> None:
    """In place on (batch, 3C, t) q|k|v products, rows ordered (head, part, d):
    clip(floor(x + 1/2), int16), and query rows (part 0) times query_scale."""
    batch, rows, length = product.shape
    size = rows // (3 * heads)
    for item in prange(batch * rows):
        sequence = item // rows
        row = item % rows
        scale = query_scale if (row // size) % 3 == 0 else 1.0
        for t in range(length):
            value = min(max(math.floor(product[sequence, row, t] + 0.5), -32768.0), 32767.0)
            product[sequence, row, t] = value * scale


@numba.njit(cache=True, parallel=True)
def merge_heads(
    weighted: np.ndarray, totals: np.ndarray, first_row: int, length: int, heads: int, out: np.ndarray
) -> None:
    """out[token, head columns] = floor((weighted + floor(total / 2)) / total) for rows from first_row."""
    count, rows, head_size = weighted.shape
    for flat in prange(count * rows):
        index = flat // rows
        row = flat % rows
        token = (index // heads) * length + first_row + row
        column = (index % heads) * head_size
        total = totals[index, row]
        half = math.floor(total * 0.5)
        for d in range(head_size):
            out[token, column + d] = math.floor((weighted[index, row, d] + half) / total)


@numba.njit(cache=True, parallel=True)
def gelu(values: np.ndarray, table: np.ndarray) -> None:
    """In place: x * 2**-shift products -> gelu[clip(floor(x + 1/2), int16) + 32768] (Q.11)."""
    flat = values.reshape(-1)
    for i in prange(flat.size):
        flat[i] = table[np.int64(min(max(flat[i] + 32768.5, 0.0), 65535.0))]


@numba.njit(cache=True, parallel=True)
def round_clip(values: np.ndarray, low: float, high: float) -> None:
    """In place: clip(floor(x + 1/2), low, high)."""
    flat = values.reshape(-1)
    for i in prange(flat.size):
        flat[i] = min(max(math.floor(flat[i] + 0.5), low), high)


@numba.njit(cache=True, parallel=True)
def add_rounded(residual: np.ndarray, products: np.ndarray) -> None:
    """In place: residual += floor(products + 1/2)."""
    flat = residual.reshape(-1)
    source = products.reshape(-1)
    for i in prange(flat.size):
        flat[i] += math.floor(source[i] + 0.5)


@numba.njit(cache=True, parallel=True)
def cross_entropy(
    logits: np.ndarray,
    targets: np.ndarray,
    exp_table: np.ndarray,
    log_table: np.ndarray,
    ln2_table: np.ndarray,
    mantissa_bits: int,
    exp_bits: int,
    score_to_loss: int,
    out: np.ndarray,
) -> None:
    """Per-token loss (section 5.3 step 4) from scaled logit products (n, vocab)."""
    rows, vocab = logits.shape
    offset = np.float64(len(exp_table) - 1)
    for row in prange(rows):
        line = logits[row]
        top = line[0]
        for j in range(1, vocab):
            top = max(top, line[j])
        base = offset + 0.5 - math.floor(top + 0.5)  # index = trunc(max(z - m + offset, 0))
        total = 0
        for j in range(vocab):
            total += exp_table[np.int64(max(line[j] + base, 0.0))]
        exponent = math.frexp(np.float64(total))[1] - 1  # floor(log2 total), exact below 2**53
        shift = exponent - mantissa_bits
        mantissa = (total + (np.int64(1) << (shift - 1))) >> shift
        target = np.int64(max(line[targets[row]] + base, 0.0)) - np.int64(offset)  # max(z_y - m, -offset)
        log_total = log_table[mantissa - (np.int64(1) << mantissa_bits)] + ln2_table[exponent - exp_bits]
        out[row] = log_total - target * score_to_loss


def set_threads(count: int) -> None:
    """Use `count` threads in the kernels (at most numba's pool size)."""
    available: int = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    numba.set_num_threads(max(1, min(count, available)))
