"""felis service: the domain (datasets, images, trainings, model versions, predictions) and its HTTP API."""
