"""Private implementation of bilevel_jax: import the public names from ``bilevel_jax``."""
