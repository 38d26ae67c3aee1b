"""Command line: ``ensemble-ops serve`` and ``ensemble-ops demo-models DIR``.

The CLI only builds Settings and calls the server; everything else is wired in ``app``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._version import __version__
from .config import ENV_PREFIX, Settings
from .demo import DEMO_MEMBERS, ensure_demo_models, write_model
from .errors import ConfigError

__all__ = ["demo_settings", "main"]


def demo_settings(
    directory: Path | None = None, *, environ: Mapping[str, str] | None = None
) -> Settings:
    """The built-in demo ensemble: three generated models, smallest first."""
    paths = ensure_demo_models(directory)
    names = [m.name for m in DEMO_MEMBERS]
    models = [
        {
            "name": name,
            "path": str(paths[name]),
            "n_ctx": 2048,
            "description": "generated demo model (random weights, not a real LLM)",
        }
        for name in names
    ]
    tiny, small, base = names
    data: dict[str, Any] = {
        "models": models,
        "modes": {
            "fast": {"max_tokens": 64, "temperature": 0.2, "top_p": 0.9, "prefer": [tiny, small]},
            "balanced": {
                "max_tokens": 128,
                "temperature": 0.7,
                "top_p": 0.95,
                "prefer": [small, base],
            },
            "creative": {
                "max_tokens": 256,
                "temperature": 1.0,
                "top_p": 1.0,
                "prefer": [base, small],
            },
        },
    }
    return Settings.from_mapping(data, environ=environ)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ensemble-ops", description="Serve an ensemble of local GGUF models."
    )
    parser.add_argument("--version", action="version", version=f"ensemble-ops {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="serve the ensemble (the demo ensemble when no --config is given)"
    )
    serve.add_argument("--config", type=Path, help="TOML config file")
    serve.add_argument("--host", help="bind address (default 127.0.0.1)")
    serve.add_argument("--port", help="port (default 8000)")
    serve.add_argument("--log-format", choices=["json", "console"], help="default json")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--log-file", type=Path, help="write logs to this file, not stdout")

    reload = commands.add_parser(
        "reload", help="reload a member of a running server without downtime"
    )
    reload.add_argument("model", help="the member to reload")
    reload.add_argument("--path", help="a new GGUF file (inside the server's model directory)")
    reload.add_argument("--url", default="http://127.0.0.1:8000", help="the server")
    reload.add_argument("--token", help="admin token (default: $ENSEMBLE_OPS_SERVER__ADMIN_TOKEN)")
    reload.add_argument("--wait", action="store_true", help="show progress until it ends")

    demo = commands.add_parser("demo-models", help="write the demo GGUF models into DIR")
    demo.add_argument("directory", type=Path)
    return parser


def _load_settings(args: argparse.Namespace) -> Settings:
    # Command-line flags are the strongest overrides: they travel the same validated path
    # as ENSEMBLE_OPS_* variables, so a bad --port fails like a bad config value.
    environ = dict(os.environ)
    flags = {
        "SERVER__HOST": args.host,
        "SERVER__PORT": args.port,
        "LOGGING__FORMAT": args.log_format,
        "LOGGING__LEVEL": args.log_level,
        "LOGGING__FILE": args.log_file,
    }
    environ |= {f"{ENV_PREFIX}{key}": str(value) for key, value in flags.items() if value}
    if args.config:
        return Settings.from_toml(args.config, environ=environ)
    return demo_settings(environ=environ)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "reload":
        from .reload_cli import run_reload

        return run_reload(
            args.model, url=args.url, path=args.path, token=args.token, wait=args.wait
        )
    if args.command == "demo-models":
        for member in DEMO_MEMBERS:
            path = write_model(member, args.directory / member.filename)
            print(path)
        return 0
    from .logs import configure_logging
    from .server import serve

    try:
        settings = _load_settings(args)
    except ConfigError as err:
        print(f"ensemble-ops: config error: {err}", file=sys.stderr)
        return 2
    log = settings.logging
    configure_logging(log.format, log.level, log.file)
    return asyncio.run(serve(settings, args.config))


if __name__ == "__main__":
    sys.exit(main())
