"""First-call (compile) time of ``jax.jit(jax.grad(.))`` through ``solve_qp``, against qpax.

Problem L.1 of ``bench/qp_hypergrad.py`` (Kornowski et al.) at ``d_y = 200``: the first call
of the jitted hypergradient compiles it; every later call only runs it. XLA:CPU's compile
time depends on its flags, which are fixed when JAX starts, so each measurement is one fresh
process (``--worker``), under each of three ``XLA_FLAGS`` settings:

* ``default``: XLA's defaults;
* ``llvm-O0``: ``--xla_backend_optimization_level=0`` (LLVM's optimisation level 0);
* ``llvm-O0+elemental``: also ``--xla_cpu_use_fusion_emitters=false`` (XLA:CPU's elemental IR
  emitter instead of its MLIR fusion emitters).

The settings, the libraries and the repetitions are interleaved, so machine noise falls on
all of them alike. Printed: the median first call (compile plus one run), the median later
call, and the hypergradient's relative difference (2-norm) from bilevel_jax's under the
default flags in the same run (the flags change the compiled code, not the arithmetic's
semantics). No compilation cache is used.

Usage::

    python bench/compile_time.py [--reps 3] [--dy 200] [--device cpu|gpu]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import _device

if __name__ == "__main__" and "--worker" not in sys.argv:
    _device.select()  # (the workers inherit the pinned core and the thread settings)

SETTINGS = {
    "default": "",
    "llvm-O0": "--xla_backend_optimization_level=0",
    "llvm-O0+elemental": "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
}
LIBRARIES = ("bilevel_jax", "qpax")


def worker(library: str, dy: int, later: int) -> dict:
    """In a fresh process: the first call's time, the median later call, the gradient."""
    import jax
    import jax.numpy as jnp
    from qp_hypergrad import l1_problem, time_method, upper  # (jax_enable_x64 on import)

    import bilevel_jax as bj

    prob = l1_problem(1, 100, dy)
    Q, P, A, b, c = (jnp.asarray(prob[k]) for k in ("Q", "P", "A", "b", "c"))

    if library == "bilevel_jax":
        def lower(x):
            return bj.solve_qp(Q, P.T @ x, G=A, h=b).y
    else:
        import qpax

        A0, b0 = jnp.zeros((0, dy)), jnp.zeros((0,))

        def lower(x):
            return qpax.solve_qp_primal(Q, P.T @ x, A0, b0, A, b)

    fn = jax.jit(jax.grad(lambda x: upper(x, lower(x), c)))
    grad, first, median, _ = time_method(fn, jnp.asarray(prob["x0"]), later, budget=60.0)
    return dict(first=first, later=median, grad=grad.tolist(),
                device=jax.devices()[0].device_kind)


def measure(library, setting, dy, later):
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " "
                                      + SETTINGS[setting]).strip())
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, __file__, "--worker", library, "--dy", str(dy),
                          "--later", str(later)], env=env, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        return dict(error=out.stderr.strip().splitlines()[-1] if out.stderr else "failed")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3, help="fresh processes per cell")
    parser.add_argument("--dy", type=int, default=200)
    parser.add_argument("--later", type=int, default=20, help="later calls timed per process")
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "compile_time.txt"))
    _device.add_option(parser)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.dy, args.later)))
        return None
    import numpy as np

    runs = {(lib, s): [] for s in SETTINGS for lib in LIBRARIES}
    for rep in range(args.reps):
        for setting in SETTINGS:
            for lib in LIBRARIES:
                runs[lib, setting].append(measure(lib, setting, args.dy, args.later))
                print(f"rep {rep} {setting:>18} {lib:>12}: "
                      f"{runs[lib, setting][-1].get('first', 'failed')}", flush=True)
    ok = [r for r in runs["bilevel_jax", "default"] if "grad" in r]
    base = np.asarray(ok[0]["grad"]) if ok else None
    device = next((r["device"] for rs in runs.values() for r in rs if "device" in r), "?")
    lines = [f"# Problem L.1, d_y = {args.dy}, d_x = 100: jax.jit(jax.grad(F)) through the lower "
             f"level; device {device}"
             f"{', one pinned core' if args.device == 'cpu' else ''}; each cell the median "
             f"of {args.reps} fresh processes (no compilation cache); later call: median of "
             f"{args.later} per process",
             f"{'XLA_FLAGS setting':<20} {'library':<12} {'first call s':>13} "
             f"{'later call ms':>14} {'grad vs bj default':>19}"]
    for setting in SETTINGS:
        for lib in LIBRARIES:
            good = [r for r in runs[lib, setting] if "first" in r]
            if not good:
                lines.append(f"{setting:<20} {lib:<12} failed: {runs[lib, setting][0]['error']}")
                continue
            first = float(np.median([r["first"] for r in good]))
            later = float(np.median([r["later"] for r in good]))
            g = np.asarray(good[0]["grad"])
            diff = np.linalg.norm(g - base) / np.linalg.norm(base) if base is not None else np.nan
            lines.append(f"{setting:<20} {lib:<12} {first:13.2f} {1e3 * later:14.3f} "
                         f"{diff:19.1e}")
    table = "\n".join(lines)
    print(table)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        fh.write(table + "\n")
    return runs


if __name__ == "__main__":
    main()
