"""The Grafana dashboard, alert rules and their Prometheus config, checked as artefacts."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

GRAFANA = Path(__file__).parent.parent / "grafana"
TWELVE = [
    ("Request rate (RPS)", "timeseries"),
    ("Active requests", "timeseries"),
    ("Inference latency p50 / p95 / p99", "timeseries"),
    ("Error rate", "timeseries"),
    ("Cache hit rate", "stat"),
    ("Total requests: success vs failure", "stat"),
    ("Model status (loaded)", "stat"),
    ("RAM usage", "timeseries"),
    ("Request distribution by model", "piechart"),
    ("Cache hits / misses", "timeseries"),
    ("Average latency by mode", "bargauge"),
    ("Error types", "timeseries"),
]


def _dashboard_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("dashboard", GRAFANA / "dashboard.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _committed() -> dict[str, Any]:
    board: dict[str, Any] = json.loads((GRAFANA / "llm_dashboard.json").read_text())
    return board


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is not installed (CI installs Debian's prometheus package)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, timeout=60, cwd=GRAFANA
    )


class TestDashboard:
    def test_committed_json_is_generated(self) -> None:
        """grafana/llm_dashboard.json is exactly what grafana/dashboard.py writes."""
        assert (GRAFANA / "llm_dashboard.json").read_text() == _dashboard_module().render(), (
            "run `nox -s dashboard` to regenerate it"
        )

    def test_twelve_panels_then_the_rows_beyond(self) -> None:
        """The twelve panels in order and type, then the health/reload/queue, batching,
        rollout and compute rows."""
        panels = _committed()["panels"]
        assert [(p["title"], p["type"]) for p in panels[:12]] == TWELVE
        assert panels[12]["type"] == "row"
        beyond = [p["title"] for p in panels[13:19]]
        assert beyond == [
            "Health status",
            "Reload state",
            "Reload progress",
            "Reload outcomes",
            "Time to first token p95",
            "Queue depth",
        ]
        assert (panels[19]["type"], panels[19]["title"]) == ("row", "Batching")
        assert [p["title"] for p in panels[20:24]] == [
            "Batch size p50 / p95",
            "KV cache usage",
            "Time per output token p95",
            "Queue wait p95",
        ]
        assert (panels[24]["type"], panels[24]["title"]) == ("row", "Rollouts")
        assert [p["title"] for p in panels[25:32]] == [
            "Candidate weight",
            "Gate verdicts",
            "Rollout outcomes",
            "Request rate by copy",
            "Latency p95 by copy",
            "Golden-set pass rate",
            "Quality gates",
        ]
        assert (panels[32]["type"], panels[32]["title"]) == ("row", "Compute and prefix reuse")
        assert [p["title"] for p in panels[33:]] == [
            "Compute share by member",
            "Compute wait p95",
            "Prefix cache hit rate",
            "KV cache kept for prompts to come",
        ]
        stacking = panels[11]["fieldConfig"]["defaults"]["custom"]["stacking"]
        assert stacking["mode"] == "normal"
        assert len({p["id"] for p in panels}) == len(panels)

    def test_batching_row_reads_the_batching_series(self) -> None:
        """Each batching panel queries its series: quantiles of the histograms, KV as 0..1."""
        panels = {p["title"]: p for p in _committed()["panels"]}
        exprs = {title: [t["expr"] for t in p.get("targets", [])] for title, p in panels.items()}
        batch = exprs["Batch size p50 / p95"]
        assert [e.split(",")[0] for e in batch] == [
            "histogram_quantile(0.5",
            "histogram_quantile(0.95",
        ]
        assert all("rate(llm_batch_size_bucket{" in e for e in batch)
        assert exprs["KV cache usage"] == ['llm_kv_cache_usage_ratio{model=~"$model"}']
        kv = panels["KV cache usage"]["fieldConfig"]["defaults"]
        assert (kv["unit"], kv["min"], kv["max"]) == ("percentunit", 0, 1)
        for title, series in (
            ("Time per output token p95", "llm_time_per_output_token_seconds_bucket"),
            ("Queue wait p95", "llm_queue_wait_seconds_bucket"),
        ):
            (expr,) = exprs[title]
            assert expr.startswith("histogram_quantile(0.95, sum by (le, model, mode) (rate(")
            assert f"{series}{{" in expr

    def test_rollouts_row_reads_the_rollout_series(self) -> None:
        """Weight as 0..100 %, verdicts coded 1 pass / 2 hold / 3 fail, both copies apart."""
        panels = {p["title"]: p for p in _committed()["panels"]}
        exprs = {title: [t["expr"] for t in p.get("targets", [])] for title, p in panels.items()}
        assert exprs["Candidate weight"] == ['llm_rollout_weight_percent{model=~"$model"}']
        weight = panels["Candidate weight"]["fieldConfig"]["defaults"]
        assert (weight["unit"], weight["min"], weight["max"]) == ("percent", 0, 100)
        (verdicts,) = exprs["Gate verdicts"]
        terms = [term.split(" * ") for term in verdicts.split(" + ")]
        assert [(t[0] if len(t) == 2 else "1", t[-1].split('"')[1]) for t in terms] == [
            ("1", "pass"),
            ("2", "hold"),
            ("3", "fail"),
        ]
        assert all(
            t[-1].startswith("max by (model, gate) (llm_rollout_gate_verdict{") for t in terms
        )
        (mapping,) = panels["Gate verdicts"]["fieldConfig"]["defaults"]["mappings"]
        assert {k: v["text"] for k, v in mapping["options"].items()} == {
            "0": "not judged",
            "1": "pass",
            "2": "hold",
            "3": "fail",
        }
        assert exprs["Rollout outcomes"] == [
            'sum by (outcome) (increase(llm_rollouts_total{model=~"$model"}[$__range]))'
        ]
        (rate,) = exprs["Request rate by copy"]
        assert rate.startswith("sum by (model, copy) (rate(llm_requests_total{")
        (latency,) = exprs["Latency p95 by copy"]
        assert latency.startswith("histogram_quantile(0.95, sum by (le, model, copy) (rate(")
        assert "llm_inference_duration_seconds_bucket{" in latency

    def test_model_variable_datasource_and_refresh(self) -> None:
        """A `model` variable, every query on the provisioned datasource uid, refresh 10 s."""
        board = _committed()
        provisioned = yaml.safe_load(
            (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
        )
        uid = provisioned["datasources"][0]["uid"]
        (variable,) = board["templating"]["list"]
        assert variable["name"] == "model"
        assert variable["includeAll"]
        assert board["refresh"] == "10s"
        for panel in board["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == uid
            assert all(t["datasource"]["uid"] == uid for t in panel["targets"])
            assert all(
                "$model" in t["expr"] or "process_" in t["expr"] or "cache" in t["expr"]
                for t in panel["targets"]
            ), panel["title"]


class TestPrometheusFiles:
    def test_promtool_check_config_and_rules(self) -> None:
        """promtool accepts prometheus.yml (with its rule file) and alerts.yml."""
        config = _promtool("check", "config", "prometheus.yml")
        assert config.returncode == 0, config.stdout + config.stderr
        rules = _promtool("check", "rules", "alerts.yml")
        assert rules.returncode == 0, rules.stdout + rules.stderr
        assert "SUCCESS: 12 rules found" in rules.stdout

    def test_promtool_unit_tests_every_alert(self) -> None:
        """Each alert fires on its condition and resolves (alerts_test.yml)."""
        result = _promtool("test", "rules", "alerts_test.yml")
        assert result.returncode == 0, result.stdout + result.stderr
        tested = {
            t["alertname"]
            for test in yaml.safe_load((GRAFANA / "alerts_test.yml").read_text())["tests"]
            for t in test["alert_rule_test"]
        }
        rules = {
            r["alert"]
            for g in yaml.safe_load((GRAFANA / "alerts.yml").read_text())["groups"]
            for r in g["rules"]
        }
        assert tested == rules

    def test_retention_and_scrape_interval(self) -> None:
        """Scrape /health/metrics every 15 s; compose keeps 15 days of data."""
        config = yaml.safe_load((GRAFANA / "prometheus.yml").read_text())
        (job,) = config["scrape_configs"]
        assert (job["metrics_path"], job["scrape_interval"]) == ("/health/metrics", "15s")
        compose = yaml.safe_load((GRAFANA / "docker-compose.yml").read_text())
        assert set(compose["services"]) == {"ensemble-ops", "prometheus", "grafana"}
        assert "--storage.tsdb.retention.time=15d" in compose["services"]["prometheus"]["command"]
        for service in compose["services"].values():
            for volume in service.get("volumes", []):
                assert (GRAFANA / volume.split(":")[0]).exists(), volume
