"""The RPC's OpenAPI 3.1 document, built in code and served at /openapi.json.

Schemas are JSON Schema 2020-12 (as OpenAPI 3.1 uses). Every object lists
all its properties as required; hashes, keys and seeds are lowercase hex.
"""

from __future__ import annotations

from typing import Any

Schema = dict[str, Any]

_REF = "#/components/schemas/"
_ERROR_DESCRIPTIONS = {
    400: "Malformed input",
    401: "Missing or wrong bearer token",
    404: "Unknown object",
    413: "Request body too large",
    409: "Not possible on this node",
    422: "Invalid block",
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
            "A block's header, where it stands, and a summary of its body",
            {
                "hash": _hash("Block hash (SHA-256 of the encoded header)"),
                "height": _integer("Height; genesis is 0"),
                "kind": {"type": "string", "enum": ["genesis", "training", "validation"]},
                "parent": _hash("Parent block hash (zeros for genesis)"),
                "timestamp": _integer("Unix seconds"),
                "proposer": _hex(32, "Proposer's Ed25519 public key (zeros for genesis)"),
                "state_root": _hash("State root after the block"),
                "body_hash": _hash("SHA-256 of the encoded body (genesis: the genesis hash)"),
                "received_at": {
                    "type": ["number", "null"],
                    "description": "Unix time this node first imported the block (null if unknown)",
                },
                "canonical": _boolean("On the canonical chain"),
                "body": {"oneOf": [_ref("TrainingBody"), _ref("ValidationBody"), _ref("GenesisBody")]},
            },
        ),
        "TrainingBody": _object(
            "A slice update and its claimed validation-loss improvement",
            {
                "slice_id": _integer("The updated slice"),
                "loss_before": _integer("Claimed validation loss total (Q.16) before the update"),
                "loss_after": _integer("Claimed validation loss total (Q.16) after the update"),
                "gain": _integer("loss_before - loss_after", minimum=None),
                "steps": _integer("Optimizer steps (informative)"),
                "data_seed": _hash("Seed of the miner's training batches (informative)"),
                "weights_bytes": _integer("Size of the slice's new values (int16 little-endian)"),
                "weights_sha256": _hash("SHA-256 of the slice's new values (the new slice hash)"),
            },
        ),
        "ValidationBody": _object(
            "The out-of-sample verdict on the parent training block",
            {
                "confirmed": _boolean("Aggregate test gain > 0: the update was applied"),
                "attestations": _array(_ref("Attestation"), "The validators' test evaluations"),
                "evidence": _integer("Equivocations slashed"),
                "rewards": _array(_ref("Reward"), "Payouts"),
            },
        ),
        "GenesisBody": _object("Genesis has no body", {}),
        "Attestation": _object(
            "A validator's test evaluation of a training block",
            {
                "validator": _hex(32, "Validator public key"),
                "training_block": _hash("The training block evaluated"),
                "loss_before": _integer("Test loss total (Q.16) before the update"),
                "loss_after": _integer("Test loss total (Q.16) after the update"),
                "gain": _integer("loss_before - loss_after", minimum=None),
            },
        ),
        "Reward": _object("One payout", {"address": _hex(32, "Recipient"), "amount": _integer("Units")}),
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
            "The node's view of the chain",
            {
                "chain_id": {"type": "string", "description": "Genesis chain id"},
                "genesis_hash": _hash("SHA-256 of the genesis document's canonical JSON"),
                "genesis_block_hash": _hash("Hash of the block at height 0"),
                "head_height": _integer("Head block height"),
                "head_hash": _hash("Head block hash"),
                "finalized_height": _integer("Height of the last finalized training block (0: genesis)"),
                "finalized_hash": _hash("Hash of the last finalized training block (the genesis hash at first)"),
                "checkpoint_height": _integer(
                    "Height of the checkpoint new training blocks build on (genesis or a validation block)"
                ),
                "checkpoint_hash": _hash("Hash of the finalized checkpoint"),
                "state_root": _hash("Root of the head's state"),
                "difficulty": _integer("Minimum validation gain of the next training block"),
                "syncing": _boolean("Catching up with peers"),
                "peer_count": _integer("Connected peers"),
                **losses,
            },
        ),
        "Finality": _object(
            "What is final, and what awaits validation",
            {
                "finalized_height": _integer("Height of the last finalized training block"),
                "finalized_hash": _hash("Hash of the last finalized training block"),
                "finalized_timestamp": _integer("Timestamp of the validation block that finalized it"),
                "checkpoint_height": _integer("Height of the finalized checkpoint"),
                "checkpoint_hash": _hash("Hash of the finalized checkpoint"),
                "total_stake": _integer("All stake at the head"),
                "pending": _array(_ref("PendingTraining"), "Training blocks on the checkpoint, first seen first"),
            },
        ),
        "PendingTraining": _object(
            "A training block awaiting its validation block",
            {
                "hash": _hash("Block hash"),
                "height": _integer("Height"),
                "proposer": _hex(32, "Miner public key"),
                "slice_id": _integer("The updated slice"),
                "gain": _integer("Claimed validation gain", minimum=None),
                "attestations": _integer("Attestations collected"),
                "attesting_stake": _integer("Stake of the validators that attested it"),
                "quorum_stake": _integer("Stake a validation block needs (quorum of total stake, rounded up)"),
            },
        ),
        "Model": _object(
            "The model after a block",
            {
                "height": _integer("Height of the block"),
                "block_hash": _hash("The block"),
                "config": _ref("ModelConfig"),
                "state_root": _hash("State root"),
                "weights_root": _hash("Merkle root of the slice hashes"),
                "slice_hashes": _array(_hash("SHA-256 of a slice's int16 little-endian values"), "By slice id"),
                **losses,
                "difficulty": _integer("Minimum validation gain of the next training block"),
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
        "Peers": {
            "type": "object",
            "properties": {"peers": _array({"type": "object"}, "Peer records (fields depend on the network)")},
            "required": ["peers"],
            "additionalProperties": False,
        },
        "Work": _object(
            "What a miner needs to produce a training block on the finalized checkpoint",
            {
                "parent_hash": _hash("The checkpoint to build on"),
                "height": _integer("The training block's height"),
                "state_root": _hash("The parent state's root (the block's header carries it)"),
                "slice_id": _integer("The slice the miner's key is assigned"),
                "difficulty": _integer("The validation gain the block must reach"),
                "validation_seed": _hash("Seed of the validation batch of the proof"),
                "training_seed": _hash("Seed of the miner's training batches (informative)"),
                "min_timestamp": _integer("Smallest allowed block timestamp"),
                "weights_url": {"type": "string", "description": "Where to fetch the parent's model"},
            },
        ),
        "SubmitResult": _object(
            "The imported block",
            {
                "hash": _hash("Block hash"),
                "height": _integer("Height"),
                "known": _boolean("Already known: nothing changed"),
            },
        ),
    }


# --- Operations -----------------------------------------------------------------------


def _json(schema_name: str, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": _ref(schema_name)}}}


_ANY: Schema = {"type": "object"}


def _responses(ok: Schema, *errors: int, ok_status: str = "200") -> Schema:
    responses: Schema = {ok_status: ok}
    for status in errors:
        responses[str(status)] = _json("Error", _ERROR_DESCRIPTIONS[status])
    responses["default"] = _json("Error", "Any other error (405 wrong method, 500 a bug)")
    return responses


def _admin_operation(operation_id: str, summary: str, field: str, schema: Schema, result: str) -> Schema:
    """A token-guarded POST whose JSON body is one required field."""
    body = {"type": "object", "required": [field], "properties": {field: schema}}
    return {
        "operationId": operation_id,
        "summary": summary,
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": _responses(
            {"description": result, "content": {"application/json": {"schema": _ANY}}}, 400, 401, 409
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


def _binary() -> Schema:
    return {"type": "string", "contentMediaType": "application/octet-stream"}


def _block_ok() -> Schema:
    return {
        "description": "The block (JSON), or its canonical msgpack encoding with format=raw",
        "content": {"application/json": {"schema": _ref("Block")}, "application/octet-stream": {"schema": _binary()}},
    }


def _paths() -> dict[str, Schema]:
    height = _parameter("height", "query", {"type": "integer", "minimum": 0}, "A canonical height (default: the head)")
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
        "A canonical height (decimal) or a block hash (64 hex)",
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
        "description": "Canonical weights as safetensors (int16 tensors, exponents in the metadata)",
        "headers": {
            "Content-Disposition": {
                "schema": {"type": "string"},
                "description": "attachment; filename=potchain-<height>.safetensors",
            }
        },
        "content": {"application/octet-stream": {"schema": _binary()}},
    }
    submit = {
        "operationId": "submitBlock",
        "summary": "Import an encoded block (and gossip it)",
        "security": [{"bearer": []}],
        "requestBody": {"required": True, "content": {"application/octet-stream": {"schema": _binary()}}},
        "responses": _responses(_json("SubmitResult", "Imported (or already known)"), 400, 401, 413, 422),
    }
    return {
        "/health": {"get": _operation("health", "Readiness for load balancers", health)},
        "/v1/status": {"get": _operation("status", "Head, finality and losses", _responses(_json("Status", "OK")))},
        "/v1/blocks/head": {
            "get": _operation("headBlock", "The head block", _responses(_block_ok(), 400), [block_format])
        },
        "/v1/blocks/{ref}": {
            "get": _operation(
                "block", "A block by height or hash", _responses(_block_ok(), 400, 404), [ref, block_format]
            )
        },
        "/v1/finality": {
            "get": _operation("finality", "Finality and pending training blocks", _responses(_json("Finality", "OK")))
        },
        "/v1/model": {
            "get": _operation(
                "model", "The model at the head or a height", _responses(_json("Model", "OK"), 400, 404), [height]
            )
        },
        "/v1/model/weights": {
            "get": _operation("modelWeights", "The model's weights", _responses(weights, 400, 404), [height])
        },
        "/v1/accounts/{address}": {
            "get": _operation("account", "An account at the head", _responses(_json("Account", "OK"), 400), [address])
        },
        "/v1/peers": {"get": _operation("peers", "Connected peers", _responses(_json("Peers", "OK")))},
        "/v1/mining/work": {
            "get": _operation("miningWork", "A miner's assignment", _responses(_json("Work", "OK"), 400), [miner])
        },
        "/v1/mining/submit": {"post": submit},
        "/v1/node": {
            "get": _operation(
                "node",
                "This node: peer id, addresses, orphaned blocks, rejected messages, blocked peers",
                {"200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}},
            )
        },
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
                {"type": "array", "items": {"type": "string"}},
                "The peers now refused",
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
                    }
                },
            )
        },
    }


def openapi_document() -> Schema:
    """The OpenAPI 3.1 description of every RPC endpoint."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "potchain node RPC",
            "version": "1",
            "description": "Reads of a potchain node's chain, model and mining work, and block submission. "
            "Errors are JSON {error}. Write endpoints need Authorization: Bearer <datadir/rpc_token>.",
        },
        "paths": _paths(),
        "components": {
            "schemas": {**_block_schemas(), **_node_schemas()},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
