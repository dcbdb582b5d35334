"""A minimal plugin on the same transport: answers every CreateContainer with an empty
adjustment. It is the benchmarks' baseline and the transport tests' subject."""

from __future__ import annotations

from nri_seccomp import ttrpc
from nri_seccomp.pb import nri_pb2


class EmptyPlugin:
    def __init__(self) -> None:
        self.synchronized: tuple[int, int] | None = None

    async def synchronize(
        self, pods: list[nri_pb2.PodSandbox], containers: list[nri_pb2.Container]
    ) -> list[nri_pb2.ContainerUpdate]:
        self.synchronized = (len(pods), len(containers))
        return []

    async def create_container(
        self, pod: nri_pb2.PodSandbox, container: nri_pb2.Container, call: ttrpc.Call
    ) -> nri_pb2.CreateContainerResponse:
        return nri_pb2.CreateContainerResponse()
