"""harness: a command-line benchmark harness for deep-learning training techniques."""

__version__ = "0.1.0"
