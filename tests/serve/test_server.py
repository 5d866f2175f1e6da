"""`leanvlm serve` with real clients, on loopback only: the official `openai` package against uvicorn on a free
127.0.0.1 port (streamed and not), the answers equal to `model.generate`'s, OpenAI error bodies with a 4xx for
every kind of bad request, a fuzz test over request bodies, and cancellation when a client leaves."""

import base64
import http.server
import json
import threading
import time

import httpx2 as httpx
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from serving_helpers import MODEL, QUESTION, app_for, chat, data_url, expected_answer, png, tiny_parts

from leanvlm.serve.images import ImageSources
from leanvlm.serve.server import running_server


@pytest.fixture(scope="module")
def parts():
    return tiny_parts()


def test_the_openai_client_gets_the_models_answers_streamed_and_whole(parts):
    openai = pytest.importorskip("openai")
    model, processor = parts
    image = png(1)
    with running_server(app_for(model, processor, api_key="secret")) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="secret", timeout=60, max_retries=0)
        assert [m.id for m in client.models.list().data] == [MODEL]
        assert httpx.get(f"{url}/health").json() == {"status": "ok"}  # no key needed there
        body = chat(image)
        whole = client.chat.completions.create(**body)
        chunks = list(client.chat.completions.create(**body, stream=True, stream_options={"include_usage": True}))
        text_only = client.chat.completions.create(**chat())
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    assert whole.choices[0].message.content == expected_answer(model, processor, image)
    assert text_only.choices[0].message.content == expected_answer(model, processor, None)
    assert whole.choices[0].finish_reason in ("stop", "length") and whole.usage.completion_tokens >= 1
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_concurrent_clients_each_get_their_own_answer(parts):
    model, processor = parts
    bodies = [chat(png(seed), max_tokens=3 + seed) for seed in range(4)] + [chat(png(0), text="How many circles?")]
    with running_server(app_for(model, processor, max_batch_size=3)) as url:
        results = [None] * len(bodies)

        def ask(index):
            results[index] = httpx.post(f"{url}/v1/chat/completions", json=bodies[index], timeout=60).json()

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(bodies))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    for index, (body, result) in enumerate(zip(bodies, results, strict=True)):
        image = base64.b64decode(body["messages"][0]["content"][1]["image_url"]["url"].split(",")[1])
        text = body["messages"][0]["content"][0]["text"]
        assert result["choices"][0]["message"]["content"] == expected_answer(
            model, processor, image, body["max_tokens"], text), f"request {index}"
    assert "leanvlm_image_cache_hits_total 1" in metrics  # png(0) was asked about twice
    assert 'leanvlm_time_to_first_token_seconds_count 5' in metrics


BAD = {
    "not json": (b"{not json", 400, "not valid JSON"),
    "no messages": ({"model": MODEL}, 400, "messages"),
    "empty messages": ({"model": MODEL, "messages": []}, 400, "messages"),
    "bad role": ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, 400, "role"),
    "content type": ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "content"),
    "unknown model": (chat(model="gpt-4o"), 404, "Unknown model 'gpt-4o'"),
    "zero max_tokens": (chat(max_tokens=0), 400, "max_tokens"),
    "negative temperature": (chat(temperature=-1), 400, "temperature"),
    "n": (chat(n=2), 400, "n must be 1"),
    "placeholder in text": (chat(text="<image> hi"), 400, "may not contain <image>"),
    "not an image": ({**chat(), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(b"garbage")}}]}]}, 400, "could not be decoded"),
    "not base64": ({**chat(), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}]}]}, 400, "not valid base64"),
    "too many images": ({**chat(), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png(0))}}] * 5}]}, 400, "at most 4"),
    "remote off": ({**chat(), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/a.png"}}]}]}, 400, "--allow-remote-images"),
    "local off": ({**chat(), "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}]}, 400, "--allowed-local-media-path"),
    "too long": (chat(text="red " * 300), 400, "beyond the model's context of 256"),
    "assistant last": ({"model": MODEL, "messages": [{"role": "assistant", "content": "hi"}]}, 400, "user's"),
    "seed beyond the generator": (chat(seed=2**64, temperature=1), 400, "seed must be in"),
    "penalty": (chat(frequency_penalty=0.5), 400, "frequency_penalty=0.5 is not supported"),
    "five stop strings": (chat(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_request_gets_a_4xx_that_says_what_was_wrong(parts, case):
    body, status, message = BAD[case]
    model, processor = parts
    with TestClient(app_for(model, processor)) as client:
        if isinstance(body, bytes):
            response = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        else:
            response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == status, response.text
        assert message in response.json()["error"]["message"]
        assert client.post("/v1/chat/completions", json=chat()).status_code == 200  # the server serves on


def test_limits_answer_413_and_429(parts):
    model, processor = parts
    with TestClient(app_for(model, processor, max_waiting=0)) as client:
        response = client.post("/v1/chat/completions", json=chat())
        assert response.status_code == 429 and "retry later" in response.json()["error"]["message"]
    with running_server(app_for(model, processor, max_body_bytes=100)) as url:
        declared = httpx.post(f"{url}/v1/chat/completions", json=chat(png(0)), timeout=30)
        body = json.dumps(chat(png(0))).encode()
        chunked = httpx.post(f"{url}/v1/chat/completions", content=iter([body[:80], body[80:]]), timeout=30,
                             headers={"content-type": "application/json"})  # no length declared: counted
    for response in (declared, chunked):
        assert response.status_code == 413 and "limit of 100 bytes" in response.json()["error"]["message"]


def test_images_from_an_allowed_directory_and_from_loopback_http(parts, tmp_path):
    model, processor = parts
    image = png(3)
    (tmp_path / "a.png").write_bytes(image)
    sources = ImageSources(local_dir=str(tmp_path), remote=True, fetch_timeout=5)
    expected = expected_answer(model, processor, image)

    class Files(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path), **kwargs)

        def log_message(self, *args):
            pass

    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Files)
    threading.Thread(target=files.serve_forever, daemon=True).start()
    try:
        with TestClient(app_for(model, processor, images=sources)) as client:
            for url in ("a.png", f"file://{tmp_path}/a.png", f"http://127.0.0.1:{files.server_port}/a.png"):
                body = {**chat(), "messages": [{"role": "user", "content": [
                    {"type": "text", "text": QUESTION}, {"type": "image_url", "image_url": {"url": url}}]}]}
                response = client.post("/v1/chat/completions", json=body)
                assert response.json()["choices"][0]["message"]["content"] == expected, url
            outside = {**chat(), "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "../outside.png"}}]}]}
            assert "must lie under" in client.post("/v1/chat/completions", json=outside).json()["error"]["message"]
    finally:
        files.shutdown()


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_leaves_cancels_its_request(parts, stream):
    model, processor = parts
    with running_server(app_for(model, processor)) as url:
        body = chat(png(5), max_tokens=200, stream=stream, ignore_eos=True)  # long enough to be cut short
        if stream:
            with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=30) as response:
                assert response.status_code == 200
                next(response.iter_lines())  # the first event, then hang up
        else:
            with pytest.raises(httpx.TimeoutException):  # the client gives up waiting and hangs up
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.1)
        deadline = time.monotonic() + 30
        while 'reason="cancelled"} 1\n' not in httpx.get(f"{url}/metrics", timeout=10).text:
            assert time.monotonic() < deadline, "the request was not cancelled"
            time.sleep(0.05)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=False)
                    | st.text(max_size=12), lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)
FIELDS = st.fixed_dictionaries({}, optional={
    "model": st.sampled_from([MODEL, "other"]) | JSON,
    "messages": st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                                "content": JSON | st.text(max_size=20)}), max_size=3) | JSON,
    "max_tokens": st.integers(-2, 4) | JSON, "temperature": st.floats(-1, 3) | JSON, "top_p": JSON,
    "top_k": JSON, "stop": JSON, "stream": st.booleans() | JSON, "n": JSON, "seed": JSON,
})


@pytest.fixture(scope="module")
def fuzz_target(parts):
    """One server for every fuzz example (starting one per example would dominate the test's time)."""
    model, processor = parts
    with running_server(app_for(model, processor)) as url, httpx.Client(base_url=url, timeout=30) as client:
        yield client, expected_answer(model, processor, None)  # the timeout: a hung request fails the test


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=FIELDS | JSON)
def test_no_request_body_gets_a_5xx_or_hangs(fuzz_target, body):
    client, expected = fuzz_target
    response = client.post("/v1/chat/completions", content=json.dumps(body),
                           headers={"content-type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json()["error"]["message"]
    good = client.post("/v1/chat/completions", json=chat())
    assert good.json()["choices"][0]["message"]["content"] == expected


def test_without_the_serve_extra_the_error_says_what_to_install(monkeypatch):
    import importlib
    import importlib.util

    import leanvlm.serve

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"needs uvicorn: install the serve extra"):
        importlib.reload(leanvlm.serve)
    monkeypatch.undo()
    importlib.reload(leanvlm.serve)
