"""Sub-commands of ``pale``: one module per command, each with ``register(subparsers)``."""
