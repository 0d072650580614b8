"""The playground page: chat with an adapter beside the base model, list and upload adapters.

A static page; it talks to the public API with the key the user types, so it has no powers of its own.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["ui"])


@cache
def _page() -> str:
    return (Path(__file__).resolve().parents[1] / "static" / "playground.html").read_text()


@router.get("/ui", response_class=HTMLResponse, include_in_schema=False)
async def playground() -> HTMLResponse:
    return HTMLResponse(_page())
