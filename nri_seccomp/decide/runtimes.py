"""What each runtime release can do with a seccomp adjustment (docs: nri-protocol.md).

| containerd | NRI | applies seccomp_policy | passes seccomp_profile | errno_ret safe |
|---|---|---|---|---|
| < 2.2 | <= 0.8 | no (unknown field, dropped) | no | - |
| 2.2.0 | 0.10 | yes | no | no (panics) |
| 2.2.1 - 2.2.x | 0.11 | yes | yes | no (panics) |
| 2.3.x | 0.12.0 | yes | yes | yes |
| >= 2.4 | >= 0.12.2 (assumed) | yes | yes | yes |

``default_errno`` is dropped by every NRI release, v0.12.3 included: the runtime applies
adjustments through NRI's ``AdjustSeccompPolicy``, which never sets ``DefaultErrnoRet``
(checked on NRI's main, 2026-08-20); ``keeps_default_errno`` is therefore never
inferred, only forced by ``runtime_overrides`` for a runtime known to carry it.
``Container.image`` (name, digest, config digest) is filled from NRI v0.12.2 on, by
containerd from its main of 2026-08-19 on. containerd 2.4.0 is not tagged in the
snapshot we checked (v2.4.0-beta.0 ships NRI v0.12.1, main v0.12.2; the release is
said to ship v0.12.3): the table assumes at least v0.12.2 for 2.4.0, and a 2.4
pre-release counts as 2.3 (NRI v0.12.0, no ``Container.image``). The NRI version the
runtime reports wins over both. ``ConfigureRequest.NRI_version`` is sent by every
NRI from v0.12.0 on (never empty there: NRI reports ``0.0.0-unknown`` at worst),
so a runtime that sends none has an older NRI, whatever its own version says.

Wrong answers here are not symmetric: believing a per-syscall errno_ret is safe
when it is not panics the containerd daemon, and believing an adjustment is
applied when it is not runs the container unconfined. Every doubt therefore
resolves to the weaker capability: an unknown runtime or an unreadable version
gets nothing, and a pre-release counts as the release before it
(containerd v2.3.0-rc.0 still carried NRI v0.11.0).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass

CONTAINERD = "containerd"


@dataclass(frozen=True)
class RuntimeCaps:
    applies_seccomp_adjustment: bool
    passes_seccomp_profile: bool
    errno_ret_safe: bool
    keeps_default_errno: bool
    passes_image: bool
    description: str


#: the field names `overrides` (and the configuration's runtime_overrides) may set
CAPABILITY_NAMES = tuple(
    f.name for f in dataclasses.fields(RuntimeCaps) if f.name != "description"
)


@dataclass(frozen=True)
class Version:
    major: int
    minor: int
    patch: int
    #: "" for a release (or a build after one); e.g. "rc.1" for a pre-release
    prerelease: str = ""

    @property
    def key(self) -> tuple[int, int, int, int]:
        """Orders a pre-release of X.Y.Z below X.Y.Z and above every X.Y.(Z-1) build."""
        return self.major, self.minor, self.patch, 0 if self.prerelease else 1

    def at_least(self, major: int, minor: int, patch: int) -> bool:
        return self.key >= (major, minor, patch, 1)

    def __str__(self) -> str:
        pre = f"-{self.prerelease}" if self.prerelease else ""
        return f"v{self.major}.{self.minor}.{self.patch}{pre}"


_SEMVER = re.compile(
    r"v?(?P<major>\d+)\.(?P<minor>\d+)\.(?P<patch>\d+)"
    r"(?:-(?P<pre>[0-9A-Za-z.-]+))?"
    r"(?:\+[0-9A-Za-z.+-]*)?"
)
# git describe's "-N-g<sha>" means N commits *after* the tag, not a pre-release
# (NRI's own version matching strips it for the same reason); containerd's
# Makefile marks a modified tree with ".m", git's default is "-dirty"
_GIT_DESCRIBED = re.compile(r"(?:^|-)\d+-g[0-9a-f]{4,40}$")
_DIRTY = re.compile(r"(?:\.m|-dirty)$")


def parse_version(text: str) -> Version | None:
    """"v2.2.4", "2.3.0", "v2.2.0-rc.1", "v2.2.4-12-gdeadbee", "2.2.0+unknown"; None if not one.

    Only whole strings are accepted: "2.2.4abc" is not read as 2.2.4.
    """
    m = _SEMVER.fullmatch(_DIRTY.sub("", text.strip()))
    if m is None:
        return None
    pre = _GIT_DESCRIBED.sub("", m.group("pre") or "")
    return Version(int(m.group("major")), int(m.group("minor")), int(m.group("patch")), pre)


def capabilities(
    runtime_name: str,
    runtime_version: str,
    nri_version: str = "",
    overrides: Mapping[str, bool] | None = None,
) -> RuntimeCaps:
    """The capabilities of the runtime Configure named, with the configuration's overrides."""
    caps = _table(runtime_name.strip(), runtime_version.strip(), nri_version.strip())
    if not overrides:
        return caps
    for key, flag in overrides.items():
        if key not in CAPABILITY_NAMES:
            raise ValueError(f"unknown runtime capability {key!r}: expected one of "
                             + ", ".join(CAPABILITY_NAMES))
        if not isinstance(flag, bool):
            raise ValueError(f"runtime capability {key}: expected true or false, got {flag!r}")
    forced = ", ".join(f"{k}={str(v).lower()}" for k, v in overrides.items())
    return dataclasses.replace(
        caps, **overrides, description=f"{caps.description} with overrides {forced}"
    )


# (first containerd release, the NRI it ships); older releases ship NRI <= v0.8
_CONTAINERD_NRI = (
    # assumed: 2.4.0 is cut from main after NRI v0.12.2 (Container.image) went in
    ((2, 4, 0), Version(0, 12, 2)),
    ((2, 3, 0), Version(0, 12, 0)),
    ((2, 2, 1), Version(0, 11, 0)),
    ((2, 2, 0), Version(0, 10, 0)),
)
_OLD_NRI = Version(0, 8, 0)
#: the last NRI without NRI_version in ConfigureRequest, for a runtime that sends none
_BEFORE_NRI_VERSION = Version(0, 11, 0)


def _table(name: str, version: str, nri_version: str) -> RuntimeCaps:
    label = f"{name or 'unnamed runtime'} {version or '(no version)'}"
    if name != CONTAINERD:
        return _conservative(f"{label} (not containerd: its handling of NRI seccomp "
                             "adjustments is unknown, so they are assumed dropped)")
    v = parse_version(version)
    if v is None:
        return _conservative(f"{label} (version not understood, so seccomp adjustments are "
                             "assumed dropped)")
    nri, nri_label = _effective_nri(v, nri_version)
    return RuntimeCaps(
        applies_seccomp_adjustment=v.at_least(2, 2, 0),
        passes_seccomp_profile=v.at_least(2, 2, 1),
        errno_ret_safe=nri.at_least(0, 12, 0),
        # no NRI release keeps it (AdjustSeccompPolicy never sets DefaultErrnoRet, up to
        # v0.12.3 and main): only runtime_overrides can say otherwise
        keeps_default_errno=False,
        passes_image=nri.at_least(0, 12, 2),
        description=f"{label} (NRI {nri_label})",
    )


def _effective_nri(containerd: Version, reported: str) -> tuple[Version, str]:
    inferred = next((nri for first, nri in _CONTAINERD_NRI if containerd.at_least(*first)),
                    _OLD_NRI)
    if not reported:
        if inferred.at_least(0, 12, 0):
            # contradicts the containerd version; trust the weaker of the two
            return _BEFORE_NRI_VERSION, "older than v0.12.0: no NRI_version was sent"
        return inferred, f"{inferred}, inferred from the containerd version"
    nri = parse_version(reported)
    if nri is None or nri.key[:3] == (0, 0, 0):
        # sending the field at all proves v0.12.0 or later, but nothing more
        return Version(0, 12, 0), f"{reported!r} not understood, at least v0.12.0"
    return nri, reported


def _conservative(description: str) -> RuntimeCaps:
    return RuntimeCaps(
        applies_seccomp_adjustment=False,
        passes_seccomp_profile=False,
        errno_ret_safe=False,
        keeps_default_errno=False,
        passes_image=False,
        description=description,
    )
