"""What it costs to start the gateway and the worker: import time and resident memory of each role's entry
module in a fresh interpreter (the part of a process start that the code decides), and whether torch or
model code got loaded.

    python benchmarks/role_footprint.py [--repeats 5] [--root DIR]

`--root` measures another checkout of the project (e.g. an older commit) with this interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

ROLES = {
    "gateway": "import services.orchestrator.gateway",
    "worker": "import services.orchestrator.celery_app",
}
PROBE = """
import resource, sys, time
t = time.perf_counter()
{stmt}
took = time.perf_counter() - t
heavy = sorted(m for m in sys.modules if m in ("torch", "triton") or m.startswith(("services.llm", "services.vit",
                                                                                  "services.vae")))
print({{"import_s": took, "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch": "torch" in sys.modules, "model_modules": len(heavy)}})
"""


def measure(stmt: str, root: str, repeats: int) -> dict:
    env = {**os.environ, "PYTHONPATH": root}
    runs = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, "-c", PROBE.format(stmt=stmt)], cwd=root, env=env, check=True,
                             capture_output=True, text=True, timeout=300).stdout
        runs.append(eval(out.strip().splitlines()[-1]))  # the dict printed above
    return {"import_s_median": round(statistics.median(r["import_s"] for r in runs), 3),
            "max_rss_mib_median": round(statistics.median(r["max_rss_mib"] for r in runs), 1),
            "torch_loaded": runs[0]["torch"], "model_modules_loaded": runs[0]["model_modules"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = p.parse_args()
    measure("import json", args.root, 1)  # warm the file cache, generate protos if needed
    print(json.dumps({role: measure(stmt, args.root, args.repeats) for role, stmt in ROLES.items()}, indent=2))


if __name__ == "__main__":
    main()
