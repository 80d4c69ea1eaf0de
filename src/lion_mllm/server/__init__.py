"""`lion serve`: an OpenAI-compatible HTTP API with continuous batching and token streaming, and a web
page at `/ui`.

    from lion_mllm.server import create_app, serve, ServerSettings
    serve("hf-hub:owner/lion-flant5xl", port=8000, api_key="secret")   # blocks; 127.0.0.1 by default

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")
    client.chat.completions.create(model="lion", messages=[{"role": "user", "content": [
        {"type": "text", "text": "Where is the dog?"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,..."}}]}],
        extra_body={"tags": "dog, grass"})

The CLI mounts `add_serve_subcommand(subparsers)` and dispatches to `run_serve(args)`. This module imports
neither FastAPI nor Gradio, so the CLI starts without the `serve` extra installed.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .settings import ServerSettings, is_loopback

if TYPE_CHECKING:
    from fastapi import FastAPI

__all__ = ["ServerSettings", "add_serve_subcommand", "create_app", "is_loopback", "run_serve", "serve"]


def create_app(lion: Any, settings: ServerSettings | None = None) -> FastAPI:
    """See `lion_mllm.server.app.create_app`."""
    from .app import create_app as _create_app

    return _create_app(lion, settings)


def serve(model: Any, host: str = "127.0.0.1", port: int = 8000, **kwargs: Any) -> None:
    """See `lion_mllm.server.app.serve`."""
    from .app import serve as _serve

    _serve(model, host, port, **kwargs)


def add_serve_subcommand(subparsers: Any) -> argparse.ArgumentParser:
    """Add `serve` to an argparse subparsers object; the parser's `func` is `run_serve`."""
    defaults = ServerSettings()
    parser = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API and a web page",
        description="Serve LION: POST /v1/chat/completions (OpenAI format, token streaming, continuous "
                    "batching), /v1/models, /v1/tags, /health, /metrics (Prometheus), and a web page at /ui. "
                    "Binds 127.0.0.1 unless --host says otherwise. Decoding defaults are the model's own "
                    "(its generation config) unless --num-beams/--repetition-penalty/--default-max-tokens say "
                    "otherwise; request fields override both.")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=defaults.model_name,
                        help="the model id clients send (default %(default)s)")
    parser.add_argument("--batching", choices=["continuous", "request"], default=defaults.batching,
                        help="continuous: requests join and leave the decoding batch between decoder steps "
                             "(default); request: whole requests share one generate call")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                        help="requests decoding at once")
    parser.add_argument("--max-wait-ms", type=float, default=defaults.max_wait_ms,
                        help="request-level batching: how long the first request of a batch waits for others")
    parser.add_argument("--queue-size", type=int, default=defaults.queue_size,
                        help="requests waiting beyond this are answered 429")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s, help="per-request seconds (504 after)")
    parser.add_argument("--shutdown-timeout", type=float, default=defaults.shutdown_timeout_s,
                        help="on shutdown, seconds in-flight requests get to finish (the rest get 503)")
    parser.add_argument("--api-key", default=os.environ.get("LION_API_KEY"),
                        help="require 'Authorization: Bearer KEY' (default: $LION_API_KEY; prefer the variable, "
                             "a command line is visible to other users)")
    parser.add_argument("--max-image-pixels", type=int, default=defaults.max_image_pixels)
    parser.add_argument("--max-body-bytes", type=int, default=defaults.max_body_bytes)
    parser.add_argument("--allow-remote-images", action="store_true",
                        help="let clients send http(s) image URLs that the server downloads")
    parser.add_argument("--max-tokens-limit", type=int, default=defaults.max_tokens_limit,
                        help="the most answer tokens a request may ask for")
    parser.add_argument("--default-max-tokens", type=int, default=None,
                        help="answer tokens when a request does not say (default: the model's own)")
    parser.add_argument("--num-beams", type=int, default=None,
                        help="beams when a request does not say (default: the model's own)")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="repetition penalty when a request does not say (default: the model's own)")
    parser.add_argument("--no-ui", action="store_true", help="do not mount the web page at /ui")
    # --model --device --dtype --ram --ram-config: the options every model-loading `lion` command shares
    from ..model_options import add_model_options

    add_model_options(parser, decoding=False, tags=False)
    parser.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    parser.set_defaults(func=run_serve)
    return parser


def model_aliases(model: str | None) -> tuple[str, ...]:
    """The names a client may know the `--model` by: the spec itself and, for a path, its last part
    (`lion-shapes` for the built-in default, `lion-flant5xl` for an installed download)."""
    from ..checkpoints.hub import DEFAULT_MODEL, MODEL_ENV

    spec = model or os.environ.get(MODEL_ENV) or DEFAULT_MODEL
    names = [spec]
    if not spec.startswith(("hf-hub:", "http://", "https://")):
        names.append(Path(spec.removeprefix("local-dir:")).name)
    return tuple(dict.fromkeys(n for n in names if n))


def settings_from_args(args: argparse.Namespace) -> ServerSettings:
    return ServerSettings(model_name=args.served_model_name, model_aliases=model_aliases(args.model),
                          batching=args.batching, max_batch_size=args.max_batch_size, max_wait_ms=args.max_wait_ms,
                          queue_size=args.queue_size, timeout_s=args.timeout, shutdown_timeout_s=args.shutdown_timeout,
                          api_key=args.api_key or None, max_image_pixels=args.max_image_pixels,
                          max_body_bytes=args.max_body_bytes, allow_remote_images=args.allow_remote_images,
                          max_tokens_limit=args.max_tokens_limit, default_max_tokens=args.default_max_tokens,
                          num_beams=args.num_beams, repetition_penalty=args.repetition_penalty, ui=not args.no_ui,
                          compile=getattr(args, "compile", None))


def run_serve(args: argparse.Namespace) -> int:
    """Run the server described by parsed `serve` arguments (blocks until interrupted)."""
    import logging

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from ..model_options import model_from_args

    lion = model_from_args(args)  # device and files checked before loading, `--ram` attached
    serve(lion, args.host, args.port, settings=settings_from_args(args), log_level=args.log_level)
    return 0
