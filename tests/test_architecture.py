"""House rules that the code's shape must keep: one-way imports, no pickle in the server path."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def imports(package: str) -> dict[Path, set[str]]:
    found = {}
    for path in (REPO / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
                if node.module.startswith("server.engine"):
                    names.add("server.engine")
        found[path] = names
    return found


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("adapters_store", {"fastapi", "starlette", "vllm", "server", "torch"}),
        ("aligner_core", {"fastapi", "starlette", "vllm", "server"}),
        ("clients", {"server", "vllm", "adapters_store", "aligner_core", "fastapi"}),
    ],
)
def test_dependencies_point_one_way(package: str, forbidden: set[str]) -> None:
    bad = {
        str(p.relative_to(REPO)): sorted(names & forbidden)
        for p, names in imports(package).items()
        if names & forbidden
    }
    assert not bad, bad


def test_only_the_engine_package_imports_vllm() -> None:
    outside = {
        str(p.relative_to(REPO))
        for p, names in imports("server").items()
        if "vllm" in names and "engine" not in p.relative_to(REPO).parts
    }
    assert not outside, outside


def test_no_pickle_in_the_server_path() -> None:
    offenders = []
    for package in ("server", "adapters_store"):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            for needle in ("pickle", "torch.load", "weights_only=False", "marshal.loads", "eval("):
                if needle in text:
                    offenders.append(f"{path.relative_to(REPO)}: {needle}")
    for path in (REPO / "aligner_core").rglob("*.py"):  # the importer may read torch zips, only weights-only
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "pickle.load", "pickle.loads"):
                kw = {k.arg: ast.unparse(k.value) for k in node.keywords}
                if kw.get("weights_only") != "True":
                    offenders.append(f"{path.relative_to(REPO)}: {ast.unparse(node)[:60]}")
    assert not offenders, offenders
