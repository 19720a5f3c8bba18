"""Alembic migrations of the service's database; `dosewise.serve.store.Store` runs them on open."""
