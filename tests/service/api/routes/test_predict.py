"""The predict endpoint with a model trained by a real worker on the generated digits."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.settings import Settings
from tests.service.api.routes.conftest import BOTH_WAYS, model_server, train_job
from tests.service.images import SVG, TEXT, png, png_claiming_size
from tests.support import synthetic_digits, together

pytestmark = BOTH_WAYS


def test_no_model_yet_is_409(client: TestClient) -> None:
    response = client.post("/predict", files={"file": ("d.png", png(np.zeros((28, 28), np.uint8)))})
    assert response.status_code == 409
    assert "no trained model yet" in response.json()["error"]["message"]


def test_predictions_agree_with_the_labels(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    job_id = train_job(client, sessions, api_settings)
    images, labels = synthetic_digits(100, seed=99)  # not the training images
    correct = 0
    for image, label in zip(images, labels, strict=True):
        response = client.post("/predict", files={"file": ("d.png", png(image), "image/png")})
        assert response.status_code == 200
        answer = response.json()
        assert answer["job_id"] == job_id
        assert len(answer["probabilities"]) == 10
        assert sum(answer["probabilities"]) == pytest.approx(1.0, abs=1e-5)
        assert answer["digit"] == int(np.argmax(answer["probabilities"]))
        correct += answer["digit"] == label
    assert correct >= 90

    explicit = client.post(
        f"/predict?job_id={job_id}", files={"file": ("d.png", png(images[0]))}
    ).json()
    assert explicit["job_id"] == job_id


def test_predict_errors(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    train_job(client, sessions, api_settings)
    digit = png(synthetic_digits(1, seed=5)[0][0])

    unknown = client.post(
        "/predict?job_id=0123456789abcdef0123456789abcdef", files={"file": ("d.png", digit)}
    )
    assert unknown.status_code == 404
    queued = client.post("/jobs", json={}).json()["id"]
    not_trained = client.post(f"/predict?job_id={queued}", files={"file": ("d.png", digit)})
    assert not_trained.status_code == 409
    assert "has no trained model" in not_trained.json()["error"]["message"]
    assert client.post("/predict?job_id=nope", files={"file": ("d.png", digit)}).status_code == 422

    garbage = client.post("/predict", files={"file": ("d.png", b"\x00\x01garbage" * 10)})
    assert garbage.status_code == 415
    assert "not an image" in garbage.json()["error"]["message"]
    empty = client.post("/predict", files={"file": ("d.png", b"")})
    assert empty.status_code == 422
    assert "empty" in empty.json()["error"]["message"]
    truncated = client.post("/predict", files={"file": ("d.png", digit[: len(digit) // 2])})
    assert truncated.status_code == 422
    missing = client.post("/predict", data={"other": "x"})
    assert missing.status_code == 422
    assert "file" in missing.json()["error"]["message"]
    # The server still answers after all that.
    assert client.post("/predict", files={"file": ("d.png", digit)}).status_code == 200


def test_uploads_over_the_cap_are_413(client: TestClient, api_settings: Settings) -> None:
    too_big = b"\x89PNG" + b"\x00" * api_settings.max_upload_bytes
    response = client.post("/predict", files={"file": ("d.png", too_big)})
    assert response.status_code == 413


# --- every way to send images ----------------------------------------------------------------


def test_file_files_raw_body_and_pixels_give_the_same_answer(
    client: TestClient, trained: str
) -> None:
    digit = synthetic_digits(1, seed=21)[0][0]
    data = png(digit)
    answers = [
        client.post("/predict", files={"file": ("d.png", data, "image/png")}),
        client.post("/predict", content=data, headers={"content-type": "image/png"}),
        client.post("/predict", json={"pixels": digit.tolist()}),
        client.post("/predict", json={"pixels": (255 - digit).astype(float).tolist()}),
    ]
    assert [a.status_code for a in answers] == [200] * 4
    first = answers[0].json()
    assert first["job_id"] == trained and "top_k" not in first
    assert all(a.json() == first for a in answers)
    batch = client.post("/predict", files=[("files", ("d.png", data, "image/png"))])
    assert batch.json() == {"job_id": trained, "predictions": [first]}


def test_several_files_get_one_answer_each_in_order(client: TestClient, trained: str) -> None:
    images, labels = synthetic_digits(6, seed=22)
    singles = [client.post("/predict", files={"file": ("d.png", png(i))}).json() for i in images]
    files = [("files", (f"{n}.png", png(i), "image/png")) for n, i in enumerate(images)]
    batch = client.post("/predict", files=files)
    assert batch.status_code == 200
    assert batch.json()["job_id"] == trained
    predictions = batch.json()["predictions"]
    assert len(predictions) == len(singles)
    for got, single in zip(predictions, singles, strict=True):  # a batched matmul rounds apart
        assert got["digit"] == single["digit"] and got["job_id"] == single["job_id"]
        assert got["probabilities"] == pytest.approx(single["probabilities"], abs=1e-6)
    assert [p["digit"] for p in singles] == labels.tolist()


def test_top_k_lists_the_k_most_probable_digits(client: TestClient, trained: str) -> None:
    data = png(synthetic_digits(1, seed=23)[0][0])
    answer = client.post("/predict?top_k=3", files={"file": ("d.png", data)}).json()
    top = answer["top_k"]
    assert top[0]["digit"] == answer["digit"] and len(top) == 3
    assert [t["probability"] for t in top] == sorted(answer["probabilities"], reverse=True)[:3]
    assert sum(answer["probabilities"]) == pytest.approx(1.0, abs=1e-12)
    everything = client.post("/predict?top_k=10", json={"pixels": [[0] * 28] * 28}).json()
    assert sorted(t["digit"] for t in everything["top_k"]) == list(range(10))
    for bad in ("0", "11", "x"):
        assert client.post(f"/predict?top_k={bad}", content=data).status_code == 422


def test_request_shapes_that_are_not_understood_are_4xx(client: TestClient, trained: str) -> None:
    data = png(synthetic_digits(1, seed=24)[0][0])

    def refused(status: int, phrase: str, **request: Any) -> None:
        response = client.post("/predict", **request)
        assert response.status_code == status, (request, response.text)
        assert phrase in response.json()["error"]["message"], response.text

    refused(422, "not both", files=[("file", ("a.png", data)), ("files", ("b.png", data))])
    refused(
        422, "`file` takes one image", files=[("file", ("a.png", data)), ("file", ("b.png", data))]
    )
    refused(422, "unexpected form field 'image'", files={"image": ("a.png", data)})
    refused(422, "not an uploaded file", files={"file": (None, b"text")})
    refused(422, "the request is empty", content=b"")
    refused(422, "the image is empty", content=b"", headers={"content-type": "image/png"})
    refused(
        415, "accepted image formats: PNG", content=data, headers={"content-type": "text/plain"}
    )
    refused(415, "cannot read a body without a content type", content=data)
    no_boundary = {"content-type": "multipart/form-data"}  # told in our words, not Starlette's
    refused(
        422, "the multipart content type names no boundary", content=b"--x\r\n", headers=no_boundary
    )
    refused(
        404,
        "no model alias",
        params={"job_id": trained, "model": "production"},
        content=data,
        headers={"content-type": "image/png"},
    )
    refused(422, "model", params={"model": "no spaces"}, content=data)


def test_pixels_are_read_as_every_json_body_is(client: TestClient, trained: str) -> None:
    """``POST /predict`` reads its own body; its JSON is read, and refused, as FastAPI reads
    ``POST /sweeps``'s (it was pydantic's own parser: UTF-16 and a BOM were "Invalid JSON")."""
    json_type = {"content-type": "application/json"}
    text = json.dumps({"pixels": [[0] * 28] * 28})
    utf8 = client.post("/predict", content=text.encode(), headers=json_type)
    assert utf8.status_code == 200, utf8.text
    for encoding in ("utf-8-sig", "utf-16", "utf-32"):
        other = client.post("/predict", content=text.encode(encoding), headers=json_type)
        assert (other.status_code, other.json()) == (200, utf8.json()), encoding
    for broken in (b'{"pixels": [', b'{"pixels": "\\ud800', b"{pixels}", b""):
        jobs = client.post("/sweeps", content=broken, headers=json_type)  # its body is required
        predict = client.post("/predict", content=broken, headers=json_type)
        assert jobs.status_code == predict.status_code == 422, (broken, predict.text)
        assert jobs.json()["error"] == predict.json()["error"], broken


def test_pixels_of_the_wrong_shape_range_or_type_are_422(client: TestClient, trained: str) -> None:
    row = [0] * 28
    cases = {
        "27 rows": {"pixels": [row] * 27},
        "29 columns": {"pixels": [row] * 27 + [[0] * 29]},
        "negative": {"pixels": [row] * 27 + [[-1] + [0] * 27]},
        "above 255": {"pixels": [row] * 27 + [[256] + [0] * 27]},
        "a string": {"pixels": [row] * 27 + [["7"] + [0] * 27]},
        "flat": {"pixels": [0] * 784},
        "no pixels": {"image": [row] * 28},
        "extra field": {"pixels": [row] * 28, "label": 3},
    }
    for name, body in cases.items():
        response = client.post("/predict", json=body)
        assert response.status_code == 422, name
        assert response.json()["error"]["details"][0]["loc"][0] == "body", name
    nan = client.post(
        "/predict", content=b'{"pixels": NaN}', headers={"content-type": "application/json"}
    )
    assert nan.status_code == 422
    broken = client.post(
        "/predict", content=b'{"pixels": [', headers={"content-type": "application/json"}
    )
    assert broken.status_code == 422
    huge = client.post(
        "/predict", content=b" " * 300_000, headers={"content-type": "application/json"}
    )
    assert huge.status_code == 413


def test_size_and_count_limits_are_413(
    client: TestClient, api_settings: Settings, trained: str
) -> None:
    data = png(synthetic_digits(1, seed=25)[0][0])
    limit = api_settings.max_images_per_request
    at_limit = client.post("/predict", files=[("files", ("d.png", data))] * limit)
    assert at_limit.status_code == 200 and len(at_limit.json()["predictions"]) == limit
    over = client.post("/predict", files=[("files", ("d.png", data))] * (limit + 1))
    assert over.status_code == 413
    assert f"at most {limit} per request" in over.json()["error"]["message"]

    too_big = b"\x89PNG" + b"\x00" * api_settings.max_upload_bytes
    big_in_batch = client.post(
        "/predict", files=[("files", ("a.png", data)), ("files", ("b.png", too_big))]
    )
    assert big_in_batch.status_code == 413
    assert "files[1] is larger than" in big_in_batch.json()["error"]["message"]
    raw = client.post("/predict", content=too_big, headers={"content-type": "image/png"})
    assert raw.status_code == 413
    bomb = client.post(
        "/predict", content=png_claiming_size(20_000, 20_000), headers={"content-type": "image/png"}
    )
    assert bomb.status_code == 413 and "pixels" in bomb.json()["error"]["message"]
    assert (
        client.post("/predict", content=data, headers={"content-type": "image/png"}).status_code
        == 200
    )


def test_concurrent_requests_load_each_checkpoint_once(
    client: TestClient, sessions: sessionmaker[Session], api_settings: Settings
) -> None:
    first = train_job(client, sessions, api_settings)
    second = train_job(client, sessions, api_settings)
    cache = client.app.state.predictor.models  # type: ignore[attr-defined]
    data = png(synthetic_digits(1, seed=26)[0][0])
    asks = [
        partial(client.post, f"/predict?job_id={j}", files={"file": ("d.png", data)})
        for j in [first, second] * 8
    ]
    answers = [response.json()["job_id"] for response in together(asks)]
    assert sorted(answers) == sorted([first, second] * 8)
    assert cache.loads == 2


# --- a real server against bad input ---------------------------------------------------------


@pytest.fixture
def served_model(
    sqlite_url: str, small_mnist: Path, tmp_path: Path, fast_lanes: bool
) -> Iterator[httpx.Client]:
    """A real uvicorn serving a model that a real worker trained on the generated digits."""
    lanes = str(fast_lanes).lower()
    with model_server(
        sqlite_url, small_mnist, tmp_path, epochs=2, max_images_per_request="4", fast_lanes=lanes
    ) as (_proc, client):
        yield client


def test_concurrent_requests_each_get_their_own_answer(served_model: httpx.Client) -> None:
    # Requests that reach the server together share forward passes: none may get another's rows.
    images, _ = synthetic_digits(24, seed=40)
    bodies = [png(image) for image in images]
    raw = {"content-type": "image/png"}
    alone = [served_model.post("/predict", content=b, headers=raw).json() for b in bodies]
    at_once = together(
        [partial(served_model.post, "/predict", content=b, headers=raw) for b in bodies]
    )
    for response, want in zip(at_once, alone, strict=True):
        got = response.json()
        assert got["digit"] == want["digit"]
        assert got["probabilities"] == pytest.approx(want["probabilities"], abs=1e-6)
    assert len({tuple(a["probabilities"]) for a in alone}) == len(bodies)  # all told apart


def test_each_bad_input_gets_its_4xx_and_the_server_keeps_answering(
    served_model: httpx.Client,
) -> None:
    digit = synthetic_digits(1, seed=27)[0][0]
    good = png(digit)
    noisy = png(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8))
    as_png = {"content-type": "image/png"}
    bad: dict[str, tuple[int, dict[str, Any]]] = {
        "truncated png": (422, {"content": noisy[: len(noisy) // 2], "headers": as_png}),
        "20000×20000 png of a few bytes": (
            413,
            {"files": {"file": ("bomb.png", png_claiming_size(20_000, 20_000), "image/png")}},
        ),
        "svg": (415, {"files": {"file": ("d.svg", SVG, "image/svg+xml")}}),
        "text named .png": (415, {"files": {"file": ("d.png", TEXT, "image/png")}}),
        "empty body": (422, {"content": b"", "headers": as_png}),
        "empty file": (422, {"files": {"file": ("d.png", b"")}}),
        "too many files": (413, {"files": [("files", ("d.png", good))] * 5}),
        "pixels of the wrong shape": (422, {"json": {"pixels": [[0] * 28] * 27}}),
        "pixels out of range": (422, {"json": {"pixels": [[300] * 28] * 28}}),
    }
    for name, (status, request) in bad.items():
        response = served_model.post("/predict", **request)
        assert response.status_code == status, (name, response.text)
        assert response.json()["error"]["message"], name
        ok = served_model.post("/predict", content=good, headers=as_png)
        assert ok.status_code == 200, (name, ok.text)
    svg = served_model.post("/predict", content=SVG, headers={"content-type": "image/svg+xml"})
    assert "accepted: PNG, JPEG, BMP, GIF (first frame), WebP" in svg.json()["error"]["message"]
    assert served_model.get("/healthz").status_code == 200


def test_the_api_documents_every_way_to_send_images(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    body = spec["paths"]["/predict"]["post"]["requestBody"]["content"]
    assert set(body) == {"multipart/form-data", "image/*", "application/json"}
    # Named schemas, so that a generated client has a PredictForm and a PixelsInput class.
    assert body["multipart/form-data"]["schema"] == {"$ref": "#/components/schemas/PredictForm"}
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/PixelsInput"}
    form = spec["components"]["schemas"]["PredictForm"]
    assert set(form["properties"]) == {"file", "files"}
    # Exactly one of the two and nothing else, as the route reads the form (422 otherwise).
    assert (form["minProperties"], form["maxProperties"]) == (1, 1)
    assert form["additionalProperties"] is False
    assert form["properties"]["files"]["minItems"] == 1
    params = {p["name"] for p in spec["paths"]["/predict"]["post"]["parameters"]}
    assert params == {"job_id", "model", "top_k"}


def test_a_bad_image_sent_as_files_is_named_even_alone(client: TestClient, trained: str) -> None:
    broken = png(synthetic_digits(1, seed=26)[0][0])[:60]
    alone = client.post("/predict", files=[("files", ("a.png", broken))])
    assert alone.status_code == 422
    assert alone.json()["error"]["message"].startswith("files[0]: ")
    single = client.post("/predict", files={"file": ("a.png", broken)})
    assert single.status_code == 422
    assert not single.json()["error"]["message"].startswith("file")


def test_a_form_cut_short_is_400_saying_so(client: TestClient, trained: str) -> None:
    # Every part but the closing delimiter: read as it came, the form lost its image and was
    # answered "no image file".
    data = png(synthetic_digits(1, seed=27)[0][0])
    boundary = "cut"
    whole = (
        (
            f"--{boundary}\r\n"
            'Content-Disposition: form-data; name="file"; filename="d.png"\r\n'
            "Content-Type: image/png\r\n\r\n"
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    headers = {"content-type": f"multipart/form-data; boundary={boundary}"}
    assert client.post("/predict", content=whole, headers=headers).status_code == 200
    for cut in (whole[: -len(f"--{boundary}--\r\n")], whole[:-40], whole[:100]):
        answer = client.post("/predict", content=cut, headers=headers)
        assert answer.status_code == 400, answer.text
        assert "ends before its closing delimiter" in answer.json()["error"]["message"]


def test_a_boundary_longer_than_the_parser_takes_is_400_in_our_words(client: TestClient) -> None:
    boundary = "b" * 300
    answer = client.post(
        "/predict",
        content=f"--{boundary}--\r\n".encode(),
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
    )
    assert answer.status_code == 400
    assert answer.json()["error"]["message"] == (
        "the multipart boundary is not usable (300 bytes; at most 256)"
    )
