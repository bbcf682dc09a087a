"""The ``--device cpu|gpu`` option of the bench scripts, applied before JAX starts.

A script calls :func:`select` before importing ``jax`` (the platform is fixed when JAX
initialises) and :func:`add_option` on its argument parser. On the CPU every method is
pinned to one core and to single-threaded kernels (XLA and BLAS), as the timings in
``bench/results`` are; on a GPU nothing is pinned. The core is the idlest allowed one
(:func:`_idlest_core`): on a shared machine every benchmark pinning the first core would queue
behind the others there while the rest stay idle. The tables record ``jax.devices()``.
"""

from __future__ import annotations

import os
import sys
import time

CHOICES = ("cpu", "gpu")


def _idlest_core() -> int:
    """The allowed core with the most idle time over 0.3 s (``/proc/stat``), else the first."""
    allowed = sorted(os.sched_getaffinity(0))

    def idle():
        with open("/proc/stat") as f:
            rows = [line.split() for line in f if line.startswith("cpu") and line[3].isdigit()]
        return {int(r[0][3:]): int(r[4]) + int(r[5]) for r in rows}

    try:
        before = idle()
        time.sleep(0.3)
        after = idle()
        return max(allowed, key=lambda c: after.get(c, 0) - before.get(c, 0))
    except (OSError, ValueError, IndexError):
        return allowed[0]


def select(argv=None) -> str:
    """Read ``--device`` from the command line (default ``cpu``) and configure JAX for it."""
    argv = sys.argv[1:] if argv is None else argv
    device = "cpu"
    for i, arg in enumerate(argv):
        if arg == "--device" and i + 1 < len(argv):
            device = argv[i + 1]
        elif arg.startswith("--device="):
            device = arg.split("=", 1)[1]
    if device not in CHOICES:
        raise SystemExit(f"--device must be one of {CHOICES}, got {device!r}")
    os.environ["JAX_PLATFORMS"] = "cpu" if device == "cpu" else "cuda"
    if device == "cpu":
        os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")
        if hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, {_idlest_core()})
    return device


def add_option(parser) -> None:
    """Declare ``--device`` on an ``argparse`` parser (:func:`select` has applied it)."""
    parser.add_argument("--device", choices=CHOICES, default="cpu",
                        help="where JAX runs (cpu: one pinned core)")
