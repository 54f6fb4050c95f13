"""The image's HEALTHCHECK: exit 0 when the server in this container is ready (/readyz answers 200), else 1.

It asks the port the server listens on, TTA_PORT, and the address it binds, TTA_HOST (loopback when that is
every interface), so a container started with another TTA_PORT stays healthy. Standard library only.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    host = os.environ.get("TTA_HOST", "127.0.0.1")
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    url = f"http://{host}:{os.environ.get('TTA_PORT', '8000')}/readyz"
    try:
        with urllib.request.urlopen(url, timeout=3) as answer:
            ready = answer.status == 200
    except (urllib.error.URLError, OSError) as e:
        sys.stderr.write(f"{url}: {e}\n")
        return 1
    return 0 if ready else 1


if __name__ == "__main__":
    sys.exit(main())
