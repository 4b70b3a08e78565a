"""The Celery side every role shares: the app's configuration and the names of its tasks and queues.

Importable without the runner (and so without grpc clients or workflows): the gateway sends tasks by
name with `make_celery(settings).send_task(TASK, ...)`; the worker (celery_app.py) registers their
implementations on an app made here.

Delivery is at-least-once and a job is never dropped: the task message is acknowledged only after the
job has ended (acks_late), a worker takes one message at a time (prefetch 1), and a message whose
worker died goes back to the queue after the visibility timeout; the runner's lease makes a second
delivery harmless, and the janitor queues the job of a dead worker again well before that, and sends
again the message of a job that has waited too long while its message is nowhere in the broker. Job state
and results live in the job records (jobs.py), not in Celery's backend.
"""

from __future__ import annotations

from celery import Celery

from services.orchestrator.settings import CONTROL_QUEUE, DELETE_SESSION_TASK, QUEUE, TASK, OrchestratorSettings

__all__ = ["CONTROL_QUEUE", "DELETE_SESSION_TASK", "QUEUE", "TASK", "make_celery"]


def make_celery(settings: OrchestratorSettings) -> Celery:
    """A Celery app on the settings' Redis (broker and result backend), with no task registered."""
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
    return app
