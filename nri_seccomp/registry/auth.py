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
- ``RefreshRequest``: ``Bearer`` challenge and the login is an identity (refresh)
  token: POST this form to the realm (the OAuth2 refresh-token grant of
  distribution's docs/spec/auth/oauth.md: ``grant_type=refresh_token``,
  ``refresh_token``, ``service``, ``scope``, ``client_id``), redirects not
  followed; a 200 answer goes to ``token_authorization`` (``access_token``). A
  token server that does not speak the POST (HTTP 400, 401 or 404, the statuses
  containerd's authorizer falls back on for a refresh token, ``FALLBACK_STATUSES``)
  is asked again with the request's ``fallback``: the GET, the token as the
  password of an empty user name, as containerd does;
- a refusal, raised as the ``ArtifactError`` the fetch ends with.

The rules it enforces: no credentials means ``Unauthorized`` naming the setting
(and where the docker config keeps them instead, if it does); an unknown scheme
or an unusable realm is refused; a token realm must be on the registry's own
host or listed in ``token_realm_hosts`` (else a registry could send the node's
credentials, or the node itself, to any host: ``PolicyError``); credentials are
never sent to a plain-HTTP token server unless the registry is configured
insecure; an identity token is only ever sent to that realm (a Basic challenge
is not answered with one); a token server's 401/403 says whether credentials were sent; a 429 or
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
#: who asks, in the refresh-token POST (oauth.md: need not be registered, for auditing)
CLIENT_ID = "nri-seccomp"
#: answers to the refresh-token POST that mean "ask with GET" (containerd, for a
#: refresh token: 404 from registries without the POST, 401 JFrog, 400 ACR)
FALLBACK_STATUSES = frozenset({400, 401, 404})


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


@dataclass(frozen=True)
class RefreshRequest:
    """POST ``body`` (form-encoded) to ``url`` with ``headers``, redirects not followed.

    When the token server answers one of ``FALLBACK_STATUSES``, send ``fallback``.
    The body and the fallback carry the identity token: never shown.
    """

    url: str
    headers: dict[str, str] = field(hash=False)
    body: bytes = field(repr=False)
    realm: str
    fallback: TokenRequest = field(repr=False)


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


def refresh_form(token: str, service: str, scope: str, client_id: str = CLIENT_ID) -> bytes:
    """The refresh-token grant, form-encoded; ``scope`` space-separated, left out if empty."""
    form = {"grant_type": "refresh_token", "refresh_token": token, "service": service,
            "client_id": client_id}
    if scope:
        form["scope"] = scope
    return urlencode(form).encode()


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
) -> BasicAnswer | TokenRequest | RefreshRequest:
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
        if login.identity_token is not None:
            raise Unauthorized(key, f"registry {who} asks for Basic authentication; the "
                               f"identity token for {who}{login.source} is only sent to a "
                               "token server", **info)
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
    if login.present and realm_scheme == "http" and not plain_http:
        are = "is" if login.identity_token is not None else "are"
        raise Unauthorized(key, f"token server {shown} is plain HTTP; the {login.what} "
                           f"for {who} {are} not sent there", url=realm, **info)
    if creds is not None:
        headers["Authorization"] = basic_authorization(creds)
    service, scopes = params.get("service", ""), params.get("scope", scope)
    query = {"service": service, "scope": scopes}
    token_url = realm + ("&" if "?" in realm else "?") + urlencode(
        {k: v for k, v in query.items() if v})
    token = login.identity_token
    if token is None:
        return TokenRequest(token_url, headers, realm)
    fallback = TokenRequest(token_url, {**headers, "Authorization": basic_authorization(
        ("", token))}, realm)
    return RefreshRequest(realm, {**headers, "Content-Type": "application/x-www-form-urlencoded"},
                          refresh_form(token, service, scopes), realm, fallback)


def token_refusal(ref: Reference, request: TokenRequest | RefreshRequest, login: Login,
                  status: int, host: str | None = None,
                  posted: int | None = None) -> ArtifactError:
    """The error for a token server answering ``status`` (not 200) to ``request``.

    ``posted``: the status of the refresh-token POST, when ``request`` is its fallback.
    """
    key = str(ref)
    who = host or ref.registry
    shown = quote_untrusted(strip_url_query(request.realm))
    where = (f"token server {shown} answered HTTP {status}" if posted is None else
             f"token server {shown} answered HTTP {posted} to the identity token's POST "
             f"and HTTP {status} to the GET")
    info: dict[str, Any] = {"registry": ref.registry, "url": request.realm, "status": status}
    if status == 429 or status >= 500:
        return RegistryUnavailable(key, where, **info)
    if status in (401, 403):
        why = _missing(ref, login, who) if not login.present else login.refused(who)
        return Unauthorized(key, f"{where}; {why}", **info)
    if isinstance(request, RefreshRequest) and 300 <= status < 400:
        return Unauthorized(key, f"{where}; a redirect is not followed with an identity "
                            "token", **info)
    return Unauthorized(key, where, **info)


def token_authorization(ref: Reference, request: TokenRequest | RefreshRequest,
                        body: bytes) -> str:
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
