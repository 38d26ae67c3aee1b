"""The routes, one module per surface: OpenAI API, health, admin, metrics."""
