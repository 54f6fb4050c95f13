"""Helpers the tests share: a tiny model, images, apps and servers to run it, and gates that hold work.

Tests import from here, never from each other.
"""
