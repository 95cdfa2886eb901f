"""Alembic migrations of the metadata store (run through service.store.migrate, never imported).

env.py is the Alembic environment, versions/ holds one revision per schema change, on a single
line of history from 0001_baseline (the schema of felis 0.1.0)."""
