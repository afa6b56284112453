"""Built-in distance criteria, one module each."""
