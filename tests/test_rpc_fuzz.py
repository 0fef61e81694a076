"""The RPC against its own OpenAPI document: schemathesis generates valid
requests from `/openapi.json` for every operation and sends them to a real
node's server (admin endpoints on), with no token, the mining token and the
admin token. Every answer must be documented and match its schema, no
request may get a 5xx, and no request the document calls valid may be
refused (positive-data acceptance: only 2xx, 401, 403, 404 and 409; and
the 302 of GET /, which redirects to the explorer).

The one exception is the body of `POST /v1/mining/submit` and
`POST /v1/mining/commitments`: the document can say it is a non-empty octet
string, not that it is a signed block or commitment that keeps every rule, so
there a generated body is expected to be refused with 400 (not a block or
commitment) or 422 (breaks a rule); tests/test_rpc.py submits real ones.

Derandomized and bounded (a few examples per operation) to stay fast.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import Case
from schemathesis.config import SchemathesisConfig
from schemathesis.core.result import Err
from schemathesis.generation import GenerationMode

from genesis import DEVNET
from p2p.decided_node import DecidedNode
from p2p.rpc import LocalBackend, RpcLimits, RpcServer
from tests.chain_builders import Scenario, decide_next

EXAMPLES = 12
"""Generated requests per operation and token (with the coverage phase's cases on top)."""


class Networked(LocalBackend):
    """A local node whose admin calls are kept (LocalBackend has no network and answers them 409)."""

    def __init__(self, node: DecidedNode) -> None:
        super().__init__(node)
        self.blocked: list[str] = []
        self.delay = 0.0

    def set_blocked_peers(self, peers: list[str]) -> None:
        self.blocked = peers

    def set_link_delay(self, seconds: float) -> None:
        self.delay = seconds

    def node_info(self) -> dict[str, object]:
        return super().node_info() | {"blocked_peers": sorted(set(self.blocked)), "link_delay_seconds": self.delay}


@dataclass
class Served:
    url: str
    tokens: dict[str, str]
    """Authorization headers' tokens by name: mining, admin."""


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    datadir = tmp_path_factory.mktemp("rpc-fuzz")
    scenario = Scenario.create(datadir / "builder")
    keys = scenario.validators
    node = DecidedNode(DEVNET, datadir / "node")
    genesis = node.head()
    training = scenario.valid_training_block(genesis.block, genesis.state)
    assert node.on_training_block(training)
    decide_next(node, keys[0], keys[0:3], training)
    decide_next(node, keys[1], keys[1:4], None)
    # Samples unlimited: a rate-limited valid request (429) would read as a refusal of valid data.
    limits = RpcLimits(sample_burst=10_000)
    server = RpcServer(Networked(node), token="mining-token", admin_token="admin-token", limits=limits)
    port = server.start()
    yield Served(f"http://127.0.0.1:{port}", {"mining": "mining-token", "admin": "admin-token"})
    server.stop()
    node.close()
    scenario.node.close()


def config() -> SchemathesisConfig:
    """Strict checks: no 5xx at all, and a valid request is refused only with 401/403/404/409
    (a 302 is GET /, which redirects to the explorer).
    An event stream (GET /v1/events) never ends: its first event (subscribed) is read and checked."""
    return SchemathesisConfig.from_dict(
        {
            "max-stream-events": 1,
            "checks": {
                "not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx"]},
                "positive_data_acceptance": {"expected-statuses": ["2xx", "302", "401", "403", "404", "409"]},
            },
        }
    )


FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def call_and_check(case: Case[Any], served: Served, token: str | None) -> None:
    headers = {} if token is None else {"Authorization": f"Bearer {served.tokens[token]}"}
    response = case.call(headers=headers, timeout=30)
    assert response.status_code < 500, (case.method, case.formatted_path, response.status_code, response.text[:300])
    binary = case.operation.path in ("/v1/mining/submit", "/v1/mining/commitments")
    if binary and token == "mining" and response.status_code in (400, 422):
        # A generated body is not a signed block or commitment that keeps every rule.
        assert case.body and response.json()["error"], (case.body, response.text)
        case.validate_response(response, excluded_checks=[_positive_data_acceptance()])
        return
    case.validate_response(response)


def fuzz(served: Served, token: str | None, mode: GenerationMode) -> list[str]:
    """Every operation of the served document, EXAMPLES generated requests each; the operations fuzzed."""
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json", config=config())
    fuzzed = []
    for result in schema.get_all_operations():
        assert not isinstance(result, Err), result
        operation = result.ok()

        @FUZZ_SETTINGS
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Case[Any]) -> None:
            call_and_check(case, served, token)

        run()
        fuzzed.append(f"{operation.method.upper()} {operation.path}")
    return fuzzed


@pytest.mark.parametrize("token", [None, "mining", "admin"])
def test_valid_requests_are_answered_as_documented(served: Served, token: str | None) -> None:
    fuzzed = fuzz(served, token, GenerationMode.POSITIVE)
    documented = documented_operations(served) - {"GET /openapi.json"}  # schemathesis leaves the document out
    assert set(fuzzed) == documented, documented ^ set(fuzzed)


def _positive_data_acceptance() -> Any:
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    return positive_data_acceptance


def documented_operations(served: Served) -> set[str]:
    """`METHOD /path` of every operation the served document lists: admin ones included."""
    with urllib.request.urlopen(served.url + "/openapi.json", timeout=30) as response:
        document = json.loads(response.read())
    assert {"/v1/admin/link-delay", "/v1/admin/blocked-peers", "/v1/mining/submit", "/v1/mining/commitments"} <= set(
        document["paths"]
    )
    assert set(document["components"]["securitySchemes"]) == {"bearer", "admin"}
    return {f"{method.upper()} {path}" for path, operations in document["paths"].items() for method in operations}
