"""vLLM's own multi-LoRA on the same workload: one rank-8 LoRA per tenant, K tenants in the batch.

Two configurations, each its own engine (vLLM wraps every targeted module whether or not an adapter
uses it, so the module set is an engine setting): rank 8 on all linear layers, and rank 8 on q,v
(`--lora-target-modules qkv_proj`, vLLM's fused q/k/v). `max_loras` = the largest K measured, so every
tenant's LoRA is resident at once (no swapping: the best case for LoRA). Each engine also runs the
workload without LoRAs, for its own base.

    python bench/lora.py [--quick] [--adapters 1 8 64] [--configs all qv]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import engine_options, engine_runner, run_workload, write_result

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CONFIGS = {"all": (ALL_LINEAR, None), "qv": (["q_proj", "v_proj"], "qkv_proj")}  # name -> (PEFT targets, vLLM targets)


def module_shapes(cfg: dict) -> dict[str, tuple[int, int]]:
    """PEFT module name -> (in_features, out_features) for a Llama-style config."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    d = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * d, cfg["num_key_value_heads"] * d
    return {
        "q_proj": (h, q),
        "k_proj": (h, kv),
        "v_proj": (h, kv),
        "o_proj": (q, h),
        "gate_proj": (h, i),
        "up_proj": (h, i),
        "down_proj": (i, h),
    }


def write_lora(path: Path, model_path: Path, targets: list[str], rank: int, seed: int) -> Path:
    """A PEFT-format LoRA with random weights (B nonzero, so it really changes the output)."""
    import torch
    from safetensors.torch import save_file

    cfg = json.loads((model_path / "config.json").read_text())
    shapes = module_shapes(cfg)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for name in targets:
            fin, fout = shapes[name]
            block = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, fin, generator=g) * 0.01
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fout, rank, generator=g) * 0.01
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "task_type": "CAUSAL_LM",
                "r": rank,
                "lora_alpha": 2 * rank,
                "lora_dropout": 0.0,
                "target_modules": targets,
                "bias": "none",
                "base_model_name_or_path": str(model_path),
            }
        )
    )
    return path


def run_config(name: str, ks: list[int], requests: int, max_tokens: int, workdir: Path, rank: int = 8) -> dict:
    from transformers import AutoTokenizer
    from vllm.lora.request import LoRARequest

    peft_targets, vllm_targets = CONFIGS[name]
    max_loras = max(ks)
    extra = [
        "--enable-lora",
        "--max-loras",
        str(max_loras),
        "--max-lora-rank",
        str(rank),
        "--max-cpu-loras",
        str(max_loras),
    ]
    if vllm_targets:
        extra += ["--lora-target-modules", vllm_targets]
    opts, pm = engine_options(aligner=False, extra=tuple(extra), max_num_seqs=max(256, requests))
    loras = [write_lora(workdir / f"{name}-{j}", pm.path, peft_targets, rank, seed=j) for j in range(max_loras)]
    t0 = time.perf_counter()
    runner = engine_runner(opts)
    start_s = time.perf_counter() - t0
    tok = AutoTokenizer.from_pretrained(pm.path)
    rows = []
    try:
        runner.run(run_workload(runner.engine, tok, keys=[None] * 8, max_tokens=8, label="warmup"))
        reqs = [LoRARequest(f"{name}-{j}", j + 1, str(p)) for j, p in enumerate(loras)]
        for k in ks:  # load every LoRA once first, so loading is not in the measured runs
            runner.run(
                run_workload(
                    runner.engine, tok, keys=[None] * k, max_tokens=2, label="load", lora=[reqs[j] for j in range(k)]
                )
            )
        base = runner.run(
            run_workload(runner.engine, tok, keys=[None] * requests, max_tokens=max_tokens, label=f"lora-{name}-base")
        )
        rows.append({"K": 0, **base.as_dict()})
        print(f"LoRA {name}: own base {base.tok_per_s:.1f} tok/s", flush=True)
        for k in ks:
            r = runner.run(
                run_workload(
                    runner.engine,
                    tok,
                    keys=[None] * requests,
                    max_tokens=max_tokens,
                    label=f"lora-{name}-K{k}",
                    lora=[reqs[i % k] for i in range(requests)],
                )
            )
            rows.append({"K": k, **r.as_dict(), "ratio_to_own_base": r.tok_per_s / base.tok_per_s})
            print(
                f"LoRA {name} K={k:3d}: {r.tok_per_s:7.1f} tok/s ({r.tok_per_s / base.tok_per_s:.3f}x own base), "
                f"TTFT p50 {r.ttft_p50_ms:.0f} ms",
                flush=True,
            )
    finally:
        runner.close()
    return {
        "config": name,
        "rank": rank,
        "peft_targets": peft_targets,
        "vllm_targets": vllm_targets or "all supported",
        "max_loras": max_loras,
        "engine_start_s": start_s,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    import tempfile

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="K in {8}, all-linear only, 32 requests x 32 tokens")
    p.add_argument("--adapters", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--configs", nargs="+", default=["all", "qv"], choices=list(CONFIGS))
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.adapters, args.configs, args.requests, args.max_tokens = [32], ["all"], 32, 32
    with tempfile.TemporaryDirectory(prefix="lora-bench-") as tmp:
        results = [run_config(c, args.adapters, args.requests, args.max_tokens, Path(tmp)) for c in args.configs]
    name = "lora-quick" if args.quick else "lora"
    kw = {"out": args.out} if args.out else {}
    print(write_result(name, {"args": vars(args), "configs": results}, **kw))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
