"""Registry credentials from a docker ``config.json``, re-read when the file changes.

Only the ``auths`` entries are read: ``auth`` (base64 of ``user:password``) or
``username``/``password``, keyed by host (or by a URL such as
``https://index.docker.io/v1/``, normalised by ``registry_of`` so that Docker
Hub's aliases all mean ``docker.io``). Credential helpers, credential stores
and identity tokens are not run or used; they are remembered only so that an
authentication failure can say where the credentials are kept instead.

The file is checked (one ``stat``) before each use and parsed again when its
mtime, size or inode changed, so rotated credentials apply without a restart.
An unreadable file at start is a configuration error (``ValueError``); later, a
broken rewrite keeps the credentials read before, with a warning.

What one registry's entry amounts to is handed to the authentication flow
(``auth.py``) as a ``Login``, a plain value: the flow decides, the client asks.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


@dataclass(frozen=True)
class Login:
    """What the docker config holds for one registry, as the auth flow needs it."""

    #: (user, password) for Basic authentication, or None when there are none
    basic: tuple[str, str] | None = None
    #: " from PATH" when they come from the docker config, for messages
    source: str = ""
    #: why there are none although the file mentions the registry, for messages
    hint: str = ""


class Credentials:
    """Basic credentials per registry from a docker config.json, re-read when it changes."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._entries: dict[str, tuple[str, str]] = {}
        #: registries whose credentials are somewhere we do not read (helpers, tokens)
        self._elsewhere: dict[str, str] = {}
        if path:
            self._load(strict=True)

    def get(self, registry: str) -> tuple[str, str] | None:
        if self.path:
            self._load(strict=False)
        return self._entries.get(registry)

    def source(self, registry: str) -> str:
        return f" from {self.path}" if registry in self._entries else ""

    def hint(self, registry: str) -> str:
        where = self._elsewhere.get(registry)
        if where is None and registry not in self._entries:
            where = self._elsewhere.get("*")
        return f"; {self.path} keeps them in {where}, which is not supported" if where else ""

    def login(self, registry: str) -> Login:
        """The registry's credentials now (re-reading the file if it changed)."""
        basic = self.get(registry)
        return Login(basic, self.source(registry), self.hint(registry))

    def _load(self, strict: bool) -> None:
        # a stat per request on a local file: cheap enough for the event loop
        assert self.path is not None
        try:
            st = Path(self.path).stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError as exc:
            if strict:
                raise ValueError(f"cannot read docker config {self.path}: {exc}") from exc
            log.warning("cannot read docker config %s, keeping the credentials read before: %s",
                        self.path, exc)
            return
        if stamp == self._stamp:
            return
        try:
            entries, elsewhere = parse_docker_config(Path(self.path).read_bytes())
        except (OSError, ValueError) as exc:
            if strict:
                raise ValueError(f"cannot read docker config {self.path}: {exc}") from exc
            log.warning("cannot read docker config %s, keeping the credentials read "
                        "before: %s", self.path, exc)
            return
        self._entries, self._elsewhere, self._stamp = entries, elsewhere, stamp
        log.info("read credentials for %d registries from %s", len(entries), self.path)


def parse_docker_config(raw: bytes) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """(registry → (user, password), registry or "*" → where else credentials are kept)."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    auths = data.get("auths") or {}
    if not isinstance(auths, dict):
        raise ValueError('"auths" is not an object')
    entries: dict[str, tuple[str, str]] = {}
    elsewhere: dict[str, str] = {}
    helpers = data.get("credHelpers")
    if isinstance(helpers, dict):
        for host in helpers:
            elsewhere[registry_of(str(host))] = "a credential helper (credHelpers)"
    for host, entry in auths.items():
        name = registry_of(str(host))
        if not isinstance(entry, dict):
            raise ValueError(f'"auths" entry for {host!r} is not an object')
        if entry.get("auth"):
            try:
                decoded = base64.b64decode(str(entry["auth"]), validate=True).decode()
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise ValueError(f'"auths" entry for {host!r}: "auth" is not base64 of '
                                 f"user:password ({exc})") from exc
            user, sep, password = decoded.partition(":")
            if not sep:
                raise ValueError(f'"auths" entry for {host!r}: "auth" is not user:password')
        else:
            user, password = str(entry.get("username", "")), str(entry.get("password", ""))
        if user:
            entries[name] = (user, password)
        elif entry.get("identitytoken"):
            elsewhere[name] = "an identity token"
    if isinstance(data.get("credsStore"), str):
        # "*": any registry without an "auths" entry may be in the store
        elsewhere["*"] = "a credential store (credsStore)"
    return entries, elsewhere


def registry_of(host: str) -> str:
    """docker config keys are hosts, sometimes URLs ("https://index.docker.io/v1/")."""
    name = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", host).split("/")[0]
    return "docker.io" if name in _DOCKER_HUB_ALIASES else name
