"""Fuzz ``bj.solve_qp`` and ``bj.argmin`` against an independent reference, at scale.

The problem families of ``tests/qp_families.py`` (the property suite's generators), solved in
batches by one compiled call per solver and dtype, each result judged against
``tests/reference.py`` (Clarabel, polished on its active set, plus the exact hypergradient
from the KKT system on the active set). Prints one row per family:

* ``count``, ``SUCCESS``, and the other statuses by name;
* ``wrong``: silent wrong answers (SUCCESS with a violated KKT condition, ``y`` or a
  hypergradient off the reference beyond the tolerance, or SUCCESS on a problem that is
  infeasible, unbounded or has non-finite data);
* ``bad-status``: a non-SUCCESS status that contradicts the reference (e.g. MAX_STEPS on an
  infeasible problem, INFEASIBLE on a solvable one);
* ``nan-leak``: NaN in the output or gradient with SUCCESS, or a finite gradient without it;
* ``crash``: an exception;
* ``ref?``: problems the reference could not decide (not judged).

Usage::

    python bench/fuzz.py --total 10000                 # float64, every family, ~equal shares
    python bench/fuzz.py --total 1000 --dtype float32 --families strict,scaled
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

import _device

if __name__ == "__main__":  # before JAX starts; bench/ is on sys.path when run as a script
    _device.select()  # (on the CPU: one pinned core, single-threaded kernels)

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))

import jax  # noqa: E402
import numpy as np  # noqa: E402

jax.config.update("jax_enable_x64", True)

import qp_families as fam  # noqa: E402

# (label, generator family, solver): solve_qp on every QP family, argmin(eq=, ineq=) on the
# well-posed ones, argmin(box=) on box problems.
CASES = [(f, f, "qp") for f in fam.FAMILIES] + [
    ("argmin:strict", "strict", "argmin"),
    ("argmin:small_margin", "small_margin", "argmin"),
    ("argmin:infeasible", "infeasible", "argmin"),
    ("argmin_box:box", "box", "argmin_box"),
    ("argmin_box:box_infeasible", "box_infeasible", "argmin_box"),
]
BATCH = 100


def run(total, dtype, seed, labels, log_examples=3):
    cases = [c for c in CASES if c[0] in labels]
    per_case = max(1, total // len(cases))
    rows, examples = [], []
    for k, (label, family, solver) in enumerate(cases):
        counts = collections.Counter()
        statuses = collections.Counter()
        worst_grad, worst_y = 0.0, 0.0
        t0 = time.perf_counter()
        done = 0
        while done < per_case:
            size = min(BATCH, per_case - done)
            problems = fam.batch(family, (seed, k, done), size)
            results = fam.run_batch(problems, dtype, solver)
            for p, r in zip(problems, results, strict=True):
                v = fam.check(p, r, dtype)
                statuses[r.status] += 1
                counts["wrong"] += v.silent_wrong
                counts["bad-status"] += v.wrong_status
                counts["nan-leak"] += v.nan_leak
                counts["crash"] += v.crash
                counts["ref?"] += v.expected == "?"
                counts["intent"] += v.intent_mismatch
                if np.isfinite(v.grad_err):
                    worst_grad = max(worst_grad, v.grad_err)
                if np.isfinite(v.y_err):
                    worst_y = max(worst_y, v.y_err)
                if not v.ok and sum(e[0] == label for e in examples) < log_examples:
                    examples.append((label, p.kind, r.status, v.expected, "; ".join(v.reasons),
                                     v.cond))
            done += size
        rows.append(dict(label=label, count=done, statuses=statuses, counts=counts,
                         worst_grad=worst_grad, worst_y=worst_y,
                         seconds=time.perf_counter() - t0))
        print(_row(rows[-1]), flush=True)
    return rows, examples


_HEADER = (f"{'family':28s} {'count':>6s} {'SUCCESS':>7s} {'wrong':>6s} {'bad-st':>6s} "
           f"{'nanlk':>6s} {'crash':>5s} {'ref?':>5s} {'max y err':>9s} {'max g err':>9s} "
           f"{'sec':>6s}  other statuses")


def _row(r):
    other = ", ".join(f"{k} {v}" for k, v in sorted(r["statuses"].items()) if k != "SUCCESS")
    c = r["counts"]
    return (f"{r['label']:28s} {r['count']:6d} {r['statuses'].get('SUCCESS', 0):7d} "
            f"{c['wrong']:6d} {c['bad-status']:6d} {c['nan-leak']:6d} {c['crash']:5d} "
            f"{c['ref?']:5d} {r['worst_y']:9.1e} {r['worst_grad']:9.1e} {r['seconds']:6.1f}  "
            f"{other or '-'}" + (f"  [generator/reference disagree: {c['intent']}]"
                                 if c["intent"] else ""))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--total", type=int, default=10000, help="problems over all families")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--families", default="all",
                        help="comma-separated labels (default: all): "
                             + ", ".join(c[0] for c in CASES))
    parser.add_argument("--results-dir", default=str(Path(__file__).resolve().parent / "results"),
                        help="where fuzz.txt (float64) / fuzz_float32.txt go")
    parser.add_argument("--out", default=None,
                        help="also write the table here (it always goes to bench/results/"
                             "fuzz.txt, or fuzz_float32.txt)")
    _device.add_option(parser)
    args = parser.parse_args(argv)
    labels = [c[0] for c in CASES] if args.families == "all" else args.families.split(",")
    unknown = set(labels) - {c[0] for c in CASES}
    if unknown:
        parser.error(f"unknown families: {sorted(unknown)}")
    t0 = time.perf_counter()
    print(f"fuzz: {args.total} problems, {args.dtype}, seed {args.seed}, shape "
          f"(n, p, k) = {fam.SHAPE} (box: n = {fam.N}), tolerances "
          f"{fam.TOLERANCES[args.dtype]}")
    print(_HEADER, flush=True)
    rows, examples = run(args.total, args.dtype, args.seed, labels)
    total = dict(label="TOTAL", count=sum(r["count"] for r in rows),
                 statuses=sum((r["statuses"] for r in rows), collections.Counter()),
                 counts=sum((r["counts"] for r in rows), collections.Counter()),
                 worst_grad=max(r["worst_grad"] for r in rows),
                 worst_y=max(r["worst_y"] for r in rows),
                 seconds=time.perf_counter() - t0)
    cond_max = fam.TOLERANCES[args.dtype]["cond"]
    lines = [
        f"bench/fuzz.py --total {args.total} --dtype {args.dtype} --seed {args.seed} "
        f"--families {args.families}",
        f"jax {jax.__version__}, {jax.devices()[0].platform}, "
        f"{time.strftime('%Y-%m-%d %H:%M')}, {total['seconds']:.0f} s",
        f"tolerances ({args.dtype}): {fam.TOLERANCES[args.dtype]} (y and hypergradient "
        f"errors allowed to grow as 16 cond eps; compared up to cond {cond_max:.0e})",
        "",
        _HEADER,
        *(_row(r) for r in rows),
        _row(total),
        "",
        "examples (up to 3 per family):",
        *(f"  {lab} [{kind}]: {st} (expected {exp}) {why}  cond={cond:.1e}"
          for lab, kind, st, exp, why, cond in examples),
    ]
    text = "\n".join(lines) + "\n"
    print()
    print("\n".join(lines[-len(examples) - 1:]))
    print(f"total time {total['seconds']:.0f} s")
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    name = "fuzz.txt" if args.dtype == "float64" else f"fuzz_{args.dtype}.txt"
    (results / name).write_text(text)
    if args.out:
        Path(args.out).write_text(text)
    return rows


if __name__ == "__main__":
    main()
