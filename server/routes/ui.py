"""The playground pages: `/ui` chats with an adapter beside the base model and lists and uploads adapters;
`/ui/fine-tune` trains one (upload a JSONL file, start a job, watch its loss) and then chats with it beside
the base model.

Static pages; they talk to the public API with the key the user types, so they have no powers of their own.
Each is one file, but for the streamed chat both use (`/ui/chat.js`); no CDN, so they work offline.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response

router = APIRouter(tags=["ui"])


@cache
def _page(name: str) -> str:
    return (Path(__file__).resolve().parents[1] / "static" / name).read_text()


@router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(_page("playground.html"))


@router.get("/ui/fine-tune", response_class=HTMLResponse, include_in_schema=False)
async def fine_tune_playground() -> HTMLResponse:
    return HTMLResponse(_page("fine-tune.html"))


@router.get("/ui/chat.js", include_in_schema=False)
async def chat_script() -> Response:
    return Response(_page("chat.js"), media_type="text/javascript")
