"""The gRPC front: bagel.v1.JobService on the job operations."""

from __future__ import annotations

import logging
import threading

from services.common.protos import jobs_pb2_grpc, llm_pb2
from services.orchestrator.gateway.operations import Gateway
from services.orchestrator.jobs import is_terminal

log = logging.getLogger("bagel.gateway")


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, gateway: Gateway):
        self.g = gateway

    def Submit(self, request, context):
        return self.g.submit(request)

    def Run(self, request, context):
        job, updates = self.g.run(request, request.inline_image, alive=context.is_active)
        ended = threading.Event()

        def on_done():  # a caller that gives up on a synchronous run does not leave it running
            if not ended.is_set():
                try:
                    self.g.cancel(job.id)
                except Exception:  # noqa: BLE001
                    log.warning("could not cancel an abandoned run", exc_info=True, extra={"job_id": job.id})

        context.add_callback(on_done)
        # No timeout of our own: the caller's deadline ends the call (DEADLINE_EXCEEDED), gRPC enforces it.
        for update in updates:
            if is_terminal(update):
                ended.set()
            yield update

    def Get(self, request, context):
        return self.g.get(request.id, request.inline_image)

    def Watch(self, request, context):
        yield from self.g.watch(request.id, None, request.inline_image, alive=context.is_active)

    def Cancel(self, request, context):
        return self.g.cancel(request.id)

    def DeleteSession(self, request, context):
        self.g.delete_session(request.session_id)
        return llm_pb2.DeleteSessionResponse(deleted=True)
