"""The autoscalers' queries, evaluated by a real Prometheus that scrapes two real replicas.

Every query is read from the manifests, never copied here: the KEDA ScaledObject's triggers,
and the prometheus-adapter rules with their templates filled in the way the adapter fills
them for the HorizontalPodAutoscaler (its selector's labels, then the HPA's namespace). Each
must answer while the replicas idle (the autoscalers treat an empty answer as an error) and
rise once requests queue up.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]

from .conftest import process_env
from .processes import Prometheus, Server, launch, prometheus, wait_until

KUBERNETES = Path(__file__).parent.parent / "docs" / "kubernetes"
SCALED_OBJECT = KUBERNETES / "autoscaling" / "keda" / "scaledobject.yaml"
HPA = KUBERNETES / "autoscaling" / "hpa" / "horizontalpodautoscaler.yaml"
ADAPTER_VALUES = KUBERNETES / "autoscaling" / "hpa" / "prometheus-adapter-values.yaml"

MEMBER = "demo-small"
CLIENTS_PER_REPLICA = 6
"""Concurrent clients per replica against a member that decodes one sequence at a time, so
about five requests wait in its queue at any moment."""
LOAD_S = 4.0
"""How long the load runs before the busy moment: several 1 s scrapes of each replica."""


def _single(path: Path) -> dict[str, Any]:
    (document,) = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    assert isinstance(document, dict)
    return document


def _keda_queries() -> dict[str, str]:
    """Trigger name -> PromQL, as KEDA sends it."""
    triggers = _single(SCALED_OBJECT)["spec"]["triggers"]
    return {f"keda:{t['name']}": t["metadata"]["query"] for t in triggers}


def _namespace(queries: dict[str, str]) -> str:
    """The namespace the queries expect (the one the manifests are applied to)."""
    found: set[str] = {m for q in queries.values() for m in re.findall(r'namespace="([^"]+)"', q)}
    (namespace,) = found
    return namespace


def _label_matchers(selector: dict[str, Any], namespace: str) -> str:
    """<<.LabelMatchers>> for an External metric: the selector's requirements in key order,
    then the HPA's namespace (prometheus-adapter's BuildExternal)."""
    assert set(selector) == {"matchLabels"}, "only matchLabels is filled in here"
    labels = sorted(selector["matchLabels"].items())
    return ",".join([*(f'{k}="{v}"' for k, v in labels), f'namespace="{namespace}"'])


def _adapter_queries(series_names: set[str], namespace: str) -> dict[str, str]:
    """External metric name -> the PromQL prometheus-adapter runs for the HPA's metric.

    ``series_names`` are the names the adapter discovered with the rules' seriesQuery.
    """
    metrics = {
        m["external"]["metric"]["name"]: m["external"]["metric"]
        for m in _single(HPA)["spec"]["metrics"]
    }
    queries = {}
    for rule in _single(ADAPTER_VALUES)["rules"]["external"]:
        name = rule["name"]["as"]
        assert "$" not in name, "capture groups in name.as are not filled in here"
        (series,) = [s for s in series_names if re.fullmatch(rule["name"]["matches"], s)]
        query = rule["metricsQuery"].replace("<<.Series>>", series)
        query = query.replace(
            "<<.LabelMatchers>>", _label_matchers(metrics[name]["selector"], namespace)
        )
        assert "<<" not in query, query
        queries[f"adapter:{name}"] = query
    assert queries.keys() == {f"adapter:{name}" for name in metrics}
    return queries


# ---------------------------------------------------------------- real processes


def _replica_config(tmp_path: Path, demo_dir: Path) -> Path:
    """One member that decodes one sequence at a time, with room for a queue behind it."""
    config = tmp_path / "ensemble.toml"
    config.write_text(
        "[server]\ndrain_delay_s = 0.0\n"
        "[cache]\nenabled = false\n"
        f'[[models]]\nname = "{MEMBER}"\npath = "{demo_dir / (MEMBER + ".gguf")}"\n'
        "n_ctx = 512\nparallel = 1\nqueue_size = 64\nn_threads = 1\n"
    )
    return config


@dataclass
class Load:
    """Clients that keep ``per_replica`` non-deterministic requests in flight on each
    replica until stopped."""

    urls: list[str]
    per_replica: int
    stop: threading.Event = field(default_factory=threading.Event)
    statuses: list[int] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def __enter__(self) -> Load:
        for url in self.urls:
            for n in range(self.per_replica):
                thread = threading.Thread(target=self._client, args=(url, n), daemon=True)
                thread.start()
                self._threads.append(thread)
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _client(self, url: str, n: int) -> None:
        body = {"model": MEMBER, "prompt": f"load {n}", "max_tokens": 200, "temperature": 1.0}
        with httpx.Client(base_url=url, timeout=60) as client:
            while not self.stop.is_set():
                try:
                    status = client.post("/v1/completions", json=body).status_code
                except httpx.HTTPError:
                    status = 0  # no answer: the test's status check names it
                self.statuses.append(status)


@dataclass
class Observed:
    """What the autoscalers would have read: every query at one idle and one busy moment."""

    prometheus: Prometheus
    queries: dict[str, str]
    series: list[dict[str, str]]
    idle_at: float
    busy_at: float
    statuses: list[int]

    def value(self, name: str, when: float) -> float:
        """The query ``name``'s single value at ``when``."""
        return _value(self.prometheus, self.queries[name], when)

    def by_gauge(self, gauge: str) -> list[str]:
        """The names of the queries over ``gauge``, KEDA's and the adapter's."""
        return [n for n, q in self.queries.items() if re.search(rf"\b{gauge}\b", q)]


def _value(prom: Prometheus, expr: str, when: float) -> float:
    """The single value of an instant query at ``when`` (unix seconds): an empty answer,
    which an autoscaler cannot use, fails."""
    answer = httpx.get(
        f"{prom.url}/api/v1/query", params={"query": expr, "time": f"{when:.3f}"}, timeout=10
    ).json()
    assert answer["status"] == "success", f"{expr}: {answer.get('error')}"
    result = answer["data"]["result"]
    assert len(result) == 1, f"{expr}: {result}"
    return float(result[0]["value"][1])


@pytest.fixture(name="observed", scope="module")
def _observed(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Iterator[Observed]:
    """Two replicas scraped as the ServiceMonitor would, idle for a few scrapes, then under
    load for a few more; the tests read every query at both moments."""
    tmp = tmp_path_factory.mktemp("scaling")
    keda = _keda_queries()
    namespace = _namespace(keda)
    service = _single(KUBERNETES / "service.yaml")["metadata"]["name"]
    (endpoint,) = _single(KUBERNETES / "servicemonitor.yaml")["spec"]["endpoints"]
    env = process_env()
    env["XDG_CACHE_HOME"] = str(tmp / "xdg-cache")
    config = _replica_config(tmp, demo_dir)
    dirs = [tmp / f"replica-{i}" for i in range(2)]
    for directory in dirs:
        directory.mkdir()
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(launch, d, env, "--config", str(config)) for d in dirs]
        servers: list[Server] = []
        try:
            for future in futures:
                servers.append(future.result())
        except BaseException:
            for future in futures:
                if future.exception() is None:
                    future.result().stop()
            raise
    try:
        targets = {
            f"ensemble-ops-{i}": s.url.removeprefix("http://") for i, s in enumerate(servers)
        }
        labels = {host: {"namespace": namespace, "pod": pod} for pod, host in targets.items()}
        with prometheus(tmp, labels, endpoint["path"], job=service) as prom:
            wait_until(
                lambda: len(prom.query(f'{{job="{service}",__name__="llm_queue_depth"}}')) == 2,
                30,
                "both replicas' queue depth in Prometheus",
                interval_s=0.2,
            )
            series = _series(prom)
            queries = {**keda, **_adapter_queries({s["__name__"] for s in series}, namespace)}
            time.sleep(1.5)  # a second scrape of each, so every window holds samples
            idle_at = time.time()
            time.sleep(0.2)  # no scrape stamped before idle_at sees the load
            with Load([s.url for s in servers], CLIENTS_PER_REPLICA) as load:
                time.sleep(LOAD_S)
                busy_at = time.time()
            yield Observed(prom, queries, series, idle_at, busy_at, load.statuses)
    finally:
        for server in servers:
            server.stop()


def _series(prom: Prometheus) -> list[dict[str, str]]:
    """Every series the adapter rules' seriesQuery finds (what the adapter discovers)."""
    matches = [rule["seriesQuery"] for rule in _single(ADAPTER_VALUES)["rules"]["external"]]
    answer = httpx.get(f"{prom.url}/api/v1/series", params={"match[]": matches}, timeout=10)
    series: list[dict[str, str]] = answer.json()["data"]
    return series


# ---------------------------------------------------------------- tests


class TestQueriesAsWritten:
    def test_adapter_fills_in_the_scaled_object_queries(self) -> None:
        """For an HPA in the queries' namespace, the adapter's rules give exactly the
        ScaledObject's PromQL, gauge for gauge: both autoscalers read the same numbers."""
        keda = _keda_queries()
        series = {"llm_queue_depth", "llm_active_requests"}
        adapter = _adapter_queries(series, _namespace(keda))
        assert sorted(adapter.values()) == sorted(keda.values())


@pytest.mark.e2e
class TestScrapedReplicas:
    def test_adapter_discovers_both_replicas(self, observed: Observed) -> None:
        """Each rule's seriesQuery finds its gauge on both pods, in the expected namespace."""
        found = {(s["__name__"], s["pod"]) for s in observed.series}
        assert found == {
            (gauge, f"ensemble-ops-{i}")
            for gauge in ("llm_queue_depth", "llm_active_requests")
            for i in range(2)
        }
        assert {s["namespace"] for s in observed.series} == {_namespace(_keda_queries())}

    def test_every_query_answers_at_idle(self, observed: Observed) -> None:
        """One sample per query while nothing is sent, and it is 0: no phantom load, and no
        empty answer for ignoreNullValues to turn into an error."""
        assert len(observed.queries) == 4
        for name in observed.queries:
            assert observed.value(name, observed.idle_at) == 0, name

    def test_every_query_rises_under_load(self, observed: Observed) -> None:
        """With requests queueing on both replicas, every query is above its idle value."""
        for name in observed.queries:
            busy = observed.value(name, observed.busy_at)
            assert busy > observed.value(name, observed.idle_at), name
        assert len(observed.statuses) >= 2 * CLIENTS_PER_REPLICA  # real answers, all 200
        assert set(observed.statuses) == {200}

    def test_queue_depth_counts_waiting_requests_only(self, observed: Observed) -> None:
        """Under load the active-requests signal exceeds queue depth by the sequences being
        decoded: queue depth is what waits beyond them."""
        for active, queued in zip(
            observed.by_gauge("llm_active_requests"),
            observed.by_gauge("llm_queue_depth"),
            strict=True,
        ):
            busy = observed.busy_at
            assert observed.value(active, busy) > observed.value(queued, busy) > 0

    def test_keda_and_adapter_agree(self, observed: Observed) -> None:
        """At idle and under load, each KEDA trigger and its adapter metric give one value."""
        for gauge in ("llm_queue_depth", "llm_active_requests"):
            names = observed.by_gauge(gauge)
            assert [n.split(":")[0] for n in names] == ["keda", "adapter"]
            for when in (observed.idle_at, observed.busy_at):
                assert len({observed.value(n, when) for n in names}) == 1, (gauge, when)
