"""The PyInstaller bundle (`make bundle`) in a root that holds nothing but the bundle and
the C library files it links to: no Python, no libseccomp of the system, no ldconfig.

It runs there with chroot(8) as a pre-installed plugin (fd 3 survives the chroot),
registers, and answers CreateContainer with a profile from a registry on 127.0.0.1
(the chroot shares the network). The profile is compiled in the workers' fork
server, so this also proves the frozen forkserver start method works.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import pytest

from devtools import driver
from devtools.image import needed_libraries
from devtools.registry import LocalRegistry

from . import deploy_scenario as scenario
from .plugin_harness import run

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                       reason="chroot and mounts need root, and unshare(1)"),
]

def make_root(bundle: Path, root: Path) -> set[str]:
    shutil.copytree(bundle, root / "bundle", symlinks=True)
    libs = needed_libraries(bundle)
    for lib in libs:
        target = root / lib.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(Path(lib).resolve(), target)
    # /lib64 -> usr/lib64 style links are not needed: copies sit at the paths ldd named
    (root / "tmp").mkdir(mode=0o1777)
    (root / "dev/shm").mkdir(parents=True)
    (root / "dev/null").touch()
    (root / "dev/urandom").touch()
    (root / "proc").mkdir()
    return libs


def in_root(root: Path) -> list[str]:
    """chroot into ``root`` with what every node (and container) has: /proc (glibc's
    fchmodat without following links reads /proc/self/fd), /dev/shm (multiprocessing's
    semaphores, which the worker pool uses, live there), /dev/null and /dev/urandom
    (gRPC's seed, once the containerd client connects); mounted in a private mount
    namespace, so they go away with the process."""
    return ["unshare", "-m", "--propagation", "private", "sh", "-c",
            f'mount -t tmpfs -o mode=1777 shm "{root}/dev/shm" && '
            f'mount --bind /dev/null "{root}/dev/null" && '
            f'mount --bind /dev/urandom "{root}/dev/urandom" && '
            f'mount -t proc proc "{root}/proc" && '
            f'exec chroot "{root}" /bundle/nri-seccomp']


def test_bundle_in_a_root_without_python(bundle: Path, tmp_path: Path,
                                         registry: LocalRegistry) -> None:
    root = tmp_path / "root"
    libs = make_root(bundle, root)
    # only the C library and its companions come from the system (and zlib, which
    # PyInstaller's bootloader links dynamically)
    assert all(re.search(r"/(libc|libm|libdl|libpthread|librt|libutil|libz|ld-linux-x86-64)"
                         r"[.-]so", lib) for lib in libs), libs
    everything = [str(p.relative_to(root)) for p in root.rglob("*")]
    assert not any(re.search(r"(^|/)(python3(\.\d+)?|libseccomp[^/]*)$", p) and
                   not p.startswith("bundle/") for p in everything)
    assert not (root / "usr/bin").exists() and not (root / "sbin").exists()

    async def scenario_run() -> None:
        conn = await driver.spawn_plugin(
            in_root(root), env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, checkout_on_path=False,
            cwd="/", config=f"cache_dir: /cache\nregistry: {{insecure: [{registry.address}], "
            f"allowed: ['{registry.address}/*']}}\n", stderr=asyncio.subprocess.PIPE,
        )
        try:
            await scenario.registers_and_answers(conn, scenario.push(registry, "bundle/p"))
        finally:
            assert conn.process is not None and conn.process.stderr is not None
            err = asyncio.create_task(conn.process.stderr.read())
            code = await conn.wait_closed()
            log = (await err).decode()
        assert code == 0, log
        assert "applying seccomp profile" in log, log

    run(scenario_run())
    # the profile was fetched into the root's cache
    assert any((root / "cache").rglob("*"))
