"""The worker's Celery app: the shared configuration (tasks.py) with the task implementations of
runner.py registered on it.

    celery -A services.orchestrator.celery_app:app worker     # or: bagel-serve worker
"""

from __future__ import annotations

import redis
from celery import Celery, signals

from services.orchestrator.heartbeat import Heartbeat

from services.orchestrator.runner import Runtime, delete_session, execute
from services.orchestrator.settings import OrchestratorSettings
from services.orchestrator.tasks import DELETE_SESSION_TASK, QUEUE, TASK, make_celery


def make_app(settings: OrchestratorSettings | None = None, runtime: Runtime | None = None) -> Celery:
    settings = settings or OrchestratorSettings.from_env()
    app = make_celery(settings)
    app.bagel_runtime = runtime or Runtime(settings)

    @app.task(name=TASK, bind=True, shared=False)  # shared=False: not added to apps made later
    def run_job(self, job_id: str) -> None:
        execute(job_id, self.app.bagel_runtime)

    # Every worker process runs the janitor (one sweep at a time across them, under a Redis lock).
    def start_janitor(sender, **_):
        if sender.app is app:
            rt = app.bagel_runtime
            app.bagel_janitor = rt.janitor(lambda job_id: run_job.apply_async(args=[job_id], queue=QUEUE))
            app.bagel_janitor.start(rt.settings.sweep_s)

    def stop_janitor(sender, **_):
        if sender.app is app and getattr(app, "bagel_janitor", None) is not None:
            app.bagel_janitor.stop()

    signals.worker_ready.connect(start_janitor, weak=False)
    signals.worker_shutdown.connect(stop_janitor, weak=False)

    # The consuming process says it is alive, for the gateway's readiness (heartbeat.py).
    def start_heartbeat(sender, **_):
        if sender.app is app:
            client = redis.Redis.from_url(app.bagel_runtime.settings.redis_url)
            app.bagel_heartbeat = Heartbeat(client, sender.hostname).start()

    def stop_heartbeat(sender, **_):
        if sender.app is app and getattr(app, "bagel_heartbeat", None) is not None:
            app.bagel_heartbeat.stop()

    signals.worker_ready.connect(start_heartbeat, weak=False)
    signals.worker_shutdown.connect(stop_heartbeat, weak=False)

    # The gateway waits for this one's answer (through the result backend); nothing to redo if lost.
    @app.task(name=DELETE_SESSION_TASK, bind=True, shared=False, ignore_result=False, acks_late=False)
    def end_session(self, session_id: str) -> bool:
        return delete_session(session_id, self.app.bagel_runtime)

    return app


app = make_app()
