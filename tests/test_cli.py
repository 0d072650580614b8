"""`aligner serve [MODEL] [any vllm serve flag]`: the flags reach the engine through vLLM's own parser, one rule
decides between a flag and an ALIGNER_* variable (and the log says which won), max_model_len defaults to what
the model allows, and every start-up error names the setting to change. Only the last test starts a server."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from support import free_port, real_model

from server import cli
from server.settings import (
    DEFAULT_MAX_MODEL_LEN,
    GiB,
    SettingError,
    Settings,
    fit_max_model_len,
    fit_to_model,
    resolve,
    serve_settings,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """No ALIGNER_* (nor the KV cache variables) from the outer environment: each test sets its own."""
    for name in list(os.environ):
        if name.upper().startswith("ALIGNER_") or name in ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ALLOW_LONG_MAX_MODEL_LEN"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def flags():
    from server.engine.config import EngineFlags

    return EngineFlags()


def tiny_model(folder: Path, **config) -> Path:
    """A folder with just a config.json: a small Llama (prepare() and engine_options need no weights)."""
    from transformers import LlamaConfig

    shape = dict(vocab_size=128, intermediate_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(LlamaConfig(**(shape | config)).to_dict()))
    return folder


# ---- the command line: ours first, the rest to vLLM ----


def test_help_shows_our_options_then_vllms(capsys) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    ours, _, vllms = out.partition("Config Groups:")
    for option in ("[MODEL]", "--model", "--store", "--host", "--port", "--seed-adapters", "--enforce-eager"):
        assert option in ours, option
    assert "every `vllm serve` flag is an `aligner serve` flag" in ours  # the header between the two
    for group in ("ModelConfig", "CacheConfig", "SchedulerConfig", "aligner serve --help=all"):
        assert group in vllms, group


def test_help_for_one_vllm_flag(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help=max-num-seqs"])
    assert "--max-num-seqs" in capsys.readouterr().out


def test_our_flags_are_ours_and_the_rest_goes_to_vllm(monkeypatch) -> None:
    seen = {}
    monkeypatch.setattr(cli, "_serve", lambda args, argv: seen.update(args=vars(args), argv=argv) or 0)
    argv = ["serve", "mymodel", "--port", "9001", "--max-num-seqs", "8", "--seed", "3", "--enforce-eager"]
    assert cli.main(argv) == 0
    assert seen["args"] | {} == {
        "model": None,
        "store": None,
        "host": None,
        "port": 9001,
        "seed_adapters": None,  # `--seed` is vLLM's, not an abbreviation of ours
        "enforce_eager": True,
    }
    assert seen["argv"] == ["mymodel", "--max-num-seqs", "8", "--seed", "3"]


def test_vllms_parser_reads_every_form(flags) -> None:
    argv = [
        "m",
        "--max_model_len=4k",
        "--no-enforce-eager",
        "--hf-overrides.rope_theta",
        "5",
        "--kv-cache-memory-bytes",
        "1G",
    ]
    assert flags.given(argv) == {
        "model_tag": "m",
        "max_model_len": 4000,
        "enforce_eager": False,
        "hf_overrides": {"rope_theta": 5},
        "kv_cache_memory_bytes": GiB,
    }
    assert flags.given([]) == {}


def test_taking_a_flag_out_leaves_the_others(flags) -> None:
    argv = ["--seed", "1", "--max-model-len=300", "m", "--max-num-seqs", "8", "--max_model_len", "9"]
    assert flags.without(argv, "max_model_len") == ["--seed", "1", "m", "--max-num-seqs", "8"]
    assert flags.without(["--seed", "1", "m", "--logits-processors", "a:B"], "model_tag") == [
        "--seed",
        "1",
        "--logits-processors",
        "a:B",
    ]
    # where taking it out would change what the others mean (`m` would join the list), it stays
    assert flags.without(["--logits-processors", "a:B", "--max-model-len=300", "m"], "max_model_len") is None


# ---- one rule: command line > ALIGNER_ENGINE_ARGS > ALIGNER_<NAME> > default; the log says which won ----


def test_command_line_beats_engine_args_beats_variable() -> None:
    overrides, notes = resolve(
        {"port": 9001},
        {"max_model_len": 512, "model_tag": "m"},
        {"max_model_len": 256, "max_num_seqs": 4, "port": 7000},
        {"max_model_len": "1024", "max_num_seqs": "4", "port": "8000"},
    )
    assert overrides == {"port": 9001, "max_model_len": 512, "model": "m", "max_num_seqs": 4}
    assert notes == [
        "max_model_len: --max-model-len 512 (command line) wins over --max-model-len 256 (ALIGNER_ENGINE_ARGS) "
        "and ALIGNER_MAX_MODEL_LEN=1024",
        # max_num_seqs: the same value twice is no conflict, so no line
        "port: --port 9001 (command line) wins over --port 7000 (ALIGNER_ENGINE_ARGS) and ALIGNER_PORT=8000",
    ]


def test_flags_that_are_settings_are_translated() -> None:
    overrides, _ = resolve({}, {"scheduling_policy": "fcfs", "kv_cache_memory_bytes": 3 * GiB}, {}, {})
    assert overrides == {"fair_priority": False, "kv_cache_gib": 3}
    assert resolve({}, {}, {"enforce_eager": False}, {"enforce_eager": "true"})[1] == [
        "enforce_eager: --no-enforce-eager (ALIGNER_ENGINE_ARGS) wins over ALIGNER_ENFORCE_EAGER=true"
    ]


def test_the_model_given_twice_on_the_command_line_is_refused() -> None:
    with pytest.raises(SettingError, match="gives model twice: --model a .* and MODEL b"):
        resolve({"model": "a"}, {"model_tag": "b"}, {}, {})
    assert resolve({"model": "a"}, {"model_tag": "a"}, {}, {})[0] == {"model": "a"}


@pytest.mark.parametrize(
    "dest", ["served_model_name", "hf_overrides", "worker_extension_cls", "additional_config", "logits_processors"]
)
def test_flags_aligner_serve_sets_itself_are_refused_by_name(dest: str) -> None:
    flag = "--" + dest.replace("_", "-")
    with pytest.raises(SettingError, match=f"{flag} \\(ALIGNER_ENGINE_ARGS\\) is set by aligner-serve itself"):
        resolve({}, {}, {dest: "x"}, {})


def test_a_kv_cache_not_in_whole_gib_is_refused_on_cpu_only() -> None:
    half = {"kv_cache_memory_bytes": GiB // 2}
    with pytest.raises(SettingError, match="--kv-cache-memory-bytes .*command line.*ALIGNER_KV_CACHE_GIB"):
        resolve({}, half, {}, {}, on_cpu=lambda: True)
    assert resolve({}, half, {}, {}, on_cpu=lambda: False)[0] == {}  # GPU: vLLM reads the flag itself


def test_serve_settings_merge_and_hand_the_rest_to_the_engine(tmp_path, monkeypatch, caplog) -> None:
    from server.app import engine_options
    from server.engine.vllm_glue import engine_args

    model = tiny_model(tmp_path / "tiny", max_position_embeddings=4096)
    monkeypatch.setenv("ALIGNER_MAX_MODEL_LEN", "1024")
    monkeypatch.setenv("ALIGNER_ENGINE_ARGS", "--max-model-len 256 --max-num-seqs 4 --gpu-memory-utilization 0.5")
    caplog.set_level(logging.INFO, logger="aligner.settings")
    argv = [str(model), "--max-model-len", "512", "--enable-prefix-caching", "--scheduling-policy", "fcfs"]
    settings = serve_settings({"port": 9001}, argv)
    assert (settings.model, settings.port, settings.max_model_len, settings.max_num_seqs) == (str(model), 9001, 512, 4)
    assert settings.fair_priority is False
    assert settings.engine_args == "--gpu-memory-utilization 0.5 --enable-prefix-caching"  # the rest, once each
    assert "max_model_len: --max-model-len 512 (command line) wins over" in caplog.text
    # what the engine gets: vLLM's parser over the facade's argv
    args = engine_args(engine_options(settings, str(model), "tiny-0123").argv())
    assert (args.model, args.max_model_len, args.max_num_seqs) == (str(model), 512, 4)
    assert args.gpu_memory_utilization == 0.5 and args.enable_prefix_caching is True
    assert args.scheduling_policy == "fcfs"


def test_unknown_flags_name_where_they_came_from(monkeypatch, capsys) -> None:
    assert cli.main(["serve", "--frobnicate"]) == 2
    assert "aligner serve: the command line: unrecognized arguments: --frobnicate" in capsys.readouterr().err
    monkeypatch.setenv("ALIGNER_ENGINE_ARGS", "--max-num-seqs")
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "ALIGNER_ENGINE_ARGS='--max-num-seqs'" in err and "expected one argument" in err


# ---- start-up errors name the setting ----


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"ALIGNER_KV_CACHE_GIB": "0.5"}, "ALIGNER_KV_CACHE_GIB must be a whole number of GiB"),
        ({"ALIGNER_KV_CACHE_GIB": "0"}, "ALIGNER_KV_CACHE_GIB must be a whole number of GiB, 1 or more"),
        ({"ALIGNER_KV_CACHE_GIB": "lots"}, "ALIGNER_KV_CACHE_GIB: Input should be a valid integer"),
        ({"ALIGNER_PORT": "http"}, "ALIGNER_PORT (--port): Input should be a valid integer"),
        ({"ALIGNER_MAX_MODEL_LEN": "long"}, "ALIGNER_MAX_MODEL_LEN (--max-model-len): Input should be"),
        ({"ALIGNER_HOST": "0.0.0.0"}, "Set ALIGNER_ADMIN_KEY, or ALIGNER_ALLOW_OPEN_REMOTE=true"),
    ],
)
def test_a_bad_variable_is_refused_by_name_before_vllm_loads(monkeypatch, capsys, env, named) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli.main(["serve"]) == 2
    assert named in capsys.readouterr().err


def test_whole_gib_kv_cache_is_taken() -> None:
    assert Settings(kv_cache_gib="3").kv_cache_gib == 3
    assert Settings(kv_cache_gib=1.0).kv_cache_gib == 1


def test_an_unknown_model_names_the_setting(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ALIGNER_MODEL", str(tmp_path / "nowhere"))
    with pytest.raises(SettingError, match="ALIGNER_MODEL \\(--model, MODEL\\): model .* is neither a preset"):
        fit_to_model(Settings())


# ---- max_model_len: the smaller of the default and the model's context, as vLLM derives it ----


def test_a_short_model_gets_its_own_context_length(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ALIGNER_MODEL", str(tiny_model(tmp_path / "short", max_position_embeddings=512)))
    assert fit_to_model(Settings()).max_model_len == 512
    monkeypatch.setenv("ALIGNER_MODEL", str(tiny_model(tmp_path / "long", max_position_embeddings=32768)))
    assert fit_to_model(Settings()).max_model_len == DEFAULT_MAX_MODEL_LEN
    monkeypatch.setenv("ALIGNER_MAX_MODEL_LEN", "8192")
    assert fit_to_model(Settings()).max_model_len == 8192


def test_asking_more_than_the_model_has_names_the_setting(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ALIGNER_MODEL", str(tiny_model(tmp_path / "short", max_position_embeddings=512)))
    monkeypatch.setenv("ALIGNER_MAX_MODEL_LEN", "1024")
    with pytest.raises(SettingError) as err:
        fit_to_model(Settings())
    message = str(err.value)
    assert "ALIGNER_MAX_MODEL_LEN (or --max-model-len) is 1024" in message
    assert "context length 512 (max_position_embeddings in" in message and "set it to 512 or less" in message
    assert "VLLM_ALLOW_LONG_MAX_MODEL_LEN" not in message
    monkeypatch.setenv("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")  # vLLM's own escape hatch still works
    assert fit_to_model(Settings()).max_model_len == 1024


def test_engine_options_fit_the_model_too(tmp_path) -> None:
    """create_app without the CLI (Settings made in code) gets the same default."""
    from server.app import engine_options

    model = tiny_model(tmp_path / "short", max_position_embeddings=300)
    assert engine_options(Settings(), str(model), "tiny-0123").max_model_len == 300
    with pytest.raises(SettingError, match="ALIGNER_MAX_MODEL_LEN"):
        engine_options(Settings(max_model_len=301), str(model), "tiny-0123")


@pytest.mark.parametrize(
    "config",
    [
        {"max_position_embeddings": 512},
        {"max_position_embeddings": 512, "rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        {"max_position_embeddings": 4096, "rope_scaling": {"rope_type": "dynamic", "factor": 4.0}},
        {
            "max_position_embeddings": 8192,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
        },
    ],
)
def test_context_length_as_vllm_derives_it(tmp_path, config) -> None:
    from vllm.config import ModelConfig

    from server.engine.config import model_context_length

    model = tiny_model(tmp_path / "m", **config)
    ours = model_context_length(json.loads((model / "config.json").read_text()))
    assert ours is not None and ours[0] == ModelConfig(model=str(model), skip_tokenizer_init=True).max_model_len


def test_a_config_without_a_length_keeps_the_setting() -> None:
    assert fit_max_model_len(Settings(), {"hidden_size": 64}) == DEFAULT_MAX_MODEL_LEN


# ---- `aligner chat`: the client's command line, --adapter repeatable with a strength ----


def test_aligner_chat_stacks_adapters_through_the_client(monkeypatch, capsys) -> None:
    """`aligner chat` is the client's `main`: `--adapter NAME:SCALE` repeated sends `adapters`, one plain
    `--adapter NAME` the old `adapter` field, and a bad scale exits 2 naming the value, sending nothing."""
    from aligner_client import Client
    from aligner_client import cli as client_cli

    bodies: list[dict] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"index": 0, "message": {"content": "Ahoy"}}]})

    monkeypatch.setattr(
        client_cli, "Client", lambda **kw: Client(kw["base_url"], transport=httpx.MockTransport(answer))
    )
    assert cli.main(["chat", "--adapter", "pirate:0.5", "--adapter", "json", "Hi"]) == 0
    assert cli.main(["chat", "--adapter", "pirate", "Hi"]) == 0
    assert capsys.readouterr().out == "Ahoy\nAhoy\n"
    assert [{k: v for k, v in b.items() if k.startswith("adapter")} for b in bodies] == [
        {"adapters": [{"name": "pirate", "scale": 0.5}, {"name": "json"}]},
        {"adapter": "pirate"},
    ]
    assert cli.main(["chat", "--adapter", "pirate:lots", "Hi"]) == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == (
        "aligner chat: error: argument --adapter: 'pirate:lots': the scale after the ':' is not a finite number"
    )
    assert len(bodies) == 2


def test_aligner_fine_tune_worker_is_the_servers_and_the_rest_the_clients(monkeypatch, capsys) -> None:
    """`aligner fine-tune worker ...` runs the training worker (server/finetune_worker.py) with the rest of the
    line; every other `aligner fine-tune` verb is the client's command."""
    from aligner_client import Client
    from aligner_client import cli as client_cli

    from server import finetune_worker

    seen: list[list[str]] = []
    monkeypatch.setattr(finetune_worker, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["fine-tune", "worker", "--store", "sqlite:///x.db", "--id", "w1"]) == 0
    assert seen == [["--store", "sqlite:///x.db", "--id", "w1"]]

    paths: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        paths.append(request.url.path)
        return httpx.Response(200, json={"object": "list", "data": [], "has_more": False})

    monkeypatch.setattr(
        client_cli, "Client", lambda **kw: Client(kw["base_url"], transport=httpx.MockTransport(answer))
    )
    assert cli.main(["fine-tune", "list"]) == 0
    assert paths == ["/v1/fine_tuning/jobs"] and capsys.readouterr().out == "(none)\n"
    assert "fine-tune" in cli.CLIENT_COMMANDS


# ---- end to end: one real server, a vLLM flag of each kind on its command line ----


@pytest.mark.server
def test_vllm_flags_on_the_command_line_reach_the_engine(tmp_path) -> None:
    """`--max-model-len 300` (a flag that is also ALIGNER_MAX_MODEL_LEN, which it beats) and `--max-logprobs 2`
    (a flag that only vLLM knows) both hold in the running engine."""
    port, log = free_port(), tmp_path / "server.log"
    env = os.environ | {"ALIGNER_KV_CACHE_GIB": "1", "ALIGNER_MAX_MODEL_LEN": "1024"}
    cmd = [sys.executable, "-m", "server", "serve", "smollm2-135m-instruct", "--enforce-eager", "--port", str(port)]
    cmd += ["--store", f"sqlite:///{tmp_path / 'store.db'}", "--max-model-len", "300", "--max-logprobs", "2"]
    cmd += ["--max-num-seqs", "8"]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 170
        while time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            pytest.fail("server did not become healthy in time:\n" + log.read_text()[-3000:])
        text = log.read_text()
        assert "max_model_len: --max-model-len 300 (command line) wins over ALIGNER_MAX_MODEL_LEN=1024" in text
        assert "Maximum concurrency for 300 tokens per request" in text  # vLLM sizing its KV cache for it

        def complete(**kw) -> httpx.Response:
            body = {"model": real_model().spec.identity, "prompt": "Say hi.", "max_tokens": 2} | kw
            return httpx.post(base + "/v1/completions", json=body, timeout=60)

        ok = complete(logprobs=2)
        assert ok.status_code == 200, ok.text
        assert complete(logprobs=3).status_code == 400  # --max-logprobs 2 reached the engine
        too_long = complete(max_tokens=301)
        assert too_long.status_code == 400 and "300" in too_long.text, too_long.text  # and --max-model-len 300
    finally:
        import signal

        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
