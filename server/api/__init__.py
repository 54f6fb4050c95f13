"""The HTTP API: app factory, dependencies, middleware, error mapping, schemas, input parsing, routes."""

from server.api.app import create_app

__all__ = ["create_app"]
