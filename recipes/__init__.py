"""Built-in recipes plugins, importable as `leakaudit.recipes`."""
