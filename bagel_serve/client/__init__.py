"""A typed client of a running bagel-serve gateway, over HTTP (httpx) or gRPC (`bagel.v1.JobService`),
blocking (`Client`) or asyncio (`AsyncClient`). It loads neither torch nor any model code.

    from bagel_serve.client import Client

    with Client("http://127.0.0.1:8080") as c:
        print(c.understand("cat.png", "What is in this picture?", wait=True).text)
"""

from bagel_serve.client.client import AsyncClient, Client, DEFAULT_URL
from bagel_serve.client.errors import (BagelError, Cancelled, DeadlineExceeded, FailedPrecondition, InvalidArgument,
                                       JobFailed, NotFound, PermissionDenied, ResourceExhausted, Unauthenticated,
                                       Unavailable)
from bagel_serve.client.types import ImageResult, Job, JobState, Progress, TextResult, Workflow

__all__ = ["Client", "AsyncClient", "DEFAULT_URL", "Job", "JobState", "Progress", "TextResult", "ImageResult",
           "Workflow", "BagelError", "InvalidArgument", "NotFound", "Unauthenticated", "PermissionDenied",
           "FailedPrecondition", "ResourceExhausted", "Unavailable", "DeadlineExceeded", "Cancelled", "JobFailed"]
