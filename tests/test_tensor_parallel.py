"""Tensor parallelism: with TP = 2 each rank projects K_p/V_p from its own qkv shard and slices the gates
to its heads; the Aligner term must stay exact. A tiny random Llama whose 4 heads / 2 kv heads divide by 2,
one CPU core per rank (VLLM_CPU_OMP_THREADS_BIND="0|1")."""

from __future__ import annotations

import asyncio
import shutil

import pytest
import torch
from support import LOGPROB_TOLERANCE, EngineRunner, engine_options, parity, real_model, tiny_llama_config

from aligner_core.adapter_format import Adapter, encode
from aligner_core.model_spec import ModelSpec
from aligner_core.reference import load_hf_model
from server.engine.config import AlignerEngineConfig

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tp") / "tiny-llama-tp"
    tok = AutoTokenizer.from_pretrained(real_model().path)
    # the real tokenizer's vocabulary, on a 128-wide, 3-layer shape whose heads divide by 2
    vocab = dict(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    shape = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, max_position_embeddings=512)
    config = tiny_llama_config(**vocab, **shape, initializer_range=0.1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(folder)
    tok.save_pretrained(folder)
    spec = ModelSpec.from_config(config.to_dict(), name=folder.name)
    yield folder, spec
    shutil.rmtree(folder, ignore_errors=True)


def test_tp2_matches_reference(tiny_model, monkeypatch) -> None:
    folder, spec = tiny_model
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    adapters = {
        "a": Adapter.random(spec, tokens=1, start_layer=1, seed=1, gate_scale=0.5),
        "b": Adapter.random(spec, tokens=3, start_layer=0, gate_activation="tanh", seed=2, gate_scale=0.8),
    }
    aligner = AlignerEngineConfig(max_slots=4, max_tokens=4)
    tp2 = ("--tensor-parallel-size", "2", "--distributed-executor-backend", "mp")
    opts = engine_options(folder, spec.identity, max_model_len=256, max_num_seqs=8, aligner=aligner, extra_args=tp2)
    runner = EngineRunner(opts)
    try:
        for key, a in adapters.items():

            async def load(a=a) -> bytes:
                return encode(a)

            runner.run(runner.engine.lease(key, load))
        stats = runner.run(runner.engine.client.collective_rpc("aligner_stats"))
        assert len(stats) == 2 and all(s["resident"] == 2 for s in stats)  # both ranks hold both adapters
        prompts = [[1, 20, 300 + i, 4000 + 7 * i, 55, 9] for i in range(4)]
        keys = [None, "a", "b", "a"]

        async def all_():
            return await asyncio.gather(*(runner.generate(p, k, max_tokens=12) for p, k in zip(prompts, keys)))

        gens = runner.run(all_())
    finally:
        runner.close()
    hf = load_hf_model(str(folder))
    results = [parity(hf, adapters.get(k) if k else None, g) for k, g in zip(keys, gens)]
    print("\n[tp2] " + ", ".join(f"{k}: {p.matched}/{p.total} {p.max_logprob_diff:.2e}" for k, p in zip(keys, results)))
    for k, p in zip(keys, results):
        assert p.matched == p.total and p.max_logprob_diff < LOGPROB_TOLERANCE, (k, p)
    assert gens[1].tokens != gens[0].tokens or gens[2].tokens != gens[0].tokens  # adapters matter here
