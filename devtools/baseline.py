"""A minimal plugin on the same transport: answers every CreateContainer with an empty
adjustment. It is the benchmarks' baseline and the transport tests' subject.

``python -m devtools.baseline`` takes the plugin's own command line (``--socket``,
``--name``, ``--idx``): the same start-up, stub and transport, and no seccomp work.
With ``--answer-file PATH`` it answers every CreateContainer with the serialised
ContainerAdjustment in PATH instead, deciding nothing: the benchmarks' control for
what an answer of that size costs the transport, apart from the decision.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

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


class FixedPlugin(EmptyPlugin):
    """The same adjustment for every container, already serialised."""

    def __init__(self, adjustment: bytes) -> None:
        super().__init__()
        self.adjustment = adjustment

    async def create_container(  # type: ignore[override]
        self, pod: nri_pb2.PodSandbox, container: nri_pb2.Container, deadline: float
    ) -> bytes:
        return self.adjustment


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--answer-file", type=Path)
    ours, rest = parser.parse_known_args(argv)
    if ours.answer_file is None:
        return cli.main(rest, plugin_factory=lambda _args: EmptyPlugin())
    adjustment = ours.answer_file.read_bytes()
    return cli.main(rest, plugin_factory=lambda _args: FixedPlugin(adjustment))


if __name__ == "__main__":
    raise SystemExit(main())
