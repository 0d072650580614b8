"""The naive path a user might otherwise pick: Hugging Face `transformers` generating with one adapter at
a time (attach tenant i's Aligner, generate its request, detach, next tenant). Same prompts, greedy,
the bench dtype (common.DTYPE), the same number of output tokens per request as the engine benchmarks. Throughput is a rate, so
a sample of tenants suffices; this runs `--requests` of them sequentially.

    python bench/naive.py [--quick]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import DTYPE, chat_ids, prompts, write_result


def main(argv: list[str] | None = None) -> int:
    import torch

    from aligner_core.adapter_format import Adapter
    from aligner_core.model_prep import prepare
    from aligner_core.reference import attached_adapter, load_hf_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 tenants x 16 tokens, no HF base run")
    p.add_argument("--requests", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.requests, args.max_tokens = 3, 16
    from transformers import AutoTokenizer

    pm = prepare()
    tok = AutoTokenizer.from_pretrained(pm.path)
    model = load_hf_model(str(pm.path), dtype=getattr(torch, DTYPE))
    ids = chat_ids(tok, prompts(args.requests))
    adapters = [Adapter.random(pm.spec, tokens=1, seed=7000 + i, gate_scale=0.05) for i in range(args.requests)]
    rows = []
    runs = (
        (("hf-aligner-one-at-a-time", True),)
        if args.quick
        else (("hf-base", False), ("hf-aligner-one-at-a-time", True))
    )
    for label, use in runs:
        produced, start = 0, time.perf_counter()
        for i in range(args.requests):
            with torch.no_grad(), attached_adapter(model, adapters[i] if use else None):
                x = torch.tensor([ids[i]])
                out = model.generate(
                    x,
                    attention_mask=torch.ones_like(x),
                    max_new_tokens=args.max_tokens,
                    min_new_tokens=args.max_tokens,
                    do_sample=False,
                    pad_token_id=tok.eos_token_id,
                )
            produced += out.shape[1] - x.shape[1]
        seconds = time.perf_counter() - start
        rows.append(
            {
                "label": label,
                "requests": args.requests,
                "output_tokens": produced,
                "seconds": seconds,
                "tok_per_s": produced / seconds,
            }
        )
        print(f"{label}: {produced / seconds:.1f} tok/s ({produced} tokens in {seconds:.1f} s)", flush=True)
    name = "naive-quick" if args.quick else "naive"
    print(write_result(name, {"args": vars(args), "rows": rows}, **({"out": args.out} if args.out else {})))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
