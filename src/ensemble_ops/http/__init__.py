"""HTTP: the Starlette app (composition root), server, middleware, errors and routes."""
