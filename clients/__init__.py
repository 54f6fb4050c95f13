"""Clients for TTAServe. ``from clients import Client`` gives the synchronous Python client."""

from clients.python import ApiError, Client

__all__ = ["ApiError", "Client"]
