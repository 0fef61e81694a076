"""The canonical evaluator: exact, backend-independent, and faithful to the float model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import training.evaluate as evaluate
from consensus.genesis import Genesis
from training.data import sample_batch, seed_from_int
from training.evaluate import CanonicalEvaluator, ProgramBoundsError, make_backend, validate_program_bounds
from training.model import GPT, ModelConfig
from training.weights import CanonicalWeights, SliceLayout, quantize

SLICE = 0


def float_loss(weights: CanonicalWeights, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean loss of the float64 model holding exactly these weights."""
    model = weights.to_model().double().eval()
    with torch.no_grad():
        return float(model.loss(inputs, targets))


def canonical_loss(devnet: Genesis, weights: CanonicalWeights, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    evaluator = CanonicalEvaluator(weights, devnet.tables(), make_backend("torch-f64"))
    return evaluator.per_token_losses(inputs, targets).mean_loss


def train_slice_float(devnet: Genesis, train_text: bytes, steps: int, learning_rate: float) -> GPT:
    """Adam on slice 0's elements only (the others frozen by a gradient mask)."""
    torch.manual_seed(0)
    layout = SliceLayout(devnet.model, devnet.partition)
    model = devnet.initial_weights().to_model()
    masks = {}
    for name, parameter in model.named_parameters():
        mask = torch.zeros(parameter.numel())
        mask[torch.tensor(layout.indices[SLICE][name])] = 1.0
        masks[name] = mask.view_as(parameter)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    for step in range(steps):
        inputs, targets = sample_batch(train_text, seed_from_int(1000 + step), 16, devnet.model.context)
        optimizer.zero_grad()
        model.loss(inputs, targets).backward()
        for name, parameter in model.named_parameters():
            assert parameter.grad is not None
            parameter.grad.mul_(masks[name])
        optimizer.step()
    return model


def canonical_slice_update(devnet: Genesis, model: GPT) -> CanonicalWeights:
    """Genesis weights with slice 0 replaced by the quantized trained values."""
    start = devnet.initial_weights()
    layout = SliceLayout(devnet.model, devnet.partition)
    quantized = {name: quantize(value, devnet.exponents[name]) for name, value in model.state_dict().items()}
    return layout.apply(start, SLICE, layout.extract(start.replace(quantized), SLICE))


@pytest.fixture(scope="module")
def batch(devnet: Genesis, validation_text: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    return sample_batch(validation_text, seed_from_int(7), devnet.evaluation.validation_sequences, 128)


@pytest.fixture(scope="module")
def trained(devnet: Genesis, train_text: bytes) -> CanonicalWeights:
    return canonical_slice_update(devnet, train_slice_float(devnet, train_text, steps=30, learning_rate=3e-3))


def test_backends_agree_bit_for_bit(
    devnet: Genesis, trained: CanonicalWeights, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    for weights in (devnet.initial_weights(), trained):
        results = [
            CanonicalEvaluator(weights, devnet.tables(), make_backend(name)).per_token_losses(*batch)
            for name in ("cpu-fused", "torch-f64", "torch-int64")
        ]
        assert np.array_equal(results[0].per_token, results[1].per_token)
        assert np.array_equal(results[0].per_token, results[2].per_token)
        assert results[0].tokens == 32 * 128


def test_attention_blocking_does_not_change_results(
    devnet: Genesis,
    trained: CanonicalWeights,
    batch: tuple[torch.Tensor, torch.Tensor],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for backend in ("cpu-fused", "torch-f64"):
        evaluator = CanonicalEvaluator(trained, devnet.tables(), make_backend(backend))
        reference = evaluator.per_token_losses(*batch).per_token
        for block in (7, 128):
            monkeypatch.setattr(evaluate, "ATTENTION_BLOCK", block)
            assert np.array_equal(evaluator.per_token_losses(*batch).per_token, reference)
        monkeypatch.undo()


def test_canonical_loss_tracks_float_loss(
    devnet: Genesis, trained: CanonicalWeights, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    for weights in (devnet.initial_weights(), trained):
        assert abs(canonical_loss(devnet, weights, *batch) - float_loss(weights, *batch)) < 2e-4


def test_per_token_losses_are_sane(devnet: Genesis, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    result = CanonicalEvaluator(devnet.initial_weights(), devnet.tables(), make_backend("torch-f64")).per_token_losses(
        *batch
    )
    assert result.per_token.dtype == np.int64
    assert result.per_token.min() > 0
    # An untrained byte model is close to uniform over 256 symbols.
    assert abs(result.mean_loss - np.log(256)) < 0.1
    assert result.loss_total == int(result.per_token.sum())


def test_quantization_keeps_the_training_signal(
    devnet: Genesis, train_text: bytes, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    """A few Adam steps on one slice: the canonical loss change has the sign and,
    within 10%, the size of the float change (float weights, not quantized)."""
    start = devnet.initial_weights()
    model = train_slice_float(devnet, train_text, steps=5, learning_rate=1e-3)
    with torch.no_grad():
        float_change = float(model.double().loss(*batch)) - float_loss(start, *batch)
    after = canonical_slice_update(devnet, model)
    canonical_change = canonical_loss(devnet, after, *batch) - canonical_loss(devnet, start, *batch)
    assert float_change < -0.01
    assert canonical_change < 0
    assert abs(canonical_change - float_change) <= 0.1 * abs(float_change)


def test_program_bounds_are_enforced() -> None:
    config = ModelConfig(vocab_size=256, context=128, layers=1, heads=1, width=1 << 16)
    with pytest.raises(ProgramBoundsError, match="limit 2\\*\\*53"):
        validate_program_bounds(config, {})
    with pytest.raises(ProgramBoundsError, match="not a power of 4"):
        validate_program_bounds(ModelConfig(256, 128, 1, 2, 64), {})


def test_cuda_request_without_cuda_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="no CUDA device"):
        make_backend("torch-f64", "cuda")
