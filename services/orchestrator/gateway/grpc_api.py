"""The gRPC front: bagel.v1.JobService on the job operations."""

from __future__ import annotations

import logging
import threading

import grpc

from services.common.protos import jobs_pb2_grpc, llm_pb2
from services.orchestrator.gateway.operations import Gateway
from services.orchestrator.gateway.streams import client_key, grpc_peer_address
from services.orchestrator.jobs import is_terminal

log = logging.getLogger("bagel.gateway")


JOB_ID_KEY = "bagel-job-id"  # trailing metadata of a stream the gateway ended early: the job to follow again


class JobServicer(jobs_pb2_grpc.JobServiceServicer):
    def __init__(self, gateway: Gateway, stopping: threading.Event | None = None, auth_token: str | None = None):
        self.g, self.auth_token = gateway, auth_token
        # Set by the process before its servers stop: open streams then end with UNAVAILABLE, jobs untouched.
        self.stopping = stopping or threading.Event()

    def Submit(self, request, context):
        return self.g.submit(request)

    def Run(self, request, context):
        with self._stream(context):  # counted before the job is submitted: a refused Run submits nothing
            job, updates = self.g.run(request, request.inline_image, alive=self._alive(context))
            ended = threading.Event()

            def on_done():
                # A caller that hangs up or whose deadline passes does not leave its run going; a gateway
                # shutting down is not the caller giving up (a rolling restart must not cancel users' work).
                if not ended.is_set() and not self.stopping.is_set():
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
            if not ended.is_set():
                self._end_resumable(context, job.id)

    def Get(self, request, context):
        return self.g.get(request.id, request.inline_image)

    def Watch(self, request, context):
        with self._stream(context):
            last = None
            for last in self.g.watch(request.id, None, request.inline_image, alive=self._alive(context)):
                yield last
            if last is not None and not is_terminal(last):
                self._end_resumable(context, last.id)

    def Cancel(self, request, context):
        return self.g.cancel(request.id)

    def DeleteSession(self, request, context):
        self.g.delete_session(request.session_id)
        return llm_pb2.DeleteSessionResponse(deleted=True)

    def _stream(self, context):
        """This call as one of its client's open streams (TooManyStreams -> RESOURCE_EXHAUSTED past the limit).
        The AuthInterceptor has already checked the token, so with auth on it names the client."""
        token = None
        if self.auth_token:
            token = dict(context.invocation_metadata()).get("authorization", "").partition(" ")[2].strip()
        return self.g.streams.hold(client_key(token, grpc_peer_address(context.peer())))

    def _alive(self, context):
        return lambda: context.is_active() and not self.stopping.is_set()

    def _end_resumable(self, context, job_id: str) -> None:
        """A stream cut short by the shutdown (a caller who left hears nothing): UNAVAILABLE, which clients
        retry, naming the job so that another gateway's Watch or Get picks it up where it is."""
        if self.stopping.is_set():
            context.set_trailing_metadata(((JOB_ID_KEY, job_id),))
            context.abort(grpc.StatusCode.UNAVAILABLE, f"the gateway is shutting down; job {job_id} goes on: "
                                                       "follow it again with Watch or Get")
