"""One subcommand per module; each exposes ``register(subparsers)`` and is wired in ``bot.cli``."""
