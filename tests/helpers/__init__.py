"""Shared test helpers: a real-vLLM scheduler harness and subprocess engine runners."""
