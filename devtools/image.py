"""`make image`: an OCI image of the PyInstaller bundle (`make bundle`) for the external
plugin mode (deploy/daemonset.yaml), written as an OCI image layout archive.

Built with umoci because it is a Debian package, needs no daemon and no registry (it
edits an OCI image layout directory in place) and can run without root. Nothing is
pulled: the image has no base. Its one layer holds

- the bundle, at /opt/nri-seccomp (its own interpreter, our package, libseccomp);
- Debian's statically linked tini (``/usr/bin/tini-static``, package tini) at
  /sbin/tini, the container's PID 1 (see ``INIT``);
- the C library files the bundle links to, at the paths ``ldd`` names (the same set
  tests/test_bundle.py's chroot holds: libc, libm, libz... and the dynamic loader);
- /usr/bin/test from coreutils (it needs nothing beyond those files): the DaemonSet's
  probes run ``test -f /run/nri-seccomp/ready`` inside the container;
- the sample configuration at /etc/nri-seccomp/config.yaml (the DaemonSet mounts its
  ConfigMap over the directory), /etc/passwd and /etc/group naming root and nonroot,
  and the directories the plugin writes (/tmp, /var/lib/nri-seccomp, /run/nri-seccomp).

The layer tar is written here (sorted, owner 0, every mtime SOURCE_DATE_EPOCH) and
added verbatim with ``umoci raw add-layer``; config and history carry the same time,
so the same bundle gives the same image digest.

The image runs as 65532 (nonroot) unless told otherwise: on containerd the NRI socket
sits in a root-only directory, so deploy/daemonset.yaml sets runAsUser 0 (see
deploy/README.md, "Security context").

index.json names the image twice: ``org.opencontainers.image.ref.name`` is the tag
(what ``skopeo copy oci-archive:FILE:TAG`` and ``umoci`` select by) and
``io.containerd.image.name`` the full name, which ``ctr images import`` (and so
``kind load image-archive``) uses as the image's name in the node's store.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent
#: the image's name, as deploy/daemonset.yaml references it (with the version as tag)
REPOSITORY = "localhost/nri-seccomp"
#: where the bundle goes; the plugin is its executable
PREFIX = "/opt/nri-seccomp"
PROGRAM = f"{PREFIX}/nri-seccomp"
#: PID 1 of the container. The plugin's compile workers are forked by multiprocessing's
#: fork server; when that server dies its workers are re-parented to PID 1, and PID 1
#: must reap them or they stay zombies. The plugin does not reap children it did not
#: start, so it must not be PID 1: tini is, with the plugin as its only child. tini
#: forwards SIGTERM (and the other signals a stop sends) to the plugin, reaps every
#: orphan and exits with the plugin's exit status. The static build, so that it needs
#: nothing beyond itself in an image without a base.
INIT_SOURCE = "/usr/bin/tini-static"
INIT = "/sbin/tini"
#: Without tini's -g: a signal goes to the plugin alone, not to its process group (the
#: fork server and the workers are in it). The plugin stops its own workers in order
#: when it is told to stop; a SIGTERM to every worker at once would kill a compile
#: mid-way and the pool would report dead workers during shutdown. Whatever is still
#: running when the plugin exits is killed by the kernel with the PID namespace, as
#: tini, its init, exits then too.
ENTRYPOINT = [INIT, "--", PROGRAM]
#: the default arguments, the same as deploy/daemonset.yaml's ``args``
CMD = ["--external", "--socket", "/var/run/nri/nri.sock",
       "--config", "/etc/nri-seccomp/config.yaml",
       "--ready-file", "/run/nri-seccomp/ready"]
USER = 65532
#: directories the plugin writes: (path, mode, owner)
WRITABLE = [("tmp", 0o1777, 0), ("var/lib/nri-seccomp", 0o750, USER),
            ("run/nri-seccomp", 0o750, USER)]
#: the probes' command (coreutils); it links to the C library only
PROBE_TOOL = "/usr/bin/test"


def version() -> str:
    with (CHECKOUT / "pyproject.toml").open("rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def reference() -> str:
    return f"{REPOSITORY}:{version()}"


#: the file of each line of ldd's output ("name => /path (0x...)" or "/path (0x...)")
LDD_PATH = re.compile(r"(?:^\s*|=> )(/\S+) \(0x", re.MULTILINE)


def needed_libraries(tree: Path) -> set[str]:
    """The system files ldd names for every ELF file of ``tree`` (outside ``tree``)."""
    tree = tree.resolve()
    out: set[str] = set()
    for path in sorted(tree.rglob("*")):
        if not path.is_file() or path.is_symlink() or path.read_bytes()[:4] != b"\x7fELF":
            continue
        # the bootloader (the top executable) is loaded by the system's loader alone;
        # what runs after it finds the bundled copies first: ldd is asked the same way
        top = path.parent == tree
        ldd = subprocess.run(["ldd", str(path)], capture_output=True, text=True,
                             env={} if top else {"LD_LIBRARY_PATH": str(tree / "_internal")})
        for lib in LDD_PATH.findall(ldd.stdout):
            if not Path(lib).resolve().is_relative_to(tree):
                out.add(lib)
    return out


def program_libraries(program: str) -> set[str]:
    ldd = subprocess.run(["ldd", program], capture_output=True, text=True, check=True)
    return set(LDD_PATH.findall(ldd.stdout))


def source_date_epoch() -> int:
    """SOURCE_DATE_EPOCH, else the last commit's time, else 0."""
    if os.environ.get("SOURCE_DATE_EPOCH"):
        return int(os.environ["SOURCE_DATE_EPOCH"])
    git = subprocess.run(["git", "-C", str(CHECKOUT), "log", "-1", "--format=%ct"],
                         capture_output=True, text=True)
    return int(git.stdout.strip()) if git.returncode == 0 and git.stdout.strip() else 0


def git_revision() -> str | None:
    """The commit, if the tree is clean (a dirty tree's image is not that commit)."""
    head = subprocess.run(["git", "-C", str(CHECKOUT), "rev-parse", "HEAD"],
                          capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(CHECKOUT), "status", "--porcelain",
                            "--untracked-files=no"], capture_output=True, text=True)
    if head.returncode or dirty.returncode or dirty.stdout.strip():
        return None
    return head.stdout.strip()


class Layer:
    """An uncompressed, reproducible tar: entries added in order, owner 0, fixed mtime."""

    def __init__(self, tar: tarfile.TarFile, mtime: int) -> None:
        self.tar = tar
        self.mtime = mtime
        self.dirs: set[str] = set()

    def _info(self, name: str, kind: bytes, mode: int, uid: int = 0) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = kind, mode, self.mtime
        info.uid = info.gid = uid
        info.uname = info.gname = ""
        return info

    def directory(self, name: str, mode: int = 0o755, uid: int = 0) -> None:
        parent = os.path.dirname(name)
        if parent and parent not in self.dirs:
            self.directory(parent)
        if name not in self.dirs:
            self.dirs.add(name)
            self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode, uid))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self.directory(os.path.dirname(name))
        info = self._info(name, tarfile.REGTYPE, mode)
        info.size = len(data)
        self.tar.addfile(info, io.BytesIO(data))

    def symlink(self, name: str, target: str) -> None:
        self.directory(os.path.dirname(name))
        info = self._info(name, tarfile.SYMTYPE, 0o777)
        info.linkname = target
        self.tar.addfile(info)

    def tree(self, source: Path, name: str) -> None:
        """``source`` at ``name``, symbolic links kept as links; modes kept, but only
        the owner's write bit (umask 022)."""
        self.directory(name)
        for path in sorted(source.rglob("*"), key=lambda p: p.relative_to(source).parts):
            member = f"{name}/{path.relative_to(source).as_posix()}"
            mode = path.lstat().st_mode & 0o755
            if path.is_symlink():
                self.symlink(member, os.readlink(path))
            elif path.is_dir():
                self.directory(member, mode)
            else:
                self.file(member, path.read_bytes(), mode)


def write_layer(path: Path, bundle: Path, libraries: Iterable[str], config: Path,
                mtime: int) -> None:
    with path.open("wb") as out, tarfile.open(fileobj=out, mode="w",
                                              format=tarfile.PAX_FORMAT) as tar:
        layer = Layer(tar, mtime)
        layer.tree(bundle, PREFIX.lstrip("/"))
        for lib in sorted(libraries):
            # at the path ldd named, as a file (Debian's /lib is a link to usr/lib; the
            # loader's path /lib64/ld-linux-x86-64.so.2 is built into every program)
            real = Path(lib).resolve()
            layer.file(lib.lstrip("/"), real.read_bytes(), real.stat().st_mode & 0o755)
        layer.file(INIT.lstrip("/"), Path(INIT_SOURCE).read_bytes(), 0o755)
        layer.file(PROBE_TOOL.lstrip("/"), Path(PROBE_TOOL).read_bytes(), 0o755)
        layer.file("etc/nri-seccomp/config.yaml", config.read_bytes())
        layer.file("etc/passwd", (f"root:x:0:0:root:/root:/sbin/nologin\n"
                                  f"nonroot:x:{USER}:{USER}:nonroot:/nonexistent:"
                                  f"/sbin/nologin\n").encode())
        layer.file("etc/group", f"root:x:0:\nnonroot:x:{USER}:\n".encode())
        for name, mode, uid in WRITABLE:
            layer.directory(name, mode, uid)


def umoci(*args: str) -> None:
    subprocess.run(["umoci", *args], check=True)


def rfc3339(epoch: int) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def labels(created: str) -> dict[str, str]:
    with (CHECKOUT / "pyproject.toml").open("rb") as f:
        project = tomllib.load(f)["project"]
    out = {
        "org.opencontainers.image.title": "nri-seccomp",
        "org.opencontainers.image.description": project["description"],
        "org.opencontainers.image.version": project["version"],
        "org.opencontainers.image.licenses": project["license"]["text"],
        "org.opencontainers.image.created": created,
    }
    revision = git_revision()
    if revision:
        out["org.opencontainers.image.revision"] = revision
    return out


def name_in_index(layout: Path, tag: str, full_name: str) -> None:
    """Add ``io.containerd.image.name`` to the tag's entry of index.json."""
    index_path = layout / "index.json"
    index = json.loads(index_path.read_text())
    (entry,) = [m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    entry["annotations"]["io.containerd.image.name"] = full_name
    index_path.write_text(json.dumps(index, sort_keys=True, separators=(",", ":")))


def archive(layout: Path, out: Path, mtime: int) -> None:
    """The layout directory as a tar with ``oci-layout`` and ``index.json`` at the top
    (what ``oci-archive:`` and ``ctr images import`` read), entries sorted."""
    tmp = out.with_suffix(".tmp")
    with tmp.open("wb") as f, tarfile.open(fileobj=f, mode="w",
                                            format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(layout.rglob("*"), key=lambda p: p.relative_to(layout).parts):
            info = tar.gettarinfo(str(path), path.relative_to(layout).as_posix())
            info.mtime, info.uid, info.gid, info.uname, info.gname = mtime, 0, 0, "", ""
            info.mode = 0o755 if path.is_dir() else 0o644
            if path.is_file():
                with path.open("rb") as data:
                    tar.addfile(info, data)
            else:
                tar.addfile(info)
    tmp.replace(out)


def build(bundle: Path, out: Path, work: Path, config: Path) -> str:
    """Build the image from ``bundle`` into the archive ``out``; return its reference."""
    if not (bundle / "nri-seccomp").is_file():
        raise SystemExit(f"{bundle}/nri-seccomp is missing: run `make bundle` first")
    if not Path(INIT_SOURCE).is_file():
        raise SystemExit(f"{INIT_SOURCE} is missing: install Debian's tini (make deps)")
    epoch = source_date_epoch()
    created = rfc3339(epoch)
    tag = version()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    layout = work / "oci"
    image = f"{layout}:{tag}"
    layer = work / "layer.tar"
    write_layer(layer, bundle, needed_libraries(bundle) | program_libraries(PROBE_TOOL),
                config, epoch)
    history = ["--history.created", created, "--history.author", "nri-seccomp"]
    umoci("init", "--layout", str(layout))
    umoci("new", "--image", image)
    umoci("raw", "add-layer", "--image", image, *history,
          "--history.created_by",
          "make image (devtools/image.py): bundle, C library, tini, test",
          str(layer))
    config_args = ["--config.user", f"{USER}:{USER}",
                   "--config.env", "PATH=/usr/bin", "--config.workingdir", "/",
                   "--config.stopsignal", "SIGTERM", "--created", created,
                   "--author", "nri-seccomp", "--os", "linux"]
    for arg in ENTRYPOINT:
        config_args += ["--config.entrypoint", arg]
    for arg in CMD:
        config_args += ["--config.cmd", arg]
    for key, value in labels(created).items():
        config_args += ["--config.label", f"{key}={value}"]
    umoci("config", "--image", image, *history, "--history.created_by",
          "make image: entrypoint, user, labels", *config_args)
    umoci("gc", "--layout", str(layout))
    name_in_index(layout, tag, reference())
    out.parent.mkdir(parents=True, exist_ok=True)
    archive(layout, out, epoch)
    return reference()


def unpack(archive: Path, work: Path) -> Path:
    """The archive as a runtime bundle (``work``/bundle: rootfs/ and config.json made
    from the image's config by ``umoci unpack``); the layout is kept at ``work``/oci."""
    layout = work / "oci"
    with tarfile.open(archive) as tar:
        tar.extractall(layout, filter="data")
    bundle = work / "bundle"
    subprocess.run(["umoci", "unpack", "--image", f"{layout}:{version()}", str(bundle)],
                   check=True, capture_output=True)
    return bundle


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m devtools.image", description=__doc__.split(
        "\n")[0])
    p.add_argument("--bundle", type=Path, default=CHECKOUT / "dist/nri-seccomp")
    p.add_argument("--out", type=Path, default=CHECKOUT / "build/nri-seccomp-image.oci.tar")
    p.add_argument("--work", type=Path, default=CHECKOUT / "build/image")
    p.add_argument("--config", type=Path, default=CHECKOUT / "config/nri-seccomp.yaml")
    p.add_argument("--print-reference", action="store_true",
                   help="print the image's name and exit")
    args = p.parse_args(argv)
    if args.print_reference:
        print(reference())
        return 0
    ref = build(args.bundle, args.out, args.work, args.config)
    print(f"{args.out}: {ref} ({args.out.stat().st_size // (1024 * 1024)} MiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
