"""bridge: a Redis Streams LLM bridge."""

__version__ = "0.1.0"
