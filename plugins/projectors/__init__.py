"""Built-in space projectors, one module each."""
