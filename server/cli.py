"""The `aligner` command. `aligner serve [MODEL] [flags]` starts the server: its own flags, any `vllm serve`
flag, then ALIGNER_* variables (server/settings.py has the rule)."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from pydantic import ValidationError


def _serve(args: argparse.Namespace, engine_argv: list[str]) -> int:
    from server.settings import SettingError, Settings, error_lines, fit_to_model, serve_settings

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cli = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        # Our own flags and the ALIGNER_* variables are checked before anything imports vLLM (~30 s on 2
        # cores): unsafe settings fail fast. vLLM flags (MODEL, `--max-num-seqs 8`, ...) go through vLLM's parser.
        settings = fit_to_model(serve_settings(cli, engine_argv))
    except ValidationError as e:
        for line in error_lines(e):
            print(f"aligner serve: {line}", file=sys.stderr)
        return 2
    except SettingError as e:
        print(f"aligner serve: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from server.app import create_app

    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="info",
        timeout_graceful_shutdown=30,
        timeout_keep_alive=settings.keep_alive_seconds,
    )
    return 0


def _serve_help(serve: argparse.ArgumentParser, token: str) -> int:
    """Our options, then vLLM's (its own help: `--help=all`, `--help=GROUP`, `--help=FLAG` as `vllm serve`)."""
    if token in ("-h", "--help"):
        print(serve.format_help(), flush=True)
        print("vLLM's engine flags (every `vllm serve` flag is an `aligner serve` flag):\n", flush=True)
    from server.engine.config import EngineFlags

    EngineFlags().help("--help" if token == "-h" else token)
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
    "fine-tune": "fine-tuning jobs: create (upload + start, --wait), list, events, cancel, wait; worker (training)",
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
    serve = sub.add_parser(
        "serve",
        help="start the OpenAI-compatible server",
        usage="aligner serve [MODEL] [options] [any `vllm serve` flag]",
        description=(
            "Start the OpenAI-compatible server. MODEL (or --model) is a preset name or a Hugging Face folder. "
            "Every `vllm serve` flag is taken too and reaches the engine (vLLM's own parser reads them, after "
            "ALIGNER_ENGINE_ARGS). Settings are ALIGNER_* variables; where a flag and a variable set the same "
            "thing, the command line wins over ALIGNER_ENGINE_ARGS, which wins over ALIGNER_<NAME>, and the log "
            "says so."
        ),
        add_help=False,
        allow_abbrev=False,  # `--seed` is vLLM's, not short for our --seed-adapters
    )
    serve.add_argument("-h", "--help", action="store_true", help="show this help, then vLLM's engine flags")
    serve.add_argument("--model", help="preset name or Hugging Face folder (default: smollm2-135m-instruct)")
    serve.add_argument("--store", help="store URL, e.g. sqlite:///data/aligner.db")
    serve.add_argument("--host", help="address to bind (default: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to bind (default: 8000)")
    serve.add_argument("--seed-adapters", help="folder of *.safetensors to publish as public adapters at start")
    serve.add_argument("--enforce-eager", action="store_true", default=None, help="skip torch.compile (faster start)")
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
    if argv[:2] == ["fine-tune", "worker"]:  # the training worker is the server's; other fine-tune verbs the client's
        from server.finetune_worker import main as worker_main

        return worker_main(argv[2:])
    if argv[:1] and argv[0] in CLIENT_COMMANDS:  # the HTTP client (clients/python) owns these
        try:
            from aligner_client.cli import main as client_main
        except ImportError:
            print("aligner: the client is not installed: pip install -e clients/python", file=sys.stderr)
            return 2
        return client_main(argv, prog="aligner")
    if argv[:1] == ["serve"]:  # our flags here; MODEL and every other flag to vLLM's parser
        asked = [a for a in argv[1:] if a in ("-h", "--help") or a.startswith("--help=")]
        if asked:
            return _serve_help(serve, asked[0])
        args, engine_argv = serve.parse_known_args(argv[1:])
        del args.help
        return _serve(args, engine_argv)
    args = parser.parse_args(argv)
    func = args.func
    del args.func, args.command
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
