"""Hostile and unlucky inputs: each case asserts the exit code, the one-line message and what is left on disk."""
