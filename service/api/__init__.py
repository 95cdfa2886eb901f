"""The HTTP surface: app factory, dependencies, error mapping, one router per resource."""
