"""API keys and the admin key: issued once, stored hashed, compared in constant time, never logged."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from fastapi import Request

KEY_PREFIX = "ak-"


@dataclass(frozen=True)
class IssuedKey:
    key: str  # shown to the admin once, never stored
    key_hash: str
    prefix: str  # what listings show


def issue_key() -> IssuedKey:
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return IssuedKey(key=key, key_hash=hash_key(key), prefix=key[:10])


def hash_key(key: str) -> str:
    """Keys carry 256 random bits, so a plain SHA-256 is enough to make a leaked table useless."""
    return hashlib.sha256(key.encode()).hexdigest()


def same_secret(given: str, expected: str) -> bool:
    return hmac.compare_digest(given.encode(), expected.encode())


def bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()
