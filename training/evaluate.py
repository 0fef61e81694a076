"""The canonical evaluator: the model's loss as an exact integer program.

Every value below is an integer; docs/spec.md (section 5) states the program
step by step. Three backends run the same program:

- `cpu-fused` (the CPU default): float64 BLAS matmuls, as `torch-f64`, with
  the elementwise steps fused into compiled kernels (`training.kernels`).
- `torch-f64` keeps the integers in float64 tensors and runs matmuls on BLAS
  (or cuBLAS). Every operand, product and partial sum is an integer (or a
  multiple of a power of two) below 2**53, checked once per model by
  `validate_program_bounds`, so the result does not depend on summation order,
  thread count, SIMD level or library.
- `torch-int64` keeps them in int64 tensors: slower, and a direct check of the
  first, since integer arithmetic is exact by construction.

Both give bit-identical per-token losses. The only floating-point functions
used are IEEE 754 correctly rounded ones (multiplication by powers of two,
division and sqrt), each followed by an exact integer argument or fix-up.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from training.model import ModelConfig
from training.tables import (
    ACTIVATION_BITS,
    ATTENTION_EXP_MIN,
    LOG_MANTISSA_BITS,
    LOSS_BITS,
    LOSS_EXP_BITS,
    LOSS_EXP_MIN,
    SCORE_BITS,
    Tables,
)
from training.weights import CanonicalWeights

RESIDUAL_BITS = 16
"""The residual stream is Q.16."""
LAYERNORM_INPUT_LIMIT = 1 << 23
"""LayerNorm clips its input to +-128 (Q.16) so its arithmetic stays below 2**53."""
LAYERNORM_SQUARE_SHIFT = 10
"""Squared deviations (Q.32) are rounded to Q.22 before summing."""
LAYERNORM_EPS = 42
"""round(1e-5 * 2**22): the variance epsilon, Q.22."""
LAYERNORM_STD_BITS = 18
"""The standard deviation is isqrt(variance << 14): Q.18."""
INT16_MIN = -(1 << 15)
INT16_MAX = (1 << 15) - 1
EXACT_LIMIT = 1 << 53
BACKENDS = ("cpu-fused", "torch-f64", "torch-int64")

_ATTENTION_OFFSET = -ATTENTION_EXP_MIN << SCORE_BITS  # 16384
_LOSS_OFFSET = -LOSS_EXP_MIN << SCORE_BITS  # 24576
_MASKED = -float(1 << 40)
ATTENTION_BLOCK = 32
"""Query rows per attention block (an implementation choice; results do not depend on it)."""


class ProgramBoundsError(ValueError):
    """A model configuration for which the integer program could leave 2**53."""


@dataclass(frozen=True)
class EvalResult:
    """Per-token losses of one batch, Q.16 integers."""

    per_token: np.ndarray
    """int64 losses in (sequence, position) order; loss in nats = value / 2**16."""

    @property
    def loss_total(self) -> int:
        return int(self.per_token.sum())

    @property
    def tokens(self) -> int:
        return int(self.per_token.size)

    @property
    def per_token_sha256(self) -> str:
        return hashlib.sha256(self.per_token.astype("<i8").tobytes()).hexdigest()

    @property
    def mean_loss(self) -> float:
        """Nats per token (informative only: consensus uses `loss_total`)."""
        return self.loss_total / self.tokens / (1 << LOSS_BITS)


def _log2_exact(value: int) -> int:
    if value <= 0 or value & (value - 1):
        raise ProgramBoundsError(f"{value} is not a power of two")
    return value.bit_length() - 1


def validate_program_bounds(config: ModelConfig, exponents: dict[str, int]) -> None:
    """Check that every integer of the program stays below 2**53 for any input.

    Matmul inputs are int16 (|x| <= 2**15), so a matmul over K terms is exact
    when K * 2**30 < 2**53. Raises ProgramBoundsError naming the violated bound.
    """
    head_size = config.head_size
    if config.width % config.heads:
        raise ProgramBoundsError(f"width {config.width} is not a multiple of heads {config.heads}")
    if _log2_exact(head_size) % 2:
        raise ProgramBoundsError(f"head size {head_size} is not a power of 4 (1/sqrt(head size) must be a shift)")
    widest = 4 * config.width
    checks = [
        (widest * 2**30, f"matmul over {widest} terms"),
        (config.context * 2**20 * 2**15, f"attention over context {config.context}"),
        (config.width * 2**38, f"LayerNorm over width {config.width}"),
    ]
    for bound, what in checks:
        if bound >= EXACT_LIMIT:
            raise ProgramBoundsError(f"{what}: partial sums reach {bound}, limit 2**53")
    for name, exponent in exponents.items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            low, high = 1, 13
        elif name.endswith("c_proj.weight"):
            low, high = RESIDUAL_BITS - ACTIVATION_BITS, 15
        else:
            low, high = 1, 15
        if not low <= exponent <= high:
            raise ProgramBoundsError(f"{name}: exponent {exponent} outside [{low}, {high}]")


class Backend(Protocol):
    """How the program's integers are held and its primitive operations computed."""

    name: str
    dtype: torch.dtype
    device: torch.device

    def constant(self, values: np.ndarray) -> torch.Tensor: ...

    def linear_weight(self, weight: np.ndarray, shift: int) -> torch.Tensor:
        """Prepare an (out, in) int16 weight for `linear` with a right shift."""
        ...

    def linear(self, x: torch.Tensor, weight: torch.Tensor, shift: int, offset: int) -> torch.Tensor:
        """round_shift(x @ weight.T, shift) + offset, with `weight` from `linear_weight`."""
        ...

    def attention_index(self, q: torch.Tensor, k: torch.Tensor, shift: int, first_row: int) -> torch.Tensor:
        """Attention exp table index, max(s - max_j s, -16384) + 16384, as long.

        s = round_shift(q @ k.T, shift) for query rows first_row, first_row + 1, ...
        and key columns 0, 1, ...; columns after a row's own position get index 0.
        """
        ...

    def prepare_queries(self, q: torch.Tensor, shift: int) -> torch.Tensor:
        """Queries as `attention_index` takes them."""
        ...

    def round_shift(self, x: torch.Tensor, shift: int | torch.Tensor) -> torch.Tensor:
        """floor((x + 2**(shift-1)) / 2**shift) for shift >= 1."""
        ...

    def square_round_shift(self, x: torch.Tensor, shift: int) -> torch.Tensor:
        """round_shift(x * x, shift)."""
        ...

    def floor_div_(self, numerator: torch.Tensor, denominator: torch.Tensor | int) -> torch.Tensor:
        """floor(numerator / denominator) for denominator >= 1, in place in `numerator`."""
        ...

    def index(self, x: torch.Tensor) -> torch.Tensor:
        """x as a long tensor of table indices."""
        ...


class Float64Backend:
    """Integers in float64 tensors; BLAS matmuls, exact below 2**53."""

    name = "torch-f64"
    dtype = torch.float64

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._masks: dict[tuple[int, int, int], torch.Tensor] = {}

    def constant(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(values, dtype=np.float64)).to(self.device)

    def linear_weight(self, weight: np.ndarray, shift: int) -> torch.Tensor:
        # Scaling by 2**-shift is exact; products and partial sums stay exact
        # multiples of 2**-shift below 2**(53 - shift).
        return self.constant(weight.T * 2.0**-shift).contiguous()

    def linear(self, x: torch.Tensor, weight: torch.Tensor, shift: int, offset: int) -> torch.Tensor:
        bias = torch.tensor(offset + 0.5, dtype=self.dtype, device=self.device)
        return torch.addmm(bias, x, weight).floor_()

    def attention_index(self, q: torch.Tensor, k: torch.Tensor, shift: int, first_row: int) -> torch.Tensor:
        rows, columns = q.shape[-2], k.shape[-2]
        # acc = q @ k.T * 2**-shift is exact, s = floor(acc + 1/2) and
        # s - max(s) + 16384 = floor(acc - (floor(max(acc) + 1/2) - 16384.5));
        # for a non-negative value the conversion to long is that floor.
        scores = torch.bmm(q, k.transpose(1, 2))
        if first_row + rows > 1:
            # Only keys from first_row on can lie in a row's future.
            scores[:, :, first_row:].masked_fill_(self._future(first_row, rows, columns), _MASKED)
        top = scores.amax(dim=-1, keepdim=True).add_(0.5).floor_()
        return scores.sub_(top - (_ATTENTION_OFFSET + 0.5)).clamp_min_(0).long()

    def _future(self, first_row: int, rows: int, columns: int) -> torch.Tensor:
        """(rows, columns - first_row) mask: key first_row + j is after query first_row + i."""
        key = (first_row, rows, columns)
        if key not in self._masks:
            row = torch.arange(first_row, first_row + rows, device=self.device).unsqueeze(1)
            self._masks[key] = torch.arange(first_row, columns, device=self.device).unsqueeze(0) > row
        return self._masks[key]

    def prepare_queries(self, q: torch.Tensor, shift: int) -> torch.Tensor:
        return q * 2.0**-shift  # exact: a power of two

    def round_shift(self, x: torch.Tensor, shift: int | torch.Tensor) -> torch.Tensor:
        if isinstance(shift, torch.Tensor):
            return torch.ldexp(x, -shift).add_(0.5).floor_()
        return (x * 2.0**-shift).add_(0.5).floor_()

    def square_round_shift(self, x: torch.Tensor, shift: int) -> torch.Tensor:
        # x * x * 2**-shift + 1/2 is exact (|x * x| < 2**53), then floor.
        return torch.addcmul(torch.tensor(0.5, dtype=self.dtype, device=self.device), x, x, value=2.0**-shift).floor_()

    def floor_div_(self, numerator: torch.Tensor, denominator: torch.Tensor | int) -> torch.Tensor:
        # For |numerator| < 2**53 and denominator >= 1, the correctly rounded
        # quotient cannot cross an integer, so its floor is exact.
        return numerator.div_(denominator).floor_()

    def index(self, x: torch.Tensor) -> torch.Tensor:
        return x.long()


class Int64Backend:
    """Integers in int64 tensors; integer matmuls."""

    name = "torch-int64"
    dtype = torch.int64

    def __init__(self, device: torch.device) -> None:
        if device.type != "cpu":
            raise ValueError("the torch-int64 backend runs on the CPU only; use torch-f64 on CUDA")
        self.device = device

    def constant(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.asarray(values, dtype=np.int64)).to(self.device)

    def linear_weight(self, weight: np.ndarray, shift: int) -> torch.Tensor:
        return self.constant(weight.T).contiguous()

    def linear(self, x: torch.Tensor, weight: torch.Tensor, shift: int, offset: int) -> torch.Tensor:
        product = x @ weight
        return (self.round_shift(product, shift) if shift else product) + offset

    def attention_index(self, q: torch.Tensor, k: torch.Tensor, shift: int, first_row: int) -> torch.Tensor:
        rows, columns = q.shape[-2], k.shape[-2]
        scores = self.round_shift(torch.bmm(q, k.transpose(1, 2)), shift)
        row = torch.arange(first_row, first_row + rows, device=self.device).unsqueeze(1)
        future = torch.arange(columns, device=self.device).unsqueeze(0) > row
        scores.masked_fill_(future, -(1 << 40))
        top = scores.amax(dim=-1, keepdim=True)
        return (scores - (top - _ATTENTION_OFFSET)).clamp_min_(0)

    def prepare_queries(self, q: torch.Tensor, shift: int) -> torch.Tensor:
        return q

    def round_shift(self, x: torch.Tensor, shift: int | torch.Tensor) -> torch.Tensor:
        if isinstance(shift, torch.Tensor):
            return (x + torch.bitwise_left_shift(torch.ones_like(shift), shift - 1)) >> shift
        return (x + (1 << (shift - 1))) >> shift

    def square_round_shift(self, x: torch.Tensor, shift: int) -> torch.Tensor:
        return (x * x + (1 << (shift - 1))) >> shift

    def floor_div_(self, numerator: torch.Tensor, denominator: torch.Tensor | int) -> torch.Tensor:
        return numerator.div_(denominator, rounding_mode="floor")

    def index(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FusedCpuBackend(Float64Backend):
    """Float64 BLAS matmuls with the elementwise steps fused into compiled CPU
    kernels (`training.kernels`): the same program, one pass per step."""

    name = "cpu-fused"

    def __init__(self, device: torch.device) -> None:
        if device.type != "cpu":
            raise ValueError("the cpu-fused backend runs on the CPU only; use torch-f64 on CUDA")
        super().__init__(device)
        from training import kernels

        self.kernels = kernels
        self.kernels.set_threads(torch.get_num_threads())


def default_backend(device: str) -> str:
    """The fastest backend for a device."""
    return "cpu-fused" if device == "cpu" else "torch-f64"


def make_backend(name: str, device: str = "cpu") -> Backend:
    """A backend by name on a device ("cpu" or "cuda")."""
    torch_device = torch.device(device)
    if torch_device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    if name == "torch-f64":
        return Float64Backend(torch_device)
    if name == "torch-int64":
        return Int64Backend(torch_device)
    if name == "cpu-fused":
        return FusedCpuBackend(torch_device)
    raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")


@dataclass
class _Layer:
    ln_1: torch.Tensor
    c_attn: torch.Tensor
    c_attn_shift: int
    c_proj: torch.Tensor
    c_proj_shift: int
    ln_2: torch.Tensor
    c_fc: torch.Tensor
    c_fc_shift: int
    mlp_proj: torch.Tensor
    mlp_proj_shift: int


class CanonicalEvaluator:
    """Computes per-token losses of canonical weights on a batch, exactly."""

    def __init__(self, weights: CanonicalWeights, tables: Tables, backend: Backend) -> None:
        config = weights.config
        validate_program_bounds(config, dict(weights.exponents))
        self.config = config
        self.backend = backend
        b = backend
        self.attention_exp = b.constant(tables.attention_exp)
        self.loss_exp = b.constant(tables.loss_exp)
        self.gelu = b.constant(tables.gelu)
        self.log = b.constant(tables.log)
        self.ln2_multiples = b.constant(tables.ln2_multiples)
        self.tables = tables
        w, e = weights.tensors, weights.exponents
        self.wte = b.constant(w["wte.weight"].astype(np.int64) << (RESIDUAL_BITS - e["wte.weight"]))
        self.wpe = b.constant(w["wpe.weight"].astype(np.int64) << (RESIDUAL_BITS - e["wpe.weight"]))
        self.lm_shift = ACTIVATION_BITS + e["wte.weight"] - SCORE_BITS
        self.lm_head = b.linear_weight(w["wte.weight"], self.lm_shift)
        self.layers: list[_Layer] = []
        for i in range(config.layers):
            p = f"h.{i}."
            shifts = {
                "attn.c_attn": e[p + "attn.c_attn.weight"],
                "attn.c_proj": ACTIVATION_BITS + e[p + "attn.c_proj.weight"] - RESIDUAL_BITS,
                "mlp.c_fc": e[p + "mlp.c_fc.weight"],
                "mlp.c_proj": ACTIVATION_BITS + e[p + "mlp.c_proj.weight"] - RESIDUAL_BITS,
            }
            self.layers.append(
                _Layer(
                    ln_1=self._norm_gain(weights, p + "ln_1.weight"),
                    c_attn=self._attention_weight(w[p + "attn.c_attn.weight"], shifts["attn.c_attn"]),
                    c_attn_shift=shifts["attn.c_attn"],
                    c_proj=b.linear_weight(w[p + "attn.c_proj.weight"], shifts["attn.c_proj"]),
                    c_proj_shift=shifts["attn.c_proj"],
                    ln_2=self._norm_gain(weights, p + "ln_2.weight"),
                    c_fc=b.linear_weight(w[p + "mlp.c_fc.weight"], shifts["mlp.c_fc"]),
                    c_fc_shift=shifts["mlp.c_fc"],
                    mlp_proj=b.linear_weight(w[p + "mlp.c_proj.weight"], shifts["mlp.c_proj"]),
                    mlp_proj_shift=shifts["mlp.c_proj"],
                )
            )
        self.ln_f = self._norm_gain(weights, "ln_f.weight")
        self._norm_constants = (
            LAYERNORM_INPUT_LIMIT, LAYERNORM_SQUARE_SHIFT, LAYERNORM_EPS, 2 * LAYERNORM_STD_BITS - 22,
        )  # fmt: skip
        # scores = q @ k.T is Q.22; Q.10 and the 1/sqrt(head size) factor make the shift.
        self.score_shift = 2 * ACTIVATION_BITS - SCORE_BITS + _log2_exact(config.head_size) // 2

    def _attention_weight(self, weight: np.ndarray, shift: int) -> torch.Tensor:
        """c_attn prepared for `linear`; for cpu-fused, rows reordered (head, q|k|v, d), untransposed."""
        b = self.backend
        if not isinstance(b, FusedCpuBackend):
            return b.linear_weight(weight, shift)
        width, heads, size = self.config.width, self.config.heads, self.config.head_size
        order = [part * width + head * size + d for head in range(heads) for part in range(3) for d in range(size)]
        return b.constant(weight[order] * 2.0**-shift)

    def _norm_gain(self, weights: CanonicalWeights, name: str) -> torch.Tensor:
        # d (Q.16) * gain (Q.e) / std (Q.18) is Q.(e-2); times 2**(13-e) gives Q.11.
        shift = ACTIVATION_BITS + LAYERNORM_STD_BITS - RESIDUAL_BITS - weights.exponents[name]
        return self.backend.constant(weights.tensors[name].astype(np.int64) << shift)

    def layernorm(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        """Q.16 rows (n, width) -> Q.11 rows clipped to int16 (section 5.4)."""
        b = self.backend
        if isinstance(b, FusedCpuBackend):
            out = torch.empty_like(x)
            b.kernels.layernorm(x.numpy(), x.numpy(), False, gain.numpy(), *self._norm_constants, out.numpy())
            return out
        width = x.shape[-1]
        deviation = x.clamp(-LAYERNORM_INPUT_LIMIT, LAYERNORM_INPUT_LIMIT)
        mean = b.floor_div_(deviation.sum(dim=-1, keepdim=True), width)
        deviation.sub_(mean)
        squares = b.square_round_shift(deviation, LAYERNORM_SQUARE_SHIFT)
        variance = b.floor_div_(squares.sum(dim=-1, keepdim=True), width)
        std = self.isqrt((variance + LAYERNORM_EPS) * (1 << (2 * LAYERNORM_STD_BITS - 22)))
        numerator = torch.addcmul(b.floor_div_(std.clone(), 2), deviation, gain)
        return b.floor_div_(numerator, std).clamp_(INT16_MIN, INT16_MAX)

    def residual_layernorm(
        self, h: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, shift: int, gain: torch.Tensor
    ) -> torch.Tensor:
        """h += round_shift(a @ W.T, shift) in place; returns layernorm(h, gain)."""
        b = self.backend
        if isinstance(b, FusedCpuBackend):
            out = torch.empty_like(h)
            products = torch.mm(a, weight).numpy()
            b.kernels.layernorm(h.numpy(), products, True, gain.numpy(), *self._norm_constants, out.numpy())
            return out
        self.add_linear(h, a, weight, shift)
        return self.layernorm(h, gain)

    def isqrt(self, value: torch.Tensor) -> torch.Tensor:
        """floor(sqrt(value)) for 0 <= value < 2**53: float sqrt, then exact fix-up."""
        root = torch.sqrt(value.to(torch.float64)).floor_().to(value.dtype)
        root = root - (root * root > value).to(value.dtype)
        return root + ((root + 1) * (root + 1) <= value).to(value.dtype)

    def per_token_losses(self, inputs: torch.Tensor, targets: torch.Tensor) -> EvalResult:
        """Losses for token batches `inputs` and `targets` of shape (batch, time)."""
        config, b = self.config, self.backend
        batch, t = inputs.shape
        if t > config.context:
            raise ValueError(f"sequence length {t} exceeds context {config.context}")
        inputs = inputs.to(b.device)
        targets = targets.to(b.device)
        h = (self.wte[inputs] + self.wpe[:t]).reshape(batch * t, config.width)  # (n, c) Q.16
        # Each residual update is fused with the LayerNorm that follows it.
        a = self.layernorm(h, self.layers[0].ln_1)
        for index, layer in enumerate(self.layers):
            if isinstance(b, FusedCpuBackend):
                y = self._fused_attention(a, layer.c_attn, batch)
            else:
                y = self.attention(self.clipped_linear(a, layer.c_attn, layer.c_attn_shift), batch)
            a = self.residual_layernorm(h, y, layer.c_proj, layer.c_proj_shift, layer.ln_2)
            g = self.gelu_of_linear(a, layer.c_fc, layer.c_fc_shift)
            gain = self.layers[index + 1].ln_1 if index + 1 < len(self.layers) else self.ln_f
            a = self.residual_layernorm(h, g, layer.mlp_proj, layer.mlp_proj_shift, gain)
        losses = self.cross_entropy(a, targets.reshape(-1))
        return EvalResult(per_token=losses.to(torch.int64).cpu().numpy())

    def attention(self, qkv: torch.Tensor, batch: int) -> torch.Tensor:
        """Causal self-attention: (n, 3c) Q.11 q|k|v columns -> (n, c) Q.11 (section 5.3 step 2.3).

        Query rows go in blocks, each against the keys up to its last row, which
        skips most masked scores; the result is the same for any block size.
        """
        config, b = self.config, self.backend
        t, heads, head_size = qkv.shape[0] // batch, config.heads, config.head_size
        # (n, 3c) -> 3 x (batch * heads, t, head_size)
        q, k, v = (
            part.reshape(batch, t, heads, head_size).transpose(1, 2).reshape(batch * heads, t, head_size)
            for part in torch.split(qkv, config.width, dim=1)
        )
        q = b.prepare_queries(q, self.score_shift)
        outputs = []
        for first in range(0, t, ATTENTION_BLOCK):
            last = min(first + ATTENTION_BLOCK, t)
            index = b.attention_index(q[:, first:last], k[:, :last], self.score_shift, first)
            exp_scores = torch.take(self.attention_exp, index)  # (bh, rows, last) Q.20
            total = exp_scores.sum(dim=-1, keepdim=True)
            weighted = torch.bmm(exp_scores, v[:, :last])  # (bh, rows, head_size) Q.31
            weighted.add_(b.floor_div_(total.clone(), 2))
            outputs.append(b.floor_div_(weighted, total))  # Q.11
        y = torch.cat(outputs, dim=1)
        # (batch * heads, t, head_size) -> (n, c)
        return y.reshape(batch, heads, t, head_size).transpose(1, 2).reshape(batch * t, config.width)

    def _fused_attention(self, a: torch.Tensor, weight: torch.Tensor, batch: int) -> torch.Tensor:
        """q|k|v projection and `attention` for cpu-fused.

        The projection runs per sequence as weight @ a.T, with the weight's rows
        ordered (head, q|k|v, d), so every head's q.T, k.T and v.T are views of
        the product (no copies): (batch, 3c, t) = (batch * heads, 3, head size, t).
        """
        config, b = self.config, self.backend
        assert isinstance(b, FusedCpuBackend)
        heads, size = config.heads, config.head_size
        t = a.shape[0] // batch
        product = torch.matmul(weight, a.view(batch, t, config.width).transpose(1, 2))  # (batch, 3c, t)
        b.kernels.round_clip_heads(product.numpy(), heads, 2.0**-self.score_shift)
        parts = product.view(batch * heads, 3, size, t)
        queries, keys, values = parts[:, 0], parts[:, 1], parts[:, 2]  # (batch * heads, size, t)
        y = torch.empty(batch * t, config.width, dtype=b.dtype)
        for first in range(0, t, ATTENTION_BLOCK):
            last = min(first + ATTENTION_BLOCK, t)
            weights = torch.bmm(queries[:, :, first:last].transpose(1, 2), keys[:, :, :last])
            totals = torch.empty(weights.shape[:2], dtype=b.dtype)
            b.kernels.attention_weights(weights.numpy(), first, self.tables.attention_exp, totals.numpy())
            weighted = torch.bmm(weights, values[:, :, :last].transpose(1, 2))
            b.kernels.merge_heads(weighted.numpy(), totals.numpy(), first, t, heads, y.numpy())
        return y

    def clipped_linear(self, a: torch.Tensor, weight: torch.Tensor, shift: int) -> torch.Tensor:
        """clip(round_shift(a @ W.T, shift), int16)."""
        b = self.backend
        if isinstance(b, FusedCpuBackend):
            product = torch.mm(a, weight)
            b.kernels.round_clip(product.numpy(), INT16_MIN, INT16_MAX)
            return product
        return b.linear(a, weight, shift, 0).clamp_(INT16_MIN, INT16_MAX)

    def add_linear(self, h: torch.Tensor, a: torch.Tensor, weight: torch.Tensor, shift: int) -> None:
        """h += round_shift(a @ W.T, shift), in place."""
        b = self.backend
        if isinstance(b, FusedCpuBackend):
            b.kernels.add_rounded(h.numpy(), torch.mm(a, weight).numpy())
        else:
            h.add_(b.linear(a, weight, shift, 0))

    def gelu_of_linear(self, a: torch.Tensor, weight: torch.Tensor, shift: int) -> torch.Tensor:
        """gelu[clip(round_shift(a @ W.T, shift), int16) + 32768] (Q.11)."""
        b = self.backend
        if isinstance(b, FusedCpuBackend):
            product = torch.mm(a, weight)
            b.kernels.gelu(product.numpy(), self.tables.gelu)
            return product
        index = b.linear(a, weight, shift, -INT16_MIN).clamp_(0, INT16_MAX - INT16_MIN)
        return torch.take(self.gelu, b.index(index))

    def cross_entropy(self, a: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """-log softmax(logits)[target] in Q.16, with Q.10 logits from the tied head."""
        b = self.backend
        if isinstance(b, FusedCpuBackend):
            losses = torch.empty(a.shape[0], dtype=torch.int64)
            t = self.tables
            b.kernels.cross_entropy(
                torch.mm(a, self.lm_head).numpy(), targets.numpy(), t.loss_exp, t.log, t.ln2_multiples,
                LOG_MANTISSA_BITS, LOSS_EXP_BITS, 1 << (LOSS_BITS - SCORE_BITS), losses.numpy(),
            )  # fmt: skip
            return losses
        logits = b.linear(a, self.lm_head, self.lm_shift, 0)  # (n, vocab) Q.10
        shifted = logits.sub_(logits.amax(dim=-1, keepdim=True)).clamp_min_(-_LOSS_OFFSET)
        target_logit = shifted.gather(1, targets.unsqueeze(1)).squeeze(1)
        total = torch.take(self.loss_exp, b.index(shifted.add_(_LOSS_OFFSET))).sum(dim=-1)  # Q.32, [2**32, 2**40]
        exponent = torch.frexp(total.to(torch.float64)).exponent.to(total.dtype) - 1  # floor(log2 total)
        mantissa = b.round_shift(total, exponent - LOG_MANTISSA_BITS)  # in [2**15, 2**16]
        log_total = torch.take(self.log, b.index(mantissa - (1 << LOG_MANTISSA_BITS)))
        log_total = log_total + torch.take(self.ln2_multiples, b.index(exponent - LOSS_EXP_BITS))
        return log_total - target_logit * (1 << (LOSS_BITS - SCORE_BITS))
