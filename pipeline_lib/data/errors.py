"""What every part of the data stage shares: its error (`DataError`, one line naming the source) and URL
redaction (`redact_url`: no credential or signature of a source URL is ever recorded or printed)."""

from __future__ import annotations

import re

MB = 1 << 20


# ------------------------------------------------------------------------------------------------ redaction

# RFC 3986, appendix B: scheme, //authority, path, ?query, #fragment (every string matches)
_URL_PARTS = re.compile(r"(?:([^:/?#]+):)?(?://([^/?#]*))?([^?#]*)(?:\?([^#]*))?(?:#(.*))?\Z", re.S)
_SECRET_NAME = re.compile(
    r"(?:^|[_.-])(?:token|signature|sig|secret|password|passwd|pwd|pass|credentials?|key|apikey|auth|"
    r"authorization|session|sessionid|jwt|bearer|hmac|sas)(?:$|[_.-])",
    re.I,
)
REDACTED = "REDACTED"


def _secret_param(name: str) -> bool:
    from urllib.parse import unquote_plus

    name = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", unquote_plus(name))  # accessToken -> access_Token
    return bool(_SECRET_NAME.search(name))


def _redact_params(params: str) -> str:
    parts = re.split(r"([&;])", params)
    for i in range(0, len(parts), 2):
        name, eq, value = parts[i].partition("=")
        if eq and value and _secret_param(name):
            parts[i] = f"{name}={REDACTED}"
    return "".join(parts)


def redact_url(url: str) -> str:
    """`url` with its secrets replaced by REDACTED: credentials in the netloc (`user:password@`) and the values
    of sensitive query (or fragment) parameters: signatures, tokens, keys, passwords, credentials
    (`X-Amz-Signature`, `X-Amz-Credential`, `X-Amz-Security-Token`, `sig`, `token`, `key`, `password`, ...).
    Everything else is kept as written, so the file can still be told apart. A string with no netloc, query
    or fragment (a local path, `builtin:NAME`, a Hugging Face id) comes back unchanged."""
    if not isinstance(url, str) or not any(c in url for c in "@?#"):
        return url
    scheme, netloc, path, query, fragment = _URL_PARTS.match(url).groups()
    out = f"{scheme}:" if scheme is not None else ""
    if netloc is not None:
        if "@" in netloc:
            netloc = f"{REDACTED}@{netloc.rsplit('@', 1)[1]}"
        out += f"//{netloc}"
    out += path
    if query is not None:
        out += "?" + _redact_params(query)
    if fragment is not None:
        out += "#" + (_redact_params(fragment) if "=" in fragment else fragment)
    return out


class DataError(Exception):
    """Data that cannot be used; `str()` is one line naming the file or source and the problem.

    `transient` is True where the outside world failed (network, timeouts), so a retry may help."""

    def __init__(self, where: str, problem: str, transient: bool = False) -> None:
        super().__init__(where, problem, transient)
        self.where = str(where)
        self.problem = str(problem)
        self.transient = transient

    def __str__(self) -> str:
        return " ".join(f"{self.where}: {self.problem}".split("\n"))
