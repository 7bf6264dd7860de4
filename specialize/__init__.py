"""Online test-time specialization of early-exit networks (the engine and its tools)."""

__version__ = "0.1.0"
