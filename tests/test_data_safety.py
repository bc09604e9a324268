"""Data stage safety: download size cap, total deadline, redirects only to public addresses, the scheme
allow-list, secrets redacted from everything recorded, and loading in bounded memory.

Every server here listens on 127.0.0.1 and every loop it runs is bounded. Redirects to non-public addresses
are refused, and the test servers are on loopback too, so tests that need a "public" origin replace
`download.is_public_address` to say yes for one test server's port only: a redirect to any other local port
must still be refused.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline_lib import data as D
from pipeline_lib.config import DataConfig
from pipeline_lib.data import DataError
from pipeline_lib.synthetic import alpaca_rows, alpaca_sized_rows

ROOT = Path(__file__).resolve().parent.parent

Route = Callable[[http.server.BaseHTTPRequestHandler], None]


class _Server:
    """A local HTTP server whose paths are handled by `routes` (path without query -> function)."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = routes
        self.requests: list[str] = []  # the request targets, query included, as the server saw them
        self.auth: list[str | None] = []  # their Authorization headers
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                server.auth.append(self.headers.get("Authorization"))
                route = server.routes.get(self.path.split("?", 1)[0])
                if route is None:
                    self.send_error(404)
                    return
                try:
                    route(self)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading: what these tests want

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def serve():
    servers: list[_Server] = []

    def start(routes: dict[str, Route]) -> _Server:
        servers.append(_Server(routes))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def body(data: bytes, length: bool = True) -> Route:
    def route(h):
        h.send_response(200)
        if length:
            h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        h.wfile.write(data)

    return route


def redirect(location: Callable[[], str] | str, code: int = 302) -> Route:
    def route(h):
        h.send_response(code)
        h.send_header("Location", location() if callable(location) else location)
        h.send_header("Content-Length", "0")
        h.end_headers()

    return route


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


def _one_line(err: DataError, name: str) -> str:
    msg = str(err)
    assert "\n" not in msg and msg.startswith(f"{name}: "), msg
    return msg


# --------------------------------------------------------------------------------------------------- size cap


def test_download_over_the_cap_is_refused_before_reading(serve, tmp_path):
    data = _jsonl(alpaca_rows(2000))  # ~200 KB
    assert len(data) > 150_000
    srv = serve({"/big.jsonl": body(data)})
    url = f"{srv.base}/big.jsonl"
    with pytest.raises(DataError) as err:
        D.acquire(url, tmp_path / "raw", max_mb=0.1, timeout=5)
    msg = _one_line(err.value, url)
    assert "file is 0.2 MB, over the 0.1 MB download cap (data.max_download_mb)" in msg  # from Content-Length
    assert not err.value.transient
    assert _leftovers(tmp_path / "raw") == []
    # the same through the config: DataConfig.max_download_mb
    with pytest.raises(DataError, match="0.1 MB download cap"):
        D.prepare(url, tmp_path / "out", DataConfig(source=url, max_download_mb=0.1))
    assert _leftovers(tmp_path / "out") == []
    # under the cap it downloads
    got = D.acquire(url, tmp_path / "raw", max_mb=1, timeout=5)
    assert got.path.read_bytes() == data


def test_download_without_a_length_stops_at_the_cap(serve, tmp_path):
    sent, ended = [], []
    done = threading.Event()

    def endless(h):  # no Content-Length: the body runs until the server closes (at most 256 MB here)
        h.send_response(200)
        h.end_headers()
        piece = b'{"instruction": "a", "output": "b"}\n' * 1800  # ~64 KB
        try:
            for _ in range(4096):
                h.wfile.write(piece)
                sent.append(len(piece))
            ended.append("sent everything")
        except OSError as err:  # the client closed the connection: the next write fails
            ended.append(type(err).__name__)
        finally:
            done.set()

    srv = serve({"/stream.jsonl": endless})
    url = f"{srv.base}/stream.jsonl"
    with pytest.raises(DataError) as err:
        D.acquire(url, tmp_path / "raw", max_mb=0.5, timeout=5)
    assert "over the 0.5 MB download cap" in _one_line(err.value, url)
    assert _leftovers(tmp_path / "raw") == []
    # The client stopped reading at the cap and closed the connection, so the server's writes failed. What the
    # server wrote beyond the 0.5 MB read sat in the loopback socket buffers, which Linux lets grow to tens of
    # MB (tcp_rmem/tcp_wmem; 10.8 MB seen once under load), so the bound is half the body, not the cap.
    assert done.wait(60), "the server is still writing: the client kept the connection open"
    assert ended and ended[0] != "sent everything", ended
    assert sum(sent) < 128 << 20


def test_config_max_download_mb_is_validated():
    assert DataConfig().max_download_mb == 2048
    assert "MB" in DataConfig.model_fields["max_download_mb"].description
    for bad in (0, -1):
        with pytest.raises(ValueError, match="greater than 0"):
            DataConfig(max_download_mb=bad)
    with pytest.raises(ValueError, match="greater than 0"):
        DataConfig(download_timeout_s=0)


# ------------------------------------------------------------------------------------------- total deadline


def test_a_trickling_server_is_stopped_at_the_total_deadline(serve, tmp_path):
    def trickle(h):  # one byte every 0.2 s: each read is quick, the whole would take 20 s
        h.send_response(200)
        h.send_header("Content-Length", "100")
        h.end_headers()
        for _ in range(100):
            h.wfile.write(b" ")
            h.wfile.flush()
            time.sleep(0.2)

    srv = serve({"/slow.json": trickle})
    url = f"{srv.base}/slow.json"
    started = time.monotonic()
    with pytest.raises(DataError) as err:
        D.acquire(url, tmp_path / "raw", timeout=5, deadline_s=1.5)
    took = time.monotonic() - started
    assert 1.4 < took < 4, took
    msg = _one_line(err.value, url)
    assert "not finished within 1.5 s" in msg and "data.download_timeout_s" in msg and err.value.transient
    assert _leftovers(tmp_path / "raw") == []


def test_a_stalled_body_without_a_length_is_stopped_at_the_total_deadline(serve, tmp_path):
    """No Content-Length (the body ends when the server closes): http.client hands the socket to the
    response, and the total deadline must still cut the wait short, not the longer per-read timeout."""
    release = threading.Event()

    def stall(h):
        h.send_response(200)
        h.end_headers()
        h.wfile.write(b'{"instruction": "a", "output": "b"}\n')
        h.wfile.flush()
        release.wait(20)

    srv = serve({"/stall.jsonl": stall})
    url = f"{srv.base}/stall.jsonl"
    started = time.monotonic()
    try:
        with pytest.raises(DataError) as err:
            D.acquire(url, tmp_path / "raw", timeout=8, deadline_s=1.5)
    finally:
        release.set()
    took = time.monotonic() - started
    assert 1.4 < took < 6, took
    msg = _one_line(err.value, url)
    assert "not finished within 1.5 s" in msg and err.value.transient
    assert _leftovers(tmp_path / "raw") == []


def test_a_connection_closed_early_is_not_a_complete_file(serve, tmp_path):
    def short(h):
        h.send_response(200)
        h.send_header("Content-Length", "1000")
        h.end_headers()
        h.wfile.write(b"[" + b" " * 100)

    srv = serve({"/short.json": short})
    with pytest.raises(DataError, match="connection closed after 101 of 1000 bytes"):
        D.acquire(f"{srv.base}/short.json", tmp_path / "raw", timeout=5)
    assert _leftovers(tmp_path / "raw") == []


# ------------------------------------------------------------------------------------------------- redirects


@pytest.mark.parametrize(
    ("ip", "public"),
    [("8.8.8.8", True), ("1.1.1.1", True), ("2606:4700:4700::1111", True),
     ("127.0.0.1", False), ("127.8.9.1", False), ("10.1.2.3", False), ("172.16.0.1", False),
     ("192.168.1.1", False), ("169.254.169.254", False), ("100.64.0.1", False), ("224.0.0.251", False),
     ("239.1.2.3", False), ("0.0.0.0", False), ("240.0.0.1", False), ("255.255.255.255", False), ("::1", False),
     ("::", False), ("fe80::1", False), ("fc00::1", False), ("ff02::1", False), ("::ffff:127.0.0.1", False),
     ("::ffff:10.0.0.1", False), ("2002:7f00:1::", False), ("64:ff9b::a00:1", False), ("not an ip", False)],
)  # fmt: skip
def test_is_public_address(ip, public):
    from pipeline_lib.data import download

    assert download.is_public_address("example.org", ip, 443) is public


@pytest.fixture()
def public_origin(serve, monkeypatch):
    """A server treated as public (its port only), and another local one that must stay internal."""
    from pipeline_lib.data import download

    internal = serve({"/api/secret.json": body(b'[{"instruction": "x", "output": "leaked"}]')})
    origin = serve({})
    real = download.is_public_address
    monkeypatch.setattr(
        download, "is_public_address", lambda host, ip, port: port == origin.port or real(host, ip, port)
    )
    return origin, internal


def test_redirect_to_an_internal_address_is_refused(public_origin, tmp_path):
    origin, internal = public_origin
    secret = f"{internal.base}/api/secret.json"
    origin.routes["/data.json"] = redirect(secret)
    url = f"{origin.base}/data.json"
    with pytest.raises(DataError) as err:
        D.acquire(url, tmp_path / "raw", timeout=5)
    msg = _one_line(err.value, url)
    assert f"redirect to {secret}: refused, 127.0.0.1 is not a public address" in msg
    assert internal.requests == [] and _leftovers(tmp_path / "raw") == []


def test_every_redirect_hop_is_checked(public_origin, tmp_path):
    origin, internal = public_origin
    secret = f"{internal.base}/api/secret.json"
    origin.routes.update({
        "/a": redirect(lambda: f"{origin.base}/b", 301),  # public -> public: followed
        "/b": redirect(lambda: f"{origin.base}/c", 307),
        "/c": redirect(secret, 308),  # -> internal: refused
        "/good": redirect(lambda: f"{origin.base}/rows.jsonl", 303),
        "/rows.jsonl": body(_jsonl(alpaca_rows(5))),
        "/loop": redirect(lambda: f"{origin.base}/loop"),
        "/ftp": redirect("ftp://files.example.org/rows.jsonl"),
    })  # fmt: skip
    with pytest.raises(DataError, match="not a public address"):
        D.acquire(f"{origin.base}/a", tmp_path / "raw", timeout=5)
    assert [r for r in origin.requests] == ["/a", "/b", "/c"] and internal.requests == []
    got = D.acquire(f"{origin.base}/good", tmp_path / "raw", timeout=5)
    assert D.load_rows(got.path) == alpaca_rows(5)
    with pytest.raises(DataError, match="more than 5 redirects"):
        D.acquire(f"{origin.base}/loop", tmp_path / "raw", timeout=5)
    with pytest.raises(DataError, match="redirect to ftp://files.example.org/rows.jsonl: unsupported scheme"):
        D.acquire(f"{origin.base}/ftp", tmp_path / "raw", timeout=5)


def test_a_redirect_from_the_users_local_url_to_another_local_port_is_refused(serve, tmp_path):
    """Without any replacement of the check: the user's own URL may be local, where it redirects may not."""
    internal = serve({"/api/secret.json": body(b"[]")})
    origin = serve({"/data.json": redirect(f"{internal.base}/api/secret.json")})
    with pytest.raises(DataError, match="not a public address"):
        D.acquire(f"{origin.base}/data.json", tmp_path / "raw", timeout=5)
    assert internal.requests == []


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_https_checks_the_certificate_for_the_host_name(tmp_path, monkeypatch):
    """The connection goes to the checked address, and TLS still verifies the certificate for the name."""
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    srv = _Server({"/rows.jsonl": body(_jsonl(alpaca_rows(3)))})
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    srv.httpd.socket = ctx.wrap_socket(srv.httpd.socket, server_side=True)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # trust this certificate only
    try:
        got = D.acquire(f"https://localhost:{srv.port}/rows.jsonl", tmp_path / "raw", timeout=5)
        assert D.load_rows(got.path) == alpaca_rows(3)
        with pytest.raises(DataError, match="CERTIFICATE_VERIFY_FAILED"):  # the name is checked, not the IP
            D.acquire(f"https://127.0.0.1:{srv.port}/rows.jsonl", tmp_path / "raw2", timeout=5)
    finally:
        srv.close()


def test_the_proxy_from_the_environment_is_used(serve, tmp_path, monkeypatch):
    rows = alpaca_rows(5)
    proxy = serve({})
    proxy.routes["http://data.example.invalid/rows.jsonl"] = body(_jsonl(rows))  # an absolute-URI request
    monkeypatch.setenv("http_proxy", proxy.base)
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    got = D.acquire("http://data.example.invalid/rows.jsonl", tmp_path / "raw", timeout=5)
    assert D.load_rows(got.path) == rows and proxy.requests == ["http://data.example.invalid/rows.jsonl"]


# ---------------------------------------------------------------------------------------------------- schemes


@pytest.mark.parametrize(
    ("source", "scheme"),
    [("ftp://x", "ftp"), ("ftp://files.example.org/a.json", "ftp"), ("file:///etc/passwd", "file"),
     ("s3://bucket/alpaca.json", "s3"), ("gopher://example.org/a", "gopher"), ("FTP://X/a.json", "FTP")],
)  # fmt: skip
def test_unsupported_schemes_are_named(tmp_path, source, scheme):
    assert D.source_kind(source) == "unsupported"
    with pytest.raises(DataError) as err:
        D.acquire(source, tmp_path / "raw")
    msg = _one_line(err.value, source)
    assert f"unsupported scheme '{scheme}://'" in msg and "file not found" not in msg
    assert not (tmp_path / "raw").exists()


# -------------------------------------------------------------------------------------------------- redaction

SIGNED = (
    "https://bucket.s3.amazonaws.com/data/alpaca.json?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAEXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20240101T000000Z"
    "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=FwoGZXIvYXdzEXAMPLE"
    "&X-Amz-Signature=0123456789abcdef"
)
SIGNED_SHOWN = (
    "https://bucket.s3.amazonaws.com/data/alpaca.json?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=REDACTED&X-Amz-Date=20240101T000000Z"
    "&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token=REDACTED"
    "&X-Amz-Signature=REDACTED"
)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (SIGNED, SIGNED_SHOWN),
        ("https://user:pa55w0rd@example.com/a.json", "https://REDACTED@example.com/a.json"),
        ("https://ghp_tokenonly@example.com/a.json", "https://REDACTED@example.com/a.json"),
        ("https://example.com/a.json?token=abc&page=2", "https://example.com/a.json?token=REDACTED&page=2"),
        ("https://acct.blob.core.windows.net/c/a.json?sv=2022-11-02&se=2024-01-01&sp=r&sig=abc%3D",
         "https://acct.blob.core.windows.net/c/a.json?sv=2022-11-02&se=2024-01-01&sp=r&sig=REDACTED"),
        ("https://storage.googleapis.com/b/a.json?X-Goog-Credential=c&X-Goog-Signature=s&X-Goog-Date=d",
         "https://storage.googleapis.com/b/a.json?X-Goog-Credential=REDACTED&X-Goog-Signature=REDACTED"
         "&X-Goog-Date=d"),
        ("https://example.com/a.json?key=K&password=P&signature=S&api_key=A&access_token=T&accessToken=U&n=1",
         "https://example.com/a.json?key=REDACTED&password=REDACTED&signature=REDACTED&api_key=REDACTED"
         "&access_token=REDACTED&accessToken=REDACTED&n=1"),
        ("https://example.com/a.json#access_token=T&x=1", "https://example.com/a.json#access_token=REDACTED&x=1"),
        ("https://example.com/monkey.json?keyword=cats&keys=3", "https://example.com/monkey.json?keyword=cats&keys=3"),
        ("https://example.com/a.json?token=", "https://example.com/a.json?token="),
        ("https://example.com/data/alpaca.json", "https://example.com/data/alpaca.json"),
        ("data/alpaca.json", "data/alpaca.json"),
        ("builtin:smoke_alpaca.jsonl", "builtin:smoke_alpaca.jsonl"),
        ("tatsu-lab/alpaca", "tatsu-lab/alpaca"),
    ],
)  # fmt: skip
def test_redact_url(url, shown):
    from pipeline_lib.data import redact_url

    assert redact_url(url) == shown
    assert redact_url(shown) == shown


def test_a_signed_url_is_used_but_never_recorded(serve, tmp_path):
    rows = alpaca_rows(30, seed=4)
    srv = serve({"/alpaca.jsonl": body(_jsonl(rows))})
    secrets = ("S3CRETSIG", "S3CRETTOKEN", "S3CRETCRED", "hunter2")
    url = (
        f"http://user:hunter2@127.0.0.1:{srv.port}/alpaca.jsonl?X-Amz-Credential=S3CRETCRED"
        "&X-Amz-Signature=S3CRETSIG&token=S3CRETTOKEN&part=1"
    )
    shown = (
        f"http://REDACTED@127.0.0.1:{srv.port}/alpaca.jsonl?X-Amz-Credential=REDACTED"
        "&X-Amz-Signature=REDACTED&token=REDACTED&part=1"
    )
    res = D.prepare(url, tmp_path / "out", DataConfig(source=url))
    assert srv.requests == ["/alpaca.jsonl?X-Amz-Credential=S3CRETCRED&X-Amz-Signature=S3CRETSIG"
                            "&token=S3CRETTOKEN&part=1"]  # fmt: skip
    assert srv.auth == ["Basic " + base64.b64encode(b"user:hunter2").decode()]  # user:password@ as Basic auth
    assert res.source == shown and res.audit_dict()["source"] == shown
    assert D.acquire(url, tmp_path / "raw", timeout=5).source == shown
    assert D.Acquired.from_dict({"path": "x", "sha256": "0", "source": url}).source == url  # as given
    for f in _leftovers(tmp_path):
        text = f.read_bytes()
        assert not any(s.encode() in text for s in secrets), f
    for p in (json.dumps(res.to_dict()),):
        assert not any(s in p for s in secrets)
    # errors name the redacted URL too
    missing = url.replace("alpaca.jsonl", "missing.jsonl")
    closed = url.replace(str(srv.port), str(_free_port()))
    for src, kwargs in ((missing, {}), (url, {"sha256": "1" * 64}), (closed, {})):
        with pytest.raises(DataError) as err:
            D.acquire(src, tmp_path / "raw2", timeout=5, **kwargs)
        assert str(err.value).startswith(D.redact_url(src) + ": ")
        assert not any(s in str(err.value) for s in secrets), str(err.value)


def test_an_acquired_record_from_before_is_redacted_when_cleaned(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(_jsonl(alpaca_rows(20)))
    acq = {
        "path": str(src),
        "sha256": "0" * 64,
        "source": "https://x.org/a.json?sig=S3CRET",
        "revision": None,
    }
    res = D.clean_acquired(acq, tmp_path / "out", DataConfig())
    assert res.source == "https://x.org/a.json?sig=REDACTED"
    assert "S3CRET" not in Path(res.audit_path).read_text()


# ------------------------------------------------------------------------------------------------------ memory

_MEASURE = """
import json, resource, sys
from pipeline_lib.data import load_rows
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
rows = load_rows(sys.argv[1])
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"rows": len(rows), "before_kib": before, "growth_kib": after - before}))
"""
# Linux carries the peak RSS of the process that forks over into the child's ru_maxrss, and this test process
# is large (torch is imported): a small Python process in between starts the measuring one from a small peak.
_SPAWN = "import subprocess, sys; sys.exit(subprocess.run([sys.executable, '-c', *sys.argv[1:]]).returncode)"


def _peak_growth(path: Path) -> tuple[int, int]:
    """(rows, bytes) by which loading `path` raised the peak RSS of a fresh process."""
    proc = subprocess.run(
        [sys.executable, "-c", _SPAWN, _MEASURE, str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["before_kib"] < 150 << 10, out  # the baseline is this process's own, not inherited
    return out["rows"], out["growth_kib"] * 1024  # ru_maxrss is in KiB on Linux


@pytest.fixture(scope="module")
def big_files(tmp_path_factory) -> tuple[Path, Path, int]:
    """A ~40 MB JSON Lines file of Alpaca-sized rows and the same rows as one JSON array."""
    root = tmp_path_factory.mktemp("big")
    lines = [json.dumps(r, ensure_ascii=False) for r in alpaca_sized_rows(4000, seed=5)]
    n = 0
    jsonl, arr = root / "big.jsonl", root / "big.json"
    with jsonl.open("w", encoding="utf-8") as a, arr.open("w", encoding="utf-8") as b:
        b.write("[\n")
        k = 0
        while n < 40 << 20:
            for line in lines:
                line = line.replace('"instruction": "', f'"instruction": "{k} ', 1)  # distinct rows
                a.write(line + "\n")
                b.write(("" if k == 0 else ",\n") + line)
                n += len(line.encode()) + 1
                k += 1
        b.write("\n]\n")
    return jsonl, arr, k


@pytest.mark.parametrize("kind", ["jsonl", "json"])
def test_loading_peak_memory_is_under_twice_the_file_size(big_files, kind):
    jsonl, arr, n = big_files
    path = jsonl if kind == "jsonl" else arr
    rows, growth = _peak_growth(path)
    size = path.stat().st_size
    assert rows == n
    assert growth <= 2 * size, f"peak RSS grew by {growth / size:.2f}x the file size ({size >> 20} MiB)"


def test_streamed_json_array_reports_errors_like_a_whole_parse(tmp_path, monkeypatch):
    """Tiny read pieces: every item and error crosses piece boundaries."""
    from pipeline_lib.data import loading

    monkeypatch.setattr(loading, "_TEXT_PIECE", 3)
    monkeypatch.setattr(loading, "_PIECE", 3)
    rows = alpaca_rows(8) + [{"instruction": "Emoji 😀 \u00e9", "input": "", "output": "ok"}]
    good = tmp_path / "good.json"
    good.write_text("\ufeff" + json.dumps(rows, ensure_ascii=False, indent=3), encoding="utf-8")
    assert D.load_rows(good) == rows
    cases = {
        b'[{"instruction": "a", "output": "b"},\n 12345, {"instruction": "c", "output": "d"}]':
            "item 1 of the top-level list is a number",
        b'[1234567890123, {"instruction": "a", "output": "b"}]': "item 0 of the top-level list is a number",
        b'[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]':
            "not valid JSON (line 2, column 22: Expecting ',' delimiter)",
        b'[{"instruction": "a", "output": "b"}\n\n': "not valid JSON (line 3, column 1: Expecting ',' delimiter)",
        b'[{"instruction": "a", "output": "b"}] [': "not valid JSON (line 1, column 39: Extra data)",
        b'[{"instruction": "a", "output": "b"},]': "not valid JSON (line 1, column 38: Expecting value)",
    }  # fmt: skip
    for content, problem in cases.items():
        bad = tmp_path / "bad.json"
        bad.write_bytes(content)
        with pytest.raises(DataError) as err:
            D.load_rows(bad)
        assert problem in str(err.value)
        try:  # the same position as the standard library gives for the whole text
            json.loads(content)
        except json.JSONDecodeError as e:
            assert f"line {e.lineno}, column {e.colno}: {e.msg}" in problem


def test_sha256_of_a_download_is_of_its_bytes(serve, tmp_path):
    data = _jsonl(alpaca_rows(50))
    srv = serve({"/a.jsonl": body(data, length=False)})
    got = D.acquire(f"{srv.base}/a.jsonl", tmp_path / "raw", timeout=5)
    assert got.sha256 == hashlib.sha256(data).hexdigest() and got.path.read_bytes() == data
