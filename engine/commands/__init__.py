"""One module per ``fedlog`` subcommand; each exposes ``register(subparsers)``."""
