"""``python -m bilevel_jax``: the demo (see :mod:`bilevel_jax._src.demo`)."""

from bilevel_jax._src.demo import main

if __name__ == "__main__":
    main()
