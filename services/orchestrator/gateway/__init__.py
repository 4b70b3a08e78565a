"""The gateway: the job API product backends call, over gRPC (`bagel.v1.JobService`) and HTTP/JSON.

One module per role: operations.py (the job operations both fronts share), grpc_api.py (the gRPC
servicer), http_api.py (the HTTP app), process.py (both fronts in one process, and its command line).
It imports neither torch nor any model code.

Accepting a job means: the request is checked (bad input is refused here with INVALID_ARGUMENT / 400,
not turned into a failed job), its input image is stored in the bucket, its record is written to
Redis, and its task is queued. Only then does the client get the job id, so an accepted job survives a
gateway restart. Workers (celery_app.py) run it; the gateway only reads and follows the record.

HTTP (bodies are the protos in protobuf's JSON mapping; `workflow` also takes "generate" etc.):
    POST /v1/jobs[?wait=S]           submit (JSON, or multipart: `request` JSON + `image` file); 202 with
                                     the Job, or 200 with the ended Job within S seconds
    GET  /v1/jobs/{id}[?wait=S]      the Job; with wait, returns as soon as it ends (long poll)
    GET  /v1/jobs/{id}/events        server-sent events: the Job at every change until it ends
    GET  /v1/jobs/{id}/image         the output PNG of a generate / edit job
    POST /v1/jobs/{id}/cancel        cancel; the Job
    DELETE /v1/sessions/{id}         end a conversation now (404 when there is none)
    GET  /healthz                    alive;  GET /readyz: Redis and the bucket reachable (and a worker, if required)
"""

from services.orchestrator.gateway.grpc_api import JobServicer
from services.orchestrator.gateway.http_api import MAX_BODY_BYTES, MAX_WAIT_S, build_http_app
from services.orchestrator.gateway.operations import Gateway
from services.orchestrator.gateway.process import GatewayProcess, add_gateway_arguments, build_gateway, gateway_from_args

__all__ = ["MAX_BODY_BYTES", "MAX_WAIT_S", "Gateway", "GatewayProcess", "JobServicer", "add_gateway_arguments",
           "build_gateway", "build_http_app", "gateway_from_args"]
