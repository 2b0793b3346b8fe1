"""rolebot's service side: CLI, config, engine, conversation service, store, platforms."""

__version__ = "0.1.0"
