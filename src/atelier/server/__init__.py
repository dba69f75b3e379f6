"""`atelier serve`: real-time img2img in the browser over WebSocket, MJPEG and HTTP.

    create_app       the FastAPI app for a loaded pipeline or a model name
    listen           a socket bound to host:port, or a UserError
    make_server      the uvicorn server for an app
    SessionManager   per-client StreamEngines served round-robin by one inference thread
    edit_mode        the one-step edit frame processor a session can be handed
    security         trusted hosts, WebSocket origins, the auth token, connection deadlines

Names are imported on first use, so that `atelier --help` does not pay for FastAPI and torch.
"""

from atelier._lazy import lazy_exports

_EXPORTS = {
    "create_app": "atelier.server.app",
    "listen": "atelier.server.app",
    "make_server": "atelier.server.app",
    "SessionManager": "atelier.server.sessions",
}

__getattr__, __all__ = lazy_exports(__name__, _EXPORTS)
