"""The orchestrator's configuration (worker and gateway), from the environment, as on Kubernetes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from services.common.config import env_int

QUEUE = "bagel-jobs"      # the Celery queue (a Redis list of that name)
TASK = "bagel.run_job"    # run a job by id
# Short control tasks (ending a session) go to their own queue, so they do not wait behind queued jobs.
CONTROL_QUEUE = "bagel-control"
DELETE_SESSION_TASK = "bagel.delete_session"


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
    sweep_s: int = 15                 # the workers' janitor: orphaned jobs queued again, expired objects deleted

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "OrchestratorSettings":
        """BAGEL_REDIS_URL, BAGEL_{VIT,VAE,LLM}_ADDR, BAGEL_AUTH_TOKEN, BAGEL_JOB_VISIBILITY_TIMEOUT,
        BAGEL_JOB_LEASE_SECONDS, BAGEL_JOB_MAX_RETRIES, BAGEL_JOB_CALL_TIMEOUT, BAGEL_JOB_TTL_SECONDS,
        BAGEL_MAX_QUEUED_JOBS, BAGEL_JOB_SWEEP_SECONDS."""
        env = os.environ if env is None else env
        d = cls()
        return cls(redis_url=env.get("BAGEL_REDIS_URL", d.redis_url).strip() or d.redis_url,
                   vit_addr=env.get("BAGEL_VIT_ADDR", d.vit_addr), vae_addr=env.get("BAGEL_VAE_ADDR", d.vae_addr),
                   llm_addr=env.get("BAGEL_LLM_ADDR", d.llm_addr),
                   auth_token=env.get("BAGEL_AUTH_TOKEN", "").strip() or None,
                   visibility_timeout_s=env_int("BAGEL_JOB_VISIBILITY_TIMEOUT", d.visibility_timeout_s, env, 1),
                   lease_s=env_int("BAGEL_JOB_LEASE_SECONDS", d.lease_s, env, 1),
                   max_retries=env_int("BAGEL_JOB_MAX_RETRIES", d.max_retries, env, 0),
                   call_timeout_s=env_int("BAGEL_JOB_CALL_TIMEOUT", d.call_timeout_s, env, 1),
                   job_ttl_s=env_int("BAGEL_JOB_TTL_SECONDS", d.job_ttl_s, env, 60),
                   max_queued=env_int("BAGEL_MAX_QUEUED_JOBS", d.max_queued, env, 1),
                   sweep_s=env_int("BAGEL_JOB_SWEEP_SECONDS", d.sweep_s, env, 1))

    def to_env(self) -> dict[str, str]:
        """The variables that from_env() reads back as these settings (for worker and gateway processes)."""
        env = {"BAGEL_REDIS_URL": self.redis_url, "BAGEL_VIT_ADDR": self.vit_addr, "BAGEL_VAE_ADDR": self.vae_addr,
               "BAGEL_LLM_ADDR": self.llm_addr, "BAGEL_JOB_VISIBILITY_TIMEOUT": str(self.visibility_timeout_s),
               "BAGEL_JOB_LEASE_SECONDS": str(self.lease_s), "BAGEL_JOB_MAX_RETRIES": str(self.max_retries),
               "BAGEL_JOB_CALL_TIMEOUT": str(self.call_timeout_s), "BAGEL_JOB_TTL_SECONDS": str(self.job_ttl_s),
               "BAGEL_MAX_QUEUED_JOBS": str(self.max_queued), "BAGEL_JOB_SWEEP_SECONDS": str(self.sweep_s)}
        if self.auth_token:
            env["BAGEL_AUTH_TOKEN"] = self.auth_token
        return env
