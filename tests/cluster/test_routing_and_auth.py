"""Image affinity's ranking and the ingress's token principals, without a cluster."""

from __future__ import annotations

import itertools
from collections import Counter
from types import SimpleNamespace

import anyio
import pytest

from mcp_server.cluster.auth import parse_tokens, principal_for, principal_guard
from mcp_server.cluster.routing import rendezvous_order
from mcp_server.state import PRINCIPAL_SCOPE_KEY, request_principal


REPLICAS = ["r-a", "r-b", "r-c"]


def test_an_image_keeps_its_replica_and_keys_spread_over_all() -> None:
    keys = [f"{i:064x}" for i in range(600)]
    first = {key: rendezvous_order(key, REPLICAS)[0] for key in keys}
    assert first == {key: rendezvous_order(key, list(reversed(REPLICAS)))[0] for key in keys}  # order-free
    counts = Counter(first.values())
    assert set(counts) == set(REPLICAS) and min(counts.values()) > 150  # about a third each


def test_a_replica_leaving_moves_only_its_own_images() -> None:
    keys = [f"{i:064x}" for i in range(600)]
    before = {key: rendezvous_order(key, REPLICAS) for key in keys}
    after = {key: rendezvous_order(key, ["r-a", "r-c"])[0] for key in keys}
    for key in keys:
        if before[key][0] != "r-b":
            assert after[key] == before[key][0]  # images of the live replicas stay where their encodings are
        else:
            assert after[key] == next(r for r in before[key] if r != "r-b")  # the next-ranked takes over


def test_the_router_ranks_replicas_by_the_route_key_and_takes_turns_without_one() -> None:
    routing = pytest.importorskip("mcp_server.cluster.routing")
    pytest.importorskip("ray.serve")
    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=r)) for r in REPLICAS]
    router = SimpleNamespace(_turn=itertools.count())
    choose = routing.ImageAffinityRouter.choose_replicas

    async def ranks(key: str | None) -> list[str]:
        pending = SimpleNamespace(kwargs={} if key is None else {"route_key": key})
        chosen = await choose(router, replicas, pending)
        return [rank[0].replica_id.unique_id for rank in chosen]

    async def main() -> None:
        assert await ranks("ab" * 32) == rendezvous_order("ab" * 32, REPLICAS)
        assert len(await ranks("ab" * 32)) == 3  # every replica is a fallback, in order
        turns = [(await ranks(None))[0] for _ in range(6)]
        assert turns == REPLICAS * 2

    anyio.run(main)


TOKENS = "alice=aaaaaaaaaaaaaaaaaaaa, bob=bbbbbbbbbbbbbbbbbbbb"


def test_tokens_parse_to_principals_and_bad_entries_say_what_to_write() -> None:
    assert parse_tokens(TOKENS) == {"aaaaaaaaaaaaaaaaaaaa": "alice", "bbbbbbbbbbbbbbbbbbbb": "bob"}
    assert parse_tokens("") == {}
    with pytest.raises(ValueError, match="entry 2 must be principal=token") as short:
        parse_tokens("alice=aaaaaaaaaaaaaaaaaaaa,bob=short")
    assert "short" not in str(short.value)
    with pytest.raises(ValueError, match="repeats"):
        parse_tokens("a=aaaaaaaaaaaaaaaaaaaa,b=aaaaaaaaaaaaaaaaaaaa")


def test_a_request_gets_the_principal_of_its_token_or_a_401() -> None:
    tokens = parse_tokens(TOKENS)
    assert principal_for(tokens, b"Bearer bbbbbbbbbbbbbbbbbbbb") == "bob"
    assert principal_for(tokens, b"Bearer nope") is None
    assert principal_for(tokens, None) is None
    seen: list[object] = []

    async def app(scope, receive, send) -> None:
        seen.append(request_principal(SimpleNamespace(scope=scope)))

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    guarded = principal_guard(app, tokens)

    async def main() -> None:
        headers = [(b"authorization", b"Bearer aaaaaaaaaaaaaaaaaaaa")]
        await guarded({"type": "http", "headers": headers, "state": {"other": 1}}, None, send)
        forged = {"type": "http", "headers": [], "state": {PRINCIPAL_SCOPE_KEY: "alice"}}
        await guarded(forged, None, send)

    anyio.run(main)
    assert seen == ["principal:alice"]  # the forged scope never reached the app
    assert sent[0]["status"] == 401
