"""The orchestrator's configuration (worker and gateway), from the environment, as on Kubernetes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

QUEUE = "bagel-jobs"      # the Celery queue (a Redis list of that name)
TASK = "bagel.run_job"    # the one task: run a job by id


def _int(env: Mapping[str, str], name: str, default: int, low: int = 0) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < low:
        raise ValueError(f"{name} must be at least {low}, got {value}")
    return value


@dataclass(frozen=True)
class OrchestratorSettings:
    redis_url: str = "redis://127.0.0.1:6379/0"  # Celery broker and result backend, and the job records
    vit_addr: str = "127.0.0.1:50051"
    vae_addr: str = "127.0.0.1:50052"
    llm_addr: str = "127.0.0.1:50053"
    auth_token: str | None = None     # sent to the model servers; the gateway requires it from clients
    # A delivered but unacknowledged job message goes back to the queue after this long: how late a job
    # whose worker died without a goodbye is taken up again. Must exceed the longest job.
    visibility_timeout_s: int = 3600
    lease_s: int = 30                 # a running job's worker renews its claim this often (/3)
    max_retries: int = 5              # transient failures (a model server restarting) before FAILED
    retry_backoff_s: float = 2.0      # first retry delay, doubled each time, at most 60 s
    call_timeout_s: int = 1800        # per gRPC call to a model server
    job_ttl_s: int = 86400            # finished job records (and their idempotency keys) kept this long
    max_queued: int = 1000            # the gateway refuses new jobs (RESOURCE_EXHAUSTED / 429) beyond it

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OrchestratorSettings":
        """BAGEL_REDIS_URL, BAGEL_{VIT,VAE,LLM}_ADDR, BAGEL_AUTH_TOKEN, BAGEL_JOB_VISIBILITY_TIMEOUT,
        BAGEL_JOB_LEASE_SECONDS, BAGEL_JOB_MAX_RETRIES, BAGEL_JOB_CALL_TIMEOUT, BAGEL_JOB_TTL_SECONDS,
        BAGEL_MAX_QUEUED_JOBS."""
        env = os.environ if env is None else env
        d = cls()
        return cls(redis_url=env.get("BAGEL_REDIS_URL", d.redis_url).strip() or d.redis_url,
                   vit_addr=env.get("BAGEL_VIT_ADDR", d.vit_addr), vae_addr=env.get("BAGEL_VAE_ADDR", d.vae_addr),
                   llm_addr=env.get("BAGEL_LLM_ADDR", d.llm_addr),
                   auth_token=env.get("BAGEL_AUTH_TOKEN", "").strip() or None,
                   visibility_timeout_s=_int(env, "BAGEL_JOB_VISIBILITY_TIMEOUT", d.visibility_timeout_s, 1),
                   lease_s=_int(env, "BAGEL_JOB_LEASE_SECONDS", d.lease_s, 1),
                   max_retries=_int(env, "BAGEL_JOB_MAX_RETRIES", d.max_retries),
                   call_timeout_s=_int(env, "BAGEL_JOB_CALL_TIMEOUT", d.call_timeout_s, 1),
                   job_ttl_s=_int(env, "BAGEL_JOB_TTL_SECONDS", d.job_ttl_s, 60),
                   max_queued=_int(env, "BAGEL_MAX_QUEUED_JOBS", d.max_queued, 1))
