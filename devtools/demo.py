"""``make demo``: the whole product on one machine, with nothing but Debian packages.

1. starts a real registry (Debian's docker-registry) on 127.0.0.1;
2. pushes the embedded sample profile as a seccomp OCI artifact, shaped as in
   CRI-O's blog (config ``{}``, layer ``seccomp.json``);
3. starts the plugin the way containerd starts a pre-installed plugin (socket on
   fd 3, NRI_PLUGIN_* environment) with the project's runtime driver;
4. creates a sample annotated pod's container and prints the ``linux.seccomp``
   that the runtime would put in its spec, for containerd 2.3 and for 2.2.4.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from devtools import driver
from devtools.registry import LocalRegistry
from nri_seccomp.decide.resolver import KEY_V1
from nri_seccomp.nri.pb import nri_pb2


def sample_profile() -> bytes:
    return (Path(__file__).resolve().parent / "samples" / "demo-profile.json").read_bytes()


def sample_pod(ref: str, image: str) -> tuple[nri_pb2.PodSandbox, nri_pb2.Container]:
    pod = nri_pb2.PodSandbox(
        id="demo-pod-id", name="seccomp-demo", namespace="default", uid="demo-uid",
        annotations={f"{KEY_V1}/POD": ref},
    )
    container = nri_pb2.Container(
        id="demo-container-id", pod_sandbox_id=pod.id, name="app",
        annotations={"io.kubernetes.cri.image-name": image},
    )
    container.linux.seccomp_profile.profile_type = nri_pb2.SecurityProfile.UNCONFINED
    return pod, container


async def run_demo(
    version: str, ref: str, image: str, config: str, out: dict[str, object]
) -> None:
    runtime = driver.RuntimeVersion.containerd(version)
    conn = await driver.spawn_plugin(
        driver.plugin_command(), runtime=runtime, config=config, stderr=None
    )
    try:
        await conn.handshake()
        pod, container = sample_pod(ref, image)
        await conn.run_pod_sandbox(pod)
        result = await conn.create_container(pod, container)
        if result.error is not None and "still being fetched" in result.error.message:
            # what the kubelet does: retry the creation
            await asyncio.sleep(0.5)
            result = await conn.create_container(pod, container)
        entry: dict[str, object] = {"latency_ms": round(result.latency * 1000, 2)}
        if result.error is not None:
            entry["container creation fails"] = result.error.message
        elif result.fatal is not None:
            entry["plugin closed"] = result.fatal
        elif result.seccomp is None:
            entry["linux.seccomp"] = None
        else:
            entry["linux.seccomp"] = driver.effective_seccomp(runtime, result.seccomp)
        out[f"containerd {version}"] = entry
    finally:
        await conn.wait_closed()


def render(out: dict[str, object]) -> str:
    """JSON, with each seccomp rule on one line and long name lists shortened."""
    lines = ["{"]
    for i, (key, value) in enumerate(out.items()):
        comma = "," if i < len(out) - 1 else ""
        if isinstance(value, dict) and isinstance(value.get("linux.seccomp"), dict):
            spec = dict(value["linux.seccomp"])
            rules = spec.pop("syscalls", [])
            head = {k: v for k, v in value.items() if k != "linux.seccomp"}
            lines.append(f"  {json.dumps(key)}: {{")
            for k, v in head.items():
                lines.append(f"    {json.dumps(k)}: {json.dumps(v)},")
            lines.append('    "linux.seccomp": {')
            for k, v in spec.items():
                lines.append(f"      {json.dumps(k)}: {json.dumps(v)},")
            lines.append('      "syscalls": [')
            for j, rule in enumerate(rules):
                names = rule["names"]
                if len(names) > 8:
                    rule = rule | {"names": [*names[:8], f"... {len(names) - 8} more"]}
                sep = "," if j < len(rules) - 1 else ""
                lines.append(f"        {json.dumps(rule)}{sep}")
            lines.append("      ]")
            lines.append("    }")
            lines.append(f"  }}{comma}")
        else:
            lines.append(f"  {json.dumps(key)}: {json.dumps(value)}{comma}")
    lines.append("}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, help="a seccomp JSON profile to push instead "
                        "of the embedded sample")
    args = parser.parse_args(argv)
    data = args.profile.read_bytes() if args.profile else sample_profile()
    with tempfile.TemporaryDirectory(prefix="nri-seccomp-demo-") as tmp, LocalRegistry() as reg:
        manifest_digest = reg.push_profile("demo/seccomp", "v1", data)
        ref = f"{reg.address}/demo/seccomp:v1"
        reg.push_image("demo/app", "1.0", {"org.opencontainers.image.title": "demo app"})
        image = f"{reg.address}/demo/app:1.0"
        print(f"registry: {reg.address}; pushed {ref} ({manifest_digest}, {len(data)} bytes)",
              file=sys.stderr)
        config = (
            f"cache_dir: {tmp}/cache\n"
            f"registry: {{insecure: [{reg.address}], allowed: ['{reg.address}/*']}}\n"
        )
        out: dict[str, object] = {"pod annotation": {f"{KEY_V1}/POD": ref}}
        for version in ("v2.3.0", "v2.2.4"):
            asyncio.run(run_demo(version, ref, image, config, out))
    print(render(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
