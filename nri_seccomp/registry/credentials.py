"""Registry credentials from a docker ``config.json``, re-read when the file changes.

The ``auths`` entries: ``auth`` (base64 of ``user:password``) or
``username``/``password``, keyed by host (or by a URL such as
``https://index.docker.io/v1/``, normalised by ``registry_of`` so that Docker
Hub's aliases all mean ``docker.io``), or an ``identitytoken`` (a refresh token
from ``docker login`` against an OAuth token server). An entry with an identity
token uses it, whatever else it holds: docker writes ``auth`` as ``user:`` (no
password) beside it, and docker and the containerd-based tools that read
config.json prefer the token.

Credential helpers (``credHelpers``: host → helper) and the credential store
(``credsStore``: every other host) are run as docker runs them:
``docker-credential-NAME get`` with the host on stdin, a JSON answer
``{"ServerURL", "Username", "Secret"}`` on stdout (``HelperRunner``); the user
name ``<token>`` means the secret is an identity token. Which
source a host gets: its ``credHelpers`` entry, else its ``auths`` entry, else
the ``credsStore``. A helper is only ever asked about the host it is consulted
for, never about another one.

The file is checked (one ``stat``) before each use and parsed again when its
mtime, size or inode changed, so rotated credentials apply without a restart.
An unreadable file at start is a configuration error (``ValueError``); later, a
broken rewrite keeps the credentials read before, with a warning.

What one registry's entry amounts to is handed to the authentication flow
(``auth.py``) as a ``Login``, a plain value typed by what it holds: Basic
credentials (``basic``) or an identity token (``identity_token``), which the flow
only ever exchanges at the token server the registry names; the flow decides, the
client asks.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from nri_seccomp.bounded import quote_untrusted

log = logging.getLogger(__name__)

_DOCKER_HUB_ALIASES = ("index.docker.io", "registry-1.docker.io", "registry.hub.docker.com")


#: the user name a credential helper answers with when its secret is an identity token
TOKEN_USERNAME = "<token>"


@dataclass(frozen=True)
class Login:
    """What the docker config holds for one registry, as the auth flow needs it.

    At most one of ``basic`` and ``identity_token``: Basic credentials go with a
    Basic challenge or a token request; an identity (refresh) token only to the
    token server the registry's own Bearer challenge names (``auth.py``).
    """

    #: (user, password) for Basic authentication, or None when there are none
    basic: tuple[str, str] | None = None
    #: " from PATH" when they come from the docker config, for messages
    source: str = ""
    #: why there are none although the file mentions the registry, for messages
    hint: str = ""
    #: an identity (refresh) token: exchanged for an access token at the token server
    identity_token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.basic is not None and self.identity_token is not None:
            raise ValueError("a login is Basic credentials or an identity token, not both")

    @property
    def present(self) -> bool:
        """Whether there is anything to authenticate with."""
        return self.basic is not None or self.identity_token is not None

    @property
    def what(self) -> str:
        """What it holds, for messages: never the secret itself."""
        return "identity token" if self.identity_token is not None else "credentials"

    def refused(self, registry: str) -> str:
        """Why a refusal was one, for messages: what was sent and where it came from."""
        if not self.present:
            return f"no credentials are configured for {registry}{self.hint}"
        verb = "was" if self.identity_token is not None else "were"
        return f"the {self.what} for {registry}{self.source} {verb} refused"


class Credentials:
    """Credentials per registry from a docker config.json, re-read when it changes."""

    def __init__(self, path: str | None, helpers: HelperRunner | None = None) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        #: registry → its "auths" entry (no source yet: ``login`` adds it)
        self._entries: dict[str, Login] = {}
        #: registry → credential helper name (credHelpers); the store for the rest
        self._helpers: dict[str, str] = {}
        self._store: str | None = None
        self._runner = helpers or HelperRunner()
        if path:
            self._load(strict=True)

    def helper_for(self, registry: str) -> str | None:
        """The credential helper to ask about ``registry``, if one is configured for it."""
        if self.path:
            self._load(strict=False)
        if registry in self._helpers:
            return self._helpers[registry]
        if registry in self._entries:
            return None
        return self._store

    async def login_for(self, registry: str) -> Login:
        """The registry's credentials now: from its helper (run, cached), else the file."""
        name = self.helper_for(registry)
        if name is None:
            return self.login(registry)
        return await self._runner.login(name, registry)

    def forget(self, registry: str) -> None:
        """The credentials for ``registry`` were refused: ask its helper again next time."""
        name = self.helper_for(registry)
        if name is not None:
            self._runner.forget(name, registry)

    def login(self, registry: str) -> Login:
        """The registry's ``auths`` entry now (re-reading the file if it changed)."""
        if self.path:
            self._load(strict=False)
        entry = self._entries.get(registry)
        return replace(entry, source=f" from {self.path}") if entry is not None else Login()

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
            raw = Path(self.path).read_bytes()
            entries = parse_docker_config(raw)
            helpers, store = parse_helpers(raw)
        except (OSError, ValueError) as exc:
            if strict:
                raise ValueError(f"cannot read docker config {self.path}: {exc}") from exc
            log.warning("cannot read docker config %s, keeping the credentials read "
                        "before: %s", self.path, exc)
            return
        self._entries, self._stamp = entries, stamp
        self._helpers, self._store = helpers, store
        log.info("read credentials for %d registries from %s%s", len(entries), self.path,
                 f", credential helpers for {len(helpers)}" if helpers else "")


def parse_docker_config(raw: bytes) -> dict[str, Login]:
    """registry → its "auths" entry: Basic credentials or an identity token (no source)."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    auths = data.get("auths") or {}
    if not isinstance(auths, dict):
        raise ValueError('"auths" is not an object')
    entries: dict[str, Login] = {}
    for host, entry in auths.items():
        name = registry_of(str(host))
        if not isinstance(entry, dict):
            raise ValueError(f'"auths" entry for {host!r} is not an object')
        token = entry.get("identitytoken")
        if token:
            if not isinstance(token, str) or not _PRINTABLE.fullmatch(token):
                raise ValueError(f'"auths" entry for {str(host)[:80]!r}: "identitytoken" is '
                                 "not a single-line string")
            entries[name] = Login(identity_token=token)
            continue
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
            entries[name] = Login((user, password))
    return entries


def parse_helpers(raw: bytes) -> tuple[dict[str, str], str | None]:
    """(registry → credential helper name from "credHelpers", the "credsStore" name)."""
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    helpers = data.get("credHelpers") or {}
    if not isinstance(helpers, dict):
        raise ValueError('"credHelpers" is not an object')
    out: dict[str, str] = {}
    for host, name in helpers.items():
        if not isinstance(name, str) or not _HELPER_NAME.fullmatch(name):
            raise ValueError(f'"credHelpers" entry for {str(host)[:80]!r}: '
                             f"{str(name)[:80]!r} is not a helper name")
        out[registry_of(str(host))] = name
    store = data.get("credsStore") or None
    if store is not None and (not isinstance(store, str) or not _HELPER_NAME.fullmatch(store)):
        raise ValueError(f'"credsStore": {str(store)[:80]!r} is not a helper name')
    return out, store


def registry_of(host: str) -> str:
    """docker config keys are hosts, sometimes URLs ("https://index.docker.io/v1/")."""
    name = re.sub(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", "", host).split("/")[0]
    return "docker.io" if name in _DOCKER_HUB_ALIASES else name


# ---- credential helpers -------------------------------------------------------------

#: an identity token goes into a form body and a Basic header: printable, one line
_PRINTABLE = re.compile(r"[\x21-\x7e]{1,8192}")
#: docker-credential-NAME: a plain file name, nothing a path could be made of
_HELPER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: what a helper says when it holds nothing for the host (docker's errCredentialsNotFound)
_NOT_FOUND = "credentials not found in native keychain"
#: the key docker uses for Docker Hub in helpers and stores
DOCKER_HUB_SERVER = "https://index.docker.io/v1/"


@dataclass(frozen=True)
class HelperSettings:
    #: seconds one helper run may take (it runs while a container creation waits)
    timeout: float = 1.0
    #: seconds an answer is reused for the same (helper, host)
    ttl: float = 300.0
    #: seconds a failure (or "none for this host") is remembered before asking again
    failure_ttl: float = 30.0
    #: look helpers up in this directory instead of $PATH
    directory: str | None = None
    #: bytes of a helper's stdout (the JSON answer); its stderr is cut to MAX_STDERR
    max_stdout: int = 64 * 1024
    max_stderr: int = 4096


class HelperError(Exception):
    """The helper could not be run or answered nonsense; the message is fixed words."""


@dataclass
class _Memo:
    login: Login
    expires: float


class HelperRunner:
    """Runs ``docker-credential-NAME get`` per (helper, host), cached, one run at a time each.

    Never blocks the event loop (an asyncio subprocess), never longer than
    ``timeout`` (its process group is killed), never more than ``max_stdout``
    bytes read; stderr is only logged, cut. A run belongs to no caller: a
    creation whose deadline passes stops waiting, the run finishes for the next.
    """

    MAX_ENTRIES = 256

    def __init__(self, settings: HelperSettings | None = None) -> None:
        self.settings = settings or HelperSettings()
        self._memo: dict[tuple[str, str], _Memo] = {}
        self._running: dict[tuple[str, str], asyncio.Task[tuple[Login, float]]] = {}

    def forget(self, name: str, registry: str) -> None:
        self._memo.pop((name, registry), None)

    async def login(self, name: str, registry: str) -> Login:
        key = (name, registry)
        memo = self._memo.get(key)
        if memo is not None and memo.expires > time.monotonic():
            return memo.login
        task = self._running.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._ask(name, registry))
            self._running[key] = task
            task.add_done_callback(lambda _t: self._finished(key, _t))
        login, _ttl = await asyncio.shield(task)
        return login

    def _finished(self, key: tuple[str, str], task: asyncio.Task[tuple[Login, float]]) -> None:
        self._running.pop(key, None)
        if task.cancelled() or task.exception() is not None:
            return
        login, ttl = task.result()
        if len(self._memo) >= self.MAX_ENTRIES:
            self._memo.pop(next(iter(self._memo)))
        self._memo[key] = _Memo(login, time.monotonic() + ttl)

    async def _ask(self, name: str, registry: str) -> tuple[Login, float]:
        program = f"docker-credential-{name}"
        source = f" from credential helper {program}"
        try:
            answer = await self.run(name, DOCKER_HUB_SERVER if registry == "docker.io"
                                    else registry)
        except HelperError as exc:
            log.warning("credential helper %s for %s: %s", program, registry, exc)
            return Login(None, "", f"; the credential helper {program} failed: {exc}"), \
                self.settings.failure_ttl
        if answer is None:
            return Login(None, "", f"; the credential helper {program} has none for it"), \
                self.settings.failure_ttl
        user, secret = answer
        if user == TOKEN_USERNAME:
            if not _PRINTABLE.fullmatch(secret):
                log.warning("credential helper %s for %s: an identity token that is not a "
                            "single-line string", program, registry)
                return Login(None, "", f"; the credential helper {program} answered an "
                             "unusable identity token"), self.settings.failure_ttl
            return Login(source=source, identity_token=secret), self.settings.ttl
        return Login((user, secret), source), self.settings.ttl

    async def run(self, name: str, server: str) -> tuple[str, str] | None:
        """(user, secret) the helper holds for ``server``; None when it holds none."""
        s = self.settings
        if not _HELPER_NAME.fullmatch(name):
            raise HelperError("not a helper name")
        program = f"docker-credential-{name}"
        path = shutil.which(program, path=s.directory or os.environ.get("PATH", os.defpath))
        if path is None:
            raise HelperError(f"{program} not found in "
                              f"{s.directory or '$PATH'}")
        try:
            proc = await asyncio.create_subprocess_exec(
                path, "get", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise HelperError(f"cannot run: {exc.strerror or type(exc).__name__}") from None
        try:
            async with asyncio.timeout(s.timeout):
                out, err, code = await self._talk(proc, server)
        except TimeoutError:
            raise HelperError(f"no answer within {s.timeout:g}s") from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        text_err = err.decode("utf-8", "replace")
        if code != 0:
            if _NOT_FOUND in text_err or _NOT_FOUND in out.decode("utf-8", "replace"):
                return None
            log.info("%s get exited %d: %s", program, code, quote_untrusted(text_err, 200))
            raise HelperError(f"exited with status {code}")
        if text_err.strip():
            log.debug("%s get: %s", program, quote_untrusted(text_err, 200))
        try:
            data = json.loads(out)
            user, secret = data["Username"], data["Secret"]
        except (ValueError, KeyError, TypeError):
            raise HelperError("answered something other than "
                              '{"ServerURL", "Username", "Secret"}') from None
        if not isinstance(user, str) or not isinstance(secret, str) or not user:
            raise HelperError("answered without a user name or secret")
        return user, secret

    async def _talk(self, proc: asyncio.subprocess.Process,
                    server: str) -> tuple[bytes, bytes, int]:
        s = self.settings
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(server.encode() + b"\n")
            await proc.stdin.drain()
            proc.stdin.close()
        out, err, code = await asyncio.gather(
            _read_capped(proc.stdout, s.max_stdout, "stdout"),
            _read_capped(proc.stderr, s.max_stderr, None),
            proc.wait())
        return out, err, code


async def _read_capped(stream: asyncio.StreamReader, cap: int, what: str | None) -> bytes:
    """At most ``cap`` bytes; more is an error for ``what`` or, if None, drained and dropped."""
    buf = bytearray()
    while chunk := await stream.read(4096):
        if len(buf) < cap:
            buf += chunk[: cap - len(buf)]
        elif what is not None:
            raise HelperError(f"sent more than {cap} bytes on {what}")
    return bytes(buf)
