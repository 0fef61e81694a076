"""Looking at what the chain trained: sampling text from the model (GPT.generate,
POST /v1/model/sample, potchain sample) and exporting it as float32 files
(GET /v1/model/weights?format=float, potchain export), loaded with the lines the
export's README shows, into potchain's model and into transformers' GPT-2."""

from __future__ import annotations

import json
import re
import shutil
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import node
from chain.blocks import Block
from genesis import DEVNET
from p2p.decided_node import DecidedNode, mean_loss
from p2p.rpc import LocalBackend, RpcLimits, RpcServer
from tests.chain_builders import Scenario, decide_next
from tests.test_rpc import conform
from training.data import sample_batch, seed_from_int
from training.export import ExportError, decode_float_weights, hf_state_dict
from training.model import GPT, ModelConfig
from training.sample import MAX_NEW_TOKENS, SampleError, SampleSettings, sample_text
from training.weights import CanonicalWeights

PROMPT = "ROMEO:\nWhat light"


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(url: str, method: str = "GET", body: bytes | None = None) -> Reply:
    call = urllib.request.Request(url, data=body, method=method)
    if body is not None:
        call.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(call, timeout=60) as response:
            return Reply(response.status, response.headers, response.read())
    except urllib.error.HTTPError as error:
        with error:
            return Reply(error.code, error.headers, error.read())


@dataclass
class Viewed:
    """A decided node served over HTTP (genesis; height 1 applied an update; height 2 applied none),
    and a copy of its data directory taken while it was stopped."""

    node: DecidedNode
    url: str
    stopped: Path
    """A copy of the node's data directory (no node runs on it)."""
    first: Block
    """The decided block at height 1."""
    second: Block
    """The decided block at height 2, the head."""
    openapi: dict[str, Any]

    def weights(self, height: int) -> CanonicalWeights:
        block = self.node.block_at(height)
        assert block is not None
        state = self.node.state_of(block.hash)
        assert state is not None
        return self.node.weights_of(state)

    def sample(self, body: dict[str, Any] | bytes, url: str | None = None) -> Reply:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return request((url or self.url) + "/v1/model/sample", "POST", data)

    def refused(self, body: dict[str, Any] | bytes, status: int = 400) -> str:
        """The reason of a refused sample request, checked to be JSON {"error"} with `status`."""
        reply = self.sample(body)
        assert reply.status == status, (body, reply.status, reply.body[:300])
        assert list(reply.json()) == ["error"]
        return str(reply.json()["error"])


@pytest.fixture(scope="module")
def viewed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Viewed]:
    datadir = tmp_path_factory.mktemp("model-view")
    scenario = Scenario.create(datadir / "builder")
    keys = scenario.validators
    decided = DecidedNode(DEVNET, datadir / "node")
    genesis = decided.head()
    training = scenario.valid_training_block(genesis.block, genesis.state)
    assert decided.on_training_block(training)
    first = decide_next(decided, keys[0], keys[0:3], training)
    second = decide_next(decided, keys[1], keys[1:4], None)
    decided.close()
    shutil.copytree(datadir / "node", datadir / "stopped")
    served = DecidedNode(DEVNET, datadir / "node")
    assert served.head().block.hash == second.hash
    server = RpcServer(LocalBackend(served), token="token", limits=RpcLimits(sample_burst=1000))
    url = f"http://127.0.0.1:{server.start()}"
    openapi = request(url + "/openapi.json").json()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one byte at a time is faster on one thread, most of all on a loaded machine
    yield Viewed(served, url, datadir / "stopped", first, second, openapi)
    torch.set_num_threads(threads)
    server.stop()
    served.close()
    scenario.node.close()


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = node.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- GPT.generate ------------------------------------------------------------------------


def greedy(model: GPT, tokens: torch.Tensor, count: int) -> torch.Tensor:
    """The likeliest token after each prefix, the model seeing the last `context` tokens, without a cache."""
    context = model.config.context
    with torch.no_grad():
        for _ in range(count):
            logits = model(tokens[:, -context:])[:, -1, :]
            tokens = torch.cat((tokens, logits.argmax(dim=-1, keepdim=True)), dim=1)
    return tokens


def test_generate_is_deterministic_for_a_seed(viewed: Viewed) -> None:
    model = viewed.weights(2).to_model()
    prompt = torch.tensor([list(PROMPT.encode())])

    def run(seed: int, temperature: float = 0.8, top_k: int | None = None) -> list[int]:
        out = model.generate(prompt, 60, temperature, top_k, torch.Generator().manual_seed(seed))
        assert out.shape == (1, prompt.size(1) + 60) and torch.equal(out[:, : prompt.size(1)], prompt)
        return list(out[0].tolist())

    assert run(7) == run(7) and run(7, 1.5, 20) == run(7, 1.5, 20)
    assert run(7) != run(8)
    # top_k 1 keeps only the likeliest byte; a temperature so small it underflows is greedy too.
    assert run(1, top_k=1) == run(2, top_k=1) == greedy(model, prompt, 60)[0].tolist()
    assert run(3, temperature=5e-324) == greedy(model, prompt, 60)[0].tolist()
    # Among the top 3, every sampled byte is one of the 3 likeliest after its prefix.
    sampled = torch.tensor([run(4, temperature=2.0, top_k=3)])
    with torch.no_grad():
        logits = model(sampled[:, :-1])[0, prompt.size(1) - 1 :]  # the positions that predicted a sampled byte
    top3 = logits.topk(3).indices
    assert all(int(byte) in top3[i].tolist() for i, byte in enumerate(sampled[0, prompt.size(1) :]))


def test_the_cache_gives_the_full_forward_pass_and_generation_crops_to_the_context(viewed: Viewed) -> None:
    model = viewed.weights(2).to_model()
    context = model.config.context
    tokens = torch.tensor([list((PROMPT * 20).encode()[:context])])
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache()
        parts = [model(tokens[:, :50], cache)] + [model(tokens[:, i : i + 1], cache) for i in range(50, context)]
        assert cache[0].length == context
        with pytest.raises(ValueError, match="exceeds context"):
            model(tokens[:, :1], cache)
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)
    # Past the context the model sees the last `context` bytes: greedy decoding across the boundary.
    start = tokens[:, : context - 10]
    out = model.generate(start, 30, top_k=1, generator=torch.Generator().manual_seed(0))
    assert out.tolist() == greedy(model, start, 30).tolist()


def test_generate_and_sample_settings_refuse_bad_values(viewed: Viewed) -> None:
    model = viewed.weights(0).to_model()
    prompt = torch.tensor([[65, 66]])
    with pytest.raises(ValueError, match="temperature: got 0"):
        model.generate(prompt, 4, temperature=0)
    with pytest.raises(ValueError, match="top_k: got 0"):
        model.generate(prompt, 4, top_k=0)
    with pytest.raises(ValueError, match="time >= 1"):
        model.generate(torch.zeros((1, 0), dtype=torch.long), 4)
    cases: list[tuple[str, dict[str, Any]]] = [
        ("tokens: got 0", {"tokens": 0}),
        (f"tokens: got {MAX_NEW_TOKENS + 1}", {"tokens": MAX_NEW_TOKENS + 1}),
        ("temperature: got nan", {"tokens": 1, "temperature": float("nan")}),
        ("temperature: got 2.5", {"tokens": 1, "temperature": 2.5}),
        ("top_k: got 257", {"tokens": 1, "top_k": 257}),
        ("seed: got -1", {"tokens": 1, "seed": -1}),
    ]
    for field, settings in cases:
        with pytest.raises(SampleError, match=re.escape(field)):
            SampleSettings(**settings)
    with pytest.raises(SampleError, match="not UTF-8"):
        sample_text(viewed.weights(0), "\ud800", SampleSettings(tokens=1))


# --- POST /v1/model/sample ------------------------------------------------------------------


def test_sample_endpoint_samples_the_model_at_a_height(viewed: Viewed) -> None:
    body = {"prompt": PROMPT, "tokens": 40, "temperature": 0.9, "top_k": 50, "seed": 11}
    reply = viewed.sample(body)
    assert reply.status == 200, reply.body
    answer = reply.json()
    conform(answer, {"$ref": "#/components/schemas/Sample"}, viewed.openapi)
    settings = SampleSettings(tokens=40, temperature=0.9, top_k=50, seed=11)
    assert answer == {
        "height": 2,
        "hash": viewed.second.hash.hex(),
        "prompt": PROMPT,
        "text": sample_text(viewed.weights(2), PROMPT, settings),
        "tokens": 40,
        "seed": 11,
    }
    assert viewed.sample(body).json() == answer  # the same seed, the same text
    at_one = viewed.sample(body | {"height": 1}).json()
    assert (at_one["height"], at_one["hash"]) == (1, viewed.first.hash.hex())
    assert at_one["text"] == sample_text(viewed.weights(1), PROMPT, settings)
    # Without a seed the node draws one, and says which: asking with it gives the same text.
    drawn = viewed.sample({"prompt": "é", "tokens": 8}).json()
    assert 0 <= drawn["seed"] < 2**63 and drawn["prompt"] == "é"
    assert viewed.sample({"prompt": "é", "tokens": 8, "seed": drawn["seed"]}).json()["text"] == drawn["text"]


def test_sample_endpoint_refuses_bad_input_with_its_reason(viewed: Viewed) -> None:
    assert viewed.refused({"prompt": "a", "tokens": 1, "height": 3}, 404) == "no decided block at height 3"
    assert viewed.refused({"prompt": "a", "tokens": 1, "height": 2**70}, 404).startswith("no decided block")
    assert viewed.refused({"prompt": "a", "tokens": MAX_NEW_TOKENS + 1}) == "tokens: got 257, want 1 to 256"
    assert viewed.refused({"prompt": "a", "tokens": 0}).startswith("tokens: got 0")
    assert viewed.refused({"prompt": "a"}).startswith("tokens: missing")
    assert viewed.refused({"prompt": "a", "tokens": True}) == "tokens: got boolean true, want an integer"
    assert viewed.refused({"prompt": "a", "tokens": 2.5}) == "tokens: got number 2.5, want an integer"
    assert viewed.refused(b'{"prompt": "\xff\xfe", "tokens": 4}').startswith("body: not UTF-8")
    assert viewed.refused(b'{"prompt": "\\ud800", "tokens": 4}').startswith("prompt: not UTF-8 text")
    assert viewed.refused({"prompt": "", "tokens": 4}) == "prompt: empty, want at least one character"
    assert viewed.refused({"prompt": 5, "tokens": 4}) == "prompt: got integer 5, want a string"
    assert viewed.refused({"tokens": 4}) == "prompt: missing, want the text to continue"
    assert viewed.refused({"prompt": "a" * 1025, "tokens": 4}) == "prompt: 1025 characters, want at most 1024"
    assert viewed.refused({"prompt": "a", "tokens": 4, "temperature": 0}).startswith("temperature: got 0.0")
    assert viewed.refused({"prompt": "a", "tokens": 4, "temperature": 2.01}).startswith("temperature: got 2.01")
    assert viewed.refused(b'{"prompt": "a", "tokens": 4, "temperature": NaN}').startswith("temperature: got nan")
    assert viewed.refused({"prompt": "a", "tokens": 4, "temperature": "hot"}).startswith("temperature: got string")
    assert viewed.refused({"prompt": "a", "tokens": 4, "top_k": 0}) == "top_k: got 0, want 1 to 256"
    assert viewed.refused({"prompt": "a", "tokens": 4, "top_k": 300}) == "top_k: got 300, want 1 to 256"
    assert viewed.refused({"prompt": "a", "tokens": 4, "top_k": "5"}) == 'top_k: got string "5", want an integer'
    assert viewed.refused({"prompt": "a", "tokens": 4, "seed": -3}).startswith("seed: got -3")
    assert viewed.refused({"prompt": "a", "tokens": 4, "height": -1}).startswith("height: got -1")
    assert viewed.refused({"prompt": "a", "tokens": 4, "steps": 9}).startswith("body: unknown fields ['steps']")
    assert viewed.refused(b"[1, 2]").startswith("body: want a JSON object")
    assert viewed.refused(b"{") == "body: not JSON"
    # A whole-number float is an integer (as JSON Schema counts them).
    assert viewed.sample({"prompt": "a", "tokens": 3.0, "seed": 1}).json()["tokens"] == 3


def test_sample_endpoint_rate_limits_each_client(viewed: Viewed) -> None:
    assert (RpcLimits().sample_burst, RpcLimits().samples_per_minute) == (5, 20.0)  # as docs/node.md says
    limited = RpcServer(
        LocalBackend(viewed.node), token="token", limits=RpcLimits(sample_burst=2, samples_per_minute=1)
    )
    url = f"http://127.0.0.1:{limited.start()}"
    try:
        replies = [viewed.sample({"prompt": "a", "tokens": 2, "seed": n}, url) for n in range(4)]
    finally:
        limited.stop()
    assert [reply.status for reply in replies] == [200, 200, 429, 429]
    for reply in replies[2:]:
        assert 1 <= int(reply.headers["Retry-After"]) <= 60
        assert reply.json()["error"].startswith("rate-limited: 2 samples at once and 1 a minute per client")
        conform(reply.json(), {"$ref": "#/components/schemas/Error"}, viewed.openapi)


def test_sample_is_documented(viewed: Viewed) -> None:
    operation = viewed.openapi["paths"]["/v1/model/sample"]["post"]
    assert {"200", "400", "404", "429"} <= set(operation["responses"])
    assert "Retry-After" in operation["responses"]["429"]["headers"]
    request_schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert request_schema["required"] == ["prompt", "tokens"] and request_schema["additionalProperties"] is False
    formats = [p for p in viewed.openapi["paths"]["/v1/model/weights"]["get"]["parameters"] if p["name"] == "format"]
    assert formats[0]["schema"]["enum"] == ["canonical", "float"]


# --- potchain sample ------------------------------------------------------------------------


def test_sample_command_matches_the_endpoint(viewed: Viewed, capsys: pytest.CaptureFixture[str]) -> None:
    answer = viewed.sample({"prompt": PROMPT, "tokens": 30, "top_k": 40, "seed": 5, "height": 1}).json()
    base = ["sample", "--prompt", PROMPT, "--tokens", "30", "--top-k", "40", "--seed", "5"]
    code, out, _ = run_cli([*base, "--rpc", viewed.url, "--height", "1", "--json"], capsys)
    assert code == 0 and json.loads(out) == answer
    code, out, _ = run_cli([*base, "--datadir", str(viewed.stopped), "--height", "1", "--json"], capsys)
    assert code == 0 and json.loads(out) == answer
    # Plain: the prompt and its continuation; the height, block and seed on stderr.
    code, out, err = run_cli([*base, "--rpc", viewed.url, "--height", "1"], capsys)
    assert code == 0 and out == PROMPT + answer["text"] + "\n"
    assert f"height 1 block {viewed.first.hash.hex()[:16]} seed 5" in err
    # The head by default; without --seed, a random one, printed.
    code, out, err = run_cli(["sample", "--prompt", PROMPT, "--tokens", "30", "--datadir", str(viewed.stopped)], capsys)
    drawn = re.search(f"height 2 block {viewed.second.hash.hex()[:16]} seed ([0-9]+)", err)
    assert code == 0 and drawn is not None
    seeded = ["sample", "--prompt", PROMPT, "--tokens", "30", "--seed", drawn.group(1), "--rpc", viewed.url, "--json"]
    code, again, _ = run_cli(seeded, capsys)
    assert code == 0 and PROMPT + json.loads(again)["text"] + "\n" == out


def test_sample_command_refuses_bad_input(viewed: Viewed, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["sample", "--prompt", "a", "--tokens", "4"]
    for argv, reason in [
        ([*base, "--datadir", str(viewed.stopped), "--height", "9"], "--height 9: not decided yet, the head is at "
         "height 2"),
        ([*base, "--rpc", viewed.url, "--height", "9"], "HTTP 404: no decided block at height 9"),
        (["sample", "--prompt", "a", "--tokens", "300", "--rpc", viewed.url], "tokens: got 300, want 1 to 256"),
        ([*base, "--temperature", "0", "--rpc", viewed.url], "temperature: got 0.0"),
        ([*base, "--top-k", "0", "--rpc", viewed.url], "top_k: got 0, want 1 to 256"),
        (["sample", "--prompt", "", "--tokens", "4", "--rpc", viewed.url], "prompt: empty"),
        ([*base, "--datadir", str(viewed.stopped / "nothing")], "no chain database here"),
        ([*base, "--datadir", str(viewed.node.datadir)], "a node running on it holds it"),
    ]:  # fmt: skip
        code, out, err = run_cli(argv, capsys)
        assert (code, out) == (2, ""), (argv, code, out, err)
        assert reason in err, (argv, err)


# --- Float weights and the export ------------------------------------------------------------


def test_float_weights_endpoint_holds_the_canonical_values(viewed: Viewed) -> None:
    reply = request(viewed.url + "/v1/model/weights?format=float&height=1")
    assert reply.status == 200
    assert reply.headers["Content-Disposition"] == 'attachment; filename="potchain-1-float32.safetensors"'
    model = decode_float_weights(reply.body)
    genesis = viewed.node.genesis
    assert model.config == genesis.model
    assert (model.origin.chain_id, model.origin.genesis_hash) == (genesis.chain_id, genesis.hash)
    assert (model.origin.height, model.origin.block_hash) == (1, viewed.first.hash.hex())
    canonical = viewed.weights(1)
    for name, values in canonical.tensors.items():
        expected = values.astype(np.float64) * 2.0 ** -canonical.exponents[name]
        assert np.array_equal(model.tensors[name].numpy().astype(np.float64), expected), name
    head = decode_float_weights(request(viewed.url + "/v1/model/weights?format=float").body)
    assert head.origin.block_hash == viewed.second.hash.hex()
    refused = request(viewed.url + "/v1/model/weights?format=half")
    assert (refused.status, refused.json()) == (400, {"error": "format: 'half', want 'canonical' or 'float'"})
    assert request(viewed.url + "/v1/model/weights?format=float&height=7").status == 404
    with pytest.raises(ExportError, match="metadata format"):
        decode_float_weights(request(viewed.url + "/v1/model/weights?height=1").body)  # the int16 file


def python_blocks(readme: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)


def test_export_loads_with_the_readme_lines_and_reproduces_the_validation_loss(
    viewed: Viewed, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "export"
    code, printed, _ = run_cli(["export", "--datadir", str(viewed.stopped), "--height", "1", "--out", str(out)], capsys)
    assert code == 0
    summary = json.loads(printed)
    assert summary == {
        "out": str(out),
        "chain_id": viewed.node.genesis.chain_id,
        "height": 1,
        "hash": viewed.first.hash.hex(),
        "files": ["model.safetensors", "config.json", "README.md", "hf/config.json", "hf/model.safetensors"],
    }
    config = json.loads((out / "config.json").read_text())
    assert config["origin"]["block_hash"] == viewed.first.hash.hex() and config["layernorm_eps"] == 1e-5

    # The README's first block loads the model; run as written, from the export directory.
    readme = (out / "README.md").read_text()
    load_block, sample_block, _ = python_blocks(readme)
    assert load_block in python_blocks((Path(__file__).parent.parent / "docs" / "node.md").read_text())
    monkeypatch.chdir(out)
    scope: dict[str, Any] = {}
    exec(load_block, scope)
    model = scope["model"]
    assert isinstance(model, GPT)

    # Its validation loss on the report batch is the chain's canonical one, to float precision.
    genesis, chain = viewed.node.genesis, viewed.node.chain
    sequences, context = genesis.evaluation.validation_sequences, genesis.model.context
    inputs, targets = sample_batch(chain.validation_text, seed_from_int(0), sequences, context)
    with torch.no_grad():
        loss = float(model.loss(inputs, targets))
    state = viewed.node.state_of(viewed.first.hash)
    assert state is not None
    canonical = mean_loss(chain, state, "validation")
    assert abs(loss - canonical) < 1e-4, (loss, canonical)

    # The README's sampling lines run on it.
    exec(sample_block, scope)
    assert capsys.readouterr().out.startswith("ROMEO:")

    # The export from a node's RPC holds the same model.
    from_rpc = tmp_path / "from-rpc"
    code, _, _ = run_cli(["export", "--rpc", viewed.url, "--height", "1", "--out", str(from_rpc)], capsys)
    assert code == 0
    ours = decode_float_weights((out / "model.safetensors").read_bytes())
    theirs = decode_float_weights((from_rpc / "model.safetensors").read_bytes())
    assert ours.origin == theirs.origin and ours.config == theirs.config
    assert all(torch.equal(ours.tensors[name], theirs.tensors[name]) for name in ours.tensors)
    assert (from_rpc / "README.md").read_text() == readme


def test_transformers_gpt2_reproduces_our_logits(
    viewed: Viewed, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import GPT2LMHeadModel

    out = tmp_path / "export"
    code, _, _ = run_cli(["export", "--datadir", str(viewed.stopped), "--out", str(out)], capsys)
    assert code == 0
    loaded: Any = GPT2LMHeadModel.from_pretrained(str(out / "hf"), output_loading_info=True)
    hf, loading = loaded
    assert all(not keys for keys in loading.values()), loading  # nothing missing, unexpected or mismatched
    hf.eval()
    ours = viewed.weights(2).to_model()
    tokens = torch.tensor([list((PROMPT * 10).encode()[: ours.config.context]), list(b"x" * ours.config.context)])
    with torch.no_grad():
        expected = ours(tokens)
        got = hf(tokens).logits
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-4), float((got - expected).abs().max())

    # The README's transformers lines, as written.
    monkeypatch.chdir(out)
    scope: dict[str, Any] = {}
    exec(python_blocks((out / "README.md").read_text())[2], scope)
    assert torch.allclose(scope["logits"][0], ours(torch.tensor([list(b"ROMEO:")]))[0], atol=1e-4)


def test_hf_state_dict_transposes_linears_and_zeroes_biases() -> None:
    config = ModelConfig(vocab_size=256, context=8, layers=1, heads=2, width=4)
    tensors = {name: torch.randn(shape) for name, shape in config.tensor_shapes().items()}
    state = hf_state_dict(config, tensors)
    assert torch.equal(state["transformer.h.0.mlp.c_fc.weight"], tensors["h.0.mlp.c_fc.weight"].t())
    assert state["transformer.h.0.attn.c_attn.weight"].shape == (4, 12)
    assert not any(bool(state[name].any()) for name in state if name.endswith(".bias"))
    assert "lm_head.weight" not in state  # tied to the token embedding
