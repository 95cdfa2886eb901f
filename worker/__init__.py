"""felis worker: the Celery app and its tasks (thin adapters over service's domain functions)."""
