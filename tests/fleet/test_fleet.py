"""Scale out: three replicas behind HAProxy with a shared Redis cache and shared API-key
limits, under steady load.

One fleet serves the whole module; each test starts from every process up and every replica
UP in HAProxy, and puts back what it stopped. The load sends a key with a generous limit, so
its limits are counted in Redis too.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from subprocess import Popen
from typing import Any

import httpx
import pytest

from ensemble_ops.access.keys import new_key

from ..conftest import process_env
from ..redis_server import RedisServer
from .harness import (
    DRAIN_DELAY_S,
    Fleet,
    HAProxy,
    Replica,
    fleet_config,
    wait_until,
)
from .load import SteadyLoad, describe

pytestmark = pytest.mark.e2e

RELOADED = "demo-tiny"
LOAD_KEY, LOAD_SHA = new_key()
METERED_KEY, METERED_SHA = new_key()
KEYS = (
    f'[[auth.keys]]\nname = "load"\nkey_sha256 = "{LOAD_SHA}"\nrpm = 1000000\n',
    # 12 a minute holds two requests: the fleet's third is refused wherever it lands.
    f'[[auth.keys]]\nname = "metered"\nkey_sha256 = "{METERED_SHA}"\nrpm = 12\n',
)
LOAD = {"Authorization": f"Bearer {LOAD_KEY}"}


@pytest.fixture(name="running_fleet", scope="module")
def _running_fleet(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("fleet")
    redis = RedisServer(directory / "redis")
    config = directory / "fleet.toml"
    config.write_text(fleet_config(demo_dir, KEYS))
    env = process_env() | {
        "XDG_CACHE_HOME": str(directory / "xdg"),
        "ENSEMBLE_OPS_CACHE__BACKEND": "redis",
        "ENSEMBLE_OPS_CACHE__URL": redis.url,
        # Three replicas and the load share 2 cores: 50 ms can pass with Redis healthy.
        "ENSEMBLE_OPS_CACHE__TIMEOUT_S": "0.5",
        "ENSEMBLE_OPS_SERVER__DRAIN_DELAY_S": str(DRAIN_DELAY_S),
    }
    replicas = [Replica(f"r{i}", directory, env, ("--config", str(config))) for i in range(3)]
    fleet = Fleet(redis, replicas, HAProxy(directory, replicas))
    try:
        fleet.start()
        yield fleet
    finally:
        codes = fleet.stop()
    assert set(codes.values()) <= {0}, codes


@pytest.fixture(name="fleet")
def _fleet(running_fleet: Fleet) -> Fleet:
    """The module's fleet with everything a previous test stopped started again."""
    running_fleet.ensure_up()
    return running_fleet


def _completion(url: str, prompt: str) -> httpx.Response:
    body = {"model": "demo-tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}
    answer = httpx.post(f"{url}/v1/completions", json=body, headers=LOAD, timeout=30)
    assert answer.status_code == 200, answer.text
    return answer


def _cache_health(replica: Replica, section: str = "cache") -> tuple[int, dict[str, Any]]:
    """``/health/llm/all``'s status code and its ``cache`` (or ``limits``) section."""
    answer = httpx.get(f"{replica.url}/health/llm/all", timeout=10)
    state: dict[str, Any] = answer.json().get(section, {})
    return answer.status_code, state


def _metric(replica: Replica, sample: str) -> float:
    """The value of one sample (name and labels exactly as exposed) on ``replica``."""
    text = httpx.get(f"{replica.url}/metrics", timeout=10).text
    values = [
        line.rpartition(" ")[2] for line in text.splitlines() if line.startswith(sample + " ")
    ]
    assert len(values) == 1, f"{sample}: {values}"
    return float(values[0])


def _wait_cache(replica: Replica, status: str, timeout_s: float, section: str = "cache") -> None:
    wait_until(
        lambda: _cache_health(replica, section)[1].get("status") == status,
        timeout_s,
        f"{replica.name}'s {section} to be {status}",
    )


def _shared_hit(fleet: Fleet) -> None:
    """A fresh deterministic answer from the first replica is a hit on the second."""
    first, second = fleet.replicas[:2]
    prompt = f"Shared {uuid.uuid4().hex[:8]}"
    miss = _completion(first.url, prompt)
    hit = _completion(second.url, prompt)
    assert (miss.headers.get("x-cache"), hit.headers.get("x-cache")) == ("MISS", "HIT")
    assert hit.json()["choices"] == miss.json()["choices"]


class TestSharedCache:
    def test_answer_cached_by_one_replica_is_a_hit_on_another(self, fleet: Fleet) -> None:
        """A deterministic answer one replica computed is served from Redis by another."""
        with SteadyLoad(fleet.url, headers=LOAD) as load:
            load.wait_served(5)
            _shared_hit(fleet)
        assert not load.lost(), describe(load.lost())

    def test_replicas_share_the_load(self, fleet: Fleet) -> None:
        """HAProxy spreads requests over all three replicas and the cache hits under load."""
        with SteadyLoad(fleet.url, headers=LOAD) as load:
            load.wait_for(
                lambda outcomes: (
                    {o.served_by for o in outcomes} >= {"r0", "r1", "r2"}
                    and any(o.cache == "HIT" for o in outcomes)
                ),
                "answers from every replica and a cache hit",
            )
        assert not load.lost(), describe(load.lost())


class TestRollingRestart:
    def test_rolling_restart_loses_no_request(
        self, fleet: Fleet, record_property: Callable[[str, object], None]
    ) -> None:
        """SIGTERM, exit 0, restart on the same port, UP again: one replica at a time,
        while requests keep flowing and none is lost."""
        codes: dict[str, int] = {}
        down_while_running: dict[str, bool] = {}
        windows: dict[str, tuple[float, float]] = {}
        with SteadyLoad(fleet.url, headers=LOAD) as load:
            load.wait_served(10)
            for replica in fleet.replicas:
                started = time.monotonic()
                process = replica.sigterm()

                def down_or_gone(name: str = replica.name, process: Popen[bytes] = process) -> bool:
                    return fleet.haproxy.server_status(name) == "DOWN" or process.poll() is not None

                wait_until(
                    down_or_gone,
                    DRAIN_DELAY_S + 30,
                    f"{replica.name} DOWN or gone",
                    interval_s=0.02,
                )
                down_while_running[replica.name] = process.poll() is None
                codes[replica.name] = process.wait(timeout=60)
                replica.start()
                replica.wait_ready()
                fleet.haproxy.wait_status(replica.name, "UP")
                windows[replica.name] = (started, time.monotonic())
            back = max(end for _, end in windows.values())
            load.wait_for(
                lambda outcomes: (
                    {o.served_by for o in outcomes if o.started > back} >= {"r0", "r1", "r2"}
                ),
                "answers from every restarted replica",
            )
        # The figures for the record (pytest --junitxml): requests sent, and lost.
        record_property("requests", len(load.outcomes()))
        record_property("lost", len(load.lost()))
        assert not load.lost(), describe(load.lost())
        assert codes == {"r0": 0, "r1": 0, "r2": 0}
        # Readiness fails at once on SIGTERM, so HAProxy stops routing before the process goes.
        assert down_while_running == {"r0": True, "r1": True, "r2": True}
        flowed = {name: len(load.served_between(*window)) for name, window in windows.items()}
        assert min(flowed.values()) >= 5, flowed


class TestRedisOutage:
    def test_redis_killed_loses_no_request_and_recovers(
        self, fleet: Fleet, record_property: Callable[[str, object], None]
    ) -> None:
        """With Redis gone requests still succeed (keyed ones too: each replica counts the
        key's limit on its own) and the cache and the limits report degraded; once Redis is
        back on its port both are healthy and shared again by themselves."""
        with SteadyLoad(fleet.url, headers=LOAD) as load:
            load.wait_served(10)
            fleet.redis.kill()
            for replica in fleet.replicas:
                _wait_cache(replica, "degraded", 15)
                status, cache = _cache_health(replica)
                assert status == 200
                assert cache["backend"] == "redis"
                assert cache["reason"]
                assert _metric(replica, 'llm_cache_backend_up{backend="redis"}') == 0
                assert _metric(replica, 'llm_cache_errors_total{backend="redis"}') > 0
                _wait_cache(replica, "degraded", 15, "limits")
                assert _metric(replica, 'llm_rate_limit_backend_up{backend="redis"}') == 0
            load.wait_served(20)  # the outage, under load
            fleet.redis.start()
            for replica in fleet.replicas:
                _wait_cache(replica, "healthy", 30)
                _wait_cache(replica, "healthy", 30, "limits")
                assert _metric(replica, 'llm_cache_backend_up{backend="redis"}') == 1
                assert _metric(replica, 'llm_rate_limit_backend_up{backend="redis"}') == 1
            _shared_hit(fleet)
        # The figures for the record (pytest --junitxml): requests sent, and lost.
        record_property("requests", len(load.outcomes()))
        record_property("lost", len(load.lost()))
        assert not load.lost(), describe(load.lost())


class TestRollingReload:
    def test_reload_one_replica_at_a_time_loses_no_request(
        self, fleet: Fleet, record_property: Callable[[str, object], None]
    ) -> None:
        """An admin reload of one member, replica after replica, completes on each (a new
        generation serves) and loses no request."""
        with SteadyLoad(fleet.url, headers=LOAD) as load:
            load.wait_served(10)
            for replica in fleet.replicas:
                before = _generation(replica)
                admin = replica.server.admin_url
                started = httpx.post(f"{admin}/admin/models/{RELOADED}/reload", timeout=10)
                assert started.status_code == 202, started.text
                since = started.json()["started_at"]
                status_url = f"{replica.url}/health/llm/reload/{RELOADED}"

                def ended(url: str = status_url, since: str = since) -> bool:
                    status = httpx.get(url, timeout=10).json()
                    return bool(
                        status["started_at"] == since and status["state"] in ("completed", "failed")
                    )

                wait_until(ended, 60, f"the reload on {replica.name}")
                status = httpx.get(status_url, timeout=10).json()
                assert (status["state"], status["progress_percent"]) == ("completed", 100), status
                assert _generation(replica) != before
            load.wait_served(10)
        # The figures for the record (pytest --junitxml): requests sent, and lost.
        record_property("requests", len(load.outcomes()))
        record_property("lost", len(load.lost()))
        assert not load.lost(), describe(load.lost())


def _generation(replica: Replica) -> int:
    members = httpx.get(f"{replica.server.admin_url}/admin/models", timeout=10).json()["models"]
    generation: int = next(m["generation"] for m in members if m["name"] == RELOADED)
    return generation


class TestSharedLimits:
    def test_the_replicas_enforce_one_limit(self, fleet: Fleet) -> None:
        """A key allowed two requests (rpm 12) gets one from each of two replicas; the
        third replica refuses the third with a 429 and the wait Redis computed."""
        metered = {"Authorization": f"Bearer {METERED_KEY}"}
        body = {"model": "demo-tiny", "prompt": "metered", "max_tokens": 2}
        answers = [
            httpx.post(f"{replica.url}/v1/completions", json=body, headers=metered, timeout=30)
            for replica in fleet.replicas
        ]
        assert [a.status_code for a in answers] == [200, 200, 429]
        assert answers[2].json()["error"]["code"] == "rate_limit_exceeded"
        assert 4 <= int(answers[2].headers["retry-after"]) <= 5
        assert (
            _metric(fleet.replicas[2], 'llm_rate_limited_total{key="metered",limit="requests"}')
            == 1
        )


class TestAdminBehindAProxy:
    @pytest.mark.parametrize("mode", ["http", "tcp"])
    def test_no_proxy_in_front_of_the_public_port_opens_the_admin_routes(
        self, fleet: Fleet, tmp_path: Path, mode: str
    ) -> None:
        """HAProxy on the same host connects from loopback; in HTTP mode it says the client
        is remote (X-Forwarded-For), in TCP mode it says nothing. Either way an admin reload
        through it is a 404 and never runs; on the admin listener it runs."""
        proxy = fleet.haproxy
        if mode == "tcp":
            proxy = HAProxy(tmp_path, fleet.replicas, mode="tcp", name="-tcp")
            proxy.start()
        try:
            for replica in fleet.replicas:
                proxy.wait_status(replica.name, "UP")
            before = [_generation(replica) for replica in fleet.replicas]
            through = [
                httpx.post(f"{proxy.url}/admin/models/{RELOADED}/reload", timeout=10)
                for _ in fleet.replicas  # round robin: once to each replica
            ]
            listing = httpx.get(f"{proxy.url}/admin/models", timeout=10)
            after = [_generation(replica) for replica in fleet.replicas]
        finally:
            if proxy is not fleet.haproxy:
                proxy.stop()
        assert [a.status_code for a in through] == [404, 404, 404]
        assert listing.status_code == 404
        assert after == before  # nothing reloaded
        admin = fleet.replicas[0].server.admin_url
        started = httpx.post(f"{admin}/admin/models/{RELOADED}/reload", timeout=10)
        assert started.status_code == 202
        wait_until(
            lambda: (
                httpx.get(f"{admin}/health/llm/reload/{RELOADED}", timeout=10).json()["state"]
                in ("completed", "failed")
            ),
            60,
            "the reload on the admin listener",
        )
        assert _generation(fleet.replicas[0]) != before[0]
