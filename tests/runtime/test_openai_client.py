"""`sdruntime serve` driven by the official `openai` Python client, unchanged: images.generate and images.edit,
the models endpoints, and errors in OpenAI's shape that the client raises as its own exception classes. One server
for the module (tiny-sd, 32x32, 2 steps); the pictures are compared with the Python API's."""

from __future__ import annotations

import base64
import io
import json
import time

import numpy as np
import pytest
from PIL import Image
from sdruntime.pipeline import StableDiffusionPipeline

from tests.runtime.test_serve import PROMPT, plain_server, png_file, request

openai = pytest.importorskip("openai")

FAST = {"steps": 2}  # our own fields ride in extra_body


@pytest.fixture(scope="module")
def served(tiny32, tmp_path_factory):
    yield from plain_server(tiny32, tmp_path_factory.mktemp("openai") / "serve.log")


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(tiny32):
    return StableDiffusionPipeline.load(tiny32)


def pixels(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def test_generate_draws_the_python_apis_images_with_our_fields_in_extra_body(client, local, tiny32):
    extra = {"seed": 5, "steps": 2, "scheduler": "euler", "negative_prompt": "blurry", "guidance": 5.0}
    before = int(time.time())
    answer = client.images.generate(
        model=tiny32.name, prompt=PROMPT, n=2, size="32x32", response_format="b64_json", extra_body=extra
    )
    assert isinstance(answer, openai.types.ImagesResponse) and before <= answer.created <= time.time() + 1
    settings = {"negative_prompt": "blurry", "num_inference_steps": 2, "scheduler": "euler", "guidance_scale": 5.0}
    assert [d.model_extra["seed"] for d in answer.data] == [5, 6] and answer.data[0].revised_prompt is None
    for image, seed in zip(answer.data, (5, 6)):
        alone = local(PROMPT, **settings, seed=seed, height=32, width=32)
        assert image.url is None and np.array_equal(
            pixels(base64.b64decode(image.b64_json)), np.asarray(alone.images[0])
        )
        assert image.model_extra["parameters"] == alone.parameters[0]
    # the fields in extra_body do reach the drawing: another seed, another picture
    other = client.images.generate(prompt=PROMPT, size="32x32", extra_body={**extra, "seed": 9})
    first = pixels(base64.b64decode(answer.data[0].b64_json))
    assert not np.array_equal(pixels(base64.b64decode(other.data[0].b64_json)), first)


def test_json_is_the_default_and_url_serves_the_same_png_for_a_while(client, tiny32):
    body = {"prompt": PROMPT, "size": "32x32", "extra_body": {**FAST, "seed": 3}}
    plain = client.images.generate(**body)  # no response_format: JSON with b64_json, as OpenAI answers
    assert isinstance(plain, openai.types.ImagesResponse) and plain.output_format == "png"
    linked = client.images.generate(**body, response_format="url")
    assert linked.data[0].b64_json is None
    status, headers, png = request(linked.data[0].url)
    assert status == 200 and headers["content-type"] == "image/png"
    assert png == base64.b64decode(plain.data[0].b64_json)
    status, _, body = request(linked.data[0].url.replace(".png", "x.png"))
    assert status == 404 and json.loads(body)["error"]["code"] == "image_not_found"


def test_a_bad_size_and_unavailable_values_raise_the_clients_bad_request_with_their_param(client):
    for options, param, code in [
        ({"size": "33x33"}, "size", "invalid_value"),
        ({"size": "1024"}, "size", "invalid_value"),
        ({"quality": "hd"}, "quality", "unsupported_value"),
        ({"style": "natural"}, "style", "unsupported_value"),
        ({"output_format": "jpeg"}, "output_format", "unsupported_value"),
        ({"n": 9}, "n", "invalid_value"),
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.images.generate(prompt=PROMPT, extra_body=FAST, **options)
        error = caught.value
        assert (error.status_code, error.type, error.param, error.code) == (400, "invalid_request_error", param, code)
        assert "\n" not in error.message
    # the values that mean what this server does anyway are taken
    taken = {"quality": "auto", "style": "vivid", "user": "u-1", "output_format": "png", "moderation": "auto"}
    answer = client.images.generate(prompt=PROMPT, size="32x32", extra_body=FAST, **taken)
    assert len(answer.data) == 1


def test_another_model_name_is_not_found_in_openais_shape(client, tiny32):
    with pytest.raises(openai.NotFoundError) as caught:
        client.images.generate(model="dall-e-3", prompt=PROMPT, extra_body=FAST)
    assert (caught.value.code, caught.value.param) == (
        "model_not_found",
        "model",
    ) and tiny32.name in caught.value.message
    [card] = client.models.list().data
    assert (card.id, card.object, card.owned_by) == (tiny32.name, "model", "sdexport")
    assert card.created == int((tiny32 / "sdexport.json").stat().st_mtime)
    assert client.models.retrieve(tiny32.name) == card
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("gpt-image-2")
    assert caught.value.code == "model_not_found"


def test_unknown_routes_and_methods_answer_in_openais_error_shape(client, served):
    with pytest.raises(openai.NotFoundError) as caught:
        client.get("/images/variants", cast_to=object)
    assert caught.value.body == {
        "message": "Invalid URL (GET /v1/images/variants): see GET /v1/models, POST /v1/images/generations and "
        "/v1/images/edits",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }
    for path in ("/v1/images/generations", "/v1/images/edits"):
        status, headers, body = request(served.url + path)
        assert status == 405 and headers["allow"] == "POST"
        assert set(json.loads(body)["error"]) == {"message", "type", "param", "code"}
    form = {"Content-Type": "multipart/form-data"}  # no boundary: not a form that can be read
    status, _, body = request(served.url + "/v1/images/edits", b"--x\r\n", headers=form)
    assert status == 400 and json.loads(body)["error"]["message"].startswith("the body is not a readable multipart")


def test_edit_inpaints_where_openais_mask_is_transparent(client, local, tiny32):
    """images.edit (multipart): the mask's fully transparent pixels are repainted, as OpenAI documents, so the
    picture is the Python API's with a mask that is white there; the other way round it is another picture."""
    yy, xx = np.mgrid[:32, :48]
    init = png_file(Image.fromarray(np.dstack([xx * 5, yy * 7, 255 - xx * 5]).astype(np.uint8)))
    hole = (xx > 8) & (xx < 30) & (yy > 4)
    alpha = np.where(hole, 0, 255).astype(np.uint8)
    mask = png_file(Image.fromarray(np.dstack([np.zeros((32, 48, 3), np.uint8), alpha]), "RGBA"))
    extra = {"seed": 4, "steps": 2, "scheduler": "ddim"}
    edited = client.images.edit(
        model=tiny32.name, image=("in.png", init), mask=("mask.png", mask), prompt=PROMPT, extra_body=extra
    )
    white = png_file(Image.fromarray(np.where(hole, 255, 0).astype(np.uint8)))
    alone = local(PROMPT, image=init, mask_image=white, num_inference_steps=2, scheduler="ddim", seed=4)
    drawn = pixels(base64.b64decode(edited.data[0].b64_json))
    assert drawn.shape == (32, 48, 3) and np.array_equal(drawn, np.asarray(alone.images[0]))
    inverted = png_file(Image.fromarray(np.where(hole, 0, 255).astype(np.uint8)))
    other = local(PROMPT, image=init, mask_image=inverted, num_inference_steps=2, scheduler="ddim", seed=4)
    assert not np.array_equal(drawn, np.asarray(other.images[0]))
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.edit(image=[("a.png", init), ("b.png", init)], prompt=PROMPT, extra_body=extra)
    assert caught.value.param == "image"
