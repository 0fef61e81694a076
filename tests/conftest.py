"""Shared fixtures: the devnet genesis, its splits, and a CLI runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from consensus.genesis import Genesis
from genesis import DEVNET, chunk_directory, load_genesis
from training.data import load_split

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def devnet() -> Genesis:
    return load_genesis(DEVNET)


@pytest.fixture(scope="session")
def validation_text(devnet: Genesis) -> bytes:
    return load_split(devnet.dataset, chunk_directory(DEVNET, devnet), "validation")


@pytest.fixture(scope="session")
def train_text(devnet: Genesis) -> bytes:
    return load_split(devnet.dataset, chunk_directory(DEVNET, devnet), "train")


@dataclass
class Completed:
    returncode: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, object]:
        lines = self.stdout.strip().splitlines()
        assert len(lines) == 1, self.stdout
        value = json.loads(lines[0])
        assert isinstance(value, dict)
        return value


def run_potchain(*args: str, env: dict[str, str] | None = None, timeout: float = 300) -> Completed:
    """Run `potchain ARGS` as its own process (the installed entry point's code)."""
    environment = dict(os.environ)
    environment.pop("ATEN_CPU_CAPABILITY", None)
    environment.update(env or {})
    process = subprocess.run(
        [sys.executable, "-c", "import sys, node; sys.exit(node.main())", *args],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Completed(process.returncode, process.stdout, process.stderr)
