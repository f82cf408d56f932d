"""Built-in metrics plugins, importable as `leakaudit.metrics`."""
