"""The dashboard's files: the page, its own scripts, plotly.js from the package, nothing else."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient


def test_the_page_loads_its_scripts_from_this_server(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    page = response.text
    for asset in ("/static/app.js", "/static/style.css", "/static/vendor/plotly.min.js"):
        assert asset in page
        assert client.get(asset).status_code == 200
    assert "https://" not in page  # nothing from a CDN: works offline


def test_plotly_comes_from_the_installed_package(client: TestClient) -> None:
    response = client.get("/static/vendor/plotly.min.js")
    assert response.headers["content-type"].startswith("text/javascript")
    assert "max-age" in response.headers["cache-control"]
    assert len(response.content) > 1_000_000 and b"plotly" in response.content[:2000].lower()


def scripts(client: TestClient) -> dict[str, str]:
    """The page's scripts: app.js and the modules it imports (``from "./x.js"``), served."""
    found: dict[str, str] = {}
    todo = ["app.js"]
    while todo:
        name = todo.pop()
        response = client.get(f"/static/{name}")
        assert response.status_code == 200, name
        found[name] = response.text
        todo += [n for n in re.findall(r'from "\./([\w-]+\.js)"', response.text) if n not in found]
    return found


def test_the_scripts_are_modules_of_this_server(client: TestClient) -> None:
    assert set(scripts(client)) == {"app.js", "common.js", "sweep.js"}


def test_every_request_of_the_scripts_goes_through_one_function(client: TestClient) -> None:
    lines = "\n".join(scripts(client).values()).splitlines()
    script = "\n".join(line for line in lines if not line.strip().startswith("//"))
    assert script.count("fetch(") == 1  # in api(): where the API key is added
    assert "Authorization" in script and "access_token" in script
    assert script.count("new EventSource(") == 1


@pytest.mark.parametrize(
    "path", ["/static/missing.js", "/static/..%2Fapp.py", "/static/.env", "/static/app.py"]
)
def test_nothing_else_is_served(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert "error" in response.json()


def test_the_dashboard_is_not_in_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)
    assert "/jobs/{job_id}/events" in paths and "/readyz" in paths and "/metrics" in paths


def test_no_other_site_may_frame_the_dashboard(client: TestClient) -> None:
    """A page on another port framed it in Chromium (a review): its buttons under another's."""
    for path in ("/", "/static/app.js", "/static/vendor/plotly.min.js"):
        headers = client.get(path).headers
        assert headers["content-security-policy"] == "frame-ancestors 'none'", path
        assert headers["x-frame-options"] == "DENY", path
        assert headers["x-content-type-options"] == "nosniff", path
