"""kdcore's built-in plugins (import name ``kdcore_plugins``), registered through the same
``kdcore`` entry-point group as any third-party package."""
