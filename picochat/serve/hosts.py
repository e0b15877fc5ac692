"""The Host-header check, against DNS rebinding.

A web page the user visits can make its own host name (attacker.example) resolve to 127.0.0.1 and then call the
key-less server on this machine from the user's browser: the browser thinks it talks to attacker.example, so the
same-origin policy lets the page read every reply. What gives it away is the Host header, which still says
attacker.example. So the server answers only to the names it is really reached by:

- bound to a loopback address (the default 127.0.0.1, localhost, ::1, 127.x): 127.0.0.1, localhost and [::1];
- bound to another address or name: that address or name;
- plus every --allowed-host (e.g. the public name in front of a reverse proxy);
each with or without a port, case-insensitively. Anything else is 400 with code "invalid_host".

Bound to every interface (0.0.0.0 or ::) without --allowed-host, any Host is accepted, with a warning at start:
the names such a server is reached by (its addresses on each network, DNS names, proxies) cannot be known, and
such a server is already open to everyone who can reach the port (the rebinding page gains nothing an attacker on
the network does not have; with --api-key, it cannot pass the key check). Refusing every name would make the
common `--host 0.0.0.0` useless without extra flags. With --allowed-host, only those names and the loopback ones
are accepted.

A request without a Host header (HTTP/1.0; HTTP/1.1 requires one) is let through: browsers always send one, so it
is never a rebinding request.
"""

from __future__ import annotations

import ipaddress

from picochat.common import PicochatError
from picochat.serve.protocol import error_response

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})


def check_allowed_host(name: str) -> str:
    """An --allowed-host value, normalised (lower case, IPv6 without brackets); a mistake is a PicochatError."""
    host = name.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or host == "*" or any(c in host for c in "/@?# \t") or (":" in host and not _is_ip(host)):
        raise PicochatError(
            f"--allowed-host {name!r}: expected a host name or address like example.com or 192.168.1.5 "
            "(no scheme, port or path)"
        )
    return host


def accepted_hosts(bind_host: str, allowed: tuple[str, ...] = ()) -> frozenset[str] | None:
    """The host names a server bound to `bind_host` answers to (normalised as check_allowed_host does), or None
    for any (bound to every interface without --allowed-host: see the module docstring)."""
    extra = {check_allowed_host(name) for name in allowed}
    bind = bind_host.strip().lower().strip("[]")
    if bind in WILDCARD_BINDS:
        return frozenset(extra | LOOPBACK_HOSTS) if extra else None
    if bind == "localhost" or (_is_ip(bind) and ipaddress.ip_address(bind).is_loopback):
        return frozenset(extra | LOOPBACK_HOSTS | {bind})
    return frozenset(extra | {bind})


def host_name(header: str) -> str | None:
    """The name in a Host header value, lower case and without port or IPv6 brackets; None if it is malformed."""
    value = header.strip().lower()
    if value.startswith("["):  # [v6 address] or [v6 address]:port
        end = value.find("]")
        name, rest = value[1:end], value[end + 1 :]
        if end < 0 or not _is_ip(name) or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return name
    name, colon, port = value.partition(":")
    if colon and not port.isdigit():
        return None
    return name.rstrip(".") or None


class HostCheck:
    """ASGI middleware: requests whose Host header names another host are refused with 400."""

    def __init__(self, app, *, hosts: frozenset[str] | None, on_reject=None):
        self.app, self.hosts, self.on_reject = app, hosts, on_reject

    async def __call__(self, scope, receive, send):
        if self.hosts is None or scope["type"] != "http":
            return await self.app(scope, receive, send)
        header = next((value for key, value in scope["headers"] if key == b"host"), None)
        if header is not None and host_name(header.decode("latin-1")) not in self.hosts:
            if self.on_reject is not None:
                self.on_reject()
            message = "the Host header names a host this server does not answer to (start it with --allowed-host)"
            return await error_response(400, message, code="invalid_host")(scope, receive, send)
        await self.app(scope, receive, send)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True
