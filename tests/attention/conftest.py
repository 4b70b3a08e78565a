"""Kernel tests run under the Triton interpreter on machines without a GPU.

TRITON_INTERPRET is read when a @triton.jit function is defined, so it must be set before
services.attention.triton's kernel modules are imported. Nothing imports them before they are asked
for (the registry loads the triton backend lazily), so setting it here is early enough. On a CUDA
machine `TRITON_INTERPRET=0 pytest tests/attention` runs the compiled kernels on the GPU instead
(plus the bf16/fp16 GPU-only tests).
"""

import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Kernels already built in the other mode would make these tests run in a mode they did not ask for.
_want_interp = os.environ["TRITON_INTERPRET"] not in ("0", "", "false", "False")
_backend = sys.modules.get("services.attention.triton.backend")
if _backend is not None and _backend.kernels_interpreted() != _want_interp:
    raise RuntimeError("the Triton kernels were imported before tests/attention/conftest.py set "
                       f"TRITON_INTERPRET={os.environ['TRITON_INTERPRET']}; run tests/attention in its own "
                       "pytest process, or set TRITON_INTERPRET for the whole run")
