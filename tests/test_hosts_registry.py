"""hosts.toml and credential helpers against real registries: mirrors (a real pull-through
cache), plain HTTP and a CA named only in hosts.toml, a helper executable run for real."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest

from devtools.badregistry import BadRegistry
from devtools.registry import LocalRegistry, free_port
from nri_seccomp.decide.reference import parse
from nri_seccomp.registry import errors, netguard
from nri_seccomp.registry.credentials import HelperRunner, HelperSettings

from .conftest import REGISTRY_USER
from .fetching import PROFILE, fetch, fetcher, head, run

pytestmark = pytest.mark.integration  # real registries, TLS and helper processes


def hosts_toml(root: Path, directory: str, text: str) -> Path:
    d = root / directory
    d.mkdir(parents=True, exist_ok=True)
    (d / "hosts.toml").write_text(text)
    return d


def ours(reg: LocalRegistry) -> list[str]:
    """Access-log lines of requests the plugin's client sent (httpx), not pushes or proxies."""
    return [line for line in reg._log_text().splitlines() if "python-httpx" in line]


@pytest.fixture(scope="module")
def upstream() -> Iterator[LocalRegistry]:
    with LocalRegistry() as reg:
        reg.push_profile("prof/mirrored", "v1", PROFILE)
        yield reg


# ---- mirrors -------------------------------------------------------------------------


def test_fetch_goes_through_a_pull_through_mirror(upstream: LocalRegistry,
                                                  tmp_path: Path) -> None:
    with LocalRegistry(proxy=f"http://{upstream.address}") as mirror:
        # plain HTTP from hosts.toml alone: nothing in registry.insecure
        hosts_toml(tmp_path, upstream.address, f'server = "http://{upstream.address}"\n'
                   f'[host."http://{mirror.address}"]\n  capabilities = ["pull", "resolve"]\n')
        f = fetcher(config_path=(str(tmp_path),), allowed=(f"{upstream.address}/*",))
        ref = parse(f"{upstream.address}/prof/mirrored:v1")
        art = fetch(f, ref)
        assert art.data == PROFILE
        assert art.via == mirror.address  # named in the decision's log line
        assert head(f, ref) == art.manifest_digest
        lines = ours(mirror)
        # containerd's form: ?ns=<registry>, query-encoded (":" is %3A)
        ns = urlencode({"ns": upstream.address})
        assert any(f"GET /v2/prof/mirrored/manifests/v1?{ns} " in line for line in lines)
        assert any(re.search(rf"GET /v2/prof/mirrored/blobs/sha256:\w+\?{ns} ", line)
                   for line in lines)
        assert any(f"HEAD /v2/prof/mirrored/manifests/v1?{ns} " in line for line in lines)
        # the upstream was only asked by the mirror (distribution's own client)
        assert ours(upstream) == []
        assert upstream.count("manifests", "prof/mirrored") >= 1


def test_mirror_down_or_without_the_artifact_falls_back_to_upstream(
        upstream: LocalRegistry, tmp_path: Path) -> None:
    dead = f"127.0.0.1:{free_port()}"
    with LocalRegistry() as empty:
        hosts_toml(tmp_path, upstream.address,
                   f'server = "http://{upstream.address}"\n'
                   f'[host."http://{dead}"]\n[host."http://{empty.address}"]\n')
        f = fetcher(config_path=(str(tmp_path),), allowed=(f"{upstream.address}/*",))
        before = len(ours(upstream))
        art = fetch(f, parse(f"{upstream.address}/prof/mirrored:v1"))
        assert art.data == PROFILE and art.via == ""  # the registry itself served it
        # the empty mirror answered 404 to the manifest: asked, then the upstream served
        assert empty.count("manifests", "prof/mirrored", status=404) == 1
        assert any("GET /v2/prof/mirrored/manifests/v1 " in line
                   for line in ours(upstream)[before:])

        # everything down: the upstream's error, naming the endpoints tried before it
        upstream.stop()
        try:
            with pytest.raises(errors.RegistryUnavailable) as info:
                fetch(fetcher(config_path=(str(tmp_path),),
                              allowed=(f"{upstream.address}/*",)),
                      parse(f"{upstream.address}/prof/mirrored:v1"))
        finally:
            upstream.start()
        assert str(info.value) == (
            f"{upstream.address}/prof/mirrored:v1: cannot connect to registry "
            f"{upstream.address} (tried before: {dead} (unavailable), "
            f"{empty.address} (HTTP 404))")


def test_a_tenants_reference_cannot_reach_a_private_address_through_default(
        tmp_path: Path) -> None:
    """``_default`` names a mirror on loopback: connectable (the operator wrote it). The
    reference's own host, 127.0.0.2, is the implicit server: never named, so refused."""
    with BadRegistry("ok") as mirror, BadRegistry("ok", host="127.0.0.2") as private:
        hosts_toml(tmp_path, "_default", f'[host."http://{mirror.address}"]\n')
        f = fetcher(config_path=(str(tmp_path),), allowed=("*",))
        ref = parse(f"{private.address}/x/y:t")
        assert fetch(f, ref).data == mirror.profile
        assert any(f"/manifests/t?{urlencode({'ns': private.address})} " in line
                   for line, _ in mirror.requests)
        mirror.mode = "status:404"
        with pytest.raises(errors.PolicyError) as info:
            fetch(fetcher(config_path=(str(tmp_path),), allowed=("*",)), ref)
        assert f"registry {private.address} does not have a public address" in str(info.value)
        assert f"(tried before: {mirror.address} (HTTP 404))" in str(info.value)
        assert private.connections == 0


# ---- TLS from hosts.toml ------------------------------------------------------------------


def ca_signed(tmp: Path) -> tuple[Path, Path, Path]:
    """(CA certificate, server chain for 127.0.0.1: its certificate then the CA's, key).

    The chain file also lets LocalRegistry's own readiness probe verify the server."""
    ca_key, ca, key, csr, cert = (tmp / n for n in ("ca.key", "ca.pem", "srv.key", "srv.csr",
                                                    "srv.pem"))
    ext = tmp / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
            "/CN=nri-seccomp test CA", "-keyout", str(ca_key), "-out", str(ca))
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1",
            "-keyout", str(key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
            "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert))
    chain = tmp / "chain.pem"
    chain.write_bytes(cert.read_bytes() + ca.read_bytes())
    return ca, chain, key


def test_ca_from_hosts_toml_alone(tmp_path: Path) -> None:
    ca, cert, key = ca_signed(tmp_path)
    with LocalRegistry(tls=(cert, key)) as reg:
        reg.push_profile("tls/prof", "v1", PROFILE)
        ref = parse(f"{reg.address}/tls/prof:v1")
        root = tmp_path / "certs.d"
        root.mkdir()
        with pytest.raises(errors.RegistryUnavailable, match="certificate not verified"):
            fetch(fetcher(config_path=(str(root),), allowed=(f"{reg.address}/*",)), ref)
        # relative to the host directory, as containerd reads it
        d = hosts_toml(root, reg.address, f'server = "https://{reg.address}"\nca = "ca.pem"\n')
        (d / "ca.pem").write_bytes(ca.read_bytes())
        assert fetch(fetcher(config_path=(str(root),), allowed=(f"{reg.address}/*",)),
                     ref).data == PROFILE
        # Docker's layout: no hosts.toml, a *.crt in the host directory
        (d / "hosts.toml").unlink()
        (d / "ca.pem").rename(d / "ca.crt")
        assert fetch(fetcher(config_path=(str(root),), allowed=(f"{reg.address}/*",)),
                     ref).data == PROFILE
        # an unreadable CA named in the file is the configuration's error, named
        (d / "hosts.toml").write_text(f'server = "https://{reg.address}"\nca = "gone.pem"\n')
        with pytest.raises(errors.RegistryUnavailable) as info:
            fetch(fetcher(config_path=(str(root),), allowed=(f"{reg.address}/*",)), ref)
        assert f"registry configuration {d}/hosts.toml: cannot load ca {d}/gone.pem" in str(
            info.value)


def test_the_nodes_cas_are_trusted_as_containerd_trusts_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A CA the operator added to the node's store (update-ca-certificates) is trusted
    without any configuration, as containerd trusts it for the node's images; a
    hashed directory is preferred to a bundle file, certifi is the last resort."""
    ca, chain, key = ca_signed(tmp_path)
    (tmp_path / "other").mkdir()
    other_ca, _, _ = ca_signed(tmp_path / "other")

    def store(name: str, *cas: Path) -> Path:
        d = tmp_path / name
        d.mkdir()
        for i, c in enumerate(cas):
            (d / f"ca{i}.pem").write_bytes(c.read_bytes())
        subprocess.run(["openssl", "rehash", str(d)], check=True, capture_output=True)
        return d

    hashed = store("ssl-certs", other_ca, ca)
    plain = tmp_path / "pki-certs"  # CA files without OpenSSL's names (RHEL's layout)
    plain.mkdir()
    (plain / "operator-ca.pem").write_bytes(ca.read_bytes())
    # mounted without what its links point to: one link resolves, another dangles
    dangling = store("dangling", ca)
    (dangling / "0123abcd.0").symlink_to(tmp_path / "elsewhere" / "ca.pem")
    # a sequence with a gap: OpenSSL stops at the missing ".0"
    gap = store("gap", ca)
    for link in gap.iterdir():
        if link.name.endswith(".0"):
            link.rename(link.with_name(link.name[:-2] + ".1"))
    bundle, other_bundle = tmp_path / "ca-bundle.crt", tmp_path / "other-bundle.crt"
    bundle.write_bytes(ca.read_bytes())
    other_bundle.write_bytes(other_ca.read_bytes())
    with LocalRegistry(tls=(chain, key)) as reg:
        reg.push_profile("tls/prof", "v1", PROFILE)
        ref = parse(f"{reg.address}/tls/prof:v1")
        allowed = (f"{reg.address}/*",)
        for dirs, files, expected in (
            # the bundle does not know the registry's CA: only the directory can
            ((str(plain), str(dangling), str(gap), str(hashed)), (str(other_bundle),),
             ("capath", str(hashed))),
            ((str(dangling), str(gap), str(tmp_path / "gone")),
             (str(tmp_path / "no.crt"), str(bundle)), ("cafile", str(bundle))),
        ):
            monkeypatch.setattr(netguard, "SYSTEM_CA_DIRS", dirs)
            monkeypatch.setattr(netguard, "SYSTEM_CA_FILES", files)
            assert netguard.trust_source() == expected
            assert fetch(fetcher(allowed=allowed), ref).data == PROFILE
        # a node without a store: certifi's public CAs, which do not know the operator's
        monkeypatch.setattr(netguard, "SYSTEM_CA_DIRS", (str(plain),))
        monkeypatch.setattr(netguard, "SYSTEM_CA_FILES", ())
        assert netguard.trust_source()[0] == "certifi"
        with pytest.raises(errors.RegistryUnavailable, match="certificate not verified"):
            fetch(fetcher(allowed=allowed), ref)


def test_hosts_toml_skip_verify_false_checks_even_without_tls_verify(tmp_path: Path) -> None:
    """``skip_verify = false`` in a registry's hosts.toml asks for checks: the global
    ``tls_verify: false`` does not turn them off for that registry (as in containerd,
    where the file is all there is)."""
    _, cert, key = ca_signed(tmp_path)
    with LocalRegistry(tls=(cert, key)) as reg:
        reg.push_profile("tls/prof", "v1", PROFILE)
        ref = parse(f"{reg.address}/tls/prof:v1")
        root = tmp_path / "certs.d"
        root.mkdir()
        settings = {"config_path": (str(root),), "allowed": (f"{reg.address}/*",),
                    "tls_verify": False}
        # no file: the global setting applies, and checks nothing
        assert fetch(fetcher(**settings), ref).data == PROFILE
        hosts_toml(root, reg.address,
                   f'server = "https://{reg.address}"\nskip_verify = false\n')
        with pytest.raises(errors.RegistryUnavailable, match="certificate not verified"):
            fetch(fetcher(**settings), ref)


# ---- credential helpers ---------------------------------------------------------------------


def helper(bin_dir: Path, name: str, answers: dict[str, tuple[str, str]],
           log: Path, delay: float = 0.0) -> Path:
    """docker-credential-NAME: logs each stdin, answers for the hosts in ``answers``."""
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / f"docker-credential-{name}"
    path.write_text(f"""#!/usr/bin/env python3
import json, sys, time
server = sys.stdin.read()
with open({str(log)!r}, "a") as f:
    f.write(json.dumps([sys.argv[1:], server]) + "\\n")
time.sleep({delay})
answers = {json.dumps({h: {"ServerURL": h, "Username": u, "Secret": s}
                       for h, (u, s) in answers.items()})}
host = server.strip()
if host in answers:
    print(json.dumps(answers[host]))
else:
    print("credentials not found in native keychain")
    sys.exit(1)
""")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def asked(log: Path) -> list[str]:
    if not log.exists():
        return []
    return [json.loads(line)[1].strip() for line in log.read_text().splitlines()]


def test_credential_helper_supplies_credentials_for_its_host_only(
        htpasswd_registry: LocalRegistry, tmp_path: Path) -> None:
    reg = htpasswd_registry
    reg.push_profile("private/helped", "v1", PROFILE)
    log = tmp_path / "helper.log"
    helper(tmp_path / "bin", "test", {reg.address: REGISTRY_USER}, log)
    with LocalRegistry(users=dict([REGISTRY_USER])) as other:
        other.push_profile("private/other", "v1", PROFILE)
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"credHelpers": {reg.address: "test"}}))
        f = fetcher(reg.address, other.address, docker_config=str(config),
                    credential_helper_dir=str(tmp_path / "bin"))
        ref = parse(f"{reg.address}/private/helped:v1")
        assert fetch(f, ref).data == PROFILE
        assert fetch(f, ref).data == PROFILE
        reg.push_profile("private/helped2", "v1", PROFILE)
        assert fetch(f, parse(f"{reg.address}/private/helped2:v1")).data == PROFILE
        # asked once (the answer is cached), with the registry's host on stdin, "get"
        assert asked(log) == [reg.address]
        assert json.loads(log.read_text().splitlines()[0])[0] == ["get"]
        with pytest.raises(errors.Unauthorized) as info:
            fetch(f, parse(f"{other.address}/private/other:v1"))
        assert f"registry {other.address} requires authentication and no credentials are " \
               "configured for it (registry.docker_config)" in str(info.value)
        # the helper is configured for one host: never asked about another one
        assert asked(log) == [reg.address]

        # credsStore: every host without a helper or an auths entry asks the store
        config.write_text(json.dumps({"credsStore": "test"}))
        os.utime(config, ns=(time.time_ns(), time.time_ns() + 10**9))
        f = fetcher(reg.address, other.address, docker_config=str(config),
                    credential_helper_dir=str(tmp_path / "bin"))
        with pytest.raises(errors.Unauthorized) as info:
            fetch(f, parse(f"{other.address}/private/other:v1"))
        assert "the credential helper docker-credential-test has none for it" in str(
            info.value)
        assert asked(log)[-1] == other.address
        assert fetch(f, ref).data == PROFILE


def test_helper_bounds(tmp_path: Path) -> None:
    log = tmp_path / "helper.log"
    bin_dir = tmp_path / "bin"
    helper(bin_dir, "slow", {"r.io": ("u", "p")}, log, delay=5)
    helper(bin_dir, "ok", {"r.io": ("u", "p"), "tok.io": ("<token>", "refresh")}, log)
    (bin_dir / "docker-credential-loud").write_text(
        "#!/bin/sh\nhead -c 200000 /dev/zero | tr '\\0' x\n")
    (bin_dir / "docker-credential-loud").chmod(0o755)
    (bin_dir / "docker-credential-fails").write_text(
        "#!/bin/sh\necho 'some\\033[31m long error' >&2\nexit 3\n")
    (bin_dir / "docker-credential-fails").chmod(0o755)
    runner = HelperRunner(HelperSettings(timeout=0.5, directory=str(bin_dir)))

    async def main() -> list[str]:
        out = []
        start = time.monotonic()
        login = await runner.login("slow", "r.io")
        out.append(f"{login.hint} {time.monotonic() - start < 2}")
        for name, host in (("loud", "r.io"), ("fails", "r.io"), ("missing", "r.io"),
                           ("ok", "nothere.io")):
            out.append((await runner.login(name, host)).hint)
        ok = await runner.login("ok", "r.io")
        out.append(f"{ok.basic} {ok.source}")
        tok = await runner.login("ok", "tok.io")
        out.append(f"{tok.what}: {tok.identity_token} {tok.basic}{tok.source}")
        return out

    assert run(main()) == [
        "; the credential helper docker-credential-slow failed: no answer within 0.5s True",
        "; the credential helper docker-credential-loud failed: sent more than 65536 bytes "
        "on stdout",
        "; the credential helper docker-credential-fails failed: exited with status 3",
        "; the credential helper docker-credential-missing failed: docker-credential-missing "
        f"not found in {bin_dir}",
        "; the credential helper docker-credential-ok has none for it",
        "('u', 'p')  from credential helper docker-credential-ok",
        # Username "<token>": the secret is an identity token
        "identity token: refresh None from credential helper docker-credential-ok",
    ]


def test_credential_helper_with_an_identity_token(token_registry: LocalRegistry,
                                                  tmp_path: Path) -> None:
    reg = token_registry
    assert reg.token_server is not None
    tokens = reg.token_server
    refresh = "helper-idt-" + "5eed" * 6
    tokens.refresh_tokens[refresh] = REGISTRY_USER[0]
    reg.push_profile("idt/helped", "v1", PROFILE)
    log = tmp_path / "helper.log"
    helper(tmp_path / "bin", "idt", {reg.address: ("<token>", refresh)}, log)
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"credHelpers": {reg.address: "idt"}}))
    f = fetcher(reg.address, docker_config=str(config),
                credential_helper_dir=str(tmp_path / "bin"),
                token_realm_hosts=(urlsplit(tokens.realm).netloc,))
    seen = len(tokens.requests)
    ref = parse(f"{reg.address}/idt/helped:v1")
    assert fetch(f, ref).data == PROFILE
    assert asked(log) == [reg.address]
    posted = tokens.requests[seen:]
    assert [(a["method"], a["grant_type"], a["refresh_token"], a["client_id"], a["scope"])
            for a in posted] == [("POST", "refresh_token", refresh, "nri-seccomp",
                                  "repository:idt/helped:pull")]

    # the helper's token refused: named as the helper's, not shown, the helper asked again
    helper(tmp_path / "bin", "idt", {reg.address: ("<token>", "stale-" + "dead" * 6)}, log)
    f = fetcher(reg.address, docker_config=str(config),
                credential_helper_dir=str(tmp_path / "bin"),
                token_realm_hosts=(urlsplit(tokens.realm).netloc,))
    with pytest.raises(errors.Unauthorized) as info:
        fetch(f, ref)
    assert str(info.value).endswith(
        "answered HTTP 400 to the identity token's POST and HTTP 401 to the GET; the identity "
        f"token for {reg.address} from credential helper docker-credential-idt was refused")
    assert "dead" not in str(info.value)
    with pytest.raises(errors.Unauthorized):
        fetch(f, ref)
    assert asked(log) == [reg.address] * 3


def test_a_mirror_with_its_own_credentials(upstream: LocalRegistry, tmp_path: Path) -> None:
    """What an operator does for private content instead of imagePullSecrets: a mirror
    that holds the upstream's access, with node credentials of its own."""
    with LocalRegistry(proxy=f"http://{upstream.address}",
                       users=dict([REGISTRY_USER])) as mirror:
        hosts_toml(tmp_path, upstream.address, f'server = "http://{upstream.address}"\n'
                   f'[host."http://{mirror.address}"]\n')
        log = tmp_path / "helper.log"
        helper(tmp_path / "bin", "node", {mirror.address: REGISTRY_USER}, log)
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"credHelpers": {mirror.address: "node"}}))
        f = fetcher(config_path=(str(tmp_path),), allowed=(f"{upstream.address}/*",),
                    docker_config=str(config), credential_helper_dir=str(tmp_path / "bin"))
        before = len(ours(upstream))
        assert fetch(f, parse(f"{upstream.address}/prof/mirrored:v1")).data == PROFILE
        assert asked(log) == [mirror.address]
        assert any(" 200 " in line and "/manifests/v1?ns=" in line for line in ours(mirror))
        assert ours(upstream)[before:] == []


def test_hosts_toml_headers_stay_with_their_endpoint(tmp_path: Path) -> None:
    with BadRegistry("ok", host="127.0.0.2") as target, \
         BadRegistry("redirect", target=target.address) as front:
        hosts_toml(tmp_path, front.address, f'server = "http://{front.address}"\n'
                   '[header]\n  X-Mirror-Key = "s3cret"\n  x-multi = ["a", "b"]\n'
                   '  authorization = "Basic c3RhdGljOnRva2Vu"\n')
        # the redirect target is made connectable (listed), not given the headers
        f = fetcher(target.address, config_path=(str(tmp_path),), allowed=("*",))
        assert fetch(f, parse(f"{front.address}/x/y:t")).data == target.profile
        sent = front.seen("/manifests/")[0]
        assert sent["x-mirror-key"] == "s3cret" and sent["x-multi"] == "a, b"
        assert sent["authorization"] == "Basic c3RhdGljOnRva2Vu"
        assert sent["accept-encoding"] == "identity"
        assert front.seen("/blobs/")[0]["x-mirror-key"] == "s3cret"
        assert target.seen("/blobs/")
        assert all("x-mirror-key" not in h and "authorization" not in h
                   for h in target.seen("/blobs/"))
