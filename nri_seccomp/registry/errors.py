"""The registry client's exceptions: one tree, so that callers decide on the class.

::

    ArtifactError                 fetching the artifact failed (any cause below, or a
    │                             redirect the client will not follow)
    ├── PolicyError               the configuration forbids the reference or the
    │                             destination; raised before any network call when
    │                             it can be (allow-list, digest required), else
    │                             before connecting (non-public address, https→http
    │                             redirect, foreign token realm)
    ├── NotFound                  HTTP 404: no such repository, tag, manifest or blob
    ├── Unauthorized              401/403: no credentials, credentials refused, a
    │                             challenge that cannot be answered safely
    ├── RegistryUnavailable       refused, reset, timed out, deadline passed, 5xx,
    │                             429: transient, so a stale copy may be served
    └── InvalidArtifact           the registry answered, but not with a seccomp
                                  profile artifact we accept (index, media types,
                                  sizes, digests, JSON)

Every message starts with the reference and says what failed in fixed words;
nothing a registry sends is echoed except short values cut and cleaned by
``bounded.quote_untrusted``. The attributes repeat what the message says for
callers that decide on them: ``registry``, ``url`` (without query or fragment:
pre-signed blob URLs carry signatures) and the HTTP ``status`` when known.
"""

from __future__ import annotations

from nri_seccomp.errors import NriSeccompError
from nri_seccomp.registry.urls import strip_url_query


class ArtifactError(NriSeccompError):
    """Fetching the artifact failed; the message names the reference and the cause.

    The attributes repeat what the message says for callers that decide on
    them: ``registry``, ``url`` (without query or fragment) and HTTP ``status``
    when known.
    """

    def __init__(
        self,
        reference: str,
        message: str,
        *,
        registry: str | None = None,
        url: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(f"{reference}: {message}")
        self.reference = reference
        #: the message without the reference, for a caller that says more around it
        self.detail = message
        self.registry = registry
        self.url = strip_url_query(url) if url is not None else None
        self.status = status


class PolicyError(ArtifactError):
    """The configuration does not allow this reference or this destination."""


class NotFound(ArtifactError):
    """The registry has no such repository, tag, manifest or blob (HTTP 404)."""


class Unauthorized(ArtifactError):
    """Authentication was required and failed, or access was denied (401, 403)."""


class RegistryUnavailable(ArtifactError):
    """Connection refused, reset or timed out, 5xx or 429: worth serving a stale copy for."""


class InvalidArtifact(ArtifactError):
    """The registry answered, but not with a seccomp profile artifact we accept."""
