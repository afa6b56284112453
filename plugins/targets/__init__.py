"""Built-in target providers (``targets:``), one module each."""
