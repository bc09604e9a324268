"""The Prefect server as `prefect server start` runs it, behind a Host allow-list.

Prefect has no allowed-hosts setting, so a server on 127.0.0.1 answers any Host header. A web page can use
that through DNS rebinding (its own name made to resolve to 127.0.0.1): the browser then treats the API as
the page's own origin, so neither CORS nor CSRF tokens stop it. Starlette's TrustedHostMiddleware, wrapped
around the very app `prefect server start` serves (`prefect.server.api.server.create_app`), answers 400 to
every other Host. It runs in the server's own process: no proxy, no extra port.

Run by `flows.services.up` as `python -m flows.prefect_server`; everything comes from the environment:
PREFECT_SERVER_API_HOST / PREFECT_SERVER_API_PORT (where to listen), QABOT_ALLOWED_HOSTS (comma-separated
host names or addresses, without ports) and Prefect's own PREFECT_SERVER_* settings.
"""

from __future__ import annotations

import os


def allowed_hosts() -> list[str]:
    raw = os.environ.get("QABOT_ALLOWED_HOSTS") or "127.0.0.1,localhost"
    return [h.strip().lower() for h in raw.split(",") if h.strip()]


def main() -> None:
    import uvicorn
    from prefect.server.api.server import create_app
    from prefect.settings import get_current_settings
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    settings = get_current_settings()
    api = settings.server.api
    app = TrustedHostMiddleware(create_app(final=True), allowed_hosts=allowed_hosts(), www_redirect=False)
    uvicorn.run(
        app,
        host=api.host,
        port=api.port,
        timeout_keep_alive=api.keepalive_timeout,
        ws_ping_interval=api.websocket_ping_interval,
        ws_ping_timeout=api.websocket_ping_timeout,
        log_level=str(settings.server.logging_level).lower(),
    )


if __name__ == "__main__":
    main()
