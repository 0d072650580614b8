"""`aligner-client`: adapters, chat and the admin API from the shell.

    aligner-client adapters upload NAME FILE | list | show NAME[@N] | versions NAME | delete NAME[@N]
    aligner-client models
    aligner-client chat [--adapter X[:SCALE]]... [--stream] [--max-tokens N] "prompt"
    aligner-client admin tenants create NAME [--max-adapters N] [--requests-per-minute N] [--max-n N] [...]
    aligner-client admin tenants list | tenants set-quotas TENANT_ID [...]
    aligner-client admin keys create TENANT_ID | keys list TENANT_ID | keys revoke KEY_ID
    aligner-client admin publish NAME FILE | unpublish NAME[@N]
    aligner-client fine-tune create --file DATA.jsonl [--method dpo] [--suffix S] [--epochs N] [--wait] [...]
    aligner-client fine-tune list | show JOB | events JOB | cancel JOB | wait JOB

`--base-url` / `--api-key` (anywhere on the line) or ALIGNER_BASE_URL / ALIGNER_API_KEY; admin commands use
`--api-key`, else ALIGNER_ADMIN_KEY, else ALIGNER_API_KEY. Tables by default, `--json` for scripts.
`chat --adapter` is NAME, NAME@VERSION or @FILE (an aligner/v1 file sent inline), each with an optional
`:SCALE` (split on the last ':'); repeated, it stacks adapters. One `--adapter NAME` sends `adapter` as before;
several, a scale or a file send `adapters`.
`fine-tune create` uploads the file (or takes `--training-file FILE_ID`), starts a job and with `--wait` prints
its events (each step's loss) until it finishes, then the fine-tuned model's name alone on the last line.
Exit status: 0 ok, 1 the server refused (its message on stderr), could not be reached, or a waited-for job
failed or was cancelled (its error on stderr), 2 bad usage.
`main(argv)` is also what the server's `aligner adapters|chat|admin|models|fine-tune ...` dispatches to
(`aligner fine-tune worker`, the training worker, is the server's own).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

from aligner_client import _core as core
from aligner_client import models as m
from aligner_client._client import Client
from aligner_client._core import AdapterSpec
from aligner_client.errors import AlignerError, APIError

COMMANDS = ("adapters", "models", "chat", "admin", "fine-tune")


# ------------------------------------------------------------------------------------------------ output


def _plain(value: Any) -> Any:
    if hasattr(value, "model_dump"):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def print_json(value: Any, out: TextIO) -> None:
    print(json.dumps(_plain(value), indent=2), file=out)


def table(rows: list[dict[str, Any]], columns: Sequence[str], out: TextIO) -> None:
    """Left-aligned columns separated by two spaces; numbers right-aligned."""
    if not rows:
        print("(none)", file=out)
        return
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    numeric = [
        all(isinstance(r.get(c), (int, float)) and not isinstance(r.get(c), bool) for r in rows) for c in columns
    ]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip(), file=out)
    for row in cells:
        line = "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(row, widths, numeric))
        print(line.rstrip(), file=out)


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if hasattr(v, "isoformat"):
        return v.isoformat(timespec="seconds")
    return str(v)


def fields(obj: Any, out: TextIO) -> None:
    """One object as `key  value` lines."""
    data = obj.model_dump() if hasattr(obj, "model_dump") else dict(obj)
    width = max(len(k) for k in data)
    for k, v in data.items():
        if isinstance(v, dict):
            v = ", ".join(f"{a}={_cell(b)}" for a, b in v.items())
        print(f"{k.ljust(width)}  {_cell(v)}", file=out)


ADAPTER_COLUMNS = ("id", "tokens", "params", "bytes", "public", "created_at", "sha256")


def _adapter_rows(adapters: Sequence[m.Adapter]) -> list[dict[str, Any]]:
    return [a.model_dump() | {"sha256": a.sha256[:12]} for a in adapters]


def _tenant_rows(tenants: Sequence[m.Tenant]) -> list[dict[str, Any]]:
    return [t.model_dump(exclude={"quotas"}) | t.quotas.model_dump() for t in tenants]


# ------------------------------------------------------------------------------------------------ commands


def _split_ref(text: str) -> tuple[str, int | None]:
    name, sep, ver = text.partition("@")
    return (name, int(ver)) if sep and ver.isdigit() else (text, None)


def _adapters(c: Client, a: argparse.Namespace, out: TextIO) -> int:
    if a.action == "upload":
        ad = c.adapters.upload(a.name, a.file)
        print_json(ad, out) if a.json else print(
            f"uploaded {ad.id}: {ad.tokens} tokens, {ad.params} params, {ad.bytes} bytes, sha256 {ad.sha256[:12]}",
            file=out,
        )
    elif a.action == "list":
        items = c.adapters.list(limit=a.limit).data if a.limit else list(c.adapters.list_all())
        print_json(items, out) if a.json else table(_adapter_rows(items), ADAPTER_COLUMNS, out)
    elif a.action == "show":
        ad = c.adapters.get(*_split_ref(a.name))
        print_json(ad, out) if a.json else fields(ad, out)
    elif a.action == "versions":
        items = c.adapters.versions(a.name).data
        print_json(items, out) if a.json else table(_adapter_rows(items), ADAPTER_COLUMNS, out)
    elif a.action == "delete":
        d = c.adapters.delete(*_split_ref(a.name))
        print_json(d, out) if a.json else print(
            f"deleted {d.id} (versions {', '.join(map(str, d.versions))})", file=out
        )
    return 0


def _models(c: Client, a: argparse.Namespace, out: TextIO) -> int:
    cards = c.models.list().data
    if a.json:
        print_json(cards, out)
    else:
        rows = [{"id": x.id, "kind": "adapter" if x.parent else "base", "owned_by": x.owned_by} for x in cards]
        table(rows, ("id", "kind", "owned_by"), out)
    return 0


def adapter_flag(text: str) -> AdapterSpec:
    """One `--adapter` value: NAME, NAME@VERSION or @FILE, each with an optional `:SCALE` after the last ':'.
    A bad scale or an unreadable file is a usage error naming the value."""
    try:
        spec = AdapterSpec.parse(text)
        if spec.name is not None and spec.name.startswith("@"):  # names start with a letter or digit
            return AdapterSpec.from_file(spec.name[1:], scale=spec.scale)
        return spec
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: cannot read the file: {e.strerror or e}") from e
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def _adapter_kw(flags: list[AdapterSpec] | None) -> dict[str, Any]:
    """One plain `--adapter NAME` keeps the `adapter` field; anything more is a stack."""
    if not flags:
        return {}
    if len(flags) == 1 and flags[0].name is not None and flags[0].scale is None:
        return {"adapter": flags[0].name}
    return {"adapters": flags}


def _chat(c: Client, a: argparse.Namespace, out: TextIO) -> int:
    messages = ([{"role": "system", "content": a.system}] if a.system else []) + [{"role": "user", "content": a.prompt}]
    kw = dict(model=a.model, max_tokens=a.max_tokens, temperature=a.temperature, **_adapter_kw(a.adapter))
    if not a.stream:
        reply = c.chat.create(messages, **kw)
        print_json(reply, out) if a.json else print(reply.text, file=out)
        return 0
    with c.chat.create(messages, stream=True, **kw) as stream:
        for chunk in stream:
            if a.json:
                print(json.dumps(chunk.model_dump(mode="json")), file=out, flush=True)
            else:
                print(chunk.text, end="", file=out, flush=True)
    if not a.json:
        print(file=out)
    return 0


def _quota_kw(a: argparse.Namespace) -> dict[str, int | None]:
    return {name: getattr(a, name) for name in core.QUOTAS}


def _admin(c: Client, a: argparse.Namespace, out: TextIO) -> int:
    tenant_cols = ("id", "name", *core.QUOTAS, "created_at")
    key_cols = ("id", "tenant_id", "prefix", "revoked", "created_at")
    if a.group == "tenants":
        if a.action == "list":
            items = c.admin.tenants.list().data
            print_json(items, out) if a.json else table(_tenant_rows(items), tenant_cols, out)
            return 0
        t = (
            c.admin.tenants.create(a.name, **_quota_kw(a))
            if a.action == "create"
            else c.admin.tenants.set_quotas(a.tenant_id, **_quota_kw(a))
        )
        print_json(t, out) if a.json else fields(t, out)
    elif a.group == "keys":
        if a.action == "list":
            keys = c.admin.keys.list(a.tenant_id).data
            print_json(keys, out) if a.json else table([k.model_dump() for k in keys], key_cols, out)
        elif a.action == "create":
            k = c.admin.keys.create(a.tenant_id)
            if a.json:
                print_json(k, out)
            else:
                print(f"key {k.id} for tenant {k.tenant_id} (shown once, store it now):\n{k.key}", file=out)
        else:
            k = c.admin.keys.revoke(a.key_id)
            print_json(k, out) if a.json else print(f"revoked {k.id} ({k.prefix}…)", file=out)
    elif a.group == "publish":
        ad = c.admin.adapters.upload(a.name, a.file)
        print_json(ad, out) if a.json else print(f"published {ad.id}: {ad.tokens} tokens, {ad.bytes} bytes", file=out)
    elif a.group == "unpublish":
        d = c.admin.adapters.delete(*_split_ref(a.name))
        print_json(d, out) if a.json else print(
            f"withdrew {d.id} (versions {', '.join(map(str, d.versions))})", file=out
        )
    return 0


JOB_COLUMNS = ("id", "status", "method", "training_file", "fine_tuned_model", "created_at")


def _job_rows(jobs: Sequence[m.FineTuningJob]) -> list[dict[str, Any]]:
    return [j.model_dump() | {"method": j.method.get("type"), "created_at": _time(j.created_at)} for j in jobs]


def _time(unix: int | None) -> str | None:
    return None if unix is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(unix))  # UTC


def _event_line(e: m.FineTuningJobEvent) -> str:
    level = "" if e.level == "info" else f"{e.level}: "
    return f"{_time(e.created_at)}  {level}{e.message}"


def _job_summary(j: m.FineTuningJob) -> str:
    hp = ", ".join(f"{k}={v}" for k, v in j.hyperparameters.items())
    return f"{j.id} ({j.status}): {j.method.get('type', '?')} on {j.training_file}, {hp}"


def _follow(c: Client, job_id: str, a: argparse.Namespace, out: TextIO) -> int:
    """Print the job's events as they come until it finishes; its fine_tuned_model last, or its error."""

    def show(e: m.FineTuningJobEvent) -> None:
        print(json.dumps(e.model_dump(mode="json")) if a.json else _event_line(e), file=out, flush=True)

    job = c.fine_tuning.jobs.wait(job_id, poll_s=a.poll, timeout=a.wait_timeout, on_event=show)
    if a.json:
        print_json(job, out)
    elif job.status == "succeeded":
        print(job.fine_tuned_model, file=out)
    if job.status == "succeeded":
        return 0
    why = f" [{job.error.code}]: {job.error.message}" if job.error else ""
    print(f"{a.prog}: fine-tuning job {job.id} {job.status}{why}", file=sys.stderr)
    return 1


def _fine_tune(c: Client, a: argparse.Namespace, out: TextIO) -> int:
    jobs = c.fine_tuning.jobs
    if a.action == "create":
        training = a.training_file
        if training is None:
            f = c.files.create(a.file)
            training = f.id
            if not a.json:
                print(f"uploaded {a.file} as {f.id} ({f.bytes} bytes)", file=out)
        shape = {"tokens": a.tokens, "start_layer": a.start_layer, "gate_activation": a.gate_activation}
        job = jobs.create(
            training,
            model=a.model,
            method=a.method,
            n_epochs=a.epochs,
            batch_size=a.batch_size,
            learning_rate_multiplier=a.lr_multiplier,
            beta=a.beta,
            validation_file=a.validation_file,
            suffix=a.suffix,
            seed=a.seed,
            aligner=shape,
        )
        if a.json and not a.wait:
            print_json(job, out)
        elif not a.json:
            print(f"created {_job_summary(job)}", file=out, flush=True)
        return _follow(c, job.id, a, out) if a.wait else 0
    if a.action == "list":
        items = jobs.list(limit=a.limit).data
        print_json(items, out) if a.json else table(_job_rows(items), JOB_COLUMNS, out)
    elif a.action == "show":
        job = jobs.retrieve(a.job_id)
        times = {k: _time(getattr(job, k)) for k in ("created_at", "started_at", "finished_at")}
        print_json(job, out) if a.json else fields(job.model_dump() | times, out)
    elif a.action == "events":
        events = jobs.list_events(a.job_id, limit=a.limit).data[::-1]  # oldest first, as a log reads
        if a.json:
            print_json(events, out)
        else:
            for e in events:
                print(_event_line(e), file=out)
    elif a.action == "cancel":
        job = jobs.cancel(a.job_id)
        if a.json:
            print_json(job, out)
        elif job.status == "cancelled":
            print(f"cancelled {job.id}", file=out)
        else:  # running: the worker stops it at its next step
            print(f"cancelling {job.id} ({job.status}): it stops at its next step", file=out)
    elif a.action == "wait":
        return _follow(c, a.job_id, a, out)
    return 0


# ------------------------------------------------------------------------------------------------ parser


def _common(suppress: bool) -> argparse.ArgumentParser:
    """Options accepted before or after the subcommand (SUPPRESS keeps a later level from resetting them)."""
    p = argparse.ArgumentParser(add_help=False)
    d: dict[str, Any] = {"default": argparse.SUPPRESS} if suppress else {}
    p.add_argument("--base-url", help="server root (default: $ALIGNER_BASE_URL or http://127.0.0.1:8000)", **d)
    p.add_argument(
        "--api-key",
        help="API key; for admin commands the admin key (default: $ALIGNER_API_KEY; admin: $ALIGNER_ADMIN_KEY)",
        **d,
    )
    p.add_argument("--json", action="store_true", help="machine-readable output", **d)
    p.add_argument("--timeout", type=float, help="seconds per request (default 300)", **d)
    return p


_QUOTA_HELP = {
    "max_adapters": "adapter versions",
    "max_adapter_bytes": "total adapter bytes",
    "requests_per_minute": "generation requests per minute",
    "max_concurrent_requests": "requests in flight at once",
    "max_n": "sequences (n x prompts) of one request",
    "max_tokens_in_flight": "n x (prompt + max_tokens) in flight",
    "max_active_adapters": "distinct adapters in flight at once",
    "max_files": "fine-tuning files stored",
    "max_file_bytes": "total fine-tuning file bytes",
    "max_queued_jobs": "fine-tuning jobs queued or running at once",
    "max_training_tokens": "tokens trained on, over the jobs that did not fail",
}


def _quota_args(p: argparse.ArgumentParser) -> None:
    for name in core.QUOTAS:
        p.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            help=f"{_QUOTA_HELP[name]} (create: the server's default; set-quotas: unchanged)",
        )


def build_parser(prog: str = "aligner-client") -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog=prog, parents=[_common(False)], description="Client for aligner-serve.")
    top.set_defaults(prog=prog)  # for the messages a handler prints itself
    common = [_common(True)]
    sub = top.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")

    def leaf(parent: Any, name: str, help: str, **kw: Any) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help, parents=common, **kw)

    ad = sub.add_parser("adapters", help="upload, list, show, version and delete adapters").add_subparsers(
        dest="action", required=True
    )
    p = leaf(ad, "upload", "upload an aligner/v1 file (an existing NAME gets a new version)")
    p.add_argument("name")
    p.add_argument("file")
    p = leaf(ad, "list", "list adapters (newest version of each)")
    p.add_argument("--limit", type=int, help="one page of at most N (default: every page)")
    for action, help in (
        ("show", "one adapter (NAME or NAME@VERSION)"),
        ("versions", "every version of NAME"),
        ("delete", "delete NAME (all versions) or NAME@VERSION"),
    ):
        leaf(ad, action, help).add_argument("name")

    leaf(sub, "models", "the base model and the adapters you can use")

    p = leaf(sub, "chat", "one chat completion")
    p.add_argument("prompt")
    p.add_argument(
        "--adapter",
        action="append",
        type=adapter_flag,
        metavar="X[:SCALE]",
        help="NAME, NAME@VERSION or @FILE (sent inline), with an optional strength :SCALE (default 1; 0 is the "
        "base model); repeat it to stack adapters (default: the base model)",
    )
    p.add_argument("--model", help="model id (default: the server's base model)")
    p.add_argument("--system", help="a system message")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--max-tokens", type=int)
    p.add_argument("--temperature", type=float)

    adm = sub.add_parser("admin", help="tenants, keys and public adapters (admin key)").add_subparsers(
        dest="group", required=True
    )
    ten = adm.add_parser("tenants", help="create, list, set quotas").add_subparsers(dest="action", required=True)
    p = leaf(ten, "create", "create a tenant")
    p.add_argument("name")
    _quota_args(p)
    leaf(ten, "list", "list tenants")
    p = leaf(ten, "set-quotas", "replace a tenant's quotas (one left out becomes unlimited)")
    p.add_argument("tenant_id")
    _quota_args(p)
    keys = adm.add_parser("keys", help="issue, list, revoke API keys").add_subparsers(dest="action", required=True)
    leaf(keys, "create", "issue a key (shown once)").add_argument("tenant_id")
    leaf(keys, "list", "a tenant's keys (prefixes only)").add_argument("tenant_id")
    leaf(keys, "revoke", "revoke a key").add_argument("key_id")
    p = leaf(adm, "publish", "upload a public adapter (usable by every tenant)")
    p.add_argument("name")
    p.add_argument("file")
    leaf(adm, "unpublish", "delete a public adapter (NAME or NAME@VERSION)").add_argument("name")
    _fine_tune_parser(sub, leaf)
    return top


def _wait_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--poll", type=float, default=2.0, metavar="S", help="seconds between polls (default 2)")
    p.add_argument("--wait-timeout", type=float, metavar="S", help="give up waiting after S seconds (default: never)")


def _fine_tune_parser(sub: Any, leaf: Callable[..., argparse.ArgumentParser]) -> None:
    ft = sub.add_parser(
        "fine-tune",
        help="train an adapter on a JSONL file (OpenAI's fine-tuning API)",
        description="Fine-tuning jobs on the server; the result is an adapter (use it as --model or --adapter). "
        "The training worker itself is the server's: `aligner fine-tune worker`.",
    ).add_subparsers(dest="action", required=True)
    p = leaf(ft, "create", "upload a JSONL file and start a fine-tuning job on it")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--file", help="a JSONL file to upload: chat examples (supervised) or preference pairs (dpo)")
    data.add_argument("--training-file", metavar="FILE_ID", help="an uploaded file's id instead")
    p.add_argument("--validation-file", metavar="FILE_ID", help="an uploaded file to report a validation loss on")
    p.add_argument("--method", choices=core.METHODS, default="supervised")
    p.add_argument("--model", help="the base model (default: the server's)")
    p.add_argument("--suffix", help="goes into the adapter's name: ft-SUFFIX-...")
    p.add_argument("--epochs", type=int, help="passes over the file (default: the server's auto)")
    p.add_argument("--batch-size", type=int, help="examples per optimizer step (default: auto)")
    p.add_argument("--lr-multiplier", type=float, help="times the method's base learning rate (default 1)")
    p.add_argument("--beta", type=float, help="dpo's beta (default 0.1)")
    p.add_argument("--seed", type=int)
    p.add_argument("--tokens", type=int, help="the adapter's prefix tokens N (default 1)")
    p.add_argument("--start-layer", type=int, help="the first adapted layer (default 2)")
    p.add_argument("--gate-activation", choices=("identity", "tanh"))
    p.add_argument("--wait", action="store_true", help="print the job's events until it finishes")
    _wait_args(p)
    p = leaf(ft, "list", "your fine-tuning jobs, newest first")
    p.add_argument("--limit", type=int)
    leaf(ft, "show", "one job").add_argument("job_id")
    p = leaf(ft, "events", "a job's events (oldest first)")
    p.add_argument("job_id")
    p.add_argument("--limit", type=int, default=100, help="the newest N (default 100)")
    leaf(ft, "cancel", "cancel a queued or running job").add_argument("job_id")
    p = leaf(ft, "wait", "print a job's events until it finishes, then its fine-tuned model")
    p.add_argument("job_id")
    _wait_args(p)


HANDLERS = {"adapters": _adapters, "models": _models, "chat": _chat, "admin": _admin, "fine-tune": _fine_tune}


def main(argv: Sequence[str] | None = None, *, prog: str = "aligner-client", client: Client | None = None) -> int:
    """Run one command; returns the exit status (never raises SystemExit)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(prog).parse_args(argv)
    except SystemExit as e:  # --help, or a usage error already printed by argparse
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    out = sys.stdout
    own = client is None
    if client is None:
        kw: dict[str, Any] = {"base_url": args.base_url, "api_key": args.api_key}
        if args.command == "admin":
            kw["admin_key"] = args.api_key
        if args.timeout is not None:
            kw["timeout"] = args.timeout
        client = Client(**kw)
    try:
        return HANDLERS[args.command](client, args, out)
    except APIError as e:
        code = f" [{e.code}]" if e.code else ""
        print(f"{prog}: error {e.status}{code}: {e.message}", file=sys.stderr)
        return 1
    except AlignerError as e:
        print(f"{prog}: error: {e} ({client.base_url})", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    finally:
        if own:
            client.close()


if __name__ == "__main__":
    sys.exit(main())
