"""Built-in attacks plugins, importable as `leakaudit.attacks`."""
