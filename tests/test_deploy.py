"""deploy/ (kustomize) checked offline: every manifest loads into the official Kubernetes
Python client's models and round-trips unchanged (a misspelt or misplaced field shows),
the kustomization lists exactly the files present, `kubectl kustomize` output equals the
committed deploy/rendered.yaml, and the settings that must agree across files do."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from devtools import image
from nri_seccomp import config

kubernetes = pytest.importorskip("kubernetes")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
#: apiVersion/kind → the client's model
MODELS = {
    ("v1", "Namespace"): "V1Namespace",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("apps/v1", "DaemonSet"): "V1DaemonSet",
}
#: the validator's TOML keys (containerd/nri plugins/default-validator/default-validator.go)
VALIDATOR_KEYS = {
    "enable", "reject_oci_hook_adjustment", "reject_runtime_default_seccomp_adjustment",
    "reject_unconfined_seccomp_adjustment", "reject_custom_seccomp_adjustment",
    "reject_namespace_adjustment", "reject_sysctl_adjustment", "required_plugins",
    "tolerate_missing_plugins_annotation",
}
#: containerd's NRI keys (internal/nri/config.go)
NRI_KEYS = {
    "disable", "socket_path", "plugin_path", "plugin_config_path",
    "plugin_registration_timeout", "plugin_request_timeout", "disable_connections",
    "default_validator",
}
NRI_PLUGIN = "io.containerd.nri.v1.nri"


def kustomization() -> dict[str, Any]:
    data = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    assert isinstance(data, dict)
    return data


def documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def resources() -> list[dict[str, Any]]:
    return [d for name in kustomization()["resources"] for d in documents(DEPLOY / name)]


def differences(want: Any, got: Any, where: str = "") -> list[str]:
    """Where the round trip lost or changed something: the input's path to it."""
    if isinstance(want, dict) and isinstance(got, dict):
        out = [f"{where}.{k}: not a field of the API type" for k in want if k not in got]
        out += [f"{where}.{k}: added" for k in got if k not in want]
        for k in want.keys() & got.keys():
            out += differences(want[k], got[k], f"{where}.{k}")
        return out
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [d for i, (w, g) in enumerate(zip(want, got, strict=True))
                for d in differences(w, g, f"{where}[{i}]")]
    return [] if want == got else [f"{where}: {want!r} became {got!r}"]


def round_trip(doc: dict[str, Any]) -> list[str]:
    api = kubernetes.client.ApiClient()
    model = MODELS[(doc["apiVersion"], doc["kind"])]
    obj = api._ApiClient__deserialize(doc, model)
    assert type(obj).__name__ == model
    return differences(doc, api.sanitize_for_serialization(obj))


def test_kustomization_lists_exactly_the_manifests() -> None:
    listed = set(kustomization()["resources"])
    present = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml", "rendered.yaml"}
    assert listed == present
    for name in listed:
        assert documents(DEPLOY / name), name


@pytest.mark.parametrize("name", sorted(
    p.name for p in DEPLOY.glob("*.yaml") if p.name != "kustomization.yaml"))
def test_manifest_matches_the_api_types(name: str) -> None:
    for doc in documents(DEPLOY / name):
        assert round_trip(doc) == []


def test_round_trip_shows_a_misspelt_field() -> None:
    """The check itself: a misspelt field, and one at the wrong level, are reported."""
    ds = next(d for d in resources() if d["kind"] == "DaemonSet")
    ds["spec"]["template"]["spec"]["priorityClasName"] = "system-node-critical"
    ds["spec"]["template"]["spec"]["containers"][0]["readOnlyRootFilesystem"] = True
    assert sorted(round_trip(ds)) == [
        ".spec.template.spec.containers[0].readOnlyRootFilesystem: not a field of the API type",
        ".spec.template.spec.priorityClasName: not a field of the API type",
    ]


def test_round_trip_refuses_a_missing_required_field() -> None:
    ds = next(d for d in resources() if d["kind"] == "DaemonSet")
    del ds["spec"]["template"]["spec"]["containers"][0]["name"]
    with pytest.raises(ValueError, match="name"):
        round_trip(ds)


def kustomize(directory: Path) -> str:
    """`kustomize build` or `kubectl kustomize` (kustomize built into kubectl) output."""
    kubectl = shutil.which("kubectl")
    kustomize_bin = shutil.which("kustomize")
    if kustomize_bin:
        cmd = [kustomize_bin, "build", str(directory)]
    elif kubectl:
        cmd = [kubectl, "kustomize", str(directory)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=60).stdout


def test_kustomize_output_is_committed() -> None:
    """`kubectl kustomize deploy` (kustomize built into kubectl) gives deploy/rendered.yaml;
    regenerate it with `kubectl kustomize deploy > deploy/rendered.yaml`."""
    assert kustomize(DEPLOY) == (DEPLOY / "rendered.yaml").read_text()


def test_rendered_resources() -> None:
    rendered = documents(DEPLOY / "rendered.yaml")
    assert {(d["kind"], d["metadata"]["name"]) for d in rendered} == {
        ("Namespace", "nri-seccomp"), ("ConfigMap", "nri-seccomp-config"),
        ("DaemonSet", "nri-seccomp"),
    }
    for doc in rendered:
        assert round_trip(doc) == []
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "nri-seccomp"


def test_daemonset_settings() -> None:
    ds = next(d for d in resources() if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # the image `make image` builds, its default arguments spelt out
    assert container["image"] == image.reference()
    assert container["args"] == image.CMD == [
        "--external", "--socket", "/var/run/nri/nri.sock", "--config",
        "/etc/nri-seccomp/config.yaml", "--ready-file", "/run/nri-seccomp/ready",
    ]
    # the image runs as 65532 by default; NRI's socket is root's (tests/test_image.py)
    assert pod["securityContext"]["runAsUser"] == 0 != image.USER
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["exec"]["command"] == ["test", "-f", "/run/nri-seccomp/ready"]
    assert pod["priorityClassName"] == "system-node-critical"
    assert {"operator": "Exists"} in pod["tolerations"]
    assert set(container["resources"]) == {"requests", "limits"}
    sc = container["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    # every path the plugin uses is on a volume
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(mounts.values()) == set(volumes)
    assert volumes[mounts["/var/run/nri"]]["hostPath"]["path"] == "/var/run/nri"
    assert volumes[mounts["/run/containerd"]]["hostPath"]["path"] == "/run/containerd"
    assert volumes[mounts["/var/lib/nri-seccomp"]]["hostPath"]["path"] == "/var/lib/nri-seccomp"
    assert "/run/nri-seccomp" in mounts and "/etc/nri-seccomp" in mounts


def test_configmap_is_a_valid_plugin_configuration() -> None:
    cm = next(d for d in resources() if d["kind"] == "ConfigMap")
    cfg = config.load(cm["data"]["config.yaml"], "deploy/configmap.yaml")
    assert cfg.cache_dir.startswith("/var/lib/nri-seccomp/")
    assert cfg.containerd_socket == "/run/containerd/containerd.sock"
    assert cfg.image_annotations_on_error == "refuse"
    assert cfg.registry.allowed
    ds = next(d for d in resources() if d["kind"] == "DaemonSet")
    (volume,) = [v for v in ds["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == cm["metadata"]["name"]


def nri_section(text: str) -> dict[str, Any]:
    section = tomllib.loads(text)["plugins"][NRI_PLUGIN]
    assert isinstance(section, dict)
    assert set(section) <= NRI_KEYS
    assert set(section.get("default_validator", {})) <= VALIDATOR_KEYS
    return section


def test_validator_drop_in_and_the_pod_annotation_agree() -> None:
    """The key the validator reads is a setting; the DaemonSet's pod must carry that key
    with a true value, or its container is refused while required_plugins names it."""
    validator = nri_section((DEPLOY / "containerd-nri-validator.toml").read_text())[
        "default_validator"]
    assert validator["enable"] is True
    assert "seccomp-oci" in validator["required_plugins"]
    key = validator["tolerate_missing_plugins_annotation"]
    ds = next(d for d in resources() if d["kind"] == "DaemonSet")
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations[key] == "true"


def test_kind_config_patches() -> None:
    """config/kind.yaml: containerd 2.x keys only, in patches kind applies to its version-2
    node config (a patch naming another version is skipped silently)."""
    kind = yaml.safe_load((ROOT / "config" / "kind.yaml").read_text())
    assert kind["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    text = (ROOT / "config" / "kind.yaml").read_text()
    assert "io.containerd.grpc.v1.nri" not in text
    assert "python3" not in text
    patches = [tomllib.loads(p) for p in kind["containerdConfigPatches"]]
    for patch in patches:
        assert patch.get("version", 2) == 2
    (nri,) = [p for p in kind["containerdConfigPatches"] if NRI_PLUGIN in p]
    section = nri_section(nri)
    assert section["disable"] is False
    validator = section["default_validator"]
    assert validator["enable"] is True
    # kind's config patch runs before kubeadm init: a global requirement would stop the
    # control-plane static pods and kindnet; workloads ask for the plugin themselves
    assert "required_plugins" not in validator
    ds = next(d for d in resources() if d["kind"] == "DaemonSet")
    assert validator["tolerate_missing_plugins_annotation"] in (
        ds["spec"]["template"]["metadata"]["annotations"])


def mounts_and_volumes(ds: dict[str, Any]) -> tuple[dict[str, dict[str, Any]],
                                                    dict[str, dict[str, Any]]]:
    pod = ds["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    return ({m["mountPath"]: m for m in container["volumeMounts"]},
            {v["name"]: v for v in pod["volumes"]})


def test_host_paths_are_read_only_but_the_cache() -> None:
    ds = next(d for d in resources() if d["kind"] == "DaemonSet")
    mounts, volumes = mounts_and_volumes(ds)
    for path, mount in mounts.items():
        if "hostPath" in volumes[mount["name"]] and path != "/var/lib/nri-seccomp":
            assert mount.get("readOnly") is True, path


def test_node_registry_hosts_are_mounted_where_the_configuration_reads_them() -> None:
    """containerd's hosts.toml tree: a read-only hostPath at the same path, the path the
    ConfigMap's registry.config_path names. DirectoryOrCreate: the pod starts on a node
    without the tree (see daemonset.yaml)."""
    ds = next(d for d in resources() if d["kind"] == "DaemonSet")
    mounts, volumes = mounts_and_volumes(ds)
    mount = mounts["/etc/containerd/certs.d"]
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["hostPath"] == {"path": "/etc/containerd/certs.d",
                                                  "type": "DirectoryOrCreate"}
    cm = next(d for d in resources() if d["kind"] == "ConfigMap")
    cfg = config.load(cm["data"]["config.yaml"], "deploy/configmap.yaml")
    assert cfg.registry.config_path == ("/etc/containerd/certs.d",)
    assert all(p in mounts for p in cfg.registry.config_path)
    # no credentials in the base: a node without them must still start the plugin
    assert cfg.registry.docker_config is None


COMPONENT = DEPLOY / "components" / "node-credentials"
KUBELET_CREDENTIALS = "/var/lib/kubelet/config.json"


def test_node_credentials_component(tmp_path: Path) -> None:
    """deploy/ with the node-credentials Component, built as a user's overlay outside
    deploy/ would build it: the kubelet's credentials file mounted read-only at its own
    path (type File: never created on a node), registry.docker_config naming it, the
    configuration otherwise the base's."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    base = os.path.relpath(DEPLOY, overlay)
    (overlay / "kustomization.yaml").write_text(
        f"resources: [{base}]\ncomponents: [{base}/components/node-credentials]\n")
    rendered = [d for d in yaml.safe_load_all(kustomize(overlay)) if d is not None]
    for doc in rendered:
        assert round_trip(doc) == []
    ds = next(d for d in rendered if d["kind"] == "DaemonSet")
    mounts, volumes = mounts_and_volumes(ds)
    mount = mounts[KUBELET_CREDENTIALS]
    assert mount["readOnly"] is True
    assert volumes[mount["name"]]["hostPath"] == {"path": KUBELET_CREDENTIALS, "type": "File"}
    base_mounts, _ = mounts_and_volumes(next(d for d in resources() if d["kind"] == "DaemonSet"))
    assert set(mounts) == set(base_mounts) | {KUBELET_CREDENTIALS}
    cm = next(d for d in rendered if d["kind"] == "ConfigMap")
    cfg = config.load(cm["data"]["config.yaml"], "node-credentials")
    assert cfg.registry.docker_config == KUBELET_CREDENTIALS
    assert set(cfg.registry.config_path) <= set(mounts)
    base_cm = next(d for d in resources() if d["kind"] == "ConfigMap")
    base_cfg = config.load(base_cm["data"]["config.yaml"], "deploy/configmap.yaml")
    assert dataclasses.replace(cfg, registry=dataclasses.replace(
        cfg.registry, docker_config=None)) == base_cfg
