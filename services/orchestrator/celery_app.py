"""The Celery app: Redis as broker and result backend, one task that runs a job (runner.py).

    celery -A services.orchestrator.celery_app:app worker     # or: bagel-serve worker

Delivery is at-least-once and a job is never dropped: the task message is acknowledged only after the
job has ended (acks_late), a worker takes one message at a time (prefetch 1), and a message whose
worker died goes back to the queue after the visibility timeout; runner.py's lease makes a second
delivery harmless, and the janitor (janitor.py) queues the job of a dead worker again well before that.
Job state and results live in the job records (jobs.py), not in Celery's backend.
"""

from __future__ import annotations

from celery import Celery, signals

from services.orchestrator.runner import Runtime, delete_session, execute
from services.orchestrator.settings import DELETE_SESSION_TASK, QUEUE, TASK, OrchestratorSettings


def make_app(settings: OrchestratorSettings | None = None, runtime: Runtime | None = None) -> Celery:
    settings = settings or OrchestratorSettings.from_env()
    app = Celery("bagel", broker=settings.redis_url, backend=settings.redis_url)
    app.conf.update(
        task_serializer="json", accept_content=["json"], result_serializer="json",
        task_default_queue=QUEUE,
        task_acks_late=True,                 # acknowledge after the job ended, not when it was received
        task_reject_on_worker_lost=True,     # a pool child killed mid-job puts the message back
        task_ignore_result=True,             # results live in the job record
        worker_prefetch_multiplier=1,        # a worker never sits on jobs another could start
        # Scan for messages of dead workers every few seconds (kombu's default is every ~100 s).
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s,
                                  "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
                                  "unacked_restore_throttle": 1},
        result_backend_transport_options={"visibility_timeout": settings.visibility_timeout_s},
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_cancel_long_running_tasks_on_connection_loss=False,
    )
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

    # The gateway waits for this one's answer (through the result backend); nothing to redo if lost.
    @app.task(name=DELETE_SESSION_TASK, bind=True, shared=False, ignore_result=False, acks_late=False)
    def end_session(self, session_id: str) -> bool:
        return delete_session(session_id, self.app.bagel_runtime)

    return app


app = make_app()
