"""Web hygiene: which Host names are served, and the headers every answer carries.

A service on 127.0.0.1 can be reached by any web page the user visits through DNS rebinding
(a hostile name that resolves to 127.0.0.1): the browser sends that name as ``Host``. Answering
only the names the service is known by closes that door.

The Host check is done here, not with Flask's ``TRUSTED_HOSTS``: Flask before 3.1 ignores that
setting without a word (the check would silently be off), and the read-only health and metrics
paths must answer any Host: Kubernetes probes and Prometheus ask for them by pod IP, and what a
rebinding page could read there is no more than a scrape shows.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re

from flask import Flask, abort, request

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")
# Answered whatever the Host: read-only, asked for by probes and scrapers that know the pod's IP only.
ANY_HOST_PATHS = frozenset({"/healthz", "/readyz", "/v2/health/live", "/v2/health/ready", "/metrics"})


def default_allowed_hosts(bind_host: str) -> tuple[str, ...] | None:
    """Loopback names for a service bound to loopback; None (any name) for one bound elsewhere."""
    if bind_host == "localhost":
        return LOOPBACK_NAMES
    try:
        loopback = ipaddress.ip_address(bind_host.strip("[]")).is_loopback
    except ValueError:
        return (bind_host,)  # bound to a name: that name
    return (*LOOPBACK_NAMES, bind_host) if loopback else None


def host_name(host: str) -> str:
    """A Host header's name: lower case, without the port, IPv6 brackets or an FQDN's final dot."""
    host = host.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else ""
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def host_allowed(host: str, allowed: tuple[str, ...]) -> bool:
    """Whether ``host`` is one of ``allowed``: a name, ``.example.com`` (it and its subdomains) or ``*``."""
    name = host_name(host)
    if not name:
        return False
    for entry in allowed:
        entry = host_name(entry) if not entry.startswith(".") else "." + host_name(entry[1:])
        if entry == "*" or name == entry or (entry.startswith(".") and (name == entry[1:] or name.endswith(entry))):
            return True
    return False


def install_security(app: Flask, allowed_hosts: tuple[str, ...] | None) -> None:
    """Refuse unknown Host names (400, except on ANY_HOST_PATHS) and send safe headers with every answer."""
    if allowed_hosts:
        allowed = tuple(allowed_hosts)

        @app.before_request
        def check_host():
            host = request.headers.get("Host", "")
            if request.path not in ANY_HOST_PATHS and not host_allowed(host, allowed):
                abort(400, description=f"Host {host[:200]!r} is not a name this service answers to "
                                       "(--allowed_hosts)")
    page_policy = _page_policy(app.root_path + "/page.html")

    @app.after_request
    def headers(response):
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        html = response.mimetype == "text/html"
        response.headers["Content-Security-Policy"] = page_policy if html else \
            "default-src 'none'; frame-ancestors 'none'"
        if request.path != "/" or not html:
            response.headers.setdefault("Cache-Control", "no-store")
        return response


def _page_policy(page_path: str) -> str:
    """A CSP that allows the page's own inline script and style (by hash) and nothing else."""
    with open(page_path, encoding="utf-8") as f:
        page = f.read()

    def hashes(tag: str) -> str:
        blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", page, flags=re.S)
        return " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()}'"
                        for b in blocks)
    return (f"default-src 'none'; script-src {hashes('script')}; style-src {hashes('style')}; "
            "img-src blob:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
