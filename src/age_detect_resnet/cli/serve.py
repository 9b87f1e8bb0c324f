"""`age-detect serve`: the web page and JSON API of web/app.py, on a model loaded as `predict` does."""

from __future__ import annotations

import argparse
import logging
import math
import socket
import sys
from collections.abc import Sequence

from age_detect_resnet.cli.common import command_main, user_message
from age_detect_resnet.cli.predict import add_predictor_arguments, build_predictor, predictor_errors
from age_detect_resnet.web import app as web_app

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_predictor_arguments(parser)
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for the whole network (the camera needs https "
        "or localhost in the browser)",
    )
    parser.add_argument("--port", type=int, default=8000, help="port to listen on")
    parser.add_argument(
        "--max-upload-mb", type=float, default=web_app.DEFAULT_MAX_UPLOAD_MB, help="larger uploads get 413"
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=web_app.DEFAULT_MAX_CONCURRENT,
        help="photos predicted at the same time",
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=web_app.DEFAULT_MAX_QUEUE,
        help="photos waiting for the model; requests beyond get 503 with Retry-After",
    )
    parser.add_argument(
        "--live-fps",
        type=float,
        default=web_app.DEFAULT_LIVE_FPS,
        help="frames per second the live camera sends; faster frames of one camera get 429",
    )
    parser.add_argument(
        "--live-sessions",
        type=int,
        default=web_app.DEFAULT_LIVE_SESSIONS,
        help="live cameras followed at once; beyond, the least recently active one is dropped",
    )


def check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse limits the server cannot work with (usage and message, exit status 2); the float options
    also take nan, inf and values too small to mean anything, which would fail later with a traceback."""
    upload_bytes = args.max_upload_mb * web_app.MB
    if not (math.isfinite(upload_bytes) and round(upload_bytes) >= 1):
        parser.error("--max-upload-mb must be a finite number of at least one byte (1e-6 MB)")
    if args.max_concurrent < 1 or args.max_queue < 0:
        parser.error("--max-concurrent must be >= 1 and --max-queue >= 0")
    # Slower than one frame per SESSION_IDLE_S, every frame would find its session forgotten.
    min_fps = 1 / web_app.SESSION_IDLE_S
    if not (math.isfinite(args.live_fps) and args.live_fps >= min_fps) or args.live_sessions < 1:
        parser.error(f"--live-fps must be a finite number >= {min_fps:.3g} and --live-sessions >= 1")
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be between 1 and 65535, not {args.port}")


def bind_error(host: str, port: int) -> OSError | None:
    """Why uvicorn could not listen on host:port (as it binds: IPv6 for an address with ':',
    SO_REUSEADDR), or None; checked first so that no URL is shown where nothing will answer."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
    except OSError as err:
        return err
    return None


def run(args: argparse.Namespace) -> int:
    unbindable = bind_error(args.host, args.port)
    if unbindable is not None:
        log.error("cannot listen on %s:%d: %s", args.host, args.port, unbindable.strerror or unbindable)
        return 2
    try:
        predictor = build_predictor(args)
    except predictor_errors() as err:
        log.error("%s", user_message(err))
        return 2
    app = web_app.create_app(
        predictor,
        max_upload_bytes=round(args.max_upload_mb * web_app.MB),
        max_concurrent=args.max_concurrent,
        max_queue=args.max_queue,
        live_fps=args.live_fps,
        live_sessions=args.live_sessions,
    )
    print(
        f"age-detect serve: open http://{args.host}:{args.port}/ (model {args.model}; Ctrl+C stops)",
        flush=True,
    )
    web_app.run_server(app, host=args.host, port=args.port)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return command_main("age-detect serve", web_app.__doc__, add_arguments, run, argv, check=check_arguments)


if __name__ == "__main__":
    sys.exit(main())
