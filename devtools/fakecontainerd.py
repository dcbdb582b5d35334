"""A containerd stand-in: its images and content gRPC services, from our own proto, on a
unix socket. Tests build manifests and indexes with :class:`FakeContainerd` (blobs are
files, the image table is a JSON file re-read on every call) and count the calls the
plugin made in the server's call log.

    python -m devtools.fakecontainerd --root DIR --socket PATH [--namespace k8s.io]
                                      [--no-events]

Events/Subscribe streams the image events the test side publishes (``tag`` appends
``/images/create`` or ``/images/update`` to ``events.jsonl``), from the moment of the
subscription on, filtered as containerd filters them (``namespace==…``,
``topic~=…``); ``drop_event_streams`` ends every open stream and may refuse new ones
(UNAVAILABLE) until ``allow_event_streams``. ``--no-events`` serves no events service
(UNIMPLEMENTED), as a containerd proxy that forwards images and content only might.
Subscriptions are logged in ``subscriptions.log``, not in the call log.

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
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import any_pb2

from nri_seccomp.containerd.pb import (
    content_pb2,
    content_pb2_grpc,
    descriptor_pb2,
    events_pb2,
    events_pb2_grpc,
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
#: seconds between two looks at the event file by an open stream
EVENT_POLL = 0.01
IMAGE_EVENTS = {"/images/create": events_pb2.ImageCreate,
                "/images/update": events_pb2.ImageUpdate,
                "/images/delete": events_pb2.ImageDelete}


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


_CLAUSE = re.compile(r'^(namespace|topic)(==|~=)"?(.*?)"?$')


def _matches(filters: list[str], namespace: str, topic: str) -> bool:
    """containerd's filter semantics, for the fields events have: filters are OR-ed,
    the comma-separated clauses of one are AND-ed; ``~=`` is a regular expression."""
    if not filters:
        return True
    for one in filters:
        fields = {"namespace": namespace, "topic": topic}
        ok = True
        for clause in one.split(","):
            m = _CLAUSE.match(clause.strip())
            if m is None:
                ok = False
                break
            key, op, value = m.groups()
            ok = fields[key] == value if op == "==" else re.search(value, fields[key]) is not None
            if not ok:
                break
        if ok:
            return True
    return False


class Events(events_pb2_grpc.EventsServicer):
    def __init__(self, state: _State) -> None:
        self.state = state

    def Subscribe(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        root = self.state.root
        with self.state.lock, (root / "subscriptions.log").open("a") as f:
            f.write(";".join(request.filters) + "\n")
        if (root / "events.refuse").exists():
            context.abort(grpc.StatusCode.UNAVAILABLE, "events refused by the test")
        generation = _read_int(root / "events.generation")
        path = root / "events.jsonl"
        # only what is published from now on, as containerd's exchange delivers
        offset = path.stat().st_size if path.exists() else 0
        while context.is_active() and _read_int(root / "events.generation") == generation:
            if path.exists() and path.stat().st_size > offset:
                with path.open("rb") as f:
                    f.seek(offset)
                    data = f.read()
                complete = data[:data.rfind(b"\n") + 1]
                offset += len(complete)
                for line in complete.splitlines():
                    event = json.loads(line)
                    if _matches(list(request.filters), event["namespace"], event["topic"]):
                        yield _envelope(event)
            time.sleep(EVENT_POLL)


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text() or 0)
    except FileNotFoundError:
        return 0


def _envelope(event: dict[str, Any]) -> Any:
    if "raw" in event:  # a malformed event, as the test wrote it
        value = bytes.fromhex(event["raw"])
    else:
        value = IMAGE_EVENTS[event["topic"]](name=event["name"]).SerializeToString()
    type_url = "containerd.events." + event["topic"].rsplit("/", 1)[-1].capitalize()
    return events_pb2.Envelope(namespace=event["namespace"], topic=event["topic"],
                               event=any_pb2.Any(type_url=type_url, value=value))


def serve(root: Path, socket: str, namespace: str, events: bool = True) -> None:
    state = _State(root, namespace)
    # each open event stream holds a worker
    server = grpc.server(futures.ThreadPoolExecutor(16))
    if events:
        events_pb2_grpc.add_EventsServicer_to_server(  # type: ignore[no-untyped-call]
            Events(state), server)
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
    parser.add_argument("--no-events", action="store_true",
                        help="serve no events service (UNIMPLEMENTED)")
    args = parser.parse_args()
    serve(Path(args.root), args.socket, args.namespace, events=not args.no_events)


# ---- the test side -------------------------------------------------------------------


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class FakeContainerd:
    """The server as a subprocess; blobs and images written by the test."""

    def __init__(self, root: Path, namespace: str = "k8s.io", events: bool = True) -> None:
        self.root = root
        self.namespace = namespace
        self.events = events
        (root / "blobs").mkdir(parents=True, exist_ok=True)
        # a short path: sun_path holds 108 bytes
        self.socket = str(root / "c.sock")
        self._process: subprocess.Popen[bytes] | None = None

    def start(self) -> FakeContainerd:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        self._process = subprocess.Popen(
            [sys.executable, "-m", "devtools.fakecontainerd", "--root", str(self.root),
             "--socket", self.socket, "--namespace", self.namespace]
            + ([] if self.events else ["--no-events"]),
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
        topic = "/images/update" if name in images else "/images/create"
        images[name] = {"mediaType": media_type, "digest": digest, "size": size}
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(images))
        tmp.replace(path)
        # after the record, as containerd publishes once the change is committed
        self.publish(topic, name)

    def untag(self, name: str) -> None:
        """Delete image record ``name`` (``/images/delete``)."""
        path = self.root / "images.json"
        images = json.loads(path.read_text()) if path.exists() else {}
        images.pop(name, None)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(images))
        tmp.replace(path)
        self.publish("/images/delete", name)

    # ---- events ----

    def publish(self, topic: str, name: str = "", raw: bytes | None = None,
                namespace: str | None = None) -> None:
        """An event on every open stream; ``raw`` is the Any's value as is (malformed)."""
        event: dict[str, Any] = {"namespace": namespace or self.namespace, "topic": topic,
                                 "name": name}
        if raw is not None:
            event["raw"] = raw.hex()
        with (self.root / "events.jsonl").open("a") as f:
            f.write(json.dumps(event) + "\n")

    def drop_event_streams(self, refuse: bool = False) -> None:
        """End every open event stream (as a containerd restart does); with ``refuse``,
        new subscriptions fail (UNAVAILABLE) until ``allow_event_streams``."""
        if refuse:
            (self.root / "events.refuse").touch()
        path = self.root / "events.generation"
        generation = int(path.read_text()) if path.exists() else 0
        path.write_text(str(generation + 1))

    def allow_event_streams(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / "events.refuse").unlink()

    def subscriptions(self) -> list[str]:
        """The filters of every Events/Subscribe received, one line each."""
        try:
            return (self.root / "subscriptions.log").read_text().splitlines()
        except FileNotFoundError:
            return []

    # ---- what the plugin asked ----

    def calls(self) -> list[str]:
        try:
            return (self.root / "calls.log").read_text().splitlines()
        except FileNotFoundError:
            return []


if __name__ == "__main__":
    main()
