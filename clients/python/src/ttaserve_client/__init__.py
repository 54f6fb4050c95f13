"""Python client for TTAServe: ``Client`` (sync) and ``AsyncClient``, typed answers, retries with backoff.

    from ttaserve_client import Client
    with Client("http://127.0.0.1:8000") as tta:
        print(tta.classify(["cat.jpg"], labels=["cat", "dog"]).results[0].label)

The ``tta`` command line (``pip install 'ttaserve-client[cli]'``) is built on it.
"""

from ttaserve_client import models
from ttaserve_client.calls import Call
from ttaserve_client.client import AsyncClient, Client
from ttaserve_client.errors import ApiError, ConnectionFailed, TTAError
from ttaserve_client.images import array_png, image_bytes
from ttaserve_client.retry import RetryPolicy, retry_after_s

__all__ = [
    "ApiError",
    "AsyncClient",
    "Call",
    "Client",
    "ConnectionFailed",
    "RetryPolicy",
    "TTAError",
    "array_png",
    "image_bytes",
    "models",
    "retry_after_s",
]
__version__ = "0.1.0"
