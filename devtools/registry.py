"""Debian's docker-registry (CNCF distribution 2.8) on 127.0.0.1, and ways to push to it.

``push_profile`` speaks the distribution API directly, so tests can push
deliberately wrong artifacts (media types, no layers, sizes that lie, indexes);
``push_with_oras`` pushes the way users do, with oras-py.

Authentication, both as a real registry does it: ``users=`` alone turns on
htpasswd (Basic); with ``token_auth=True`` the registry wants Bearer tokens from
a token server started alongside (``tokenserver.TokenServer``), which checks the
same users and signs JWTs the registry verifies. ``auth_config`` takes any raw
``auth:`` section instead.

Mirrors: ``proxy=URL`` runs it as a pull-through cache of the registry at URL
(distribution's proxy mode), what a registry mirror is in production.

Counting: the registry's access log (one line per request) is kept, so a test
can count the requests that reached it (``count``, ``requests_seen``).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import requests

if TYPE_CHECKING:
    # imported when used: it needs the cryptography package, the demo does not
    from devtools.tokenserver import TokenServer

SECCOMP_CONFIG = "application/vnd.cncf.seccomp-profile.config.v1+json"
EMPTY_CONFIG = "application/vnd.oci.empty.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
TITLE = "org.opencontainers.image.title"
BINARY = "docker-registry"
#: the CRI-O blog's config blob: "{}" and a newline
CRIO_CONFIG = b"{}\n"


def free_port() -> int:
    """A port free now; another process may take it before ours binds it, so whoever
    starts a server on it must check with :func:`owns_port` that the server is its own."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def owns_port(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the TCP socket listening on ``port`` (from /proc)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                # local address "HEX_IP:HEX_PORT", state 0A = LISTEN
                if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":
                    inodes.add(fields[9])
    if not inodes:
        return False
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                target = os.readlink(fd)
                if target.startswith("socket:[") and target[8:-1] in inodes:
                    return True
    return False


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryError(Exception):
    pass


def htpasswd_line(user: str, password: str) -> str:
    """A bcrypt htpasswd line, the only hash docker-registry accepts.

    The ``bcrypt`` package if installed, else the standard library's ``crypt``
    (glibc's libxcrypt does bcrypt; the module is gone in Python 3.13). Cost 4,
    not the default 12: the registry checks the hash on every request.
    """
    try:
        bcrypt = importlib.import_module("bcrypt")
        hashed: str = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    except ImportError:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            import crypt

            hashed = crypt.crypt(password, crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=16))
        if not hashed or not hashed.startswith("$2"):
            raise RegistryError("no bcrypt available: pip install bcrypt") from None
    return f"{user}:{hashed}\n"


def docker_config(path: Path, auths: Mapping[str, tuple[str, str]]) -> Path:
    """Write a docker config.json with Basic ``auths`` (host → (user, password))."""
    path.write_text(json.dumps({"auths": {
        host: {"auth": base64.b64encode(f"{u}:{p}".encode()).decode()}
        for host, (u, p) in auths.items()
    }}))
    return path


class LocalRegistry:
    """``docker-registry serve`` on 127.0.0.1 with a free port and a temporary storage dir."""

    def __init__(
        self,
        htpasswd: str | None = None,
        port: int | None = None,
        root: Path | None = None,
        tls: tuple[Path, Path] | None = None,
        auth_config: str | None = None,
        *,
        users: Mapping[str, str] | None = None,
        token_auth: bool = False,
        proxy: str | None = None,
    ) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="nri-seccomp-registry-"))
        self.root = root or self._tmp / "data"
        self._fixed_port = port
        self.port = port or free_port()
        self.log_path = self._tmp / "access.log"
        self._htpasswd = htpasswd
        if users and not token_auth:
            self._htpasswd = "".join(htpasswd_line(u, p) for u, p in users.items())
        #: a raw "auth:" section (e.g. TokenServer.registry_auth())
        self._auth_config = auth_config
        #: (certificate, key): serve HTTPS
        self.tls = tls
        #: a pull-through cache of this registry URL (distribution's proxy mode)
        self.proxy = proxy
        self.scheme = "https" if tls else "http"
        self._proc: subprocess.Popen[bytes] | None = None
        #: Basic credentials the push helpers use (the first user's, if any)
        self.auth: tuple[str, str] | None = next(iter(users.items())) if users else None
        #: extra headers for pushes (e.g. a bearer token); replaces automatic push tokens
        self.push_headers: dict[str, str] = {}
        self.token_server: TokenServer | None = None
        self._push_tokens: dict[str, str] = {}
        if token_auth:
            from devtools.tokenserver import TokenServer

            self.token_server = TokenServer(self._tmp, dict(users) if users else None)
            self.token_server.__enter__()
            self._auth_config = self.token_server.registry_auth()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # ---- process -----------------------------------------------------------

    def _config(self) -> Path:
        auth = ""
        if self._auth_config is not None:
            auth = self._auth_config
        elif self._htpasswd is not None:
            path = self._tmp / "htpasswd"
            path.write_text(self._htpasswd)
            auth = f"auth: {{htpasswd: {{realm: test, path: {path}}}}}\n"
        tls = f", tls: {{certificate: {self.tls[0]}, key: {self.tls[1]}}}" if self.tls else ""
        config = self._tmp / "config.yml"
        config.write_text(
            "version: 0.1\n"
            f"storage: {{filesystem: {{rootdirectory: {self.root}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: {self.address}{tls}}}\n"
            # the access log (stdout) is how requests are counted
            "log: {level: error, accesslog: {disabled: false}}\n" + auth
            + (f"proxy: {{remoteurl: {self.proxy}}}\n" if self.proxy else "")
        )
        return config

    def start(self) -> LocalRegistry:
        if shutil.which(BINARY) is None:
            raise RegistryError(f"{BINARY} not found: apt-get install docker-registry")
        for _attempt in range(3):
            if self._spawn():
                return self
            # someone took the free port between our probe and the registry's bind
            if self._fixed_port is not None:
                break
            self.port = free_port()
        raise RegistryError(f"{BINARY} did not start on {self.address}: "
                            f"{self.log_path.read_text(errors='replace')[-2000:]}")

    def _spawn(self) -> bool:
        config = self._config()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen([BINARY, "serve", str(config)], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                self._proc = None
                return False
            if not owns_port(self._proc.pid, self.port):
                # not listening yet, or the port is someone else's: never talk to it
                time.sleep(0.05)
                continue
            with contextlib.suppress(requests.RequestException):
                r = requests.get(f"{self.scheme}://{self.address}/v2/", timeout=0.5,
                                 verify=self._verify)
                if r.status_code in (200, 401):
                    return True
            time.sleep(0.05)
        self.stop()
        raise RegistryError(f"{BINARY} did not answer on {self.address} within 15 s")

    def stop(self) -> None:
        """Stop the process; storage stays (``start`` again serves the same content)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def close(self) -> None:
        self.stop()
        if self.token_server is not None:
            self.token_server.__exit__(None, None, None)
            self.token_server = None
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- counting ------------------------------------------------------------

    def _log_text(self) -> str:
        # the registry logs a request after answering it: wait until the log is still
        text = self.log_path.read_text(errors="replace")
        for _ in range(20):
            time.sleep(0.03)
            again = self.log_path.read_text(errors="replace")
            if again == text:
                break
            text = again
        return text

    def requests_seen(self, pattern: str = r"GET /v2/[^ ]+/blobs/") -> int:
        """How many access-log request lines match ``pattern`` (a regex from the method on)."""
        return len(re.findall(r'"' + pattern, self._log_text()))

    def count(self, kind: str = "blobs", repo: str | None = None, method: str = "GET",
              status: int | None = None) -> int:
        """Requests for ``kind`` ("blobs" or "manifests") of ``repo`` (any if None)."""
        name = re.escape(repo) if repo is not None else "[^ ]+"
        code = str(status) if status is not None else r"\d{3}"
        return len(re.findall(rf'"{method} /v2/{name}/{kind}/[^ ]+ HTTP/[0-9.]+" {code} ',
                              self._log_text()))

    # ---- pushing ---------------------------------------------------------------

    @property
    def _verify(self) -> str | bool:
        return str(self.tls[0]) if self.tls else True

    def _url(self, path: str) -> str:
        return f"{self.scheme}://{self.address}/v2/{path}"

    def _call(self, method: str, url: str, repo: str, **kw: Any) -> requests.Response:
        headers = dict(kw.pop("headers", {}))
        auth = None
        if self.push_headers:
            headers.update(self.push_headers)
        elif self.token_server is not None:
            headers["Authorization"] = f"Bearer {self._push_token(repo)}"
        else:
            auth = self.auth
        return requests.request(method, url, headers=headers, auth=auth, timeout=10,
                                verify=self._verify, **kw)

    def _push_token(self, repo: str) -> str:
        # asked like a CI pipeline would; these requests show in token_server.requests
        assert self.token_server is not None
        token = self._push_tokens.get(repo)
        if token is None:
            r = requests.get(self.token_server.realm, auth=self.auth, timeout=10, params={
                "service": "test-registry", "scope": f"repository:{repo}:push,pull"})
            r.raise_for_status()
            token = self._push_tokens[repo] = str(r.json()["token"])
        return token

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = digest_of(data)
        r = self._call("POST", self._url(f"{repo}/blobs/uploads/"), repo)
        if r.status_code != 202:
            raise RegistryError(f"upload start: HTTP {r.status_code} {r.text[:200]}")
        location = r.headers["Location"]
        if location.startswith("/"):
            location = f"{self.scheme}://{self.address}{location}"
        sep = "&" if "?" in location else "?"
        r = self._call("PUT", f"{location}{sep}digest={digest}", repo, data=data,
                       headers={"Content-Type": "application/octet-stream"})
        if r.status_code != 201:
            raise RegistryError(f"upload: HTTP {r.status_code} {r.text[:200]}")
        return digest

    def push_manifest(self, repo: str, tag: str, manifest: dict[str, Any] | bytes,
                      media_type: str = OCI_MANIFEST) -> str:
        """PUT a manifest as given (bytes are sent verbatim); returns its digest."""
        body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        r = self._call("PUT", self._url(f"{repo}/manifests/{tag}"), repo, data=body,
                       headers={"Content-Type": media_type})
        if r.status_code != 201:
            raise RegistryError(f"manifest: HTTP {r.status_code} {r.text[:300]}")
        return digest_of(body)

    def push_profile(
        self,
        repo: str,
        tag: str,
        profile: bytes,
        *,
        config_media_type: str = SECCOMP_CONFIG,
        config_bytes: bytes = CRIO_CONFIG,
        layer_media_type: str = LAYER_TAR,
        title: str | None = "seccomp.json",
        layers: int = 1,
        layer_size: int | None = None,
        manifest_media_type: str | None = OCI_MANIFEST,
        annotations: dict[str, str] | None = None,
        artifact_type: str | None = None,
    ) -> str:
        """The CRI-O blog's artifact shape by default; returns the manifest digest.
        KEP-6061's typed form: ``config_media_type=EMPTY_CONFIG, config_bytes=b"{}",
        artifact_type=SECCOMP_CONFIG``.

        Deliberately wrong shapes: ``layers=0`` (no layers; more than one adds
        variants of the profile after it), ``layer_size`` (the descriptor
        lies about the first layer's size), any media types,
        ``manifest_media_type=None`` (the optional field left out).
        """
        config_digest = self.push_blob(repo, config_bytes)
        layer_descs = []
        for i in range(layers):
            data = profile if i == 0 else profile + b"\n" * i
            desc: dict[str, Any] = {"mediaType": layer_media_type,
                                    "digest": self.push_blob(repo, data), "size": len(data)}
            if i == 0 and layer_size is not None:
                desc["size"] = layer_size
            if title is not None:
                desc["annotations"] = {TITLE: title if i == 0 else f"{i}-{title}"}
            layer_descs.append(desc)
        manifest: dict[str, Any] = {"schemaVersion": 2}
        if manifest_media_type is not None:
            manifest["mediaType"] = manifest_media_type
        if artifact_type is not None:
            manifest["artifactType"] = artifact_type
        manifest["config"] = {"mediaType": config_media_type, "digest": config_digest,
                              "size": len(config_bytes)}
        manifest["layers"] = layer_descs
        if annotations:
            manifest["annotations"] = annotations
        return self.push_manifest(repo, tag, manifest, manifest_media_type or OCI_MANIFEST)

    def push_index(self, repo: str, tag: str, manifests: list[tuple[str, int, str]]) -> str:
        """An OCI image index over (digest, size, "os/arch") entries; returns its digest."""
        entries = []
        for digest, size, platform in manifests:
            os_name, _, arch = platform.partition("/")
            entries.append({"mediaType": OCI_MANIFEST, "digest": digest, "size": size,
                            "platform": {"os": os_name, "architecture": arch}})
        return self.push_manifest(repo, tag, {"schemaVersion": 2, "mediaType": OCI_INDEX,
                                              "manifests": entries}, OCI_INDEX)

    def manifest_size(self, repo: str, reference: str) -> int:
        r = self._call("HEAD", self._url(f"{repo}/manifests/{reference}"), repo,
                       headers={"Accept": OCI_MANIFEST})
        r.raise_for_status()
        return int(r.headers["Content-Length"])

    def push_image(self, repo: str, tag: str, annotations: dict[str, str]) -> str:
        """A minimal image whose manifest carries ``annotations`` (CRI-O's image annotations)."""
        config = json.dumps({"architecture": "amd64", "os": "linux",
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        manifest = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": self.push_blob(repo, config), "size": len(config)},
            "layers": [],
            "annotations": annotations,
        }
        return self.push_manifest(repo, tag, manifest)

    def push_with_oras(self, repo: str, tag: str, profile: bytes,
                       config_media_type: str = SECCOMP_CONFIG) -> str:
        """Push the way users do, with oras-py; returns the manifest digest.

        Only for a registry without authentication over plain HTTP (oras-py's
        auth is not what is being shown here). oras-py has no timeouts: a
        registry that stalls hangs this helper, which only tests and the demo use.
        """
        import oras.client

        workdir = Path(tempfile.mkdtemp(prefix="oras-push-", dir=self._tmp))
        try:
            layer = workdir / "seccomp.json"
            layer.write_bytes(profile)
            config = workdir / "config.json"
            config.write_bytes(CRIO_CONFIG)
            client = oras.client.OrasClient(hostname=self.address, insecure=True)
            response = client.push(
                target=f"{self.address}/{repo}:{tag}",
                # absolute paths: the layer's title is the file's base name
                files=[str(layer)],
                # "path:mediatype" here; config_path= is silently ignored (oras-py pitfall)
                manifest_config=f"{config}:{config_media_type}",
                disable_path_validation=True,
                quiet=True,
            )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        digest = response.headers.get("Docker-Content-Digest")
        if not digest:
            raise RegistryError(f"oras push of {repo}:{tag} returned no digest")
        return str(digest)
