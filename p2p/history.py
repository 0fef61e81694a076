"""The decided chain's history for the RPC: block summaries (`GET /v1/blocks`) and the
loss at each height (`GET /v1/history/loss`).

Everything is read from the stored blocks, never by evaluating a model: a decided
block's held-out test carries the parent model's loss total on the sequences it
revealed (`test.loss_before`), the loss total of the state it leads to, with the
updates it applies combined (`test.loss_after`), and each named training block's loss
total with its update alone applied (the verdicts' `loss_after`); a training block carries its
validation proof, the loss totals before and after its update on its validation
batch. Those are Q.16 integer totals over sequences * context tokens; here they are
shown as nats per token (informative only: consensus compares the integers).

Decided blocks are final, so a height's record never changes: records are cached
(least recently used dropped past `entries`). Reads take no lock (`DecidedNode.block_at`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from chain.blocks import DecidedBody, TrainingBody
from consensus.decisions import is_committed
from p2p.decided_node import DecidedNode
from training.tables import LOSS_BITS

BLOCKS_PAGE_DEFAULT, BLOCKS_PAGE_MAX = 20, 100
"""Block summaries per page of /v1/blocks: by default, at most."""
LOSS_PAGE_DEFAULT, LOSS_PAGE_MAX = 1000, 1000
"""Heights per page of /v1/history/loss: by default, at most."""
CACHED_HEIGHTS = 4096
"""Height records kept in memory."""
READS_PER_PAGE = 64
"""Height records one page reads from the store at most (uncached ones): a height's first read
decodes its training blocks, weights included (up to 4 slices of 6.4 MB on the testnet), so a
page past this is cut short and its `next` names the first height it did not read."""
LOSS_DIGITS = 6
"""Decimal places of a loss shown in nats per token."""


@dataclass(frozen=True)
class TrainingRecord:
    """A training block a decided block named and tested."""

    hash: bytes
    """The training block's hash."""
    miner: bytes
    """Its miner's public key."""
    slice_id: int
    """The slice its update sets."""
    committed: bool
    """Its miner committed to the update in the parent decided block (only a committed update pays)."""
    validation_loss_before: int
    """Its proof: the parent model's validation loss total (Q.16) on its validation batch."""
    validation_loss_after: int
    """The same with its update applied."""
    test_loss_after: int
    """The held-out test's loss total (Q.16) with its update alone applied."""
    applied: bool
    """The decided block applied its update (alone or combined with others)."""


@dataclass(frozen=True)
class HeightRecord:
    """What one decided height did, from its stored block."""

    height: int
    """The decided height (1 or more)."""
    hash: bytes
    """The decided block's hash."""
    timestamp: int
    """Its timestamp (Unix seconds)."""
    proposer: bytes
    """The proposer's public key."""
    round: int
    """The round its commit certificate is from."""
    applied: tuple[bytes, ...]
    """The training blocks whose updates it applied, combined, best-ranked first (empty: none)."""
    test_loss_before: int | None
    """The held-out test's loss total (Q.16) of the parent model (None: it tested nothing)."""
    test_loss_after: int | None
    """The held-out test's loss total (Q.16) of the state the block leads to, the applied updates
    combined (`test_loss_before` when it applied none; None: it tested nothing)."""
    test_tokens: int
    """Tokens the held-out test counts (revealed sequences * context; 0 without a test)."""
    validation_tokens: int
    """Tokens a validation proof counts (validation sequences * context)."""
    training: tuple[TrainingRecord, ...]
    """The training blocks it tested, in its order."""


def nats_per_token(total: int | None, tokens: int) -> float | None:
    """A Q.16 loss total over `tokens` tokens in nats per token (None for None)."""
    if total is None or tokens == 0:
        return None
    return round(total / tokens / (1 << LOSS_BITS), LOSS_DIGITS)


def read_height(node: DecidedNode, height: int) -> HeightRecord | None:
    """The record of a decided height, or None if it is not decided (or is genesis)."""
    block = node.block_at(height) if height >= 1 else None
    if block is None:
        return None
    body = block.body
    commit = node.commit_of(block.hash)
    parent = node.block_at(height - 1)
    if not isinstance(body, DecidedBody) or commit is None or parent is None:
        raise LookupError(f"height {height}: the stored block {block.hash.hex()} is not a certified decided block")
    context = node.genesis.model.context
    training = []
    for verdict in body.training:
        named = node.stored_block(verdict.training_block)
        if named is None or not isinstance(named.body, TrainingBody):
            raise LookupError(f"height {height}: the training block {verdict.training_block.hex()} is not stored")
        training.append(
            TrainingRecord(
                hash=named.hash,
                miner=named.header.proposer,
                slice_id=named.body.slice_id,
                committed=is_committed(parent, named),
                validation_loss_before=named.body.loss_before,
                validation_loss_after=named.body.loss_after,
                test_loss_after=verdict.loss_after,
                applied=named.hash in body.applied,
            )
        )
    test = body.test
    return HeightRecord(
        height=height,
        hash=block.hash,
        timestamp=block.header.timestamp,
        proposer=block.header.proposer,
        round=commit.round,
        applied=body.applied,
        test_loss_before=None if test is None else test.loss_before,
        test_loss_after=None if test is None else test.loss_after,
        test_tokens=0 if test is None else len(test.sequences) * context,
        validation_tokens=node.genesis.evaluation.validation_sequences * context,
        training=tuple(training),
    )


def block_summary(record: HeightRecord) -> dict[str, Any]:
    """A decided block's summary: who proposed it, in which round, and its verdicts (gains as Q.16 totals)."""
    test_before = record.test_loss_before
    return {
        "height": record.height,
        "hash": record.hash.hex(),
        "timestamp": record.timestamp,
        "proposer": record.proposer.hex(),
        "round": record.round,
        "applied": [h.hex() for h in record.applied],
        "training": [
            {
                "hash": t.hash.hex(),
                "miner": t.miner.hex(),
                "committed": t.committed,
                "validation_gain": t.validation_loss_before - t.validation_loss_after,
                "test_gain": None if test_before is None else test_before - t.test_loss_after,
                "applied": t.applied,
            }
            for t in record.training
        ],
    }


def loss_entry(record: HeightRecord) -> dict[str, Any]:
    """A height's losses in nats per token: the held-out test before and after the block (after:
    with the applied updates combined; the model is unchanged, so equal to before, when none was
    applied), the best-ranked applied update's validation proof (null when none was applied), and
    each tested update: `confirmed` the applied ones (best-ranked first), `rejected` the others."""

    def update(t: TrainingRecord) -> dict[str, Any]:
        return {
            "hash": t.hash.hex(),
            "miner": t.miner.hex(),
            "slice_id": t.slice_id,
            "committed": t.committed,
            "validation_loss_before": nats_per_token(t.validation_loss_before, record.validation_tokens),
            "validation_loss_after": nats_per_token(t.validation_loss_after, record.validation_tokens),
            "test_loss_after": nats_per_token(t.test_loss_after, record.test_tokens),
        }

    by_hash = {t.hash: t for t in record.training}
    confirmed = [by_hash[h] for h in record.applied if h in by_hash]
    applied = confirmed[0] if confirmed else None
    return {
        "height": record.height,
        "hash": record.hash.hex(),
        "test_loss_before": nats_per_token(record.test_loss_before, record.test_tokens),
        "test_loss_after": nats_per_token(record.test_loss_after, record.test_tokens),
        "applied": [h.hex() for h in record.applied],
        "validation_loss_before": None
        if applied is None
        else nats_per_token(applied.validation_loss_before, record.validation_tokens),
        "validation_loss_after": None
        if applied is None
        else nats_per_token(applied.validation_loss_after, record.validation_tokens),
        "confirmed": [update(t) for t in confirmed],
        "rejected": [update(t) for t in record.training if not t.applied],
    }


class History:
    """Pages of the decided chain's history, from cached height records (thread-safe)."""

    def __init__(self, node: DecidedNode, entries: int = CACHED_HEIGHTS, reads_per_page: int = READS_PER_PAGE) -> None:
        if entries < 1 or reads_per_page < 1:
            raise ValueError(f"History: entries {entries}, reads_per_page {reads_per_page}, want at least 1 each")
        self.node = node
        self.entries = entries
        self.reads_per_page = reads_per_page
        self._cache: OrderedDict[int, HeightRecord] = OrderedDict()
        self._lock = threading.Lock()

    def cached(self, height: int) -> HeightRecord | None:
        with self._lock:
            found = self._cache.get(height)
            if found is not None:
                self._cache.move_to_end(height)
            return found

    def record(self, height: int) -> HeightRecord | None:
        found = self.cached(height)
        if found is not None:
            return found
        record = read_height(self.node, height)
        if record is not None:
            with self._lock:
                self._cache[height] = record
                while len(self._cache) > self.entries:
                    self._cache.popitem(last=False)
        return record

    def _records(self, heights: range) -> list[HeightRecord]:
        """The records of `heights` in order, up to the first not decided, reading at most
        `reads_per_page` of them from the store."""
        records = []
        reads = 0
        for height in heights:
            record = self.cached(height)
            if record is None:
                if reads == self.reads_per_page:
                    break
                reads += 1
                record = self.record(height)
            if record is None:
                break
            records.append(record)
        return records

    def blocks(self, start: int | None, limit: int) -> dict[str, Any]:
        """Decided blocks newest first from `start` (default: the head), at most `limit`; `next` is
        the height the next page starts from (null at height 1). Past the head: an empty page."""
        head = self.node.head().block.header.height
        start = head if start is None else start
        if start > head:
            return {"blocks": [], "next": None}
        records = self._records(range(start, max(0, start - limit), -1))
        following = start - len(records)
        return {"blocks": [block_summary(r) for r in records], "next": following if following >= 1 else None}

    def losses(self, start: int, limit: int) -> dict[str, Any]:
        """Each decided height's losses oldest first from `start`, at most `limit`; `next` is the
        height the next page starts from (null past the head). Past the head: an empty page."""
        head = self.node.head().block.header.height
        if start > head:
            return {"heights": [], "next": None}
        end = min(head, start + limit - 1)
        records = self._records(range(start, end + 1))
        following = start + len(records)
        return {"heights": [loss_entry(r) for r in records], "next": following if following <= head else None}
