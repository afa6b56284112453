"""Built-in token aligners, one module each."""
