"""The wire protocol and the sync path on two real libp2p voting nodes over loopback TCP."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
from libp2p.custom_types import TProtocol

from chain.blocks import Header, decode_block
from chain.encoding import DecodeError, Fields, pack, unpack
from chain.votes import decode_commit
from genesis import DEVNET
from p2p.decided_node import DecidedNode
from p2p.voting_node import VotingNode, VotingNodeConfig
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
from tests.chain_builders import Scenario, decide_next


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
    body: Callable[[VotingNode, VotingNode, Scenario], Awaitable[None]],
    a_class: type[VotingNode] = VotingNode,
) -> None:
    """Node A holds two decided heights (the first names a training block); node B, empty
    and without validator keys, dials A. Neither votes: B can only follow by syncing."""
    scenario = Scenario.create(tmp_path / "builder")
    node = DecidedNode(DEVNET, tmp_path / "a")
    keys = scenario.validators
    training = scenario.valid_training_block(node.head().block, node.head().state)
    node.on_training_block(training)
    decide_next(node, keys[0], keys[:3], training)
    decide_next(node, keys[1], keys[1:], None)
    other = DecidedNode(DEVNET, tmp_path / "b")
    a = a_class(node, VotingNodeConfig())

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            ready = trio.Event()

            async def started(_: VotingNode) -> None:
                ready.set()

            nursery.start_soon(a.run, started)
            await ready.wait()
            b = VotingNode(other, VotingNodeConfig(bootstrap=[f"{a.listen_addresses[0]}/p2p/{a.peer_id}"]))
            b_ready = trio.Event()

            async def b_started(_: VotingNode) -> None:
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
        node.close()
        other.close()


def test_sync_protocol_answers_every_method_and_a_new_node_catches_up(tmp_path: Path) -> None:
    async def body(a: VotingNode, b: VotingNode, scenario: Scenario) -> None:
        peer = b.connected_peers()[0]
        status = StatusMessage.decode(await b.request(peer, Request("status")) or b"")
        head = a.node.head()
        assert (
            (status.head_height, status.head_hash)
            == (head.block.header.height, head.block.hash)
            == (2, status.head_hash)
        )
        blocks = [decode_block(d) for d in decode_block_list(await b.request(peer, Request("blocks", (0, 32))) or b"")]
        assert [block.hash for block in blocks] == [a.node.block_at(h).hash for h in range(3)]  # type: ignore[union-attr]
        headers = unpack(await b.request(peer, Request("headers", (1, 5))) or b"", "headers")
        assert [Header.from_fields(unpack(h, "header")).hash for h in headers] == [blocks[1].hash, blocks[2].hash]
        assert await b.request(peer, Request("block", (head.block.hash,))) == head.block.encode()
        assert await b.request(peer, Request("block", (bytes(32),))) is None
        content = head.state.slices[0]
        assert await b.request(peer, Request("slice", (hashlib.sha256(content).digest(),))) == content
        digest = a.node.genesis.dataset.documents[0].chunks[0]
        chunk = await b.request(peer, Request("chunk", (digest,)))
        assert chunk == (a.node.chunk_directory / f"{digest}.xz").read_bytes()
        assert await b.request(peer, Request("chunk", ("0" * 64,))) is None
        # `decided`: each height's block, its commit certificate and the training blocks it names.
        entries = unpack(await b.request(peer, Request("decided", (1, 32))) or b"", "decided")
        assert len(entries) == 2
        first = Fields(entries[0], "entry", ("block", "commit", "training"))
        assert decode_block(first.binary("block")) == blocks[1]
        assert decode_commit(first.binary("commit")) == a.node.commit_of(blocks[1].hash)
        assert [decode_block(d).hash for d in first.array("training")] == [
            v.training_block
            for v in blocks[1].body.training  # type: ignore[union-attr]
        ]
        # B's sync loop fetches and checks A's decided chain, certificates and all, on its own.
        while b.node.head().block.hash != head.block.hash:
            await trio.sleep(0.2)
        assert b.node.head().state.root == head.state.root
        assert b.node.commit_of(head.block.hash) == a.node.commit_of(head.block.hash)

    run_pair(tmp_path, body)


def test_a_malformed_request_is_answered_with_an_error_and_costs_the_peer(tmp_path: Path) -> None:
    async def body(a: VotingNode, b: VotingNode, scenario: Scenario) -> None:
        assert b.host is not None
        stream = await b.host.new_stream(b.connected_peers()[0], [TProtocol(sync_protocol(a.chain_id))])
        await write_frame(stream, b"\x93\xa8nonsense")
        status, message = await read_response(stream)
        await stream.close()
        assert status == ERROR and b"request" in message
        record = a.peers.get(b.peer_id)
        assert record.score < 0 and "sync request" in record.penalties[-1][2]
        assert status not in (OK, NOT_FOUND)
        assert [r.what for r in a.rejections] == ["sync request"]

    run_pair(tmp_path, body)


class ShortCertificates(VotingNode):
    """Serves its decided blocks with certificates cut to one precommit (a third of a quorum)."""

    def _answer(self, request: Request) -> bytes | None:
        payload = super()._answer(request)
        if request.method != "decided" or payload is None:
            return payload
        entries = []
        for entry in unpack(payload, "decided"):
            commit = decode_commit(entry[1])
            entries.append([entry[0], type(commit)(commit.height, commit.round, commit.block_hash,
                                                   commit.signatures[:1]).encode(), entry[2]])  # fmt: skip
        return pack(entries)


def test_a_decided_block_without_a_quorum_certificate_is_refused_and_costs_the_peer(tmp_path: Path) -> None:
    async def body(a: VotingNode, b: VotingNode, scenario: Scenario) -> None:
        record = b.peers.get(a.peer_id)
        while not any("decided" in reason for _, _, reason in record.penalties):
            await trio.sleep(0.2)
        assert b.node.head().block.header.height == 0  # nothing imported
        assert record.score < 0 and b.rejections[-1].what == "decided blocks"

    run_pair(tmp_path, body, a_class=ShortCertificates)


def test_a_decided_answer_holds_only_the_heights_that_fit_and_always_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `decided` answer stops before the byte budget (a testnet height with an update carries a
    6.4 MB training block; 32 of them would break the wire's response limit), but never
    answers with nothing while a height is there: a requester asks again from where it ends."""
    import p2p.voting_node as voting_node

    scenario = Scenario.create(tmp_path / "builder")
    node = DecidedNode(DEVNET, tmp_path / "a")
    try:
        keys = scenario.validators
        training = scenario.valid_training_block(node.head().block, node.head().state)
        node.on_training_block(training)
        decide_next(node, keys[0], keys[:3], training)  # height 1 names a 111 kB training block
        decide_next(node, keys[1], keys[1:], None)
        decide_next(node, keys[2], keys[1:], None)
        answer = VotingNode(node, VotingNodeConfig())._answer

        def heights(start: int) -> list[int]:
            entries = unpack(answer(Request("decided", (start, 32))) or b"", "decided")
            return [decode_block(Fields(e, "entry", ("block", "commit", "training")).binary("block")).header.height
                    for e in entries]  # fmt: skip

        assert heights(1) == [1, 2, 3]
        monkeypatch.setattr(voting_node, "MAX_DECIDED_RESPONSE_BYTES", 10_000)  # below height 1's entry
        assert heights(1) == [1]  # too big alone, but one height always goes
        assert heights(2) == [2, 3]  # small heights fill the budget
        second = node.block_at(2)
        assert second is not None
        one_entry = len(second.encode()) + len(node.commit_of(second.hash).encode()) + voting_node.ENTRY_OVERHEAD  # type: ignore[union-attr]
        monkeypatch.setattr(voting_node, "MAX_DECIDED_RESPONSE_BYTES", one_entry + 10)
        assert heights(2) == [2]
        assert heights(4) == []
    finally:
        node.close()
        scenario.node.close()
