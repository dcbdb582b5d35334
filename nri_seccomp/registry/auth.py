"""Answering a registry's 401 challenge: the decision as a pure flow, the I/O elsewhere.

The client fetches anonymously first. On a 401 from the registry's own origin it
calls ``answer_challenge`` with the ``WWW-Authenticate`` value, the reference,
the registry's ``Login`` (``credentials.py``) and the settings, and gets back
what to do:

- ``BasicAnswer``: send this ``Authorization`` value and retry (``Basic``
  challenge, with the docker config's ``auths`` entry for that registry);
- ``TokenRequest``: ``Bearer`` challenge; GET this URL (the challenge's realm,
  with ``service`` and ``scope``) with these headers, then hand the answer's
  status and body to ``token_authorization``, which returns the ``Bearer``
  value to retry with;
- a refusal, raised as the ``ArtifactError`` the fetch ends with.

The rules it enforces: no credentials means ``Unauthorized`` naming the setting
(and where the docker config keeps them instead, if it does); an unknown scheme
or an unusable realm is refused; a token realm must be on the registry's own
host or listed in ``token_realm_hosts`` (else a registry could send the node's
credentials, or the node itself, to any host: ``PolicyError``); credentials are
never sent to a plain-HTTP token server unless the registry is configured
insecure; a token server's 401/403 says whether credentials were sent; a 429 or
5xx is ``RegistryUnavailable``; a token must be a non-empty single-line string.
Challenge and realm text reach messages only through ``bounded.quote_untrusted``.

The client sends, follows redirects (which drop ``Authorization`` across
origins) and caches the value that worked per (registry, scope).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

from nri_seccomp.bounded import quote_untrusted
from nri_seccomp.decide.reference import Reference
from nri_seccomp.registry.artifact import TooDeep, checked_json
from nri_seccomp.registry.credentials import Login
from nri_seccomp.registry.errors import (
    ArtifactError,
    PolicyError,
    RegistryUnavailable,
    Unauthorized,
)
from nri_seccomp.registry.urls import join, strip_url_query

if TYPE_CHECKING:
    from nri_seccomp.registry.client import FetchSettings

#: a token server's answer: a JSON object with a token, a few KiB in practice
MAX_TOKEN_RESPONSE = 64 * 1024


@dataclass(frozen=True)
class BasicAnswer:
    """Retry the request with this ``Authorization`` value."""

    authorization: str


@dataclass(frozen=True)
class TokenRequest:
    """GET ``url`` with ``headers``; ``realm`` is the token server as the challenge named it."""

    url: str
    headers: dict[str, str] = field(hash=False)
    realm: str


def parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    """``Bearer realm="…",service="…",scope="…"`` → ("bearer", {...})."""
    scheme, _, rest = header.strip().partition(" ")
    params = {k.lower(): (quoted if quoted or not bare else bare)
              for k, quoted, bare in re.findall(r'(\w+)=(?:"([^"]*)"|([^",\s]*))', rest)}
    return scheme.lower(), params


def basic_authorization(creds: tuple[str, str]) -> str:
    return "Basic " + base64.b64encode(f"{creds[0]}:{creds[1]}".encode()).decode()


def realm_allowed(realm: str, registry_url: str, realm_hosts: Iterable[str]) -> bool:
    """The realm is on the registry's own host, or its host[:port] is listed."""
    parts = urlsplit(realm)
    host = (parts.hostname or "").lower()
    if host and host == (urlsplit(registry_url).hostname or "").lower():
        return True
    listed = frozenset(h.lower() for h in realm_hosts)
    return parts.netloc.lower() in listed or host in listed


def _missing(ref: Reference, login: Login, host: str | None = None) -> str:
    return (f"registry {host or ref.registry} requires authentication and no credentials are "
            f"configured for it (registry.docker_config){login.hint}")


def answer_challenge(
    ref: Reference,
    challenge: str,
    *,
    scope: str,
    registry_url: str,
    login: Login,
    settings: FetchSettings,
    host: str | None = None,
    plain_http: bool | None = None,
) -> BasicAnswer | TokenRequest:
    """What to do about the registry's 401 ``challenge`` to a request for ``registry_url``.

    ``scope`` is asked for when the challenge names none. Raises ``Unauthorized``
    or ``PolicyError`` when the challenge cannot, or must not, be answered.
    ``host`` is the endpoint asked (a hosts.toml mirror; default the reference's
    registry), ``plain_http`` whether it is spoken to over HTTP (default: listed
    in ``registry.insecure``): then credentials may go to a plain-HTTP realm too.
    """
    key = str(ref)
    who = host or ref.registry
    if plain_http is None:
        plain_http = ref.registry in settings.insecure_registries
    creds = login.basic
    scheme, params = parse_challenge(challenge)
    info: dict[str, Any] = {"registry": ref.registry, "status": 401}
    if scheme == "basic":
        if creds is None:
            raise Unauthorized(key, _missing(ref, login, who), **info)
        return BasicAnswer(basic_authorization(creds))
    if scheme != "bearer":
        raise Unauthorized(key, f"registry {who} sent an unsupported "
                           f"authentication challenge {quote_untrusted(challenge)}", **info)
    realm = params.get("realm", "")
    realm_scheme = urlsplit(realm).scheme
    shown = quote_untrusted(strip_url_query(realm))
    if realm_scheme not in ("http", "https") or join(realm, "") is None:
        raise Unauthorized(key, f"registry {who} sent a Bearer challenge with an "
                           f"unusable realm {shown}", **info)
    if not realm_allowed(realm, registry_url, settings.token_realm_hosts):
        raise PolicyError(key, f"registry {who} named a token server on another "
                          "host, not listed in registry.token_realm_hosts; refused", **info)
    headers = {"Accept-Encoding": "identity"}
    if creds is not None:
        if realm_scheme == "http" and not plain_http:
            raise Unauthorized(key, f"token server {shown} is plain HTTP; the credentials "
                               f"for {who} are not sent there", url=realm, **info)
        headers["Authorization"] = basic_authorization(creds)
    query = {"service": params.get("service", ""), "scope": params.get("scope", scope)}
    token_url = realm + ("&" if "?" in realm else "?") + urlencode(
        {k: v for k, v in query.items() if v})
    return TokenRequest(token_url, headers, realm)


def token_refusal(ref: Reference, request: TokenRequest, login: Login,
                  status: int, host: str | None = None) -> ArtifactError:
    """The error for a token server answering ``status`` (not 200) to ``request``."""
    key = str(ref)
    who = host or ref.registry
    where = f"token server {quote_untrusted(strip_url_query(request.realm))} answered HTTP {status}"
    info: dict[str, Any] = {"registry": ref.registry, "url": request.realm, "status": status}
    if status == 429 or status >= 500:
        return RegistryUnavailable(key, where, **info)
    if status in (401, 403):
        why = _missing(ref, login, who) if login.basic is None else (
            f"the credentials for {who}{login.source} were refused")
        return Unauthorized(key, f"{where}; {why}", **info)
    return Unauthorized(key, where, **info)


def token_authorization(ref: Reference, request: TokenRequest, body: bytes) -> str:
    """The ``Authorization`` value from a token server's 200 answer ``body``."""
    try:
        payload = checked_json(body)
        token = payload.get("token") or payload.get("access_token")
    except (ValueError, AttributeError, TooDeep):
        token = None
    if not isinstance(token, str) or not token or any(c in token for c in "\r\n"):
        shown = quote_untrusted(strip_url_query(request.realm))
        raise Unauthorized(str(ref), f"token server {shown} sent no usable token",
                           url=request.realm, registry=ref.registry, status=401)
    return f"Bearer {token}"
