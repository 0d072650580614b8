"""Python SDK for aligner-serve: adapters, chat and completions with `adapter=` or `adapters=`, and the admin API.

    from aligner_client import Client, AdapterSpec, AdapterNotFoundError

    client = Client("http://127.0.0.1:8000", api_key="ak-…")       # or ALIGNER_BASE_URL / ALIGNER_API_KEY
    client.adapters.upload("tone", "tone.safetensors")             # path, bytes or file object
    reply = client.chat.create("Hello!", adapter="tone", max_tokens=30)
    print(reply.text)
    for chunk in client.chat.create("Hello!", adapter="tone@1", stream=True):
        print(chunk.text, end="")
    # a stack of adapters, each at a strength (scale 0: the base model; default 1)
    client.chat.create("Hello!", adapters=["tone:0.5", "json"])
    client.chat.create("Hello!", adapters=[AdapterSpec("tone", scale=0.5), AdapterSpec.from_file("x.safetensors")])
    for a in client.adapters.list_all():
        print(a.id, a.bytes)

Fine-tuning (OpenAI's API): upload JSONL, start a job, wait; the result is an adapter, usable as `model=`.

    f = client.files.create("pirate.jsonl")                        # purpose "fine-tune"
    job = client.fine_tuning.jobs.create(f.id, suffix="pirate", n_epochs=2)   # method="dpo" for pairs
    job = client.fine_tuning.jobs.wait(job.id, on_event=lambda e: print(e.message))
    client.chat.create("Hello!", model=job.fine_tuned_model)      # job.error says why when status is failed

`adapters=` entries: `"name"`, `"name@version"`, `"name:scale"` (split on the last ':'; names hold none),
`{"name" | "inline": ..., "scale": ...}` (sent as written, `inline` bytes base64-encoded) or `AdapterSpec`
(`AdapterSpec.from_file` reads a file to send inline). Passing `adapter=` and `adapters=` together raises
ValueError before anything is sent; a bad scale in a string or spec too. The server checks the rest (scale
bounds, how many entries) and answers 400 naming the entry (`param` "adapters[1].scale").

`AsyncClient` has the same namespaces, awaited (`async for` over streams and `list_all()`). Both share
one I/O-free core (`aligner_client._core`): request building, error mapping, retries, SSE, pagination.

Exceptions mirror the server's error codes (`{"error": {"message", "type", "param", "code"}}`):

    AlignerError
    ├── APIError                     .status .code .type .param .message .retry_after .body
    │   ├── BadRequestError          400  invalid_request_error
    │   ├── AuthenticationError      401  invalid_api_key
    │   ├── PermissionDeniedError    403  permission_denied
    │   ├── NotFoundError            404  model_not_found, not_found (tenants, keys), file_not_found, job_not_found
    │   │   └── AdapterNotFoundError 404  adapter_not_found
    │   ├── ConflictError            409  conflict
    │   ├── PayloadTooLargeError     413  file_too_large
    │   ├── InvalidAdapterError      422  invalid_adapter, base_model_mismatch
    │   ├── RateLimitError           429  rate_limit_exceeded, quota_exceeded (Retry-After)
    │   └── InternalServerError      5xx  internal_error
    │       └── ServiceUnavailableError 503  store_unavailable, engine_busy, engine_not_ready
    ├── APIConnectionError                no answer (refused, reset)
    │   └── APITimeoutError               no answer in time
    └── WaitTimeoutError                  fine_tuning.jobs.wait: the job had not finished in time (.job)

Retries: 429 (but not quota_exceeded), 408, 5xx and connection errors, `max_retries` times (default 2)
with exponential backoff; a Retry-After header sets the wait.
"""

from __future__ import annotations

from aligner_client._client import AsyncClient, AsyncStream, Client, Stream
from aligner_client._core import DEFAULT_BASE_URL, AdapterSpec, RetryPolicy
from aligner_client.errors import *  # noqa: F403  (the exceptions, named in errors.__all__)
from aligner_client.errors import __all__ as __all__  # mypy reads a star import's exports from this form
from aligner_client.models import (
    Adapter,
    AdapterDeleted,
    AdapterList,
    ApiKey,
    ApiKeyList,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    FileDeleted,
    FileList,
    FileObject,
    FineTuningJob,
    FineTuningJobCheckpoint,
    FineTuningJobCheckpointList,
    FineTuningJobEvent,
    FineTuningJobEventList,
    FineTuningJobList,
    JobError,
    ModelCard,
    ModelList,
    Quotas,
    Tenant,
    TenantList,
)

__version__ = "0.1.0"

__all__ = [
    "Client",
    "AsyncClient",
    "Stream",
    "AsyncStream",
    "RetryPolicy",
    "AdapterSpec",
    "DEFAULT_BASE_URL",
    *__all__,  # the exceptions
    "Adapter",
    "AdapterList",
    "AdapterDeleted",
    "ModelCard",
    "ModelList",
    "Quotas",
    "Tenant",
    "TenantList",
    "ApiKey",
    "ApiKeyList",
    "ChatCompletion",
    "ChatCompletionChunk",
    "Completion",
    "CompletionChunk",
    "FileObject",
    "FileList",
    "FileDeleted",
    "FineTuningJob",
    "FineTuningJobList",
    "FineTuningJobEvent",
    "FineTuningJobEventList",
    "FineTuningJobCheckpoint",
    "FineTuningJobCheckpointList",
    "JobError",
]
