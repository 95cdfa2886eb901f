"""felis worker: the Celery app, its tasks (thin adapters over service.domain) and its metrics.
Never imports the HTTP layer (service.api) or a web framework."""
