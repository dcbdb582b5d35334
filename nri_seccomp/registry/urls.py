"""URLs as the registry client handles them: absolute, bounded, and without secrets.

A registry answers with URLs of its choosing (redirect ``Location``, a token
realm), and blob storage hands out pre-signed URLs whose query carries a
signature. These helpers are the only way such a URL reaches a message or an
exception attribute: the query and fragment are dropped, control characters are
cleaned and the length is bounded (``nri_seccomp.bounded``). ``join`` decides
whether a ``Location`` is a usable absolute http(s) URL at all (no user-info, a
host, a parseable port), so that a hostile value is refused rather than
half-followed. Pure functions, no I/O.
"""

from __future__ import annotations

from urllib.parse import urljoin, urlsplit, urlunsplit

import httpx

from nri_seccomp.bounded import MAX_QUOTED, clean, cut, strip_query


def strip_url_query(url: str) -> str:
    """``url`` without its query and fragment (pre-signed URLs carry signatures there)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url.split("?", 1)[0].split("#", 1)[0]
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def show_url(url: str) -> str:
    """A URL for a message: no query, no fragment, no control characters, bounded."""
    return cut(strip_query(strip_url_query(url)[: MAX_QUOTED * 4]), MAX_QUOTED * 2)


def host_of(url: str) -> str:
    """The ``host[:port]`` of ``url`` for a message (no user-info), cleaned and bounded."""
    try:
        netloc = urlsplit(url).netloc
    except ValueError:
        netloc = ""
    return cut(clean((netloc.rpartition("@")[2] or "?")[: MAX_QUOTED * 2]), MAX_QUOTED)


def join(base: str, location: str) -> str | None:
    """The absolute http(s) URL ``location`` points to from ``base``, or None."""
    if not location and base.startswith(("http://", "https://")):
        location = base
    if not location:
        return None
    try:
        target = urljoin(base, location)
        parts = urlsplit(target)
        _ = parts.port
        httpx.URL(target)
    except (ValueError, httpx.InvalidURL):
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname or "@" in parts.netloc:
        return None
    return target


def origin(url: str) -> str:
    """``scheme://host[:port]``, lower-cased: credentials never leave their origin."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.lower()}"
