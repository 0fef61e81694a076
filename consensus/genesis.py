"""Genesis: the chain's fixed starting point, parsed and validated.

`parse_genesis` takes the genesis document's bytes (JSON) and returns a frozen
`Genesis`, or raises `GenesisError` naming the first wrong field. Genesis holds
no floats: every number consensus uses is an integer. The genesis hash is the
SHA-256 of the document's canonical JSON (keys sorted, no whitespace, ASCII).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from chain.blocks import MAX_NAMED_WEIGHTS_BYTES, MAX_TRAINING_PER_HEIGHT
from chain.heldout import MAX_PROOF_HASHES, MAX_SHARD_SEQUENCES
from consensus.voting import TimeoutParameters
from training.data import SPLITS, DatasetManifest, Document
from training.evaluate import ProgramBoundsError, validate_program_bounds
from training.model import ModelConfig
from training.tables import Tables, build_tables
from training.weights import WEIGHT_MAX, CanonicalWeights, Partition, TensorSpec, initial_weights

FORMAT = 1
EVALUATION_PROGRAM = "potchain-int-1"
PARTITION_SCHEMES = ("random-mask",)
MAX_REVEALED_BYTES = 8 << 20
"""What one held-out test may reveal, with its proofs: half of a decided block's limit."""
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
TIMEOUT_MS_MAX = 3_600_000
"""The largest base or increment of a voting timeout genesis may set (one hour)."""
CHECK_EVALUATIONS = 4
"""Canonical evaluations to build or check a proposed block: the training
block's claim (validation loss before and after) and the out-of-sample test
(test loss before and after)."""
TIMEOUT_SAFETY = 2
"""Margin on the proposal's compute: nodes slower than the machine that
measured the evaluation, or busy with other blocks' checks."""


class GenesisError(ValueError):
    """A genesis document that is malformed or inconsistent."""


@dataclass(frozen=True)
class EvaluationParameters:
    """How losses are measured; fixed by genesis."""

    program: str
    """Name of the evaluation program; "potchain-int-1" is docs/spec.md's."""
    tables_sha256: str
    """SHA-256 of the lookup tables (see training.tables.Tables.sha256)."""
    validation_sequences: int
    """Sequences (of `context` tokens) in a validation batch."""
    test_sequences: int
    """Sequences in a test batch."""


@dataclass(frozen=True)
class ConsensusParameters:
    """The consensus rules' numbers; fixed by genesis."""

    initial_difficulty: int
    """Minimum validation gain (Q.16 loss units over a validation batch) at genesis."""
    target_interval_seconds: int
    """Desired time between decided training blocks (the difficulty's target, spec section 9)."""
    retarget_divisor: int
    """Each retarget moves difficulty by difficulty // divisor (at least 1)."""
    quorum_numerator: int
    """A quorum (of prevotes, precommits, a commit certificate) is at least numerator / denominator of all stake."""
    quorum_denominator: int
    """See quorum_numerator."""
    max_future_seconds: int
    """A block's timestamp may be at most this far past the receiving node's clock."""
    timeout_propose_ms: int
    """Voting rounds: how long a validator waits, from the start of a round,
    for the round's proposal and for fetching and checking the proposed block
    before it prevotes nil. Derived from the measured evaluation cost
    (`compute_timeouts`)."""
    timeout_prevote_ms: int
    """How long a validator waits for more prevotes once 2/3 of stake
    prevoted for different things, before it precommits nil."""
    timeout_precommit_ms: int
    """How long a validator waits for more precommits once 2/3 of stake
    precommitted for different things, before it moves to the next round."""
    timeout_increment_ms: int
    """Added to each of the three timeouts per round (round r waits base + r *
    increment), so that a network slower than genesis assumed still decides."""
    block_reward: int
    """Units a decided block mints at most (spec section 9)."""
    miner_share_percent: int
    """The miner's share of the block reward; the signers of the parent's commit certificate split the rest by stake."""

    @property
    def timeouts(self) -> TimeoutParameters:
        """The voting rounds' timeouts (consensus.voting)."""
        return TimeoutParameters(
            propose_ms=self.timeout_propose_ms,
            prevote_ms=self.timeout_prevote_ms,
            precommit_ms=self.timeout_precommit_ms,
            increment_ms=self.timeout_increment_ms,
        )


def compute_timeouts(evaluation_ms: int, network_ms: int, transfer_ms: int) -> dict[str, int]:
    """The voting timeouts genesis fixes, from what a round's work costs.

    `evaluation_ms`: one canonical evaluation (a validation or test batch) on
    the slowest machine the network is meant for; `network_ms`: one message's
    delay across the network (gossip hops included); `transfer_ms`: fetching
    the proposed blocks (a training block carries a whole slice). Integers in,
    the four genesis fields (`consensus.timeout_*_ms`) out:

    - propose: the proposer builds its block (CHECK_EVALUATIONS evaluations),
      the proposal crosses the network, a validator fetches the blocks and
      checks them (CHECK_EVALUATIONS more); a second network delay for the
      skew between nodes' round starts; the compute and transfer times by
      TIMEOUT_SAFETY.
    - prevote, precommit: votes need no evaluation, but a node finishing an
      evaluation (another block's check) handles a vote only afterwards:
      one network delay and one evaluation.
    - increment: one more fetch and check (and message) per round, so that
      when genesis underestimated the work, a few rounds outgrow it.
    """
    if evaluation_ms < 1 or network_ms < 0 or transfer_ms < 0:
        raise ValueError(
            f"compute_timeouts({evaluation_ms}, {network_ms}, {transfer_ms}): want evaluation >= 1, rest >= 0"
        )
    check_ms = transfer_ms + CHECK_EVALUATIONS * evaluation_ms
    build_ms = CHECK_EVALUATIONS * evaluation_ms
    return {
        "timeout_propose_ms": 2 * network_ms + TIMEOUT_SAFETY * (build_ms + check_ms),
        "timeout_prevote_ms": network_ms + evaluation_ms,
        "timeout_precommit_ms": network_ms + evaluation_ms,
        "timeout_increment_ms": network_ms + check_ms,
    }


@dataclass(frozen=True)
class GenesisAccount:
    """An account that exists at genesis."""

    public_key: bytes
    """Ed25519 public key (the account address)."""
    balance: int
    """Initial balance."""
    stake: int
    """Initial stake (validators have stake > 0)."""
    heldout: HeldOutCommitment | None = None
    """A validator's commitment to its private held-out shard (None: it tests no training block)."""


@dataclass(frozen=True)
class HeldOutCommitment:
    """What a validator's held-out shard is bound to before anyone trains (docs/spec.md, section 17)."""

    root: bytes
    """Merkle root of the shard's sequence leaves (chain/heldout.py)."""
    sequences: int
    """How many sequences the shard holds."""


@dataclass(frozen=True)
class Genesis:
    """The parsed genesis document."""

    chain_id: str
    """Network name, part of every signature's domain."""
    timestamp: int
    """Unix time of genesis, seconds."""
    model: ModelConfig
    """Shape of the model."""
    init_seed: int
    """Seed of the initial weights."""
    tensors: Mapping[str, TensorSpec]
    """Each tensor's exponent and initialization, in canonical order."""
    partition: Partition
    """How the weights divide into slices."""
    dataset: DatasetManifest
    """The corpus, its chunks and splits."""
    chunk_directory: str
    """Where chunk files are, relative to the genesis file."""
    evaluation: EvaluationParameters
    """Evaluation program and batch sizes."""
    consensus: ConsensusParameters
    """Difficulty, quorum, timing and rewards."""
    accounts: tuple[GenesisAccount, ...]
    """Initial accounts: validators with their stake, and balances."""
    hash: str
    """SHA-256 of the canonical JSON of the document."""

    @property
    def exponents(self) -> dict[str, int]:
        return {name: spec.exponent for name, spec in self.tensors.items()}

    def initial_weights(self) -> CanonicalWeights:
        return initial_weights(self.model, self.tensors, self.init_seed)

    def tables(self) -> Tables:
        """The evaluator's tables, checked against the pinned hash."""
        tables = build_tables()
        got = tables.sha256()
        if got != self.evaluation.tables_sha256:
            raise GenesisError(
                f"evaluation.tables_sha256: tables hash to {got}, genesis pins {self.evaluation.tables_sha256}"
            )
        return tables


class _Reader:
    """Typed access to one JSON object, with the field path in every error."""

    def __init__(self, value: Any, path: str) -> None:
        if not isinstance(value, dict):
            raise GenesisError(f"{path or 'genesis'}: expected an object, got {type(value).__name__}")
        self.value: dict[str, Any] = value
        self.path = path
        self.used: set[str] = set()

    def _field(self, key: str) -> Any:
        if key not in self.value:
            raise GenesisError(f"{self._name(key)}: missing")
        self.used.add(key)
        return self.value[key]

    def _name(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def integer(self, key: str, low: int, high: int) -> int:
        value = self._field(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise GenesisError(f"{self._name(key)}: expected an integer, got {json.dumps(value)}")
        if not low <= value <= high:
            raise GenesisError(f"{self._name(key)}: {value} outside [{low}, {high}]")
        return value

    def string(self, key: str, pattern: re.Pattern[str] | None = None) -> str:
        value = self._field(key)
        if not isinstance(value, str):
            raise GenesisError(f"{self._name(key)}: expected a string, got {json.dumps(value)}")
        if pattern is not None and not pattern.match(value):
            raise GenesisError(f"{self._name(key)}: {value!r} does not match {pattern.pattern}")
        return value

    def choice(self, key: str, options: tuple[str, ...]) -> str:
        value = self.string(key)
        if value not in options:
            raise GenesisError(f"{self._name(key)}: {value!r}, want one of {', '.join(options)}")
        return value

    def object(self, key: str) -> _Reader:
        return _Reader(self._field(key), self._name(key))

    def array(self, key: str) -> list[Any]:
        value = self._field(key)
        if not isinstance(value, list):
            raise GenesisError(f"{self._name(key)}: expected an array")
        return value

    def done(self) -> None:
        unknown = sorted(set(self.value) - self.used)
        if unknown:
            raise GenesisError(f"{self.path or 'genesis'}: unknown field {unknown[0]!r}")


def _reject_floats(value: Any, path: str) -> None:
    if isinstance(value, float):
        raise GenesisError(f"{path}: {value} is a float; genesis holds integers only")
    if isinstance(value, dict):
        for key, item in value.items():
            _reject_floats(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _reject_floats(item, f"{path}[{index}]")


def canonical_json(document: Any) -> bytes:
    return json.dumps(document, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def parse_genesis(raw: bytes) -> Genesis:
    """Parse and validate a genesis document."""
    try:
        document = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GenesisError(f"genesis: not valid JSON ({error})") from None
    _reject_floats(document, "")
    root = _Reader(document, "")
    root.integer("format", FORMAT, FORMAT)
    chain_id = root.string("chain_id", _NAME)
    timestamp = root.integer("timestamp", 0, 2**40)

    model_fields = root.object("model")
    config = ModelConfig(
        vocab_size=model_fields.integer("vocab_size", 256, 256),
        context=model_fields.integer("context", 1, 1 << 16),
        layers=model_fields.integer("layers", 1, 256),
        heads=model_fields.integer("heads", 1, 256),
        width=model_fields.integer("width", 1, 1 << 14),
    )
    init_seed = model_fields.integer("init_seed", 0, 2**63 - 1)
    tensor_fields = model_fields.object("tensors")
    tensors: dict[str, TensorSpec] = {}
    for name in config.tensor_names():
        spec = tensor_fields.object(name)
        tensors[name] = TensorSpec(
            exponent=spec.integer("exponent", 0, 15),
            init_std=spec.integer("init_std", 0, WEIGHT_MAX),
            init_constant=spec.integer("init_constant", -WEIGHT_MAX, WEIGHT_MAX),
        )
        spec.done()
    tensor_fields.done()
    model_fields.done()
    try:
        validate_program_bounds(config, {name: spec.exponent for name, spec in tensors.items()})
    except ProgramBoundsError as error:
        raise GenesisError(f"model: {error}") from None

    partition_fields = root.object("partition")
    partition_fields.choice("scheme", PARTITION_SCHEMES)
    partition = Partition(
        slices=partition_fields.integer("slices", 1, 1024), seed=partition_fields.integer("seed", 0, 2**63 - 1)
    )
    partition_fields.done()
    largest_slice = sum(-(-math.prod(shape) // partition.slices) for shape in config.tensor_shapes().values())
    if MAX_TRAINING_PER_HEIGHT * 2 * largest_slice > MAX_NAMED_WEIGHTS_BYTES:
        raise GenesisError(
            f"partition.slices: a slice of {2 * largest_slice} bytes; {MAX_TRAINING_PER_HEIGHT} of them must fit "
            f"{MAX_NAMED_WEIGHTS_BYTES} bytes (more slices make them smaller)"
        )

    dataset_fields = root.object("dataset")
    dataset_name = dataset_fields.string("name")
    chunk_directory = dataset_fields.string("chunk_directory")
    if chunk_directory.startswith("/") or ".." in chunk_directory.split("/"):
        raise GenesisError(f"dataset.chunk_directory: {chunk_directory!r} must be a relative path inside genesis/")
    chunk_size = dataset_fields.integer("chunk_size", 1, 1 << 22)
    documents = []
    names: set[str] = set()
    for index, item in enumerate(dataset_fields.array("documents")):
        fields = _Reader(item, f"dataset.documents[{index}]")
        name = fields.string("name", _NAME)
        if name in names:
            raise GenesisError(f"dataset.documents[{index}].name: duplicate {name!r}")
        names.add(name)
        split = fields.choice("split", SPLITS)
        size = fields.integer("size", 1, 1 << 40)
        chunks = fields.array("chunks")
        for position, digest in enumerate(chunks):
            if not isinstance(digest, str) or not _HEX64.match(digest):
                raise GenesisError(f"dataset.documents[{index}].chunks[{position}]: not a sha256 hex digest")
        want = -(-size // chunk_size)
        if len(chunks) != want:
            raise GenesisError(f"dataset.documents[{index}].chunks: {len(chunks)} chunks, size {size} needs {want}")
        fields.done()
        documents.append(Document(name=name, split=split, size=size, chunks=tuple(chunks)))
    dataset_fields.done()
    dataset = DatasetManifest(name=dataset_name, chunk_size=chunk_size, documents=tuple(documents))
    for split in SPLITS:
        if dataset.split_size(split) < config.context + 1:
            raise GenesisError(
                f"dataset: split {split!r} has {dataset.split_size(split)} bytes, fewer than context + 1"
            )

    evaluation_fields = root.object("evaluation")
    evaluation = EvaluationParameters(
        program=evaluation_fields.choice("program", (EVALUATION_PROGRAM,)),
        tables_sha256=evaluation_fields.string("tables_sha256", _HEX64),
        validation_sequences=evaluation_fields.integer("validation_sequences", 1, 4096),
        test_sequences=evaluation_fields.integer("test_sequences", 1, 4096),
    )
    evaluation_fields.done()
    revealed_bytes = evaluation.test_sequences * (config.context + 1 + 32 * MAX_PROOF_HASHES + 16)
    if revealed_bytes > MAX_REVEALED_BYTES:
        raise GenesisError(
            f"evaluation.test_sequences: a held-out test would reveal up to {revealed_bytes} bytes, "
            f"at most {MAX_REVEALED_BYTES} fit a decided block"
        )

    consensus_fields = root.object("consensus")
    consensus = ConsensusParameters(
        initial_difficulty=consensus_fields.integer("initial_difficulty", 1, 2**62),
        target_interval_seconds=consensus_fields.integer("target_interval_seconds", 1, 86400),
        retarget_divisor=consensus_fields.integer("retarget_divisor", 2, 1 << 16),
        quorum_numerator=consensus_fields.integer("quorum_numerator", 1, 1 << 16),
        quorum_denominator=consensus_fields.integer("quorum_denominator", 1, 1 << 16),
        max_future_seconds=consensus_fields.integer("max_future_seconds", 0, 3600),
        timeout_propose_ms=consensus_fields.integer("timeout_propose_ms", 1, TIMEOUT_MS_MAX),
        timeout_prevote_ms=consensus_fields.integer("timeout_prevote_ms", 1, TIMEOUT_MS_MAX),
        timeout_precommit_ms=consensus_fields.integer("timeout_precommit_ms", 1, TIMEOUT_MS_MAX),
        timeout_increment_ms=consensus_fields.integer("timeout_increment_ms", 1, TIMEOUT_MS_MAX),
        block_reward=consensus_fields.integer("block_reward", 0, 2**62),
        miner_share_percent=consensus_fields.integer("miner_share_percent", 0, 100),
    )
    consensus_fields.done()
    if not 2 * consensus.quorum_denominator <= 3 * consensus.quorum_numerator <= 3 * consensus.quorum_denominator:
        raise GenesisError("consensus: quorum must lie in [2/3, 1]")

    accounts = []
    for index, item in enumerate(root.array("accounts")):
        fields = _Reader(item, f"accounts[{index}]")
        key = fields.string("public_key", _HEX64)
        heldout = None
        if "heldout" in item:
            shard = fields.object("heldout")
            heldout = HeldOutCommitment(
                bytes.fromhex(shard.string("root", _HEX64)), shard.integer("sequences", 1, MAX_SHARD_SEQUENCES)
            )
            shard.done()
        account = GenesisAccount(
            public_key=bytes.fromhex(key),
            balance=fields.integer("balance", 0, 2**62),
            stake=fields.integer("stake", 0, 2**62),
            heldout=heldout,
        )
        if heldout is not None and account.stake == 0:
            raise GenesisError(f"accounts[{index}].heldout: only a validator (stake > 0) holds a held-out shard")
        accounts.append(account)
        fields.done()
    if len({account.public_key for account in accounts}) != len(accounts):
        raise GenesisError("accounts: a public key appears twice")
    if not any(account.stake for account in accounts):
        raise GenesisError("accounts: no validator (an account with stake > 0)")
    root.done()

    return Genesis(
        chain_id=chain_id,
        timestamp=timestamp,
        model=config,
        init_seed=init_seed,
        tensors=tensors,
        partition=partition,
        dataset=dataset,
        chunk_directory=chunk_directory,
        evaluation=evaluation,
        consensus=consensus,
        accounts=tuple(accounts),
        hash=hashlib.sha256(canonical_json(document)).hexdigest(),
    )
