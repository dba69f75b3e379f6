"""`atelier serve`: the real-time web page and stream server.

FastAPI, uvicorn, torch and the model are imported inside the handler, so `atelier --help` stays quick.
"""

from __future__ import annotations

import sys

from atelier.errors import UserError

DEFAULT_MODEL = "toyworld-turbo"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="real-time img2img in the browser: a web page, WebSocket and MJPEG streams",
        description=(
            "Serve a web page that streams a webcam, a screen, an image or video file, or a built-in toy-world "
            "animation through the model frame by frame, with the prompt and every setting live. Each browser tab "
            "is a session with its own stream; frames go over the WebSocket /ws (JPEG/PNG), and each session's "
            "output is also at /api/sessions/ID/mjpeg. GET /api/settings, /api/metrics and /health describe "
            "the server."
        ),
    )
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="M",
                   help=f"model: built-in name, diffusers folder, .safetensors file or hub id (default {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on; 0 picks a free one (default 7860)")
    p.add_argument("--max-sessions", type=int, default=8, metavar="N",
                   help="refuse more than N simultaneous sessions (default 8)")
    p.add_argument("--max-frame-mb", type=float, default=8.0, metavar="MB",
                   help="largest input frame accepted, in MiB (default 8)")
    p.add_argument("--device", metavar="D", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", metavar="T", help="weights dtype: fp32, fp16 or bf16 (default: fp16 on GPUs, fp32 on CPU)")
    p.add_argument("--config", metavar="C", help="for a single-file checkpoint: its base model's diffusers folder or bundled config")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.ckpt/.bin) weights")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default warning)")
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    if args.max_sessions < 1:
        raise UserError(f"--max-sessions must be at least 1, got {args.max_sessions}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {args.port}")
    if not 0 < args.max_frame_mb <= 256:
        raise UserError(f"--max-frame-mb must be above 0 and at most 256, got {args.max_frame_mb}")

    from atelier.server.app import create_app, listen, make_server

    sock = listen(args.host, args.port)  # a busy port fails before the model loads
    _quiet_loading()
    app = create_app(
        args.model,
        max_sessions=args.max_sessions,
        max_frame_bytes=int(args.max_frame_mb * 1024 * 1024),
        device=args.device,
        dtype=args.dtype,
        allow_pickle=args.allow_pickle,
        config=args.config,
    )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"atelier serve: http://{shown}:{port}/  (model {args.model}, up to {args.max_sessions} sessions; "
          f"Ctrl+C stops)", flush=True)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("atelier: note: the server is reachable from other machines and has no authentication",
              file=sys.stderr, flush=True)
    make_server(app, args.log_level).run(sockets=[sock])
    return 0


def _quiet_loading() -> None:
    """No progress bars or config chatter from diffusers and transformers in a server's output."""
    import diffusers.utils.logging
    import transformers.utils.logging

    for logging in (diffusers.utils.logging, transformers.utils.logging):
        logging.disable_progress_bar()
        logging.set_verbosity_error()
