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

Strength and stacks (the request's `adapters`, `server/stacking.py`): `--scales 0,0.5,1,1.5` also asks every
prompt of each persona's adapter at each scale (`extra_body={"adapters": [{"name": name, "scale": s}]}`);
`--stack json,bullets` asks once more with both adapters stacked and reports the share of replies each
checker accepts, and both, beside each adapter alone and the base model.

    aligner eval --adapters pirate=pirate --scales 0,0.25,0.5,0.75,1,1.5 --stack json,bullets
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


def parse_scales(text: str) -> list[float]:
    """`0,0.5,1` -> [0.0, 0.5, 1.0] (the server checks the bounds)."""
    try:
        scales = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"aligner eval: --scales wants numbers, comma-separated (got {text!r})") from None
    if not scales:
        raise SystemExit("aligner eval: --scales names no scale")
    return scales


def sweep_label(persona: str, scale: float) -> str:
    return f"{persona}@{scale:g}"


def stack_label(personas: list[str]) -> str:
    return "+".join(personas)


@dataclass
class Replies:
    """Greedy replies to the same prompts, without an adapter and with each adapter."""

    model: str
    info: dict[str, dict]  # label -> the server's adapter record
    base: list[str]
    adapters: dict[str, list[str]]  # label -> replies, in prompt order
    seconds: float
    variants: dict[str, list[str]] | None = None  # label -> replies with that `adapters` stack


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
    variants: dict[str, list[dict]] | None = None,
) -> Replies:
    """Ask the server every prompt once without an adapter and once per adapter (label -> adapter name);
    with `upload_dir`, first upload DIR/<label>.safetensors under each name. `variants` (label -> a
    request's `adapters`, [{"name", "scale"}, ...]) asks every prompt once more per variant."""
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

    def ask(job: tuple[dict | None, str]) -> str:
        body, prompt = job
        resp = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0.0,
            max_tokens=max_tokens,
            extra_body=body,
        )
        return resp.choices[0].message.content or ""

    bodies: list[dict | None] = [None] + [{"adapter": name} for name in adapters.values()]
    bodies += [{"adapters": stack} for stack in (variants or {}).values()]
    jobs = [(body, p) for body in bodies for p in prompts]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        replies = list(pool.map(ask, jobs))
    n = len(prompts)
    labels = list(adapters) + list(variants or {})
    by_label = {label: replies[n * (k + 1) : n * (k + 2)] for k, label in enumerate(labels)}
    return Replies(
        model,
        info,
        replies[:n],
        {label: by_label[label] for label in adapters},
        round(time.perf_counter() - t0, 1),
        {label: by_label[label] for label in variants} if variants is not None else None,
    )


def evaluate(
    base_url: str,
    api_key: str,
    adapters: dict[str, str],
    prompts: list[str],
    *,
    scales: list[float] | None = None,
    stack: list[str] | None = None,
    **kw: Any,
) -> dict:
    """Persona compliance (persona -> adapter name): the share of replies the persona's checker accepts.
    `scales`: also each persona's adapter at each scale (report "sweep"); `stack` (personas): also the
    adapters of those personas stacked at scale 1, each persona's checker and all of them (report "stack")."""
    swept = dict(adapters) if scales else {}  # the personas asked for, not those added for the stack
    if stack:
        missing = [p for p in stack if p not in PERSONAS]
        if missing:
            raise SystemExit(f"aligner eval: unknown persona {missing[0]!r}; known: {', '.join(PERSONAS)}")
        adapters = adapters | {p: p for p in stack if p not in adapters}  # each alone, to compare with
    variants: dict[str, list[dict]] = {}
    for persona, name in swept.items():
        for s in scales or ():
            variants[sweep_label(persona, s)] = [{"name": name, "scale": s}]
    if stack:
        variants[stack_label(stack)] = [{"name": adapters[p]} for p in stack]
    if variants:
        kw["variants"] = variants
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
    report = {
        "model": got.model,
        "prompts": len(prompts),
        "max_tokens": kw.get("max_tokens", 200),
        "seconds": got.seconds,
        "results": rows,
    }
    if scales:
        report["sweep"] = sweep_rows(got, swept, scales)
    if stack:
        report["stack"] = stack_report(got, adapters, stack)
    return report


def _share(replies: list[str], ok: Any) -> float:
    return sum(1 for r in replies if ok(r)) / len(replies) if replies else 0.0


def sweep_rows(got: Replies, adapters: dict[str, str], scales: list[float]) -> list[dict]:
    """Per persona and scale: the checker's pass rate, and the share of replies identical to the base
    model's and to the plain adapter's (scale 0 should match the base, scale 1 the adapter)."""
    rows = []
    for persona, name in adapters.items():
        check = PERSONAS[persona].check
        plain = got.adapters[persona]
        for s in scales:
            mine = (got.variants or {})[sweep_label(persona, s)]
            rows.append(
                {
                    "persona": persona,
                    "adapter": name,
                    "scale": s,
                    "compliance": _share(mine, check),
                    "same_as_base": sum(a == b for a, b in zip(mine, got.base)) / len(mine),
                    "same_as_adapter": sum(a == b for a, b in zip(mine, plain)) / len(mine),
                    "example": mine[0] if mine else "",
                }
            )
    return rows


def stack_report(got: Replies, adapters: dict[str, str], stack: list[str]) -> dict:
    """The stack's replies and, to compare, the base model's and each adapter's alone: the share each
    stacked persona's checker accepts, and the share all of them accept."""
    checks = {p: PERSONAS[p].check for p in stack}
    sources = {"base": got.base} | {f"{p} alone": got.adapters[p] for p in stack}
    sources[" + ".join(stack)] = (got.variants or {})[stack_label(stack)]
    rows = []
    for label, replies in sources.items():
        each = {p: _share(replies, c) for p, c in checks.items()}
        every = _share(replies, lambda r: all(c(r) for c in checks.values()))
        rows.append({"replies": label, "each": each, "all": every})
    return {
        "personas": stack,
        "adapters": [adapters[p] for p in stack],
        "rows": rows,
        "examples": sources[" + ".join(stack)][:3],
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


def format_sweep(report: dict) -> str:
    """The strength sweep as a markdown table: one row per persona and scale."""
    lines = [
        "| persona | adapter | scale | compliance | same as base | same as the plain adapter |",
        "|---|---|---|---|---|---|",
    ]
    base = {r["persona"]: r["base_compliance"] for r in report["results"]}
    for persona in dict.fromkeys(r["persona"] for r in report["sweep"]):
        lines.append(f"| {persona} | (base model) | — | {base[persona]:.0%} | | |")
        for r in (r for r in report["sweep"] if r["persona"] == persona):
            lines.append(
                f"| {persona} | {r['adapter']} | {r['scale']:g} | {r['compliance']:.0%} "
                f"| {r['same_as_base']:.0%} | {r['same_as_adapter']:.0%} |"
            )
    return "\n".join(lines)


def format_stack(report: dict) -> str:
    """The stack against each adapter alone and the base model, as a markdown table."""
    st = report["stack"]
    personas = st["personas"]
    lines = [
        "| replies | " + " | ".join(f"{p} check" for p in personas) + " | all checks |",
        "|---" * (len(personas) + 2) + "|",
    ]
    for r in st["rows"]:
        lines.append(
            f"| {r['replies']} | " + " | ".join(f"{r['each'][p]:.0%}" for p in personas) + f" | {r['all']:.0%} |"
        )
    return "\n".join(lines)


def format_report(report: dict) -> str:
    """The table, then the sweep and the stack where the report has them."""
    parts = [format_table(report)]
    if "sweep" in report:
        parts.append(format_sweep(report))
    if "stack" in report:
        parts.append(format_stack(report))
    return "\n\n".join(parts)


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
        "--scales",
        type=parse_scales,
        help="also evaluate each persona's adapter at each of these scales, comma-separated (e.g. 0,0.5,1,1.5)",
    )
    ap.add_argument(
        "--stack",
        type=lambda t: [p.strip() for p in t.split(",") if p.strip()],
        help="personas whose adapters to stack in one request (e.g. json,bullets): each checker and all of "
        "them, vs each adapter alone",
    )
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
        scales=args.scales,
        stack=args.stack,
        **kw,
    )
    print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
