"""Making one sync request: the client half of the sync protocol (p2p/wire.py).

The voting node (p2p/voting_node.py) serves the protocol's methods and
catches up with its peers by `decided` requests; both it and its tests make
each request with `send_request`: one request on its own stream, the answer
read in frames, all within `REQUEST_TIMEOUT`.
"""

from __future__ import annotations

import trio
from libp2p.abc import IHost
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID

from p2p.wire import NOT_FOUND, OK, ProtocolError, Request, read_response, sync_protocol, write_frame

REQUEST_TIMEOUT = 20.0
"""Seconds a sync request may take before the peer is given up on."""


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
