"""The HTTP surface: app factory, dependencies, error mapping, one router per resource, API keys,
rate limits and the API's metrics."""
