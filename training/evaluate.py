"""`aligner eval`: persona compliance of the base model versus each adapter, through a running server.

Every held-out prompt is sent greedily (temperature 0) to the real server with the official `openai`
client, once without an adapter and once per adapter (`extra_body={"adapter": name}`); each reply is
checked by the persona's checker (`training.personas`).

    aligner serve --port 8123 &
    aligner eval --base-url http://127.0.0.1:8123 --upload-dir examples/adapters \
                 --adapters pirate=pirate,json=json,bullets=bullets
    aligner eval --base-url http://127.0.0.1:8123 --upload-dir examples/adapters --safety safety

`--safety` scores the value profile instead: refusals on held-out harmful prompts, answers on benign ones
(`training.safety.is_refusal`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from training.personas import PERSONAS


def _v1(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def load_prompts(path: str | None) -> list[str]:
    if path:
        p = Path(path)
        if p.suffix == ".jsonl":
            return [json.loads(line)["prompt"] for line in p.read_text().splitlines() if line.strip()]
        return [line.strip() for line in p.read_text().splitlines() if line.strip()]
    from training.data import eval_prompts

    return eval_prompts()


def parse_mapping(text: str) -> dict[str, str]:
    """`pirate=pirate-v2,json` -> {"pirate": "pirate-v2", "json": "json"}."""
    out: dict[str, str] = {}
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        persona, _, name = item.partition("=")
        if persona not in PERSONAS:
            raise SystemExit(f"aligner eval: unknown persona {persona!r}; known: {', '.join(PERSONAS)}")
        out[persona] = name or persona
    return out


@dataclass
class Replies:
    """Greedy replies to the same prompts, without an adapter and with each adapter."""

    model: str
    info: dict[str, dict]  # label -> the server's adapter record
    base: list[str]
    adapters: dict[str, list[str]]  # label -> replies, in prompt order
    seconds: float


def collect(
    base_url: str,
    api_key: str,
    adapters: dict[str, str],
    prompts: list[str],
    *,
    upload_dir: str | None = None,
    max_tokens: int = 200,
    concurrency: int = 16,
    model: str | None = None,
) -> Replies:
    """Ask the server every prompt once without an adapter and once per adapter (label -> adapter name);
    with `upload_dir`, first upload DIR/<label>.safetensors under each name."""
    import httpx
    from openai import OpenAI

    v1 = _v1(base_url)
    headers = {"Authorization": f"Bearer {api_key}"}
    http = httpx.Client(base_url=v1, headers=headers, timeout=60)
    if upload_dir:
        for label, name in adapters.items():
            path = Path(upload_dir) / f"{label}.safetensors"
            r = http.post("/adapters", files={"file": (path.name, path.read_bytes())}, data={"name": name})
            if r.status_code >= 300:
                raise SystemExit(f"aligner eval: uploading {path} as {name!r} failed: {r.status_code} {r.text}")
    info = {}
    for label, name in adapters.items():
        r = http.get(f"/adapters/{name}")
        if r.status_code != 200:
            raise SystemExit(f"aligner eval: adapter {name!r} not found on the server ({r.status_code} {r.text})")
        info[label] = r.json()
    client = OpenAI(base_url=v1, api_key=api_key, timeout=600, max_retries=2)
    model = model or client.models.list().data[0].id

    def ask(job: tuple[str | None, str]) -> str:
        adapter, prompt = job
        resp = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0.0,
            max_tokens=max_tokens,
            extra_body={"adapter": adapter} if adapter else None,
        )
        return resp.choices[0].message.content or ""

    jobs = [(None, p) for p in prompts] + [(name, p) for name in adapters.values() for p in prompts]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(ask, jobs))
    n = len(prompts)
    by_label = {label: replies[n * (k + 1) : n * (k + 2)] for k, label in enumerate(adapters)}
    return Replies(model, info, replies[:n], by_label, round(time.perf_counter() - t0, 1))


def evaluate(base_url: str, api_key: str, adapters: dict[str, str], prompts: list[str], **kw: Any) -> dict:
    """Persona compliance (persona -> adapter name): the share of replies the persona's checker accepts."""
    got = collect(base_url, api_key, adapters, prompts, **kw)
    rows = []
    for persona, name in adapters.items():
        mine = got.adapters[persona]
        check = PERSONAS[persona].check
        base_ok = [check(r) for r in got.base]
        ad_ok = [check(r) for r in mine]
        rows.append(
            {
                "persona": persona,
                "adapter": name,
                "version": got.info[persona].get("version"),
                "tokens": got.info[persona]["tokens"],
                "params": got.info[persona]["params"],
                "base_compliance": sum(base_ok) / len(prompts),
                "adapter_compliance": sum(ad_ok) / len(prompts),
                "examples": [
                    {"prompt": p, "base": b, "adapter": a, "ok": ok}
                    for p, b, a, ok in list(zip(prompts, got.base, mine, ad_ok))[:3]
                ],
                "failures": [{"prompt": p, "adapter": a} for p, a, ok in zip(prompts, mine, ad_ok) if not ok][:5],
            }
        )
    return {
        "model": got.model,
        "prompts": len(prompts),
        "max_tokens": kw.get("max_tokens", 200),
        "seconds": got.seconds,
        "results": rows,
    }


def evaluate_safety(base_url: str, api_key: str, name: str, path: str, **kw: Any) -> dict:
    """The `safety` profile (adapter `name`): refusal rate on the held-out harmful prompts of `path`
    (`training.safety` rows: {"prompt", "harmful"}) and answer rate on the benign ones, base vs adapter."""
    from training.safety import safety_scores

    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    got = collect(base_url, api_key, {"safety": name}, [r["prompt"] for r in rows], **kw)
    report = safety_scores(rows, got.base, got.adapters["safety"])
    return {
        "model": got.model,
        "name": name,
        "tokens": got.info["safety"]["tokens"],
        "seconds": got.seconds,
        **report,
    }


def format_table(report: dict) -> str:
    head = f"{'persona':<10} {'adapter':<14} {'tokens':>6} {'params':>7} {'base':>7} {'adapter':>8}"
    lines = [f"model {report['model']}, {report['prompts']} held-out prompts, greedy", head, "-" * len(head)]
    for r in report["results"]:
        lines.append(
            f"{r['persona']:<10} {r['adapter']:<14} {r['tokens']:>6} {r['params']:>7} "
            f"{r['base_compliance']:>7.0%} {r['adapter_compliance']:>8.0%}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="aligner eval", description="Persona compliance: base model vs adapters, via the server."
    )
    ap.add_argument("--base-url", default=os.environ.get("ALIGNER_BASE_URL", "http://127.0.0.1:8000"))
    ap.add_argument(
        "--api-key", default=os.environ.get("ALIGNER_API_KEY", "none"), help="tenant API key (open mode: any)"
    )
    ap.add_argument(
        "--adapters",
        default=",".join(f"{p}={p}" for p in PERSONAS),
        help="persona=adapter_name pairs, comma-separated (default: pirate=pirate,json=json,bullets=bullets)",
    )
    ap.add_argument("--upload-dir", help="first upload DIR/<persona>.safetensors under each adapter name")
    ap.add_argument(
        "--prompts", help="held-out prompts: .jsonl with 'prompt' or one per line (default: the generator's)"
    )
    ap.add_argument("--limit", type=int, help="use only the first N prompts")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--model", help="served model id (default: the server's first)")
    ap.add_argument("--json", action="store_true", help="print the full report as JSON instead of a table")
    ap.add_argument(
        "--safety",
        metavar="ADAPTER",
        help="evaluate the safety profile ADAPTER instead (refusals on harmful prompts, answers on benign ones; "
        "--prompts default examples/data/safety_eval.jsonl; --upload-dir uploads DIR/safety.safetensors)",
    )
    args = ap.parse_args(argv)
    kw = {"upload_dir": args.upload_dir, "max_tokens": args.max_tokens, "concurrency": args.concurrency}
    if args.safety:
        from training.safety import format_safety

        path = args.prompts or "examples/data/safety_eval.jsonl"
        report = evaluate_safety(args.base_url, args.api_key, args.safety, path, model=args.model, **kw)
        print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else format_safety(report))
        return 0
    prompts = load_prompts(args.prompts)[: args.limit]
    report = evaluate(
        args.base_url,
        args.api_key,
        parse_mapping(args.adapters),
        prompts,
        model=args.model,
        **kw,
    )
    print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else format_table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
