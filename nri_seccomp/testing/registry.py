"""Debian's docker-registry (CNCF distribution) on 127.0.0.1, and ways to push to it.

``push_profile`` speaks the distribution API directly, so tests can push
deliberately wrong artifacts (media types, sizes, indexes); ``push_with_oras``
pushes the way users do, with oras-py. The registry's access log is kept so a
test can count the requests that reached it.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import requests

SECCOMP_CONFIG = "application/vnd.cncf.seccomp-profile.config.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
BINARY = "docker-registry"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class RegistryError(Exception):
    pass


class LocalRegistry:
    def __init__(self, htpasswd: str | None = None, port: int | None = None,
                 root: Path | None = None, tls: tuple[Path, Path] | None = None,
                 auth_config: str | None = None) -> None:
        self._tmp = Path(tempfile.mkdtemp(prefix="nri-seccomp-registry-"))
        self.root = root or self._tmp / "data"
        self.port = port or free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.log_path = self._tmp / "access.log"
        self._htpasswd = htpasswd
        #: a raw "auth:" section (e.g. TokenServer.registry_auth())
        self._auth_config = auth_config
        #: (certificate, key): serve HTTPS
        self.tls = tls
        self.scheme = "https" if tls else "http"
        self._proc: subprocess.Popen[bytes] | None = None
        self.auth: tuple[str, str] | None = None
        #: extra headers for pushes (e.g. a bearer token)
        self.push_headers: dict[str, str] = {}

    # ---- process -----------------------------------------------------------

    def start(self) -> LocalRegistry:
        if shutil.which(BINARY) is None:
            raise RegistryError(f"{BINARY} not found: apt-get install docker-registry")
        auth = ""
        if self._htpasswd is not None:
            path = self._tmp / "htpasswd"
            path.write_text(self._htpasswd)
            auth = f"auth: {{htpasswd: {{realm: test, path: {path}}}}}\n"
        if self._auth_config is not None:
            auth = self._auth_config
        config = self._tmp / "config.yml"
        config.write_text(
            "version: 0.1\n"
            f"storage: {{filesystem: {{rootdirectory: {self.root}}}, delete: {{enabled: true}}}}\n"
            f"http: {{addr: {self.address}"
            + (f", tls: {{certificate: {self.tls[0]}, key: {self.tls[1]}}}" if self.tls else "")
            + "}\n"
            "log: {level: error, accesslog: {disabled: false}}\n" + auth
        )
        log = open(self.log_path, "ab")  # noqa: SIM115 (owned by the process)
        self._proc = subprocess.Popen([BINARY, "serve", str(config)], stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RegistryError(f"{BINARY} exited: {self.log_path.read_text()[-2000:]}")
            try:
                r = requests.get(f"{self.scheme}://{self.address}/v2/", timeout=0.5,
                                 verify=False)
                if r.status_code in (200, 401):
                    return self
            except requests.RequestException:
                pass
            time.sleep(0.05)
        self.stop()
        raise RegistryError(f"{BINARY} did not answer on {self.address} within 15 s")

    def stop(self) -> None:
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
        shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> LocalRegistry:
        return self.start()

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # ---- counting ------------------------------------------------------------

    def requests_seen(self, pattern: str = r"GET /v2/[^ ]+/blobs/") -> int:
        """How many access-log lines match ``pattern`` (e.g. blob downloads)."""
        time.sleep(0.05)  # the registry logs after answering
        text = self.log_path.read_text(errors="replace")
        return len(re.findall(r'"' + pattern, text))

    # ---- pushing ---------------------------------------------------------------

    @property
    def _verify(self) -> str | bool:
        return str(self.tls[0]) if self.tls else True

    def _url(self, path: str) -> str:
        return f"{self.scheme}://{self.address}/v2/{path}"

    def push_blob(self, repo: str, data: bytes) -> str:
        digest = digest_of(data)
        r = requests.post(self._url(f"{repo}/blobs/uploads/"), auth=self.auth, timeout=10,
                          verify=self._verify, headers=self.push_headers)
        if r.status_code != 202:
            raise RegistryError(f"upload start: HTTP {r.status_code} {r.text[:200]}")
        location = r.headers["Location"]
        if location.startswith("/"):
            location = f"{self.scheme}://{self.address}{location}"
        sep = "&" if "?" in location else "?"
        r = requests.put(f"{location}{sep}digest={digest}", data=data, auth=self.auth,
                         headers={"Content-Type": "application/octet-stream",
                                  **self.push_headers}, timeout=10,
                         verify=self._verify)
        if r.status_code != 201:
            raise RegistryError(f"upload: HTTP {r.status_code} {r.text[:200]}")
        return digest

    def push_manifest(self, repo: str, tag: str, manifest: dict[str, Any] | bytes,
                      media_type: str = OCI_MANIFEST) -> str:
        body = manifest if isinstance(manifest, bytes) else json.dumps(manifest).encode()
        r = requests.put(self._url(f"{repo}/manifests/{tag}"), data=body, auth=self.auth,
                         headers={"Content-Type": media_type, **self.push_headers},
                         timeout=10,
                         verify=self._verify)
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
        config: bytes = b"{}\n",
        layer_media_type: str = LAYER_TAR,
        title: str = "seccomp.json",
        layers: int = 1,
        annotations: dict[str, str] | None = None,
    ) -> str:
        """The CRI-O blog's artifact shape by default; returns the manifest digest."""
        config_digest = self.push_blob(repo, config)
        layer_descs = []
        for i in range(layers):
            data = profile if i == 0 else profile + b"\n" * i
            layer_descs.append({
                "mediaType": layer_media_type, "digest": self.push_blob(repo, data),
                "size": len(data),
                "annotations": {"org.opencontainers.image.title": title},
            })
        manifest: dict[str, Any] = {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config_media_type, "digest": config_digest,
                       "size": len(config)},
            "layers": layer_descs,
        }
        if annotations:
            manifest["annotations"] = annotations
        return self.push_manifest(repo, tag, manifest)

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

    def push_with_oras(self, repo: str, tag: str, profile: bytes) -> str:
        """Push the way users do, with oras-py; returns the manifest digest."""
        import oras.client

        workdir = Path(tempfile.mkdtemp(prefix="oras-push-"))
        cwd = os.getcwd()
        try:
            (workdir / "seccomp.json").write_bytes(profile)
            (workdir / "config.json").write_bytes(b"{}\n")
            os.chdir(workdir)
            client = oras.client.OrasClient(hostname=self.address, insecure=True)
            client.push(
                target=f"{self.address}/{repo}:{tag}",
                files=["seccomp.json"],
                # "path:mediatype" is parsed here; config_path= is not (oras-py pitfall)
                manifest_config=f"config.json:{SECCOMP_CONFIG}",
                disable_path_validation=True,
            )
        finally:
            os.chdir(cwd)
            shutil.rmtree(workdir, ignore_errors=True)
        r = requests.head(self._url(f"{repo}/manifests/{tag}"),
                          headers={"Accept": OCI_MANIFEST}, timeout=10)
        return str(r.headers["Docker-Content-Digest"])
