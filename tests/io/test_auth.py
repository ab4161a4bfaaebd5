"""Headers for http(s) reads from the environment: which host gets which, the Hugging Face token,
redirects, and that no message or log line shows a value. Real servers on 127.0.0.1 only."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.token_server import token_server
from wds_reinforce.core.errors import UsageError
from wds_reinforce.io.auth import HEADERS_ENV, Headers, authorize, authorized_open, http_headers
from wds_reinforce.io.retry import watched_opener
from wds_reinforce.io.storage import check_settings, read_url

TOKEN = "hf_s3cr3t-t0ken-value"


@pytest.fixture(autouse=True)
def quiet_env(monkeypatch, tmp_path, loopback_only):
    """No token or header setting of the machine leaks in; fast retries."""
    for name in ("HF_TOKEN", HEADERS_ENV, "HF_TOKEN_PATH", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no token file there
    monkeypatch.setenv("WDS_REINFORCE_BACKOFF", "0.001")
    monkeypatch.setenv("WDS_REINFORCE_BACKOFF_MAX", "0.002")


def _setting(monkeypatch, value) -> None:
    monkeypatch.setenv(HEADERS_ENV, json.dumps(value))


def test_headers_for_every_host_one_host_and_a_domain(monkeypatch):
    _setting(
        monkeypatch,
        {
            "X-Team": "vision",
            "data.example.com": {"Authorization": "Bearer a"},
            "*.example.com": {"Authorization": "Bearer b", "X-Zone": "eu"},
        },
    )
    domain = {"X-Team": "vision", "Authorization": "Bearer b", "X-Zone": "eu"}
    assert http_headers("https://data.example.com/x.tar") == {**domain, "Authorization": "Bearer a"}  # its own wins
    assert http_headers("https://cdn.example.com/x.tar") == domain
    assert http_headers("http://example.com/x") == domain
    assert http_headers("http://other.org/x") == {"X-Team": "vision"}
    assert http_headers("s3://bucket/key") == {}
    assert "Bearer" not in repr(http_headers("https://data.example.com/x")) and "Bearer" not in str(
        http_headers("https://data.example.com/x")
    )


def test_the_hugging_face_token_goes_to_hub_hosts_only(monkeypatch, tmp_path):
    hub = "https://huggingface.co/datasets/org/name/resolve/main/train-000000.tar"
    assert http_headers(hub) == {}  # no token anywhere: anonymous
    (tmp_path / "hf-home").mkdir()
    (tmp_path / "hf-home" / "token").write_text("from-home\n")
    assert http_headers(hub) == {"Authorization": "Bearer from-home"}  # $HF_HOME/token
    (tmp_path / "elsewhere").write_text("from-path")
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "elsewhere"))
    assert http_headers("https://hf.co/x") == {"Authorization": "Bearer from-path"}  # HF_TOKEN_PATH first
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    for url in (hub, "https://cdn-lfs.huggingface.co/x", "https://hf.co/x", "https://cas-bridge.xethub.hf.co/x"):
        assert http_headers(url) == {"Authorization": f"Bearer {TOKEN}"}, url
    for url in ("https://nothuggingface.co/x", "https://huggingface.co.evil.example/x", "https://example.com/x"):
        assert http_headers(url) == {}, url
    _setting(monkeypatch, {"huggingface.co": {"Authorization": "Bearer mine"}})
    assert http_headers(hub) == {"Authorization": "Bearer mine"}  # the setting wins


def test_the_default_token_file_is_under_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    (tmp_path / "cache" / "huggingface").mkdir(parents=True)
    (tmp_path / "cache" / "huggingface" / "token").write_text(TOKEN)
    assert http_headers("https://huggingface.co/x") == {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize(
    "value, match",
    [
        ("not json " + TOKEN, "to be a JSON object"),
        (json.dumps([TOKEN]), "to be a JSON object"),
        (json.dumps({"Bad Name": TOKEN}), "header names"),
        (json.dumps({"X-A": TOKEN + "\r\nX-Injected: 1"}), "'X-A' to be one line"),
        (json.dumps({"h.example": {"X-A": 3}}), "'X-A' to be one line"),
        (json.dumps({"X-A": TOKEN + "\x00"}), "'X-A' to be one line"),
        (json.dumps({"h.example": {"X-A": TOKEN + "\u20ac"}}), "'X-A' to be one line"),  # not Latin-1
    ],
)
def test_a_bad_setting_is_refused_without_showing_its_value(monkeypatch, value, match):
    monkeypatch.setenv(HEADERS_ENV, value)
    with pytest.raises(UsageError, match=match) as caught:
        check_settings()  # (what ReinforcedDataset checks at start)
    assert TOKEN not in str(caught.value)


def test_a_token_protected_server_is_read_with_the_token_only(tmp_path, monkeypatch):
    (tmp_path / "a.bin").write_bytes(b"protected bytes")
    with token_server(tmp_path, TOKEN) as srv:
        with pytest.raises(FileNotFoundError, match="HTTP 401") as caught:
            read_url(f"{srv.base}/a.bin")
        assert TOKEN not in str(caught.value)
        _setting(monkeypatch, {"127.0.0.1": {"Authorization": "Bearer wrong-" + TOKEN}})
        with pytest.raises(FileNotFoundError, match="HTTP 403") as caught:
            read_url(f"{srv.base}/a.bin")
        assert TOKEN not in str(caught.value) and "Bearer" not in str(caught.value)
        assert len(srv.requests) == 2, "a 401 or 403 is not retried"
        _setting(monkeypatch, {"127.0.0.1": {"Authorization": f"Bearer {TOKEN}"}})
        assert read_url(f"{srv.base}/a.bin") == b"protected bytes"


def test_retry_log_lines_do_not_show_the_token(tmp_path, monkeypatch, caplog):
    (tmp_path / "a.bin").write_bytes(b"x" * 5000)
    _setting(monkeypatch, {"127.0.0.1": {"Authorization": f"Bearer {TOKEN}"}})
    with token_server(tmp_path, TOKEN) as srv, caplog.at_level("WARNING", logger="wds_reinforce.io.remote"):
        srv.unavailable = 2
        assert read_url(f"{srv.base}/a.bin") == b"x" * 5000
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all("HTTP 503" in line for line in lines)
    assert not any(TOKEN in line or "Bearer" in line for line in lines)


def test_a_redirect_carries_the_headers_to_the_same_origin_only(tmp_path, monkeypatch):
    (tmp_path / "a.bin").write_bytes(b"moved bytes")
    _setting(monkeypatch, {"127.0.0.1": {"Authorization": f"Bearer {TOKEN}"}})
    with token_server(tmp_path, TOKEN) as hub, token_server(tmp_path, None) as cdn:
        hub.redirects["/same.bin"] = f"{hub.base}/a.bin"  # same origin: still needs (and gets) the token
        assert read_url(f"{hub.base}/same.bin") == b"moved bytes"
        assert hub.requests == [("/same.bin", f"Bearer {TOKEN}"), ("/a.bin", f"Bearer {TOKEN}")]
        hub.redirects["/elsewhere.bin"] = f"{cdn.base}/a.bin"  # another port: another origin, as the Hub's CDN
        assert read_url(f"{hub.base}/elsewhere.bin") == b"moved bytes"
        assert cdn.requests == [("/a.bin", None)], "the token must not follow a redirect to another host"


def test_the_hugging_face_token_goes_over_https_only(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert http_headers("https://huggingface.co/x") == {"Authorization": f"Bearer {TOKEN}"}
    for url in ("http://huggingface.co/x", "http://hf.co/x", "HTTP://cdn-lfs.huggingface.co/x"):
        assert http_headers(url) == {}, url
    _setting(monkeypatch, {"*.hf.co": {"Authorization": "Bearer mine"}})  # the user's setting goes where they said
    assert http_headers("http://hf.co/x") == {"Authorization": "Bearer mine"}


@pytest.mark.parametrize("bad", [f"{TOKEN}\nx", f"{TOKEN}\rX-Injected: 1", f"{TOKEN}\x1b[0m", f"{TOKEN}\u00e9"])
def test_a_token_of_more_than_one_printable_ascii_line_is_refused_naming_where_it_came_from(monkeypatch, tmp_path, bad):
    hub = "https://huggingface.co/datasets/org/name/resolve/main/train-000000.tar"
    monkeypatch.setenv("HF_TOKEN", bad)
    with pytest.raises(UsageError, match="Hugging Face token in HF_TOKEN to be one line of printable ASCII") as caught:
        http_headers(hub)
    assert TOKEN not in str(caught.value)
    monkeypatch.delenv("HF_TOKEN")
    (tmp_path / "token").write_text(bad + "\n", encoding="utf-8")
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "token"))
    with pytest.raises(UsageError, match="in the token file .*token to be one line") as caught:
        http_headers(hub)
    assert TOKEN not in str(caught.value) and str(tmp_path / "token") in str(caught.value)
    (tmp_path / "token").write_bytes(TOKEN.encode() + b"\xff\xfe")  # not UTF-8: refused too, not a decode error
    with pytest.raises(UsageError, match="in the token file"):
        http_headers(hub)


def test_a_header_value_http_client_would_repeat_is_refused_without_it(tmp_path):
    with token_server(tmp_path, TOKEN) as srv:
        request = urllib.request.Request(f"{srv.base}/a.bin")
        with pytest.raises(UsageError, match="the Authorization header for 127.0.0.1:.* one line") as caught:
            authorize(request, Headers({"Authorization": f"Bearer {TOKEN}\nx"}))
        assert TOKEN not in str(caught.value)
        # what http.client itself refuses (a header urllib got elsewhere): its message, with the value, is replaced
        request = urllib.request.Request(f"{srv.base}/a.bin", headers={"X-Secret": f"{TOKEN}\nx"})
        with pytest.raises(UsageError, match="http.client refused a header value or the URL") as caught:
            authorized_open(watched_opener(), request, Headers(), 5.0)
        assert TOKEN not in str(caught.value) and caught.value.__context__ is None and caught.value.__cause__ is None
        assert srv.requests == [], "nothing was sent"


def test_a_url_http_client_cannot_send_is_a_usage_error(tmp_path):
    with token_server(tmp_path, None) as srv:
        with pytest.raises(UsageError, match="http.client refused a header value or the URL"):
            read_url(f"{srv.base}/caf\u00e9.bin")
        assert srv.requests == []
