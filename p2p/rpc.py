"""The node's HTTP RPC: JSON reads of the chain, the model and mining work,
and block submission, served by aiohttp.

libp2p runs on trio in the main thread; the RPC runs its own asyncio loop in
its own thread. Every call into the node (which may wait on its lock or run
an evaluation) goes to the server's thread pool, so the loop never blocks.
Errors are JSON `{"error": message}` with a 4xx status; a 500 is a bug.
Bytes are lowercase hex; the paths and schemas are in `p2p.openapi`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import re
import secrets
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
from functools import partial
from pathlib import Path
from typing import Any, Protocol, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler

from chain.blocks import (
    Block,
    DecidedBody,
    EquivocationEvidence,
    Kind,
    TrainingBody,
    TrainingVerdict,
    decode_block,
)
from chain.encoding import MAX_MESSAGE_BYTES, DecodeError
from chain.files import SECRET_MODE, write_atomically
from chain.state import Account, State
from chain.votes import Commit, Proposal
from consensus.rules import InvalidBlock
from p2p.decided_node import DecidedNode, WorkAssignment
from p2p.openapi import openapi_document
from training.weights import encode_weights

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = MAX_MESSAGE_BYTES + (64 << 10)
"""Largest request body accepted: one encoded block and some slack."""
TOKEN_FILE = "rpc_token"
"""The write token's file name in the data directory."""
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

    def node_info(self) -> dict[str, object]:
        return {"peer_id": None, "addresses": [], "rejections": [], "blocked_peers": [], "link_delay_seconds": 0.0}

    def set_blocked_peers(self, peers: list[str]) -> None:
        raise RpcError(409, "this node has no network")

    def set_link_delay(self, seconds: float) -> None:
        raise RpcError(409, "this node has no network")


# --- The write token --------------------------------------------------------------


def load_or_create_token(datadir: Path) -> str:
    """The token in `datadir/rpc_token`, created (32 random bytes, hex, mode 0600) if absent."""
    path = datadir / TOKEN_FILE
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
        "training": [verdict_view(verdict) for verdict in body.training],
        "confirmed": any(verdict.gain > 0 for verdict in body.training),
        "last_commit": commit_view(body.last_commit, None) if body.last_commit is not None else None,
        "evidence": [evidence_view(evidence) for evidence in body.evidence],
        "rewards": [{"address": r.address.hex(), "amount": r.amount} for r in body.rewards],
    }


def verdict_view(verdict: TrainingVerdict) -> JSON:
    return {
        "training_block": verdict.training_block.hex(),
        "loss_before": verdict.loss_before,
        "loss_after": verdict.loss_after,
        "gain": verdict.gain,
        "confirmed": verdict.gain > 0,
        "vrf_proof": verdict.vrf_proof.hex(),
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


def status_view(backend: RpcBackend) -> JSON:
    node = backend.node
    head = node.head()
    validation_loss, test_loss = node.mean_losses(head.state)
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


def model_view(node: DecidedNode, block: Block, state: State) -> JSON:
    config = node.genesis.model
    validation_loss, test_loss = node.mean_losses(state)
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


def weights_file(node: DecidedNode, height: int | None) -> tuple[int, bytes]:
    """(height, safetensors bytes) of the model at the head or after the block at `height`."""
    block, state = block_and_state(node, height)
    return block.header.height, encode_weights(node.weights_of(state))


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


def parse_raw_format(request: web.Request) -> bool:
    """`?format=raw` (True) or `json`, the default."""
    value = request.query.get("format", "json")
    if value not in ("json", "raw"):
        raise RpcError(400, f"format: {value!r}, want 'json' or 'raw'")
    return value == "raw"


# --- The server ----------------------------------------------------------------------


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error as JSON: RpcError and aiohttp's HTTP errors with their status,
    anything else logged and answered 500."""
    try:
        return await handler(request)
    except RpcError as error:
        return error_response(error.status, error.message, error.headers)
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


class RpcServer:
    """The HTTP RPC on its own thread and asyncio loop; `start()`, then `stop()`."""

    def __init__(
        self,
        backend: RpcBackend,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        token: str,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    ) -> None:
        if not token:
            raise ValueError("RpcServer needs a non-empty token")
        self.backend = backend
        self.node = backend.node
        self.host = host
        self.port = port
        """The port asked for; after start(), the bound port."""
        self._token = token.encode()
        self._openapi = openapi_document()
        self.app = web.Application(middlewares=[json_errors], client_max_size=max_body_bytes)
        self.app.add_routes(self._routes())
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="rpc-worker")
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._stop_lock = threading.Lock()

    def _routes(self) -> list[web.RouteDef]:
        return [
            web.get("/health", self.health, allow_head=False),
            web.get("/v1/status", self.status, allow_head=False),
            web.get("/v1/blocks/head", self.head_block, allow_head=False),
            web.get("/v1/blocks/{ref}", self.block, allow_head=False),
            web.get("/v1/finality", self.finality, allow_head=False),
            web.get("/v1/model", self.model, allow_head=False),
            web.get("/v1/model/weights", self.weights, allow_head=False),
            web.get("/v1/accounts/{address}", self.account, allow_head=False),
            web.get("/v1/peers", self.peers, allow_head=False),
            web.get("/v1/mining/work", self.work, allow_head=False),
            web.post("/v1/mining/submit", self.submit),
            web.get("/v1/node", self.node_info, allow_head=False),
            web.post("/v1/admin/blocked-peers", self.blocked_peers),
            web.post("/v1/admin/link-delay", self.link_delay),
            web.get("/openapi.json", self.openapi, allow_head=False),
        ]

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
        self._stopping = asyncio.Event()
        runner = web.AppRunner(self.app, shutdown_timeout=5.0)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
            self.port = int(runner.addresses[0][1])
            self._ready.set()
            await self._stopping.wait()
        finally:
            await runner.cleanup()

    async def _call(self, function: Callable[..., T], *args: Any) -> T:
        """Run a blocking node call on the server's pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, partial(function, *args))

    def _authorize(self, request: web.Request) -> None:
        scheme, _, credentials = request.headers.get("Authorization", "").partition(" ")
        challenge = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != "bearer" or not credentials.strip():
            raise RpcError(401, "missing bearer token (Authorization: Bearer <token>)", challenge)
        if not hmac.compare_digest(credentials.strip().encode("utf-8", "surrogatepass"), self._token):
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
        return web.json_response(await self._call(status_view, self.backend))

    async def head_block(self, request: web.Request) -> web.Response:
        raw = parse_raw_format(request)
        head = await self._call(self.node.head)
        return await self._block_response(head.block, raw)

    async def block(self, request: web.Request) -> web.Response:
        ref = parse_block_ref(request.match_info["ref"])
        raw = parse_raw_format(request)
        block = await self._call(find_block, self.node, ref)
        return await self._block_response(block, raw)

    async def _block_response(self, block: Block, raw: bool) -> web.Response:
        if raw:
            return web.Response(body=await self._call(block.encode), content_type="application/octet-stream")
        return web.json_response(await self._call(block_view, self.node, block))

    async def finality(self, request: web.Request) -> web.Response:
        return web.json_response(await self._call(finality_view, self.backend))

    async def model(self, request: web.Request) -> web.Response:
        height = parse_height_query(request)
        block, state = await self._call(block_and_state, self.node, height)
        return web.json_response(await self._call(model_view, self.node, block, state))

    async def weights(self, request: web.Request) -> web.Response:
        height, data = await self._call(weights_file, self.node, parse_height_query(request))
        disposition = f'attachment; filename="potchain-{height}.safetensors"'
        return web.Response(
            body=data, content_type="application/octet-stream", headers={"Content-Disposition": disposition}
        )

    async def account(self, request: web.Request) -> web.Response:
        address = parse_hex32(request.match_info["address"], "address")
        account = await self._call(self.node.account, address)
        return web.json_response(account_view(address, account))

    async def peers(self, request: web.Request) -> web.Response:
        return web.json_response({"peers": await self._call(self.backend.peers)})

    async def work(self, request: web.Request) -> web.Response:
        miner = parse_hex32(request.query.get("miner"), "miner")
        return web.json_response(work_view(await self._call(self.node.work_for, miner)))

    async def submit(self, request: web.Request) -> web.Response:
        self._authorize(request)
        data = await request.read()
        try:
            block, known = await self._call(self.backend.submit_block, data)
        except DecodeError as error:
            raise RpcError(400, str(error)) from None
        except InvalidBlock as error:
            raise RpcError(422, str(error)) from None
        return web.json_response(submit_view(block, known))

    async def _json_field(self, request: web.Request, name: str) -> Any:
        """One field of a JSON object body (None when the object lacks it); 400 if the body is not JSON."""
        try:
            document = json.loads(await request.read())
        except ValueError:
            raise RpcError(400, "body: not JSON") from None
        return document.get(name) if isinstance(document, dict) else None

    async def node_info(self, request: web.Request) -> web.Response:
        return web.json_response(await self._call(self.backend.node_info))

    async def blocked_peers(self, request: web.Request) -> web.Response:
        """Replace the set of peers this node refuses (a network partition, for simulations and operators)."""
        self._authorize(request)
        peers = await self._json_field(request, "peers")
        if not isinstance(peers, list) or not all(isinstance(p, str) and 0 < len(p) <= 128 for p in peers):
            raise RpcError(400, 'body: want {"peers": [peer id, ...]}')
        await self._call(self.backend.set_blocked_peers, peers)
        return web.json_response({"peers": sorted(set(peers))})

    async def link_delay(self, request: web.Request) -> web.Response:
        """Delay everything this node sends by a number of seconds (0 to 10; simulations)."""
        self._authorize(request)
        seconds = await self._json_field(request, "seconds")
        if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 <= seconds <= 10:
            raise RpcError(400, 'body: want {"seconds": 0 to 10}')
        await self._call(self.backend.set_link_delay, float(seconds))
        return web.json_response({"seconds": float(seconds)})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(self._openapi)
