"""The `aligner` command. `aligner serve` starts the server; settings come from flags, then ALIGNER_* env."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from server.app import create_app
    from server.settings import Settings

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as e:
        for err in e.errors():
            print(f"aligner serve: {err['msg']}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=30)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="aligner", description="Serve Aligner adapters on vLLM.")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="start the OpenAI-compatible server")
    serve.add_argument("--model", help="preset name or Hugging Face folder (default: smollm2-135m-instruct)")
    serve.add_argument("--store", help="store URL, e.g. sqlite:///data/aligner.db")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--enforce-eager", action="store_true", default=None, help="skip torch.compile (faster start)")
    serve.set_defaults(func=_serve)
    args = parser.parse_args(argv)
    func = args.func
    del args.func, args.command
    return func(args)


if __name__ == "__main__":
    sys.exit(main())
