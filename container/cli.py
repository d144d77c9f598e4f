"""Command line: `lmc serve` / `python -m container serve` (SageMaker runs `IMAGE serve`)."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys

from container import tracing
from container.config import resolve_models
from engines import logs
from engines.options import ConfigError, load_server_options


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmc", description="LMC large-model serving container")
    sub = p.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="serve models over HTTP (the default command)")
    s.add_argument("--model-dir", help="model directory (default: HF_MODEL_ID, /opt/ml/model "
                                       "if it holds anything, the model store, else SmolLM2)")
    s.add_argument("--model-store", help="directory whose subfolders are models, one each")
    s.add_argument("--host", default=None, help="bind address (default 0.0.0.0)")
    s.add_argument("--port", type=int, default=None,
                   help="port (default $SAGEMAKER_BIND_TO_PORT or 8080)")
    m = sub.add_parser("prepare-model", help="convert the default model into the cache dir")
    m.add_argument("--cache-dir", default=None)
    return p


def _stack_dumps() -> None:
    """`kill -USR1 <pid>` prints every thread's Python stack to stderr (a stuck server can be
    diagnosed without stopping it)."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        argv = ["serve", *argv]
    args = _parser().parse_args(argv)
    _stack_dumps()
    if args.command == "prepare-model":
        cmd = [sys.executable, "-m", "engines.default_model"]
        if args.cache_dir:
            cmd += ["--cache-dir", args.cache_dir]
        return subprocess.call(cmd)

    try:
        server_config = load_server_options(host=args.host, port=args.port)
        logs.configure(server_config.log_level, server_config.log_format,
                       access_log=server_config.access_log)
        specs = resolve_models(model_dir=args.model_dir, model_store=args.model_store)
        tracing.configure()  # OpenTelemetry, only when the OTEL_* environment asks for it
    except ConfigError as e:
        print(f"lmc: configuration error: {e}", file=sys.stderr)
        return 2
    from container.server import serve

    try:
        import uvloop  # optional: a faster event loop when installed
        runner = uvloop.run
    except ImportError:
        runner = asyncio.run
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        return runner(serve(specs, server_config))
    finally:
        tracing.shutdown()  # export the spans still queued


if __name__ == "__main__":
    sys.exit(main())
