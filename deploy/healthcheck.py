"""The container's health check: exit 0 when this container's service answers GET /healthz with 200.

Slim images have no curl, so Docker's HEALTHCHECK runs this with the image's Python. It asks for
``Host: localhost``, a name the service allows whatever ``IMAGECLF_ALLOWED_HOSTS`` adds (keep
``localhost`` in that list), and it ignores proxy variables: the service is on this container's
own loopback.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    port = os.environ.get("IMAGECLF_PORT", "8000")
    request = urllib.request.Request(f"http://127.0.0.1:{port}/healthz", headers={"Host": "localhost"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "4"))) as response:
            return 0 if response.status == 200 else 1
    except (OSError, ValueError) as error:  # refused, timed out, HTTP error status, bad port value
        print(f"GET /healthz on port {port}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
