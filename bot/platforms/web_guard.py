"""What a web request must be before anything reads it: addressed to a name this server
answers to, from this server's own page or from no web page at all, and JSON when it has a body.

**DNS rebinding.** A page at attacker.example whose name the attacker then points at 127.0.0.1
is, to the browser, the same origin as itself: it may read whatever a server on the user's
loopback answers. The one thing it cannot change is the ``Host`` header, which still names
attacker.example. On a loopback bind only loopback names and addresses (``localhost``,
``*.localhost``, 127.0.0.0/8, ``::1``) and ``[web] allowed_hosts`` are answered; any other
``Host`` gets 421 Misdirected Request. On another bind the keys and cookies guard the data, and
the check is on only when ``allowed_hosts`` lists names.

**Cross-site requests.** Any page the user has open may POST to http://127.0.0.1:8080 with the
content types of a form (text/plain, form-encoded) without asking the server; the open local API
trusts the body's ``user`` field, so that page acted as anyone. Browsers say where a request
comes from: ``Origin`` on every POST and every CORS request, ``Sec-Fetch-Site`` on every request.
A request whose ``Origin`` is not this server's (nor an allowed host's), or that the browser
marks ``cross-site`` or ``same-site`` (another port of localhost is the same site, and the
SameSite=Strict cookie goes along with it), is refused with 403; only the chat page itself
(``GET /``) may be opened from anywhere, as a link. A tool that is no browser sends neither
header and passes. A request with a body must also say ``Content-Type: application/json``
(415 otherwise): a browser sends that type to another origin only after a CORS preflight, which
this server never grants, so it is a second lock should a browser send no ``Origin``.
"""

from __future__ import annotations

import ipaddress

from yarl import URL

from training.errors import UserError

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
JSON = "application/json"
DEFAULT_PORTS = {"http": 80, "https": 443}


def split_host(value: str) -> tuple[str, int | None]:
    """``Host`` as (lower-case name or address without brackets, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):  # [::1]:8080
        name, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    else:
        name, colon, port = value.rpartition(":") if value.count(":") == 1 else (value, "", "")
        if not colon:
            name, port = value, ""
    name = name.rstrip(".")  # "localhost." is the same name, fully qualified
    return name, int(port) if port.isdigit() and len(port) <= 5 else None


def is_loopback_name(name: str) -> bool:
    """localhost and its subdomains (browsers resolve them to loopback themselves, RFC 6761),
    and loopback addresses."""
    if name in ("localhost", "localhost.localdomain") or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def parse_allowed_hosts(values: list[str]) -> list[tuple[str, int | None]]:
    """``[web] allowed_hosts`` entries: ``name`` (any port), ``name:port``, or ``*`` (any Host)."""
    hosts = []
    for value in values:
        if value.strip() == "*":
            hosts.append(("*", None))
            continue
        if "/" in value or not value.strip() or " " in value.strip():
            raise UserError(f"[web] allowed_hosts: {value!r} is not a host name; give the name the browser "
                            "uses, as in 'chat.example.org' or 'chat.example.org:8443' (no scheme, no path)")
        hosts.append(split_host(value))
    return hosts


class Guard:
    """The three checks; each returns a refusal's message (one line), or None to go on."""

    def __init__(self, *, loopback_bind: bool, allowed_hosts: list[str] = ()):
        self.allowed = parse_allowed_hosts(list(allowed_hosts))
        self.any_host = ("*", None) in self.allowed
        self.checks_host = (loopback_bind or bool(self.allowed)) and not self.any_host
        self.loopback_bind = loopback_bind

    def _allowed(self, name: str, port: int | None) -> bool:
        return is_loopback_name(name) or any(name == n and (p is None or p == port) for n, p in self.allowed)

    def host(self, host: str | None) -> str | None:
        """421: a Host that is not this server's (DNS rebinding). No Host (HTTP/1.0) names nothing
        a browser could have been pointed at."""
        if not self.checks_host or not host:
            return None
        name, port = split_host(host)
        if self._allowed(name, port):
            return None
        where = "a loopback bind answers only to localhost, 127.0.0.1 and [::1]" if self.loopback_bind else \
            "this server answers only to the names in [web] allowed_hosts and loopback names"
        return (f"Host {host[:100]!r} is not a name of this server ({where}): add it to [web] allowed_hosts "
                "if that is how you reach it")

    def origin(self, method: str, path: str, headers) -> str | None:
        """403: a request another site's page made. ``GET /`` (the page, opened by a link) is free."""
        if method in ("GET", "HEAD") and path == "/":
            return None
        origin = headers.get("Origin")
        if origin is not None:
            if self._same_origin(origin, headers.get("Host")):
                return None
            return (f"{method} {path} refused: it comes from a page of another site (Origin {origin[:100]}); only "
                    "this server's own chat page may send it, and a local tool sends no Origin")
        site = headers.get("Sec-Fetch-Site", "").lower()
        if site in ("cross-site", "same-site"):
            return (f"{method} {path} refused: the browser says it comes from another site's page "
                    f"(Sec-Fetch-Site: {site}); only this server's own chat page may send it")
        return None

    def _same_origin(self, origin: str, host: str | None) -> bool:
        try:
            url = URL(origin)
        except ValueError:
            return False
        if url.scheme not in DEFAULT_PORTS or not url.host:
            return False  # "null": a sandboxed frame, a file:// page
        name, port = url.host.lower().rstrip("."), url.port or DEFAULT_PORTS[url.scheme]
        if host:
            host_name, host_port = split_host(host)
            if (host_name, host_port or DEFAULT_PORTS[url.scheme]) == (name, port):
                return True
        # Behind a proxy that passes its own Host on, the page's origin is the public name.
        return any(name == n and (p is None or p == port) for n, p in self.allowed if n != "*")

    @staticmethod
    def content(method: str, path: str, headers, has_body: bool) -> str | None:
        """415: a body that is not declared as JSON (a form's text/plain, say)."""
        if method in SAFE_METHODS or not has_body:
            return None
        given = headers.get("Content-Type")
        if given is not None and given.split(";", 1)[0].strip().lower() == JSON:
            return None
        return (f"{method} {path}: send the body as JSON with Content-Type: {JSON} "
                f"(this one is {given[:80] if given else 'without a Content-Type'})")
