"""Tenancy's pure parts: the tenants file and its checks, scopes, the shared limit book, usage, weighted-fair
admission, and the router narrowed to a tenant's experts."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest

from expertserve.serve.http.auth import KeyCheck
from expertserve.tenancy.config import (
    Tenant,
    TenantsError,
    build,
    check_file,
    key_digest,
    parse_section,
)
from expertserve.tenancy.fair import FairGate
from expertserve.tenancy.limits import WINDOW_S, LimitBook, UsageBook, reset_text

TEAM_A = {
    "keys": ["sk-team-a-1"],
    "experts": ["expert-sql", "expert-js*"],
    "base_model": False,
    "limits": {"requests_per_minute": 60, "tokens_per_minute": 20000, "max_concurrent": 4},
    "expert_limits": {"expert-sql": {"requests_per_minute": 10}},
    "weight": 1,
}


def _tenants(**extra: dict) -> dict[str, Tenant]:
    return parse_section({"tenants": {"team-a": TEAM_A, **extra}}, source="t")


def test_the_issue_shape_loads_and_keys_resolve_by_digest_only() -> None:
    b_key = "sk-team-b"
    tenants = build(
        _tenants(**{"team-b": {"key_sha256": [hashlib.sha256(b_key.encode()).hexdigest()]}}),
        ["legacy"],
        "adm",
        source="t",
    )
    assert tenants.find(b"sk-team-a-1") == "team-a"
    assert tenants.find(b_key.encode()) == "team-b"
    assert tenants.find(b"legacy") == "default"  # api_keys: the tenant `default` with every expert
    assert tenants.find(b"adm") is None and tenants.find(b"nope") is None and tenants.find(None) is None
    assert "sk-team-a-1" not in repr(tenants.by_digest)  # only digests are looked up
    a = tenants.get("team-a")
    assert a.permits("expert-sql") and a.permits("expert-json") and a.permits("expert-js2")
    assert not a.permits("expert-typescript") and not a.permits(None)
    assert tenants.get("default").permits("anything") and tenants.get("default").permits(None)
    assert tenants.get("team-b").permits("x") and tenants.get("team-b").weight == 1.0


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        (
            {"team-a": {**TEAM_A, "limits": {"requests_per_minute": 0}}},
            "tenants.team-a.limits.requests_per_minute",
        ),
        ({"team-a": {**TEAM_A, "limits": {"rpm": 5}}}, "tenants.team-a.limits.rpm: unknown field"),
        ({"team-a": {**TEAM_A, "weight": 0}}, "tenants.team-a.weight"),
        (
            {"team-a": {**TEAM_A, "key_sha256": ["abc"]}},
            "tenants.team-a.key_sha256: key_sha256[0]: expected 64",
        ),
        ({"team-a": {**TEAM_A, "keys": ["null"]}}, "tenants.team-a.keys: keys[0]: an empty or null key"),
        ({"team-a": {**TEAM_A, "keys": ["k\n"]}}, "tenants.team-a.keys: keys[0]: a key with spaces"),
        ({"team-a": {**TEAM_A, "base_model": "maybe"}}, "tenants.team-a.base_model"),
    ],
)
def test_bad_sections_name_the_tenant_and_field(section: dict, expected: str) -> None:
    with pytest.raises(TenantsError) as info:
        parse_section({"tenants": section}, source="f.yaml")
    assert any(p.startswith(expected) for p in info.value.problems), info.value.problems
    assert "k\n" not in str(info.value)  # values under keys are never shown


def test_a_key_in_two_tenants_the_admin_key_and_bad_names_are_config_errors() -> None:
    twice = _tenants(**{"team-b": {"keys": ["sk-team-a-1"]}})
    with pytest.raises(TenantsError, match="tenants.team-b: a key is also a key of tenant 'team-a'"):
        build(twice, source="t")
    hashed = _tenants(**{"team-b": {"key_sha256": [key_digest("sk-team-a-1")]}})
    with pytest.raises(TenantsError, match="a key belongs to one tenant"):
        build(hashed, source="t")
    with pytest.raises(TenantsError, match="the admin key is never a tenant key"):
        build(_tenants(), admin_key="sk-team-a-1", source="t")
    with pytest.raises(TenantsError, match="a tenant name is"):
        build(parse_section({"tenants": {"team a!": {"keys": ["x"]}}}, source="t"), source="t")
    with pytest.raises(TenantsError, match="no keys"):
        build(parse_section({"tenants": {"empty": {}}}, source="t"), source="t")
    with pytest.raises(TenantsError, match="taken by api_keys"):
        build(parse_section({"tenants": {"default": {"keys": ["x"]}}}, source="t"), ["y"], source="t")


def test_the_server_config_refuses_what_the_tenants_file_check_refuses(tmp_path: Path) -> None:
    from expertserve.serve.config import ConfigError, ServeConfig

    with pytest.raises(Exception, match="a key is also a key of tenant"):
        ServeConfig.model_validate({"tenants": {"a": {"keys": ["k"]}, "b": {"keys": ["k"]}}})
    (tmp_path / "c.yaml").write_text("tenants: {a: {keys: [secret-key], limits: {rpm: 1}}}\n")
    with pytest.raises(ConfigError) as info:
        ServeConfig.from_file(tmp_path / "c.yaml")
    assert "tenants.a.limits.rpm: unknown setting" in str(info.value) and "secret-key" not in str(info.value)
    # Tenant keys turn auth on: a host beyond loopback needs no allow_no_auth then.
    assert ServeConfig.model_validate({"host": "0.0.0.0", "tenants_file": "/x.yaml"}).has_keys()


def test_tenants_files_yaml_and_json_checked_offline(tmp_path: Path) -> None:
    good = tmp_path / "tenants.yaml"
    good.write_text("tenants:\n  team-a:\n    keys: [sk-1]\n    experts: ['expert-*']\n")
    assert check_file(good).find(b"sk-1") == "team-a"
    (tmp_path / "t.json").write_text('{"tenants": {"team-b": {"keys": ["sk-2"], "weight": 3}}}')
    assert check_file(tmp_path / "t.json").get("team-b").weight == 3
    for text, expected in (
        ("tenants: [1, 2]", "tenants: input should be a valid dictionary"),
        ("- a list", "expected a mapping with a 'tenants' key"),
        ("tenants: {a: {keys: [k]}}\n  bad: [", "cannot read it"),
    ):
        (tmp_path / "bad.yaml").write_text(text)
        with pytest.raises(TenantsError) as info:
            check_file(tmp_path / "bad.yaml")
        assert any(expected in p for p in info.value.problems), info.value.problems
    with pytest.raises(TenantsError, match="tenants file not found"):
        check_file(tmp_path / "missing.yaml")


def test_the_auth_check_finds_the_tenant_of_a_key() -> None:
    check = KeyCheck(build(_tenants(), ["legacy"], "adm", source="t"), "adm")
    assert check.check("inference", "Bearer sk-team-a-1", "10.0.0.1").tenant == "team-a"
    assert check.check("inference", "Bearer legacy", "10.0.0.1").tenant == "default"
    assert check.check("admin", "Bearer adm", "10.0.0.1").tenant is None


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


RPM = [(("tenant", "a"), {"requests_per_minute": 3})]


def test_requests_per_minute_slide_and_name_the_limit() -> None:
    clock = Clock()
    book = LimitBook(clock)
    answers = [book.admit(f"t{i}", RPM, 10) for i in range(4)]
    assert [a["admitted"] for a in answers] == [True, True, True, False]
    assert [a["headers"]["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0", "0"]
    refused = answers[-1]
    assert (
        refused["limit"] == "requests_per_minute" and refused["value"] == 3 and refused["retry_after"] == 60
    )
    assert refused["headers"]["x-ratelimit-limit-requests"] == "3"
    clock.now += 30  # no new place yet: the window slides, it does not reset at a minute boundary
    assert not book.admit("t5", RPM, 10)["admitted"]
    clock.now += WINDOW_S - 30
    assert book.admit("t6", RPM, 10)["admitted"]


def test_tokens_count_the_estimate_then_what_the_request_used() -> None:
    clock = Clock()
    book = LimitBook(clock)
    tpm = [(("tenant", "a"), {"tokens_per_minute": 1000})]
    assert book.admit("t1", tpm, 900)["admitted"]
    refused = book.admit("t2", tpm, 200)
    assert not refused["admitted"] and refused["limit"] == "tokens_per_minute"
    book.finish("t1", 150)  # it used 150 of its 900
    ok = book.admit("t3", tpm, 200)
    assert ok["admitted"] and ok["headers"]["x-ratelimit-remaining-tokens"] == "650"
    too_big = book.admit("t4", tpm, 5000)
    assert not too_big["admitted"] and too_big["retry_after"] == 60


def test_concurrency_is_held_until_the_end_and_lapses_without_renewal() -> None:
    clock = Clock()
    book = LimitBook(clock)
    both = [(("tenant", "a"), {"max_concurrent": 1}), (("expert", "a", "x"), {"requests_per_minute": 5})]
    assert book.admit("t1", both, 1)["admitted"]
    refused = book.admit("t2", both, 1)
    assert refused["limit"] == "max_concurrent" and refused["scope"] == "tenant 'a'"
    book.finish("t1", 1)
    assert book.admit("t3", both, 1)["admitted"]
    clock.now += 20
    book.renew(["t3"])
    clock.now += 20
    assert not book.admit("t4", both, 1)["admitted"]  # renewed 20 s ago: still running
    clock.now += 15
    assert book.admit("t5", both, 1)["admitted"]  # t3's replica went silent: its ticket lapsed


def test_a_per_expert_limit_binds_on_top_of_the_tenants() -> None:
    book = LimitBook(Clock())
    scopes = [
        (("tenant", "a"), {"requests_per_minute": 60}),
        (("expert", "a", "sql"), {"requests_per_minute": 2}),
    ]
    answers = [book.admit(f"t{i}", scopes, 1) for i in range(3)]
    assert [a["admitted"] for a in answers] == [True, True, False]
    assert answers[2]["scope"] == "tenant 'a' on expert 'sql'"
    assert answers[1]["headers"]["x-ratelimit-limit-requests"] == "2"  # the scope with fewest left speaks


def test_reset_times_are_written_as_openai_writes_them() -> None:
    assert [reset_text(s) for s in (0.02, 1, 6.2, 60, 361)] == ["20ms", "1s", "7s", "1m0s", "6m1s"]


def test_usage_rows_merge_and_report_in_the_issue_shape() -> None:
    book, replica = UsageBook(), UsageBook()
    replica.add("team-a", "expert-sql", requests=1, ok=1, prompt_tokens=5, completion_tokens=7)
    replica.add("team-a", "expert-sql", rejected=1, rejected_requests_per_minute=1)
    book.merge(replica.take())
    assert replica.take() == []
    row = book.report()["tenants"]["team-a"]["experts"]["expert-sql"]
    assert row["requests"] == 1 and row["prompt_tokens"] == 5 and row["completion_tokens"] == 7
    assert row["rejected"] == 1 and row["rejected_requests_per_minute"] == 1


def test_fair_gate_lets_a_light_tenant_past_a_flooding_one() -> None:
    async def scenario() -> list[str]:
        gate = FairGate(2)
        order: list[str] = []

        async def request(tenant: str, weight: float = 1.0) -> None:
            await gate.enter(tenant, weight)
            order.append(tenant)
            await asyncio.sleep(0.01)
            gate.leave(tenant)

        flood = [asyncio.create_task(request("a")) for _ in range(20)]
        await asyncio.sleep(0)  # a's 20 are in: 2 running, 18 queued
        light = [asyncio.create_task(request("b")) for _ in range(2)]
        await asyncio.gather(*flood, *light)
        return order

    order = asyncio.run(scenario())
    assert len(order) == 22 and order.index("b") <= 3 and order[:6].count("b") == 2, order


def test_fair_gate_shares_by_weight_and_skips_clients_that_left() -> None:
    async def scenario() -> tuple[int, int, int]:
        gate = FairGate(1)
        served: list[str] = []

        async def request(tenant: str, weight: float) -> None:
            await gate.enter(tenant, weight)
            served.append(tenant)
            await asyncio.sleep(0.002)
            gate.leave(tenant)

        blocker = asyncio.create_task(request("x", 1))
        await asyncio.sleep(0)
        tasks = [asyncio.create_task(request("heavy", 3)) for _ in range(30)]
        tasks += [asyncio.create_task(request("light", 1)) for _ in range(30)]
        gone = asyncio.create_task(request("gone", 1))
        await asyncio.sleep(0)
        gone.cancel()
        await asyncio.gather(blocker, *tasks, return_exceptions=True)
        first = served[1:21]
        return first.count("heavy"), first.count("light"), gate.running

    heavy, light, running = asyncio.run(scenario())
    assert (
        heavy == 15 and light == 5 and running == 0
    )  # 3:1 while both wait; the cancelled waiter took no place


def test_while_two_tenants_are_active_a_flood_holds_only_its_share() -> None:
    async def scenario() -> tuple[int, int]:
        gate = FairGate(4)
        most_a_with_b = 0
        b_running = 0

        async def request(tenant: str, hold: float) -> None:
            nonlocal most_a_with_b, b_running
            await gate.enter(tenant, 1.0)
            b_running += tenant == "b"
            if b_running:
                most_a_with_b = max(most_a_with_b, gate.running_by.get("a", 0))
            await asyncio.sleep(hold)
            b_running -= tenant == "b"
            gate.leave(tenant)

        flood = [asyncio.create_task(request("a", 0.01)) for _ in range(40)]
        await asyncio.sleep(0)
        assert gate.running_by["a"] == 4  # alone: every place
        light = [asyncio.create_task(request("b", 0.05)) for _ in range(2)]
        await asyncio.gather(*flood, *light)
        return most_a_with_b, gate.running

    most, running = asyncio.run(scenario())
    assert most <= 3 and running == 0  # a drains to its share (2 of 4) while b runs; never more than it held


def test_quota_admits_refuses_counts_and_fails_closed() -> None:
    from expertserve.serve.errors import RequestError
    from expertserve.serve.metrics import Metrics
    from expertserve.serve.quota import Quota

    tenant = parse_section(
        {"tenants": {"t": {"keys": ["k"], "limits": {"requests_per_minute": 1, "max_concurrent": 1}}}},
        source="x",
    )["t"]
    metrics = Metrics()
    quota = Quota(metrics, app_name=None, places=(4, 4))

    async def scenario() -> None:
        ticket = await quota.admit("t", tenant, "expert-x", 10)
        assert ticket.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(RequestError) as info:
            await quota.admit("t", tenant, "expert-x", 10)
        error = info.value
        assert error.status == 429 and error.body()["error"]["type"] == "rate_limit_error"
        assert error.response_headers()["Retry-After"] and "max_concurrent" in error.message
        ticket.end("ok", {"prompt_tokens": 3, "completion_tokens": 4})
        ticket.end("ok", {"prompt_tokens": 3, "completion_tokens": 4})  # once only
        assert quota.gate is not None and quota.gate.running == 0

        async def broken(*args: object) -> None:
            raise ConnectionError("actor gone")

        working, quota.book.call = quota.book.call, broken
        with pytest.raises(RequestError) as info:
            await quota.admit("t", tenant, "expert-x", 10)
        assert info.value.status == 503 and info.value.code == "quota_unavailable"
        quota.book.call = working

    asyncio.run(scenario())
    row = asyncio.run(quota.report())["tenants"]["t"]["experts"]["expert-x"]
    assert row["requests"] == 1 and row["ok"] == 1 and row["completion_tokens"] == 4 and row["rejected"] == 1
    text = metrics.render().decode()
    assert 'expertserve_tenant_requests_total{expert="expert-x",outcome="rejected",tenant="t"} 1.0' in text
    assert (
        'expertserve_tenant_rejections_total{expert="expert-x",limit="max_concurrent",tenant="t"} 1.0' in text
    )


def test_the_gate_waits_for_what_the_engines_would_queue_then_refuses() -> None:
    from expertserve.serve.config import ServeConfig
    from expertserve.serve.ingress import fair_places
    from expertserve.tenancy.fair import GateFull

    default = ServeConfig()
    assert fair_places(default) == (
        32,
        64 + 128 - 32,
    )  # one engine: 32 sequences a step, 64 running + 128 queued
    small = ServeConfig.model_validate(
        {"replicas": {"max_ongoing_requests": 1, "max_queued_requests": 1, "ingress_replicas": 2}}
    )
    assert fair_places(small) == (1, 0)
    assert fair_places(ServeConfig.model_validate({"fairness": {"enabled": False}})) is None
    assert fair_places(ServeConfig.model_validate({"fairness": {"max_in_flight": 4}})) == (4, 188)

    async def scenario() -> None:
        gate = FairGate(1, max_waiting=1)
        await gate.enter("a", 1.0)
        waiting = asyncio.create_task(gate.enter("b", 1.0))
        await asyncio.sleep(0)
        with pytest.raises(GateFull):
            await gate.enter("c", 1.0)
        gate.leave("a")
        await waiting
        gate.leave("b")
        assert gate.running == 0 and gate.waiting == 0

    asyncio.run(scenario())


def test_a_cancelled_admission_counts_for_nothing() -> None:
    book = LimitBook(Clock())
    both = [(("tenant", "a"), {"requests_per_minute": 1, "max_concurrent": 1, "tokens_per_minute": 100})]
    assert book.admit("t1", both, 50)["admitted"]
    book.cancel("t1")
    answer = book.admit("t2", both, 100)
    assert answer["admitted"] and answer["headers"]["x-ratelimit-remaining-tokens"] == "0"


def test_a_tenants_file_without_keys_never_opens_the_server(tmp_path: Path) -> None:
    from expertserve.serve.config import ServeConfig
    from expertserve.serve.tenants import load

    empty = tmp_path / "tenants.yaml"
    empty.write_text("tenants: {}\n")
    config = ServeConfig.model_validate({"host": "0.0.0.0", "tenants_file": str(empty)})
    with pytest.raises(TenantsError, match="inference would need no key"):
        load(config)
    assert load(config.model_copy(update={"api_keys": ["k"]})).find(b"k") == "default"
    assert load(config.model_copy(update={"allow_no_auth": True})).open


def test_the_engine_schedules_by_the_tenants_fair_tags() -> None:
    """A served engine waits by priority (the fair tag), an evaluation engine first come first served; a later
    request of a flooding tenant gets a larger tag than a light tenant's first one."""
    from expertserve.engine.args import engine_kwargs
    from expertserve.engine.config import EngineConfig
    from expertserve.serve.metrics import Metrics
    from expertserve.serve.quota import Quota

    served = engine_kwargs(EngineConfig(), model_dir=Path("/m"), max_lora_rank=8, prefix_caching=None)
    batch = engine_kwargs(
        EngineConfig(), model_dir=Path("/m"), max_lora_rank=8, prefix_caching=None, batch=True
    )
    assert served["scheduling_policy"] == "priority" and "scheduling_policy" not in batch
    tenant = Tenant(keys=["k"])
    quota = Quota(Metrics(), app_name=None, places=(8, 8))

    async def scenario() -> list[int]:
        flood = [await quota.admit("a", tenant, "x", 1) for _ in range(5)]
        light = await quota.admit("b", tenant, "x", 1)
        return [t.priority for t in flood] + [light.priority]

    priorities = asyncio.run(scenario())
    assert priorities[:5] == sorted(priorities[:5]) and priorities[-1] < priorities[4]
