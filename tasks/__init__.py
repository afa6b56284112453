"""kdcore's built-in tasks (import name ``kdcore_tasks``)."""
