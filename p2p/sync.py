"""The sync protocol: serving requests, making them, and catching up with peers.

Every two seconds, ask each peer for its status; when a peer's head is as high
as ours and unknown to us, fetch its canonical blocks from our finalized block
up and import each one (a chain that does not descend from it is refused: no
reorg crosses a finalized block). The same protocol serves single blocks by
hash, headers, slices and dataset chunks; gossip fetches announced blocks
with it (p2p/gossip.py).

`SyncMixin` is one part of `NetworkNode` (p2p/service.py), which registers
`_serve_sync` as the protocol's stream handler in `run()`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import trio
from libp2p.abc import IHost, INetStream
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from chain.blocks import Block, decode_block
from chain.encoding import DecodeError, pack
from p2p.full_node import FullNode
from p2p.peers import PENALTY_INVALID, PENALTY_MALFORMED, PeerBook
from p2p.wire import (
    ERROR,
    MAX_BLOCKS_PER_REQUEST,
    NOT_FOUND,
    OK,
    ProtocolError,
    Request,
    StatusMessage,
    decode_block_list,
    decode_request,
    read_frame,
    read_response,
    sync_protocol,
    write_frame,
    write_response,
)

log = logging.getLogger("potchain.node")

REQUEST_TIMEOUT = 20.0
"""Seconds a sync request may take before the peer is given up on."""
SYNC_INTERVAL = 2.0


async def send_request(host: IHost, chain_id: str, peer: ID, request: Request) -> bytes | None:
    """One sync request on its own stream; the payload, or None when the peer has no such object."""
    with trio.fail_after(REQUEST_TIMEOUT):
        stream = await host.new_stream(peer, [TProtocol(sync_protocol(chain_id))])
        try:
            await write_frame(stream, request.encode())
            status, payload = await read_response(stream)
        finally:
            await stream.close()
    if status == NOT_FOUND:
        return None
    if status != OK:
        raise ProtocolError(f"{request.method}: peer error {payload.decode(errors='replace')}")
    return payload


class SyncMixin:
    """`NetworkNode`'s sync protocol, server and client; see the module docstring."""

    node: FullNode
    chain_id: str
    peers: PeerBook
    host: IHost | None
    link_delay: float
    ready: bool
    syncing: bool
    _syncing_from: set[str]
    _sync_tasks: trio.Nursery | None

    if TYPE_CHECKING:  # the other parts of NetworkNode

        def connected_peers(self) -> list[ID]: ...
        def _reject(self, peer_id: str, what: str, reason: str, points: int) -> None: ...
        async def import_block(self, block: Block, source: str) -> bool: ...

    async def request(self, peer: ID, request: Request) -> bytes | None:
        """One sync request; the payload, or None when the peer has no such object."""
        assert self.host is not None
        return await send_request(self.host, self.chain_id, peer, request)

    async def _serve_sync(self, stream: INetStream) -> None:
        peer = str(stream.muxed_conn.peer_id)
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                try:
                    request = decode_request(await read_frame(stream))
                except (DecodeError, ProtocolError) as error:
                    self._reject(peer, "sync request", str(error), PENALTY_MALFORMED)
                    await write_response(stream, ERROR, str(error).encode())
                    return
                payload = await trio.to_thread.run_sync(self._answer, request)
                if self.link_delay:
                    await trio.sleep(self.link_delay)
                await write_response(stream, OK if payload is not None else NOT_FOUND, payload or b"")
        except (trio.TooSlowError, ProtocolError, Exception) as error:
            log.debug("sync stream from %s failed: %s", peer, error)
        finally:
            await stream.close()

    def _answer(self, request: Request) -> bytes | None:
        """The payload for a sync request (in a worker thread)."""
        node = self.node
        if request.method == "status":
            return self.status().encode()
        if request.method == "block":
            return node.encoded_block(request.arguments[0])
        if request.method in ("headers", "blocks"):
            start, count = request.arguments
            items: list[bytes] = []
            for height in range(start, start + min(count, MAX_BLOCKS_PER_REQUEST)):
                block = node.block_at(height)
                if block is None:
                    break
                items.append(block.encode() if request.method == "blocks" else pack(block.header.fields()))
            return pack(items)
        if request.method == "slice":
            return node.slice_content(request.arguments[0])
        if request.method == "chunk":
            digest = request.arguments[0]
            if not all(c in "0123456789abcdef" for c in digest):
                return None
            path = node.chunk_directory / f"{digest}.xz"
            return path.read_bytes() if path.exists() else None
        return None

    def status(self) -> StatusMessage:
        with self.node.lock:
            head, _ = self.node.head()
            checkpoint, _ = self.node.checkpoint()
            return StatusMessage(
                bytes.fromhex(self.node.genesis.hash), head.header.height, head.hash,
                checkpoint.header.height, checkpoint.hash,
            )  # fmt: skip

    def _request_sync(self, peer: ID) -> None:
        if self._sync_tasks is not None and str(peer) not in self._syncing_from:
            self._sync_tasks.start_soon(self._sync_from, peer)

    async def _sync_loop(self) -> None:
        async with trio.open_nursery() as nursery:
            self._sync_tasks = nursery
            first = True
            while True:
                behind = False
                for peer in self.connected_peers():
                    if self.peers.is_banned(str(peer)):
                        continue
                    try:
                        payload = await self.request(peer, Request("status"))
                        if payload is None:
                            continue
                        status = StatusMessage.decode(payload)
                    except (DecodeError, ProtocolError) as error:
                        self._reject(str(peer), "status", str(error), PENALTY_MALFORMED)
                        continue
                    except Exception as error:
                        log.debug("status from %s failed: %s", peer, error)
                        continue
                    self.peers.get(str(peer)).head_height = status.head_height
                    if status.genesis_hash != bytes.fromhex(self.node.genesis.hash):
                        self._reject(str(peer), "status", "a different genesis", PENALTY_INVALID)
                        continue
                    head, _ = self.node.head()
                    # A head as high as ours that we lack: a racing block, or a sibling validation block.
                    if status.head_height >= head.header.height and not self.node.in_store(status.head_hash):
                        behind = behind or status.head_height > head.header.height + 1
                        if str(peer) not in self._syncing_from:
                            nursery.start_soon(self._sync_from, peer)
                self.syncing = behind or bool(self._syncing_from)
                if first or not self.ready:
                    self.ready = True
                    first = False
                await trio.sleep(SYNC_INTERVAL)

    async def _sync_from(self, peer: ID) -> None:
        """Fetch and import a peer's canonical blocks from our finalized block up
        (from the anchor, not the checkpoint: the peer may follow a sibling of
        our checkpoint, which is still open)."""
        name = str(peer)
        if name in self._syncing_from:
            return
        self._syncing_from.add(name)
        self.syncing = True
        try:
            while True:
                anchor = self.node.anchor()
                start = anchor.header.height + 1
                try:
                    payload = await self.request(peer, Request("blocks", (start, MAX_BLOCKS_PER_REQUEST)))
                    encoded = decode_block_list(payload or pack([]))
                    blocks = [decode_block(data) for data in encoded]
                except DecodeError as error:
                    self._reject(name, "blocks", str(error), PENALTY_MALFORMED)
                    return
                except Exception as error:
                    log.debug("sync from %s failed: %s", name, error)
                    return
                if not blocks:
                    return
                if blocks[0].header.parent != anchor.hash and not self.node.in_store(blocks[0].header.parent):
                    self._reject(name, "chain", f"does not descend from our finalized block at height "
                                 f"{anchor.header.height}", PENALTY_MALFORMED)  # fmt: skip
                    return
                imported = 0
                for block in blocks:
                    if self.node.is_known(block):
                        continue
                    if not await self.import_block(block, name):
                        return
                    imported += 1
                if imported == 0 or len(blocks) < MAX_BLOCKS_PER_REQUEST:
                    return
                log.info("synced to height %d from %s", blocks[-1].header.height, name)
        finally:
            self._syncing_from.discard(name)
