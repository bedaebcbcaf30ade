"""Who may ask: loopback by default, a token otherwise (header or login cookie), and nothing secret in any reply."""

from __future__ import annotations

import socket

import pytest
import typer
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from loupe.jobs.serve import serve_command
from loupe.jobs.serve.app import build_app
from loupe.jobs.serve.guard import COOKIE, check_bind
from loupe.schemas.errors import UserError

TOKEN = "s3cret-token-for-tests"


@pytest.fixture(scope="module")
def cli():
    app = typer.Typer()
    app.command("serve")(serve_command)
    app.command("other")(lambda: None)  # two commands, so "serve" is a subcommand as in loupe's CLI
    return lambda *args: CliRunner().invoke(app, ["serve", *args])


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1"])
def test_loopback_needs_no_token(host):
    check_bind(host, None)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "127.0.0.2", "example.org"])
def test_any_other_bind_needs_a_token(host):
    with pytest.raises(UserError, match="without a token"):
        check_bind(host, None)
    check_bind(host, TOKEN)


def test_the_command_refuses_an_open_bind_in_one_line(cli, tmp_path):
    result = cli(str(tmp_path), "--host", "0.0.0.0")
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "loupe: error: --host 0.0.0.0 would serve the catalog beyond this machine without a token; "
        "pass --token (or bind 127.0.0.1)"
    ]


def test_ctrl_c_stops_the_server_with_exit_130_and_no_resume_advice(cli, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("loupe.jobs.serve.command.serve_here", interrupted)
    result = cli(str(tmp_path))
    assert result.exit_code == 130 and result.stderr == ""


def test_a_taken_port_is_one_line(cli, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = cli(str(tmp_path), "--port", str(taken.getsockname()[1]))
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "cannot listen on 127.0.0.1:" in result.stderr


@pytest.fixture(scope="module")
def guarded(loaded):
    return TestClient(build_app(*loaded, token=TOKEN), follow_redirects=False)


def test_every_request_needs_the_token(guarded):
    for path in ("/api/status", "/api/search?q=x", "/openapi.json", "/docs", "/static/app.js", "/api/images/x/thumbnail"):
        answer = guarded.get(path)
        assert answer.status_code == 401, path
        assert answer.headers["www-authenticate"] == "Bearer" and "token" in answer.json()["detail"]
    page = guarded.get("/", headers={"Accept": "text/html"})
    assert page.status_code == 303 and page.headers["location"] == "/login"
    assert guarded.post("/api/search", files={"image": ("a.png", b"x")}).status_code == 401
    assert guarded.get("/api/status", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert guarded.get("/api/status", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert guarded.get("/login").status_code == 200 and guarded.get("/static/app.css").status_code == 200


def test_the_login_form_sets_a_cookie_that_is_not_the_token(loaded):
    client = TestClient(build_app(*loaded, token=TOKEN), follow_redirects=False)
    wrong = client.post("/login", data={"token": "guess"})
    assert wrong.status_code == 401 and "not the one" in wrong.text and COOKIE not in client.cookies
    right = client.post("/login", data={"token": TOKEN})
    assert right.status_code == 303 and right.headers["location"] == "/"
    cookie = right.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
    assert client.get("/api/status").status_code == 200 and client.get("/").status_code == 200


def test_without_a_token_the_login_form_is_not_needed(served_app):
    client = TestClient(served_app, follow_redirects=False)
    assert client.get("/login").headers["location"] == "/"


def test_no_secret_in_any_page_or_response(loaded, catalog_output, monkeypatch):
    endpoint = "http://127.0.0.1:9/secret-endpoint-name"
    catalog, searchers = loaded
    monkeypatch.setattr(catalog, "endpoint_url", endpoint)
    client = TestClient(build_app(catalog, searchers, token=TOKEN), headers={"Authorization": f"Bearer {TOKEN}"})
    image_id = catalog.rows.column("image_id")[2].as_py()
    secrets = (TOKEN, "secret-endpoint-name", "loupe-test-secret", "AWS_", "aws_secret")
    for path in (
        "/", "/docs", "/login", "/openapi.json", "/static/app.js", "/static/docs.js", "/api/status",
        "/api/categories", "/api/search?q=a", f"/api/images/{image_id}", "/api/review/violence_gore",
        "/api/search?like=nothing", "/api/nothing",
    ):
        text = client.get(path).text
        assert not any(secret in text for secret in secrets), path


def test_a_ray_address_needs_replicas(cli, tmp_path):
    result = cli(str(tmp_path), "--ray-address", "auto")
    assert result.exit_code == 2 and result.stderr.strip().splitlines() == [
        "loupe: error: --ray-address is where --replicas N run; give --replicas too"
    ]
