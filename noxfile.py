"""Developer sessions: ``nox`` runs lint and tests; ``nox -s bench`` measures."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (what CI runs)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff (lint and format), mypy --strict, and the import-linter contracts (pyproject)."""
    session.install("-e", ".[test,lint,bench]")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")
    session.run("mypy")
    session.run("lint-imports")


@nox.session
def bench(session: nox.Session) -> None:
    """Serving and real-model throughput (against direct llama_cpp calls and the peers),
    reload, metrics, tracing, shared-cache and API-key benchmarks."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks.serving", *session.posargs)
    session.run("python", "-m", "benchmarks.real_models")
    session.run("python", "-m", "benchmarks.memory")
    session.run("python", "-m", "benchmarks.reload")
    session.run("python", "-m", "benchmarks.metrics")
    session.run("python", "-m", "benchmarks.tracing")
    session.run("python", "-m", "benchmarks.shared_cache")
    session.run("python", "-m", "benchmarks.access")
    session.run("python", "-m", "benchmarks.quality")
    session.run("python", "-m", "benchmarks.status_page")
    session.run("python", "-m", "benchmarks.report", "--markdown")


@nox.session
def screenshots(session: nox.Session) -> None:
    """The status page's screenshots in docs/images (Debian's chromium and chromium-driver)."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks.screenshots")


@nox.session
def dashboard(session: nox.Session) -> None:
    """Regenerate grafana/llm_dashboard.json from grafana/dashboard.py."""
    session.install("grafana-foundation-sdk")
    session.run("python", "grafana/dashboard.py")


@nox.session
def fuzz(session: nox.Session) -> None:
    """schemathesis against a live server with at least 5,000 generated requests."""
    session.install("-e", ".[test]")
    session.run("pytest", "tests/http/test_fuzz.py", env={"ENSEMBLE_OPS_FUZZ_EXAMPLES": "800"})


@nox.session
def mutate(session: nox.Session) -> None:
    """Mutation testing of the core with mutmut against the in-process tests (not in CI).

    What is mutated and which tests run is in pyproject's [tool.mutmut]. With no arguments
    every mutant without a result yet is run (about 3 hours on 2 cores from scratch; an
    interrupted run resumes, and only functions changed since are run again). Name modules
    or mutants to (re)run just those: ``nox -s mutate -- "ensemble_ops.serving.slot.*"``.
    Results stay in mutants/: ``mutmut results``, ``mutmut show NAME``, ``mutmut browse``.
    See docs/mutation.md.
    """
    session.install("-e", ".[test,mutate]")
    # mutmut runs the tests once in its own process, then forks a child per mutant. llama.cpp's
    # OpenMP thread pool does not survive fork(): a child's first decode would wait forever
    # (and count as a timeout, i.e. "detected"). Built without OpenMP, ggml starts its own
    # threads for each computation, so a forked child decodes like any process.
    session.install(
        "--no-cache-dir",  # this build must never answer a later install of the same version
        "--force-reinstall",
        "--no-deps",
        "--no-binary=llama-cpp-python",
        _pinned("llama-cpp-python"),
        env={"CMAKE_ARGS": "-DGGML_OPENMP=OFF"},
    )
    # Two cores: two mutants at a time ("-- --max-children 4" overrides it). A mutant that hangs
    # a test fails that test after 90 s (3x the slowest test, two children sharing the cores)
    # instead of holding a worker until mutmut's limit for the whole selection.
    session.run(
        "mutmut",
        "run",
        "--max-children",
        "2",
        *session.posargs,
        env={"PYTEST_ADDOPTS": "--timeout=90"},
    )
    for line in _mutation_scores(Path("mutants")):
        session.log(line)


def _pinned(package: str) -> str:
    """``package==version`` as pinned in pyproject's dependencies."""
    dependencies = tomllib.loads(Path("pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in dependencies if d.startswith(f"{package}==")]
    return str(pin)


_DETECTED = {
    1: "killed",
    3: "killed",
    -24: "timeout",
    24: "timeout",
    36: "timeout",
    152: "timeout",
    255: "timeout",
    -6: "crashed",
    -9: "crashed",
    -11: "crashed",
}
"""mutmut's exit codes of a mutant's test run that mean the tests noticed it."""


def _mutation_scores(mutants: Path) -> list[str]:
    """One line per mutated module: detected / tried, and how many survived or had no test."""
    lines = []
    for meta in sorted(mutants.glob("src/**/*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"].values()
        detected = sum(code in _DETECTED for code in codes)
        survived = sum(code == 0 for code in codes)
        untested = sum(code in (5, 33) for code in codes)
        tried = detected + survived + untested
        module = meta.relative_to(mutants / "src").with_suffix("").with_suffix("")
        lines.append(
            f"{'.'.join(module.parts)}: {detected}/{tried} detected "
            f"({detected / max(tried, 1):.0%}), {survived} survived, {untested} without a test"
        )
    return lines


@nox.session
def soak(session: nox.Session) -> None:
    """Minutes of mixed traffic, injected faults and reloads against one server (not CI)."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks.soak", "--minutes", "5", *session.posargs)


@nox.session
def sla(session: nox.Session) -> None:
    """The product owner's SLA table: two minutes of open-loop traffic (10 requests/s, 90%
    repeated prompts) and a reload against the real-model default ensemble (not CI)."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks.sla", *session.posargs)
