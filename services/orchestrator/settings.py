"""The orchestrator's configuration (worker and gateway), from the environment, as on Kubernetes."""

from __future__ import annotations

from dataclasses import dataclass

from services.common.settings import EnvSettings, setting

QUEUE = "bagel-jobs"      # the Celery queue (a Redis list of that name)
TASK = "bagel.run_job"    # run a job by id
# Short control tasks (ending a session) go to their own queue, so they do not wait behind queued jobs.
CONTROL_QUEUE = "bagel-control"
DELETE_SESSION_TASK = "bagel.delete_session"


@dataclass(frozen=True)
class OrchestratorSettings(EnvSettings):
    # Celery broker and result backend, and the job records
    redis_url: str = setting("BAGEL_REDIS_URL", "redis://127.0.0.1:6379/0")
    vit_addr: str = setting("BAGEL_VIT_ADDR", "127.0.0.1:50051")
    vae_addr: str = setting("BAGEL_VAE_ADDR", "127.0.0.1:50052")
    llm_addr: str = setting("BAGEL_LLM_ADDR", "127.0.0.1:50053")
    # sent to the model servers; the gateway requires it from clients
    auth_token: str | None = setting("BAGEL_AUTH_TOKEN", None)
    # A delivered but unacknowledged job message goes back to the queue after this long: how late a job
    # whose worker died without a goodbye is taken up again. Must exceed the longest job.
    visibility_timeout_s: int = setting("BAGEL_JOB_VISIBILITY_TIMEOUT", 3600, low=1)
    # a running job's worker renews its claim this often (/3)
    lease_s: int = setting("BAGEL_JOB_LEASE_SECONDS", 30, low=1)
    # transient failures (a model server restarting) before FAILED
    max_retries: int = setting("BAGEL_JOB_MAX_RETRIES", 5, low=0)
    # first retry delay, doubled each time, at most 60 s
    retry_backoff_s: float = setting("BAGEL_JOB_RETRY_BACKOFF_SECONDS", 2.0, low=0)
    call_timeout_s: int = setting("BAGEL_JOB_CALL_TIMEOUT", 1800, low=1)  # per gRPC call to a model server
    # finished job records (and their idempotency keys) kept this long
    job_ttl_s: int = setting("BAGEL_JOB_TTL_SECONDS", 86400, low=60)
    # the gateway refuses new jobs (RESOURCE_EXHAUSTED / 429) beyond it
    max_queued: int = setting("BAGEL_MAX_QUEUED_JOBS", 1000, low=1)
    # the gateway refuses (RESOURCE_EXHAUSTED / 429) a client's waiting request (gRPC Run / Watch, HTTP long
    # poll, event stream, synchronous OpenAI call) beyond this many open; a client is its bearer token when
    # auth is on, else its address
    max_streams_per_client: int = setting("BAGEL_MAX_STREAMS_PER_CLIENT", 512, low=1)
    # the workers' janitor: orphaned jobs queued again, expired objects deleted
    sweep_s: int = setting("BAGEL_JOB_SWEEP_SECONDS", 15, low=1)
    # a job not started this long after its message was sent, and whose message is gone from the
    # broker, is sent again by the janitor
    requeue_s: int = setting("BAGEL_JOB_REQUEUE_SECONDS", 600, low=1)
    # any job not ended this long after it was accepted ends FAILED / DEADLINE_EXCEEDED; above the
    # longest deadline (7 days)
    max_age_s: int = setting("BAGEL_JOB_MAX_AGE_SECONDS", 7 * 86400 + 3600, low=60)
    # The gateway's /readyz fails (503) while no worker consumes the job queue. Off by default: on Kubernetes
    # KEDA may scale workers from zero, and only a ready gateway accepts the jobs that make them scale up.
    # The local stack turns it on.
    ready_requires_worker: bool = setting("BAGEL_READY_REQUIRES_WORKER", False)
    # the served model's name in the OpenAI-compatible API (`model`, /v1/models)
    model_name: str = setting("BAGEL_MODEL_NAME", "BAGEL-7B-MoT")
