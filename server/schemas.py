"""Wire schemas. Storage ids of other tenants and blobs never leave the server."""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime
from typing import Literal

from pydantic import BaseModel

from adapters_store import AdapterRecord
from server.errors import InvalidRequest

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# ASCII digits only: str.isdigit() and int() also take "¹", "١", "０", "+1", " 1" and "1_0".
VERSION_RE = re.compile(r"[0-9]{1,10}")
MAX_VERSION = 2**31 - 1  # the stores' INTEGER column (PostgreSQL's is 32-bit)


class AdapterRef(BaseModel):
    """`name` or `name@version`."""

    name: str
    version: int | None = None

    @classmethod
    def parse(cls, text: str, *, param: str = "adapter") -> AdapterRef:
        name, sep, ver = text.partition("@")
        check_name(name, param=param)
        if not sep:
            return cls(name=name)
        if not VERSION_RE.fullmatch(ver) or not 1 <= int(ver) <= MAX_VERSION:
            raise InvalidRequest(
                f"{text[:80]!r}: a version after '@' must be an integer from 1 to {MAX_VERSION} in ASCII digits",
                param=param,
            )
        return cls(name=name, version=int(ver))

    def __str__(self) -> str:
        return self.name if self.version is None else f"{self.name}@{self.version}"


def check_name(name: str, *, param: str = "name") -> str:
    if not NAME_RE.fullmatch(name):  # not .match: its "$" also matches before a trailing newline
        raise InvalidRequest(
            f"invalid adapter name {name[:80]!r}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
            param=param,
        )
    return name


class AdapterPublic(BaseModel):
    id: str
    object: Literal["adapter"] = "adapter"
    name: str
    version: int
    tokens: int
    params: int
    bytes: int
    sha256: str
    base_model: str
    public: bool
    created_at: datetime

    @classmethod
    def of(cls, r: AdapterRecord) -> AdapterPublic:
        """The record as the API shows it: its fields less the store's id and tenant, named `name@version`."""
        shown = {k: v for k, v in dataclasses.asdict(r).items() if k in cls.model_fields and k != "id"}
        return cls(id=f"{r.name}@{r.version}", **shown)


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterPublic]
    has_more: bool
    next_after: str | None = None


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter.deleted"] = "adapter.deleted"
    deleted: bool = True
    versions: list[int]


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    root: str | None = None
    parent: str | None = None
    adapter: AdapterPublic | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
