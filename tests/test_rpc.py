"""The HTTP RPC on a real decided node and server: every endpoint, its errors,
the OpenAPI document against the router and the answers, decided blocks with
their commit certificates, and served weights that reproduce the node's loss."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load

from chain.blocks import Block, DecidedBody, TrainingBody, compute_update_hash, decode_block, sign_update_commitment
from chain.crypto import PrivateKey, devnet_key
from consensus.rules import compute_next_slice
from genesis import DEVNET
from p2p.decided_node import DecidedNode
from p2p.rpc import (
    ADMIN_TOKEN_FILE,
    DEFAULT_MAX_BODY_BYTES,
    LocalBackend,
    RpcLimits,
    RpcServer,
    RpcStartError,
    load_or_create_token,
)
from tests.chain_builders import Scenario, decide_next, rebuild
from training.data import sample_batch, seed_from_int
from training.evaluate import CanonicalEvaluator, make_backend
from training.tables import LOSS_BITS
from training.weights import encode_weights, load_weights

HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options"}


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        assert self.headers["Content-Type"].startswith("application/json"), self.headers["Content-Type"]
        return json.loads(self.body)


@dataclass
class Rpc:
    """A client of one server."""

    url: str
    token: str

    def request(self, method: str, path: str, body: bytes | None = None, token: str | None = None) -> Reply:
        request = urllib.request.Request(self.url + path, data=body, method=method)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        if body is not None:
            request.add_header("Content-Type", "application/octet-stream")
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return Reply(response.status, response.headers, response.read())
        except urllib.error.HTTPError as error:
            with error:
                return Reply(error.code, error.headers, error.read())

    def get(self, path: str, status: int = 200) -> Reply:
        reply = self.request("GET", path)
        assert reply.status == status, (path, reply.status, reply.body[:300])
        return reply

    def json(self, path: str, schema: str | None = None) -> Any:
        value = self.get(path).json()
        if schema is not None:
            conform(value, {"$ref": f"#/components/schemas/{schema}"}, OPENAPI)
        return value

    def error(self, method: str, path: str, status: int, body: bytes | None = None, token: str | None = None) -> str:
        """The message of an error answer, checked to be JSON `{"error": ...}` with `status`."""
        reply = self.request(method, path, body, token)
        assert reply.status == status, (method, path, reply.status, reply.body[:300])
        value = reply.json()
        assert list(value) == ["error"] and isinstance(value["error"], str), value
        return str(value["error"])


OPENAPI: dict[str, Any] = {}


def conform(value: Any, schema: dict[str, Any], document: dict[str, Any], where: str = "$") -> None:
    """Assert `value` matches a JSON schema (the subset p2p/openapi.py uses)."""
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/components/schemas/")
        conform(value, document["components"]["schemas"][name], document, where)
        return
    if "oneOf" in schema:
        matches = 0
        for option in schema["oneOf"]:
            try:
                conform(value, option, document, where)
                matches += 1
            except AssertionError:
                pass
        assert matches == 1, f"{where}: matches {matches} of oneOf"
        return
    types = schema.get("type", [])
    types = [types] if isinstance(types, str) else types
    checks = {
        "object": lambda v: isinstance(v, dict),
        "array": lambda v: isinstance(v, list),
        "string": lambda v: isinstance(v, str),
        "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
        "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
        "boolean": lambda v: isinstance(v, bool),
        "null": lambda v: v is None,
    }
    assert not types or any(checks[t](value) for t in types), f"{where}: {value!r} is not {types}"
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    if "pattern" in schema and isinstance(value, str):
        assert re.search(schema["pattern"], value), f"{where}: {value!r} !~ {schema['pattern']}"
    numeric = isinstance(value, int | float) and not isinstance(value, bool)
    if "minimum" in schema and numeric:
        assert value >= schema["minimum"], f"{where}: {value} < {schema['minimum']}"
    if "maximum" in schema and numeric:
        assert value <= schema["maximum"], f"{where}: {value} > {schema['maximum']}"
    if isinstance(value, dict) and "properties" in schema:
        assert set(schema.get("required", [])) <= set(value), f"{where}: missing {set(schema['required']) - set(value)}"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(schema["properties"]), f"{where}: extra {set(value) - set(schema['properties'])}"
        for key, sub in schema["properties"].items():
            if key in value:
                conform(value[key], sub, document, f"{where}.{key}")
    if isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            conform(item, schema["items"], document, f"{where}[{index}]")


@dataclass
class Net:
    """A decided node served over HTTP: genesis; height 1 decided naming a
    training block (confirmed); height 2 decided naming none."""

    scenario: Scenario
    node: DecidedNode
    server: RpcServer
    rpc: Rpc
    datadir: Path
    training: Block
    """The training block on genesis that height 1 names."""
    first: Block
    """The decided block at height 1 (certified by validators 0-2)."""
    second: Block
    """The decided block at height 2, the head (certified by validators 1-3)."""
    next_training: Block
    """A valid training block on the head, not submitted by the fixture."""

    @property
    def keys(self) -> list[PrivateKey]:
        return self.scenario.validators


FIRST_SIGNERS = slice(0, 3)
SECOND_SIGNERS = slice(1, 4)


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    datadir = tmp_path_factory.mktemp("rpc")
    scenario = Scenario.create(datadir / "builder")
    keys = scenario.validators
    node = DecidedNode(DEVNET, datadir / "node")
    genesis = node.head()
    training = scenario.valid_training_block(genesis.block, genesis.state)
    assert node.on_training_block(training)
    first = decide_next(node, keys[0], keys[FIRST_SIGNERS], training)
    second = decide_next(node, keys[1], keys[SECOND_SIGNERS], None)
    head = node.head()
    next_training = scenario.valid_training_block(head.block, head.state)
    token = load_or_create_token(datadir)
    server = RpcServer(LocalBackend(node), token=token)
    port = server.start()
    rpc = Rpc(f"http://127.0.0.1:{port}", token)
    OPENAPI.update(rpc.json("/openapi.json"))
    yield Net(scenario, node, server, rpc, datadir, training, first, second, next_training)
    server.stop()
    node.close()
    scenario.node.close()


def expected_commit(net: Net, block: Block, signers: list[PrivateKey], stakes: bool = True) -> dict[str, Any]:
    """The JSON of `block`'s round-0 certificate from `signers` (tests.chain_builders.certificate stamps
    precommits 2 s after the block); with the stake of the validators who voted (the parent's state's)."""
    view: dict[str, Any] = {
        "height": block.header.height,
        "round": 0,
        "block_hash": block.hash.hex(),
        "signatures": [
            {"validator": key.hex(), "timestamp": block.header.timestamp + 2}
            for key in sorted(k.public_key for k in signers)
        ],
    }
    if stakes:
        voters = net.node.state_of(block.header.parent)
        assert voters is not None
        view["signing_stake"] = sum(voters.stake_of(k.public_key) for k in signers)
        view["total_stake"] = voters.total_stake
    return view


# --- Lifecycle and token ----------------------------------------------------------------


def test_token_file_is_private_and_stable(net: Net) -> None:
    path = net.datadir / "rpc_token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", net.rpc.token)
    assert load_or_create_token(net.datadir) == net.rpc.token
    assert [p.name for p in net.datadir.iterdir() if "rpc_token" in p.name] == ["rpc_token"]


class FlagBackend(LocalBackend):
    ready = False
    syncing = True

    def is_ready(self) -> bool:
        return self.ready

    def is_syncing(self) -> bool:
        return self.syncing

    def voting(self) -> dict[str, object]:
        return {"height": 3, "round": 2, "step": "precommit"}


def test_health_port_taken_and_stop(net: Net) -> None:
    assert net.rpc.get("/health").json() == {"status": "synced"}
    backend = FlagBackend(net.node)
    server = RpcServer(backend, token="t")
    rpc = Rpc(f"http://127.0.0.1:{server.start()}", "t")
    assert (rpc.get("/health", 503).json(), server.port != 0) == ({"status": "not ready"}, True)
    backend.ready = True
    assert rpc.get("/health", 206).json() == {"status": "syncing"}
    status = rpc.json("/v1/status", "Status")
    assert status["syncing"] is True
    # The backend's voting progress is what status and finality report.
    assert status["voting"] == rpc.json("/v1/finality", "Finality")["voting"] == backend.voting()
    server.stop()
    server.stop()  # idempotent
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(rpc.url + "/health", timeout=5)

    taken = RpcServer(LocalBackend(net.node), port=net.server.port, token="t")
    with pytest.raises(RpcStartError, match=f"cannot listen on 127.0.0.1:{net.server.port}"):
        taken.start()
    taken.stop()


# --- Reads -----------------------------------------------------------------------------


def test_status(net: Net) -> None:
    status = net.rpc.json("/v1/status", "Status")
    head = net.node.head()
    assert head.block == net.second
    assert status["chain_id"] == net.node.genesis.chain_id
    assert status["genesis_hash"] == net.node.genesis.hash
    assert status["genesis_block_hash"] == net.node.genesis_block.hash.hex()
    assert (status["head_height"], status["head_hash"]) == (2, net.second.hash.hex())
    # Every decided block is final: the finalized block is the head.
    assert (status["finalized_height"], status["finalized_hash"]) == (2, net.second.hash.hex())
    assert (status["state_root"], status["difficulty"]) == (head.state.root.hex(), head.state.difficulty)
    assert status["state_root"] == net.second.header.state_root.hex()
    assert (status["syncing"], status["peer_count"]) == (False, 0)
    assert status["voting"] == {"height": 3, "round": 0, "step": "propose"}  # a node without a network
    assert [status["validation_loss"], status["test_loss"]] == list(net.node.mean_losses(head.state))


def test_blocks_by_height_hash_and_head(net: Net) -> None:
    genesis = net.rpc.json("/v1/blocks/0", "Block")
    assert genesis["kind"] == "genesis" and genesis["body"] == {} and genesis["received_at"] is None
    assert genesis["hash"] == net.node.genesis_block.hash.hex() and genesis["canonical"] is True
    assert genesis["commit"] is None

    # The training block height 1 names: canonical (stored with its decision), no certificate of its own.
    training = net.rpc.json(f"/v1/blocks/{net.training.hash.hex()}", "Block")
    body = net.training.body
    assert isinstance(body, TrainingBody)
    assert training["hash"] == net.training.hash.hex() and training["kind"] == "training"
    assert (training["parent"], training["height"]) == (genesis["hash"], 1)
    assert (training["canonical"], training["commit"]) == (True, None)
    assert training["proposer"] == net.scenario.miner.public_key.hex()
    assert training["timestamp"] == net.training.header.timestamp
    assert training["state_root"] == net.training.header.state_root.hex()
    assert training["body_hash"] == net.training.header.body_hash.hex()
    assert training["received_at"] == net.node.received_at[net.training.hash]
    assert (
        training["body"]["gain"] == body.loss_before - body.loss_after >= net.node.genesis.consensus.initial_difficulty
    )
    assert training["body"]["weights_bytes"] == len(body.weights)
    assert training["body"]["data_seed"] == body.data_seed.hex()

    # Height 1: the decided block, its certificate, and its verdict on the training block.
    first = net.rpc.json("/v1/blocks/1", "Block")
    decided = net.first.body
    assert isinstance(decided, DecidedBody)
    assert first["hash"] == net.first.hash.hex() and first["kind"] == "decided" and first["canonical"] is True
    assert (first["parent"], first["height"]) == (genesis["hash"], 1)
    assert first["proposer"] == net.keys[0].public_key.hex()
    assert first["timestamp"] == net.first.header.timestamp == net.node.genesis_block.header.timestamp + 1
    assert first["state_root"] == net.first.header.state_root.hex()
    assert first["body_hash"] == net.first.header.body_hash.hex()
    assert first["received_at"] == net.node.received_at[net.first.hash]
    commit = first["commit"]
    assert commit == expected_commit(net, net.first, net.keys[FIRST_SIGNERS])
    assert [s["validator"] for s in commit["signatures"]] == sorted(k.public_key.hex() for k in net.keys[:3])
    assert (commit["signing_stake"], commit["total_stake"]) == (3_000_000, 4_000_000)
    assert 3 * commit["signing_stake"] >= 2 * commit["total_stake"]
    (verdict,) = decided.training
    assert decided.test is not None
    gain = decided.test.loss_before - verdict.loss_after
    assert first["body"] == {
        "training": [
            {
                "training_block": net.training.hash.hex(),
                "loss_before": decided.test.loss_before,
                "loss_after": verdict.loss_after,
                "gain": gain,
                "confirmed": True,
            }
        ],
        "confirmed": True,
        "applied": [net.training.hash.hex()],
        "test": {
            "vrf_proof": decided.test.vrf_proof.hex(),
            "loss_before": decided.test.loss_before,
            "loss_after": verdict.loss_after,  # its only update, applied alone
            "sequences": [{"index": s.index, "sequence": s.sequence.hex()} for s in decided.test.sequences],
        },
        "commitments": [],
        "last_commit": None,  # genesis has no certificate
        "evidence": [],
        "rewards": [{"address": r.address.hex(), "amount": r.amount} for r in decided.rewards],
    }
    assert gain > 0
    assert first["body"]["rewards"] == []  # the update was not committed to: its miner earns nothing

    # Height 2: no training block; it carries height 1's certificate and pays its signers.
    by_hash = net.rpc.json(f"/v1/blocks/{net.second.hash.hex()}", "Block")
    assert (
        by_hash
        == net.rpc.json("/v1/blocks/2", "Block")
        == net.rpc.json(f"/v1/blocks/{net.second.hash.hex().upper()}", "Block")
    )
    second = net.second.body
    assert isinstance(second, DecidedBody)
    assert (by_hash["kind"], by_hash["parent"], by_hash["proposer"]) == (
        "decided",
        net.first.hash.hex(),
        net.keys[1].public_key.hex(),
    )
    assert by_hash["timestamp"] == net.first.header.timestamp + 2  # height 1's commit time
    assert by_hash["commit"] == expected_commit(net, net.second, net.keys[SECOND_SIGNERS])
    assert by_hash["body"]["training"] == [] and by_hash["body"]["confirmed"] is False
    assert by_hash["body"]["applied"] == [] and by_hash["body"]["test"] is None
    assert by_hash["body"]["last_commit"] == expected_commit(net, net.first, net.keys[FIRST_SIGNERS], stakes=False)
    assert by_hash["body"]["evidence"] == []
    assert by_hash["body"]["rewards"] == [{"address": r.address.hex(), "amount": r.amount} for r in second.rewards]
    assert {r["address"] for r in by_hash["body"]["rewards"]} == {k.public_key.hex() for k in net.keys[:3]}

    assert net.rpc.json("/v1/blocks/head", "Block") == by_hash
    raw = net.rpc.get("/v1/blocks/1?format=raw")
    assert raw.headers["Content-Type"] == "application/octet-stream"
    assert raw.body == net.first.encode() and decode_block(raw.body).hash == net.first.hash
    assert net.rpc.get(f"/v1/blocks/{net.training.hash.hex()}?format=raw").body == net.training.encode()
    assert net.rpc.get("/v1/blocks/head?format=raw").body == net.second.encode()


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/v1/blocks/3", 404),
        ("/v1/blocks/99", 404),
        ("/v1/blocks/" + "9" * 30, 404),
        ("/v1/blocks/" + "ab" * 32, 404),
        ("/v1/blocks/-1", 400),
        ("/v1/blocks/abc", 400),
        ("/v1/blocks/" + "a" * 63, 400),
        ("/v1/blocks/%D9%A1", 400),  # an Arabic-Indic digit one
        ("/v1/blocks/1%0A", 400),
        ("/v1/blocks/1?format=xml", 400),
        ("/v1/blocks/head?format=", 400),
        ("/v1/model?height=x", 400),
        ("/v1/model?height=-1", 400),
        ("/v1/model?height=1.5", 400),
        ("/v1/model?height=", 400),
        ("/v1/model?height=3", 404),
        ("/v1/model?height=99", 404),
        ("/v1/model/weights?height=99", 404),
        ("/v1/model/weights?height=0x1", 400),
        ("/v1/accounts/zz", 400),
        ("/v1/accounts/" + "0" * 66, 400),
        ("/v1/mining/work", 400),
        ("/v1/mining/work?miner=12", 400),
        ("/v1/nope", 404),
        ("/v1/blocks?limit=0", 400),
    ],
)
def test_bad_reads(net: Net, path: str, status: int) -> None:
    assert net.rpc.error("GET", path, status)


def test_finality(net: Net) -> None:
    finality = net.rpc.json("/v1/finality", "Finality")
    state = net.node.head().state
    assert (finality["finalized_height"], finality["finalized_hash"]) == (2, net.second.hash.hex())
    assert finality["finalized_timestamp"] == net.second.header.timestamp
    assert finality["commit"] == expected_commit(net, net.second, net.keys[SECOND_SIGNERS])
    assert finality["commit"] == net.rpc.json("/v1/blocks/head", "Block")["commit"]
    assert finality["last_tested"] == net.training.hash.hex() == state.finalized_hash.hex()  # height 2 named none
    assert finality["total_stake"] == state.total_stake == 4_000_000
    assert finality["voting"] == {"height": 3, "round": 0, "step": "propose"}
    assert [p["hash"] for p in finality["pending"]] == [b.hash.hex() for b in net.node.training_blocks()]


def test_model(net: Net) -> None:
    state = net.node.head().state
    model = net.rpc.json("/v1/model", "Model")
    config = net.node.genesis.model
    assert model["config"] == {
        "layers": config.layers,
        "heads": config.heads,
        "width": config.width,
        "context": config.context,
        "vocab_size": config.vocab_size,
        "parameter_count": config.parameter_count(),
    }
    assert (model["height"], model["block_hash"]) == (2, net.second.hash.hex())
    assert (model["state_root"], model["weights_root"]) == (state.root.hex(), state.weights_root.hex())
    assert model["slice_hashes"] == [h.hex() for h in state.slice_hashes]
    assert [model["validation_loss"], model["test_loss"]] == list(net.node.mean_losses(state))
    assert model["difficulty"] == state.difficulty
    at_one = net.rpc.json("/v1/model?height=1", "Model")
    assert at_one["block_hash"] == net.first.hash.hex() and at_one["weights_root"] == model["weights_root"]

    genesis = net.rpc.json("/v1/model?height=0", "Model")
    genesis_state = net.node.state_of(net.node.genesis_block.hash)
    assert genesis_state is not None and genesis["state_root"] == genesis_state.root.hex()
    changed = [a != b for a, b in zip(genesis["slice_hashes"], model["slice_hashes"], strict=True)]
    assert changed.count(True) == 1  # the confirmed training block updated one slice
    assert genesis["validation_loss"] > model["validation_loss"]


def test_weights_load_and_reproduce_the_validation_loss(net: Net, tmp_path: Path) -> None:
    genesis = net.node.genesis
    reply = net.rpc.get("/v1/model/weights")
    head = net.node.head()
    state = head.state
    assert reply.headers["Content-Type"] == "application/octet-stream"
    assert (
        reply.headers["Content-Disposition"]
        == f'attachment; filename="potchain-{head.block.header.height}.safetensors"'
    )
    tensors = load(reply.body)
    expected = net.node.weights_of(state)
    assert set(tensors) == set(expected.tensors)
    for name, values in expected.tensors.items():
        assert tensors[name].dtype == np.int16 and np.array_equal(tensors[name], values)
    path = tmp_path / "head.safetensors"
    path.write_bytes(reply.body)
    weights = load_weights(path, genesis.model, genesis.exponents)

    # The canonical evaluator, on another backend than the node's, gives the node's number.
    sequences, context = genesis.evaluation.validation_sequences, genesis.model.context
    inputs, targets = sample_batch(net.node.chain.validation_text, seed_from_int(0), sequences, context)
    evaluator = CanonicalEvaluator(weights, genesis.tables(), make_backend("torch-int64"))
    total = evaluator.per_token_losses(inputs, targets).loss_total
    assert total == net.node.chain.loss(state, "validation", seed_from_int(0))
    status = net.rpc.json("/v1/status", "Status")
    assert round(total / (sequences * context) / (1 << LOSS_BITS), 5) == status["validation_loss"]

    at_genesis = net.rpc.get("/v1/model/weights?height=0")
    assert at_genesis.headers["Content-Disposition"] == 'attachment; filename="potchain-0.safetensors"'
    path.write_bytes(at_genesis.body)
    served = load_weights(path, genesis.model, genesis.exponents)
    initial = genesis.initial_weights()
    assert all(np.array_equal(served.tensors[n], v) for n, v in initial.tensors.items())
    assert load(encode_weights(initial)).keys() == load(at_genesis.body).keys()


def test_accounts(net: Net) -> None:
    state = net.node.head().state
    validator = net.keys[1].public_key
    account = net.rpc.json(f"/v1/accounts/{validator.hex()}", "Account")
    assert account == {
        "address": validator.hex(),
        "balance": state.accounts[validator].balance,
        "stake": state.stake_of(validator),
    }
    assert account["stake"] > 0 and account["balance"] > 0  # it signed height 1's certificate: height 2 paid it
    # The miner's update was applied at height 1 but not committed to (genesis carries no commitments): unpaid.
    miner = net.scenario.miner.public_key
    assert miner not in state.accounts
    assert net.rpc.json(f"/v1/accounts/{miner.hex()}", "Account") == {"address": miner.hex(), "balance": 0, "stake": 0}
    unknown = "ef" * 32
    assert net.rpc.json(f"/v1/accounts/{unknown.upper()}", "Account") == {"address": unknown, "balance": 0, "stake": 0}


def test_peers(net: Net) -> None:
    assert net.rpc.json("/v1/peers", "Peers") == {"peers": []}


def test_mining_work(net: Net) -> None:
    miner = net.scenario.miner.public_key
    work = net.rpc.json(f"/v1/mining/work?miner={miner.hex()}", "Work")
    expected = net.node.work_for(miner)
    assert work["parent_hash"] == expected.parent_hash.hex() == net.second.hash.hex()  # the decided head
    assert (work["height"], work["slice_id"], work["difficulty"]) == (3, expected.slice_id, expected.difficulty)
    assert work["state_root"] == expected.state_root.hex() == net.second.header.state_root.hex()
    assert work["validation_seed"] == expected.validation_seed.hex()
    assert work["training_seed"] == expected.training_seed.hex()
    assert work["min_timestamp"] == expected.min_timestamp == net.second.header.timestamp + 1
    # A commitment now is for height 3, the block being decided, and names an update of the slice the
    # miner is assigned on it (the one a training block on height 3 sets).
    slices = net.node.genesis.partition.slices
    assert (work["commitment_height"], work["commitment_slice_id"]) == (3, compute_next_slice(3, slices))
    assert work["weights_url"] == "/v1/model/weights?height=2"
    assert net.rpc.get(work["weights_url"]).headers["Content-Disposition"].endswith('"potchain-2.safetensors"')
    assert net.next_training.header.parent == net.second.hash and net.next_training.header.height == work["height"]


# --- Writes ----------------------------------------------------------------------------


def test_submit_auth_and_bad_blocks(net: Net) -> None:
    rpc, block = net.rpc, net.next_training
    assert "missing" in rpc.error("POST", "/v1/mining/submit", 401, block.encode())
    assert "wrong" in rpc.error("POST", "/v1/mining/submit", 401, block.encode(), token=rpc.token[:-1] + "x")
    assert rpc.request("POST", "/v1/mining/submit", block.encode(), token="wrong").headers["WWW-Authenticate"]
    assert rpc.error("POST", "/v1/mining/submit", 400, b"\x93garbage", token=rpc.token).startswith("block:")
    assert rpc.error("POST", "/v1/mining/submit", 400, b"", token=rpc.token)

    body = block.body
    assert isinstance(body, TrainingBody)
    wrong = rebuild(block, net.scenario.miner, net.node.chain.domain, loss_after=body.loss_after + 1)
    message = rpc.error("POST", "/v1/mining/submit", 422, wrong.encode(), token=rpc.token)
    assert message == f"loss_after: got {body.loss_after + 1}, want {body.loss_after}"
    on_genesis = rebuild(net.training, net.scenario.miner, net.node.chain.domain, timestamp=9)
    assert "decided up to 2" in rpc.error("POST", "/v1/mining/submit", 422, on_genesis.encode(), token=rpc.token)
    orphan = rebuild(block, net.scenario.miner, net.node.chain.domain, parent=bytes(32))
    assert "unknown block" in rpc.error("POST", "/v1/mining/submit", 422, orphan.encode(), token=rpc.token)
    for bad in (wrong, on_genesis, orphan):
        assert net.node.block_by_hash(bad.hash) is None


def test_submitting_a_decided_block_is_refused(net: Net) -> None:
    rpc = net.rpc
    for decided in (net.first, net.second):
        message = rpc.error("POST", "/v1/mining/submit", 422, decided.encode(), token=rpc.token)
        assert message == "kind: only training blocks are submitted, not decided"
    genesis = net.node.genesis_block.encode()
    assert rpc.error("POST", "/v1/mining/submit", 422, genesis, token=rpc.token).endswith("not genesis")
    assert rpc.json("/v1/status", "Status")["head_hash"] == net.second.hash.hex()


def test_oversized_body(net: Net) -> None:
    big = bytes(DEFAULT_MAX_BODY_BYTES + 1)
    message = net.rpc.error("POST", "/v1/mining/submit", 413, big, token=net.rpc.token)
    assert str(DEFAULT_MAX_BODY_BYTES) in message
    assert net.rpc.get("/health").json() == {"status": "synced"}  # still serving


def test_submit_then_known_and_pending(net: Net) -> None:
    rpc, block = net.rpc, net.next_training
    first = rpc.request("POST", "/v1/mining/submit", block.encode(), token=rpc.token)
    assert first.status == 200, first.body
    assert first.json() == {"hash": block.hash.hex(), "height": 3, "known": False}
    conform(first.json(), {"$ref": "#/components/schemas/SubmitResult"}, OPENAPI)
    again = rpc.request("POST", "/v1/mining/submit", block.encode(), token=rpc.token)
    assert again.json() == {"hash": block.hash.hex(), "height": 3, "known": True}
    conform(again.json(), {"$ref": "#/components/schemas/SubmitResult"}, OPENAPI)

    # Kept on the head, not decided: the head and finality stay where they were.
    assert rpc.json("/v1/blocks/head", "Block")["hash"] == net.second.hash.hex()
    status = rpc.json("/v1/status", "Status")
    assert (status["head_height"], status["finalized_height"]) == (2, 2)
    kept = rpc.json(f"/v1/blocks/{block.hash.hex()}", "Block")
    assert (kept["kind"], kept["height"], kept["canonical"], kept["commit"]) == ("training", 3, False, None)
    assert kept["received_at"] == net.node.received_at[block.hash]
    assert rpc.error("GET", "/v1/blocks/3", 404)  # no decided block at height 3 yet

    finality = rpc.json("/v1/finality", "Finality")
    assert finality["finalized_hash"] == net.second.hash.hex()
    assert finality["commit"] == expected_commit(net, net.second, net.keys[SECOND_SIGNERS])
    body = block.body
    assert isinstance(body, TrainingBody)
    assert finality["pending"] == [
        {
            "hash": block.hash.hex(),
            "height": 3,
            "proposer": net.scenario.miner.public_key.hex(),
            "slice_id": body.slice_id,
            "gain": body.loss_before - body.loss_after,
        }
    ]


def test_commitments_for_the_height_being_decided_are_kept(net: Net) -> None:
    rpc, domain = net.rpc, net.node.chain.domain
    miner = devnet_key("rpc-committer")
    update_hash = compute_update_hash(miner.public_key, 1, b"\x01\x00" * 8)
    commitment = sign_update_commitment(miner, domain, 3, update_hash)
    path = "/v1/mining/commitments"
    assert "missing" in rpc.error("POST", path, 401, commitment.encode())

    kept = rpc.request("POST", path, commitment.encode(), token=rpc.token)
    expected = {"height": 3, "miner": miner.public_key.hex(), "update_hash": update_hash.hex()}
    assert (kept.status, kept.json()) == (202, expected | {"known": False})
    conform(kept.json(), {"$ref": "#/components/schemas/CommitmentResult"}, OPENAPI)
    assert net.node.decided.commitments[miner.public_key] == commitment
    again = rpc.request("POST", path, commitment.encode(), token=rpc.token)
    assert (again.status, again.json()) == (200, expected | {"known": True})
    other = sign_update_commitment(miner, domain, 3, bytes(32))
    assert "another of this miner's" in rpc.error("POST", path, 409, other.encode(), token=rpc.token)

    # Heights 2 (decided) and 4 (not being decided yet) are refused; so are forgeries and garbage.
    stranger = devnet_key("rpc-committer-2")
    for height in (2, 4):
        message = rpc.error("POST", path, 409, sign_update_commitment(stranger, domain, height, update_hash).encode(),
                            token=rpc.token)  # fmt: skip
        assert message == f"commitment: for height {height}, deciding 3: a commitment is for the height being decided"
    forged = dataclasses.replace(sign_update_commitment(stranger, domain, 3, update_hash), miner=miner.public_key)
    assert rpc.error("POST", path, 422, forged.encode(), token=rpc.token) == "commitment: not signed by its miner"
    assert rpc.error("POST", path, 400, b"\x93garbage", token=rpc.token).startswith("update commitment")
    assert rpc.error("POST", path, 400, b"", token=rpc.token) == "body: empty, want an encoded update commitment"
    assert stranger.public_key not in net.node.decided.commitments
    assert net.node.decided.commitments[miner.public_key] == commitment


def test_submit_reaches_the_backend(net: Net) -> None:
    calls: list[bytes] = []

    class Recording(LocalBackend):
        def submit_block(self, data: bytes) -> tuple[Block, bool]:
            calls.append(data)
            return super().submit_block(data)

    server = RpcServer(Recording(net.node), token="t")
    rpc = Rpc(f"http://127.0.0.1:{server.start()}", "t")
    try:
        kept = rpc.request("POST", "/v1/mining/submit", net.next_training.encode(), token="t").json()
        conform(kept, {"$ref": "#/components/schemas/SubmitResult"}, OPENAPI)
        assert (kept["hash"], kept["height"]) == (net.next_training.hash.hex(), 3)
        assert "only training blocks" in rpc.error("POST", "/v1/mining/submit", 422, net.second.encode(), token="t")
    finally:
        server.stop()
    assert calls == [net.next_training.encode(), net.second.encode()]


class Records(logging.Handler):
    """Every record a logger emits, formatted (with its traceback); works without pytest's logging plugin."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_a_bug_is_a_json_500(net: Net) -> None:
    class Broken(LocalBackend):
        def peers(self) -> list[dict[str, object]]:
            raise RuntimeError("peer table corrupt")

    records = Records()
    logging.getLogger("p2p.rpc").addHandler(records)
    server = RpcServer(Broken(net.node), token="t")
    rpc = Rpc(f"http://127.0.0.1:{server.start()}", "t")
    try:
        assert rpc.error("GET", "/v1/peers", 500) == "internal error"
        assert rpc.get("/health").json() == {"status": "synced"}
    finally:
        server.stop()
        logging.getLogger("p2p.rpc").removeHandler(records)
    assert any("peer table corrupt" in line for line in records.lines), records.lines


# --- Routing and the document ------------------------------------------------------------


def test_wrong_method_and_unknown_route(net: Net) -> None:
    assert net.rpc.error("DELETE", "/v1/status", 405).startswith("method not allowed")
    assert net.rpc.request("PUT", "/v1/status", b"x").headers["Allow"] == "GET"
    assert net.rpc.error("GET", "/v1/mining/submit", 405)
    assert net.rpc.error("POST", "/v1/status", 405, b"")
    assert net.rpc.error("GET", "/nothing/here", 404) == "not found: GET /nothing/here"


def served_and_documented(server: RpcServer, document: dict[str, Any]) -> set[tuple[str, str]]:
    """The (method, path) pairs the server routes, checked equal to those its document lists."""
    served = set()
    for resource in server.app.router.resources():
        info = resource.get_info()
        for route in resource:
            served.add((route.method.lower(), info.get("path") or info["formatter"]))
    documented = {(m, p) for p, ops in document["paths"].items() for m in ops if m in HTTP_METHODS}
    assert served == documented
    return served


def test_openapi_lists_every_route(net: Net) -> None:
    document = net.rpc.json("/openapi.json")
    assert document["openapi"].startswith("3.1")
    served = served_and_documented(net.server, document)
    assert len(served) == 23 and not any(path.startswith("/v1/admin/") for _, path in served)
    assert set(document["components"]["securitySchemes"]) == {"bearer"}
    admin = RpcServer(LocalBackend(net.node), token="t", admin_token="a")
    admin_rpc = Rpc(f"http://127.0.0.1:{admin.start()}", "t")
    try:
        with_admin = admin_rpc.json("/openapi.json")
        assert len(served_and_documented(admin, with_admin)) == 25
        assert set(with_admin["components"]["securitySchemes"]) == {"bearer", "admin"}
        for path in ("/v1/admin/blocked-peers", "/v1/admin/link-delay"):
            assert with_admin["paths"][path]["post"]["security"] == [{"admin": []}]
    finally:
        admin.stop()
    for path, operations in document["paths"].items():
        for operation in operations.values():
            in_path = {p["name"] for p in operation.get("parameters", []) if p["in"] == "path"}
            assert in_path == set(re.findall(r"{(\w+)}", path)), path
            assert ("302" if path == "/" else "200") in operation["responses"]  # / redirects to /explorer
    schemas = document["components"]["schemas"]
    refs = re.findall(r'"#/components/schemas/(\w+)"', json.dumps(document))
    assert set(refs) <= set(schemas) and set(schemas) <= set(refs) | {"Error"}
    for name in ("Attestation", "ValidationBody"):  # attestation finality is gone
        assert name not in schemas
    assert {"Commit", "LastCommit", "Verdict", "Evidence", "Voting", "DecidedBody", "NodeInfo"} <= set(schemas)
    for name, schema in schemas.items():
        if "properties" in schema and name != "Peers":
            assert schema["required"] == list(schema["properties"]) and schema["additionalProperties"] is False


def test_node_info(net: Net) -> None:
    info = net.rpc.json("/v1/node", "NodeInfo")
    assert info == {"peer_id": None, "addresses": [], "rejections": [], "blocked_peers": [], "link_delay_seconds": 0.0}


def test_admin_endpoints_are_off_unless_enabled(net: Net) -> None:
    rpc = net.rpc
    assert not net.server.admin
    for path in ("/v1/admin/blocked-peers", "/v1/admin/link-delay"):
        message = rpc.error("POST", path, 404, b'{"peers": []}', token=rpc.token)
        assert message == f"not found: POST {path}: the admin endpoints are off (--admin-rpc)"
    assert not (net.datadir / ADMIN_TOKEN_FILE).exists()  # a node without --admin-rpc makes no admin token


def test_admin_token_is_its_own(net: Net, tmp_path: Path) -> None:
    admin_token = load_or_create_token(tmp_path, ADMIN_TOKEN_FILE)
    mining_token = load_or_create_token(tmp_path)
    assert admin_token != mining_token and re.fullmatch(r"[0-9a-f]{64}", admin_token)
    assert stat.S_IMODE((tmp_path / ADMIN_TOKEN_FILE).stat().st_mode) == 0o600
    assert load_or_create_token(tmp_path, ADMIN_TOKEN_FILE) == admin_token
    with pytest.raises(ValueError, match="differ from the mining token"):
        RpcServer(LocalBackend(net.node), token="same", admin_token="same")

    server = RpcServer(LocalBackend(net.node), token=mining_token, admin_token=admin_token)
    rpc = Rpc(f"http://127.0.0.1:{server.start()}", mining_token)
    try:
        body = json.dumps({"peers": ["12D3KooWexample"]}).encode()
        assert "missing" in rpc.error("POST", "/v1/admin/blocked-peers", 401, body)
        assert "wrong" in rpc.error("POST", "/v1/admin/blocked-peers", 401, body, token="nope")
        message = rpc.error("POST", "/v1/admin/blocked-peers", 403, body, token=mining_token)
        assert message == "the admin endpoints take the admin token (DATADIR/admin_token), not the mining token"
        assert "admin token" in rpc.error("POST", "/v1/admin/link-delay", 403, b'{"seconds": 1}', token=mining_token)
        assert "wrong" in rpc.error("POST", "/v1/mining/submit", 401, net.next_training.encode(), token=admin_token)
        bad = [(b"not json", "body: not JSON"), (b'{"peers": [1]}', "want"), (b'{"peers": [""]}', "1 to 128")]
        for bad_body, reason in bad:
            assert reason in rpc.error("POST", "/v1/admin/blocked-peers", 400, bad_body, token=admin_token)
        assert rpc.error("POST", "/v1/admin/blocked-peers", 409, body, token=admin_token) == "this node has no network"
        for seconds in (b"11", b"true", b"-1"):
            delay = b'{"seconds": ' + seconds + b"}"
            assert "0 to 10" in rpc.error("POST", "/v1/admin/link-delay", 400, delay, token=admin_token)
        assert rpc.error("POST", "/v1/admin/link-delay", 409, b'{"seconds": 1}', token=admin_token)
    finally:
        server.stop()


def test_admin_answers_match_the_document(net: Net) -> None:
    applied: list[object] = []

    class Networked(LocalBackend):
        def set_blocked_peers(self, peers: list[str]) -> None:
            applied.append(peers)

        def set_link_delay(self, seconds: float) -> None:
            applied.append(seconds)

    server = RpcServer(Networked(net.node), token="t", admin_token="a")
    rpc = Rpc(f"http://127.0.0.1:{server.start()}", "t")
    paths = rpc.json("/openapi.json")["paths"]
    try:
        for path, body, answer in [
            ("/v1/admin/blocked-peers", b'{"peers": ["b", "a", "b"]}', {"peers": ["a", "b"]}),
            ("/v1/admin/link-delay", b'{"seconds": 2}', {"seconds": 2.0}),
        ]:
            reply = rpc.request("POST", path, body, token="a")
            assert (reply.status, reply.json()) == (200, answer)
            schema = paths[path]["post"]["responses"]["200"]["content"]["application/json"]["schema"]
            conform(reply.json(), schema, OPENAPI)
    finally:
        server.stop()
    assert applied == [["b", "a", "b"], 2.0]


# --- Expensive reads and limits ------------------------------------------------------------


def same_safetensors(first: bytes, second: bytes) -> bool:
    """Two safetensors encodings of the same tensors and metadata (safetensors writes the
    metadata's keys in no fixed order, so the bytes of two encodings may differ)."""

    def parts(data: bytes) -> tuple[Any, bytes]:
        length = int.from_bytes(data[:8], "little")
        return json.loads(data[8 : 8 + length]), data[8 + length :]

    return parts(first) == parts(second)


def test_expensive_reads_are_cached_and_run_outside_the_node_lock(net: Net) -> None:
    server = RpcServer(LocalBackend(net.node), token="t")
    rpc = Rpc(f"http://127.0.0.1:{server.start()}", "t")
    evaluations = server.reads.chain.evaluations
    node_evaluations = net.node.chain.evaluations
    try:
        first = rpc.json("/v1/model?height=1", "Model")
        assert server.reads.chain.evaluations == evaluations + 2  # validation and test, on the RPC's evaluator
        assert rpc.json("/v1/model?height=1", "Model") == first
        assert server.reads.chain.evaluations == evaluations + 2  # the second answer comes from the cache
        assert net.node.chain.evaluations == node_evaluations  # the node's evaluator (the voting's) is untouched
        state = net.node.state_of(net.first.hash)
        assert state is not None
        assert [first["validation_loss"], first["test_loss"]] == list(net.node.mean_losses(state))

        # With the node's lock held elsewhere (a worker thread evaluating a candidate, say), the
        # head's status, model and weights still answer: nothing evaluates under the lock.
        held, release = threading.Event(), threading.Event()

        def hold() -> None:
            with net.node.lock:
                held.set()
                release.wait(60)

        holder = threading.Thread(target=hold)
        holder.start()
        held.wait(10)
        try:
            started = time.monotonic()
            status = rpc.json("/v1/status", "Status")
            model = rpc.json("/v1/model", "Model")
            weights = rpc.get("/v1/model/weights")
            assert time.monotonic() - started < 10
        finally:
            release.set()
            holder.join()
        assert status["validation_loss"] == model["validation_loss"]
        assert same_safetensors(weights.body, encode_weights(net.node.weights_of(net.node.head().state)))
        evaluated = server.reads.chain.evaluations
        assert rpc.get("/v1/model/weights").body == weights.body
        assert rpc.json("/v1/status", "Status")["test_loss"] == status["test_loss"]
        assert server.reads.chain.evaluations == evaluated
    finally:
        server.stop()


def test_requests_past_the_in_flight_limit_get_503(net: Net) -> None:
    entered, release = threading.Semaphore(0), threading.Event()

    class Slow(LocalBackend):
        def peers(self) -> list[dict[str, object]]:
            entered.release()
            release.wait(30)
            return []

    server = RpcServer(Slow(net.node), token="t", limits=RpcLimits(max_in_flight=2))
    rpc = Rpc(f"http://127.0.0.1:{server.start()}", "t")
    answers: list[int] = []
    waiting = [threading.Thread(target=lambda: answers.append(rpc.request("GET", "/v1/peers").status)) for _ in "ab"]
    try:
        for thread in waiting:
            thread.start()
        assert entered.acquire(timeout=10) and entered.acquire(timeout=10)
        reply = rpc.request("GET", "/v1/status")
        assert (reply.status, reply.headers["Retry-After"]) == (503, "1")
        assert reply.json()["error"].startswith("busy: 2 requests in flight")
    finally:
        release.set()
        for thread in waiting:
            thread.join()
    try:
        assert answers == [200, 200]
        assert rpc.get("/health").json() == {"status": "synced"}
    finally:
        server.stop()


def raw_request(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send `data` on a new connection and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(data)
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
        return received


def closed_within(connection: socket.socket, seconds: float) -> bool:
    """Whether the server closes `connection` (reading whatever it sends) within `seconds`."""
    connection.settimeout(seconds)
    try:
        while connection.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def test_slow_and_idle_clients_do_not_stall_the_rpc(net: Net) -> None:
    limits = RpcLimits(max_connections=12, idle_seconds=1.0, body_seconds=1.0)
    server = RpcServer(LocalBackend(net.node), token="t", limits=limits)
    port = server.start()
    rpc = Rpc(f"http://127.0.0.1:{port}", "t")
    slow: list[socket.socket] = []
    try:
        rpc.json("/v1/status", "Status")  # the head's losses are cached: what follows times the limits only
        for index in range(limits.max_connections):
            connection = socket.create_connection(("127.0.0.1", port), timeout=10)
            if index % 3 == 1:  # slowloris: a request head that never ends
                connection.sendall(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
            elif index % 3 == 2:  # a body that never ends
                head = "POST /v1/mining/submit HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n"
                connection.sendall(f"{head}Content-Length: 1000\r\n\r\n".encode() + bytes(10))
            slow.append(connection)  # index % 3 == 0: idle, sends nothing
        time.sleep(0.2)

        # Every connection is taken: the next one is answered 503 with Retry-After and closed.
        busy = raw_request(port, b"GET /v1/status HTTP/1.1\r\nHost: x\r\n\r\n")
        assert busy.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 1\r\n" in busy, busy[:300]
        assert b"busy: 12 connections open" in busy

        # A normal client retrying after Retry-After is answered within a few seconds: the idle and
        # slow-header connections are closed after idle_seconds, the unfinished body gets a 408.
        started = time.monotonic()
        while True:
            reply = rpc.request("GET", "/v1/status")
            if reply.status != 503 or time.monotonic() - started > 10:
                break
            time.sleep(float(reply.headers["Retry-After"]) / 4)
        assert reply.status == 200 and time.monotonic() - started < 4, (reply.status, time.monotonic() - started)
        for index, connection in enumerate(slow):
            assert closed_within(connection, 5), index
        answered = raw_request(port, b"POST /v1/mining/submit HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer t\r\n"
                               b"Content-Length: 100\r\n\r\n" + bytes(5))  # fmt: skip
        assert answered.startswith(b"HTTP/1.1 408 "), answered[:200]
        assert b"body: not received within 1.0 s" in answered
        assert rpc.get("/health").json() == {"status": "synced"}
    finally:
        for connection in slow:
            connection.close()
        server.stop()


def test_an_adversary_needs_the_admin_rpc(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import node

    assert node.main(["node", "--datadir", str(tmp_path), "--adversary", "equivocator"]) == 2
    error = capsys.readouterr().err
    assert "--adversary is for simulations only: it needs --admin-rpc" in error
    assert not (tmp_path / "chain").exists()  # refused before anything started
