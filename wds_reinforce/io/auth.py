"""Headers for ``http(s)://`` reads, from the environment, sent to their own host only and never shown.

- ``WDS_REINFORCE_HTTP_HEADERS``: a JSON object. A string value is a header for every http(s)
  host (``{"X-Team": "vision"}``); an object value holds the headers of one host
  (``{"data.example.com": {"Authorization": "Bearer ..."}}``), or of a domain and its subdomains
  when the key starts with ``*.`` (``"*.example.com"``). A host's own headers win.
- The Hugging Face token, for ``https://`` reads of ``huggingface.co``, ``hf.co`` and their
  subdomains, as ``Authorization: Bearer <token>`` (unless the setting above gives that host an
  Authorization), never over plain ``http://``:
  ``HF_TOKEN``, else the token file as huggingface_hub reads it (``HF_TOKEN_PATH``, else
  ``$HF_HOME/token``, else ``~/.cache/huggingface/token``). Read here, no network; a token that
  is not one line of printable ASCII is refused, naming where it came from.

The headers go on a request as unredirected headers (``authorize``), and the opener's redirect
handler (``authorized_opener``) carries them on only to the same origin (scheme, host, port): the
Hub's redirect to its CDN, or a server's to another host, gets none. Their values appear in no
message, log line, repr or exception: a bad setting's error names the header or the host, never
a value; ``authorized_open`` checks every value before urllib sends it, and turns a refusal of
http.client's (whose message repeats the value) into a ``UsageError`` that shows none.
"""

from __future__ import annotations

import json
import os
import re
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from wds_reinforce.core.errors import UsageError

__all__ = [
    "HEADERS_ENV",
    "Headers",
    "http_headers",
    "hf_token",
    "check_http_headers",
    "authorize",
    "authorized_opener",
    "authorized_open",
]

HEADERS_ENV = "WDS_REINFORCE_HTTP_HEADERS"
_HF_DOMAINS = ("huggingface.co", "hf.co")
_TOKEN_CHARS = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # an HTTP header name (RFC 9110 token)
_VALUE_CHARS = re.compile(r"[\t\x20-\x7e\x80-\xff]*")  # one line, no control characters, Latin-1 (http.client's)
_TOKEN_VALUE = re.compile(r"[\x20-\x7e]+")  # a token: one line of printable ASCII
_AUTH_ATTR = "_wds_reinforce_auth"  # where a request keeps the headers that may follow its redirects


class Headers(dict):
    """Header name -> value; shows the names only."""

    def __repr__(self) -> str:
        return f"<headers {', '.join(self) or '(none)'}>"

    __str__ = __repr__


def _checked_headers(items: Any, where: str) -> dict[str, str]:
    if not isinstance(items, dict):
        raise UsageError(f"expected {HEADERS_ENV}[{where!r}] to be an object of header names to strings")
    for name, value in items.items():
        if not _TOKEN_CHARS.fullmatch(name):
            raise UsageError(f"expected header names in {HEADERS_ENV}, got {name!r}")
        if not isinstance(value, str) or not _VALUE_CHARS.fullmatch(value):
            raise UsageError(
                f"expected {HEADERS_ENV}'s header {name!r} to be one line of text without control characters "
                "(value not shown)"
            )
    return items


def _setting() -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """(headers for every host, headers per host pattern) from ``WDS_REINFORCE_HTTP_HEADERS``."""
    raw = os.environ.get(HEADERS_ENV, "")
    if not raw.strip():
        return {}, {}
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):  # the text may hold a secret: it is never repeated
        raise UsageError(
            f'expected {HEADERS_ENV} to be a JSON object such as {{"host.example": {{"Authorization": "..."}}}} '
            "(value not shown)"
        )
    every = _checked_headers({k: v for k, v in parsed.items() if not isinstance(v, dict)}, "*")
    hosts = {k.lower(): _checked_headers(v, k) for k, v in parsed.items() if isinstance(v, dict)}
    return every, hosts


def check_http_headers() -> None:
    """Raise ``UsageError`` for a bad ``WDS_REINFORCE_HTTP_HEADERS`` (naming no value)."""
    _setting()


def _matches(pattern: str, host: str) -> bool:
    if pattern.startswith("*."):
        return host == pattern[2:] or host.endswith(pattern[1:])
    return host == pattern


def _checked_token(token: str, where: str) -> str | None:
    if token and not _TOKEN_VALUE.fullmatch(token):  # it would break the header, and http.client's error shows it
        raise UsageError(f"expected the Hugging Face token in {where} to be one line of printable ASCII (not shown)")
    return token or None


def hf_token() -> str | None:
    """The Hugging Face token as huggingface_hub finds it: ``HF_TOKEN``, else its token file.

    Raises:
        UsageError: the token is not one line of printable ASCII (the message names where it came from).
    """
    token = os.environ.get("HF_TOKEN", "").strip()
    if token:
        return _checked_token(token, "HF_TOKEN")
    path = os.environ.get("HF_TOKEN_PATH")
    if not path:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface"
        )
        path = os.path.join(home, "token")
    path = os.path.expanduser(path)
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            token = f.read().strip()
    except OSError:  # no token file: anonymous, as huggingface_hub
        return None
    return _checked_token(token, f"the token file {path}")


def http_headers(url: str) -> Headers:
    """The headers a read of ``url`` sends (empty for other schemes).

    Raises:
        UsageError: a bad ``WDS_REINFORCE_HTTP_HEADERS``, or a bad Hugging Face token for a Hub URL.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() not in ("http", "https"):
        return Headers()
    host = (parts.hostname or "").lower()
    every, hosts = _setting()
    out = Headers(every)
    for pattern in sorted(hosts, key=len):  # the most specific pattern last: it wins
        if _matches(pattern, host):
            out.update(hosts[pattern])
    if parts.scheme.lower() == "https" and any(_matches(f"*.{domain}", host) for domain in _HF_DOMAINS):
        if not any(name.lower() == "authorization" for name in out):
            token = hf_token()
            if token:
                out["Authorization"] = f"Bearer {token}"
    return out


def authorize(request: urllib.request.Request, headers: Headers) -> urllib.request.Request:
    """``request`` with ``headers`` added as unredirected headers (``authorized_opener`` decides on redirects).

    Raises:
        UsageError: a value that is not one line of text (naming the header, not the value).
    """
    for name, value in headers.items():
        if not isinstance(value, str) or not _VALUE_CHARS.fullmatch(value):
            raise UsageError(f"expected the {name} header for {request.host} to be one line of text (value not shown)")
        request.add_unredirected_header(name, value)
    setattr(request, _AUTH_ATTR, headers)
    return request


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(scheme)


class _SameOriginRedirects(urllib.request.HTTPRedirectHandler):
    """urllib's redirects, the request's headers (``authorize``) carried to the same origin only."""

    handler_order = 400  # before the opener's default redirect handler (500), which never runs then

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> Any:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        carried = getattr(req, _AUTH_ATTR, None)
        if new is not None and carried and _origin(newurl) == _origin(req.full_url):
            authorize(new, carried)
        return new


def authorized_opener(opener: urllib.request.OpenerDirector) -> urllib.request.OpenerDirector:
    """``opener`` whose redirects carry ``authorize``'s headers to the same origin only."""
    opener.add_handler(_SameOriginRedirects())
    return opener


def authorized_open(
    opener: urllib.request.OpenerDirector, request: urllib.request.Request, headers: Headers, timeout: float
) -> Any:
    """``opener.open(request)`` with ``headers`` (``authorize``).

    Raises:
        UsageError: a header value (or the URL) that http.client refuses: its ``ValueError`` repeats the
            value, so it is replaced by a message that shows none (and chains nothing).
        OSError, http.client.HTTPException: as ``opener.open``.
    """
    try:
        return opener.open(authorize(request, headers), timeout=timeout)
    except UsageError:
        raise
    except ValueError as exc:  # UnicodeEncodeError too
        refused = type(exc).__name__
    raise UsageError(
        f"cannot send a request for {request.full_url}: http.client refused a header value or the URL ({refused};"
        " header values not shown)"
    )
