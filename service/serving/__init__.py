"""Serving predictions: the per-process model cache, micro-batching, and the
predict function the API's route calls."""
