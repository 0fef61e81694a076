"""Canonical weights: int16 tensors with a power-of-two exponent fixed at genesis.

A tensor with exponent `e` and stored integers `q` means the real weights
`q * 2**-e`. Stored integers lie in [-32767, 32767] (the int16 range without
-32768, so the format is symmetric). The model's tensors are divided into
slices by a partition fixed at genesis; a slice's content is the int16 values
of its elements in canonical order, and its SHA-256 is the slice hash.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from training.model import GPT, ModelConfig

WEIGHT_MAX = 32767
"""Largest magnitude of a stored weight integer."""
FILE_FORMAT = "potchain-canonical-weights-1"

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_IRWIN_HALL_STD = 75674
"""Standard deviation (rounded) of 2 * (w1 + w2 + w3 + w4) - 4 * 65535, w uniform on [0, 65535]."""


class WeightsError(ValueError):
    """Weights that do not fit the genesis format: wrong names, shapes, exponents or values."""


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor is stored and initialized; fixed by genesis."""

    exponent: int
    """Stored integer q means q * 2**-exponent."""
    init_std: int
    """Standard deviation of the initial integers (0 with `init_constant`)."""
    init_constant: int
    """Every initial integer equals this when `init_std` is 0."""


@dataclass(frozen=True)
class Partition:
    """A fixed random subset of every tensor per slice ("random-mask")."""

    slices: int
    """Number of slices."""
    seed: int
    """Seed of the element-to-slice assignment."""


def splitmix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64 finalizer applied to uint64 `values` (wrapping arithmetic)."""
    z = (values + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return z ^ (z >> np.uint64(31))


def _stream(domain: bytes, seed: int, name: str, count: int) -> np.ndarray:
    """`count` pseudo-random uint64 values for one tensor: splitmix64(key + j)."""
    key_bytes = hashlib.sha256(domain + seed.to_bytes(8, "big") + name.encode("ascii")).digest()[:8]
    key = np.uint64(int.from_bytes(key_bytes, "big"))
    with np.errstate(over="ignore"):
        return splitmix64(np.arange(count, dtype=np.uint64) + key)


@dataclass(frozen=True)
class CanonicalWeights:
    """The model's weights in canonical form. Arrays are read-only int16."""

    config: ModelConfig
    """Shape of the model."""
    exponents: Mapping[str, int]
    """Each tensor's exponent, in canonical tensor order."""
    tensors: Mapping[str, np.ndarray]
    """Each tensor's stored integers (int16, read-only), in canonical tensor order."""

    def real(self, name: str) -> torch.Tensor:
        """Dequantized float32 values of one tensor."""
        return dequantize(self.tensors[name], self.exponents[name])

    def to_model(self) -> GPT:
        """A float32 model holding exactly these weights."""
        model = GPT(self.config)
        state = {name: self.real(name) for name in self.tensors}
        model.load_state_dict(state, strict=True)
        return model

    def replace(self, updates: Mapping[str, np.ndarray]) -> CanonicalWeights:
        """A copy with some tensors replaced (validated)."""
        tensors = dict(self.tensors)
        for name, values in updates.items():
            tensors[name] = values
        return make_weights(self.config, self.exponents, tensors)


def make_weights(
    config: ModelConfig, exponents: Mapping[str, int], tensors: Mapping[str, np.ndarray]
) -> CanonicalWeights:
    """Validate names, shapes, dtype and range; return read-only canonical weights."""
    shapes = config.tensor_shapes()
    if list(exponents) != list(shapes):
        raise WeightsError(f"exponents: got tensors {list(exponents)}, want {list(shapes)}")
    missing = [name for name in shapes if name not in tensors]
    extra = [name for name in tensors if name not in shapes]
    if missing or extra:
        raise WeightsError(f"tensors: missing {missing}, unexpected {extra}")
    frozen: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        values = np.asarray(tensors[name])
        if values.shape != shape:
            raise WeightsError(f"{name}: shape {tuple(values.shape)}, want {shape}")
        if values.dtype != np.int16:
            raise WeightsError(f"{name}: dtype {values.dtype}, want int16")
        if values.size and int(values.min()) < -WEIGHT_MAX:
            raise WeightsError(f"{name}: value {int(values.min())} below -{WEIGHT_MAX}")
        copy = np.array(values, dtype=np.int16, copy=True)
        copy.flags.writeable = False
        frozen[name] = copy
    return CanonicalWeights(config=config, exponents=dict(exponents), tensors=frozen)


def quantize(values: torch.Tensor, exponent: int) -> np.ndarray:
    """round_half_up(values * 2**exponent), clipped to [-32767, 32767], as int16."""
    scaled = values.detach().to(torch.float64).cpu() * float(2**exponent)
    if not bool(torch.isfinite(scaled).all()):
        raise WeightsError("cannot quantize a tensor holding NaN or infinity")
    rounded = torch.floor(scaled + 0.5).clamp(-WEIGHT_MAX, WEIGHT_MAX)
    return rounded.to(torch.int16).numpy()


def dequantize(values: np.ndarray, exponent: int) -> torch.Tensor:
    """values * 2**-exponent as float32 (exact: |values| < 2**15)."""
    return torch.from_numpy(values.astype(np.float32)) * float(2.0**-exponent)


def from_model(model: GPT, exponents: Mapping[str, int]) -> CanonicalWeights:
    """Quantize a float model's weights to canonical form."""
    state = model.state_dict()
    tensors = {name: quantize(state[name], exponent) for name, exponent in exponents.items()}
    return make_weights(model.config, exponents, tensors)


def initial_weights(config: ModelConfig, specs: Mapping[str, TensorSpec], seed: int) -> CanonicalWeights:
    """Genesis weights, from integer arithmetic only (identical on every machine).

    For a tensor with `init_std` s > 0, element j takes the 64-bit value
    r = splitmix64(key + j), key = the first 8 bytes (big-endian) of
    sha256(b"potchain/init" || seed as 8 bytes || tensor name). Its four 16-bit
    words w1..w4 give the Irwin-Hall sample d = 2 * (w1 + w2 + w3 + w4) - 4 * 65535
    (mean 0, standard deviation ~75674), and the weight is
    floor((d * s + 37837) / 75674), clipped to [-32767, 32767].
    """
    tensors: dict[str, np.ndarray] = {}
    for name, shape in config.tensor_shapes().items():
        spec = specs[name]
        count = math.prod(shape)
        if spec.init_std == 0:
            tensors[name] = np.full(shape, spec.init_constant, dtype=np.int16)
            continue
        random = _stream(b"potchain/init", seed, name, count)
        words = sum(((random >> np.uint64(16 * k)) & np.uint64(0xFFFF)).astype(np.int64) for k in range(4))
        deviation = 2 * words - 4 * 65535
        values = np.floor_divide(deviation * spec.init_std + _IRWIN_HALL_STD // 2, _IRWIN_HALL_STD)
        tensors[name] = np.clip(values, -WEIGHT_MAX, WEIGHT_MAX).astype(np.int16).reshape(shape)
    return make_weights(config, {name: specs[name].exponent for name in specs}, tensors)


class SliceLayout:
    """Which elements of every tensor belong to each slice.

    For each tensor, element j gets the key h_j = splitmix64(key + j), key from
    sha256(b"potchain/partition" || seed || tensor name); elements sorted by h_j
    (a permutation: splitmix64 is a bijection) are dealt to slices 0, 1, ...,
    S-1, 0, 1, ... in turn. A slice lists its elements in ascending index order.
    """

    def __init__(self, config: ModelConfig, partition: Partition) -> None:
        self.config = config
        self.partition = partition

    @cached_property
    def indices(self) -> list[dict[str, np.ndarray]]:
        """indices[s][name]: flat element indices of tensor `name` in slice s."""
        count = self.partition.slices
        result: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
        for name, shape in self.config.tensor_shapes().items():
            keys = _stream(b"potchain/partition", self.partition.seed, name, math.prod(shape))
            order = np.argsort(keys, kind="stable")
            for slice_id in range(count):
                chosen = np.sort(order[slice_id::count])
                chosen.flags.writeable = False
                result[slice_id][name] = chosen
        return result

    def slice_size(self, slice_id: int) -> int:
        return sum(len(index) for index in self.indices[slice_id].values())

    def extract(self, weights: CanonicalWeights, slice_id: int) -> np.ndarray:
        """The slice's int16 values, tensors in canonical order."""
        parts = [weights.tensors[name].reshape(-1)[index] for name, index in self.indices[slice_id].items()]
        return np.concatenate(parts).astype(np.int16)

    def slice_hash(self, weights: CanonicalWeights, slice_id: int) -> str:
        """SHA-256 of the slice's values as little-endian int16."""
        return hashlib.sha256(self.extract(weights, slice_id).astype("<i2").tobytes()).hexdigest()

    def slice_hashes(self, weights: CanonicalWeights) -> list[str]:
        return [self.slice_hash(weights, slice_id) for slice_id in range(self.partition.slices)]

    def assemble(self, exponents: Mapping[str, int], slices: list[np.ndarray]) -> CanonicalWeights:
        """Weights from every slice's values (the slices cover every element once)."""
        if len(slices) != self.partition.slices:
            raise WeightsError(f"{len(slices)} slices, want {self.partition.slices}")
        shapes = self.config.tensor_shapes()
        flat = {name: np.empty(math.prod(shape), dtype=np.int16) for name, shape in shapes.items()}
        for slice_id, values in enumerate(slices):
            if values.shape != (self.slice_size(slice_id),):
                raise WeightsError(f"slice {slice_id}: {values.shape} values, want ({self.slice_size(slice_id)},)")
            offset = 0
            for name, index in self.indices[slice_id].items():
                flat[name][index] = values[offset : offset + len(index)]
                offset += len(index)
        return make_weights(self.config, exponents, {name: flat[name].reshape(shapes[name]) for name in shapes})

    def apply(self, weights: CanonicalWeights, slice_id: int, values: np.ndarray) -> CanonicalWeights:
        """Weights with one slice's values replaced."""
        expected = self.slice_size(slice_id)
        if values.shape != (expected,):
            raise WeightsError(f"slice {slice_id}: {values.shape} values, want ({expected},)")
        updates: dict[str, np.ndarray] = {}
        offset = 0
        for name, index in self.indices[slice_id].items():
            flat = weights.tensors[name].reshape(-1).copy()
            flat[index] = values[offset : offset + len(index)]
            offset += len(index)
            updates[name] = flat.reshape(weights.tensors[name].shape)
        return weights.replace(updates)


def encode_weights(weights: CanonicalWeights) -> bytes:
    """Canonical weights as safetensors bytes (int16 tensors, exponents in metadata)."""
    from safetensors.numpy import save

    metadata = {"format": FILE_FORMAT, "exponents": json.dumps(dict(weights.exponents))}
    return save({name: np.ascontiguousarray(v) for name, v in weights.tensors.items()}, metadata)


def save_weights(weights: CanonicalWeights, path: Path) -> None:
    """Write canonical weights as a safetensors file (`encode_weights`)."""
    path.write_bytes(encode_weights(weights))


def load_weights(path: Path, config: ModelConfig, exponents: Mapping[str, int]) -> CanonicalWeights:
    """Read and validate a canonical weights file against the genesis format."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such file") from None
    except (SafetensorError, OSError, ValueError) as error:
        raise WeightsError(f"{path}: not a safetensors file ({error})") from None
    if metadata.get("format") != FILE_FORMAT:
        raise WeightsError(f"{path}: metadata format {metadata.get('format')!r}, want {FILE_FORMAT!r}")
    try:
        stored_exponents = json.loads(metadata.get("exponents", ""))
    except json.JSONDecodeError:
        raise WeightsError(f"{path}: metadata 'exponents' is not JSON") from None
    if not isinstance(stored_exponents, dict):
        raise WeightsError(f"{path}: metadata 'exponents' is not a mapping")
    for name, exponent in exponents.items():
        if stored_exponents.get(name) != exponent:
            raise WeightsError(f"{path}: {name}: exponent {stored_exponents.get(name)}, genesis has {exponent}")
    try:
        return make_weights(config, exponents, tensors)
    except WeightsError as error:
        raise WeightsError(f"{path}: {error}") from None
