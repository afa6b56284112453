"""Built-in student tuners, one module each."""
