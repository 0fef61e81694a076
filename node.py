"""potchain: the command line, and the composition root of the full node."""

from __future__ import annotations

import argparse
import ctypes
import getpass
import json
import logging
import os
import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from chain.blocks import TrainingBody, decode_block
from chain.crypto import PrivateKey, devnet_key
from chain.files import PUBLIC_MODE, SECRET_MODE, write_atomically
from chain.heldout import Shard, ShardError, load_shard, save_shard, shard_from_text
from chain.keystore import (
    DEVNET_CHAIN_PREFIX,
    Keystore,
    KeystoreError,
    is_devnet_chain_id,
    read_key_file,
    read_plaintext_seed,
    write_keystore,
)
from chain.store import ChainDB, CorruptStore, StorageError
from consensus.genesis import Genesis, GenesisError
from consensus.rules import Chain, compute_next_slice, genesis_block, genesis_state
from genesis import DEVNET, chunk_directory, load_genesis
from p2p.logs import FORMATS, Progress, configure_logging
from training.data import SPLITS, ChunkError, load_split, sample_batch, seed_from_int
from training.evaluate import BACKENDS, CanonicalEvaluator, default_backend, make_backend
from training.miner import Miner, TrainingConfig
from training.sample import DEFAULT_TEMPERATURE, MAX_NEW_TOKENS, MAX_TEMPERATURE
from training.weights import WeightsError, load_weights


def tune_memory_allocator() -> None:
    """Keep freed memory in the process instead of returning it to the kernel.

    The evaluator and the miner allocate and free many same-sized tensors of
    several MiB; glibc by default maps each with mmap and unmaps it on free, so
    every allocation pays page faults again (about a third of an evaluation's
    time on the devnet). Raising the mmap and trim thresholds makes the heap
    reuse that memory. A no-op where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's largest allowed value
    mallopt(m_trim_threshold, 1 << 30)


class UserError(Exception):
    """A mistake in what the user asked for: reported in one line, exit code 2."""


class NodeFailure(Exception):
    """The node stopped on its own (a failed disk write): reported in one line, exit code 1."""


def command_eval(args: argparse.Namespace) -> dict[str, object]:
    """Canonical loss of a model on one seeded batch of a split."""
    import torch

    if args.threads is not None:
        if args.threads < 1:
            raise UserError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    genesis = load_genesis(args.genesis)
    if args.weights is None:
        weights = genesis.initial_weights()
    else:
        weights = load_weights(args.weights, genesis.model, genesis.exponents)
    text = load_split(genesis.dataset, chunk_directory(args.genesis, genesis), args.split)
    sequences = genesis.evaluation.test_sequences if args.split == "test" else genesis.evaluation.validation_sequences
    inputs, targets = sample_batch(text, seed_from_int(args.seed), sequences, genesis.model.context)
    backend = args.backend or default_backend(args.device)
    evaluator = CanonicalEvaluator(weights, genesis.tables(), make_backend(backend, args.device))
    started = time.perf_counter()
    result = evaluator.per_token_losses(inputs, targets)
    return {
        "genesis_hash": genesis.hash,
        "split": args.split,
        "seed": args.seed,
        "backend": backend,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "loss_total": result.loss_total,
        "tokens": result.tokens,
        "per_token_sha256": result.per_token_sha256,
        "loss_per_token": round(result.mean_loss, 6),
        "seconds": round(time.perf_counter() - started, 3),
    }


def validator_keys(genesis: Genesis) -> list[PrivateKey]:
    """The INSECURE devnet keys of genesis validators (validator-0, validator-1, ...)."""
    stakers = {account.public_key for account in genesis.accounts if account.stake}
    keys = [devnet_key(f"validator-{index}") for index in range(len(stakers))]
    return [key for key in keys if key.public_key in stakers]


def command_localnet(args: argparse.Namespace) -> dict[str, object]:
    """An in-process network on the decided chain: the devnet validators' keys in one node's
    voting and one CPU miner, until N decided heights have confirmed an update. The miner
    commits to an update before each height is decided and reveals it on the decided block
    that carries the commitment; the height after applies it and pays the miner."""
    from chain.blocks import DecidedBody
    from p2p.decided_node import DecidedNode
    from p2p.decided_node import mean_loss as report_loss
    from p2p.localnet import LocalVoting, Stalled, commit_update, count_confirmed_updates, reveal_committed_update
    from p2p.mining import PreparedUpdate

    if args.finalize < 1:
        raise UserError(f"--finalize must be at least 1, got {args.finalize}")
    started = time.perf_counter()
    node = DecidedNode(args.genesis, args.datadir)
    try:
        chain, genesis = node.chain, node.genesis
        validators = validator_keys(genesis)
        if not validators:
            raise UserError("genesis has no devnet validator keys; localnet needs them")
        train_text = load_split(genesis.dataset, chunk_directory(args.genesis, genesis), "train")
        miner_key = devnet_key("miner-0")
        miner = Miner(chain.weights(node.head().state), chain.layout, train_text,
                      TrainingConfig(steps=args.steps, device=args.device))  # fmt: skip
        initial = genesis_state(genesis)
        losses = {"validation_loss_genesis": report_loss(chain, initial, "validation")}
        losses["test_loss_genesis"] = report_loss(chain, initial, "test")
        local = LocalVoting.open(node, validators)
        confirmed = count_confirmed_updates(node.db)
        committed: PreparedUpdate | None = None
        misses = 0
        while confirmed < args.finalize:
            revealed = reveal_committed_update(node, miner_key, committed) if committed is not None else None
            if committed is not None and revealed is None:
                print(f"[localnet] update {committed.update_hash.hex()[:16]} not revealed: not carried, or its "
                      "validation gain fell short on the new head", file=sys.stderr)  # fmt: skip
            committed, gain = commit_update(node, miner, miner_key, args.attempts)
            if committed is None:
                need = node.head().state.difficulty
                raise UserError(f"the miner found no update with gain >= {need} in {args.attempts} attempts")
            if not local.voting.machines:
                local.start()  # after the first commitment, so that the first proposer carries it
            try:
                decision = local.decide_height()
            except Stalled as error:
                raise UserError(f"{args.datadir}: {error}") from None
            body, height = decision.block.body, decision.block.header.height
            assert isinstance(body, DecidedBody)
            test_gain = sum(body.gains().values())
            paid = [reward.amount for reward in body.rewards if reward.address == miner_key.public_key]
            if revealed is not None and revealed.hash in body.applied:
                confirmed += 1
                misses = 0
                assert isinstance(revealed.body, TrainingBody)
                miner.published(revealed.body.slice_id, np.frombuffer(revealed.body.weights, dtype="<i2"))
            elif body.training:
                misses += 1
                print(f"[localnet] update rejected out of sample (test gain {test_gain})", file=sys.stderr)
            else:
                misses += 1
                print(f"[localnet] height {height} decided without an update", file=sys.stderr)
            if misses > args.attempts:
                raise UserError(f"{misses} heights in a row confirmed no update of the miner's")
            print(
                f"[localnet] finalized {confirmed}/{args.finalize} height {height} "
                f"gain {gain} test gain {test_gain} paid {sum(paid)} difficulty {decision.state.difficulty} "
                f"val {report_loss(chain, decision.state, 'validation'):.4f} "
                f"({time.perf_counter() - started:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        head = node.head()
        losses["validation_loss_head"] = report_loss(chain, head.state, "validation")
        losses["test_loss_head"] = report_loss(chain, head.state, "test")
        account = head.state.accounts.get(miner_key.public_key)
        return {
            "finalized_height": head.block.header.height,
            "finalized_training_blocks": confirmed,
            "head_hash": head.block.hash.hex(),
            "head_height": head.block.header.height,
            "state_root": head.state.root.hex(),
            "miner": miner_key.public_key.hex(),
            "miner_balance": account.balance if account is not None else 0,
            **losses,
            "seconds": round(time.perf_counter() - started, 1),
        }
    finally:
        node.close()


def command_replay(args: argparse.Namespace) -> dict[str, object]:
    """Re-validate the stored decided chain from genesis into a fresh state: every decided
    block, the training blocks it names and its commit certificate (p2p/replay.py)."""
    from p2p.replay import replay_decided_chain

    configure_logging(args.log_level, args.log_format)
    genesis = load_genesis(args.genesis)
    directory = chunk_directory(args.genesis, genesis)
    chain = Chain(
        genesis,
        validation_text=load_split(genesis.dataset, directory, "validation"),
        test_text=load_split(genesis.dataset, directory, "test"),
    )
    state = genesis_state(genesis)
    first = genesis_block(genesis, state)
    if not (args.datadir / "chain").exists():
        raise UserError(f"{args.datadir}: no chain database here")
    db = ChainDB(args.datadir / "chain", bytes.fromhex(genesis.hash), first, state)
    try:
        head = db.head()
        stored_root = db.state(head).root
        started = time.perf_counter()
        progress = Progress("replay", "blocks", total=db.block(head).header.height)
        replayed = replay_decided_chain(db, chain, first, state,
                                        lambda block: progress.advance(1, height=block.header.height))  # fmt: skip
        progress.close()
        seconds = time.perf_counter() - started
    finally:
        db.close()
    if replayed.head.hash != head:
        raise CorruptStore(f"the canonical chain ends at {replayed.head.hash.hex()}, the head is {head.hex()}")
    if replayed.state.root != stored_root:
        raise CorruptStore(f"state_root: replay gives {replayed.state.root.hex()}, the store has {stored_root.hex()}")
    blocks = replayed.decided_blocks + replayed.training_blocks
    return {
        "state_root": replayed.state.root.hex(),
        "head_hash": head.hex(),
        "blocks": blocks,
        "decided_blocks": replayed.decided_blocks,
        "seconds": round(seconds, 3),
        "blocks_per_second": round(blocks / seconds, 3) if seconds > 0 else None,
    }


# --- the networked node -------------------------------------------------------------

NODE_DEFAULTS: dict[str, object] = {
    "genesis": str(DEVNET),
    "listen": "/ip4/127.0.0.1/tcp/0",
    "bootstrap": [],
    "rpc_host": "127.0.0.1",
    "rpc_port": 0,
    "mine": False,
    "miner_key": None,
    "validator_key": [],
    "heldout_file": [],
    "key_passphrase_file": None,
    "device": "cpu",
    "steps": TrainingConfig.steps,
    "threads": None,
    "proposal_wait": None,
    "log_level": "info",
    "log_format": "text",
    "admin_rpc": False,
    "adversary": "",
}
"""Every `potchain node` setting: a TOML file (--config) sets any of them, flags override it."""
KEY_LOG = logging.getLogger("potchain.keys")


def read_passphrase(passphrase_file: Path | None, flag: str, need: str, twice: bool = False) -> str:
    """A keystore passphrase: the text of `passphrase_file` without its trailing line break, or
    typed at a terminal (twice when `twice`, for a new keystore); with neither, an error that
    says what needs it (`need`) and how to give it (`flag`)."""
    if passphrase_file is not None:
        try:
            passphrase = passphrase_file.read_text().rstrip("\r\n")
        except OSError as error:
            raise UserError(f"{passphrase_file}: cannot read the passphrase file ({error.strerror})") from None
        if not passphrase:
            raise UserError(f"{passphrase_file}: the passphrase file is empty, want a passphrase")
        return passphrase
    if not sys.stdin.isatty():
        raise UserError(f"{need}: give {flag} FILE, or run at a terminal to type it")
    passphrase = getpass.getpass(f"{need}: ")
    if not passphrase:
        raise UserError(f"{need}: the passphrase is empty, want at least one character")
    if twice and getpass.getpass("the same passphrase again: ") != passphrase:
        raise UserError(f"{need}: the two passphrases differ")
    return passphrase


def load_key(spec: str, chain_id: str, passphrase_file: Path | None = None, create: bool = False) -> PrivateKey:
    """A signing key for the chain `chain_id`:

    - `devnet:NAME`: the INSECURE key derived from the name, only on a development network
      (a chain id beginning with "potchain-devnet", chain/keystore.py); refused elsewhere;
    - a keystore file: unlocked with the passphrase in `passphrase_file`, or typed at a terminal;
    - a legacy plaintext key file (64 hex characters): loaded, with a warning that it is unencrypted.

    A missing file is an error, unless `create` (a miner key, which needs no stake): then a new
    keystore is written there (mode 0600) under the passphrase of `passphrase_file`, or one typed
    twice at a terminal."""
    if spec.startswith("devnet:"):
        if not is_devnet_chain_id(chain_id):
            raise UserError(
                f"{spec}: devnet keys are derived from their names, so anyone can sign with them; refused on "
                f"chain {chain_id!r} (only chain ids beginning with {DEVNET_CHAIN_PREFIX!r} take them): "
                "use a keystore (potchain keys new)"
            )
        return devnet_key(spec.removeprefix("devnet:"))
    path = Path(spec)
    try:
        if not path.exists():
            if not create:
                raise UserError(f"{path}: no such key file (a validator key must be the staked key, not a new one)")
            need = f"a passphrase for the new miner keystore {path}"
            passphrase = read_passphrase(passphrase_file, "--key-passphrase-file", need, twice=True)
            seed = secrets.token_bytes(32)
            keystore = write_keystore(path, seed, passphrase)
            KEY_LOG.warning("created the miner key %s, an encrypted keystore (public key %s): keep a copy",
                            path, keystore.public_key.hex())  # fmt: skip
            return PrivateKey(seed)
        found = read_key_file(path)
        if isinstance(found, PrivateKey):
            KEY_LOG.warning("%s holds an UNENCRYPTED key (public key %s); encrypt it with: potchain keys import "
                            "--seed-file %s --out NEW_FILE", path, found.public_key.hex(), path)  # fmt: skip
            return found
        return found.unlock(read_passphrase(passphrase_file, "--key-passphrase-file", f"the passphrase of {path}"))
    except KeystoreError as error:
        raise UserError(str(error)) from None


def load_heldout_shards(paths: Sequence[str], genesis: Genesis, validators: Sequence[PrivateKey]) -> dict[bytes, Shard]:
    """Each held-out shard file, by the validator key whose genesis commitment it matches
    (root and sequence count); UserError naming the file if it cannot be read, is not a
    shard of this genesis's sequence length, or matches no --validator-key's commitment."""
    commitments = {account.public_key: account.heldout for account in genesis.accounts if account.heldout}
    shards: dict[bytes, Shard] = {}
    for text in paths:
        path = Path(text)
        try:
            shard = load_shard(path)
        except ShardError as error:
            raise UserError(str(error)) from None
        want = genesis.model.context + 1
        if shard.sequence_bytes != want:
            raise UserError(f"{path}: sequences of {shard.sequence_bytes} bytes, want {want} (the model's context + 1)")
        owners = [key.public_key for key in validators if (commitment := commitments.get(key.public_key)) is not None
                  and (commitment.root, commitment.sequences) == (shard.root, shard.count)]  # fmt: skip
        if not owners:
            raise UserError(f"{path}: root {shard.root.hex()} of {shard.count} sequences is not the held-out "
                            "commitment in genesis of any --validator-key")  # fmt: skip
        if owners[0] in shards:
            raise UserError(f"{path}: a second held-out shard for validator {owners[0].hex()}")
        shards[owners[0]] = shard
    return shards


def node_settings(args: argparse.Namespace) -> dict[str, object]:
    """NODE_DEFAULTS, then the TOML file, then the flags given on the command line."""
    import tomllib

    settings = dict(NODE_DEFAULTS)
    if args.config is not None:
        try:
            document = tomllib.loads(args.config.read_text())
        except FileNotFoundError:
            raise UserError(f"{args.config}: no such file") from None
        except tomllib.TOMLDecodeError as error:
            raise UserError(f"{args.config}: not TOML: {error}") from None
        for name, value in document.items():
            key = name.replace("-", "_")
            if key not in NODE_DEFAULTS:
                raise UserError(f"{args.config}: unknown setting {name!r}")
            default = NODE_DEFAULTS[key]
            if default is not None and not isinstance(value, type(default)):
                want = type(default).__name__
                raise UserError(f"{args.config}: {name} must be a {want}, got {type(value).__name__}")
            settings[key] = value
    for key in NODE_DEFAULTS:
        value = getattr(args, key, None)
        if value is not None and value != [] and value is not False:
            settings[key] = value
    return settings


def write_json_atomically(path: Path, value: object) -> None:
    """Write `value` as indented JSON, atomically and durably (chain/files.py)."""
    write_atomically(path, (json.dumps(value, indent=1) + "\n").encode(), PUBLIC_MODE)


def command_node(args: argparse.Namespace) -> dict[str, object]:
    """A full node on the network until SIGINT or SIGTERM."""
    import torch
    import trio

    from p2p.backend import NetworkBackend
    from p2p.decided_node import DecidedNode
    from p2p.rpc import ADMIN_TOKEN_FILE, RpcServer, load_or_create_token
    from p2p.voting_node import VotingNode, VotingNodeConfig

    settings = node_settings(args)
    if settings["adversary"] and not settings["admin_rpc"]:
        raise UserError("--adversary is for simulations only: it needs --admin-rpc (the simulation mode)")
    if settings["log_level"] not in ("debug", "info", "warning", "error"):
        raise UserError(f"log_level must be debug, info, warning or error, got {settings['log_level']!r}")
    configure_logging(str(settings["log_level"]), str(settings["log_format"]))
    if settings["threads"] is not None:
        torch.set_num_threads(int(str(settings["threads"])))
    datadir: Path = args.datadir
    datadir.mkdir(parents=True, exist_ok=True)
    genesis = load_genesis(Path(str(settings["genesis"])))
    chain_id = genesis.chain_id
    passphrase = settings["key_passphrase_file"]
    passphrase_file = None if passphrase is None else Path(str(passphrase))
    validators = [load_key(str(spec), chain_id, passphrase_file)
                  for spec in settings["validator_key"]]  # type: ignore[attr-defined]  # fmt: skip
    heldout_files = [str(path) for path in settings["heldout_file"]]  # type: ignore[attr-defined]
    shards = load_heldout_shards(heldout_files, genesis, validators)
    miner_key = None
    if settings["mine"]:
        miner_spec = str(settings["miner_key"] or datadir / "miner_key")
        miner_key = load_key(miner_spec, chain_id, passphrase_file, create=True)
    device = str(settings["device"])
    if device not in ("cpu", "cuda"):
        raise UserError(f"device must be cpu or cuda, got {device!r}")
    training = TrainingConfig(steps=int(str(settings["steps"])), device=device)
    if miner_key is not None:
        from training.miner import resolve_device

        resolve_device(device)
    proposal_wait = settings["proposal_wait"]
    if proposal_wait is not None and (
        isinstance(proposal_wait, bool) or not isinstance(proposal_wait, int | float) or not 0 <= proposal_wait <= 600
    ):
        raise UserError(f"proposal_wait must be a number of seconds from 0 to 600, got {proposal_wait!r}")
    node = DecidedNode(Path(str(settings["genesis"])), datadir)
    config = VotingNodeConfig(
        listen=str(settings["listen"]),
        bootstrap=[str(b) for b in settings["bootstrap"]],  # type: ignore[attr-defined]
        validator_keys=validators,
        heldout_shards=shards,
        miner_key=miner_key,
        training=training,
        proposal_wait_seconds=None if proposal_wait is None else float(proposal_wait),
    )
    log = logging.getLogger("potchain.node")
    head_state = node.head().state
    for key in validators:
        if head_state.stake_of(key.public_key) <= 0:
            log.warning("validator key %s has no stake at the head: it will not vote", key.public_key.hex())
    network = VotingNode(node, config)
    if settings["adversary"]:
        from sim.adversaries import make_adversary

        network = make_adversary(str(settings["adversary"]), node, config)
    server = RpcServer(
        NetworkBackend(network),
        host=str(settings["rpc_host"]),
        port=int(str(settings["rpc_port"])),
        token=load_or_create_token(datadir),
        admin_token=load_or_create_token(datadir, ADMIN_TOKEN_FILE) if settings["admin_rpc"] else None,
    )

    async def started(network: VotingNode) -> None:
        port = await trio.to_thread.run_sync(server.start)
        rpc_url = f"http://{settings['rpc_host']}:{port}"
        addresses = [f"{address}/p2p/{network.peer_id}" if "/p2p/" not in address else address
                     for address in network.listen_addresses]  # fmt: skip
        write_json_atomically(datadir / "node.json", {"peer_id": network.peer_id, "addresses": addresses,
                                                      "rpc": rpc_url, "pid": os.getpid()})  # fmt: skip
        log.info("rpc at %s, peer id %s", rpc_url, network.peer_id)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(network.stop_on_signals)
            await network.run(on_started=started)
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    finally:
        import signal

        for signum in (signal.SIGINT, signal.SIGTERM):  # the last steps of a clean stop run to the end
            signal.signal(signum, signal.SIG_IGN)
        server.stop()
        head = node.head().block
        node.close()
    if network.failure is not None:
        raise NodeFailure(f"stopped at height {head.header.height}: {network.failure}")
    log.info("stopped cleanly at height %d", head.header.height)
    return {"stopped": True, "head_height": head.header.height, "head_hash": head.hash.hex(),
            "finalized_height": head.header.height}  # fmt: skip


def interrupt_on_sigterm() -> None:
    """Make SIGTERM stop this process the way Ctrl-C does (KeyboardInterrupt), so that the
    `finally` blocks of `devnet` and `sim` stop the node processes they started."""
    import signal

    def interrupt(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second one must not cut the clean-up short
        raise KeyboardInterrupt(f"received {signal.Signals(signum).name}")

    signal.signal(signal.SIGTERM, interrupt)


def command_devnet(args: argparse.Namespace) -> dict[str, object]:
    """A local network of separate node processes (see sim/devnet.py)."""
    from sim.devnet import DevnetConfig, run_devnet
    from sim.processes import NodeProcessError

    if args.nodes < 1:
        raise UserError(f"--nodes must be at least 1, got {args.nodes}")
    if args.finalize is not None and args.finalize < 1:
        raise UserError(f"--finalize must be at least 1, got {args.finalize}")
    genesis = load_genesis(args.genesis)
    validators = len(validator_keys(genesis))
    if validators == 0:
        raise UserError(f"{args.genesis}: no devnet validator keys (validator-0, ...) in this genesis")
    interrupt_on_sigterm()
    config = DevnetConfig(
        genesis=args.genesis.resolve(),
        nodes=args.nodes,
        out=args.out.resolve(),
        finalize=args.finalize,
        validators=validators,
        miners=args.miners,
        steps=args.steps,
        threads=args.threads,
        timeout=args.timeout,
    )
    try:
        summary = run_devnet(config)
    except NodeProcessError as error:
        raise UserError(str(error)) from None
    return {key: summary[key] for key in ("finalized_height", "finalized_hash", "agree", "seconds")} | {
        "summary": str(args.out / "summary.json")
    }


COMMITMENT_RESEND_SECONDS = 3.0
"""How often `potchain mine` posts its commitment again while its height is undecided."""


def launch_mining(args: argparse.Namespace) -> dict[str, object]:
    """`potchain mine --nproc N`: one miner in N processes on this host, started by torch's elastic
    launcher (training/distributed.py); rank 0's result."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    from training.distributed import launch

    if args.token is None and args.token_file is None:
        raise UserError("submitting needs the node's RPC token: --token or --token-file (DATADIR/rpc_token)")
    try:
        result: dict[str, object] = launch(args.nproc, command_mine, args)
    except ChildFailedError as error:
        raise UserError(f"a mining process failed: {error}") from None
    return result


def follow_mining(args: argparse.Namespace, device: str) -> None:
    """A mining process of rank 1 or more (training/distributed.py): it trains its share of every
    round rank 0 starts, until rank 0 releases it; it needs the genesis and the training data only."""
    from training.distributed import DistributedMiner
    from training.weights import SliceLayout

    genesis = load_genesis(args.genesis)
    train_text = load_split(genesis.dataset, chunk_directory(args.genesis, genesis), "train")
    layout = SliceLayout(genesis.model, genesis.partition)
    config = TrainingConfig(steps=args.steps, device=device)
    miner = DistributedMiner(genesis.initial_weights(), layout, train_text, config)  # rank 0's weights come next
    miner.synchronize()
    miner.follow()


def command_mine(args: argparse.Namespace) -> dict[str, object] | None:
    """An external miner: commit-reveal over a node's RPC (p2p/mining.py), training on --device.
    On each decided head D: commit to the local model's update for the slice the chain assigns
    on the next block (POST /v1/mining/commitments), reveal on D the update D carries our
    commitment to (POST /v1/mining/submit), then train on D's weights for the next commitment.
    With --nproc N (or under torchrun), N processes train the one miner with DistributedDataParallel
    (training/distributed.py): rank 0 does all of the above, the others train their batch shares."""
    import tempfile

    import torch

    from chain.blocks import Block
    from chain.state import State
    from p2p.mining import (
        BackgroundTrainer,
        PreparedUpdate,
        find_applied,
        find_settled,
        is_carried,
        prepare_update,
        reveal_update,
        validation_gain,
    )
    from p2p.rpc_client import EventStream, RpcClient, RpcClientError
    from training.distributed import DistributedMiner, join, launched, leave
    from training.miner import Miner, resolve_device
    from training.weights import CanonicalWeights

    resolve_device(args.device)
    if args.nproc < 1:
        raise UserError(f"--nproc: got {args.nproc}, want at least 1")
    placement = launched()
    if placement is None and args.nproc > 1:
        return launch_mining(args)
    configure_logging("info", args.log_format)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = args.device
    if placement is not None:
        device = join(placement, args.device)
        if args.threads is None and device == "cpu":  # the host's cores, shared among its processes
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // placement.local_world_size))
        if placement.rank != 0:
            try:
                follow_mining(args, device)
            finally:
                leave()
            return None
    token = args.token
    if token is None and args.token_file is not None:
        token = args.token_file.read_text().strip()
    if token is None:
        raise UserError("submitting needs the node's RPC token: --token or --token-file (DATADIR/rpc_token)")
    genesis = load_genesis(args.genesis)
    key = load_key(str(args.key), genesis.chain_id, args.key_passphrase_file, create=True)
    directory = chunk_directory(args.genesis, genesis)
    chain = Chain(genesis, load_split(genesis.dataset, directory, "validation"),
                  load_split(genesis.dataset, directory, "test"), backend=default_backend(args.device),
                  device=args.device)  # fmt: skip
    train_text = load_split(genesis.dataset, directory, "train")
    client = RpcClient(args.rpc, token)  # kept-alive connections; a refused connection or a broken GET is retried
    try:
        status = client.get_json("/v1/status")
    except RpcClientError as error:
        raise UserError(f"the node's RPC at {args.rpc}: {error}") from None
    if status["genesis_hash"] != genesis.hash:
        raise UserError(f"the node runs genesis {status['genesis_hash']}, this miner {genesis.hash}")

    def say(message: str) -> None:
        print(f"[mine] {message}", file=sys.stderr, flush=True)

    def fetch_head(work: dict[str, Any]) -> tuple[CanonicalWeights, Block, State]:
        """The weights, block and model state of the decided head a work assignment names."""
        with tempfile.NamedTemporaryFile(suffix=".safetensors") as handle:
            handle.write(client.get_bytes(work["weights_url"]))
            handle.flush()
            weights = load_weights(Path(handle.name), genesis.model, genesis.exponents)
        head = decode_block(client.get_bytes(f"/v1/blocks/{work['parent_hash']}?format=raw"))
        slices = tuple(
            chain.layout.extract(weights, s).astype("<i2").tobytes() for s in range(genesis.partition.slices)
        )
        return weights, head, State(slices, {}, int(work["difficulty"]), 0, bytes(32), 0)

    def fetch_block(height: int) -> Block | None:
        """The node's decided block at a height (None if it has none there)."""
        try:
            return decode_block(client.get_bytes(f"/v1/blocks/{height}?format=raw"))
        except RpcClientError as error:
            if error.status == 404:
                return None
            raise

    def commit(work: dict[str, Any], head: Block, state: State) -> PreparedUpdate | None:
        """Commit to the latest snapshot's values for our slice on the next block, if they gain enough."""
        _, snapshot, steps = trainer.latest()
        if snapshot is None:
            return None
        values = snapshot[int(work["commitment_slice_id"])]
        update = prepare_update(chain, head, state, key, values, steps)
        offered[update.height] = update  # committed or not, the height's verdict settles the slice (find_settled)
        if update.expected_gain < state.difficulty:
            say(f"height {update.height}: gain {update.expected_gain} below difficulty {state.difficulty}; training on")
            return None
        try:
            client.submit_commitment(update.commitment.encode())
        except RpcClientError as error:
            if error.status is not None and error.status < 500 and error.status != 409:
                raise UserError(str(error)) from None
            say(f"commitment for height {update.height}: {error}")
            return None
        say(f"committed update {update.update_hash.hex()[:16]} for height {update.height} slice {update.slice_id} "
            f"gain {update.expected_gain}")  # fmt: skip
        return update

    def reveal(work: dict[str, Any], head: Block, state: State, update: PreparedUpdate) -> Block | None:
        """Reveal the update on the head that carries its commitment; the submitted block or None."""
        timestamp = max(int(time.time()), int(work["min_timestamp"]))
        block = reveal_update(chain, head, state, key, update, timestamp, bytes.fromhex(work["state_root"]))
        gain = validation_gain(block)
        if gain < state.difficulty:
            say(f"revealed update {update.update_hash.hex()[:16]} gains {gain} on height {update.height}, below "
                f"difficulty {state.difficulty}: dropped")  # fmt: skip
            return None
        try:
            answer = client.post_bytes("/v1/mining/submit", block.encode())
        except RpcClientError as error:
            if error.status is not None and error.status < 500 and error.status != 422:
                raise UserError(str(error)) from None
            say(f"submit: {error}")  # stale, say: the head moved while we revealed
            return None
        say(f"revealed block {answer['height']} {answer['hash'][:16]} slice {update.slice_id} gain {gain}")
        return block

    def save_state(miner: Miner) -> None:
        if args.state is not None:
            write_atomically(args.state, miner.state_bytes(), SECRET_MODE)

    processes = f" ({placement.world_size} processes)" if placement is not None else ""
    say(f"miner {key.public_key.hex()[:16]} on {args.device}{processes}, node {args.rpc}")
    started = time.perf_counter()
    first: dict[str, Any] = client.get_json(f"/v1/mining/work?miner={key.public_key.hex()}")
    config = TrainingConfig(steps=args.steps, device=device)
    miner = (Miner if placement is None else DistributedMiner)(fetch_head(first)[0], chain.layout, train_text, config)
    if args.state is not None and args.state.exists():
        miner.load(args.state)
    if isinstance(miner, DistributedMiner):
        miner.synchronize()  # every rank starts from rank 0's model and optimizer state
    rounds = Progress("mining", "rounds", interval=0.0)  # tokens/s and training loss, a line (or bar step) a round
    trainer = BackgroundTrainer(miner, save_state, lambda trained: rounds.advance(
        1, tokens_per_second=round(trained.tokens_per_second), loss=trained.loss))  # fmt: skip
    committed: dict[int, PreparedUpdate] = {}
    offered: dict[int, PreparedUpdate] = {}  # our latest update for each block not yet judged, by height
    revealed: dict[bytes, Block] = {}
    accepted, applied, last_head, tried_round, posted = 0, 0, b"", -1, 0.0
    heads = EventStream(args.rpc, ("head",)).start()  # the work is asked for again when a height is decided
    work, fresh = first, True
    try:
        while args.blocks is None or accepted < args.blocks:
            try:
                if fresh or not heads.connected:  # polled only while the event stream is down
                    work = client.get_json(f"/v1/mining/work?miner={key.public_key.hex()}")
                height = int(work["height"]) - 1
                if bytes.fromhex(work["parent_hash"]) != last_head:
                    weights, head, state = fetch_head(work)
                    last_head, tried_round = head.hash, trainer.latest()[0]
                    for ours, judge in find_applied(revealed, head, fetch_block):  # heights we missed too
                        del revealed[ours.hash]
                        applied += 1
                        say(f"height {judge.header.height} applied our block {ours.hash.hex()[:16]} "
                            f"({applied} applied)")  # fmt: skip
                    for offer, judge in find_settled(offered, head, fetch_block):
                        values = np.frombuffer(offer.weights, dtype="<i2")
                        trainer.published(judge.header.height, offer.slice_id, values)
                    offered = {h: u for h, u in offered.items() if h >= height}
                    carried = committed.pop(height, None)
                    if carried is not None and not is_carried(head, carried):
                        say(f"height {height} decided without our commitment {carried.update_hash.hex()[:16]}; dropped")
                        carried = None
                    committed = {h: u for h, u in committed.items() if h > height}
                    revealed = {h: b for h, b in revealed.items() if b.header.height > height}
                    if (update := commit(work, head, state)) is not None:
                        committed[height + 1], posted = update, time.monotonic()
                    if carried is not None and (block := reveal(work, head, state, carried)) is not None:
                        revealed[block.hash] = block
                        accepted += 1
                    next_height = height + 1 if height + 1 not in committed else height + 2  # our next commitment's
                    slice_id = compute_next_slice(next_height, genesis.partition.slices)
                    trainer.train_on(head.hash, height, weights, slice_id, bytes.fromhex(work["training_seed"]))
                elif height + 1 not in committed and trainer.latest()[0] != tried_round:  # a new snapshot: try it
                    tried_round = trainer.latest()[0]
                    if (update := commit(work, head, state)) is not None:
                        committed[height + 1], posted = update, time.monotonic()
                elif height + 1 in committed and time.monotonic() - posted >= COMMITMENT_RESEND_SECONDS:
                    client.submit_commitment(committed[height + 1].commitment.encode())  # gossip may have missed a peer
                    posted = time.monotonic()
                fresh = bool(heads.wait(0.5))  # a head event, or the stream's first after (re)connecting
            except RpcClientError as error:
                say(f"{error}; retrying")
                time.sleep(2.0)
                fresh = True
    finally:
        heads.close()
        trainer.stop()
        rounds.close()
        if isinstance(miner, DistributedMiner):
            miner.release()
            leave()
    return {"submitted": accepted, "applied": applied, "miner": key.public_key.hex(),
            "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip


def command_sim_model(args: argparse.Namespace, genesis: Genesis) -> dict[str, object]:
    """The modeled network: the real rules' blocks, a discrete-event network (sim/model.py)."""
    from sim.model import ModelConfig, run_model

    if args.nodes < 10:
        raise UserError(f"--nodes must be at least 10 in model mode, got {args.nodes}")
    config = ModelConfig(nodes=args.nodes, seed=args.seed if args.seed is not None else 1,
                         latency_ms=args.latency_ms, rounds=args.rounds)  # fmt: skip
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = run_model(genesis, args.genesis, config, out)
    write_json_atomically(out / "report.json", result)
    keys = ("nodes", "propagation_seconds", "finality_lag_seconds", "round_seconds", "seconds")
    return {key: result[key] for key in keys} | {"report": str(out / "report.json")}


def command_sim(args: argparse.Namespace) -> dict[str, object]:
    """Run a scenario on real node processes and write its report (sim/)."""
    from sim.report import write_report
    from sim.runner import report_losses, run_scenario
    from sim.scenario import ScenarioError, load_scenario

    interrupt_on_sigterm()
    genesis = load_genesis(args.genesis)
    if args.mode == "model":
        return command_sim_model(args, genesis)
    if args.scenario is None:
        raise UserError("--scenario is required in process mode")
    try:
        scenario = load_scenario(args.scenario, len(validator_keys(genesis)))
    except ScenarioError as error:
        raise UserError(str(error)) from None
    if args.finalize is not None and args.finalize < 1:
        raise UserError(f"--finalize must be at least 1, got {args.finalize}")
    if args.seed is not None or args.finalize is not None:
        import dataclasses

        seed = scenario.seed if args.seed is None else args.seed
        finalize = scenario.finalize if args.finalize is None else args.finalize
        scenario = dataclasses.replace(scenario, seed=seed, finalize=finalize)
    out: Path = args.out.resolve()
    data = run_scenario(scenario, out, args.genesis.resolve(), genesis)
    report = write_report(data, report_losses(genesis, args.genesis, genesis.initial_weights()), out)
    if data.get("failure"):
        raise UserError(f"{data['failure']} (report: {out / 'report.html'})")
    keys = ("finalized_height", "honest_nodes_agree", "invalid_blocks_finalized", "honest_node_crashes",
            "test_loss_genesis", "test_loss_head")  # fmt: skip
    return {key: report[key] for key in keys} | {"report": str(out / "report.html")}


# --- keys and a new network's genesis -----------------------------------------------


def key_summary(path: Path, public_key: bytes, encrypted: bool) -> dict[str, object]:
    """What `potchain keys` prints about a key file (an account's address is its public key)."""
    return {"path": str(path), "public_key": public_key.hex(), "address": public_key.hex(),
            "format": "keystore" if encrypted else "plaintext", "encrypted": encrypted}  # fmt: skip


def write_new_keystore(out: Path, seed: bytes, passphrase_file: Path | None) -> dict[str, object]:
    """Encrypt `seed` into a new keystore at `out` (an existing file is an error)."""
    if out.exists():
        raise UserError(f"{out}: the file exists; not overwriting a key file")
    passphrase = read_passphrase(passphrase_file, "--passphrase-file", f"a passphrase for {out}", twice=True)
    try:
        keystore = write_keystore(out, seed, passphrase)
    except KeystoreError as error:
        raise UserError(str(error)) from None
    return key_summary(out, keystore.public_key, encrypted=True)


def command_keys_new(args: argparse.Namespace) -> dict[str, object]:
    """A fresh Ed25519 key in a new encrypted keystore."""
    return write_new_keystore(args.out, secrets.token_bytes(32), args.passphrase_file)


def command_keys_import(args: argparse.Namespace) -> dict[str, object]:
    """A legacy plaintext key file (64 hex characters) encrypted into a new keystore."""
    try:
        seed = read_plaintext_seed(args.seed_file)
    except KeystoreError as error:
        raise UserError(str(error)) from None
    return write_new_keystore(args.out, seed, args.passphrase_file)


def command_keys_show(args: argparse.Namespace) -> dict[str, object]:
    """A key file's public key, without its passphrase."""
    try:
        found = read_key_file(args.path)
    except KeystoreError as error:
        raise UserError(str(error)) from None
    if isinstance(found, Keystore):
        return key_summary(args.path, found.public_key, encrypted=True)
    return key_summary(args.path, found.public_key, encrypted=False)


def command_genesis_new(args: argparse.Namespace) -> dict[str, object]:
    """A new network's genesis from its validators' public keys, with a shipped network's model
    and the shipped corpus (copied beside the file)."""
    import dataclasses
    import shutil

    from consensus.genesis import parse_genesis
    from genesis import GENESIS_DIR
    from genesis.build import (
        NETWORKS,
        ValidatorsError,
        genesis_document,
        parse_validator,
        read_validators_file,
        refuse_name_keys,
        refuse_public_shards,
        shipped_documents,
    )

    out: Path = args.out
    if out.exists():
        raise UserError(f"{out}: the file exists; not overwriting a genesis")
    if not out.resolve().parent.is_dir():
        raise UserError(f"{out}: no such directory {out.resolve().parent}")
    if is_devnet_chain_id(args.chain_id):
        raise UserError(
            f"--chain-id: got {args.chain_id!r}; chain ids beginning with {DEVNET_CHAIN_PREFIX!r} name INSECURE "
            "development networks, whose nodes take keys derived from public names: want another for a "
            "network of operators' keys"
        )
    timestamp = int(time.time()) if args.timestamp is None else args.timestamp
    try:
        accounts = [parse_validator(text) for text in args.validator or []]
        if args.validators_file is not None:
            accounts += read_validators_file(args.validators_file)
        refuse_name_keys(accounts)
        refuse_public_shards(accounts, shipped_documents())
        network = dataclasses.replace(NETWORKS[args.model], chain_id=args.chain_id)
        document = genesis_document(network, shipped_documents(), accounts, timestamp)
    except ValidatorsError as error:
        raise UserError(str(error)) from None
    genesis = parse_genesis(json.dumps(document).encode())  # every field checked before anything is written
    source = GENESIS_DIR / genesis.chunk_directory
    target = out.resolve().parent / genesis.chunk_directory
    if source.resolve() != target.resolve():
        target.mkdir(parents=True, exist_ok=True)
        for entry in genesis.dataset.documents:
            for digest in entry.chunks:
                if not (target / f"{digest}.xz").exists():
                    shutil.copyfile(source / f"{digest}.xz", target / f"{digest}.xz")
    write_json_atomically(out, document)
    written = load_genesis(out)
    for split in SPLITS:
        load_split(written.dataset, chunk_directory(out, written), split)
    return {
        "genesis": str(out),
        "chain_id": written.chain_id,
        "genesis_hash": written.hash,
        "model": args.model,
        "timestamp": written.timestamp,
        "validators": [account.public_key.hex() for account in written.accounts if account.stake],
        "total_stake": sum(account.stake for account in written.accounts),
        "chunk_directory": str(chunk_directory(out, written)),
    }


# --- a validator's held-out shard ---------------------------------------------------


def heldout_summary(shard: Shard, genesis: Genesis) -> dict[str, object]:
    """What `potchain heldout` prints: the commitment for the genesis validators file, the
    bytes a judged height reveals, and how many of the validator's judged heights the shard lasts."""
    per_test = genesis.evaluation.test_sequences
    return {"root": shard.root.hex(), "sequences": shard.count, "bytes_per_test": per_test * shard.sequence_bytes,
            "tests": shard.count // per_test}  # fmt: skip


def command_heldout_new(args: argparse.Namespace) -> dict[str, object]:
    """Cut a validator's private text into a held-out shard file (mode 0600)."""
    genesis = load_genesis(args.genesis)
    out: Path = args.out
    if out.exists() and not args.force:
        raise UserError(f"{out}: the file exists; not overwriting a held-out shard (--force replaces it)")
    if not out.resolve().parent.is_dir():
        raise UserError(f"{out}: no such directory {out.resolve().parent}")
    parts = []
    for path in args.text:
        try:
            parts.append(path.read_bytes())
        except OSError as error:
            raise UserError(f"{path}: cannot read the text ({error.strerror})") from None
    text = b"".join(parts)
    sequence_bytes = genesis.model.context + 1
    per_test = genesis.evaluation.test_sequences
    if len(text) < per_test * sequence_bytes:
        raise UserError(
            f"--text: got {len(text):,} bytes, want at least {per_test * sequence_bytes:,}: a test reveals "
            f"{per_test} sequences of {sequence_bytes} bytes (the model's context + 1)"
        )
    try:
        shard = shard_from_text(text, sequence_bytes)
    except ShardError as error:
        raise UserError(f"--text: {error}") from None
    save_shard(shard, out)
    return heldout_summary(shard, genesis)


def command_heldout_show(args: argparse.Namespace) -> dict[str, object]:
    """An existing shard file's commitment and how many tests it lasts."""
    genesis = load_genesis(args.genesis)
    try:
        shard = load_shard(args.path)
    except ShardError as error:
        raise UserError(str(error)) from None
    if shard.sequence_bytes != genesis.model.context + 1:
        raise UserError(
            f"{args.path}: sequences of {shard.sequence_bytes} bytes, want {genesis.model.context + 1} "
            f"(the context + 1 of {args.genesis})"
        )
    return heldout_summary(shard, genesis)


# --- looking at the model ------------------------------------------------------------


def float_weights_at(args: argparse.Namespace) -> bytes:
    """The float32 weights file (training/export.py) of the model after the decided block at
    --height (default: the head): from a node's RPC (--rpc), or from the store in a data
    directory no node runs on (--datadir, of the network --genesis)."""
    from p2p.rpc_client import RpcClient, RpcClientError
    from training.export import ModelOrigin, encode_float_weights
    from training.weights import SliceLayout

    if args.height is not None and args.height < 0:
        raise UserError(f"--height: got {args.height}, want a decided height (0 or more)")
    if args.rpc is not None:
        query = "" if args.height is None else f"&height={args.height}"
        try:
            with RpcClient(args.rpc) as client:
                return client.get_bytes(f"/v1/model/weights?format=float{query}")
        except RpcClientError as error:
            raise UserError(f"the node's RPC at {args.rpc}: {error}") from None
    genesis = load_genesis(args.genesis)
    if not (args.datadir / "chain").exists():
        raise UserError(f"{args.datadir}: no chain database here")
    first_state = genesis_state(genesis)
    try:
        db = ChainDB(args.datadir / "chain", bytes.fromhex(genesis.hash), genesis_block(genesis, first_state),
                     first_state)  # fmt: skip
    except CorruptStore as error:
        if "lock" not in str(error).lower():
            raise
        raise UserError(f"{error} (a node running on it holds it: ask its RPC with --rpc)") from None
    try:
        head = db.block(db.head()).header.height
        if args.height is not None and args.height > head:
            raise UserError(f"--height {args.height}: not decided yet, the head is at height {head}")
        block_hash = db.head() if args.height is None else db.canonical_hash(args.height)
        if block_hash is None:
            raise CorruptStore(f"{args.datadir}: no canonical block at height {args.height} below the head")
        block, state = db.block(block_hash), db.state(block_hash)
    finally:
        db.close()
    values = [np.frombuffer(content, dtype="<i2").astype(np.int16) for content in state.slices]
    weights = SliceLayout(genesis.model, genesis.partition).assemble(genesis.exponents, values)
    origin = ModelOrigin(genesis.chain_id, genesis.hash, block.header.height, block.hash.hex())
    return encode_float_weights(weights, origin)


def command_sample(args: argparse.Namespace) -> dict[str, object] | None:
    """Text from the chain's model at a height: its weights dequantized to float32, sampled on
    --device (training/sample.py). Prints the prompt and its continuation, or with --json the
    object POST /v1/model/sample answers."""
    from training.export import decode_float_weights
    from training.miner import resolve_device
    from training.model import GPT
    from training.sample import MAX_SEED, SampleSettings, check_prompt, sample_bytes

    device = resolve_device(args.device)
    seed = secrets.randbelow(MAX_SEED + 1) if args.seed is None else args.seed
    settings = SampleSettings(args.tokens, args.temperature, args.top_k, seed)
    prompt = check_prompt(args.prompt)
    exported = decode_float_weights(float_weights_at(args))
    model = GPT(exported.config)
    model.load_state_dict(dict(exported.tensors))
    model.to(device).eval()
    text = sample_bytes(model, prompt, settings).decode("utf-8", errors="replace")
    origin = exported.origin
    result: dict[str, object] = {"height": origin.height, "hash": origin.block_hash, "prompt": args.prompt,
                                 "text": text, "tokens": settings.tokens, "seed": seed}  # fmt: skip
    if args.json:
        return result
    print(f"[sample] height {origin.height} block {origin.block_hash[:16]} seed {seed}", file=sys.stderr)
    print(args.prompt + text, flush=True)
    return None


def command_export(args: argparse.Namespace) -> dict[str, object]:
    """The model at a height as a directory a PyTorch user loads (training/export.py):
    model.safetensors (float32), config.json, README.md and hf/ (transformers' GPT-2)."""
    from training.export import decode_float_weights, write_export

    data = float_weights_at(args)
    origin = decode_float_weights(data).origin
    files = write_export(args.out, data)
    return {
        "out": str(args.out),
        "chain_id": origin.chain_id,
        "height": origin.height,
        "hash": origin.block_hash,
        "files": [str(path.relative_to(args.out)) for path in files],
    }


def add_model_source(parser: argparse.ArgumentParser) -> None:
    """--rpc or --datadir (with --genesis), and --height: where `float_weights_at` reads a model."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--rpc", help="a node's RPC URL, e.g. http://127.0.0.1:8645")
    source.add_argument("--datadir", type=Path, help="a data directory no node runs on (its chain database)")
    parser.add_argument("--genesis", type=Path, default=DEVNET, help="with --datadir: the network's genesis")
    parser.add_argument("--height", type=int, help="a decided height (default: the head)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="potchain", description="A proof-of-training blockchain full node.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    evaluate = commands.add_parser("eval", help="canonical loss of a model on a seeded batch (one JSON line)")
    evaluate.add_argument("--genesis", type=Path, default=DEVNET, help="genesis file (default: the devnet)")
    evaluate.add_argument("--split", choices=SPLITS, default="validation")
    evaluate.add_argument("--seed", type=int, default=0, help="batch seed, a non-negative integer")
    evaluate.add_argument("--weights", type=Path, help="canonical weights (safetensors); default: genesis weights")
    evaluate.add_argument("--backend", choices=BACKENDS, help="default: cpu-fused on the CPU, torch-f64 on CUDA")
    evaluate.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    evaluate.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    evaluate.set_defaults(handler=command_eval)

    localnet = commands.add_parser("localnet", help="in-process voting network: devnet validators and a CPU miner")
    localnet.add_argument("--genesis", type=Path, default=DEVNET)
    localnet.add_argument("--datadir", type=Path, required=True, help="node data directory (created if missing)")
    localnet.add_argument("--finalize", type=int, default=10,
                          help="stop once this many decided heights confirmed an update")  # fmt: skip
    localnet.add_argument("--steps", type=int, default=TrainingConfig.steps, help="optimizer steps per mining attempt")
    localnet.add_argument("--attempts", type=int, default=8, help="mining attempts before giving up on a height")
    localnet.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    localnet.set_defaults(handler=command_localnet)

    replay = commands.add_parser("replay", help="re-validate the stored decided chain from genesis (one JSON line)")
    replay.add_argument("--genesis", type=Path, default=DEVNET)
    replay.add_argument("--datadir", type=Path, required=True)
    replay.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info")
    replay.add_argument("--log-format", choices=FORMATS, default="text",
                        help="progress and other log lines on stderr: text (key=value) or json")  # fmt: skip
    replay.set_defaults(handler=command_replay)

    run_node = commands.add_parser("node", help="run a full node on the network until SIGINT/SIGTERM")
    run_node.add_argument("--datadir", type=Path, required=True, help="chain database, node key, RPC token")
    run_node.add_argument("--config", type=Path, help="TOML file with any of the settings below")
    run_node.add_argument("--genesis", help=f"genesis file (default {DEVNET.name})")
    run_node.add_argument("--listen", help="libp2p listen multiaddr (default /ip4/127.0.0.1/tcp/0)")
    run_node.add_argument("--bootstrap", action="append", help="a peer's multiaddr with /p2p/ id (repeatable)")
    run_node.add_argument("--rpc-host", help="RPC bind address (default 127.0.0.1)")
    run_node.add_argument("--rpc-port", type=int, help="RPC port (default: any free port; see DATADIR/node.json)")
    run_node.add_argument("--mine", action="store_true", default=None, help="mine in this process")
    run_node.add_argument("--miner-key", help="devnet:NAME or a key file (default DATADIR/miner_key)")
    run_node.add_argument("--validator-key", action="append", help="devnet:NAME or a key file (repeatable)")
    run_node.add_argument("--heldout-file", action="append",
                          help="a validator key's private held-out shard (potchain heldout new), checked against its "
                               "commitment in genesis (repeatable)")  # fmt: skip
    run_node.add_argument("--key-passphrase-file", help="file holding the keystores' passphrase (default: ask)")
    run_node.add_argument("--device", choices=("cpu", "cuda"), help="the miner's device (default cpu)")
    run_node.add_argument("--steps", type=int, help="the miner's optimizer steps per attempt")
    run_node.add_argument("--threads", type=int, help="torch threads")
    run_node.add_argument("--proposal-wait", type=float, metavar="SECONDS",
                          help="as a height's proposer, wait up to this long for miners (default: genesis's "
                               "propose timeout; docs/spec.md, section 12)")  # fmt: skip
    run_node.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    run_node.add_argument("--log-format", choices=FORMATS, help="log lines: text (key=value, default) or json")
    run_node.add_argument("--admin-rpc", action="store_true", default=None,
                          help="simulations: serve /v1/admin/* with the token DATADIR/admin_token")  # fmt: skip
    run_node.add_argument("--adversary", help="SIMULATION ONLY (needs --admin-rpc): misbehave as this adversary")
    run_node.set_defaults(handler=command_node)

    mine = commands.add_parser("mine", help="mine against a node's RPC (a GPU box can mine for a remote node)")
    mine.add_argument("--rpc", required=True, help="the node's RPC URL, e.g. http://127.0.0.1:8645")
    mine.add_argument("--token", help="the node's RPC token")
    mine.add_argument("--token-file", type=Path, help="file holding the RPC token (the node's DATADIR/rpc_token)")
    mine.add_argument("--key", default="miner_key", help="devnet:NAME or a key file (created if missing)")
    mine.add_argument("--key-passphrase-file", type=Path, help="file holding the keystore's passphrase")
    mine.add_argument("--genesis", type=Path, default=DEVNET)
    mine.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    mine.add_argument("--steps", type=int, default=TrainingConfig.steps, help="optimizer steps per attempt")
    mine.add_argument("--threads", type=int, help="torch threads (per process)")
    mine.add_argument("--nproc", type=int, default=1,
                      help="train the one miner in this many processes with DistributedDataParallel (gloo on cpu, "
                           "nccl on cuda: one GPU each); the batch is nproc x 32 sequences")  # fmt: skip
    mine.add_argument("--blocks", type=int, help="stop after submitting this many blocks (default: run)")
    mine.add_argument("--state", type=Path, help="keep the miner's model and optimizer state in this file")
    mine.add_argument("--log-format", choices=FORMATS, default="text",
                      help="progress lines (tokens/s, training loss) on stderr: text (key=value) or json")  # fmt: skip
    mine.set_defaults(handler=command_mine)

    sim = commands.add_parser("sim", help="run a network scenario on real node processes; write its report")
    sim.add_argument(
        "--mode",
        choices=("process", "model"),
        default="process",
        help="process: real node processes (default); model: the real rules on a modeled network",
    )
    sim.add_argument("--scenario", type=Path, help="a scenario file (sim/scenarios/*.toml), process mode")
    sim.add_argument("--nodes", type=int, default=1000, help="model mode: nodes (default 1000)")
    sim.add_argument("--rounds", type=int, default=6, help="model mode: training blocks to finalize")
    sim.add_argument("--latency-ms", type=float, default=1.3, help="model mode: median link latency")
    sim.add_argument("--out", type=Path, required=True, help="node data, logs, report.json and report.html")
    sim.add_argument("--seed", type=int, help="override the scenario's seed (a run logs its seed)")
    sim.add_argument("--finalize", type=int, help="process mode: override the height the scenario runs to")
    sim.add_argument("--genesis", type=Path, default=DEVNET)
    sim.set_defaults(handler=command_sim)

    devnet = commands.add_parser("devnet", help="a local network of node processes on loopback")
    devnet.add_argument("--genesis", type=Path, default=DEVNET)
    devnet.add_argument("--nodes", type=int, default=4)
    devnet.add_argument("--miners", type=int, default=1, help="nodes 0..N-1 mine (default 1)")
    devnet.add_argument("--out", type=Path, required=True, help="data directories, logs and summary.json")
    devnet.add_argument("--finalize", type=int, help="stop once every node finalized this height (default: run)")
    devnet.add_argument("--steps", type=int, help="the miners' optimizer steps per attempt")
    devnet.add_argument("--threads", type=int, default=1, help="torch threads per node (default 1)")
    devnet.add_argument("--timeout", type=float, default=900, help="seconds to wait for --finalize")
    devnet.set_defaults(handler=command_devnet)

    keys = commands.add_parser("keys", help="create, import and show signing keys (encrypted keystores)")
    key_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="KEYS_COMMAND")
    keys_new = key_commands.add_parser("new", help="a fresh key in a new encrypted keystore")
    keys_new.add_argument("--out", type=Path, required=True, help="the keystore to write (must not exist)")
    keys_new.add_argument("--passphrase-file", type=Path, help="file holding the passphrase (default: ask twice)")
    keys_new.set_defaults(handler=command_keys_new)
    keys_show = key_commands.add_parser("show", help="a key file's public key (no passphrase needed)")
    keys_show.add_argument("path", type=Path, help="a keystore or a plaintext key file")
    keys_show.set_defaults(handler=command_keys_show)
    keys_import = key_commands.add_parser("import", help="encrypt a plaintext key file into a new keystore")
    keys_import.add_argument("--seed-file", type=Path, required=True, help="the plaintext key file (64 hex)")
    keys_import.add_argument("--out", type=Path, required=True, help="the keystore to write (must not exist)")
    keys_import.add_argument("--passphrase-file", type=Path, help="file holding the passphrase (default: ask twice)")
    keys_import.set_defaults(handler=command_keys_import)

    genesis_parser = commands.add_parser("genesis", help="make the genesis of a new network")
    genesis_commands = genesis_parser.add_subparsers(dest="genesis_command", required=True, metavar="GENESIS_COMMAND")
    genesis_new = genesis_commands.add_parser("new", help="a genesis from the validators' public keys")
    genesis_new.add_argument("--validator", action="append", metavar="PUBKEY_HEX:STAKE[:HELDOUT_ROOT:SEQUENCES]",
                             help="a validator's public key (potchain keys show), stake, and held-out commitment "
                                  "(potchain heldout new) (repeatable)")  # fmt: skip
    genesis_new.add_argument("--validators-file", type=Path,
                             help='JSON {"validators": [{"public_key": HEX, "stake": N, '
                                  '"heldout": {"root": HEX, "sequences": N}}, ...]} (heldout optional)')  # fmt: skip
    genesis_new.add_argument("--chain-id", required=True, help="the network's name, part of every signature")
    genesis_new.add_argument("--out", type=Path, required=True, help="the genesis file to write (must not exist)")
    genesis_new.add_argument("--model", choices=("devnet", "testnet"), default="testnet",
                             help="the shipped network whose model and timeouts to use (default testnet)")  # fmt: skip
    genesis_new.add_argument("--timestamp", type=int, help="genesis time, Unix seconds (default: now)")
    genesis_new.set_defaults(handler=command_genesis_new)

    heldout = commands.add_parser("heldout", help="a validator's private held-out shard: make one, show its root")
    heldout_commands = heldout.add_subparsers(dest="heldout_command", required=True, metavar="HELDOUT_COMMAND")
    heldout_new = heldout_commands.add_parser("new", help="cut private text into a shard file; print its commitment")
    heldout_new.add_argument("--genesis", type=Path, required=True,
                             help="the network's genesis (its context + 1 is the sequence length)")  # fmt: skip
    heldout_new.add_argument("--text", type=Path, action="append", required=True,
                             help="a file of private text, never published (repeatable, concatenated)")  # fmt: skip
    heldout_new.add_argument("--out", type=Path, required=True, help="the shard file to write (mode 0600)")
    heldout_new.add_argument("--force", action="store_true", help="replace an existing --out")
    heldout_new.set_defaults(handler=command_heldout_new)
    heldout_show = heldout_commands.add_parser("show", help="a shard file's commitment and how many tests it lasts")
    heldout_show.add_argument("path", type=Path, help="the shard file (potchain heldout new)")
    heldout_show.add_argument("--genesis", type=Path, required=True, help="the network's genesis")
    heldout_show.set_defaults(handler=command_heldout_show)

    sample = commands.add_parser("sample", help="text from the chain's model at a height, sampled on --device")
    add_model_source(sample)
    sample.add_argument("--prompt", required=True, help="the text to continue (its UTF-8 bytes)")
    sample.add_argument("--tokens", type=int, required=True, help=f"bytes to generate (1 to {MAX_NEW_TOKENS})")
    sample.add_argument("--temperature", type=float, default=DEFAULT_TEMPERATURE,
                        help=f"softmax temperature, more than 0 and at most {MAX_TEMPERATURE} "
                             f"(default {DEFAULT_TEMPERATURE})")  # fmt: skip
    sample.add_argument("--top-k", type=int, help="sample among the k likeliest bytes only (default: all)")
    sample.add_argument("--seed", type=int, help="the sampling seed (default: a random one, printed)")
    sample.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    sample.add_argument("--json", action="store_true", help="print POST /v1/model/sample's JSON object instead")
    sample.set_defaults(handler=command_sample)

    export = commands.add_parser("export", help="the model at a height as float32 files for PyTorch and transformers")
    add_model_source(export)
    export.add_argument("--out", type=Path, required=True,
                        help="directory for model.safetensors, config.json, README.md and hf/")  # fmt: skip
    export.set_defaults(handler=command_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    tune_memory_allocator()
    try:
        result = args.handler(args)
    except (UserError, GenesisError, ChunkError, WeightsError, CorruptStore, ValueError) as error:
        print(f"potchain: error: {error}", file=sys.stderr)
        return 2
    except (NodeFailure, StorageError, OSError) as error:  # a disk that failed: its reason, not a traceback
        print(f"potchain: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    if result is not None:
        print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
