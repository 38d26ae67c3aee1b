"""A real Prometheus scrapes a real server: every contract metric, checked against traffic."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from ..conftest import process_env
from ..processes import Prometheus, Server, launch, prometheus

pytestmark = pytest.mark.e2e
GRAFANA = Path(__file__).parents[2] / "grafana"


@pytest.fixture(name="scraped", scope="module")
def _scraped(
    tmp_path_factory: pytest.TempPathFactory, demo_dir: Path
) -> Iterator[tuple[Server, Prometheus, dict[str, int]]]:
    """A server with a broken member, known traffic sent, and Prometheus caught up."""
    tmp = tmp_path_factory.mktemp("prom")
    broken = demo_dir / "broken-member.gguf"
    broken.write_bytes(b"GGUF" + bytes(64))  # a corrupt file: that member fails to load
    config = tmp / "ensemble.toml"
    members = [("demo-tiny", 512), ("demo-small", 512), ("demo-base", 512)]
    # demo-tiny's reload runs a quality gate (any answer passes): its series have data.
    golden = tmp / "golden.jsonl"
    golden.write_text('{"prompt": "Hello", "max_tokens": 2, "regex": "."}\n')
    config.write_text(
        "".join(
            f'[[models]]\nname = "{n}"\npath = "{demo_dir / (n + ".gguf")}"\nn_ctx = {c}\n'
            + (f'quality = {{golden_set = "{golden}"}}\n' if n == "demo-tiny" else "")
            for n, c in members
        )
        + f'[[models]]\nname = "broken"\npath = "{broken}"\n'
        + '[modes.fast]\nmax_tokens = 4\ntemperature = 0.2\ntop_p = 0.9\nprefer = ["demo-tiny"]\n'
        + "[modes.balanced]\nmax_tokens = 4\ntemperature = 0.7\ntop_p = 0.9\n"
        + 'prefer = ["demo-small"]\n'
        + "[modes.creative]\nmax_tokens = 4\ntemperature = 1.0\ntop_p = 1.0\n"
        + 'prefer = ["demo-base"]\n'
    )
    env = process_env()
    server = launch(tmp, env, "--config", str(config))
    host = server.url.removeprefix("http://")
    try:
        with prometheus(tmp, host) as prom:
            sent = _send_known_traffic(server)
            deadline = time.monotonic() + 30
            # Wait for a scrape that saw the last thing sent (the failed reload; the counter
            # is there at 0 from the start).
            while time.monotonic() < deadline and not prom.query(
                'llm_reload_total{model="broken",outcome="failed"} > 0'
            ):
                time.sleep(0.5)
            time.sleep(2.5)  # and a couple more, so every series is current
            yield server, prom, sent
    finally:
        server.stop()


def _send_known_traffic(server: Server) -> dict[str, int]:
    sent = {"fast": 3, "balanced": 2, "creative": 1}
    with (
        httpx.Client(base_url=server.url, timeout=60) as client,
        httpx.Client(base_url=server.admin_url, timeout=60) as admin,
    ):
        for mode, count in sent.items():
            for i in range(count):
                answer = client.post("/v1/completions", json={"mode": mode, "prompt": f"q{i}"})
                assert answer.status_code == 200
        cached = {"model": "demo-tiny", "prompt": "same", "max_tokens": 3, "temperature": 0}
        assert client.post("/v1/completions", json=cached).headers["x-cache"] == "MISS"
        assert client.post("/v1/completions", json=cached).headers["x-cache"] == "HIT"
        too_long = {"model": "demo-tiny", "prompt": "x " * 600, "max_tokens": 1}
        assert client.post("/v1/completions", json=too_long).status_code == 400
        unavailable = {"model": "broken", "prompt": "x"}
        assert client.post("/v1/completions", json=unavailable).status_code == 503
        stream = {"model": "demo-small", "prompt": "s", "max_tokens": 3, "stream": True}
        assert "[DONE]" in client.post("/v1/completions", json=stream).text
        for model in ("demo-tiny", "broken"):  # one reload completes, one fails
            assert admin.post(f"/admin/models/{model}/reload").status_code == 202
            while client.get(f"/health/llm/reload/{model}").json()["state"] not in (
                "completed",
                "failed",
            ):
                time.sleep(0.05)
    return sent


class TestScrapedByPrometheus:
    def test_request_counters_match_the_traffic(
        self, scraped: tuple[Server, Prometheus, dict[str, int]]
    ) -> None:
        """Per mode, per status, and in total, the counters equal what was sent."""
        _, prom, sent = scraped
        for mode, count in sent.items():
            assert prom.value(f'sum(llm_requests_total{{mode="{mode}",status="success"}})') == (
                count + (3 if mode == "balanced" else 0)  # cached x2 + stream: default mode
            )
        total = sum(sent.values()) + 2 + 1 + 1 + 1  # cached pair, too long, broken, stream
        assert prom.value("sum(llm_requests_total)") == total
        assert prom.value('sum(llm_requests_total{status="error"})') == 2
        assert prom.value('llm_requests_total{model="demo-tiny",mode="fast",status="success"}') == 3

    def test_errors_of_two_kinds(self, scraped: tuple[Server, Prometheus, dict[str, int]]) -> None:
        """Each error is counted by member and type."""
        _, prom, _ = scraped
        assert (
            prom.value('llm_errors_total{model="demo-tiny",error_type="context_length_exceeded"}')
            == 1
        )
        assert prom.value('llm_errors_total{model="broken",error_type="model_unavailable"}') == 1

    def test_cache_and_latency_and_tokens(
        self, scraped: tuple[Server, Prometheus, dict[str, int]]
    ) -> None:
        """Cache hits/misses, the latency histogram and token counts agree with the traffic."""
        _, prom, sent = scraped
        assert prom.value("llm_cache_hits_total") == 1
        assert prom.value("llm_cache_misses_total") == 1
        engine_requests = sum(sent.values()) + 1 + 1  # + the cache miss + the stream
        assert prom.value("sum(llm_inference_duration_seconds_count)") == engine_requests
        assert prom.value('sum(llm_inference_duration_seconds_bucket{le="+Inf"})') == (
            engine_requests
        )
        assert prom.value("sum(llm_inference_duration_seconds_sum)") > 0
        assert prom.value('sum(llm_tokens_total{kind="completion"})') == (
            4 * sum(sent.values()) + 3 + 3
        )
        assert prom.value('sum(llm_tokens_total{kind="prompt"})') > 0
        # Every answer from the engine has a first token (the engine times it), streams or not.
        assert prom.value("sum(llm_time_to_first_token_seconds_count)") == engine_requests

    def test_model_gauges(self, scraped: tuple[Server, Prometheus, dict[str, int]]) -> None:
        """Loaded, memory by type, active requests, queue depth, requests per second."""
        _, prom, _ = scraped
        assert prom.value('llm_model_loaded{model="demo-base"}') == 1
        assert prom.value('llm_model_loaded{model="broken"}') == 0
        assert prom.value('llm_model_memory_bytes{model="demo-base",memory_type="ram"}') > 70e6
        assert prom.value('llm_model_memory_bytes{model="demo-base",memory_type="gpu"}') == 0
        assert prom.value("sum(llm_active_requests)") == 0
        assert prom.value("sum(llm_queue_depth)") == 0
        assert prom.value('llm_requests_per_second{model="demo-tiny",mode="fast"}') == 3 / 60
        info = prom.query("llm_ensemble_info")
        assert info[0]["metric"]["models"] == "demo-tiny,demo-small,demo-base,broken"

    def test_reload_and_health(self, scraped: tuple[Server, Prometheus, dict[str, int]]) -> None:
        """One completed and one failed reload; state, progress and health per member."""
        _, prom, _ = scraped
        assert prom.value('llm_reload_total{model="demo-tiny",outcome="completed"}') == 1
        assert prom.value('llm_reload_total{model="broken",outcome="failed"}') == 1
        assert prom.value("sum(llm_reload_duration_seconds_count)") == 2
        assert prom.value('llm_reload_state{model="demo-tiny",state="completed"}') == 1
        assert prom.value('llm_reload_state{model="broken",state="failed"}') == 1
        assert prom.value('llm_reload_progress_percent{model="demo-tiny"}') == 100
        assert prom.value('llm_health_status{model="demo-base",status="healthy"}') == 1
        assert prom.value('llm_health_status{model="broken",status="unhealthy"}') == 1
        assert prom.value("sum(llm_health_status)") == 4  # one status per member

    def test_batching(self, scraped: tuple[Server, Prometheus, dict[str, int]]) -> None:
        """Queue wait and time per token per engine request; batch sizes and KV per member."""
        _, prom, sent = scraped
        engine_requests = sum(sent.values()) + 1 + 1  # + the cache miss + the stream
        assert prom.value("sum(llm_queue_wait_seconds_count)") == engine_requests
        assert prom.value('llm_queue_wait_seconds_count{model="demo-tiny",mode="fast"}') == 3
        assert prom.value("sum(llm_queue_wait_seconds_sum)") >= 0
        # Every engine request made 3 or 4 tokens, so each has a time per token.
        assert prom.value("sum(llm_time_per_output_token_seconds_count)") == engine_requests
        assert prom.value("sum(llm_time_per_output_token_seconds_sum)") > 0
        for model in ("demo-tiny", "demo-small", "demo-base"):
            assert prom.value(f'llm_batch_size_count{{model="{model}"}}') > 0, model
        assert not prom.query('llm_batch_size_count{model="broken"}')
        # No step carries more than n_batch (512) tokens.
        assert prom.value('sum(llm_batch_size_bucket{le="512.0"})') == prom.value(
            "sum(llm_batch_size_count)"
        )
        usage = prom.query("llm_kv_cache_usage_ratio")
        assert sorted(u["metric"]["model"] for u in usage) == [
            "broken",
            "demo-base",
            "demo-small",
            "demo-tiny",
        ]
        assert all(0 <= float(u["value"][1]) <= 1 for u in usage)
        assert prom.value('llm_kv_cache_usage_ratio{model="broken"}') == 0

    def test_copies_and_rollouts(self, scraped: tuple[Server, Prometheus, dict[str, int]]) -> None:
        """Without a canary every request is the stable copy's, and the rollout series are
        there for every member: weight 0, no gate verdict, a counter per rollout and outcome."""
        _, prom, sent = scraped
        assert prom.value('sum(llm_requests_total{copy="stable"})') == prom.value(
            "sum(llm_requests_total)"
        )
        assert not prom.query('llm_requests_total{copy!="stable"}')
        engine_requests = sum(sent.values()) + 1 + 1  # + the cache miss + the stream
        assert prom.value('sum(llm_inference_duration_seconds_count{copy="stable"})') == (
            engine_requests
        )
        members = ["broken", "demo-base", "demo-small", "demo-tiny"]
        weights = prom.query("llm_rollout_weight_percent")
        assert sorted(w["metric"]["model"] for w in weights) == members
        assert all(float(w["value"][1]) == 0 for w in weights)
        gates = {"error_rate", "p95_latency", "ttft", "empty_share", "quality"}
        verdicts = prom.query("llm_rollout_gate_verdict")
        assert {v["metric"]["gate"] for v in verdicts} == gates
        assert len(verdicts) == len(members) * len(gates) * 3
        # No live gate has judged; demo-tiny's reload passed its quality gate.
        assert prom.value('sum(llm_rollout_gate_verdict{gate!="quality"})') == 0
        quality = 'llm_rollout_gate_verdict{gate="quality",verdict="pass",model="demo-tiny"}'
        assert prom.value(quality) == 1
        assert prom.value('llm_quality_runs_total{model="demo-tiny",outcome="pass"}') == 1
        assert prom.value('llm_quality_pass_ratio{model="demo-tiny",copy="candidate"}') == 1
        assert prom.value("count(llm_rollouts_total)") == len(members) * 4 * 3
        # A plain reload is a `switch` rollout: the completed one promoted, the failed one failed.
        switch = 'llm_rollouts_total{rollout="switch",model='
        assert prom.value(switch + '"demo-tiny",outcome="promoted"}') == 1
        assert prom.value(switch + '"broken",outcome="failed"}') == 1
        assert prom.value("sum(llm_rollouts_total)") == 2

    def test_process_metrics(self, scraped: tuple[Server, Prometheus, dict[str, int]]) -> None:
        """Event-loop lag and the standard process metrics are there."""
        _, prom, _ = scraped
        assert 0 <= prom.value("llm_event_loop_lag_seconds") < 5
        assert prom.value("process_resident_memory_bytes") > 50e6
        assert prom.value("process_cpu_seconds_total") > 0
        assert prom.value('up{job="ensemble-ops"}') == 1


def _substitute(expr: str) -> str:
    """Grafana's template variables as Grafana would fill them (all models, 1 m rates)."""
    return expr.replace("$model", ".*").replace("$__rate_interval", "1m").replace("$__range", "5m")


def _grafana_exprs() -> list[tuple[str, str]]:
    board = json.loads((GRAFANA / "llm_dashboard.json").read_text())
    return [
        (panel["title"], target["expr"])
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]


def _alert_exprs() -> list[tuple[str, str]]:
    rules = yaml.safe_load((GRAFANA / "alerts.yml").read_text())
    return [(rule["alert"], rule["expr"]) for group in rules["groups"] for rule in group["rules"]]


class TestGrafanaQueries:
    def test_every_panel_query_has_data(
        self, scraped: tuple[Server, Prometheus, dict[str, int]]
    ) -> None:
        """Each PromQL expression of each panel parses and returns data: no "No data"."""
        _, prom, _ = scraped
        exprs = _grafana_exprs()
        assert len(exprs) >= 20
        empty = [title for title, expr in exprs if not prom.query(_substitute(expr))]
        assert empty == []

    def test_every_alert_rule_evaluates(
        self, scraped: tuple[Server, Prometheus, dict[str, int]]
    ) -> None:
        """Each alert expression parses; the quantity it compares has data."""
        _, prom, _ = scraped
        for name, expr in _alert_exprs():
            prom.query(expr)  # raises on a parse error; empty is fine: not firing
            measured = re.split(r"\s[<>]=?\s|\s==\s", expr.strip())[0]
            assert prom.query(measured), name
