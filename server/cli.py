"""The `aligner` command. `aligner serve` starts the server; settings come from flags, then ALIGNER_* env."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pydantic import ValidationError


def _serve(args: argparse.Namespace) -> int:
    from server.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        for err in e.errors():
            print(f"aligner serve: {err['msg']}", file=sys.stderr)
        return 2
    # Imported only now: server.app pulls in vLLM (~30 s on 2 cores), and unsafe settings must fail fast.
    import uvicorn

    from server.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=30,
        timeout_keep_alive=settings.keep_alive_seconds,
    )
    return 0


TOOL_COMMANDS = {
    "convert": ("aligner_core.convert", "import a released Lit-LLaMA Aligner checkpoint as aligner/v1"),
    "train": ("training.train", "train an adapter (SFT or DPO) on the base model, only P and the gates"),
    "make-data": ("training.data", "generate the example personas' training and eval data"),
    "eval": ("training.evaluate", "persona compliance of base vs adapters, through a running server"),
}

CLIENT_COMMANDS = {
    "adapters": "upload, list, show, versions, delete adapters on a server",
    "chat": "chat with the server, optionally through an adapter",
    "models": "list the served model and the visible adapters",
    "admin": "tenants, API keys and public adapters (multi-tenant mode)",
}


def _random_adapter(args: argparse.Namespace) -> int:
    from aligner_core.adapter_format import Adapter, save
    from aligner_core.model_prep import prepare

    spec = prepare(args.model).spec
    adapter = Adapter.random(
        spec, tokens=args.tokens, start_layer=args.start_layer, seed=args.seed, gate_scale=args.gate_scale
    )
    save(adapter, args.output)
    print(f"wrote {args.output}: tokens={adapter.tokens} params={adapter.params} base_model={spec.identity}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aligner", description="Serve Aligner adapters on vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    serve.add_argument("--model", help="preset name or Hugging Face folder (default: smollm2-135m-instruct)")
    serve.add_argument("--store", help="store URL, e.g. sqlite:///data/aligner.db")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--seed-adapters", help="folder of *.safetensors to publish as public adapters at start")
    serve.add_argument("--enforce-eager", action="store_true", default=None, help="skip torch.compile (faster start)")
    serve.set_defaults(func=_serve)
    rnd = sub.add_parser("random-adapter", help="write a random aligner/v1 adapter for the served model (a demo)")
    rnd.add_argument("-o", "--output", required=True)
    rnd.add_argument("--model", default="smollm2-135m-instruct")
    rnd.add_argument("--tokens", type=int, default=1)
    rnd.add_argument("--start-layer", type=int, default=2)
    rnd.add_argument("--gate-scale", type=float, default=0.08)
    rnd.add_argument("--seed", type=int, default=0)
    rnd.set_defaults(func=_random_adapter)
    for name, text in CLIENT_COMMANDS.items():
        sub.add_parser(name, help=text + " (see `aligner NAME --help`)")
    for name, (_, text) in TOOL_COMMANDS.items():
        sub.add_parser(name, help=text)
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] and argv[0] in TOOL_COMMANDS:  # each tool owns its flags
        module, _ = TOOL_COMMANDS[argv[0]]
        return importlib.import_module(module).main(argv[1:])
    if argv[:1] and argv[0] in CLIENT_COMMANDS:  # the HTTP client (clients/python) owns these
        try:
            from aligner_client.cli import main as client_main
        except ImportError:
            print("aligner: the client is not installed: pip install -e clients/python", file=sys.stderr)
            return 2
        return client_main(argv, prog="aligner")
    args = parser.parse_args(argv)
    func = args.func
    del args.func, args.command
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
