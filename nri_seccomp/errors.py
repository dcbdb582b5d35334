"""The one exception tree, and the refusal a handler answers with.

Every exception the plugin raises on purpose derives from :class:`NriSeccompError`;
anything else is a bug. The tree, by stage of the data path::

    NriSeccompError
    ├── Refusal                  the handler's answer when a container must not start
    ├── config.ConfigError       a configuration value is wrong (names the key)
    ├── nri: mux.MuxError, ttrpc.ProtocolError, ttrpc.RpcError, stub.StubError
    ├── decide: reference.ReferenceError, resolver.AnnotationError
    ├── registry: errors.ArtifactError
    │   ├── PolicyError          the configuration does not allow the reference
    │   ├── NotFound, Unauthorized, InvalidArtifact
    │   └── RegistryUnavailable  worth serving a stale copy for
    ├── storage: cache.CacheError (CacheIntegrityError, CacheWriteError, CacheLockedError)
    ├── seccomp: ProfileError (syntax, field, compile, unknown syscall, analysis too
    │   costly), compat.UnsupportedByRuntime, worker.CompileBudgetExceeded
    └── service: store.NotReady, store.ProfileRejected, images.ImageLookupError

A handler never sees the transport: it returns an adjustment or raises a
:class:`Refusal` whose :class:`Kind` says what the runtime should make of it; the
NRI layer (``nri.stub``) turns the kind into a ttrpc status code.
"""

from __future__ import annotations

import enum


class NriSeccompError(Exception):
    """The root of every error the plugin raises on purpose."""


class Kind(enum.Enum):
    """What a refusal means for the container creation (each maps to one gRPC code)."""

    #: not ready yet; the kubelet's retry will be served (UNAVAILABLE)
    RETRY = "retry"
    #: the pod's annotation, or a configuration, is malformed (INVALID_ARGUMENT)
    INVALID = "invalid"
    #: the configuration does not allow it (PERMISSION_DENIED)
    FORBIDDEN = "forbidden"
    #: the artifact, the profile or the runtime cannot give the container what it
    #: asked for, and it must not run without it (FAILED_PRECONDITION)
    UNUSABLE = "unusable"


class Refusal(NriSeccompError):
    """The container creation fails with ``message``; ``kind`` says whether to retry."""

    def __init__(self, kind: Kind, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
