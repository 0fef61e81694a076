"""The validator's duties: attesting training blocks and proposing validation blocks.

A validator attests the first valid training block on the checkpoint (see
`ValidatorDuties._attest` for which one, when several race) and proposes the
validation block in its turn once the attestations reach a quorum.

`ValidatorDuties` is one part of `NetworkNode` (p2p/service.py), which runs
`_propose_loop` when it has validator keys and starts `_attest` for each
training block it imports.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from chain.blocks import Block, TrainingBody, ValidationBody
from chain.encoding import pack
from consensus.proposals import attest, get_quorum_stake, get_validation_proposers, propose_validation_block
from consensus.rules import InvalidBlock, is_confirmed
from p2p.full_node import FullNode
from p2p.votes import VoteRecord
from p2p.wire import attestation_topic

if TYPE_CHECKING:
    from p2p.service import NodeConfig

log = logging.getLogger("potchain.node")

PROPOSER_BACKOFF = 3.0
"""Seconds each validator after the first in the rotation waits for the ones before it."""
ATTEST_QUIET = 1.5
"""Seconds without a new training block on a parent before a validator chooses one to attest."""
ATTEST_WINDOW = 6.0
"""The longest a validator waits for the leader after the first training block on a parent."""
QUORUM_GRACE = 0.5
"""Seconds the proposer waits after a quorum for the remaining attestations."""


def compute_claimed_gain(block: Block) -> int:
    """A training block's validation gain (its claim, checked on import)."""
    body = block.body
    return body.loss_before - body.loss_after if isinstance(body, TrainingBody) else 0


def rank_candidate(block: Block) -> tuple[int, bytes]:
    """How validators order competing training blocks: largest validation gain, then lowest hash."""
    return (-compute_claimed_gain(block), block.hash)


class ValidatorDuties:
    """`NetworkNode`'s validator duties; see the module docstring."""

    node: FullNode
    config: NodeConfig
    chain_id: str
    votes: VoteRecord
    _attest_windows: set[bytes]
    _quorum_since: dict[bytes, float]
    _proposed: set[bytes]

    if TYPE_CHECKING:  # the other parts of NetworkNode

        def _locked(self, function: Callable[..., Any], *arguments: Any) -> Any: ...
        def _notify(self) -> None: ...
        async def _wait_change(self, timeout: float) -> None: ...
        async def publish(self, topic: str, data: bytes) -> None: ...
        async def publish_block(self, block: Block) -> None: ...
        async def import_block(self, block: Block, source: str) -> bool: ...

    async def _attest(self, first: Block) -> None:
        """Our validators attest one training block per parent (a second is slashable).

        Which one: validators follow the proposer rotation. The first in it
        (the round's leader) attests the best block (largest validation gain,
        then lowest hash) once no new one has arrived for ATTEST_QUIET seconds;
        every other validator attests what the earliest validator before it in
        the rotation attested, as soon as it holds that attestation, and leads
        by the same rule itself if none has come ATTEST_WINDOW seconds per
        position after the first block (a silent or lying leader hands over to
        the next). Following keeps honest validators from splitting their stake
        between racing miners' blocks; no rule makes a split recoverable yet
        (docs/spec.md, section 14)."""
        parent_hash = first.header.parent
        if parent_hash in self._attest_windows:
            return
        self._attest_windows.add(parent_hash)
        state = self.node.state_of(parent_hash)
        if state is None:
            return
        rotation = get_validation_proposers(state, first)
        ours = {key.public_key for key in self.config.validator_keys}
        position = min((i for i, validator in enumerate(rotation) if validator in ours), default=len(rotation))
        opened = last_change = time.monotonic()
        seen: set[bytes] = set()
        training: Block | None = None
        recorded = {self.votes.attested_block(key.public_key, parent_hash) for key in self.config.validator_keys}
        while training is None:
            candidates = [b for b in self.node.pending_training_blocks() if b.header.parent == parent_hash]
            before_restart = [b for b in candidates if b.hash in recorded]
            if before_restart:
                training = before_restart[0]  # attested before a restart: the only block we may attest
                break
            if {b.hash for b in candidates} - seen:
                seen |= {b.hash for b in candidates}
                last_change = time.monotonic()
            for earlier in rotation[:position]:
                followed = [
                    b for b in candidates if any(a.validator == earlier for a in self.node.attestations_for(b.hash))
                ]
                if followed:
                    training = min(followed, key=rank_candidate)
                    break
            now = time.monotonic()
            if training is None and now - opened >= position * ATTEST_WINDOW and now - last_change >= ATTEST_QUIET:
                training = min(candidates, key=rank_candidate) if candidates else first
            if training is None:
                await trio.sleep(0.2)
        for key in self.config.validator_keys:
            if state.stake_of(key.public_key) <= 0:
                continue
            known = self.votes.attested_block(key.public_key, parent_hash)
            if known is not None and known != training.hash:
                log.warning("not attesting %s as %s: it attested %s on this parent before a restart",
                            training.hash.hex()[:16], key.public_key.hex()[:16], known.hex()[:16])  # fmt: skip
                continue
            await trio.to_thread.run_sync(self.votes.record, key.public_key, parent_hash, training.hash)
            attestation = await trio.to_thread.run_sync(self._locked, attest, self.node.chain, key, state, training)
            try:
                await trio.to_thread.run_sync(self.node.on_attestation, attestation)
            except InvalidBlock as error:  # the checkpoint moved on meanwhile
                log.info("own attestation not kept: %s", error)
                continue
            await self.publish(attestation_topic(self.chain_id), pack(attestation.fields()))
            log.info("attested %s as %s", training.hash.hex()[:16], key.public_key.hex()[:16])
            self._notify()

    async def _propose_loop(self) -> None:
        while True:
            await self._wait_change(0.25)
            for training in self.node.pending_training_blocks():
                await self._maybe_propose(training)

    async def _maybe_propose(self, training: Block) -> None:
        if training.hash in self._proposed:
            return
        with self.node.lock:
            state = self.node.state_of(training.header.parent)
            attestations = self.node.attestations_for(training.hash)
            evidence = list(self.node.store.evidence.values())
        if state is None:
            return
        attesting = sum(state.stake_of(a.validator) for a in attestations)
        if attesting < get_quorum_stake(state, self.node.chain):
            return
        now = time.monotonic()
        since = self._quorum_since.setdefault(training.hash, now)
        everyone = attesting >= state.total_stake
        rotation = get_validation_proposers(state, training)
        ours = {key.public_key: key for key in self.config.validator_keys}
        for position, address in enumerate(rotation):
            if address not in ours:
                continue
            due = since + position * PROPOSER_BACKOFF + (0 if everyone else QUORUM_GRACE)
            if now < due:
                return
            key = ours[address]
            self._proposed.add(training.hash)
            timestamp = max(int(time.time()), training.header.timestamp + 1)

            try:
                block = await trio.to_thread.run_sync(
                self._locked, propose_validation_block, self.node.chain, training, state, key, attestations,
                evidence, timestamp,
            )  # fmt: skip
            except InvalidBlock as error:
                log.error("could not build the validation block: %s", error)
                return
            if await self.import_block(block, "self"):
                await self.publish_block(block)
                assert isinstance(block.body, ValidationBody)
                verdict = "confirmed" if is_confirmed(block.body) else "rejected"
                log.info("proposed validation block %d (%s)", block.header.height, verdict)
            return
