"""The fine-tuning API's wire shapes (OpenAI's), and a job request turned into the trainer's settings.

`JobCreate` is OpenAI's `POST /v1/fine_tuning/jobs` body plus our optional `aligner` (the adapter's shape).
`plan_job` checks it against the files and the served model and fixes every "auto" hyperparameter, so the
stored job `spec` says exactly what the worker (server/finetune_worker.py) runs:

    spec = {"method": "supervised" | "dpo", "n_epochs", "batch_size", "learning_rate_multiplier", "lr",
            "beta" (dpo), "steps", "tokens", "start_layer", "gate_activation", "seed", "suffix", "metadata"}

The objects shown (`job_object`, `event_object`, ...) follow OpenAI's `FineTuningJob`,
`FineTuningJobEvent`, `FineTuningJobCheckpoint` and `OpenAIFile`, with times as Unix seconds.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from adapters_store import CheckpointRecord, FileRecord, JobEvent, JobRecord
from aligner_core.model_spec import ModelSpec
from server.errors import InvalidRequest
from server.training_files import METHOD_FORMAT

#: learning rate at learning_rate_multiplier 1: the shipped recipes' (training/recipes.py)
BASE_LR = {"supervised": 3e-2, "dpo": 5e-4}
#: "auto" epochs aim the run at about this many examples seen (the recipes: 60 steps x 8)
AUTO_EXAMPLES = 480
AUTO_MAX_EPOCHS = 10
DEFAULT_BATCH = 8
SUFFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")

Auto = Literal["auto"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    n_epochs: int | Auto = Field(default="auto")
    batch_size: int | Auto = Field(default="auto")
    learning_rate_multiplier: float | Auto = Field(default="auto")
    beta: float | Auto | None = None  # dpo only


class MethodBody(_Strict):
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(_Strict):
    type: Literal["supervised", "dpo"] = "supervised"
    supervised: MethodBody | None = None
    dpo: MethodBody | None = None


class AlignerShape(_Strict):
    """Ours: the trained adapter's prefix tokens N, first adapted layer and gate activation."""

    tokens: int = Field(default=1, ge=1)
    start_layer: int = Field(default=2, ge=0)
    gate_activation: Literal["identity", "tanh"] = "identity"


class JobCreate(_Strict):
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    method: Method | None = None
    hyperparameters: Hyperparameters | None = None  # OpenAI's older place for them (supervised)
    integrations: list[dict] | None = None
    metadata: dict[str, str] | None = None
    aligner: AlignerShape | None = None


def _hyper(body: JobCreate) -> tuple[str, Hyperparameters]:
    method = body.method or Method()
    chosen = getattr(method, method.type)
    if body.hyperparameters is not None:
        if body.method is not None:
            raise InvalidRequest(
                "give hyperparameters inside method, not also at the top level", param="hyperparameters"
            )
        return method.type, body.hyperparameters
    return method.type, chosen.hyperparameters if chosen is not None else Hyperparameters()


def _positive(value: Any, param: str, *, limit: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and 0 < value <= limit):
        raise InvalidRequest(f"{param} must be a number above 0 and at most {limit:g}", param=param)


def plan_job(
    body: JobCreate,
    *,
    spec: ModelSpec,
    served: set[str],
    training: FileRecord,
    validation: FileRecord | None,
    max_tokens: int,
    max_steps: int,
) -> dict:
    """The job's `spec` (module docstring); InvalidRequest naming the field at fault."""
    if body.model not in served:
        raise InvalidRequest(
            f"model {body.model!r} cannot be fine-tuned here: use the base model, {spec.identity!r}", param="model"
        )
    if body.integrations:
        raise InvalidRequest("integrations are not supported", param="integrations")
    if body.suffix is not None and not SUFFIX_RE.fullmatch(body.suffix):
        raise InvalidRequest("suffix: 1-40 letters, digits, '.', '_' or '-', starting with one", param="suffix")
    method, hp = _hyper(body)
    where = f"method.{method}.hyperparameters" if body.hyperparameters is None else "hyperparameters"
    for param, file in (("training_file", training), ("validation_file", validation)):
        if file is not None and file.format != METHOD_FORMAT[method]:
            raise InvalidRequest(
                f"{param} {file.id!r} holds {file.format} examples; method {method!r} needs a "
                f"{METHOD_FORMAT[method]} file",
                param=param,
            )
    if method == "supervised" and hp.beta is not None:
        raise InvalidRequest("beta is a dpo hyperparameter", param=f"{where}.beta")
    batch = DEFAULT_BATCH if hp.batch_size == "auto" else hp.batch_size
    _positive(batch, f"{where}.batch_size", limit=256)
    epochs = (
        min(AUTO_MAX_EPOCHS, max(1, math.ceil(AUTO_EXAMPLES / training.lines)))
        if hp.n_epochs == "auto"
        else hp.n_epochs
    )
    _positive(epochs, f"{where}.n_epochs", limit=50)
    mult = 1.0 if hp.learning_rate_multiplier == "auto" else hp.learning_rate_multiplier
    _positive(mult, f"{where}.learning_rate_multiplier", limit=100)
    beta = None
    if method == "dpo":
        beta = 0.1 if hp.beta in (None, "auto") else hp.beta
        _positive(beta, f"{where}.beta", limit=10)
    steps = max(1, math.ceil(epochs * training.lines / batch))
    if steps > max_steps:
        raise InvalidRequest(
            f"the job would run {steps} optimizer steps ({epochs} epochs x {training.lines} examples / batch "
            f"{batch}); at most {max_steps} (ALIGNER_FINETUNE_MAX_STEPS): lower n_epochs",
            param=f"{where}.n_epochs",
        )
    shape = body.aligner or AlignerShape()
    if shape.tokens > max_tokens:
        raise InvalidRequest(
            f"aligner.tokens: at most {max_tokens} (ALIGNER_MAX_ADAPTER_TOKENS)", param="aligner.tokens"
        )
    if shape.start_layer >= spec.num_layers:
        raise InvalidRequest(
            f"aligner.start_layer: the model has {spec.num_layers} layers (0 to {spec.num_layers - 1})",
            param="aligner.start_layer",
        )
    return {
        "method": method,
        "n_epochs": epochs,
        "batch_size": batch,
        "learning_rate_multiplier": mult,
        "lr": BASE_LR[method] * mult,
        "beta": beta,
        "steps": steps,
        "tokens": shape.tokens,
        "start_layer": shape.start_layer,
        "gate_activation": shape.gate_activation,
        "seed": body.seed if body.seed is not None else 0,
        "suffix": body.suffix,
        "metadata": body.metadata,
    }


def adapter_name(job_id: str, suffix: str | None) -> str:
    """The adapter a succeeded job stores: `ft-<suffix>-<12 hex of the job id>` (a valid adapter name)."""
    short = job_id.removeprefix("ftjob-")[:12]
    return f"ft-{suffix}-{short}" if suffix else f"ft-{short}"


def _unix(t: datetime | None) -> int | None:
    return None if t is None else int(t.timestamp())


def file_object(f: FileRecord) -> dict:
    return {
        "id": f.id,
        "object": "file",
        "bytes": f.bytes,
        "created_at": _unix(f.created_at),
        "expires_at": None,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "status_details": None,
    }


def job_object(job: JobRecord) -> dict:
    s = job.spec
    hp: dict[str, Any] = {
        "n_epochs": s["n_epochs"],
        "batch_size": s["batch_size"],
        "learning_rate_multiplier": s["learning_rate_multiplier"],
    }
    if s["method"] == "dpo":
        hp["beta"] = s["beta"]
    error = job.error or None
    return {
        "id": job.id,
        "object": "fine_tuning.job",
        "created_at": _unix(job.created_at),
        "error": error,
        "fine_tuned_model": job.fine_tuned_model,
        "finished_at": _unix(job.finished_at),
        "hyperparameters": {k: hp[k] for k in ("n_epochs", "batch_size", "learning_rate_multiplier")},
        "model": job.model,
        "organization_id": "org-" + job.tenant_id,
        "result_files": [],
        "seed": s["seed"],
        "status": job.status,
        "trained_tokens": job.trained_tokens,
        "training_file": job.training_file,
        "validation_file": job.validation_file,
        "estimated_finish": None,
        "integrations": [],
        "metadata": s.get("metadata"),
        "suffix": s.get("suffix"),
        "method": {"type": s["method"], s["method"]: {"hyperparameters": hp}},
        "aligner": {"tokens": s["tokens"], "start_layer": s["start_layer"], "gate_activation": s["gate_activation"]},
        "started_at": _unix(job.started_at),
        "attempts": job.attempts,
    }


def event_object(e: JobEvent) -> dict:
    return {
        "id": e.id,
        "object": "fine_tuning.job.event",
        "created_at": _unix(e.created_at),
        "level": e.level,
        "message": e.message,
        "type": e.type,
        "data": e.data or {},
    }


def checkpoint_object(c: CheckpointRecord) -> dict:
    return {
        "id": c.id,
        "object": "fine_tuning.job.checkpoint",
        "created_at": _unix(c.created_at),
        "fine_tuned_model_checkpoint": c.fine_tuned_model_checkpoint,
        "fine_tuning_job_id": c.job_id,
        "metrics": c.metrics,
        "step_number": c.step,
    }


def page(items: list[dict], has_more: bool) -> dict:
    """OpenAI's cursor page: `after` the last id gives the next one."""
    return {
        "object": "list",
        "data": items,
        "has_more": has_more,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
    }
