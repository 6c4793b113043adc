"""--api-key: bearer tokens compared in constant time; and the `openai` Python client, unchanged,
calling /v1/images/generations and /v1/chat/completions (plain and streamed)."""

from __future__ import annotations

import base64
import io

import httpx
import pytest
from PIL import Image
from serve_util import FAST, data_url, live_server, png_bytes

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def locked(engine, ckpt, tmp_path_factory):
    with live_server(engine, ckpt, tmp_path_factory.mktemp("locked"), api_key=KEY) as live:
        yield live


@pytest.mark.parametrize("header", [None, "Bearer wrong", f"Basic {KEY}", f"Bearer {KEY}x", "Bearer"])
def test_a_missing_or_wrong_key_is_401(locked, header):
    r = httpx.get(f"{locked.url}/v1/models", headers={"Authorization": header} if header else {})
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert r.json()["error"]["code"] == "invalid_api_key"


def test_the_right_key_passes_and_health_needs_none(locked):
    assert httpx.get(f"{locked.url}/healthz").status_code == 200
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{locked.url}/v1/models", headers=auth).status_code == 200
    r = httpx.post(f"{locked.url}/v1/images/generations", headers=auth, timeout=120,
                   json={"prompt": "x", "size": "32x32", **FAST})
    assert r.status_code == 200, r.text


def test_without_a_key_configured_no_token_is_needed(client):
    assert client.get("/v1/models").status_code == 200


def test_tokens_are_compared_with_compare_digest(monkeypatch):
    from lance_deploy.serve import guard

    calls = []
    real = guard.hmac.compare_digest
    monkeypatch.setattr(guard.hmac, "compare_digest", lambda a, b: calls.append((a, b)) or real(a, b))
    assert guard.token_ok(f"Bearer {KEY}", KEY) and not guard.token_ok("Bearer nope", KEY)
    assert calls == [(KEY.encode(), KEY.encode()), (b"nope", KEY.encode())]


def test_openai_client_with_the_key(locked):
    openai = pytest.importorskip("openai")
    bad = openai.OpenAI(base_url=f"{locked.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    good = openai.OpenAI(base_url=f"{locked.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in good.models.list()] == ["lance-3b-video"]


def test_openai_client_images_and_chat(server):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    img = c.images.generate(prompt="a red boat", size="64x64", extra_body=FAST)
    assert Image.open(io.BytesIO(base64.b64decode(img.data[0].b64_json))).size == (64, 64)
    url = c.images.generate(prompt="a red boat", size="32x32", response_format="url", extra_body=FAST).data[0].url
    assert url.startswith(server.url + "/v1/results/")

    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": [{"type": "text", "text": "What colour is it?"},
                                             {"type": "image_url", "image_url": {"url": data_url(png_bytes())}}]}]
    extra = {"vit_area_side": 64}
    whole = c.chat.completions.create(model="lance", messages=messages, max_tokens=8, extra_body=extra)
    answer = whole.choices[0].message.content
    assert isinstance(answer, str) and whole.usage.completion_tokens >= 1
    stream = c.chat.completions.create(model="lance-3b-video", messages=messages, max_tokens=8, stream=True,
                                       extra_body=extra)
    parts = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert "".join(parts) == answer and len(parts) >= 2

    with pytest.raises(openai.BadRequestError, match="multiple of 16"):
        c.images.generate(prompt="x", size="70x70", extra_body=FAST)
    with pytest.raises(openai.NotFoundError, match="not served here"):
        c.chat.completions.create(model="gpt-4o", messages=messages)
