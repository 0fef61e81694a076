"""The explorer (p2p/explorer/, served at /explorer by the node's RPC).

Its files are served with their content types and a Content-Security-Policy
that allows only the node itself, and `/` redirects to it. In headless
Chromium (Playwright), the page on a running network of two real node
processes shows recent blocks, the held-out loss by height and validators,
follows a new head through the event stream, and samples the model.

The browser is Playwright's Chromium (`playwright install chromium`) or, where
that download is not reachable, the system's (`apt-get install chromium`):
.ci/run sets up one of them. To regenerate the README's screenshot:

    POTCHAIN_EXPLORER_SCREENSHOT=docs/explorer.png POTCHAIN_EXPLORER_POINTS=6 \
        .venv/bin/pytest -q tests/test_explorer.py -k browser
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Browser, ConsoleMessage, Playwright, ViewportSize, sync_playwright
from playwright.sync_api import Error as PlaywrightError

from genesis import DEVNET
from p2p.decided_node import DecidedNode
from p2p.rpc import EXPLORER_FILES, LocalBackend, RpcServer
from sim.devnet import stop_all
from sim.processes import NodeProcess
from tests.test_rpc import conform

EXPLORER_DIRECTORY = Path(__file__).resolve().parent.parent / "p2p" / "explorer"
SCREENSHOT_ENVIRONMENT = "POTCHAIN_EXPLORER_SCREENSHOT"
"""A path to save the final screenshot to as well (the README's: docs/explorer.png)."""
POINTS_ENVIRONMENT = "POTCHAIN_EXPLORER_POINTS"
"""How many tested heights the chart must show before the checks go on (default 1; more for a screenshot)."""
VIEWPORT: ViewportSize = {"width": 1280, "height": 800}
SYSTEM_CHROMIUM = ("chromium", "chromium-browser", "google-chrome")


@dataclass
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes


def get(url: str, path: str) -> Answer:
    """One GET, redirects not followed."""
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=30)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return Answer(response.status, response.headers, response.read())
    finally:
        connection.close()


# --- The files, the redirect and the validators, on a node without a network ---------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, DecidedNode]]:
    node = DecidedNode(DEVNET, tmp_path_factory.mktemp("explorer-node"))
    server = RpcServer(LocalBackend(node), token="mining-token")
    port = server.start()
    yield f"http://127.0.0.1:{port}", node
    server.stop()
    node.close()


def test_root_redirects_to_the_explorer(served: tuple[str, DecidedNode]) -> None:
    url, _ = served
    answer = get(url, "/")
    assert answer.status == 302
    assert answer.headers["Location"] == "/explorer"


@pytest.mark.parametrize(
    ("path", "name", "content_type"),
    [
        ("/explorer", "index.html", "text/html"),
        ("/explorer/explorer.js", "explorer.js", "text/javascript"),
        ("/explorer/explorer.css", "explorer.css", "text/css"),
    ],
)
def test_explorer_files_are_served_with_their_content_types(
    served: tuple[str, DecidedNode], path: str, name: str, content_type: str
) -> None:
    url, _ = served
    answer = get(url, path)
    assert answer.status == 200
    assert answer.headers["Content-Type"] == f"{content_type}; charset=utf-8"
    assert EXPLORER_FILES[name] == content_type
    assert answer.body == (EXPLORER_DIRECTORY / name).read_bytes()
    policy = [directive.strip() for directive in answer.headers["Content-Security-Policy"].split(";")]
    assert "default-src 'self'" in policy
    assert not any(source in " ".join(policy) for source in ("http:", "https:", "data:", "*", "unsafe"))
    assert answer.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize("path", ["/explorer/index.html", "/explorer/other.js", "/explorer/..%2Fexplorer.css"])
def test_other_explorer_paths_are_json_404s(served: tuple[str, DecidedNode], path: str) -> None:
    url, _ = served
    answer = get(url, path)
    assert answer.status == 404
    assert answer.headers["Content-Type"].startswith("application/json")
    assert json.loads(answer.body)["error"].startswith("not found")


class References(HTMLParser):
    """Every src and href in a page."""

    def __init__(self) -> None:
        super().__init__()
        self.references: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.references += [value or "" for name, value in attrs if name in ("src", "href")]


def test_the_page_loads_only_the_nodes_own_files() -> None:
    parser = References()
    parser.feed((EXPLORER_DIRECTORY / "index.html").read_text(encoding="utf-8"))
    assert {"/explorer/explorer.js", "/explorer/explorer.css"} <= set(parser.references)
    assert all(reference.startswith(("/", "#")) and not reference.startswith("//") for reference in parser.references)
    script = (EXPLORER_DIRECTORY / "explorer.js").read_text(encoding="utf-8")
    assert "innerHTML" not in script and "eval(" not in script  # node data reaches the page as text only
    assert script.count("http") == 1 and "http://www.w3.org/2000/svg" in script  # a namespace, never fetched


def test_validators_are_the_heads_staked_accounts(served: tuple[str, DecidedNode]) -> None:
    url, node = served
    answer = get(url, "/v1/validators")
    assert answer.status == 200
    validators = json.loads(answer.body)
    document = json.loads(get(url, "/openapi.json").body)
    conform(validators, {"$ref": "#/components/schemas/Validators"}, document)
    head = node.head()
    staked = {address: account for address, account in head.state.accounts.items() if account.stake > 0}
    assert len(staked) == sum(1 for account in node.genesis.accounts if account.stake > 0) == 4
    assert len(validators["validators"]) == len(staked)
    assert validators["height"] == head.block.header.height + 1
    assert validators["head_hash"] == head.block.hash.hex()
    assert validators["total_stake"] == head.state.total_stake
    for entry in validators["validators"]:
        account = staked[bytes.fromhex(entry["address"])]
        assert (entry["stake"], entry["balance"]) == (account.stake, account.balance)
    ranked = [(-entry["stake"], entry["address"]) for entry in validators["validators"]]
    assert ranked == sorted(ranked)
    numerator = node.genesis.consensus.quorum_numerator
    denominator = node.genesis.consensus.quorum_denominator
    quorum = validators["quorum_stake"]
    assert quorum * denominator >= validators["total_stake"] * numerator > (quorum - 1) * denominator


# --- The page in a browser, on a running network ------------------------------------------------


def node_process(name: str, root: Path, *arguments: str, bootstrap: NodeProcess | None = None) -> NodeProcess:
    """A started `potchain node` process (call wait_started before using its RPC)."""
    flags = ["--rpc-port", "0", "--threads", "1", *arguments]
    if bootstrap is not None:
        flags += ["--bootstrap", bootstrap.address]
    process = NodeProcess(name, root / name, flags)
    process.start()
    return process


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    """A node that mines and holds the devnet's four validator keys (its heights need no other
    node's votes, so they come fast), and a node that follows it over libp2p (its peer)."""
    root = tmp_path_factory.mktemp("explorer-network")
    validators = [f"--validator-key=devnet:validator-{index}" for index in range(4)]
    miner = node_process("miner", root, "--mine", "--miner-key", "devnet:miner-0", "--steps", "10", *validators)
    processes = [miner]
    try:
        miner.wait_started()
        processes.append(node_process("follower", root, bootstrap=miner))  # it starts while the page loads
        yield processes
        processes[1].wait_started(timeout=1)
    finally:
        assert set(stop_all(processes).values()) == {0}


def heights_that_tested(node: NodeProcess) -> list[dict[str, Any]]:
    """The decided heights whose held-out test measured a training block."""
    heights: list[dict[str, Any]] = node.get("/v1/history/loss")["heights"]
    return [entry for entry in heights if entry["test_loss_before"] is not None]


def signed(gain: float) -> str:
    """A gain as the page writes it: sign, then four decimals."""
    return f"{'+' if gain >= 0 else '−'}{abs(gain):.4f}"  # noqa: RUF001 (the page writes a minus sign)


def launch_chromium(playwright: Playwright) -> Browser:
    """Playwright's own Chromium, or else the system's."""
    try:
        return playwright.chromium.launch()
    except PlaywrightError as error:
        for name in SYSTEM_CHROMIUM:
            path = shutil.which(name)
            if path is not None:
                return playwright.chromium.launch(executable_path=path)
        pytest.fail(f"no Chromium: run `playwright install chromium` or `apt-get install chromium` ({error})")


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


SNAPSHOT = """() => {
    const body = document.body;
    if (body.dataset.refreshing !== "false") return null;
    const heights = (selector) => [...document.querySelectorAll(selector)].map((node) => Number(node.dataset.height));
    return {
        headEvents: Number(body.dataset.headEvents || 0),
        lastHeadEvent: Number(body.dataset.lastHeadEvent || -1),
        chart: heights("#loss-chart circle.point-before"),
        blocks: heights("#blocks tbody tr[data-height]"),
    };
}"""
"""What the page shows once no refresh is under way (null while one is): the heads that came through
the event stream, the heights on the loss chart and in the block list."""


@pytest.mark.slow
def test_browser_shows_the_chain_live_and_samples_the_model(
    network: list[NodeProcess], browser: Browser, tmp_path: Path
) -> None:
    miner = network[0]
    points = int(os.environ.get(POINTS_ENVIRONMENT, "1"))
    page = browser.new_page(viewport=VIEWPORT)
    problems: list[str] = []
    page.on("pageerror", lambda error: problems.append(f"page error: {error}"))

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error" and "Content Security Policy" in message.text:
            problems.append(f"CSP: {message.text}")

    page.on("console", on_console)
    requested: list[str] = []
    page.on("request", lambda request: requested.append(urlsplit(request.url).path))
    page.goto(miner.rpc + "/")
    assert page.url == miner.rpc + "/explorer"
    page.wait_for_selector("body[data-loaded='true']", timeout=30_000)
    status = miner.get("/v1/status")
    assert page.text_content("#chain-id") == status["chain_id"]
    assert page.locator("#validators tbody tr").count() == 4

    # Heads arrive through the event stream, each one reloading the page's blocks and chart, until
    # the chart has a height that tested a training block.
    page.wait_for_function(
        "points => Number(document.body.dataset.headEvents || 0) >= 1"
        " && Number(document.querySelector('#loss-chart').dataset.points) >= points",
        arg=points,
        timeout=60_000 + 30_000 * points,
    )
    shown: dict[str, Any] = page.wait_for_function(SNAPSHOT, timeout=30_000).json_value()
    history = {entry["height"]: entry for entry in heights_that_tested(miner)}
    tested = set(history)
    last = shown["lastHeadEvent"]
    assert shown["headEvents"] >= 1 and last >= 1
    assert set(shown["chart"]) <= tested
    assert {height for height in tested if height <= last} <= set(shown["chart"])
    assert shown["blocks"][0] >= last and last in shown["blocks"]  # newest first, the streamed head among them
    # The verdicts' gains, in nats per byte, are the loss history's.
    entry = history[max(height for height in tested if height <= last)]
    row = page.text_content(f"#blocks tbody tr[data-height='{entry['height']}']") or ""
    for update in entry["confirmed"] + entry["rejected"]:
        test_gain = entry["test_loss_before"] - update["test_loss_after"]
        validation_gain = update["validation_loss_before"] - update["validation_loss_after"]
        assert f"test {signed(test_gain)} · validation {signed(validation_gain)}" in row, (update, row)
    assert ("Applied" in row) == bool(entry["applied"])
    assert row.count("Applied") == len(entry["applied"]) == len(entry["confirmed"])
    assert page.get_attribute("#live", "data-state") == "live"
    page.wait_for_selector("#peers tbody tr code", timeout=30_000)  # the follower, once connected
    signed_stake = page.evaluate(
        "() => [...document.querySelectorAll('#validators tbody tr[data-signed=true]')]"
        ".reduce((sum, row) => sum + Number(row.dataset.stake), 0)"
    )
    assert signed_stake >= miner.get("/v1/validators")["quorum_stake"]  # the head's certificate

    # Sampling: the model at the head continues the prompt.
    prompt = "ROMEO:"
    page.fill("#prompt", prompt)
    page.fill("#sample-tokens", "60")
    page.fill("#sample-seed", "7")
    page.click("#sample-button")
    page.wait_for_function(
        "prompt => document.querySelector('#sample-output').textContent.length > prompt.length",
        arg=prompt,
        timeout=60_000,
    )
    assert (page.text_content("#sample-output") or "").startswith(prompt)
    assert "Sampling failed" not in (page.text_content("#sample-info") or "")
    assert int(page.get_attribute("#sample-output", "data-height") or -1) >= last
    # Beside it, the genesis model's text for the same prompt and seed: the node's own answer at height 0.
    page.wait_for_function(
        "prompt => document.querySelector('#sample-genesis-output').textContent.length > prompt.length",
        arg=prompt,
        timeout=60_000,
    )
    assert page.get_attribute("#sample-genesis-output", "data-height") == "0"
    split = urlsplit(miner.rpc)
    connection = http.client.HTTPConnection(split.hostname or "127.0.0.1", split.port, timeout=60)
    request = {"prompt": prompt, "tokens": 60, "temperature": 0.8, "seed": 7, "height": 0}
    connection.request("POST", "/v1/model/sample", json.dumps(request), {"Content-Type": "application/json"})
    genesis_answer = json.loads(connection.getresponse().read())
    connection.close()
    assert page.text_content("#sample-genesis-output") == prompt + genesis_answer["text"]

    assert requested.count("/v1/status") == 1  # the chain id; the rest comes from reads that evaluate nothing
    assert not problems, problems
    page.screenshot(path=str(tmp_path / "explorer.png"))
    target = os.environ.get(SCREENSHOT_ENVIRONMENT)
    if target:
        page.screenshot(path=target)
    page.close()
