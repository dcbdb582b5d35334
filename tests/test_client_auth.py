"""Authenticating to real registries: Basic, Bearer tokens, credentials kept to their origin."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from devtools.badregistry import BadRegistry
from devtools.registry import LocalRegistry, docker_config
from nri_seccomp.decide.reference import parse
from nri_seccomp.registry import errors

from .conftest import REGISTRY_USER
from .fetching import PROFILE, fetch, fetcher, head, self_signed

pytestmark = pytest.mark.integration  # real processes: plugin, registries, servers


# ---- authentication -----------------------------------------------------------------


def test_basic_auth_with_docker_config(htpasswd_registry: LocalRegistry, tmp_path: Path) -> None:
    reg = htpasswd_registry
    reg.push_profile("private/prof", "v1", PROFILE)
    ref = parse(f"{reg.address}/private/prof:v1")
    with pytest.raises(errors.Unauthorized) as info:
        fetch(fetcher(reg.address), ref)
    assert f"registry {reg.address} requires authentication and no credentials are " \
           "configured for it (registry.docker_config)" in str(info.value)

    config = docker_config(tmp_path / "config.json", {reg.address: REGISTRY_USER})
    f = fetcher(reg.address, docker_config=str(config))
    assert fetch(f, ref).data == PROFILE
    assert fetch(f, ref).data == PROFILE

    wrong = docker_config(tmp_path / "wrong.json", {reg.address: ("alice", "nope")})
    with pytest.raises(errors.Unauthorized) as info:
        fetch(fetcher(reg.address, docker_config=str(wrong)), ref)
    assert "HTTP 401" in str(info.value)
    assert f"the credentials for {reg.address} from {wrong} were refused" in str(info.value)

    # credentials for another host are never used here
    other = docker_config(tmp_path / "other.json", {"ghcr.io": REGISTRY_USER})
    with pytest.raises(errors.Unauthorized, match="no credentials are configured"):
        fetch(fetcher(reg.address, docker_config=str(other)), ref)


def test_docker_config_is_reread_when_it_changes(htpasswd_registry: LocalRegistry,
                                                 tmp_path: Path) -> None:
    reg = htpasswd_registry
    reg.push_profile("private/rotate", "v1", PROFILE)
    ref = parse(f"{reg.address}/private/rotate:v1")
    path = docker_config(tmp_path / "config.json", {reg.address: ("alice", "old")})
    f = fetcher(reg.address, docker_config=str(path))
    with pytest.raises(errors.Unauthorized):
        fetch(f, ref)
    docker_config(path, {reg.address: REGISTRY_USER})
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 1_000_000))
    assert fetch(f, ref).data == PROFILE


def test_docker_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"cannot read docker config .*missing\.json"):
        fetcher(docker_config=str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text('{"auths": {"r.io": {"auth": "not base64!"}}}')
    with pytest.raises(ValueError, match=r"'r\.io': \"auth\" is not base64"):
        fetcher(docker_config=str(bad))
    helper = tmp_path / "helper.json"
    helper.write_text(json.dumps({"auths": {}, "credHelpers": {"127.0.0.1:1": "gcloud"}}))
    with BadRegistry("status:401") as bad_reg:
        helper.write_text(json.dumps({"auths": {}, "credHelpers": {bad_reg.address: "gcloud"}}))
        # helpers are run now; one that is not installed says so
        empty = tmp_path / "no-helpers"
        empty.mkdir()
        with pytest.raises(errors.Unauthorized,
                           match=r"the credential helper docker-credential-gcloud failed: "
                                 r"docker-credential-gcloud not found in .*no-helpers"):
            fetch(fetcher(bad_reg.address, docker_config=str(helper),
                          credential_helper_dir=str(empty)),
                parse(f"{bad_reg.address}/x/y:t"))


def test_bearer_token_auth(token_registry: LocalRegistry, tmp_path: Path) -> None:
    reg = token_registry
    assert reg.token_server is not None
    tokens = reg.token_server
    # the token server is another port on 127.0.0.1: listed, as an administrator would
    realm_host = (urlsplit(tokens.realm).netloc,)
    reg.push_profile("tok/prof", "v1", PROFILE)
    ref = parse(f"{reg.address}/tok/prof:v1")
    with pytest.raises(errors.Unauthorized) as info:
        fetch(fetcher(reg.address, token_realm_hosts=realm_host), ref)
    assert f"token server '{tokens.realm}' answered HTTP 401; registry {reg.address} requires " \
           "authentication and no credentials are configured" in str(info.value)

    config = docker_config(tmp_path / "config.json", {reg.address: REGISTRY_USER})
    f = fetcher(reg.address, docker_config=str(config), token_realm_hosts=realm_host)
    seen = len(tokens.requests)
    assert fetch(f, ref).data == PROFILE
    assert head(f, ref) == fetch(f, ref).manifest_digest
    # one token for the repository, reused for its manifest, blob and later fetches
    asked = tokens.requests[seen:]
    assert len(asked) == 1
    assert asked[0]["scope"] == "repository:tok/prof:pull"
    assert asked[0]["service"] == "test-registry"
    assert asked[0]["authorization"].startswith("Basic ")

    # another repository: the registry challenges again, a token for that scope is fetched
    reg.push_profile("tok/other", "v1", PROFILE)
    seen = len(tokens.requests)
    assert fetch(f, parse(f"{reg.address}/tok/other:v1")).data == PROFILE
    assert [a["scope"] for a in tokens.requests[seen:]] == ["repository:tok/other:pull"]

    wrong = docker_config(tmp_path / "wrong.json", {reg.address: ("alice", "nope")})
    with pytest.raises(errors.Unauthorized) as info:
        fetch(fetcher(reg.address, docker_config=str(wrong), token_realm_hosts=realm_host), ref)
    assert f"token server '{tokens.realm}' answered HTTP 401; the credentials for " \
           f"{reg.address} from {wrong} were refused" in str(info.value)


def test_redirect_to_other_host_drops_credentials(tmp_path: Path) -> None:
    with BadRegistry("ok", host="127.0.0.2") as target, \
         BadRegistry("redirect", target=target.address) as front:
        config = docker_config(tmp_path / "config.json", {front.address: ("u", "p")})
        f = fetcher(front.address, target.address, docker_config=str(config))
        # the front asks for no credentials; give it some to carry by a cached header
        f._auth[(front.address, "repository:x/y:pull")] = "Basic dTpw"
        art = fetch(f, parse(f"{front.address}/x/y:t"))
        assert art.data == target.profile
        assert front.seen("/blobs/")[0]["authorization"] == "Basic dTpw"
        assert target.seen("/blobs/"), "the blob was not fetched from the other host"
        assert all("authorization" not in h for h in target.seen("/blobs/"))


def test_redirect_target_asking_for_credentials_gets_none(tmp_path: Path) -> None:
    with BadRegistry("status:401", host="127.0.0.2") as target, \
         BadRegistry("redirect", target=target.address) as front:
        config = docker_config(tmp_path / "config.json", {front.address: ("u", "p"),
                                                          target.address: ("t", "t")})
        with pytest.raises(errors.Unauthorized) as info:
            fetch(fetcher(front.address, target.address, docker_config=str(config)),
                parse(f"{front.address}/x/y:t"))
        assert f"access denied by http://{target.address}, where {front.address} " \
               "redirected the download; no credentials are sent there" in str(info.value)
        assert len(target.seen("/blobs/")) == 1
        assert all("authorization" not in h for h in target.seen("/blobs/"))


def test_credentials_not_sent_to_plain_http_token_server(tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    with LocalRegistry(tls=(cert, key), users=dict([REGISTRY_USER]), token_auth=True) as reg:
        assert reg.token_server is not None and reg.token_server.realm.startswith("http://")
        reg.push_profile("tok/tls", "v1", PROFILE)
        before = len(reg.token_server.requests)
        config = docker_config(tmp_path / "config.json", {reg.address: REGISTRY_USER})
        with pytest.raises(errors.Unauthorized) as info:
            fetch(fetcher(ca_file=str(cert), docker_config=str(config),
                          allowed=(f"{reg.address}/*",)),
                  parse(f"{reg.address}/tok/tls:v1"))
        assert f"token server '{reg.token_server.realm}' is plain HTTP; the credentials for " \
               f"{reg.address} are not sent there" in str(info.value)
        assert len(reg.token_server.requests) == before


# ---- identity (refresh) tokens ----------------------------------------------------------

IDENTITY_TOKEN = "idt-" + "7f3a9c" * 6


def identity_config(path: Path, registry: str, token: str) -> Path:
    # as docker login writes it: the user without a password, beside the token
    path.write_text(json.dumps({"auths": {registry: {
        "auth": base64.b64encode(b"alice:").decode(), "identitytoken": token}}}))
    return path


def test_identity_token_from_docker_config(token_registry: LocalRegistry,
                                           tmp_path: Path) -> None:
    reg = token_registry
    assert reg.token_server is not None
    tokens = reg.token_server
    tokens.refresh_tokens[IDENTITY_TOKEN] = REGISTRY_USER[0]
    realm_host = (urlsplit(tokens.realm).netloc,)
    reg.push_profile("idt/prof", "v1", PROFILE)
    ref = parse(f"{reg.address}/idt/prof:v1")
    config = identity_config(tmp_path / "config.json", reg.address, IDENTITY_TOKEN)
    f = fetcher(reg.address, docker_config=str(config), token_realm_hosts=realm_host)
    seen = len(tokens.requests)
    assert fetch(f, ref).data == PROFILE
    assert head(f, ref) == fetch(f, ref).manifest_digest
    # one POST of the refresh-token grant for the repository, reused; no GET, no Basic
    asked = tokens.requests[seen:]
    assert asked == [{
        "grant_type": "refresh_token", "refresh_token": IDENTITY_TOKEN,
        "service": "test-registry", "scope": "repository:idt/prof:pull",
        "client_id": "nri-seccomp", "authorization": "", "method": "POST",
        "content-type": "application/x-www-form-urlencoded"}]


def test_wrong_identity_token(token_registry: LocalRegistry, tmp_path: Path) -> None:
    reg = token_registry
    assert reg.token_server is not None
    tokens = reg.token_server
    realm_host = (urlsplit(tokens.realm).netloc,)
    reg.push_profile("idt/wrong", "v1", PROFILE)
    wrong = "idt-wrong-" + "c0ffee" * 5
    config = identity_config(tmp_path / "config.json", reg.address, wrong)
    seen = len(tokens.requests)
    with pytest.raises(errors.Unauthorized) as info:
        fetch(fetcher(reg.address, docker_config=str(config), token_realm_hosts=realm_host),
              parse(f"{reg.address}/idt/wrong:v1"))
    # refused (400 invalid_grant), then the GET containerd falls back to, refused too
    assert str(info.value) == (
        f"{reg.address}/idt/wrong:v1: token server '{tokens.realm}' answered HTTP 400 to the "
        f"identity token's POST and HTTP 401 to the GET; the identity token for "
        f"{reg.address} from {config} was refused")
    assert wrong not in str(info.value) and "c0ffee" not in str(info.value)
    assert (info.value.registry, info.value.status) == (reg.address, 401)
    assert [a["method"] for a in tokens.requests[seen:]] == ["POST", "GET"]


def test_identity_token_where_the_token_server_has_no_post(token_registry: LocalRegistry,
                                                           tmp_path: Path) -> None:
    """A token server answering the POST 404 (GCR did): the GET, token as the password."""
    reg = token_registry
    assert reg.token_server is not None
    tokens = reg.token_server
    tokens.refresh_tokens[IDENTITY_TOKEN] = REGISTRY_USER[0]
    realm_host = (urlsplit(tokens.realm).netloc,)
    reg.push_profile("idt/nopost", "v1", PROFILE)
    config = identity_config(tmp_path / "config.json", reg.address, IDENTITY_TOKEN)
    seen = len(tokens.requests)
    tokens.oauth = False
    try:
        art = fetch(fetcher(reg.address, docker_config=str(config),
                            token_realm_hosts=realm_host),
                    parse(f"{reg.address}/idt/nopost:v1"))
    finally:
        tokens.oauth = True
    assert art.data == PROFILE
    asked = tokens.requests[seen:]
    assert [a["method"] for a in asked] == ["POST", "GET"]
    assert asked[1]["scope"] == "repository:idt/nopost:pull"
    assert asked[1]["authorization"] == "Basic " + base64.b64encode(
        f":{IDENTITY_TOKEN}".encode()).decode()


def test_identity_token_never_goes_to_a_basic_registry(htpasswd_registry: LocalRegistry,
                                                       tmp_path: Path) -> None:
    reg = htpasswd_registry
    reg.push_profile("private/idt", "v1", PROFILE)
    config = identity_config(tmp_path / "config.json", reg.address, IDENTITY_TOKEN)
    with pytest.raises(errors.Unauthorized) as info:
        fetch(fetcher(reg.address, docker_config=str(config)),
              parse(f"{reg.address}/private/idt:v1"))
    assert str(info.value) == (
        f"{reg.address}/private/idt:v1: registry {reg.address} asks for Basic "
        f"authentication; the identity token for {reg.address} from {config} is only sent "
        "to a token server")
