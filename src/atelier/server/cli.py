"""`atelier serve`: the real-time web page and stream server.

FastAPI, uvicorn, torch and the model are imported inside the handler, so `atelier --help` stays quick.
"""

from __future__ import annotations

import sys

from atelier.errors import UserError
from atelier.speed import cli as speed_cli

IDLE_TIMEOUT = 120.0  # atelier.server.app.IDLE_TIMEOUT, not imported here to keep --help quick

DEFAULT_MODEL = "toyworld-turbo"


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="real-time img2img in the browser: a web page, WebSocket and MJPEG streams",
        description=(
            "Serve a web page that streams a webcam, a screen, an image or video file, or a built-in toy-world "
            "animation through the model frame by frame, with the prompt and every setting live. Each browser tab "
            "is a session with its own stream; frames go over the WebSocket /ws (JPEG/PNG), and each session's "
            "output is also at /api/sessions/ID/mjpeg?key=KEY (the key is told only to the session's own page). "
            "GET /api/settings, /api/metrics and /health describe the server. By default only this machine can "
            "connect; see --host, --allowed-host, --allowed-origin and --auth-token before opening it to a network."
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
    p.add_argument("--idle-timeout", type=float, default=IDLE_TIMEOUT, metavar="S",
                   help=f"close a session after S seconds without frames or settings; pings do not count "
                        f"(default {IDLE_TIMEOUT:g})")
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="a Host name the server answers to, e.g. myhost.local or 192.168.1.5 (repeatable; "
                        "default: 127.0.0.1, localhost and ::1, plus the --host address; any for 0.0.0.0 or ::)")
    p.add_argument("--allowed-origin", action="append", default=[], metavar="ORIGIN",
                   help="another origin (https://host:port) whose pages may open the WebSocket (repeatable; "
                        "the server's own page always may; * allows any)")
    p.add_argument("--auth-token", metavar="TOKEN",
                   help="require TOKEN on every request: open the page as /?token=TOKEN, or send "
                        "'Authorization: Bearer TOKEN' (default: the environment variable ATELIER_AUTH_TOKEN, if set)")
    p.add_argument("--device", metavar="D", help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", metavar="T", help="weights dtype: fp32, fp16 or bf16 (default: fp16 on GPUs, fp32 on CPU)")
    p.add_argument("--config", metavar="C", help="for a single-file checkpoint: its base model's diffusers folder or bundled config")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.ckpt/.bin) weights")
    p.add_argument("--ip-adapter", metavar="SOURCE",
                   help="the IP-Adapter for the sessions' reference images (image prompts): an h94/IP-Adapter folder, "
                        "a folder or .safetensors file, or a hub id in your HF cache (never downloaded). Default: a "
                        "built-in model's own adapter, if it has one; otherwise the page's reference slot is off")
    p.add_argument("--no-ip-adapter", action="store_true", help="no reference images (not even a built-in model's adapter)")
    p.add_argument("--ip-image-encoder", metavar="DIR",
                   help="the CLIP vision folder the adapter was trained with (default: found beside the adapter)")
    p.add_argument("--tiny-vae", metavar="SOURCE",
                   help="decode and encode the stream's frames with a tiny autoencoder (TAESD) instead of the model's "
                        "VAE: a built-in name (toyworld-taesd), a folder, a folder exported by `atelier export` (run "
                        "by OpenVINO / ONNX Runtime on the CPU) or a hub id in your HF cache (never downloaded). "
                        "Loaded once and shared by every session")
    p.add_argument("--tiny-vae-for", default="both", choices=["both", "encode"],
                   help="both: the tiny autoencoder encodes and decodes the frames (fastest); encode: it only "
                        "encodes them and the model's VAE decodes (a tiny decoder is where TAESD loses image "
                        "quality; see docs/speed.md) (default both)")
    p.add_argument("--log-level", default="warning", choices=["critical", "error", "warning", "info", "debug"],
                   help="server log level (default warning)")
    speed_cli.add_speed_options(p)
    p.set_defaults(func=run_serve)


def run_serve(args) -> int:
    import math
    import os

    token = args.auth_token if args.auth_token is not None else os.environ.get("ATELIER_AUTH_TOKEN") or None
    if token is not None and len(token) < 8:
        raise UserError("--auth-token must be at least 8 characters long")
    if not (math.isfinite(args.idle_timeout) and args.idle_timeout > 0):
        raise UserError(f"--idle-timeout must be a number of seconds above 0, got {args.idle_timeout}")
    if args.max_sessions < 1:
        raise UserError(f"--max-sessions must be at least 1, got {args.max_sessions}")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be from 0 to 65535, got {args.port}")
    if not 0 < args.max_frame_mb <= 256:
        raise UserError(f"--max-frame-mb must be above 0 and at most 256, got {args.max_frame_mb}")

    from urllib.parse import quote

    from atelier.server.app import create_app, listen, make_server
    from atelier.server.security import allowed_hosts_for, is_loopback, normal_origin

    from atelier.models import load_pipeline, load_tiny_autoencoder, resolve_tiny_autoencoder

    origins = [normal_origin(o) for o in args.allowed_origin]  # a bad one fails before the model loads
    if args.tiny_vae is not None:
        resolve_tiny_autoencoder(args.tiny_vae, download=False)  # so does an unknown --tiny-vae
    speed_cli.speed_options(args).check(args.device)  # so do speed options this machine cannot run
    sock = listen(args.host, args.port)  # and a busy port
    _quiet_loading()
    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, allow_pickle=args.allow_pickle,
                         config=args.config)
    # the stream's batch (frames x stages) varies with the live settings: compiled for dynamic shapes
    speed_cli.apply_from_args(pipe, args, dynamic_default=True, inference_mode=False)
    tiny_vae = None if args.tiny_vae is None else load_tiny_autoencoder(
        args.tiny_vae, device=pipe.unet.device, dtype=pipe.unet.dtype, download=False)
    app = create_app(
        pipe,
        max_sessions=args.max_sessions,
        max_frame_bytes=int(args.max_frame_mb * 1024 * 1024),
        allow_pickle=args.allow_pickle,
        allowed_hosts=allowed_hosts_for(args.host, args.allowed_host),
        allowed_origins=origins,
        auth_token=token,
        idle_timeout=args.idle_timeout,
        ip_adapter=False if args.no_ip_adapter else args.ip_adapter,
        ip_image_encoder=args.ip_image_encoder,
        tiny_vae=tiny_vae,
        tiny_vae_for=args.tiny_vae_for,
    )
    host, port = sock.getsockname()[:2]
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else f"[{host}]" if ":" in host else host
    query = f"?token={quote(token, safe='')}" if token else ""
    print(f"atelier serve: http://{shown}:{port}/{query}  (model {args.model}, up to {args.max_sessions} sessions; "
          f"Ctrl+C stops)", flush=True)
    if not is_loopback(host):
        print(f"atelier: warning: listening on {host}: anyone on the network who can reach this port can use "
              f"the model and this machine's compute"
              + ("; they need the --auth-token" if token else "; consider --auth-token"),
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
