"""The chain's model as plain float32 files for PyTorch users, and as a Hugging Face GPT-2.

`encode_float_weights` dequantizes canonical weights (int16 * 2**-exponent,
exact in float32) into a safetensors file named as `training.model`, whose
metadata says what model it is and where on the chain it comes from.
`write_export` turns that file into a directory:

- `model.safetensors`: the float32 tensors (load into `training.model.GPT`);
- `config.json`: the model's shape (`ModelConfig`'s fields), its LayerNorm
  epsilon and the chain origin;
- `README.md`: the few lines that load and sample it;
- `hf/`: the same model as a transformers `GPT2LMHeadModel` (`hf_config`,
  `hf_state_dict`).

The model maps exactly onto GPT-2: learned positions, pre-LayerNorm, exact
GELU (transformers' activation "gelu"), a head tied to the token embedding.
Our LayerNorms and linears have no bias: GPT-2's are zeros. GPT-2's `Conv1D`
stores a linear map as (in, out), the transpose of `nn.Linear`'s weight.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from training.model import LAYERNORM_EPS, ModelConfig
from training.weights import CanonicalWeights

FLOAT_FORMAT = "potchain-float-weights-1"
"""The `format` in a float weights file's metadata."""
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
README_FILE = "README.md"
HF_DIRECTORY = "hf"


class ExportError(ValueError):
    """A float weights file that is not one: wrong format, metadata, names, shapes or dtype."""


@dataclass(frozen=True)
class ModelOrigin:
    """Where on the chain a model comes from (written into every export)."""

    chain_id: str
    """The network's chain id."""
    genesis_hash: str
    """The genesis document's hash, hex."""
    height: int
    """The decided height whose model this is (0: genesis)."""
    block_hash: str
    """The decided block at that height, hex."""


@dataclass(frozen=True)
class FloatModel:
    """A decoded float weights file."""

    config: ModelConfig
    """Shape of the model."""
    origin: ModelOrigin
    """Where on the chain it comes from."""
    tensors: Mapping[str, torch.Tensor]
    """float32 tensors named as `training.model`, in canonical order."""


# --- The float weights file -----------------------------------------------------------


def float_tensors(weights: CanonicalWeights) -> dict[str, torch.Tensor]:
    """Every tensor dequantized to float32 (exact), in canonical order."""
    return {name: weights.real(name).contiguous() for name in weights.config.tensor_names()}


def encode_float_weights(weights: CanonicalWeights, origin: ModelOrigin) -> bytes:
    """Canonical weights as float32 safetensors bytes, with the model and its origin in the metadata."""
    from safetensors.torch import save

    metadata = {
        "format": FLOAT_FORMAT,
        "model": json.dumps(asdict(weights.config)),
        "layernorm_eps": repr(LAYERNORM_EPS),
        "origin": json.dumps(asdict(origin)),
    }
    return save(float_tensors(weights), metadata)


def decode_float_weights(data: bytes) -> FloatModel:
    """Read and check a float weights file (`encode_float_weights`)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(data)
        metadata = _safetensors_metadata(data)
    except (SafetensorError, ValueError) as error:
        raise ExportError(f"not a safetensors file ({error})") from None
    if metadata.get("format") != FLOAT_FORMAT:
        raise ExportError(f"metadata format {metadata.get('format')!r}, want {FLOAT_FORMAT!r}")
    try:
        config = ModelConfig(**json.loads(metadata["model"]))
        origin = ModelOrigin(**json.loads(metadata["origin"]))
    except (KeyError, TypeError, ValueError) as error:
        raise ExportError(f"metadata 'model' or 'origin' unreadable ({error!r})") from None
    shapes = config.tensor_shapes()
    if sorted(tensors) != sorted(shapes):
        raise ExportError(f"tensors: got {sorted(tensors)}, want {sorted(shapes)}")
    for name, shape in shapes.items():
        if tuple(tensors[name].shape) != shape or tensors[name].dtype != torch.float32:
            got = f"{tuple(tensors[name].shape)} {tensors[name].dtype}"
            raise ExportError(f"{name}: got {got}, want {shape} torch.float32")
    return FloatModel(config, origin, {name: tensors[name] for name in shapes})


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file's JSON header."""
    if len(data) < 8:
        raise ValueError("shorter than a header")
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    metadata = header.get("__metadata__", {}) if isinstance(header, dict) else {}
    return {str(key): str(value) for key, value in metadata.items()}


# --- Hugging Face transformers ----------------------------------------------------------


def hf_config(config: ModelConfig) -> dict[str, Any]:
    """The `config.json` of a transformers GPT2LMHeadModel that computes our model."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.context,
        "n_embd": config.width,
        "n_layer": config.layers,
        "n_head": config.heads,
        "n_inner": 4 * config.width,
        "activation_function": "gelu",
        "layer_norm_epsilon": LAYERNORM_EPS,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "dtype": "float32",
    }


def hf_state_dict(config: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors under GPT2LMHeadModel's names: linear weights transposed to Conv1D's
    (in, out), zero biases; the head is tied to `transformer.wte.weight`, so not stored."""
    state = {
        "transformer.wte.weight": tensors["wte.weight"],
        "transformer.wpe.weight": tensors["wpe.weight"],
    }
    for i in range(config.layers):
        ours, theirs = f"h.{i}", f"transformer.h.{i}"
        for norm in ("ln_1", "ln_2"):
            state[f"{theirs}.{norm}.weight"] = tensors[f"{ours}.{norm}.weight"]
            state[f"{theirs}.{norm}.bias"] = torch.zeros(config.width)
        for linear in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
            weight = tensors[f"{ours}.{linear}.weight"]  # nn.Linear: (out, in)
            state[f"{theirs}.{linear}.weight"] = weight.t().contiguous()  # Conv1D: (in, out)
            state[f"{theirs}.{linear}.bias"] = torch.zeros(weight.shape[0])
    state["transformer.ln_f.weight"] = tensors["ln_f.weight"]
    state["transformer.ln_f.bias"] = torch.zeros(config.width)
    return state


# --- The export directory -------------------------------------------------------------


def write_export(out: Path, data: bytes) -> list[Path]:
    """Write a float weights file (`encode_float_weights`'s bytes, checked) as an export
    directory: model.safetensors, config.json, README.md and hf/. The files written."""
    from safetensors.torch import save

    model = decode_float_weights(data)
    out.mkdir(parents=True, exist_ok=True)
    (out / HF_DIRECTORY).mkdir(exist_ok=True)
    config = {"model": asdict(model.config), "layernorm_eps": LAYERNORM_EPS, "origin": asdict(model.origin)}
    hf_weights = save(hf_state_dict(model.config, model.tensors), {"format": "pt"})
    files = {
        out / WEIGHTS_FILE: data,
        out / CONFIG_FILE: (json.dumps(config, indent=2) + "\n").encode(),
        out / README_FILE: readme(model).encode(),
        out / HF_DIRECTORY / CONFIG_FILE: (json.dumps(hf_config(model.config), indent=2) + "\n").encode(),
        out / HF_DIRECTORY / WEIGHTS_FILE: hf_weights,
    }
    for path, content in files.items():
        _write_replacing(path, content)
    return list(files)


def _write_replacing(path: Path, content: bytes) -> None:
    """Write through a temporary file renamed over `path`: a reader sees the old file or the new."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_bytes(content)
    os.replace(temporary, path)


def readme(model: FloatModel) -> str:
    """The export's README: what it is and the lines that load it (tests/test_model_view.py runs them)."""
    config, origin = model.config, model.origin
    return f"""# potchain model at height {origin.height}

The model of the potchain network `{origin.chain_id}` (genesis `{origin.genesis_hash}`)
after its decided block {origin.height} (`{origin.block_hash}`), dequantized exactly
from the chain's int16 weights to float32.

A byte-level GPT: {config.layers} layers, {config.heads} heads, width {config.width},
a context of {config.context} bytes; tokens are bytes (vocabulary {config.vocab_size}),
so text goes in as its UTF-8 bytes. {config.parameter_count():,} weights.

- `{WEIGHTS_FILE}`: float32 tensors named as potchain's `training/model.py`.
- `{CONFIG_FILE}`: the shape (`model`), the LayerNorm epsilon and the chain origin.
- `{HF_DIRECTORY}/`: the same model as a Hugging Face transformers `GPT2LMHeadModel`
  (zero biases, exact GELU, the head tied to the token embedding).

## Load it with PyTorch and potchain

From this directory, with potchain installed:

```python
import json

import torch
from safetensors.torch import load_file

from training.model import GPT, ModelConfig

with open("{CONFIG_FILE}") as file:
    config = ModelConfig(**json.load(file)["model"])
model = GPT(config)
model.load_state_dict(load_file("{WEIGHTS_FILE}"))
model.eval()
```

Sample from it:

```python
prompt = torch.tensor([list("ROMEO:".encode())])
out = model.generate(prompt, 200, temperature=0.8, top_k=40, generator=torch.Generator().manual_seed(0))
print(bytes(out[0].tolist()).decode(errors="replace"))
```

## Load it with transformers

From this directory, without potchain:

```python
import torch
from transformers import GPT2LMHeadModel

model = GPT2LMHeadModel.from_pretrained("{HF_DIRECTORY}")
logits = model(torch.tensor([list("ROMEO:".encode())])).logits
```
"""
