"""The wire protocol and the sync path on two real libp2p hosts over loopback TCP."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from libp2p.custom_types import TProtocol

from chain.blocks import Header, decode_block
from chain.encoding import DecodeError, unpack
from p2p.full_node import FullNode
from p2p.service import NetworkNode, NodeConfig
from p2p.wire import (
    ERROR,
    MAX_FRAME_BYTES,
    NOT_FOUND,
    OK,
    ProtocolError,
    Request,
    StatusMessage,
    decode_block_list,
    decode_request,
    encode_varint,
    read_frame,
    read_response,
    sync_protocol,
    write_frame,
    write_response,
)
from tests.chain_builders import Scenario


class Pipe:
    """Bytes written come back out in reads of at most `chunk` bytes (as Yamux splits them)."""

    def __init__(self, chunk: int = 7) -> None:
        self.buffer = bytearray()
        self.chunk = chunk

    async def write(self, data: bytes) -> None:
        self.buffer += data

    async def read(self, n: int | None = None) -> bytes:
        count = min(self.chunk, len(self.buffer), n if n is not None else self.chunk)
        data = bytes(self.buffer[:count])
        del self.buffer[:count]
        return data


def test_frames_and_responses_survive_any_split() -> None:
    async def main() -> None:
        pipe = Pipe()
        await write_frame(pipe, b"hello")
        assert await read_frame(pipe) == b"hello"
        payload = bytes(range(256)) * 40_000  # 10 MB: three frames
        await write_response(pipe, OK, payload)
        pipe.chunk = 1 << 16
        assert await read_response(pipe) == (OK, payload)
        pipe.buffer += encode_varint(MAX_FRAME_BYTES + 1)
        with pytest.raises(ProtocolError, match="limit"):
            await read_frame(pipe)
        pipe.buffer = bytearray(encode_varint(10) + b"short")
        with pytest.raises(ProtocolError, match="stream ended"):
            await read_frame(pipe)

    trio.run(main)


@pytest.mark.parametrize(
    ("request_bytes", "message"),
    [
        (b"\xc1", "request"),
        (Request("nonsense").encode(), "unknown method"),
        (Request("blocks", (0,)).encode(), "1 arguments, want 2"),
        (Request("blocks", (0, 33)).encode(), "count <= 32"),
        (Request("block", (b"short",)).encode(), "32-byte hash"),
        (Request("chunk", (12,)).encode(), "hex digest"),
    ],
)
def test_malformed_requests_are_refused_with_a_reason(request_bytes: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_request(request_bytes)


def run_pair(
    tmp_path: Path,
    body: Callable[[NetworkNode, NetworkNode, Scenario], Awaitable[None]],
    b_datadir: Path | None = None,
) -> None:
    """Node A holds a two-block chain; node B (empty, or the store in `b_datadir`) dials A."""
    scenario = Scenario.create(tmp_path / "a")
    parent, state = scenario.node.checkpoint()
    training = scenario.valid_training_block(parent, state)
    scenario.node.import_block(training.encode())
    validation = scenario.valid_validation_block(training, state, scenario.attestations(training, state))
    scenario.node.import_block(validation.encode())
    b_datadir = b_datadir or tmp_path / "b"
    other = FullNode(scenario.node.genesis_path, b_datadir)
    a = NetworkNode(scenario.node, NodeConfig(tmp_path / "a"))

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            ready = trio.Event()

            async def started(_: NetworkNode) -> None:
                ready.set()

            nursery.start_soon(a.run, started)
            await ready.wait()
            b = NetworkNode(other, NodeConfig(b_datadir, bootstrap=[f"{a.listen_addresses[0]}/p2p/{a.peer_id}"]))
            b_ready = trio.Event()

            async def b_started(_: NetworkNode) -> None:
                b_ready.set()

            nursery.start_soon(b.run, b_started)
            await b_ready.wait()
            with trio.fail_after(30):
                while not b.connected_peers():
                    await trio.sleep(0.1)
            with trio.fail_after(300):  # generous: a loaded machine evaluates slowly
                await body(a, b, scenario)
            a.stop()
            b.stop()

    try:
        trio.run(main)
    finally:
        scenario.node.close()
        other.close()


def test_sync_protocol_answers_every_method_and_a_new_node_catches_up(tmp_path: Path) -> None:
    async def body(a: NetworkNode, b: NetworkNode, scenario: Scenario) -> None:
        peer = b.connected_peers()[0]
        status = StatusMessage.decode(await b.request(peer, Request("status")) or b"")
        head, head_state = scenario.node.head()
        assert (status.head_height, status.head_hash) == (head.header.height, head.hash)
        blocks = [decode_block(d) for d in decode_block_list(await b.request(peer, Request("blocks", (0, 32))) or b"")]
        assert [block.hash for block in blocks] == [scenario.node.block_at(h).hash for h in range(3)]  # type: ignore[union-attr]
        headers = unpack(await b.request(peer, Request("headers", (1, 5))) or b"", "headers")
        assert [Header.from_fields(unpack(h, "header")).hash for h in headers] == [blocks[1].hash, blocks[2].hash]
        assert await b.request(peer, Request("block", (head.hash,))) == head.encode()
        assert await b.request(peer, Request("block", (bytes(32),))) is None
        content = head_state.slices[0]
        assert await b.request(peer, Request("slice", (hashlib.sha256(content).digest(),))) == content
        digest = scenario.node.genesis.dataset.documents[0].chunks[0]
        chunk = await b.request(peer, Request("chunk", (digest,)))
        assert chunk == (scenario.node.chunk_directory / f"{digest}.xz").read_bytes()
        assert await b.request(peer, Request("chunk", ("0" * 64,))) is None
        # B's sync loop fetches and validates A's chain on its own.
        while b.node.head()[0].hash != head.hash:
            await trio.sleep(0.2)
        assert b.node.head()[1].root == head_state.root

    run_pair(tmp_path, body)


def test_a_malformed_request_is_answered_with_an_error_and_costs_the_peer(tmp_path: Path) -> None:
    async def body(a: NetworkNode, b: NetworkNode, scenario: Scenario) -> None:
        assert b.host is not None
        stream = await b.host.new_stream(b.connected_peers()[0], [TProtocol(sync_protocol(a.chain_id))])
        await write_frame(stream, b"\x93\xa8nonsense")
        status, message = await read_response(stream)
        await stream.close()
        assert status == ERROR and b"request" in message
        record = a.peers.get(b.peer_id)
        assert record.score < 0 and "sync request" in record.penalties[-1][2]
        assert status not in (OK, NOT_FOUND)

    run_pair(tmp_path, body)


def test_a_chain_that_crosses_the_finalized_block_is_refused(tmp_path: Path) -> None:
    """B finalized its own first training block; A's chain decided another one there."""
    from chain.crypto import devnet_key

    theirs = Scenario.create(tmp_path / "b-chain")
    parent, state = theirs.node.checkpoint()
    training = theirs.valid_training_block(parent, state, miner=devnet_key("miner-1"))
    theirs.node.import_block(training.encode())
    theirs.node.import_block(
        theirs.valid_validation_block(training, state, theirs.attestations(training, state)).encode()
    )
    theirs.node.close()

    async def body(a: NetworkNode, b: NetworkNode, scenario: Scenario) -> None:
        # Give A a second round so its chain is ahead of B's.
        parent, state = scenario.node.checkpoint()
        second = scenario.valid_training_block(parent, state)
        await a.import_block(second, "test")
        validation = scenario.valid_validation_block(second, state, scenario.attestations(second, state))
        await a.import_block(validation, "test")
        record = b.peers.get(a.peer_id)
        while not any("does not descend" in reason for _, _, reason in record.penalties):
            await trio.sleep(0.2)
        assert b.node.checkpoint()[0].header.height == 2
        assert b.node.checkpoint()[1].finalized_hash == training.hash

    run_pair(tmp_path, body, b_datadir=tmp_path / "b-chain")


def test_an_attestation_of_an_unseen_block_makes_the_node_fetch_the_block(tmp_path: Path) -> None:
    """A racing block that missed B reaches it through the attestations naming it."""
    from chain.encoding import pack
    from p2p.wire import attestation_topic

    async def body(a: NetworkNode, b: NetworkNode, scenario: Scenario) -> None:
        with trio.fail_after(120):
            while b.node.checkpoint()[0].hash != scenario.node.checkpoint()[0].hash:
                await trio.sleep(0.2)
            parent, state = scenario.node.checkpoint()
            training = scenario.valid_training_block(parent, state)
            await a.import_block(training, "test")  # imported on A, never announced
            attestation = scenario.attestations(training, state)[0]
            while attestation not in b.node.attestations_for(training.hash):
                await a.publish(attestation_topic(a.chain_id), pack(attestation.fields()))
                await trio.sleep(1.0)
        assert b.node.in_store(training.hash)
        assert [block.hash for block in b.node.pending_training_blocks()] == [training.hash]
        assert b.peers.get(a.peer_id).score >= 0

    run_pair(tmp_path, body)


def test_a_sibling_validation_block_reaches_a_node_through_sync(tmp_path: Path) -> None:
    """B holds a second validation block for A's finalized training block, one
    that wins the fork choice (lower hash); A's sync fetches it although B's
    head is no higher than A's, and both settle on it."""
    from consensus.proposals import propose_validation_block

    async def body(a: NetworkNode, b: NetworkNode, scenario: Scenario) -> None:
        with trio.fail_after(120):
            while b.node.head()[0].hash != scenario.node.head()[0].hash:
                await trio.sleep(0.2)
        ours, _ = scenario.node.head()
        training = scenario.node.block_at(ours.header.height - 1)
        assert training is not None
        state = scenario.node.state_of(training.header.parent)
        assert state is not None
        attestations = scenario.attestations(training, state)
        siblings = [
            propose_validation_block(scenario.chain, training, state, key, attestations, [], ours.header.timestamp + t)
            for key in scenario.validators
            for t in range(4)
        ]
        sibling = min(siblings, key=lambda block: block.hash)
        assert sibling.hash < ours.hash
        await b.import_block(sibling, "test")  # B only; nothing announces it
        assert b.node.head()[0].hash == sibling.hash
        with trio.fail_after(120):
            while a.node.head()[0].hash != sibling.hash:
                await trio.sleep(0.2)
        assert a.node.in_store(ours.hash)  # the sibling it replaced is still held, as a fork

    run_pair(tmp_path, body)
