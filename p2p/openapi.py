"""The RPC's OpenAPI 3.1 document, built in code and served at /openapi.json.

Schemas are JSON Schema 2020-12 (as OpenAPI 3.1 uses). Every object lists
all its properties as required (a nullable one as a oneOf with null);
hashes, keys and seeds are lowercase hex. p2p/rpc.py's views produce exactly
these objects (tests/test_rpc.py checks every answer against them).
"""

from __future__ import annotations

from typing import Any

from training.sample import DEFAULT_TEMPERATURE, MAX_NEW_TOKENS, MAX_PROMPT_CHARACTERS, MAX_SEED, MAX_TEMPERATURE

Schema = dict[str, Any]

_REF = "#/components/schemas/"
_ERROR_DESCRIPTIONS = {
    400: "Malformed input",
    401: "Missing or wrong bearer token",
    403: "The mining token given to an admin endpoint",
    404: "Unknown object",
    408: "The request body did not arrive in time (the connection is closed)",
    409: "Not possible on this node (now)",
    413: "Request body too large",
    422: "Invalid block or commitment: it breaks a rule (the message names it)",
    429: "Too many requests from this client address: rate-limited (see Retry-After)",
    503: "Busy: too many connections, requests or evaluations at once (see Retry-After)",
}


# --- Schema helpers ----------------------------------------------------------------


def _ref(name: str) -> Schema:
    return {"$ref": _REF + name}


def _hex(size: int, description: str) -> Schema:
    return {"type": "string", "pattern": f"^[0-9a-f]{{{2 * size}}}$", "description": description}


def _integer(description: str, minimum: int | None = 0) -> Schema:
    schema: Schema = {"type": "integer", "description": description}
    if minimum is not None:
        schema["minimum"] = minimum
    return schema


def _number(description: str) -> Schema:
    return {"type": "number", "description": description}


def _boolean(description: str) -> Schema:
    return {"type": "boolean", "description": description}


def _array(items: Schema, description: str) -> Schema:
    return {"type": "array", "items": items, "description": description}


def _object(description: str, properties: dict[str, Schema]) -> Schema:
    return {
        "type": "object",
        "description": description,
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


def _hash(description: str) -> Schema:
    return _hex(32, description)


# --- Component schemas ---------------------------------------------------------------


def _block_schemas() -> dict[str, Schema]:
    return {
        "Block": _object(
            "A block's header, where it stands, a summary of its body and, for a decided block, its certificate",
            {
                "hash": _hash("Block hash (SHA-256 of the encoded header)"),
                "height": _integer("Height; genesis is 0. A training block has its decided parent's height + 1"),
                "kind": {
                    "type": "string",
                    "enum": ["genesis", "training", "decided"],
                    "description": "genesis (height 0); decided: the one block a height's voting rounds decide, "
                    "final at once; training: a miner's slice update on a decided block, which the next "
                    "decided block may name and test",
                },
                "parent": _hash("Parent block hash (zeros for genesis); always genesis or a decided block"),
                "timestamp": _integer(
                    "Unix seconds. A decided block's is its parent's commit time (the stake-weighted median of "
                    "the parent certificate's precommit timestamps; genesis's + 1 at height 1)"
                ),
                "proposer": _hex(
                    32,
                    "Ed25519 public key of the miner (training) or of the round's proposer (decided); "
                    "zeros for genesis",
                ),
                "state_root": _hash(
                    "A decided block's: the state root after it; a training block's: its parent's state root"
                ),
                "body_hash": _hash("SHA-256 of the encoded body (genesis: the genesis hash)"),
                "received_at": {
                    "type": ["number", "null"],
                    "description": "Unix time this node first kept or stored the block since it started (null if not)",
                },
                "canonical": _boolean(
                    "Part of the decided chain: a decided block, or a training block a decided block names "
                    "(false: a training block only kept on the head, or a checked candidate not decided)"
                ),
                "body": {"oneOf": [_ref("TrainingBody"), _ref("DecidedBody"), _ref("GenesisBody")]},
                "commit": {
                    "oneOf": [_ref("Commit"), {"type": "null"}],
                    "description": "A decided block's commit certificate, which makes it final "
                    "(null for genesis, training blocks and candidates not decided)",
                },
            },
        ),
        "TrainingBody": _object(
            "A slice update and its claimed validation-loss improvement",
            {
                "slice_id": _integer("The updated slice"),
                "loss_before": _integer("Claimed validation loss total (Q.16) before the update"),
                "loss_after": _integer("Claimed validation loss total (Q.16) after the update"),
                "gain": _integer("loss_before - loss_after (at least the difficulty)", minimum=None),
                "steps": _integer("Optimizer steps (informative)"),
                "data_seed": _hash("Seed of the miner's training batches (informative)"),
                "weights_bytes": _integer("Size of the slice's new values (int16 little-endian)"),
                "weights_sha256": _hash("SHA-256 of the slice's new values (the new slice hash)"),
            },
        ),
        "DecidedBody": _object(
            "What one height decided: the training blocks it tested on its proposer's held-out data (maybe "
            "none), the updates it applied, the miners' commitments for the next height, the parent's "
            "certificate, evidence and the payout. A height that names no training block is as final as one "
            "that does",
            {
                "training": _array(
                    _ref("Verdict"),
                    "The training blocks on the parent this block tested, on one held-out test (at most 4; may "
                    "be none)",
                ),
                "confirmed": _boolean("Updates were applied to the model (applied is not empty)"),
                "applied": _array(
                    _hash("An applied training block"),
                    "The training blocks whose updates this block applied, combined (disjoint slices side by "
                    "side, a shared slice averaged), best-ranked first (at most 4; empty: none applied). Of the "
                    "committed updates with test gain > 0, ranked by the larger gain then the smaller hash, the "
                    "best-ranked 1, 2, ... combined, whichever loses least on the held-out test (the fewest on a "
                    "tie); an uncommitted update only alone, and only when no committed one gains",
                ),
                "test": {
                    "oneOf": [_ref("HeldOutTest"), {"type": "null"}],
                    "description": "The held-out test of the named training blocks (null when it names none)",
                },
                "commitments": _array(
                    _ref("Commitment"),
                    "Miners' commitments to updates they reveal on this block (one per miner): a revealed update "
                    "that matches its miner's is committed, and only a committed applied update pays its miner",
                ),
                "last_commit": {
                    "oneOf": [_ref("LastCommit"), {"type": "null"}],
                    "description": "The parent's commit certificate, whose signers this block pays "
                    "(null at height 1: genesis has none)",
                },
                "evidence": _array(_ref("Evidence"), "Equivocations slashed (the offender's stake goes to 0)"),
                "rewards": _array(
                    _ref("Reward"),
                    "The payout: the miners of the committed applied updates split the miner share in "
                    "proportion to their updates' own held-out gains (by address), then the parent "
                    "certificate's signers split the rest in proportion to their stake (by address); amounts "
                    "round down",
                ),
            },
        ),
        "GenesisBody": _object("Genesis has no body", {}),
        "Verdict": _object(
            "A decided block's out-of-sample test of a training block, on the block's held-out test",
            {
                "training_block": _hash("The training block tested"),
                "loss_before": _integer("Test loss total (Q.16) of the parent's model on the revealed sequences"),
                "loss_after": _integer("The same with the training block's slice alone applied"),
                "gain": _integer("loss_before - loss_after", minimum=None),
                "confirmed": _boolean("The block applied this training block's update (alone or combined)"),
            },
        ),
        "HeldOutTest": _object(
            "Held-out sequences of the proposer's private shard, picked among its unrevealed ones by the "
            "proposer's ECVRF output (which it cannot choose), revealed with Merkle proofs",
            {
                "vrf_proof": _hex(80, "The proposer's ECVRF proof (RFC 9381) over potchain/test || parent"),
                "loss_before": _integer("Loss total (Q.16) of the parent's model on the revealed sequences"),
                "loss_after": _integer(
                    "Loss total (Q.16) on the revealed sequences of the state the block leads to, the applied "
                    "updates combined (equal to loss_before when it applies none)"
                ),
                "sequences": _array(_ref("RevealedSequence"), "The revealed sequences, in the order picked"),
            },
        ),
        "RevealedSequence": _object(
            "One revealed held-out sequence (public from then on, never used to test again)",
            {
                "index": _integer("Its position in the proposer's shard"),
                "sequence": {
                    "type": "string",
                    "pattern": "^([0-9a-f]{2})*$",
                    "description": "Its bytes (the model's context + 1), hex",
                },
            },
        ),
        "Commitment": _object(
            "A miner's signed commitment to an update it reveals on the decided block of its height",
            {
                "height": _integer("The decided block that carries it (the update is revealed on it)", minimum=1),
                "miner": _hex(32, "The miner's public key"),
                "update_hash": _hash("sha256(potchain/update || miner || slice id (4 bytes) || the slice's values)"),
            },
        ),
        "Evidence": _object(
            "Two conflicting messages one validator signed in one round, slashed",
            {
                "validator": _hex(32, "The offender's public key"),
                "kind": {
                    "type": "string",
                    "enum": ["proposal", "prevote", "precommit"],
                    "description": "What it signed twice",
                },
                "height": _integer("The height of the messages", minimum=1),
                "round": _integer("Their round"),
            },
        ),
        "Commit": _object(
            "A commit certificate: precommits for one block from at least 2/3 of the stake in one round. "
            "It makes the block final; no other block can be decided at its height",
            {
                **_commit_properties(),
                "signing_stake": _integer("Stake of the signers, among the validators who voted on the height"),
                "total_stake": _integer(
                    "All stake of the validators who voted on the height (the parent's state's); "
                    "signing_stake / total_stake >= 2/3"
                ),
            },
        ),
        "LastCommit": _object(
            "The parent's commit certificate as a decided body carries it: precommits for the parent "
            "from at least 2/3 of the stake in one round (its stakes are in the parent block's commit)",
            _commit_properties(),
        ),
        "CommitSignature": _object(
            "One precommit of a certificate",
            {
                "validator": _hex(32, "The signer's public key"),
                "timestamp": _integer("The signer's clock (Unix seconds) when it precommitted"),
            },
        ),
        "Reward": _object("One payout", {"address": _hex(32, "Recipient"), "amount": _integer("Units")}),
    }


def _commit_properties() -> dict[str, Schema]:
    return {
        "height": _integer("The decided height", minimum=1),
        "round": _integer("The round in which it was decided (from 0)"),
        "block_hash": _hash("The decided block"),
        "signatures": _array(_ref("CommitSignature"), "The precommits, by validator"),
    }


def _node_schemas() -> dict[str, Schema]:
    losses = {
        "validation_loss": _number("Nats per token on the validation report batch (seed 0), informative"),
        "test_loss": _number("Nats per token on the test report batch (seed 0), informative"),
    }
    return {
        "Error": _object("An error", {"error": {"type": "string", "description": "What is wrong"}}),
        "Health": _object("Readiness", {"status": {"type": "string", "enum": ["synced", "syncing", "not ready"]}}),
        "Status": _object(
            "The node's view of the chain. Every decided block is final the moment it is decided, so the "
            "finalized block is the head",
            {
                "chain_id": {"type": "string", "description": "Genesis chain id"},
                "genesis_hash": _hash("SHA-256 of the genesis document's canonical JSON"),
                "genesis_block_hash": _hash("Hash of the block at height 0"),
                "head_height": _integer("Height of the last decided block (0: genesis)"),
                "head_hash": _hash("Hash of the last decided block (the genesis block at first)"),
                "finalized_height": _integer("head_height: the last decided block is final"),
                "finalized_hash": _hash("head_hash: the last decided block is final"),
                "state_root": _hash("Root of the head's state"),
                "difficulty": _integer("Minimum validation gain of the next training block"),
                "syncing": _boolean("Catching up with peers"),
                "peer_count": _integer("Connected peers"),
                "voting": _ref("Voting"),
                **losses,
            },
        ),
        "Voting": _object(
            "The height being decided (the head's + 1) and how far its voting rounds got on this node",
            {
                "height": _integer("The height being decided", minimum=1),
                "round": _integer("The furthest round this node's voting reached (from 0)"),
                "step": {
                    "type": "string",
                    "enum": ["propose", "prevote", "precommit"],
                    "description": "That round's step (propose on a node that does not vote)",
                },
            },
        ),
        "Finality": _object(
            "What is final: the head, with the certificate that decided it; and what the next height may decide",
            {
                "finalized_height": _integer("Height of the last decided block, the head (0: genesis)"),
                "finalized_hash": _hash("Hash of the last decided block, the head"),
                "finalized_timestamp": _integer("That block's timestamp"),
                "commit": {
                    "oneOf": [_ref("Commit"), {"type": "null"}],
                    "description": "The head's commit certificate (null while the head is genesis)",
                },
                "last_tested": _hash(
                    "The last training block a decided block gave a verdict on, confirmed or not "
                    "(the genesis document's hash before any)"
                ),
                "total_stake": _integer("All stake at the head: the stake that votes on the next height"),
                "voting": _ref("Voting"),
                "pending": _array(
                    _ref("PendingTraining"),
                    "Valid training blocks kept on the head, first kept first: the next height's proposer "
                    "names the one with the largest validation gain",
                ),
            },
        ),
        "PendingTraining": _object(
            "A valid training block on the head, awaiting a decided block that names and tests it",
            {
                "hash": _hash("Block hash"),
                "height": _integer("Height (the head's + 1)"),
                "proposer": _hex(32, "Miner public key"),
                "slice_id": _integer("The updated slice"),
                "gain": _integer("Claimed validation gain (at least the difficulty)", minimum=None),
            },
        ),
        "Model": _object(
            "The model after a decided block",
            {
                "height": _integer("Height of the block"),
                "block_hash": _hash("The block"),
                "config": _ref("ModelConfig"),
                "state_root": _hash("State root"),
                "weights_root": _hash("Merkle root of the slice hashes"),
                "slice_hashes": _array(_hash("SHA-256 of a slice's int16 little-endian values"), "By slice id"),
                **losses,
                "difficulty": _integer("Minimum validation gain of a training block on this block"),
            },
        ),
        "ModelConfig": _object(
            "Shape of the model (fixed by genesis)",
            {
                "layers": _integer("Transformer blocks"),
                "heads": _integer("Attention heads per block"),
                "width": _integer("Embedding width"),
                "context": _integer("Maximum sequence length"),
                "vocab_size": _integer("Token symbols (256: bytes)"),
                "parameter_count": _integer("Number of weights"),
            },
        ),
        "Account": _object(
            "Balance and stake at the head (zeros for an unknown address)",
            {"address": _hex(32, "Public key"), "balance": _integer("Spendable units"), "stake": _integer("Staked")},
        ),
        "Validators": _object(
            "The validators who vote on the height being decided: every account with stake in the head's state",
            {
                "height": _integer("The height being decided (the head's + 1)", minimum=1),
                "head_hash": _hash("The head whose state holds these stakes"),
                "total_stake": _integer("All their stake"),
                "quorum_stake": _integer(
                    "The least stake whose precommits make a commit certificate (at least 2/3 of total_stake)"
                ),
                "validators": _array(_ref("Validator"), "Largest stake first, then by address"),
            },
        ),
        "Validator": _object(
            "One validator at the head",
            {
                "address": _hex(32, "Public key"),
                "stake": _integer("Staked units (its voting weight)", minimum=1),
                "balance": _integer("Spendable units"),
            },
        ),
        "Peers": {
            "type": "object",
            "properties": {"peers": _array({"type": "object"}, "Peer records (fields depend on the network)")},
            "required": ["peers"],
            "additionalProperties": False,
        },
        "Work": _object(
            "What a miner needs to produce a training block on the decided head",
            {
                "parent_hash": _hash("The decided head (or genesis) to build on"),
                "height": _integer("The training block's height (the head's + 1)"),
                "state_root": _hash("The parent state's root (the block's header carries it)"),
                "slice_id": _integer("The slice the miner's key is assigned"),
                "difficulty": _integer("The validation gain the block must reach"),
                "validation_seed": _hash("Seed of the validation batch of the proof"),
                "training_seed": _hash("Seed of the miner's training batches (informative)"),
                "min_timestamp": _integer("Smallest allowed block timestamp (the parent's + 1)"),
                "commitment_height": _integer(
                    "The decided block being decided (the head's + 1): a commitment for it names an update the "
                    "miner reveals on that block once decided",
                    minimum=1,
                ),
                "commitment_slice_id": _integer(
                    "The slice that update sets: the one the miner's key is assigned on that block"
                ),
                "weights_url": {
                    "type": "string",
                    "description": "Where to fetch the parent's model (/v1/model/weights?height=<height - 1>)",
                },
            },
        ),
        "SubmitResult": _object(
            "The training block, kept on the head (and announced to peers) until a decided block names it "
            "or the head moves on",
            {
                "hash": _hash("Block hash"),
                "height": _integer("Height"),
                "known": _boolean("Already kept: nothing changed"),
            },
        ),
        "CommitmentResult": _object(
            "The update commitment, kept for the block being decided (and gossiped to peers) until that "
            "height is decided",
            {
                "height": _integer("The height it is for", minimum=1),
                "miner": _hex(32, "The miner's public key"),
                "update_hash": _hash("The committed update's hash"),
                "known": _boolean("Already kept: nothing changed (it is gossiped again)"),
            },
        ),
        "NodeInfo": _object(
            "This node on its network",
            {
                "peer_id": {"type": ["string", "null"], "description": "libp2p peer id (null without a network)"},
                "addresses": _array({"type": "string"}, "The multiaddresses it listens on"),
                "rejections": _array(_ref("Rejection"), "Invalid messages it refused, oldest first"),
                "blocked_peers": _array({"type": "string"}, "Peers it refuses (sorted)"),
                "link_delay_seconds": {
                    "type": "number",
                    "minimum": 0,
                    "maximum": 10,
                    "description": "Delay added to everything it sends",
                },
            },
        ),
        "Rejection": _object(
            "An invalid message this node refused",
            {
                "time": _number("When (Unix seconds)"),
                "peer_id": {"type": "string", "description": "Who sent or relayed it"},
                "what": {"type": "string", "description": "What it was (a training block, a voting message, ...)"},
                "reason": {"type": "string", "description": "The rule it broke"},
            },
        ),
    }


# --- Operations -----------------------------------------------------------------------


def _json(schema_name: str, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema_name)}}}


def _responses(ok: Schema, *errors: int, ok_status: str = "200") -> Schema:
    responses: Schema = {ok_status: ok}
    for status in errors:
        responses[str(status)] = _json("Error", _ERROR_DESCRIPTIONS[status])
    responses["default"] = _json("Error", "Any other error (405 wrong method, 500 a bug)")
    responses["503"] = _json("Error", _ERROR_DESCRIPTIONS[503])
    return responses


def _admin_operation(operation_id: str, summary: str, field: str, schema: Schema, result: str) -> Schema:
    """An admin-token-guarded POST whose JSON body is one required field."""
    body = {"type": "object", "required": [field], "properties": {field: schema}}
    answer = {"type": "object", "required": [field], "properties": {field: schema}, "additionalProperties": False}
    return {
        "operationId": operation_id,
        "summary": summary,
        "security": [{"admin": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": _responses(
            {"description": result, "content": {"application/json": {"schema": answer}}}, 400, 401, 403, 408, 409
        ),
    }


def _operation(operation_id: str, summary: str, responses: Schema, parameters: list[Schema] | None = None) -> Schema:
    operation: Schema = {"operationId": operation_id, "summary": summary, "responses": responses}
    if parameters:
        operation["parameters"] = parameters
    return operation


def _parameter(name: str, where: str, schema: Schema, description: str, required: bool = False) -> Schema:
    return {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": schema,
        "description": description,
    }


def _binary(min_length: int = 0) -> Schema:
    schema: Schema = {"type": "string", "contentMediaType": "application/octet-stream"}
    if min_length:
        schema["minLength"] = min_length
    return schema


def _block_ok() -> Schema:
    return {
        "description": "The block (JSON), or its canonical msgpack encoding with format=raw",
        "content": {"application/json": {"schema": _ref("Block")}, "application/octet-stream": {"schema": _binary()}},
    }


def _paths(admin: bool) -> dict[str, Schema]:
    height = _parameter("height", "query", {"type": "integer", "minimum": 0}, "A decided height (default: the head)")
    block_format = _parameter(
        "format",
        "query",
        {"type": "string", "enum": ["json", "raw"], "default": "json"},
        "raw: the canonical encoding (application/octet-stream)",
    )
    ref = _parameter(
        "ref",
        "path",
        {"type": "string", "pattern": "^([0-9]+|[0-9a-fA-F]{64})$"},
        "A decided height (decimal), or the hash (64 hex) of a decided block, a training block it names, "
        "a training block kept on the head or a checked candidate",
    )
    address = _parameter("address", "path", {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}, "Public key")
    miner = _parameter(
        "miner", "query", {"type": "string", "pattern": "^[0-9a-fA-F]{64}$"}, "Miner public key", required=True
    )
    health = {
        "200": _json("Health", "Ready and synced"),
        "206": _json("Health", "Ready, still syncing"),
        "503": _json("Health", "Starting up"),
    }
    weights = {
        "description": "Canonical weights as safetensors (int16 tensors, exponents in the metadata); with "
        "format=float, the same values as float32 tensors with the model's shape and chain origin in the metadata "
        "(potchain export writes them as a directory)",
        "headers": {
            "Content-Disposition": {
                "schema": {"type": "string"},
                "description": "attachment; filename=potchain-<height>.safetensors "
                "(potchain-<height>-float32.safetensors with format=float)",
            }
        },
        "content": {"application/octet-stream": {"schema": _binary()}},
    }
    submit = {
        "operationId": "submitBlock",
        "summary": "Keep an encoded training block on the decided head (and gossip it)",
        "description": "Only training blocks are submitted (decided blocks come from the voting rounds): "
        "any other kind, a block built on an earlier decided block, or one that breaks a rule is a 422 "
        "naming the rule",
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": _binary(1)}}},
        "responses": _responses(_json("SubmitResult", "Kept (or already kept)"), 400, 401, 408, 413, 422),
    }
    commitment = {
        "operationId": "submitCommitment",
        "summary": "Keep a miner's encoded update commitment for the height being decided (and gossip it)",
        "description": "The body is an UpdateCommitment's canonical encoding (msgpack [height, miner, update_hash, "
        "signature]). Only a commitment for the height being decided (the head's + 1) is kept (409 for "
        "another, saying which is being decided), one per miner (409 for a second, different one); one not "
        "signed by its miner is a 422. Re-sending the kept one answers 200 and gossips it again",
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": _binary(1)}}},
        "responses": _responses(_json("CommitmentResult", "Already kept"), 400, 401, 408, 409, 413, 422)
        | {"202": _json("CommitmentResult", "Kept")},
    }
    paths: dict[str, Schema] = {
        "/health": {"get": _operation("health", "Readiness for load balancers", health)},
        "/v1/status": {
            "get": _operation("status", "Head (final), voting and losses", _responses(_json("Status", "OK")))
        },
        "/v1/blocks/head": {
            "get": _operation(
                "headBlock", "The head: the last decided block", _responses(_block_ok(), 400), [block_format]
            )
        },
        "/v1/blocks/{ref}": {
            "get": _operation(
                "block", "A block by height or hash", _responses(_block_ok(), 400, 404), [ref, block_format]
            )
        },
        "/v1/finality": {
            "get": _operation(
                "finality",
                "The final head and its certificate, the voting, and the training blocks kept on the head",
                _responses(_json("Finality", "OK")),
            )
        },
        "/v1/model": {
            "get": _operation(
                "model", "The model at the head or a height", _responses(_json("Model", "OK"), 400, 404), [height]
            )
        },
        "/v1/model/weights": {
            "get": _operation(
                "modelWeights", "The model's weights", _responses(weights, 400, 404), [height, _weights_format()]
            )
        },
        "/v1/accounts/{address}": {
            "get": _operation("account", "An account at the head", _responses(_json("Account", "OK"), 400), [address])
        },
        "/v1/peers": {"get": _operation("peers", "Connected peers", _responses(_json("Peers", "OK")))},
        "/v1/validators": {
            "get": _operation(
                "validators",
                "The validators of the height being decided and their stakes",
                _responses(_json("Validators", "OK")),
            )
        },
        "/v1/mining/work": {
            "get": _operation("miningWork", "A miner's assignment", _responses(_json("Work", "OK"), 400), [miner])
        },
        "/v1/mining/submit": {"post": submit},
        "/v1/mining/commitments": {"post": commitment},
        "/v1/node": {
            "get": _operation(
                "node",
                "This node: peer id, addresses, rejected messages, blocked peers, link delay",
                _responses(_json("NodeInfo", "OK")),
            )
        },
        "/metrics": {
            "get": _operation(
                "metrics",
                "The node's Prometheus metrics (text exposition format; docs/node.md lists them)",
                {
                    "200": {
                        "description": "Every metric of this node, in Prometheus's text format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "503": _json("Error", _ERROR_DESCRIPTIONS[503]),
                },
            )
        },
        "/openapi.json": {
            "get": _operation(
                "openapi",
                "This document",
                {
                    "200": {
                        "description": "OpenAPI 3.1 document",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    },
                    "503": _json("Error", _ERROR_DESCRIPTIONS[503]),
                },
            )
        },
    }
    paths |= _explorer_paths()
    paths |= _history_paths()
    paths |= _model_paths()
    admin_paths = {
        "/v1/admin/link-delay": {
            "post": _admin_operation(
                "setLinkDelay",
                "Delay everything the node sends (simulates a slow link)",
                "seconds",
                {"type": "number", "minimum": 0, "maximum": 10},
                "The delay now applied",
            )
        },
        "/v1/admin/blocked-peers": {
            "post": _admin_operation(
                "setBlockedPeers",
                "Refuse exactly these peers (partitions a test network)",
                "peers",
                {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 128}},
                "The peers now refused",
            )
        },
    }
    return paths | admin_paths if admin else paths


def _explorer_paths() -> dict[str, Schema]:
    """The explorer: a web page over this RPC (p2p/explorer/), its script and style sheet."""
    headers = {
        "Content-Security-Policy": {
            "schema": {"type": "string"},
            "description": "default-src 'self': the page loads nothing from elsewhere",
        }
    }
    page = {"description": "The page", "headers": headers, "content": {"text/html": {"schema": {"type": "string"}}}}
    asset = {
        "description": "explorer.js (text/javascript) or explorer.css (text/css)",
        "headers": headers,
        "content": {"text/javascript": {"schema": {"type": "string"}}, "text/css": {"schema": {"type": "string"}}},
    }
    file = _parameter(
        "file", "path", {"type": "string", "enum": ["explorer.js", "explorer.css"]}, "The explorer's file"
    )
    redirect = {
        "description": "Redirect to the explorer",
        "headers": {"Location": {"schema": {"type": "string", "const": "/explorer"}, "description": "/explorer"}},
    }
    return {
        "/": {"get": _operation("root", "Redirects to the explorer", _responses(redirect, ok_status="302"))},
        "/explorer": {
            "get": _operation(
                "explorer",
                "The explorer: head and finality, recent blocks and verdicts, validators, peers, the held-out "
                "loss by height and samples of the model, live from /v1/events",
                _responses(page),
            )
        },
        "/explorer/{file}": {
            "get": _operation("explorerFile", "The explorer's script or style sheet", _responses(asset, 404), [file])
        },
    }


def _loss(description: str) -> Schema:
    return {"type": ["number", "null"], "description": description + " (nats per token, informative)"}


def _history_schemas() -> dict[str, Schema]:
    """The event stream's events and the history pages (p2p/events.py, p2p/history.py)."""
    topics = ["head", "finalized", "block", "attestation"]
    events = ("Head", "Finalized", "Block", "Attestation", "Gap", "Subscribed")
    return {
        "ServerSentEvent": _object(
            "One event of the stream (text/event-stream: id, event and data lines, then a blank line); "
            "a comment line ': keep-alive' comes after 15 s without an event",
            {
                "id": {
                    "type": "string",
                    "pattern": "^[0-9]+$",
                    "description": "The event id: larger than every earlier one, across restarts too (resume with "
                    "the Last-Event-ID header)",
                },
                "event": {
                    "type": "string",
                    "enum": [*topics, "gap", "subscribed"],
                    "description": "The topic; gap: events this subscriber lost (its queue was full, or they are "
                    "no longer kept for a resume); subscribed: the first event of every stream",
                },
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"oneOf": [_ref(f"{name}Event") for name in events]},
                    "description": "The event's JSON data",
                },
            },
        ),
        "HeadEvent": _object(
            "head: a height was decided",
            {
                "height": _integer("The decided height", minimum=1),
                "hash": _hash("The decided block"),
                "round": _integer("The round its commit certificate is from"),
                "applied": _array(
                    _hash("An applied training block"),
                    "The training blocks whose updates it applied, combined, best-ranked first (empty: none)",
                ),
                "timestamp": _integer("The block's timestamp (Unix seconds)"),
            },
        ),
        "FinalizedEvent": _object(
            "finalized: a block is final (a decided block is, at once, by its commit certificate)",
            {"height": _integer("Its height", minimum=1), "hash": _hash("The block")},
        ),
        "BlockEvent": _object(
            "block: a decided block stored, or a valid training block kept on the head",
            {
                "hash": _hash("The block"),
                "kind": {"type": "string", "enum": ["training", "decided"]},
                "height": _integer("Its height", minimum=1),
                "proposer": _hex(32, "Its miner (training) or proposer (decided)"),
            },
        ),
        "AttestationEvent": _object(
            "attestation: a valid proposal or vote of the height being decided, signed here or received",
            {
                "height": _integer("The height being decided", minimum=1),
                "round": _integer("The round"),
                "kind": {"type": "string", "enum": ["proposal", "prevote", "precommit"]},
                "validator": _hex(32, "The signer"),
                "block": {
                    "oneOf": [_hash("The block proposed or voted for"), {"type": "null"}],
                    "description": "null: a vote for nil",
                },
            },
        ),
        "GapEvent": _object(
            "gap: the subscriber lost the events with ids first..last (some may be of topics it did not ask for)",
            {"first": _integer("The first id lost"), "last": _integer("The last id lost")},
        ),
        "SubscribedEvent": _object(
            "subscribed: the stream's first event; its id is the last event's before the subscription (the "
            "missed events a resumed stream sends after it have smaller ids)",
            {
                "topics": _array({"type": "string", "enum": topics}, "The topics of this stream"),
                "height": _integer("The head's height when it subscribed"),
                "hash": _hash("The head then"),
            },
        ),
        "BlockPage": _object(
            "Decided blocks, newest first",
            {
                "blocks": _array(_ref("BlockSummary"), "At most limit, from height from down"),
                "next": {
                    "oneOf": [_integer("The from of the next (older) page", minimum=1), {"type": "null"}],
                    "description": "null: this page reaches height 1 (or from was past the head)",
                },
            },
        ),
        "BlockSummary": _object(
            "A decided block and its verdicts",
            {
                "height": _integer("Height", minimum=1),
                "hash": _hash("Block hash"),
                "timestamp": _integer("Unix seconds"),
                "proposer": _hex(32, "The round's proposer"),
                "round": _integer("The round its commit certificate is from"),
                "applied": _array(
                    _hash("An applied training block"),
                    "The training blocks whose updates it applied, combined, best-ranked first (empty: none)",
                ),
                "training": _array(_ref("TrainingSummary"), "The training blocks it tested (maybe none)"),
            },
        ),
        "TrainingSummary": _object(
            "A training block a decided block tested",
            {
                "hash": _hash("The training block"),
                "miner": _hex(32, "Its miner"),
                "committed": _boolean("Its miner committed to the update in the parent (only then is it paid)"),
                "validation_gain": _integer("Its proof's validation gain (Q.16 loss total)", minimum=None),
                "test_gain": _integer("Its gain on the block's held-out test (Q.16 loss total)", minimum=None),
                "applied": _boolean("The block applied its update (alone or combined with others)"),
            },
        ),
        "LossHistory": _object(
            "Losses by decided height, oldest first, read from the stored blocks (never evaluated)",
            {
                "heights": _array(_ref("HeightLosses"), "At most limit, from height from up"),
                "next": {
                    "oneOf": [_integer("The from of the next page", minimum=1), {"type": "null"}],
                    "description": "null: this page reaches the head (or from was past it)",
                },
            },
        ),
        "HeightLosses": _object(
            "One decided height's losses (Q.16 totals shown as nats per token)",
            {
                "height": _integer("Height", minimum=1),
                "hash": _hash("The decided block"),
                "test_loss_before": _loss("The parent model on the held-out sequences it revealed (null: no test)"),
                "test_loss_after": _loss(
                    "The model after the block on the same sequences: with the applied updates combined, else "
                    "equal to test_loss_before (null: no test)"
                ),
                "applied": _array(
                    _hash("An applied training block"),
                    "The training blocks whose updates it applied, combined, best-ranked first (empty: none)",
                ),
                "validation_loss_before": _loss(
                    "The best-ranked applied update's proof: the parent model on its validation batch (null: "
                    "none applied)"
                ),
                "validation_loss_after": _loss("The same with that update (null: none applied)"),
                "confirmed": _array(_ref("UpdateLosses"), "The applied updates, best-ranked first"),
                "rejected": _array(_ref("UpdateLosses"), "The tested updates not applied"),
            },
        ),
        "UpdateLosses": _object(
            "A tested update's losses",
            {
                "hash": _hash("The training block"),
                "miner": _hex(32, "Its miner"),
                "slice_id": _integer("The slice it sets"),
                "committed": _boolean("Its miner committed to it in the parent"),
                "validation_loss_before": _loss("Its proof: the parent model on its validation batch"),
                "validation_loss_after": _loss("Its proof: with the update"),
                "test_loss_after": _loss("The block's held-out sequences with the update alone"),
            },
        ),
    }


def _history_paths() -> dict[str, Schema]:
    """The event stream, and the pages of the decided chain's history."""
    topics = _parameter(
        "topics",
        "query",
        {"type": "string", "pattern": "^(head|finalized|block|attestation)(,(head|finalized|block|attestation))*$"},
        "Comma-separated topics (default: all four); an unknown one is a 400",
    )
    last_event_id = _parameter(
        "Last-Event-ID",
        "header",
        {"type": "string", "pattern": "^[0-9]{1,19}$"},
        "Resume: the last event id seen; the stream starts with the recent events after it (or a gap)",
    )
    stream = {
        "description": "The event stream: subscribed, the missed events (with Last-Event-ID), then each event "
        "as it comes; it ends only when the client or the node goes",
        "content": {"text/event-stream": {"schema": _ref("ServerSentEvent")}},
    }

    def page(default: int, most: int, start: str) -> list[Schema]:
        return [
            _parameter("from", "query", {"type": "integer", "minimum": 1},
                       f"The decided height to start from (default: {start}); past the head: an empty page"),
            _parameter("limit", "query", {"type": "integer", "minimum": 1, "maximum": most, "default": default},
                       f"Heights in the page at most (1 to {most}, default {default}); a page that reads 64"
                       " heights from the store is cut short there: follow next"),
        ]  # fmt: skip

    return {
        "/v1/events": {
            "get": _operation(
                "events",
                "Server-sent events: decided heads, finality, blocks and votes as they happen",
                _responses(stream, 400),
                [topics, last_event_id],
            )
        },
        "/v1/blocks": {
            "get": _operation(
                "blocks",
                "Decided blocks with their verdicts, newest first, a page at a time",
                _responses(_json("BlockPage", "OK"), 400),
                page(20, 100, "the head"),
            )
        },
        "/v1/history/loss": {
            "get": _operation(
                "lossHistory",
                "Test and validation losses by decided height, oldest first, from the stored blocks",
                _responses(_json("LossHistory", "OK"), 400),
                page(1000, 1000, "1"),
            )
        },
    }


def _weights_format() -> Schema:
    return _parameter(
        "format",
        "query",
        {"type": "string", "enum": ["canonical", "float"], "default": "canonical"},
        "canonical: int16 tensors and exponents, as the chain holds them; float: float32 tensors",
    )


_SAMPLE_TOKENS: Schema = {"type": "integer", "minimum": 1, "maximum": MAX_NEW_TOKENS, "description": "Bytes"}
_SAMPLE_SEED: Schema = {"type": "integer", "minimum": 0, "maximum": MAX_SEED}


def _model_paths() -> dict[str, Schema]:
    """Sampling text from the model (training/sample.py)."""
    request = {
        "type": "object",
        "description": "What to sample: prompt and tokens are required",
        "properties": {
            "prompt": {
                "type": "string",
                "minLength": 1,
                "maxLength": MAX_PROMPT_CHARACTERS,
                "description": "The text to continue (its UTF-8 bytes; the model reads the last context's worth)",
            },
            "tokens": _SAMPLE_TOKENS | {"description": "Bytes to generate"},
            "temperature": {
                "type": "number",
                "exclusiveMinimum": 0,
                "maximum": MAX_TEMPERATURE,
                "default": DEFAULT_TEMPERATURE,
                "description": "Softmax temperature: lower is more predictable",
            },
            "top_k": {
                "type": "integer",
                "minimum": 1,
                "maximum": 256,
                "description": "Sample among the k likeliest bytes only (default: among all)",
            },
            "seed": _SAMPLE_SEED | {"description": "Seed of the sampling generator (default: a random one)"},
            "height": {"type": "integer", "minimum": 0, "description": "A decided height (default: the head)"},
        },
        "required": ["prompt", "tokens"],
        "additionalProperties": False,
    }
    rate_limited = _json("Error", _ERROR_DESCRIPTIONS[429]) | {
        "headers": {
            "Retry-After": {
                "schema": {"type": "string", "pattern": "^[0-9]+$"},
                "description": "Seconds until this client may sample again",
            }
        }
    }
    sample = {
        "operationId": "sampleModel",
        "summary": "Text the model at a decided height continues a prompt with",
        "description": "The canonical weights, dequantized to float32, sample byte by byte: softmax(logits / "
        "temperature) among the top_k likeliest bytes, from a generator seeded with seed (the same request on "
        "this node gives the same text). The prompt is read as UTF-8 and the generated bytes are decoded with "
        "U+FFFD for bytes that do not decode. Each client address may sample a few times at once, then at a "
        "steady rate (429 with Retry-After past that); samples share the node's evaluator (503 when it stays "
        "taken)",
        "requestBody": {"required": True, "content": {"application/json": {"schema": request}}},
        "responses": _responses(_json("Sample", "The sampled text"), 400, 404, 408, 413) | {"429": rate_limited},
    }
    return {"/v1/model/sample": {"post": sample}}


def _model_schemas() -> dict[str, Schema]:
    return {
        "Sample": _object(
            "Text the model at a decided height continued a prompt with",
            {
                "height": _integer("The decided height whose model sampled"),
                "hash": _hash("The decided block at that height"),
                "prompt": {"type": "string", "description": "The prompt, as given"},
                "text": {
                    "type": "string",
                    "description": "The continuation alone (the prompt not repeated): the generated bytes decoded "
                    "as UTF-8, U+FFFD for bytes that do not decode",
                },
                "tokens": _SAMPLE_TOKENS | {"description": "Bytes generated"},
                "seed": _SAMPLE_SEED | {"description": "The seed used (given, or drawn): the same text again with it"},
            },
        ),
    }


def openapi_document(admin: bool = False) -> Schema:
    """The OpenAPI 3.1 description of every endpoint a server serves (the admin ones only when on)."""
    schemes = {"bearer": {"type": "http", "scheme": "bearer", "description": "The mining token, DATADIR/rpc_token"}}
    if admin:
        schemes["admin"] = {"type": "http", "scheme": "bearer", "description": "The admin token, DATADIR/admin_token"}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "potchain node RPC",
            "version": "1",
            "description": "Reads of a potchain node's chain, model and mining work, and training block "
            "submission. The chain decides one block per height by voting rounds; a decided block is final the "
            "moment it is decided, with its commit certificate (precommits from at least 2/3 of the stake in "
            "one round), so the finalized block is the head. Errors are JSON {error}; a busy node answers 503 "
            "with Retry-After. Block submission needs Authorization: Bearer <datadir/rpc_token>; the admin "
            "endpoints (/v1/admin/*, served only by a node started with --admin-rpc) need Bearer "
            "<datadir/admin_token>. /explorer is a web page over these reads.",
        },
        "paths": _paths(admin),
        "components": {
            "schemas": {**_block_schemas(), **_node_schemas(), **_history_schemas(), **_model_schemas()},
            "securitySchemes": schemes,
        },
    }
