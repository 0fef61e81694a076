"""The command line: user errors are one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import lzma
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from consensus.genesis import Genesis
from genesis import DEVNET, GENESIS_DIR
from tests.conftest import run_potchain
from training.weights import save_weights


def assert_user_error(completed: object, *fragments: str) -> None:
    assert completed.returncode == 2, completed.stdout  # type: ignore[attr-defined]
    stderr: str = completed.stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr, stderr
    assert stderr.startswith("potchain: error: "), stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def copy_genesis(tmp_path: Path) -> Path:
    shutil.copytree(GENESIS_DIR / "data", tmp_path / "data")
    target = tmp_path / "devnet.json"
    shutil.copy(DEVNET, target)
    return target


def test_eval_prints_one_json_line() -> None:
    completed = run_potchain("eval", "--genesis", "genesis/devnet.json", "--split", "test", "--seed", "3")
    assert completed.returncode == 0, completed.stderr
    result = completed.json()
    assert result["split"] == "test" and result["tokens"] == 32 * 128
    assert isinstance(result["loss_total"], int) and len(str(result["per_token_sha256"])) == 64


def test_eval_of_saved_weights_matches_in_process(devnet: Genesis, tmp_path: Path) -> None:
    weights = devnet.initial_weights()
    changed = weights.replace({"ln_f.weight": (weights.tensors["ln_f.weight"] // 2).astype(np.int16)})
    save_weights(changed, tmp_path / "w.safetensors")
    original = run_potchain("eval", "--seed", "1").json()
    loaded = run_potchain("eval", "--seed", "1", "--weights", str(tmp_path / "w.safetensors")).json()
    assert loaded["loss_total"] != original["loss_total"]


def test_corrupt_chunk(devnet: Genesis, tmp_path: Path) -> None:
    genesis_path = copy_genesis(tmp_path)
    document = devnet.dataset.split_documents("validation")[0]
    digest = document.chunks[0]
    chunk = tmp_path / "data" / "shakespeare" / f"{digest}.xz"
    data = bytearray(lzma.decompress(chunk.read_bytes()))
    data[0] ^= 0x20
    chunk.write_bytes(lzma.compress(bytes(data)))
    completed = run_potchain("eval", "--genesis", str(genesis_path), "--split", "validation")
    assert_user_error(completed, f"chunk {digest}", document.name, "sha256 mismatch")


def test_genesis_with_missing_or_wrong_field(tmp_path: Path) -> None:
    genesis_path = copy_genesis(tmp_path)
    document = json.loads(genesis_path.read_text())
    del document["model"]["layers"]
    genesis_path.write_text(json.dumps(document))
    assert_user_error(run_potchain("eval", "--genesis", str(genesis_path)), "model.layers: missing")
    document = json.loads(DEVNET.read_text())
    document["evaluation"]["validation_sequences"] = "many"
    genesis_path.write_text(json.dumps(document))
    assert_user_error(run_potchain("eval", "--genesis", str(genesis_path)), "evaluation.validation_sequences")
    assert_user_error(run_potchain("eval", "--genesis", str(tmp_path / "absent.json")), "cannot read genesis")


def test_weights_of_wrong_shape_or_exponent(devnet: Genesis, tmp_path: Path) -> None:
    weights = devnet.initial_weights()
    tensors = {name: np.ascontiguousarray(v) for name, v in weights.tensors.items()}
    exponents = dict(devnet.exponents)
    tensors["wpe.weight"] = np.zeros((64, 64), dtype=np.int16)
    path = tmp_path / "shape.safetensors"
    save_file(tensors, str(path), {"format": "potchain-canonical-weights-1", "exponents": json.dumps(exponents)})
    assert_user_error(run_potchain("eval", "--weights", str(path)), "wpe.weight: shape (64, 64), want (128, 64)")

    tensors = {name: np.ascontiguousarray(v) for name, v in weights.tensors.items()}
    exponents["h.2.attn.c_attn.weight"] = 13
    path = tmp_path / "exponent.safetensors"
    save_file(tensors, str(path), {"format": "potchain-canonical-weights-1", "exponents": json.dumps(exponents)})
    assert_user_error(run_potchain("eval", "--weights", str(path)), "h.2.attn.c_attn.weight: exponent 13")


def test_bad_arguments() -> None:
    assert_user_error(run_potchain("eval", "--threads", "0"), "--threads must be at least 1")
    assert_user_error(run_potchain("eval", "--seed", "-1"), "seed -1")
    if not torch.cuda.is_available():
        assert_user_error(run_potchain("eval", "--device", "cuda"), "no CUDA device")
        assert_user_error(run_potchain("mine", "--rpc", "http://127.0.0.1:9", "--device", "cuda"), "no CUDA device")
