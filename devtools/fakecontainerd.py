"""A containerd stand-in: its images and content gRPC services, from our own proto, on a
unix socket. Tests build manifests and indexes with :class:`FakeContainerd` (blobs are
files, the image table is a JSON file re-read on every call) and count the calls the
plugin made in the server's call log.

    python -m devtools.fakecontainerd --root DIR --socket PATH [--namespace k8s.io]

Like containerd: a call without ``containerd-namespace`` metadata fails
(FAILED_PRECONDITION), an image or blob of another namespace is NOT_FOUND, and
Content/Read clamps a size past the end of the blob and streams the data in
several messages.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from nri_seccomp.containerd.pb import (
    content_pb2,
    content_pb2_grpc,
    descriptor_pb2,
    images_pb2,
    images_pb2_grpc,
)

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
#: bytes per ReadContentResponse: small, so that reads take several messages
CHUNK = 256
#: seconds Images/Get holds an image whose repository has a "hang" component
HANG = 10.0


class _State:
    def __init__(self, root: Path, namespace: str) -> None:
        self.root = root
        self.namespace = namespace
        self.lock = threading.Lock()

    def log(self, line: str) -> None:
        with self.lock, (self.root / "calls.log").open("a") as f:
            f.write(line + "\n")

    def images(self) -> dict[str, dict[str, Any]]:
        try:
            data: dict[str, dict[str, Any]] = json.loads((self.root / "images.json").read_text())
        except FileNotFoundError:
            return {}
        return data

    def blob(self, digest: str) -> bytes | None:
        algo, _, hexpart = digest.partition(":")
        if algo != "sha256" or not hexpart.isalnum():
            return None
        try:
            return (self.root / "blobs" / hexpart).read_bytes()
        except FileNotFoundError:
            return None

    def check_namespace(self, context: grpc.ServicerContext) -> bool:
        ns = dict(context.invocation_metadata()).get("containerd-namespace")
        if not ns:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          "namespace is required: failed precondition")
        return ns == self.namespace


class Images(images_pb2_grpc.ImagesServicer):
    def __init__(self, state: _State) -> None:
        self.state = state

    def Get(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.state.log(f"Images/Get {request.name}")
        if "/hang/" in request.name:  # a containerd that never answers this one
            time.sleep(HANG)
        found = self.state.images().get(request.name) if self.state.check_namespace(
            context) else None
        if found is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"image \"{request.name}\": not found")
        assert found is not None  # abort raised
        return images_pb2.GetImageResponse(image=_image(request.name, found))

    def List(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.state.log(f"Images/List {','.join(request.filters)}")
        images = self.state.images() if self.state.check_namespace(context) else {}
        return images_pb2.ListImagesResponse(
            images=[_image(name, d) for name, d in images.items()])


def _image(name: str, target: dict[str, Any]) -> Any:
    return images_pb2.Image(name=name, target=descriptor_pb2.Descriptor(
        media_type=target["mediaType"], digest=target["digest"], size=target["size"]))


class Content(content_pb2_grpc.ContentServicer):
    def __init__(self, state: _State) -> None:
        self.state = state

    def Info(self, request: Any, context: grpc.ServicerContext) -> Any:
        self.state.log(f"Content/Info {request.digest}")
        data = self.state.blob(request.digest) if self.state.check_namespace(context) else None
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"content digest {request.digest}: "
                          "not found")
        assert data is not None  # abort raised
        return content_pb2.InfoResponse(info=content_pb2.Info(digest=request.digest,
                                                              size=len(data)))

    def Read(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        self.state.log(f"Content/Read {request.digest}")
        data = self.state.blob(request.digest) if self.state.check_namespace(context) else None
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"content digest {request.digest}: "
                          "not found")
        assert data is not None  # abort raised
        offset = max(request.offset, 0)
        size = request.size
        if size <= 0 or offset + size > len(data):
            size = len(data) - offset
        end = offset + size
        while offset < end:
            piece = data[offset:min(offset + CHUNK, end)]
            yield content_pb2.ReadContentResponse(offset=offset, data=piece)
            offset += len(piece)


def serve(root: Path, socket: str, namespace: str) -> None:
    state = _State(root, namespace)
    server = grpc.server(futures.ThreadPoolExecutor(4))
    images_pb2_grpc.add_ImagesServicer_to_server(  # type: ignore[no-untyped-call]
        Images(state), server)
    content_pb2_grpc.add_ContentServicer_to_server(  # type: ignore[no-untyped-call]
        Content(state), server)
    server.add_insecure_port(f"unix:{socket}")
    server.start()
    print("ready", flush=True)
    server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--socket", required=True)
    parser.add_argument("--namespace", default="k8s.io")
    args = parser.parse_args()
    serve(Path(args.root), args.socket, args.namespace)


# ---- the test side -------------------------------------------------------------------


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeContainerd:
    """The server as a subprocess; blobs and images written by the test."""

    def __init__(self, root: Path, namespace: str = "k8s.io") -> None:
        self.root = root
        self.namespace = namespace
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        # a short path: sun_path holds 108 bytes
        self.socket = str(root / "c.sock")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> FakeContainerd:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "devtools.fakecontainerd", "--root", str(self.root),
             "--socket", self.socket, "--namespace", self.namespace],
            stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parent.parent)
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if line.strip() != b"ready":
            self.stop()
            raise RuntimeError("fake containerd did not start")
        deadline = time.monotonic() + 5
        while not os.path.exists(self.socket) and time.monotonic() < deadline:
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            if self._process.stdout is not None:
                self._process.stdout.close()
            self._process = None

    def __enter__(self) -> FakeContainerd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- content ----

    def add_blob(self, data: bytes) -> str:
        digest = digest_of(data)
        (self.root / "blobs" / digest.split(":", 1)[1]).write_bytes(data)
        return digest

    @staticmethod
    def _config(seed: str) -> bytes:
        return json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()

    @classmethod
    def image_id(cls, seed: str = "") -> str:
        """The image ID (config digest) of the manifests add_manifest makes with ``seed``:
        manifests of one seed share it, whatever their annotations."""
        return digest_of(cls._config(seed))

    def add_manifest(self, annotations: dict[str, str] | None = None,
                     seed: str = "") -> tuple[str, int]:
        """An image manifest (config and layer descriptors only, as pulled); digest, size."""
        config = self.add_blob(self._config(seed))
        body: dict[str, Any] = {
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config, "size": 1},
            "layers": [{"mediaType": OCI_LAYER, "digest": digest_of(seed.encode()),
                        "size": len(seed)}],
        }
        if annotations is not None:
            body["annotations"] = annotations
        raw = json.dumps(body).encode()
        return self.add_blob(raw), len(raw)

    def add_index(self, entries: list[tuple[str, int, dict[str, str]]],
                  annotations: dict[str, str] | None = None) -> tuple[str, int]:
        """An image index of (digest, size, platform) entries; digest, size."""
        body: dict[str, Any] = {
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": d, "size": s, "platform": p}
                          for d, s, p in entries],
        }
        if annotations is not None:
            body["annotations"] = annotations
        raw = json.dumps(body).encode()
        return self.add_blob(raw), len(raw)

    def tag(self, name: str, digest: str, size: int, media_type: str = OCI_MANIFEST) -> None:
        """Record image ``name`` (as containerd stores it) with this target."""
        path = self.root / "images.json"
        images = json.loads(path.read_text()) if path.exists() else {}
        images[name] = {"mediaType": media_type, "digest": digest, "size": size}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(images))
        tmp.replace(path)

    # ---- what the plugin asked ----

    def calls(self) -> list[str]:
        try:
            return (self.root / "calls.log").read_text().splitlines()
        except FileNotFoundError:
            return []


if __name__ == "__main__":
    main()
