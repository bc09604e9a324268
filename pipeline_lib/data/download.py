"""Downloading one http(s) URL into an open file, within limits.

- Size: a `Content-Length` over `max_bytes` is refused before the body is read, and a body without one is cut
  off at the cap. The body goes to the file in pieces of at most 1 MiB, hashed on the way: nothing is held
  in memory.
- Time: besides `timeout` for each single wait (name lookup, connect, each read), the whole download,
  redirects included, must finish within `deadline` seconds. A watchdog shuts the socket down when it
  passes, so a server that trickles a byte now and then cannot keep a read alive.
- Redirects: at most `MAX_REDIRECTS`, only to http(s), and only to public addresses: the new host is
  resolved and refused when any of its addresses is loopback, private, link-local, multicast, reserved or
  unspecified (`is_public_address`); the connection then goes to the very address that was checked, so a
  second, different DNS answer cannot slip past the check. The URL the user gave is fetched wherever it
  points: it is the user's own choice, like a local path (an intranet mirror is a fair source). What a
  remote server redirects to is not the user's choice, so a server cannot steer a run to the local MLflow
  API, a cloud metadata endpoint or another internal service.
- Credentials in the URL (`user:password@`) are sent as HTTP Basic authentication to that host only, never
  to a redirect target.

Proxies from the environment (`http_proxy`, `https_proxy`, `no_proxy`) are used as urllib would; through a
proxy the redirect check still resolves each new host here, but the proxy makes the connection.
Every failure is a `DataError` naming the URL with its secrets redacted.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import ipaddress
import socket
import threading
import time
import urllib.parse
import urllib.request
from typing import BinaryIO

from pipeline_lib.data.errors import MB, DataError, redact_url
from pipeline_lib.netutil import call_with_deadline

MAX_REDIRECTS = 5
_REDIRECT_CODES = (301, 302, 303, 307, 308)
_PIECE = 1 << 20


def is_public_address(host: str, ip: str, port: int) -> bool:
    """Whether `ip` (an address `host` resolved to, to be reached on `port`) is a public internet address.

    False for loopback, private, link-local, multicast, reserved, unspecified and shared (CGNAT) addresses,
    and for IPv6 forms that embed such an IPv4 address (mapped, 6to4, Teredo, NAT64). Tests replace this
    function to treat one local test server as public."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return False
    candidates = [addr]
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped:
            candidates.append(addr.ipv4_mapped)
        if addr.sixtofour:
            candidates.append(addr.sixtofour)
        if addr.teredo:
            candidates.extend(addr.teredo)
        if addr in ipaddress.ip_network("64:ff9b::/96"):
            candidates.append(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return all(
        a.is_global
        and not (
            a.is_loopback
            or a.is_private
            or a.is_link_local
            or a.is_multicast
            or a.is_reserved
            or a.is_unspecified
        )
        for a in candidates
    )


class _Expired(Exception):
    pass


class _Clock:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        rem = self.end - time.monotonic()
        if rem <= 0:
            raise _Expired
        return rem

    def wait(self, timeout: float) -> float:
        """The timeout for the next single wait: `timeout`, or less when the deadline is nearer."""
        return min(timeout, self.left())


def _connect_any(ips: list[str], port: int, timeout: float | None) -> socket.socket:
    """A TCP connection to the first of `ips` that answers (the addresses already checked)."""
    error: OSError | None = None
    for ip in ips:
        try:
            sock = socket.create_connection((ip, port), timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return sock
        except OSError as err:
            error = err
    raise error or OSError(f"no address to connect to for port {port}")


class _PinnedHTTP(http.client.HTTPConnection):
    """An HTTP connection to `host` that connects only to the addresses `ips` resolved (and checked) before."""

    def __init__(self, host: str, port: int, ips: list[str], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ips = ips

    def connect(self) -> None:
        self.sock = _connect_any(self._ips, self.port, self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """An HTTPS connection to `host` (its certificate checked for `host`) at the addresses `ips`."""

    def __init__(self, host: str, port: int, ips: list[str], timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._ips = ips

    def connect(self) -> None:
        sock = _connect_any(self._ips, self.port, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _resolve(host: str, port: int, clock: _Clock, timeout: float) -> list[str]:
    infos = call_with_deadline(
        lambda: socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), clock.wait(timeout)
    )
    return list(dict.fromkeys(info[4][0] for info in infos))


def _proxy_for(scheme: str, host: str) -> urllib.parse.SplitResult | None:
    proxy = urllib.request.getproxies().get(scheme)
    if not proxy or urllib.request.proxy_bypass(host):
        return None
    if "://" not in proxy:
        proxy = "http://" + proxy
    return urllib.parse.urlsplit(proxy)


def _basic(user: str, password: str | None) -> str:
    """An HTTP Basic authorization value for the (percent-encoded) `user` and `password` of a URL."""
    pair = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password or '')}"
    return "Basic " + base64.b64encode(pair.encode()).decode("ascii")


def _open(
    url: str, hop: int, shown: str, clock: _Clock, timeout: float
) -> tuple[http.client.HTTPConnection, str, dict[str, str]]:
    """A connection for `url` (checked when it is a redirect target), the request target and headers.
    Problems name the user's URL (`shown`), and the redirect target where there is one."""
    via = f"redirect to {redact_url(url)}: " if hop > 0 else ""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise DataError(
            shown, f"{via}unsupported scheme {scheme + '://'!r} (only http:// and https:// are fetched)"
        )
    host = parts.hostname
    if not host:
        raise DataError(shown, f"{via}URL has no host")
    try:
        port = parts.port or (443 if scheme == "https" else 80)
    except ValueError:
        raise DataError(shown, f"{via}URL has an invalid port") from None
    proxy = _proxy_for(scheme, host)
    addrs: list[str] = []
    if hop > 0 or proxy is None:  # the user's own URL through a proxy: the proxy resolves it
        try:
            addrs = _resolve(host, port, clock, timeout)
        except (OSError, TimeoutError) as err:
            raise DataError(shown, f"{via}could not reach URL: {err}", transient=True) from None
        if hop > 0:
            bad = [a for a in addrs if not is_public_address(host, a, port)]
            if bad or not addrs:
                raise DataError(shown, f"{via}refused, {', '.join(bad) or host} is not a public address")
    headers = {"User-Agent": "qabot", "Accept-Encoding": "identity"}
    if parts.username is not None and hop == 0:  # never sent on to a redirect target
        headers["Authorization"] = _basic(parts.username, parts.password)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    if proxy is not None:
        pport = proxy.port or 80
        proxy_headers = {}
        if proxy.username is not None:
            proxy_headers["Proxy-Authorization"] = _basic(proxy.username, proxy.password)
        if scheme == "https":
            conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                proxy.hostname, pport, timeout=clock.wait(timeout)
            )
            conn.set_tunnel(host, port, headers=proxy_headers)
        else:
            conn = http.client.HTTPConnection(proxy.hostname, pport, timeout=clock.wait(timeout))
            target = urllib.parse.urlunsplit((scheme, parts.netloc.rsplit("@", 1)[-1], target, "", ""))
            headers.update(proxy_headers)
    elif scheme == "https":
        conn = _PinnedHTTPS(host, port, addrs, clock.wait(timeout))
    else:
        conn = _PinnedHTTP(host, port, addrs, clock.wait(timeout))
    return conn, target, headers


def download(url: str, out: BinaryIO, *, timeout: float, deadline: float, max_bytes: int) -> str:
    """GET `url` (following safe redirects) into `out`; return the sha256 of the body (hex)."""
    shown = redact_url(url)
    clock = _Clock(deadline)
    expired = threading.Event()
    current = url
    try:
        for hop in range(MAX_REDIRECTS + 1):
            conn, target, headers = _open(current, hop, shown, clock, timeout)

            # getresponse() hands the socket to a response that ends the connection (no Content-Length):
            # conn.sock is None from then on, so the watchdog and the read timeouts keep their own reference
            held: dict[str, socket.socket | None] = {}

            def kill(conn: http.client.HTTPConnection = conn, held: dict = held) -> None:
                expired.set()
                sock = held.get("sock") or conn.sock
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

            watchdog = threading.Timer(clock.left(), kill)
            watchdog.daemon = True
            watchdog.start()
            resp = None
            try:
                conn.request("GET", target, headers=headers)
                held["sock"] = conn.sock
                resp = conn.getresponse()
                if resp.status in _REDIRECT_CODES:
                    location = resp.getheader("Location")
                    if not location:
                        raise DataError(shown, f"HTTP {resp.status} redirect without a Location")
                    current = urllib.parse.urljoin(current, location.strip())
                    continue
                if resp.status >= 400:
                    raise DataError(
                        shown,
                        f"HTTP {resp.status} {resp.reason}",
                        transient=resp.status >= 500 or resp.status == 429,
                    )
                if resp.status != 200:
                    raise DataError(shown, f"HTTP {resp.status} {resp.reason}: expected the file (200)")
                return _stream(resp, held["sock"], out, shown, clock, timeout, max_bytes, expired)
            finally:
                watchdog.cancel()
                if resp is not None:  # an unread body (a cap, an error) must not keep the connection open
                    resp.close()
                conn.close()
        raise DataError(shown, f"more than {MAX_REDIRECTS} redirects")
    except _Expired:
        raise DataError(shown, _too_slow(deadline), transient=True) from None
    except DataError:
        raise
    except (OSError, http.client.HTTPException, ValueError) as err:
        if expired.is_set():
            raise DataError(shown, _too_slow(deadline), transient=True) from None
        what = "download interrupted" if out.tell() else "could not reach URL"
        reason = str(err) or type(err).__name__
        raise DataError(shown, f"{what}: {reason}", transient=not isinstance(err, ValueError)) from None


def _too_slow(deadline: float) -> str:
    return f"download not finished within {deadline:g} s (data.download_timeout_s)"


def _stream(
    resp: http.client.HTTPResponse,
    sock: socket.socket | None,
    out: BinaryIO,
    shown: str,
    clock: _Clock,
    timeout: float,
    max_bytes: int,
    expired: threading.Event,
) -> str:
    cap = f"the {round(max_bytes / MB, 3):g} MB download cap (data.max_download_mb)"
    length = resp.length  # Content-Length, or None (chunked, or until the server closes)
    if length is not None and length > max_bytes:
        raise DataError(shown, f"file is {length / MB:.1f} MB, over {cap}")
    h = hashlib.sha256()
    total = 0
    while True:
        limit = clock.wait(timeout)
        if sock is not None:
            sock.settimeout(limit)
        try:
            piece = resp.read1(_PIECE)
        except TimeoutError:
            if limit < timeout:  # the total deadline, not a silent server, ended this wait
                raise _Expired from None
            raise
        if expired.is_set():
            raise _Expired
        if not piece:
            break
        total += len(piece)
        if total > max_bytes:
            raise DataError(shown, f"file is over {cap}; stopped after {total / MB:.1f} MB")
        h.update(piece)
        out.write(piece)
    if length is not None and total != length:
        raise DataError(
            shown, f"download interrupted: connection closed after {total} of {length} bytes", transient=True
        )
    return h.hexdigest()
