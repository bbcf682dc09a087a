"""Progress display for long runs: a tqdm bar when available, else a few printed lines.

Used by the upper-level algorithms' ``run(..., verbose=True)``. The display is a host
function called through ``jax.debug.callback`` once per step with the step index, the
objective value, the hypergradient norm and the status, so it works under ``jax.jit`` and
inside ``lax.scan``. tqdm is optional (``pip install "bilevel_jax[progress]"``).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np

from bilevel_jax._src.types import Status

__all__ = ["VERBOSE_MODES", "make_progress"]

#: Accepted values of ``verbose``: off, automatic (tqdm if installed, else printing), or a
#: named display.
VERBOSE_MODES = (False, True, "tqdm", "print")


def _have_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


class _Progress:
    """Host-side state of one display, reset whenever a new run starts.

    Calls arrive once per step, in order. Under ``jax.vmap`` each step arrives once per batch
    member, all members of a step before the next step: indices not above the last one shown
    are skipped, so the display follows the first member to report. Step 0 after a later
    step means a new run (a second call of a compiled ``run``), which starts a new display.
    """

    def __init__(self, num_steps: int, use_tqdm: bool):
        self.num_steps = num_steps
        self.use_tqdm = use_tqdm
        self.every = max(1, num_steps // 10)
        self.last = -1
        self.bar = None
        self.start = 0.0

    def _begin(self) -> None:
        self.start = time.perf_counter()
        if self.use_tqdm:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.num_steps, desc="bilevel_jax", unit="step")

    def __call__(self, index, value, grad_norm, status) -> None:
        i = int(np.asarray(index).ravel()[0])
        if i == 0 and (self.last > 0 or self.num_steps == 1):
            self.last = -1  # a new run of the same compiled program
        if i <= self.last:
            return  # a further batch member of a step already shown (or a late arrival)
        if self.last == -1:
            self._begin()
        self.last = i
        value = float(np.asarray(value).ravel()[0])
        grad_norm = float(np.asarray(grad_norm).ravel()[0])
        name = Status.name_of(np.asarray(status).ravel()[0])
        done = i + 1 == self.num_steps
        if self.bar is not None:
            self.bar.set_postfix_str(f"F={value:.4e} |grad|={grad_norm:.2e} {name}",
                                     refresh=False)
            self.bar.update(i + 1 - self.bar.n)
            if done:
                self.bar.close()
            return
        if i == 0 or (i + 1) % self.every == 0 or done:
            width = len(str(self.num_steps))
            print(f"step {i + 1:>{width}}/{self.num_steps}  F {value:.6e}  "
                  f"|grad| {grad_norm:.3e}  {name}", flush=True)
        if done:
            print(f"{self.num_steps} steps in {time.perf_counter() - self.start:.2f} s", flush=True)


def make_progress(num_steps: int, verbose) -> Callable | None:
    """The host callback ``(index, value, grad_norm, status) -> None`` for ``verbose``.

    Args:
      num_steps: the number of steps of the run (a Python int).
      verbose: ``False`` (no display, returns ``None``), ``True`` (a tqdm bar when tqdm is
        installed, on ``sys.stderr``; else a line on ``sys.stdout`` every ``num_steps // 10``
        steps and at the end), ``"tqdm"`` or
        ``"print"``. Under ``jax.jit`` it must be static.

    Returns:
      The callback, or ``None`` when ``verbose`` is false.

    Raises:
      TypeError: ``verbose`` is not a bool or a string (e.g. traced under ``jax.jit``).
      ValueError: an unknown mode.
      ImportError: ``verbose="tqdm"`` without tqdm installed.
    """
    if verbose is None or verbose is False:
        return None
    if not isinstance(verbose, (bool, str)):
        raise TypeError(
            f"verbose must be True, False, 'tqdm' or 'print', got {type(verbose).__name__}; "
            "under jax.jit mark it static: jax.jit(alg.run, static_argnames=('num_steps', "
            "'verbose')).")
    if verbose not in VERBOSE_MODES:
        raise ValueError(f"verbose must be True, False, 'tqdm' or 'print', got {verbose!r}.")
    if verbose == "tqdm" and not _have_tqdm():
        raise ImportError('verbose="tqdm" needs tqdm: pip install "bilevel_jax[progress]" '
                          '(or verbose="print").')
    use_tqdm = verbose == "tqdm" or (verbose is True and _have_tqdm())
    return _Progress(num_steps, use_tqdm)
