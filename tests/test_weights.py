"""Canonical weights: initialization, slices, files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from consensus.genesis import Genesis
from training.weights import (
    WEIGHT_MAX,
    SliceLayout,
    WeightsError,
    dequantize,
    from_model,
    load_weights,
    quantize,
    save_weights,
)


def test_initial_weights_are_reproducible_and_shaped_like_nanogpt(devnet: Genesis) -> None:
    first, second = devnet.initial_weights(), devnet.initial_weights()
    for name in devnet.model.tensor_names():
        assert np.array_equal(first.tensors[name], second.tensors[name])
    wte = first.real("wte.weight")
    assert abs(float(wte.std()) - 0.02) < 0.001
    assert abs(float(wte.mean())) < 0.001
    assert torch.equal(first.real("h.0.ln_1.weight"), torch.ones(devnet.model.width))
    proj = first.real("h.0.mlp.c_proj.weight")
    assert abs(float(proj.std()) - 0.02 / (2 * devnet.model.layers) ** 0.5) < 0.0005


def test_partition_is_a_balanced_disjoint_cover_of_every_tensor(devnet: Genesis) -> None:
    layout = SliceLayout(devnet.model, devnet.partition)
    count = devnet.partition.slices
    for name, shape in devnet.model.tensor_shapes().items():
        size = int(np.prod(shape))
        seen = np.concatenate([layout.indices[s][name] for s in range(count)])
        assert np.array_equal(np.sort(seen), np.arange(size)), name
        sizes = [len(layout.indices[s][name]) for s in range(count)]
        assert max(sizes) - min(sizes) <= 1, name


def test_slice_extract_apply_round_trip_changes_only_that_slice(devnet: Genesis) -> None:
    weights = devnet.initial_weights()
    layout = SliceLayout(devnet.model, devnet.partition)
    before = layout.slice_hashes(weights)
    values = layout.extract(weights, 1)
    changed = layout.apply(weights, 1, (values // 2).astype(np.int16))
    after = layout.slice_hashes(changed)
    assert after[1] != before[1]
    assert [after[i] for i in (0, 2, 3)] == [before[i] for i in (0, 2, 3)]
    restored = layout.apply(changed, 1, values)
    assert layout.slice_hashes(restored) == before
    with pytest.raises(WeightsError, match="slice 1"):
        layout.apply(weights, 1, values[:-1])


def test_quantize_rounds_half_up_clips_and_rejects_non_finite() -> None:
    values = torch.tensor([0.5, -0.5, 1.5, 100.0, -100.0, 2.0**-14 * 3]) * 2.0**-14
    assert quantize(values, 14).tolist() == [1, 0, 2, 100, -100, 0]
    assert quantize(torch.tensor([10.0, -10.0]), 14).tolist() == [WEIGHT_MAX, -WEIGHT_MAX]
    with pytest.raises(WeightsError, match="NaN"):
        quantize(torch.tensor([float("nan")]), 14)
    q = np.array([123, -32767], dtype=np.int16)
    assert quantize(dequantize(q, 12), 12).tolist() == q.tolist()


def test_float_model_round_trip_is_exact(devnet: Genesis) -> None:
    weights = devnet.initial_weights()
    again = from_model(weights.to_model(), devnet.exponents)
    for name in weights.tensors:
        assert np.array_equal(weights.tensors[name], again.tensors[name])


def test_weights_file_round_trip_and_errors(devnet: Genesis, tmp_path: Path) -> None:
    weights = devnet.initial_weights()
    path = tmp_path / "w.safetensors"
    save_weights(weights, path)
    loaded = load_weights(path, devnet.model, devnet.exponents)
    assert all(np.array_equal(loaded.tensors[n], weights.tensors[n]) for n in weights.tensors)

    wrong_exponent = dict(devnet.exponents)
    wrong_exponent["wpe.weight"] += 1
    with pytest.raises(WeightsError, match=r"wpe\.weight: exponent 14, genesis has 15"):
        load_weights(path, devnet.model, wrong_exponent)

    from safetensors.numpy import save_file

    tensors = {name: np.ascontiguousarray(v) for name, v in weights.tensors.items()}
    tensors["ln_f.weight"] = np.zeros(3, dtype=np.int16)
    save_file(tensors, str(path), {"format": "potchain-canonical-weights-1", "exponents": json.dumps(devnet.exponents)})
    with pytest.raises(WeightsError, match=r"ln_f\.weight: shape \(3,\), want \(64,\)"):
        load_weights(path, devnet.model, devnet.exponents)

    path.write_bytes(b"not a weights file")
    with pytest.raises(WeightsError, match="not a safetensors file"):
        load_weights(path, devnet.model, devnet.exponents)
