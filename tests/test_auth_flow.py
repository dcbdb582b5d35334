"""The authentication flow (``registry.auth``) as tables: challenges in, decisions out.

No network: the client's I/O is tested against real registries in test_client_auth.py.
"""

from __future__ import annotations

import base64
import json
from urllib.parse import parse_qs, urlsplit

import pytest

from nri_seccomp.decide.reference import parse
from nri_seccomp.registry import auth
from nri_seccomp.registry.auth import BasicAnswer, TokenRequest
from nri_seccomp.registry.client import FetchSettings
from nri_seccomp.registry.credentials import Login, parse_docker_config
from nri_seccomp.registry.errors import (
    ArtifactError,
    PolicyError,
    RegistryUnavailable,
    Unauthorized,
)

REF = parse("reg.example/acme/prof:v1")
URL = "https://reg.example/v2/acme/prof/manifests/v1"
SCOPE = "repository:acme/prof:pull"
ALICE = Login(("alice", "s3cret"), " from /etc/docker.json")
NOBODY = Login()
BASIC = "Basic " + base64.b64encode(b"alice:s3cret").decode()
SETTINGS = FetchSettings(allowed=("reg.example/*",))
REALM = "https://reg.example/token"


def answer(challenge: str, login: Login = ALICE,
           settings: FetchSettings = SETTINGS) -> BasicAnswer | TokenRequest:
    return auth.answer_challenge(REF, challenge, scope=SCOPE, registry_url=URL, login=login,
                                 settings=settings)


# ---- parsing -----------------------------------------------------------------------


@pytest.mark.parametrize(("header", "scheme", "params"), [
    ('Bearer realm="https://a/t",service="s",scope="repository:x:pull"', "bearer",
     {"realm": "https://a/t", "service": "s", "scope": "repository:x:pull"}),
    ('Basic realm="Registry Realm"', "basic", {"realm": "Registry Realm"}),
    ("BEARER Realm=https://a/t, Service=s", "bearer", {"realm": "https://a/t", "service": "s"}),
    ('  Bearer realm="",service=s  ', "bearer", {"realm": "", "service": "s"}),
    ("", "", {}),
    ("Negotiate", "negotiate", {}),
    ('Bearer scope="repository:a:pull,push"', "bearer", {"scope": "repository:a:pull,push"}),
])
def test_parse_challenge(header: str, scheme: str, params: dict[str, str]) -> None:
    assert auth.parse_challenge(header) == (scheme, params)


# ---- the decision ------------------------------------------------------------------


def test_basic_challenge_with_credentials() -> None:
    assert answer('Basic realm="r"') == BasicAnswer(BASIC)
    assert auth.basic_authorization(("u", "p:q")) == "Basic " + base64.b64encode(
        b"u:p:q").decode()


def test_bearer_challenge_asks_the_realm_with_credentials() -> None:
    step = answer(f'Bearer realm="{REALM}",service="reg",scope="repository:acme/prof:pull"')
    assert isinstance(step, TokenRequest)
    assert step.realm == REALM
    assert step.headers == {"Accept-Encoding": "identity", "Authorization": BASIC}
    parts = urlsplit(step.url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == REALM
    assert parse_qs(parts.query) == {"service": ["reg"], "scope": [SCOPE]}


@pytest.mark.parametrize(("challenge", "login", "url", "headers"), [
    # anonymous token: no Authorization header at all
    (f'Bearer realm="{REALM}",service="reg"', NOBODY,
     f"{REALM}?service=reg&scope=repository%3Aacme%2Fprof%3Apull",
     {"Accept-Encoding": "identity"}),
    # the challenge's scope wins over ours; empty values are left out
    (f'Bearer realm="{REALM}",service="",scope="repository:other:pull"', NOBODY,
     f"{REALM}?scope=repository%3Aother%3Apull", {"Accept-Encoding": "identity"}),
    # a realm with a query of its own gets ours appended
    ('Bearer realm="https://reg.example/token?x=1"', ALICE,
     "https://reg.example/token?x=1&scope=repository%3Aacme%2Fprof%3Apull",
     {"Accept-Encoding": "identity", "Authorization": BASIC}),
    # a realm listed in token_realm_hosts (the default lists Docker Hub's)
    ('Bearer realm="https://auth.docker.io/token",service="registry.docker.io"', NOBODY,
     "https://auth.docker.io/token?service=registry.docker.io&"
     "scope=repository%3Aacme%2Fprof%3Apull", {"Accept-Encoding": "identity"}),
])
def test_token_requests(challenge: str, login: Login, url: str,
                        headers: dict[str, str]) -> None:
    step = answer(challenge, login)
    assert isinstance(step, TokenRequest)
    assert (step.url, step.headers) == (url, headers)


REFUSALS = [
    # (case, challenge, login, settings, error, message)
    ("basic without credentials", 'Basic realm="r"', NOBODY, SETTINGS, Unauthorized,
     "registry reg.example requires authentication and no credentials are configured for it "
     "(registry.docker_config)"),
    ("hint where they are", 'Basic realm="r"',
     Login(None, "", "; /c.json keeps them in a credential helper (credHelpers), which is not "
           "supported"), SETTINGS, Unauthorized,
     "(registry.docker_config); /c.json keeps them in a credential helper (credHelpers)"),
    ("unknown scheme", 'Negotiate x="\x1b[31m"', ALICE, SETTINGS, Unauthorized,
     "registry reg.example sent an unsupported authentication challenge 'Negotiate x="),
    ("empty challenge", "", ALICE, SETTINGS, Unauthorized,
     "sent an unsupported authentication challenge ''"),
    ("no realm", 'Bearer service="s"', ALICE, SETTINGS, Unauthorized,
     "sent a Bearer challenge with an unusable realm ''"),
    ("relative realm", 'Bearer realm="/token"', ALICE, SETTINGS, Unauthorized,
     "unusable realm '/token'"),
    ("file realm", 'Bearer realm="file:///etc/shadow"', ALICE, SETTINGS, Unauthorized,
     "unusable realm"),
    ("user-info realm", 'Bearer realm="https://u:p@reg.example/t"', ALICE, SETTINGS,
     Unauthorized, "unusable realm"),
    ("realm on another host", 'Bearer realm="https://collector.example/t?k=SECRET"', ALICE,
     SETTINGS, PolicyError, "registry reg.example named a token server on another host, not "
     "listed in registry.token_realm_hosts; refused"),
    ("realm on a sub-domain", 'Bearer realm="https://auth.reg.example/t"', NOBODY, SETTINGS,
     PolicyError, "named a token server on another host"),
    ("credentials to plain http", 'Bearer realm="http://reg.example/token?k=SECRET"', ALICE,
     SETTINGS, Unauthorized, "token server 'http://reg.example/token' is plain HTTP; the "
     "credentials for reg.example are not sent there"),
]


@pytest.mark.parametrize(("case", "challenge", "login", "settings", "error", "message"),
                         REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals(case: str, challenge: str, login: Login, settings: FetchSettings,
                  error: type[ArtifactError], message: str) -> None:
    with pytest.raises(error) as info:
        answer(challenge, login, settings)
    assert type(info.value) is error
    assert message in str(info.value)
    assert str(info.value).startswith(f"{REF}: ")
    assert (info.value.registry, info.value.status) == ("reg.example", 401)
    assert "SECRET" not in str(info.value) and "SECRET" not in (info.value.url or "")
    assert "\x1b" not in str(info.value)


def test_plain_http_realm_allowed_for_insecure_registry_or_without_credentials() -> None:
    challenge = 'Bearer realm="http://reg.example/token"'
    insecure = FetchSettings(allowed=("reg.example/*",),
                             insecure_registries=frozenset(["reg.example"]))
    step = answer(challenge, ALICE, insecure)
    assert isinstance(step, TokenRequest) and step.headers["Authorization"] == BASIC
    step = answer(challenge, NOBODY)
    assert isinstance(step, TokenRequest) and "Authorization" not in step.headers


@pytest.mark.parametrize(("realm", "hosts", "allowed"), [
    ("https://reg.example/t", (), True),
    ("https://REG.example:8443/t", (), True),  # same host, any port
    ("https://auth.example/t", ("auth.example",), True),
    ("https://auth.example:5001/t", ("auth.example:5001",), True),
    ("https://auth.example:5001/t", ("AUTH.example",), True),
    ("https://auth.example:5001/t", ("auth.example:5002",), False),
    ("https://evil.example/t", ("auth.example",), False),
    ("https://reg.example.evil/t", (), False),
])
def test_realm_allowed(realm: str, hosts: tuple[str, ...], allowed: bool) -> None:
    assert auth.realm_allowed(realm, URL, hosts) is allowed


# ---- the token server's answer -------------------------------------------------------


REQUEST = TokenRequest(f"{REALM}?scope=x", {}, "https://reg.example/token?k=SECRET")


@pytest.mark.parametrize(("raw", "value"), [
    (b'{"token": "abc"}', "Bearer abc"),
    (b'{"access_token": "xyz"}', "Bearer xyz"),
    (b'{"token": "", "access_token": "xyz"}', "Bearer xyz"),
    (b'{"token": "abc", "access_token": "xyz"}', "Bearer abc"),
])
def test_token_authorization(raw: bytes, value: str) -> None:
    assert auth.token_authorization(REF, REQUEST, raw) == value


@pytest.mark.parametrize("raw", [
    b"", b"{", b"[]", b'"abc"', b'{"token": 1}', b'{"token": ""}', b'{"token": "a\\r\\nX: y"}',
    b'{"token": "a\\nb"}', b'{"tok": "abc"}', b'{"token": ' + b"[" * 40 + b"]" * 40 + b"}",
    json.dumps({"token": None}).encode(),
])
def test_unusable_tokens(raw: bytes) -> None:
    with pytest.raises(Unauthorized) as info:
        auth.token_authorization(REF, REQUEST, raw)
    assert str(info.value) == (f"{REF}: token server 'https://reg.example/token' sent no "
                               "usable token")
    assert (info.value.registry, info.value.status) == ("reg.example", 401)
    assert info.value.url == "https://reg.example/token"


@pytest.mark.parametrize(("status", "login", "error", "message"), [
    (500, ALICE, RegistryUnavailable, "token server 'https://reg.example/token' answered "
     "HTTP 500"),
    (429, NOBODY, RegistryUnavailable, "answered HTTP 429"),
    (401, ALICE, Unauthorized, "answered HTTP 401; the credentials for reg.example from "
     "/etc/docker.json were refused"),
    (403, NOBODY, Unauthorized, "answered HTTP 403; registry reg.example requires "
     "authentication and no credentials are configured for it (registry.docker_config)"),
    (404, ALICE, Unauthorized, "answered HTTP 404"),
])
def test_token_refusal(status: int, login: Login, error: type[ArtifactError],
                       message: str) -> None:
    exc = auth.token_refusal(REF, REQUEST, login, status)
    assert type(exc) is error
    assert str(exc).endswith(message)
    assert (exc.registry, exc.status, exc.url) == ("reg.example", status,
                                                   "https://reg.example/token")
    assert "SECRET" not in str(exc)


# ---- identity (refresh) tokens ------------------------------------------------------------

TOKEN = "rEfReSh-T0KEN"
HOLDER = Login(source=" from /etc/docker.json", identity_token=TOKEN)
CHALLENGE = f'Bearer realm="{REALM}",service="reg",scope="repository:acme/prof:pull"'


def test_identity_token_is_posted_to_the_realm_as_a_refresh_token_grant() -> None:
    step = answer(CHALLENGE, HOLDER)
    assert isinstance(step, auth.RefreshRequest)
    assert (step.url, step.realm) == (REALM, REALM)
    assert step.headers == {"Accept-Encoding": "identity",
                            "Content-Type": "application/x-www-form-urlencoded"}
    assert parse_qs(step.body.decode(), strict_parsing=True) == {
        "grant_type": ["refresh_token"], "refresh_token": [TOKEN], "service": ["reg"],
        "scope": [SCOPE], "client_id": ["nri-seccomp"]}
    # the secret is in the body and the fallback only: not in the URL, not in a repr
    assert TOKEN not in step.url and TOKEN not in repr(step) and TOKEN not in repr(HOLDER)


def test_refresh_form() -> None:
    # several scopes stay one space-separated value; an empty scope is left out
    body = auth.refresh_form("t&k=v", "svc", "repository:a:pull repository:b:pull")
    assert parse_qs(body.decode()) == {
        "grant_type": ["refresh_token"], "refresh_token": ["t&k=v"], "service": ["svc"],
        "client_id": ["nri-seccomp"], "scope": ["repository:a:pull repository:b:pull"]}
    assert parse_qs(auth.refresh_form("t", "", "").decode(), keep_blank_values=True) == {
        "grant_type": ["refresh_token"], "refresh_token": ["t"], "service": [""],
        "client_id": ["nri-seccomp"]}


def test_refresh_fallback_is_the_get_with_the_token_as_password() -> None:
    """containerd's authorizer: a refresh token's POST answered 400, 401 or 404 → GET."""
    step = answer(CHALLENGE, HOLDER)
    assert isinstance(step, auth.RefreshRequest)
    assert sorted(auth.FALLBACK_STATUSES) == [400, 401, 404]
    parts = urlsplit(step.fallback.url)
    assert f"{parts.scheme}://{parts.netloc}{parts.path}" == REALM
    assert parse_qs(parts.query) == {"service": ["reg"], "scope": [SCOPE]}
    assert step.fallback.realm == REALM
    assert step.fallback.headers == {
        "Accept-Encoding": "identity",
        "Authorization": "Basic " + base64.b64encode(f":{TOKEN}".encode()).decode()}


@pytest.mark.parametrize(("challenge", "settings", "error", "message"), [
    ('Basic realm="r"', SETTINGS, Unauthorized, "registry reg.example asks for Basic "
     "authentication; the identity token for reg.example from /etc/docker.json is only sent "
     "to a token server"),
    ('Bearer realm="https://collector.example/t"', SETTINGS, PolicyError,
     "registry reg.example named a token server on another host, not listed in "
     "registry.token_realm_hosts; refused"),
    ('Bearer realm="http://reg.example/token"', SETTINGS, Unauthorized,
     "token server 'http://reg.example/token' is plain HTTP; the identity token for "
     "reg.example is not sent there"),
])
def test_identity_token_refusals(challenge: str, settings: FetchSettings,
                                 error: type[ArtifactError], message: str) -> None:
    with pytest.raises(error) as info:
        answer(challenge, HOLDER, settings)
    assert type(info.value) is error
    assert str(info.value) == f"{REF}: {message}"
    assert TOKEN not in str(info.value)


def test_identity_token_to_plain_http_realm_of_an_insecure_registry() -> None:
    insecure = FetchSettings(allowed=("reg.example/*",),
                             insecure_registries=frozenset(["reg.example"]))
    step = answer('Bearer realm="http://reg.example/token"', HOLDER, insecure)
    assert isinstance(step, auth.RefreshRequest) and step.url == "http://reg.example/token"


@pytest.mark.parametrize(("status", "posted", "error", "message"), [
    (401, 400, Unauthorized, "token server 'https://reg.example/token' answered HTTP 400 to "
     "the identity token's POST and HTTP 401 to the GET; the identity token for reg.example "
     "from /etc/docker.json was refused"),
    (403, None, Unauthorized, "answered HTTP 403; the identity token for reg.example from "
     "/etc/docker.json was refused"),
    (404, 404, Unauthorized, "answered HTTP 404 to the identity token's POST and HTTP 404 to "
     "the GET"),
    (503, 404, RegistryUnavailable, "answered HTTP 404 to the identity token's POST and HTTP "
     "503 to the GET"),
])
def test_identity_token_refusal(status: int, posted: int | None, error: type[ArtifactError],
                                message: str) -> None:
    step = answer(CHALLENGE, HOLDER)
    assert isinstance(step, auth.RefreshRequest)
    exc = auth.token_refusal(REF, step.fallback, HOLDER, status, posted=posted)
    assert type(exc) is error
    assert str(exc).endswith(message)
    assert TOKEN not in str(exc)


def test_redirected_post_is_not_followed() -> None:
    step = answer(CHALLENGE, HOLDER)
    assert isinstance(step, auth.RefreshRequest)
    exc = auth.token_refusal(REF, step, HOLDER, 307)
    assert str(exc).endswith("token server 'https://reg.example/token' answered HTTP 307; "
                             "a redirect is not followed with an identity token")


def test_login_is_basic_or_identity_token() -> None:
    assert (ALICE.present, ALICE.what, HOLDER.present, HOLDER.what, NOBODY.present) == (
        True, "credentials", True, "identity token", False)
    with pytest.raises(ValueError, match="not both"):
        Login(("u", "p"), identity_token="t")


# ---- identity tokens in config.json ------------------------------------------------------


def test_docker_config_identity_tokens() -> None:
    raw = json.dumps({"auths": {
        # docker login writes the user without a password beside the token: the token wins
        "https://index.docker.io/v1/": {"auth": base64.b64encode(b"alice:").decode(),
                                        "identitytoken": TOKEN},
        "tok.example": {"identitytoken": "other"},
        "basic.example": {"username": "u", "password": "p", "identitytoken": ""},
    }}).encode()
    entries = parse_docker_config(raw)
    assert entries == {"docker.io": Login(identity_token=TOKEN),
                       "tok.example": Login(identity_token="other"),
                       "basic.example": Login(("u", "p"))}


@pytest.mark.parametrize("token", [1, ["t"], "two\nlines", "with space"])
def test_docker_config_unusable_identity_token(token: object) -> None:
    raw = json.dumps({"auths": {"r.io": {"identitytoken": token}}}).encode()
    with pytest.raises(ValueError, match=r"'r\.io': \"identitytoken\" is not a single-line "
                                         "string"):
        parse_docker_config(raw)
