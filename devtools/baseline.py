"""A minimal plugin on the same transport: answers every CreateContainer with an empty
adjustment. It is the benchmarks' baseline and the transport tests' subject.

``python -m devtools.baseline`` takes the plugin's own command line (``--socket``,
``--name``, ``--idx``): the same start-up, stub and transport, and no seccomp work.
"""

from __future__ import annotations

from collections.abc import Sequence

from nri_seccomp import cli
from nri_seccomp.nri.pb import nri_pb2


class EmptyPlugin:
    def __init__(self) -> None:
        self.synchronized: tuple[int, int] | None = None

    async def synchronize(
        self, pods: list[nri_pb2.PodSandbox], containers: list[nri_pb2.Container]
    ) -> list[nri_pb2.ContainerUpdate]:
        self.synchronized = (len(pods), len(containers))
        return []

    async def create_container(
        self, pod: nri_pb2.PodSandbox, container: nri_pb2.Container, deadline: float
    ) -> nri_pb2.ContainerAdjustment | None:
        return None


def main(argv: Sequence[str] | None = None) -> int:
    return cli.main(argv, plugin_factory=lambda _args: EmptyPlugin())


if __name__ == "__main__":
    raise SystemExit(main())
