"""The node's HTTP RPC: JSON reads of the chain, the model and mining work,
and block submission, served by aiohttp; and the explorer, a web page over
these reads (p2p/explorer/, at /explorer).

libp2p runs on trio in the main thread; the RPC runs its own asyncio loop in
its own thread. Every call into the node (which may wait on its lock) goes to
the server's thread pool, so the loop never blocks. Model evaluations and
weights encodings run on the RPC's own evaluator, outside the node's lock,
one at a time, cached by block hash (`ExpensiveReads`). Slow or idle clients
are cut off and the connections and requests served at once are bounded
(`RpcLimits`). The admin endpoints exist only with an admin token.
Errors are JSON `{"error": message}` with a 4xx status (503 when busy); a
500 is a bug. Bytes are lowercase hex; the paths and schemas are in
`p2p.openapi`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Protocol, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST

from chain.blocks import (
    Block,
    DecidedBody,
    EquivocationEvidence,
    HeldOutTest,
    Kind,
    TrainingBody,
    TrainingVerdict,
    UpdateCommitment,
    decode_block,
    decode_update_commitment,
)
from chain.encoding import MAX_MESSAGE_BYTES, DecodeError
from chain.files import SECRET_MODE, write_atomically
from chain.state import Account, State
from chain.votes import Commit, Proposal
from consensus.decided_chain import Decision
from consensus.decisions import get_validator_set
from consensus.rules import Chain, InvalidBlock, StaleBlock, UnknownParent
from p2p.decided_node import DecidedNode, WorkAssignment, mean_loss
from p2p.events import TOPICS, TooManySubscribers, stream_events
from p2p.history import BLOCKS_PAGE_DEFAULT, BLOCKS_PAGE_MAX, LOSS_PAGE_DEFAULT, LOSS_PAGE_MAX, History
from p2p.mining import held_commitment
from p2p.openapi import openapi_document
from training.export import ModelOrigin, encode_float_weights
from training.model import GPT
from training.sample import MAX_SEED, SampleError, SampleSettings, check_prompt, float_model, sample_bytes
from training.weights import encode_weights

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = MAX_MESSAGE_BYTES + (64 << 10)
"""Largest request body accepted: one encoded block and some slack."""
TOKEN_FILE = "rpc_token"
"""The mining (write) token's file name in the data directory."""
ADMIN_TOKEN_FILE = "admin_token"
"""The admin token's file name in the data directory (used only with the admin endpoints on)."""
MAX_HEIGHT = (1 << 63) - 1
"""Heights above this are never stored (and so unknown)."""

JSON = dict[str, Any]
T = TypeVar("T")

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_DECIMAL = re.compile(r"[0-9]+")


# --- Backends -------------------------------------------------------------------


class RpcBackend(Protocol):
    """What the RPC serves: a node, and what the network around it knows."""

    node: DecidedNode

    def peers(self) -> list[dict[str, object]]:
        """JSON-ready peer records."""
        ...

    def is_ready(self) -> bool:
        """False while the node is starting up."""
        ...

    def is_syncing(self) -> bool: ...

    def voting(self) -> dict[str, object]:
        """The height being decided and how far its voting got: height, round, step."""
        ...

    def submit_block(self, data: bytes) -> tuple[Block, bool]:
        """Keep (and gossip) an encoded training block: (block, already known);
        raises DecodeError or InvalidBlock."""
        ...

    def submit_commitment(self, data: bytes) -> tuple[UpdateCommitment, bool]:
        """Keep (and gossip) an encoded update commitment for the next decided block:
        (commitment, kept now); raises DecodeError, StaleBlock or UnknownParent (for another
        height than the one being decided), or InvalidBlock."""
        ...

    def node_info(self) -> dict[str, object]:
        """The node itself: peer id, rejected messages, blocked peers."""
        ...

    def set_blocked_peers(self, peers: list[str]) -> None:
        """Refuse exactly these peers from now on (disconnecting them)."""
        ...

    def set_link_delay(self, seconds: float) -> None:
        """Delay everything the node sends by `seconds`."""
        ...


class LocalBackend:
    """A node without a network: no peers, always ready and synced, no voting."""

    def __init__(self, node: DecidedNode) -> None:
        self.node = node

    def peers(self) -> list[dict[str, object]]:
        return []

    def is_ready(self) -> bool:
        return True

    def is_syncing(self) -> bool:
        return False

    def voting(self) -> dict[str, object]:
        return {"height": self.node.head().block.header.height + 1, "round": 0, "step": "propose"}

    def submit_block(self, data: bytes) -> tuple[Block, bool]:
        block = decode_block(data)
        if block.header.kind != Kind.TRAINING:
            raise InvalidBlock(f"kind: only training blocks are submitted, not {block.header.kind.name.lower()}")
        return block, not self.node.on_training_block(block)

    def submit_commitment(self, data: bytes) -> tuple[UpdateCommitment, bool]:
        commitment = decode_update_commitment(data)
        return commitment, self.node.on_commitment(commitment)

    def node_info(self) -> dict[str, object]:
        return {"peer_id": None, "addresses": [], "rejections": [], "blocked_peers": [], "link_delay_seconds": 0.0}

    def set_blocked_peers(self, peers: list[str]) -> None:
        raise RpcError(409, "this node has no network")

    def set_link_delay(self, seconds: float) -> None:
        raise RpcError(409, "this node has no network")


# --- The write token --------------------------------------------------------------


def load_or_create_token(datadir: Path, name: str = TOKEN_FILE) -> str:
    """The token in `datadir/name` (rpc_token: mining; admin_token: admin), created
    (32 random bytes, hex, mode 0600) if absent."""
    path = datadir / name
    try:
        token = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        token = ""
    if token:
        return token
    datadir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_hex(32)
    write_atomically(path, (token + "\n").encode(), SECRET_MODE)
    return token


# --- JSON views (called on the pool: they may take the node's lock) ----------------


def block_view(node: DecidedNode, block: Block) -> JSON:
    header = block.header
    with node.lock:
        canonical = node.is_canonical(block)
        received_at = node.received_at.get(block.hash)
        commit = node.commit_of(block.hash) if header.kind == Kind.DECIDED else None
        stakes = node.validators_of(block) if commit is not None else None
    return {
        "hash": block.hash.hex(),
        "height": header.height,
        "kind": header.kind.name.lower(),
        "parent": header.parent.hex(),
        "timestamp": header.timestamp,
        "proposer": header.proposer.hex(),
        "state_root": header.state_root.hex(),
        "body_hash": header.body_hash.hex(),
        "received_at": received_at,
        "canonical": canonical,
        "body": body_view(block),
        "commit": commit_view(commit, stakes) if commit is not None else None,
    }


def body_view(block: Block) -> JSON:
    body = block.body
    if isinstance(body, TrainingBody):
        return training_body_view(body)
    if isinstance(body, DecidedBody):
        return decided_body_view(body)
    return {}


def training_body_view(body: TrainingBody) -> JSON:
    return {
        "slice_id": body.slice_id,
        "loss_before": body.loss_before,
        "loss_after": body.loss_after,
        "gain": body.loss_before - body.loss_after,
        "steps": body.steps,
        "data_seed": body.data_seed.hex(),
        "weights_bytes": len(body.weights),
        "weights_sha256": hashlib.sha256(body.weights).hexdigest(),
    }


def decided_body_view(body: DecidedBody) -> JSON:
    return {
        "training": [verdict_view(verdict, body) for verdict in body.training],
        "confirmed": bool(body.applied),
        "applied": [h.hex() for h in body.applied],
        "test": test_view(body.test),
        "commitments": [
            {"height": c.height, "miner": c.miner.hex(), "update_hash": c.update_hash.hex()} for c in body.commitments
        ],
        "last_commit": commit_view(body.last_commit, None) if body.last_commit is not None else None,
        "evidence": [evidence_view(evidence) for evidence in body.evidence],
        "rewards": [{"address": r.address.hex(), "amount": r.amount} for r in body.rewards],
    }


def verdict_view(verdict: TrainingVerdict, body: DecidedBody) -> JSON:
    loss_before = body.test.loss_before if body.test is not None else verdict.loss_after
    return {
        "training_block": verdict.training_block.hex(),
        "loss_before": loss_before,
        "loss_after": verdict.loss_after,
        "gain": loss_before - verdict.loss_after,
        "confirmed": verdict.training_block in body.applied,
    }


def test_view(test: HeldOutTest | None) -> JSON | None:
    if test is None:
        return None
    return {
        "vrf_proof": test.vrf_proof.hex(),
        "loss_before": test.loss_before,
        "loss_after": test.loss_after,
        "sequences": [{"index": s.index, "sequence": s.sequence.hex()} for s in test.sequences],
    }


def evidence_view(evidence: EquivocationEvidence) -> JSON:
    first = evidence.first
    kind = "proposal" if isinstance(first, Proposal) else first.kind.name.lower()
    validator = first.proposer if isinstance(first, Proposal) else first.validator
    return {"validator": validator.hex(), "kind": kind, "height": first.height, "round": first.round}


def commit_view(commit: Commit, stakes: Mapping[bytes, int] | None) -> JSON:
    """A commit certificate; with the stakes of the validators who voted, its signing and total stake."""
    view: JSON = {
        "height": commit.height,
        "round": commit.round,
        "block_hash": commit.block_hash.hex(),
        "signatures": [{"validator": v.hex(), "timestamp": t} for v, t, _ in commit.signatures],
    }
    if stakes is not None:
        view["signing_stake"] = sum(stakes.get(v, 0) for v, _, _ in commit.signatures)
        view["total_stake"] = sum(stakes.values())
    return view


def status_view(backend: RpcBackend, head: Decision, losses: tuple[float, float]) -> JSON:
    """The node's status at `head`, with that head's (validation, test) losses."""
    node = backend.node
    validation_loss, test_loss = losses
    block, state = head.block, head.state
    return {
        "chain_id": node.genesis.chain_id,
        "genesis_hash": node.genesis.hash,
        "genesis_block_hash": node.genesis_block.hash.hex(),
        "head_height": block.header.height,
        "head_hash": block.hash.hex(),
        "finalized_height": block.header.height,
        "finalized_hash": block.hash.hex(),
        "state_root": state.root.hex(),
        "difficulty": state.difficulty,
        "syncing": backend.is_syncing(),
        "peer_count": sum(1 for peer in backend.peers() if peer.get("connected", True)),
        "voting": backend.voting(),
        "validation_loss": validation_loss,
        "test_loss": test_loss,
    }


def finality_view(backend: RpcBackend) -> JSON:
    node = backend.node
    with node.lock:
        head = node.head()
        stakes = node.validators_of(head.block) if head.commit is not None else None
        pending = [pending_view(block) for block in node.training_blocks()]
    block, state = head.block, head.state
    return {
        "finalized_height": block.header.height,
        "finalized_hash": block.hash.hex(),
        "finalized_timestamp": block.header.timestamp,
        "commit": commit_view(head.commit, stakes) if head.commit is not None else None,
        "last_tested": state.finalized_hash.hex(),
        "total_stake": state.total_stake,
        "voting": backend.voting(),
        "pending": pending,
    }


def pending_view(block: Block) -> JSON:
    """A training block kept on the head: an input of the next height's proposal."""
    assert isinstance(block.body, TrainingBody)
    return {
        "hash": block.hash.hex(),
        "height": block.header.height,
        "proposer": block.header.proposer.hex(),
        "slice_id": block.body.slice_id,
        "gain": block.body.loss_before - block.body.loss_after,
    }


def model_view(node: DecidedNode, block: Block, state: State, losses: tuple[float, float]) -> JSON:
    config = node.genesis.model
    validation_loss, test_loss = losses
    return {
        "height": block.header.height,
        "block_hash": block.hash.hex(),
        "config": {
            "layers": config.layers,
            "heads": config.heads,
            "width": config.width,
            "context": config.context,
            "vocab_size": config.vocab_size,
            "parameter_count": config.parameter_count(),
        },
        "state_root": state.root.hex(),
        "weights_root": state.weights_root.hex(),
        "slice_hashes": [h.hex() for h in state.slice_hashes],
        "validation_loss": validation_loss,
        "test_loss": test_loss,
        "difficulty": state.difficulty,
    }


def account_view(address: bytes, account: Account | None) -> JSON:
    return {
        "address": address.hex(),
        "balance": account.balance if account else 0,
        "stake": account.stake if account else 0,
    }


def work_view(work: WorkAssignment) -> JSON:
    view = {f.name: _plain(getattr(work, f.name)) for f in fields(work)}
    view["weights_url"] = f"/v1/model/weights?height={work.height - 1}"
    return view


def submit_view(block: Block, known: bool) -> JSON:
    return {"hash": block.hash.hex(), "height": block.header.height, "known": known}


def validators_view(node: DecidedNode) -> JSON:
    """The validators who vote on the height being decided (every account with stake in the head's
    state), largest stake first, and the stake a commit certificate needs."""
    head = node.head()
    validators = get_validator_set(head.state, node.genesis)
    total = validators.total
    ranked = sorted(validators.stakes.items(), key=lambda item: (-item[1], item[0]))
    return {
        "height": head.block.header.height + 1,
        "head_hash": head.block.hash.hex(),
        "total_stake": total,
        "quorum_stake": -(-total * validators.quorum_numerator // validators.quorum_denominator),
        "validators": [
            {"address": address.hex(), "stake": stake, "balance": head.state.accounts[address].balance}
            for address, stake in ranked
        ],
    }


def commitment_view(commitment: UpdateCommitment, known: bool) -> JSON:
    view = {"height": commitment.height, "miner": commitment.miner.hex(), "update_hash": commitment.update_hash.hex()}
    return view | {"known": known}


def metrics_text(backend: RpcBackend) -> bytes:
    """The node's metrics in Prometheus's text format, `potchain_syncing` read now."""
    metrics = backend.node.metrics
    metrics.syncing.set(1 if backend.is_syncing() else 0)
    return metrics.exposition()


def _plain(value: object) -> object:
    return value.hex() if isinstance(value, bytes) else value


# --- Lookups (on the pool) ---------------------------------------------------------


def find_block(node: DecidedNode, ref: int | bytes) -> Block:
    """The decided block at a height, or any known block by hash; 404 if none."""
    if isinstance(ref, bytes):
        block = node.block_by_hash(ref)
        what = f"block {ref.hex()}"
    else:
        block = node.block_at(ref) if ref <= MAX_HEIGHT else None
        what = f"decided block at height {ref}"
    if block is None:
        raise RpcError(404, f"no {what}")
    return block


def block_and_state(node: DecidedNode, height: int | None) -> tuple[Block, State]:
    """The head, or the decided block at `height`, and the state after it."""
    if height is None:
        head = node.head()
        return head.block, head.state
    with node.lock:
        block = find_block(node, height)
        state = node.state_of(block.hash)
    if state is None:
        raise RpcError(404, f"no state for the block at height {height}")
    return block, state


# --- Expensive reads --------------------------------------------------------------


class ExpensiveReads:
    """Model evaluations (the report losses) and weights encodings for the RPC.

    They run on the RPC's own `Chain` (the node's evaluator and its caches
    belong to the voting, under the node's lock), never under the node's
    lock: the caller takes the block and state it needs from the node
    quickly (a decided block's state is immutable) and evaluates here.
    Answers are cached by block hash, the least recently used dropped past
    `entries`; `compute_*` runs one at a time (the RPC server admits one
    caller at a time, and waits on a cache hit for none)."""

    def __init__(self, node: DecidedNode, entries: int) -> None:
        if entries < 1:
            raise ValueError(f"ExpensiveReads entries: got {entries}, want at least 1")
        self.chain = Chain(
            node.genesis,
            node.chain.validation_text,
            node.chain.test_text,
            backend=node.chain.backend,
            device=node.chain.device,
        )
        """The RPC's own evaluator (its `evaluations` counts what the RPC evaluated)."""
        self.entries = entries
        self._cache: OrderedDict[tuple[str, bytes], Any] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._compute_lock = threading.Lock()
        self._model: tuple[bytes, GPT] | None = None
        """The float model samples last ran on, by weights root."""

    def cached(self, what: str, block_hash: bytes) -> Any:
        """A cached answer (`losses` or `weights`) for a block, or None."""
        with self._cache_lock:
            key = (what, block_hash)
            if key not in self._cache:
                return None
            self._cache.move_to_end(key)
            return self._cache[key]

    def _keep(self, what: str, block_hash: bytes, value: Any) -> None:
        with self._cache_lock:
            self._cache[(what, block_hash)] = value
            while len(self._cache) > self.entries:
                self._cache.popitem(last=False)

    def losses(self, block_hash: bytes, state: State) -> tuple[float, float]:
        """(validation, test) nats per token of the model after a block on the report batches (seed 0)."""
        with self._compute_lock:
            found = self.cached("losses", block_hash)
            if found is not None:
                return tuple(found)
            losses = (mean_loss(self.chain, state, "validation"), mean_loss(self.chain, state, "test"))
            self._keep("losses", block_hash, losses)
            return losses

    def weights(self, block_hash: bytes, state: State) -> bytes:
        """The safetensors encoding of the model after a block."""
        with self._compute_lock:
            found = self.cached("weights", block_hash)
            if found is not None:
                return bytes(found)
            data = encode_weights(self.chain.weights(state))
            self._keep("weights", block_hash, data)
            return data

    def float_weights(self, block: Block, state: State) -> bytes:
        """The float32 safetensors encoding of the model after a decided block (training/export.py).
        Not cached: twice the canonical encoding's size, and rarely asked for."""
        genesis = self.chain.genesis
        origin = ModelOrigin(genesis.chain_id, genesis.hash, block.header.height, block.hash.hex())
        with self._compute_lock:
            return encode_float_weights(self.chain.weights(state), origin)

    def sample(self, state: State, prompt: bytes, settings: SampleSettings) -> str:
        """Text the model of `state` continues `prompt` with (bytes decoded with errors="replace"),
        on the evaluator's device; the last float model used is kept."""
        with self._compute_lock:
            if self._model is None or self._model[0] != state.weights_root:
                self._model = (state.weights_root, float_model(self.chain.weights(state), self.chain.device))
            return sample_bytes(self._model[1], prompt, settings).decode("utf-8", errors="replace")


# --- The explorer ----------------------------------------------------------------

EXPLORER_FILES = {
    "index.html": "text/html",
    "explorer.js": "text/javascript",
    "explorer.css": "text/css",
}
"""The explorer's files (p2p/explorer/, shipped as package data) and their content types."""
EXPLORER_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'; "
    "object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
"""Headers of every explorer file: the page loads only this node's own scripts, styles and data."""


def load_explorer() -> dict[str, bytes]:
    """The explorer's files by name, read once from the package."""
    folder = resources.files("p2p").joinpath("explorer")
    return {name: folder.joinpath(name).read_bytes() for name in EXPLORER_FILES}


# --- Input parsing -----------------------------------------------------------------


class RpcError(Exception):
    """An error answered as JSON `{"error": message}` with an HTTP status."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})


class RpcStartError(RuntimeError):
    """The server could not listen (for example, the port is taken)."""


def parse_height(text: str, what: str) -> int:
    """A non-negative decimal height (400 otherwise); heights past MAX_HEIGHT stay unknown."""
    if not _DECIMAL.fullmatch(text):
        raise RpcError(400, f"{what}: {text!r} is not a non-negative decimal integer")
    digits = text.lstrip("0") or "0"
    return int(digits) if len(digits) <= 19 else MAX_HEIGHT + 1


def parse_hex32(text: str | None, what: str) -> bytes:
    if text is None:
        raise RpcError(400, f"{what}: missing")
    if not _HEX64.fullmatch(text):
        raise RpcError(400, f"{what}: {text!r} is not 64 hex characters")
    return bytes.fromhex(text)


def parse_block_ref(text: str) -> int | bytes:
    """A block hash (64 hex) or a height (decimal)."""
    if _HEX64.fullmatch(text):
        return bytes.fromhex(text)
    if not _DECIMAL.fullmatch(text):
        raise RpcError(400, f"block: {text!r} is neither a height (decimal) nor a block hash (64 hex)")
    return parse_height(text, "block")


def parse_height_query(request: web.Request) -> int | None:
    text = request.query.get("height")
    return None if text is None else parse_height(text, "height")


def parse_topics(text: str | None) -> frozenset[str]:
    """`?topics=a,b`: some of p2p.events.TOPICS (default: all)."""
    if text is None:
        return frozenset(TOPICS)
    names = text.split(",")
    for name in names:
        if name not in TOPICS:
            raise RpcError(400, f"topics: unknown topic {name!r}, want a comma-separated list of {', '.join(TOPICS)}")
    return frozenset(names)


def parse_last_event_id(text: str | None) -> int | None:
    """The Last-Event-ID header of a client resuming a stream: an event id (decimal)."""
    if text is None:
        return None
    if not _DECIMAL.fullmatch(text) or len(text) > 19:
        raise RpcError(400, f"Last-Event-ID: {text[:40]!r} is not an event id (a decimal integer)")
    return int(text)


def parse_page(request: web.Request, default_limit: int, max_limit: int) -> tuple[int | None, int]:
    """`?from=H&limit=N`: a decided height (1 or more; None if absent) and a page size (1 to `max_limit`)."""
    text = request.query.get("from")
    start = None if text is None else parse_height(text, "from")
    if start == 0:
        raise RpcError(400, "from: 0 is genesis, want a decided height (1 or more)")
    text = request.query.get("limit")
    limit = default_limit if text is None else parse_height(text, "limit")
    if not 1 <= limit <= max_limit:
        raise RpcError(400, f"limit: got {text}, want 1 to {max_limit}")
    return start, limit


def parse_raw_format(request: web.Request) -> bool:
    """`?format=raw` (True) or `json`, the default."""
    value = request.query.get("format", "json")
    if value not in ("json", "raw"):
        raise RpcError(400, f"format: {value!r}, want 'json' or 'raw'")
    return value == "raw"


def parse_weights_format(request: web.Request) -> bool:
    """`?format=float` (True: float32) or `canonical` (int16), the default."""
    value = request.query.get("format", "canonical")
    if value not in ("canonical", "float"):
        raise RpcError(400, f"format: {value!r}, want 'canonical' or 'float'")
    return value == "float"


SAMPLE_FIELDS = ("prompt", "tokens", "temperature", "top_k", "seed", "height")
"""The fields of a sample request's JSON body (prompt and tokens required)."""


@dataclass(frozen=True)
class SampleQuery:
    """A checked `POST /v1/model/sample` body."""

    prompt: str
    """The prompt as given."""
    encoded: bytes
    """Its UTF-8 bytes: what the model reads."""
    settings: SampleSettings
    """Tokens, temperature, top-k and seed (a random seed when none was given)."""
    height: int | None
    """The decided height whose model samples (None: the head)."""


def parse_sample_body(data: bytes) -> SampleQuery:
    """A sample request's JSON body, every field checked (400 naming the field otherwise)."""
    try:
        document = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as error:
        message = f"body: not UTF-8 ({error.reason} at byte {error.start}): the prompt must be text"
        raise RpcError(400, message) from None
    except ValueError:
        raise RpcError(400, "body: not JSON") from None
    if not isinstance(document, dict):
        raise RpcError(400, 'body: want a JSON object {"prompt": text, "tokens": count, ...}')
    unknown = sorted(set(document) - set(SAMPLE_FIELDS))
    if unknown:
        raise RpcError(400, f"body: unknown fields {unknown}, want some of {list(SAMPLE_FIELDS)}")
    if "prompt" not in document:
        raise RpcError(400, "prompt: missing, want the text to continue")
    prompt = document["prompt"]
    if not isinstance(prompt, str):
        raise RpcError(400, f"prompt: got {_json_type(prompt)}, want a string")
    tokens = _json_integer(document, "tokens")
    if tokens is None:
        raise RpcError(400, "tokens: missing, want the number of bytes to generate")
    temperature = document.get("temperature", SampleSettings.temperature)
    if isinstance(temperature, bool) or not isinstance(temperature, int | float):
        raise RpcError(400, f"temperature: got {_json_type(temperature)}, want a number")
    seed = _json_integer(document, "seed")
    try:
        encoded = check_prompt(prompt)
        settings = SampleSettings(
            tokens=tokens,
            temperature=float(temperature),
            top_k=_json_integer(document, "top_k"),
            seed=secrets.randbelow(MAX_SEED + 1) if seed is None else seed,
        )
    except SampleError as error:
        raise RpcError(400, str(error)) from None
    height = _json_integer(document, "height")
    if height is not None and height < 0:
        raise RpcError(400, f"height: got {height}, want a decided height (0 or more)")
    return SampleQuery(prompt, encoded, settings, height)


def _json_integer(document: dict[str, Any], name: str) -> int | None:
    """An integer field (a number with no fraction, as JSON Schema counts integers), None if absent."""
    value = document.get(name)
    if value is None and name not in document:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RpcError(400, f"{name}: got {_json_type(value)}, want an integer")
    return value


def _json_type(value: object) -> str:
    """A JSON value's type and the value, for an error message."""
    names = {bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object"}
    name = "null" if value is None else names.get(type(value), type(value).__name__)
    shown = json.dumps(value)
    return f"{name} {shown[:40]}{'...' if len(shown) > 40 else ''}"


class RateLimiter:
    """A token bucket per client address: `burst` requests at once, refilled at `per_second`
    (used on the server's loop only). At most `clients` addresses are remembered, the least
    recently seen forgotten first (a forgotten address starts again with a full bucket)."""

    def __init__(self, burst: int, per_second: float, clients: int = 4096) -> None:
        self.burst = burst
        self.per_second = per_second
        self.clients = clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        """Each address's tokens and when they were counted (monotonic seconds)."""

    def take(self, address: str, now: float) -> float:
        """Take a token for `address`: 0.0 if there was one, else the seconds until there is."""
        tokens, counted = self._buckets.pop(address, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - counted) * self.per_second)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.per_second
        self._buckets[address] = (tokens - 1 if wait == 0.0 else tokens, now)
        while len(self._buckets) > self.clients:
            self._buckets.popitem(last=False)
        return wait


# --- The server ----------------------------------------------------------------------

RETRY_AFTER_SECONDS = 1
"""The Retry-After of a 503 (too many connections, requests or evaluations at once)."""


@dataclass(frozen=True)
class RpcLimits:
    """How much the RPC serves at once and how long it waits on a client, so that slow,
    idle or too many clients cannot stall or exhaust it (tests/test_rpc.py)."""

    max_connections: int = 128
    """Connections open at once; one more is answered 503 with Retry-After and closed."""
    max_in_flight: int = 32
    """Requests being handled at once; one more is answered 503 with Retry-After."""
    idle_seconds: float = 10.0
    """A connection that sends no complete request head for this long is closed: an idle
    keep-alive connection, or headers trickled a byte at a time."""
    body_seconds: float = 10.0
    """A request body not received whole within this is answered 408 and the connection closed."""
    send_seconds: float = 30.0
    """A connection whose client reads nothing of a response for this long is closed."""
    evaluator_wait_seconds: float = 10.0
    """How long a request waits for the evaluator (one evaluation or weights encoding at a time)
    before it is answered 503 with Retry-After."""
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    """Largest request body; a larger one is answered 413."""
    cache_entries: int = 16
    """Evaluated losses and weights encodings kept by block hash (least recently used dropped)."""
    sample_burst: int = 5
    """Samples (POST /v1/model/sample) one client address may ask for at once; past that it is
    answered 429 with Retry-After."""
    samples_per_minute: float = 20.0
    """How fast a client's allowance of samples refills."""
    keep_alive_seconds: float = 15.0
    """An event stream with nothing to send for this long sends a keep-alive comment."""

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_in_flight", "max_body_bytes", "cache_entries"):
            if getattr(self, name) < 1:
                raise ValueError(f"RpcLimits.{name}: got {getattr(self, name)}, want at least 1")
        for name in ("idle_seconds", "body_seconds", "send_seconds", "evaluator_wait_seconds", "keep_alive_seconds"):
            if not getattr(self, name) > 0:
                raise ValueError(f"RpcLimits.{name}: got {getattr(self, name)}, want more than 0")
        if self.sample_burst < 1:
            raise ValueError(f"RpcLimits.sample_burst: got {self.sample_burst}, want at least 1")
        if not self.samples_per_minute > 0:
            raise ValueError(f"RpcLimits.samples_per_minute: got {self.samples_per_minute}, want more than 0")


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as JSON: RpcError and aiohttp's HTTP errors with their status,
    anything else logged and answered 500."""
    try:
        return await handler(request)
    except RpcError as error:
        response = error_response(error.status, error.message, error.headers)
        if error.status == 408:  # the rest of the body may still come: the connection is done
            response.force_close()
        return response
    except web.HTTPException as error:
        if error.status < 400:
            raise
        text = error.text or ""
        if not text or text == f"{error.status}: {error.reason}":
            text = f"{error.reason.lower()}: {request.method} {request.path}"
        headers = {"Allow": error.headers["Allow"]} if "Allow" in error.headers else None
        return error_response(error.status, text, headers)
    except Exception:
        log.exception("RPC %s %s failed", request.method, request.path_qs)
        return error_response(500, "internal error")


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def busy_headers() -> dict[str, str]:
    return {"Retry-After": str(RETRY_AFTER_SECONDS)}


class Refused(asyncio.Protocol):
    """A connection past `max_connections`: answered 503 with Retry-After, its write side
    shut, what the client sends read and dropped, and closed a moment later (closing at once
    with its request unread would reset it and lose the answer). Without a message (a flood
    of connections), closed at once."""

    def __init__(self, message: str | None, on_closed: Callable[[], None]) -> None:
        self.message = message
        self.on_closed = on_closed
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.message is None:
            transport.abort()
            return
        body = json.dumps({"error": self.message}).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json; charset=utf-8\r\n"
            f"Retry-After: {RETRY_AFTER_SECONDS}\r\nConnection: close\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        transport.write(head.encode() + body)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(1.0, transport.abort)

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self) -> bool:
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        self.on_closed()


class RpcServer:
    """The HTTP RPC on its own thread and asyncio loop; `start()`, then `stop()`.

    With `admin_token` the admin endpoints (`/v1/admin/*`: partitions and link delays,
    for simulations) are served and take that token, not the mining `token`;
    without it they do not exist (404) and the OpenAPI document omits them."""

    def __init__(
        self,
        backend: RpcBackend,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str,
        admin_token: str | None = None,
        limits: RpcLimits | None = None,
    ) -> None:
        if not token:
            raise ValueError("RpcServer needs a non-empty token")
        if admin_token is not None and (not admin_token or admin_token == token):
            raise ValueError("RpcServer: admin_token must be non-empty and differ from the mining token")
        self.backend = backend
        self.node = backend.node
        self.host = host
        self.port = port
        """The port asked for; after start(), the bound port."""
        self.limits = limits or RpcLimits()
        self._token = token.encode()
        self._admin_token = admin_token.encode() if admin_token is not None else None
        self._openapi = openapi_document(admin=admin_token is not None)
        self._explorer = load_explorer()
        self.reads = ExpensiveReads(self.node, self.limits.cache_entries)
        self._samples = RateLimiter(self.limits.sample_burst, self.limits.samples_per_minute / 60)
        """The evaluations and weights encodings the RPC serves, cached by block hash."""
        self.history = History(self.node)
        """The decided chain's block summaries and losses by height, cached."""
        self._streams: set[asyncio.Event] = set()
        """The wake-up events of the event streams being served (set when the server stops)."""
        self.app = web.Application(middlewares=[self._admit, json_errors], client_max_size=self.limits.max_body_bytes)
        self.app.add_routes(self._routes())
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rpc-worker")
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._evaluator: asyncio.Semaphore | None = None
        self._in_flight = 0
        self._refused = 0
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stop_lock = threading.Lock()

    @property
    def admin(self) -> bool:
        """Whether the admin endpoints are served."""
        return self._admin_token is not None

    def _routes(self) -> list[web.RouteDef]:
        routes = [
            web.get("/health", self.health, allow_head=False),
            web.get("/v1/status", self.status, allow_head=False),
            web.get("/v1/events", self.events, allow_head=False),
            web.get("/v1/blocks", self.blocks, allow_head=False),
            web.get("/v1/history/loss", self.loss_history, allow_head=False),
            web.get("/v1/blocks/head", self.head_block, allow_head=False),
            web.get("/v1/blocks/{ref}", self.block, allow_head=False),
            web.get("/v1/finality", self.finality, allow_head=False),
            web.get("/v1/model", self.model, allow_head=False),
            web.get("/v1/model/weights", self.weights, allow_head=False),
            web.post("/v1/model/sample", self.sample),
            web.get("/v1/accounts/{address}", self.account, allow_head=False),
            web.get("/v1/peers", self.peers, allow_head=False),
            web.get("/v1/validators", self.validators, allow_head=False),
            web.get("/v1/mining/work", self.work, allow_head=False),
            web.post("/v1/mining/submit", self.submit),
            web.post("/v1/mining/commitments", self.commit),
            web.get("/v1/node", self.node_info, allow_head=False),
            web.get("/metrics", self.metrics, allow_head=False),
            web.get("/openapi.json", self.openapi, allow_head=False),
            web.get("/", self.root, allow_head=False),
            web.get("/explorer", self.explorer_page, allow_head=False),
            web.get("/explorer/{file}", self.explorer_file, allow_head=False),
        ]
        if self.admin:
            routes += [
                web.post("/v1/admin/blocked-peers", self.blocked_peers),
                web.post("/v1/admin/link-delay", self.link_delay),
            ]
        return routes

    # --- lifecycle ----------------------------------------------------------------

    def start(self) -> int:
        """Start serving on a new thread; returns the bound port once listening."""
        if self._thread is not None:
            raise RuntimeError("RpcServer.start: already started")
        self._thread = threading.Thread(target=self._run, name="rpc", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            self._executor.shutdown(wait=False)
            raise RpcStartError(f"RPC cannot listen on {self.host}:{self.port}: {self._start_error}")
        return self.port

    def stop(self) -> None:
        """Stop serving and join the thread (from any thread; idempotent)."""
        with self._stop_lock:
            thread, loop, stopping = self._thread, self._loop, self._stopping
            if thread is None:
                return
            if loop is not None and stopping is not None and thread.is_alive():
                with contextlib.suppress(RuntimeError):  # the loop has just closed
                    loop.call_soon_threadsafe(stopping.set)
            thread.join()
            self._executor.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as error:
            if self._ready.is_set():
                log.exception("RPC server stopped on an error")
            else:
                self._start_error = error
        finally:
            self._ready.set()
            loop.close()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        self._evaluator = asyncio.Semaphore(1)
        limits = self.limits
        # keepalive_timeout runs from a connection's start and from each answer, and closes a
        # connection still waiting for a complete request head: idle and slow-header clients.
        runner = web.AppRunner(
            self.app,
            shutdown_timeout=5.0,
            keepalive_timeout=limits.idle_seconds,
            lingering_time=min(limits.body_seconds, 2.0),
            access_log=None,
        )
        await runner.setup()
        server = runner.server
        assert server is not None
        listener: asyncio.Server | None = None
        watchdog: asyncio.Task[None] | None = None

        def accept() -> asyncio.BaseProtocol:
            if len(server.connections) < limits.max_connections:
                return server()
            if self._refused >= limits.max_connections:  # a flood: no answer either
                return Refused(None, lambda: None)
            self._refused += 1
            message = f"busy: {limits.max_connections} connections open, the most this node serves; retry later"
            return Refused(message, self._refused_closed)

        try:
            listener = await loop.create_server(accept, self.host, self.port, reuse_address=True, backlog=128)
            self.port = int(listener.sockets[0].getsockname()[1])
            watchdog = asyncio.create_task(self._watch_stalled_sends(server))
            self._ready.set()
            await self._stopping.wait()
        finally:
            for wake in self._streams:  # the event streams see `_stopping` and end
                wake.set()
            if watchdog is not None:
                watchdog.cancel()
            if listener is not None:
                listener.close()
            await runner.cleanup()

    def _refused_closed(self) -> None:
        self._refused -= 1

    async def _watch_stalled_sends(self, server: web.Server) -> None:
        """Close connections whose client has read nothing of an answer for `send_seconds`."""
        loop = asyncio.get_running_loop()
        since: dict[object, tuple[int, float]] = {}
        while True:
            await asyncio.sleep(min(1.0, self.limits.send_seconds / 4))
            now = loop.time()
            seen: dict[object, tuple[int, float]] = {}
            for handler in server.connections:
                transport = handler.transport
                if not isinstance(transport, asyncio.WriteTransport) or transport.is_closing():
                    continue
                pending = transport.get_write_buffer_size()
                if pending == 0:
                    continue
                previous = since.get(handler)
                seen[handler] = (pending, now) if previous is None or pending < previous[0] else previous
                if now - seen[handler][1] >= self.limits.send_seconds:
                    log.info("RPC: closing a connection whose client read nothing for %s s", self.limits.send_seconds)
                    transport.abort()
            since = seen

    @web.middleware
    async def _admit(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The admin endpoints' 404 when they are off; a 503 past `max_in_flight` requests."""
        if not self.admin and request.path.startswith("/v1/admin/"):
            return error_response(
                404, f"not found: {request.method} {request.path}: the admin endpoints are off (--admin-rpc)"
            )
        if request.path == "/v1/events":  # lasts as long as its client: bounded by the subscribers instead
            return await handler(request)
        if self._in_flight >= self.limits.max_in_flight:
            message = f"busy: {self._in_flight} requests in flight, the most this node serves at once; retry later"
            return error_response(503, message, busy_headers())
        self._in_flight += 1
        try:
            return await handler(request)
        finally:
            self._in_flight -= 1

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        """Run a blocking node call on the server's pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(function, *args))

    async def _expensive(self, what: str, block: Block, state: State) -> Any:
        """Losses or a weights encoding after `block`: from the cache, or evaluated on the pool
        (one at a time; a 503 if the evaluator stays taken for `evaluator_wait_seconds`)."""
        found = self.reads.cached(what, block.hash)
        if found is not None:
            return found
        compute = self.reads.losses if what == "losses" else self.reads.weights
        return await self._on_evaluator(compute, block.hash, state)

    async def _on_evaluator(self, compute: Callable[..., T], *args: Any) -> T:
        """Run `compute` on the pool holding the evaluator (one model computation at a time;
        a 503 if the evaluator stays taken for `evaluator_wait_seconds`)."""
        assert self._evaluator is not None
        try:
            async with asyncio.timeout(self.limits.evaluator_wait_seconds):
                await self._evaluator.acquire()
        except TimeoutError:
            message = f"busy: the evaluator stayed taken for {self.limits.evaluator_wait_seconds} s; retry later"
            raise RpcError(503, message, busy_headers()) from None
        try:
            return await self._call(compute, *args)
        finally:
            self._evaluator.release()

    async def _read_body(self, request: web.Request) -> bytes:
        """The request body; 408 (and the connection closed) if it does not arrive in `body_seconds`."""
        try:
            async with asyncio.timeout(self.limits.body_seconds):
                return await request.read()
        except TimeoutError:
            raise RpcError(408, f"body: not received within {self.limits.body_seconds} s") from None

    def _authorize(self, request: web.Request, admin: bool = False) -> None:
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not credentials.strip():
            raise RpcError(401, "missing bearer token (Authorization: Bearer <token>)", challenge)
        given = credentials.strip().encode("utf-8", "surrogatepass")
        if not admin:
            if not hmac.compare_digest(given, self._token):
                raise RpcError(401, "wrong bearer token", challenge)
            return
        assert self._admin_token is not None
        if hmac.compare_digest(given, self._admin_token):
            return
        if hmac.compare_digest(given, self._token):
            raise RpcError(403, "the admin endpoints take the admin token (DATADIR/admin_token), not the mining token")
        raise RpcError(401, "wrong bearer token", challenge)

    # --- handlers -------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        ready = await self._call(self.backend.is_ready)
        syncing = await self._call(self.backend.is_syncing)
        if not ready:
            return web.json_response({"status": "not ready"}, status=503)
        if syncing:
            return web.json_response({"status": "syncing"}, status=206)
        return web.json_response({"status": "synced"})

    async def status(self, request: web.Request) -> web.Response:
        head = self.node.head()
        losses = await self._expensive("losses", head.block, head.state)
        return web.json_response(await self._call(status_view, self.backend, head, losses))

    async def head_block(self, request: web.Request) -> web.Response:
        raw = parse_raw_format(request)
        return await self._block_response(self.node.head().block, raw)

    async def block(self, request: web.Request) -> web.Response:
        ref = parse_block_ref(request.match_info["ref"])
        raw = parse_raw_format(request)
        block = await self._call(find_block, self.node, ref)
        return await self._block_response(block, raw)

    async def _block_response(self, block: Block, raw: bool) -> web.Response:
        if raw:
            return web.Response(body=await self._call(block.encode), content_type="application/octet-stream")
        return web.json_response(await self._call(block_view, self.node, block))

    async def events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events of the topics asked (p2p/events.py); 503 past the subscribers a node serves."""
        topics = parse_topics(request.query.get("topics"))
        last_id = parse_last_event_id(request.headers.get("Last-Event-ID"))
        assert self._stopping is not None
        try:
            return await stream_events(request, self.node.events, topics, last_id, lambda: self.node.head().block,
                                       self.limits.keep_alive_seconds, self._stopping, self._streams)  # fmt: skip
        except TooManySubscribers as error:
            raise RpcError(503, f"busy: {error}; retry later", busy_headers()) from None

    async def blocks(self, request: web.Request) -> web.Response:
        """Decided block summaries, newest first (p2p/history.py)."""
        start, limit = parse_page(request, BLOCKS_PAGE_DEFAULT, BLOCKS_PAGE_MAX)
        return web.json_response(await self._call(self.history.blocks, start, limit))

    async def loss_history(self, request: web.Request) -> web.Response:
        """Each decided height's test and validation losses, oldest first (p2p/history.py)."""
        start, limit = parse_page(request, LOSS_PAGE_DEFAULT, LOSS_PAGE_MAX)
        return web.json_response(await self._call(self.history.losses, 1 if start is None else start, limit))

    async def finality(self, request: web.Request) -> web.Response:
        return web.json_response(await self._call(finality_view, self.backend))

    async def model(self, request: web.Request) -> web.Response:
        height = parse_height_query(request)
        block, state = await self._call(block_and_state, self.node, height)
        losses = await self._expensive("losses", block, state)
        return web.json_response(await self._call(model_view, self.node, block, state, losses))

    async def weights(self, request: web.Request) -> web.Response:
        height = parse_height_query(request)
        as_float = parse_weights_format(request)
        block, state = await self._call(block_and_state, self.node, height)
        if as_float:
            data = await self._on_evaluator(self.reads.float_weights, block, state)
            name = f"potchain-{block.header.height}-float32.safetensors"
        else:
            data = await self._expensive("weights", block, state)
            name = f"potchain-{block.header.height}.safetensors"
        disposition = f'attachment; filename="{name}"'
        return web.Response(
            body=data, content_type="application/octet-stream", headers={"Content-Disposition": disposition}
        )

    async def sample(self, request: web.Request) -> web.Response:
        """Text the model at a decided height continues a prompt with (rate-limited per client address)."""
        query = parse_sample_body(await self._read_body(request))
        wait = self._samples.take(request.remote or "", time.monotonic())
        if wait > 0:
            limits = self.limits
            message = (
                f"rate-limited: {limits.sample_burst} samples at once and {limits.samples_per_minute:g} a minute "
                f"per client; retry in {math.ceil(wait)} s"
            )
            raise RpcError(429, message, {"Retry-After": str(math.ceil(wait))})
        block, state = await self._call(block_and_state, self.node, query.height)
        text = await self._on_evaluator(self.reads.sample, state, query.encoded, query.settings)
        settings = query.settings
        return web.json_response(
            {
                "height": block.header.height,
                "hash": block.hash.hex(),
                "prompt": query.prompt,
                "text": text,
                "tokens": settings.tokens,
                "seed": settings.seed,
            }
        )

    async def account(self, request: web.Request) -> web.Response:
        address = parse_hex32(request.match_info["address"], "address")
        account = self.node.head().state.accounts.get(address)  # an immutable decided state: no lock
        return web.json_response(account_view(address, account))

    async def peers(self, request: web.Request) -> web.Response:
        return web.json_response({"peers": await self._call(self.backend.peers)})

    async def validators(self, request: web.Request) -> web.Response:
        return web.json_response(validators_view(self.node))  # an immutable decided state: no lock

    async def work(self, request: web.Request) -> web.Response:
        miner = parse_hex32(request.query.get("miner"), "miner")
        return web.json_response(work_view(await self._call(self.node.work_for, miner)))

    async def submit(self, request: web.Request) -> web.Response:
        self._authorize(request)
        data = await self._read_body(request)
        if not data:
            raise RpcError(400, "body: empty, want an encoded training block")
        try:
            block, known = await self._call(self.backend.submit_block, data)
        except DecodeError as error:
            raise RpcError(400, str(error)) from None
        except InvalidBlock as error:
            raise RpcError(422, str(error)) from None
        return web.json_response(submit_view(block, known))

    async def commit(self, request: web.Request) -> web.Response:
        """Keep a miner's update commitment for the decided block being decided (and gossip it):
        202 kept, 200 already kept; 409 for another height, or when the node holds another
        commitment of the miner (one per miner) or as many as a block carries."""
        self._authorize(request)
        data = await self._read_body(request)
        if not data:
            raise RpcError(400, "body: empty, want an encoded update commitment")
        try:
            commitment, kept = await self._call(self.backend.submit_commitment, data)
        except DecodeError as error:
            raise RpcError(400, str(error)) from None
        except (StaleBlock, UnknownParent) as error:
            raise RpcError(409, f"{error}: a commitment is for the height being decided") from None
        except InvalidBlock as error:
            raise RpcError(422, str(error)) from None
        if kept:
            return web.json_response(commitment_view(commitment, known=False), status=202)
        held = await self._call(held_commitment, self.node, commitment.miner)
        if held == commitment:
            return web.json_response(commitment_view(commitment, known=True))
        if held is not None:
            raise RpcError(409, f"commitment: the node holds another of this miner's for height {held.height} "
                                f"(update {held.update_hash.hex()}): one per miner")  # fmt: skip
        raise RpcError(409, f"commitment: the node holds as many for height {commitment.height} as a block carries")

    async def _json_field(self, request: web.Request, name: str) -> Any:
        """One field of a JSON object body (None when the object lacks it); 400 if the body is not JSON."""
        try:
            document = json.loads(await self._read_body(request))
        except ValueError:
            raise RpcError(400, "body: not JSON") from None
        return document.get(name) if isinstance(document, dict) else None

    async def node_info(self, request: web.Request) -> web.Response:
        return web.json_response(await self._call(self.backend.node_info))

    async def blocked_peers(self, request: web.Request) -> web.Response:
        """Replace the set of peers this node refuses (a network partition, for simulations)."""
        self._authorize(request, admin=True)
        peers = await self._json_field(request, "peers")
        if not isinstance(peers, list) or not all(isinstance(p, str) and 0 < len(p) <= 128 for p in peers):
            raise RpcError(400, 'body: want {"peers": [peer id (1 to 128 characters), ...]}')
        await self._call(self.backend.set_blocked_peers, peers)
        return web.json_response({"peers": sorted(set(peers))})

    async def link_delay(self, request: web.Request) -> web.Response:
        """Delay everything this node sends by a number of seconds (0 to 10; simulations)."""
        self._authorize(request, admin=True)
        seconds = await self._json_field(request, "seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= 10:
            raise RpcError(400, 'body: want {"seconds": 0 to 10}')
        await self._call(self.backend.set_link_delay, float(seconds))
        return web.json_response({"seconds": float(seconds)})

    async def metrics(self, request: web.Request) -> web.Response:
        """The node's Prometheus metrics in the text format (p2p/metrics.py)."""
        return web.Response(
            body=await self._call(metrics_text, self.backend), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self._openapi)

    async def root(self, request: web.Request) -> web.Response:
        return web.Response(status=302, headers={"Location": "/explorer"})

    async def explorer_page(self, request: web.Request) -> web.Response:
        return self._explorer_response("index.html")

    async def explorer_file(self, request: web.Request) -> web.Response:
        name = request.match_info["file"]
        if name == "index.html" or name not in EXPLORER_FILES:
            raise RpcError(404, f"not found: the explorer has no file {name!r}")
        return self._explorer_response(name)

    def _explorer_response(self, name: str) -> web.Response:
        return web.Response(
            body=self._explorer[name], content_type=EXPLORER_FILES[name], charset="utf-8", headers=EXPLORER_HEADERS
        )
