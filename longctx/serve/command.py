"""`longctx serve CKPT`: an OpenAI-compatible HTTP API (completions, chat, streaming) for a checkpoint.

    longctx serve runs/tiny                                  # http://127.0.0.1:8000/v1
    longctx serve runs/tiny --port 8080 --api-key secret     # clients must send 'Authorization: Bearer secret'

    curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
         -d '{"model": "tiny", "prompt": "Once upon", "max_tokens": 32}'
"""

from __future__ import annotations

import argparse
import os

from longctx.errors import ConfigError
from longctx.infer.command import add_engine_arguments, engine_spec


def configure(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = __doc__.split("\n", 1)[1]
    p.add_argument("ckpt", help="checkpoint directory (longctx or Hugging Face)")
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it)",
    )
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--api-key",
        default=os.environ.get("LONGCTX_API_KEY"),
        help="require 'Authorization: Bearer KEY' on /v1/* (default: $LONGCTX_API_KEY, else none)",
    )
    p.add_argument(
        "--max-queue",
        type=int,
        default=64,
        help="requests in flight (running + waiting) before new ones get 429 (default 64)",
    )
    p.add_argument(
        "--model-name", default=None, help="the model id clients send (default: the directory name)"
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=8 * 2**20,
        help="requests with a larger body get 413 at once, before it is read (default 8 MiB)",
    )
    add_engine_arguments(p)
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from longctx.serve.app import load_app

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.max_queue < 1 or args.max_body_bytes < 1:
        raise ConfigError("--max-queue and --max-body-bytes must be at least 1")
    app = load_app(
        args.ckpt,
        engine_spec(args),
        device=args.device,
        model_id=args.model_name,
        api_key=args.api_key,
        max_queue=args.max_queue,
        max_body_bytes=args.max_body_bytes,
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
