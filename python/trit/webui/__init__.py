"""The chat page `trit serve` answers at GET /: one static HTML file with its
script and style inline (`chat.html`, shipped in the package), no build step
and nothing fetched from anywhere but the server itself. It talks to the
server's own /v1/models and /v1/chat/completions (streamed), so it needs no
route of its own beyond the page; with --api-key it asks for the key."""

from __future__ import annotations

from importlib.resources import files
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastapi import FastAPI

# The page may run only its own inline script and style and talk only to the
# server it came from: no CDN, no frames, no form posts elsewhere.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'"
)


def page() -> str:
    """The chat page's HTML."""
    return (files(__name__) / "chat.html").read_text(encoding="utf-8")


def mount(app: FastAPI) -> None:
    """Serves the chat page at GET / of `app` (a `trit.server.create_app` app)."""
    from fastapi.responses import HTMLResponse

    html = page()

    @app.get("/", include_in_schema=False)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(
            html,
            headers={
                "content-security-policy": CONTENT_SECURITY_POLICY,
                "cache-control": "no-cache",
            },
        )
