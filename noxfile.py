"""Developer sessions: ``nox`` runs lint and tests; ``nox -s bench`` measures."""

from __future__ import annotations

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
    reload and metrics benchmarks."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks.serving", *session.posargs)
    session.run("python", "-m", "benchmarks.real_models")
    session.run("python", "-m", "benchmarks.reload")
    session.run("python", "-m", "benchmarks.metrics")
    session.run("python", "-m", "benchmarks.report", "--markdown")


@nox.session
def dashboard(session: nox.Session) -> None:
    """Regenerate grafana/llm_dashboard.json from grafana/dashboard.py."""
    session.install("grafana-foundation-sdk")
    session.run("python", "grafana/dashboard.py")


@nox.session
def fuzz(session: nox.Session) -> None:
    """schemathesis against a live server with at least 5,000 generated requests."""
    session.install("-e", ".[test]")
    session.run("pytest", "tests/test_fuzz.py", env={"ENSEMBLE_OPS_FUZZ_EXAMPLES": "800"})


@nox.session
def soak(session: nox.Session) -> None:
    """Minutes of mixed traffic, injected faults and reloads against one server (not CI)."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks.soak", "--minutes", "5", *session.posargs)
