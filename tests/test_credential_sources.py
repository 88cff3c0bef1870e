"""Credential sources without sockets: refresh timing on an injected clock, one fetch for
concurrent callers, what a failed renewal leaves in use, and the config's union."""

from __future__ import annotations

import asyncio

import pytest

from mirror.config import (
    ConfigError,
    EcrCredentialsConfig,
    GcpCredentialsConfig,
    HelperCredentialsConfig,
    load_config,
)
from mirror.errors import UpstreamCredentialsUnavailable
from mirror.upstream.credentials import Credentials, _RefreshingSource, refresh_after


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


class ScriptedSource(_RefreshingSource):
    """Hands out `secret-N` valid `lifetime` seconds, or fails while `failing`."""

    def __init__(self, clock: Clock, lifetime: float = 100.0):
        super().__init__("up", clock)
        self.clock = clock
        self.lifetime = lifetime
        self.calls = 0
        self.failing = False
        self.release = asyncio.Event()
        self.release.set()

    async def _fetch(self) -> tuple[Credentials, float, float | None]:
        self.calls += 1
        await self.release.wait()
        if self.failing:
            raise UpstreamCredentialsUnavailable("scripted failure")
        now = self.clock()
        return (
            ("user", f"secret-{self.calls}"),
            now + refresh_after(self.lifetime),
            (now + self.lifetime),
        )


def test_tokens_are_replaced_well_before_they_expire() -> None:
    assert refresh_after(12 * 3600) == pytest.approx(12 * 3600 * 0.9)
    assert refresh_after(3600) == 3240
    assert refresh_after(10) == 5
    assert refresh_after(0) == 0


async def test_one_fetch_for_concurrent_callers_and_one_per_lifetime() -> None:
    clock = Clock()
    source = ScriptedSource(clock)
    source.release.clear()
    waiting = [asyncio.create_task(source.get()) for _ in range(10)]
    await asyncio.sleep(0)
    source.release.set()
    assert {await task for task in waiting} == {("user", "secret-1")}
    assert source.calls == 1
    clock.now += refresh_after(100) - 1
    assert await source.get() == ("user", "secret-1")
    clock.now += 2  # past the refresh time, before the expiry
    assert await source.get() == ("user", "secret-2")
    assert source.calls == 2
    assert source.state.expires_at == clock.now + 100


async def test_failed_renewal_keeps_an_unexpired_credential_but_not_a_refused_one() -> None:
    clock = Clock()
    source = ScriptedSource(clock)
    assert await source.get() == ("user", "secret-1")
    source.failing = True
    clock.now += refresh_after(100) + 1
    # Still valid: used on, and not asked again on every call.
    assert await source.get() == ("user", "secret-1")
    assert await source.get() == ("user", "secret-1")
    assert source.calls == 2
    assert source.state.errors == 1
    assert source.state.failing
    # Refused by the upstream: handing it out again would only be refused again.
    with pytest.raises(UpstreamCredentialsUnavailable, match="scripted failure"):
        await source.get(refresh=True)
    assert source.state.errors == 2
    source.failing = False
    assert await source.get() == ("user", "secret-4")
    assert not source.state.failing


def test_credentials_union_and_its_errors_name_the_key() -> None:
    config = load_config(
        None,
        upstreams={
            "a": {"url": "https://a", "credentials": {"helper": "ecr-login", "lifetime": "5m"}},
            "b": {
                "url": "https://b",
                "credentials": {"ecr": {"region": "eu-west-1", "registry_id": "123456789012"}},
            },
            "c": {"url": "https://c", "credentials": {"gcp": {}}},
        },
    )
    helper = config.upstreams["a"].credentials
    assert isinstance(helper, HelperCredentialsConfig)
    assert helper.lifetime == 300
    assert isinstance(config.upstreams["b"].credentials, EcrCredentialsConfig)
    assert isinstance(config.upstreams["c"].credentials, GcpCredentialsConfig)
    assert all(upstream.has_credentials for upstream in config.upstreams.values())

    with pytest.raises(ConfigError, match=r"upstreams\.a.*credentials: set either"):
        load_config(
            None,
            upstreams={
                "a": {
                    "url": "https://a",
                    "username": "u",
                    "password": "p",
                    "credentials": {"helper": "pass"},
                }
            },
        )
    with pytest.raises(ConfigError, match=r"upstreams\.a\.credentials.*helper name"):
        load_config(None, upstreams={"a": {"url": "https://a", "credentials": {"helper": "../x"}}})
    with pytest.raises(ConfigError, match=r"upstreams\.a\.credentials.*12-digit"):
        load_config(
            None,
            upstreams={
                "a": {
                    "url": "https://a",
                    "credentials": {"ecr": {"region": "us-east-1", "registry_id": "12"}},
                }
            },
        )
