"""Text from the chain's model: its canonical weights, dequantized to float32, sampled byte by byte.

The model is byte-level (vocabulary 256): a prompt is its UTF-8 bytes, and the
sampled bytes are decoded with errors="replace" (a multi-byte character cut at
the end, or bytes that are no UTF-8 at all, show as U+FFFD). Sampling is
`GPT.generate`, seeded: the same weights, prompt, settings and seed give the
same text on the same device and PyTorch build.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.model import GPT
from training.weights import CanonicalWeights

MAX_NEW_TOKENS = 256
"""Most bytes one sample generates."""
MAX_PROMPT_CHARACTERS = 1024
"""Longest prompt, in characters (the model sees only its context's last bytes of it anyway)."""
DEFAULT_TEMPERATURE = 0.8
"""Softmax temperature when none is given."""
MAX_TEMPERATURE = 2.0
"""Highest temperature allowed (higher is close to uniform noise)."""
MAX_SEED = (1 << 63) - 1
"""Largest seed."""


class SampleError(ValueError):
    """Sample settings or a prompt out of range (the message names the field)."""


@dataclass(frozen=True)
class SampleSettings:
    """How to sample a continuation; validated on construction (`SampleError`)."""

    tokens: int
    """Bytes to generate, 1 to MAX_NEW_TOKENS."""
    temperature: float = DEFAULT_TEMPERATURE
    """Softmax temperature, in (0, MAX_TEMPERATURE]."""
    top_k: int | None = None
    """Sample among the k likeliest bytes only (1 to 256), or among all (None)."""
    seed: int = 0
    """Seed of the sampling generator, 0 to MAX_SEED."""

    def __post_init__(self) -> None:
        if not 1 <= self.tokens <= MAX_NEW_TOKENS:
            raise SampleError(f"tokens: got {self.tokens}, want 1 to {MAX_NEW_TOKENS}")
        if not 0 < self.temperature <= MAX_TEMPERATURE:  # NaN fails too
            raise SampleError(f"temperature: got {self.temperature}, want more than 0 and at most {MAX_TEMPERATURE}")
        if self.top_k is not None and not 1 <= self.top_k <= 256:
            raise SampleError(f"top_k: got {self.top_k}, want 1 to 256")
        if not 0 <= self.seed <= MAX_SEED:
            raise SampleError(f"seed: got {self.seed}, want 0 to {MAX_SEED}")


def check_prompt(prompt: str) -> bytes:
    """The prompt's UTF-8 bytes; SampleError if it is empty, too long or not encodable
    (a lone surrogate, which no UTF-8 text holds)."""
    if not prompt:
        raise SampleError("prompt: empty, want at least one character")
    if len(prompt) > MAX_PROMPT_CHARACTERS:
        raise SampleError(f"prompt: {len(prompt)} characters, want at most {MAX_PROMPT_CHARACTERS}")
    try:
        return prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise SampleError(f"prompt: not UTF-8 text ({error.reason} at character {error.start})") from None


def sample_bytes(model: GPT, prompt: bytes, settings: SampleSettings) -> bytes:
    """The bytes `model` generates after `prompt`, on the model's device."""
    if not prompt:
        raise SampleError("prompt: empty, want at least one byte")
    device = model.wte.weight.device
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    tokens = torch.tensor([list(prompt)], dtype=torch.long, device=device)  # (1, prompt bytes)
    out = model.generate(tokens, settings.tokens, settings.temperature, settings.top_k, generator)
    return bytes(out[0, len(prompt) :].tolist())


def float_model(weights: CanonicalWeights, device: torch.device | str = "cpu") -> GPT:
    """The float32 model holding exactly the canonical weights' values, on `device`, in eval mode."""
    model = weights.to_model().to(device)
    model.eval()
    return model


def sample_text(
    weights: CanonicalWeights, prompt: str, settings: SampleSettings, device: torch.device | str = "cpu"
) -> str:
    """The text the chain's model (canonical `weights`, as float32 on `device`) continues `prompt` with."""
    generated = sample_bytes(float_model(weights, device), check_prompt(prompt), settings)
    return generated.decode("utf-8", errors="replace")
