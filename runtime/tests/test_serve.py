"""`savpack-run serve` on the golden bundles: the CLI's labels over HTTP, real batching, limits, and a clean drain."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from PIL import Image

from savpack_runtime.cli import main
from savpack_runtime.errors import InputError
from savpack_runtime.result import records_agree

import golden
from serving import b64, classifier, data_url, metric, running_server



def cli_records(case: str, capsys) -> list[dict]:
    """What `savpack-run classify --json` prints for the case's items, without the source field."""
    assert main(["classify", str(golden.bundle_dir(case)), "--data", str(golden.case_dir(case) / "items.jsonl"),
                 "--json", "--threads", "1"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    for record in records:
        del record["source"]
    return records


def same_records(actual, expected) -> bool:
    """Records equal: labels, votes and flags exactly; shares and probabilities within the runtime's agreement
    tolerance (a batch of other items pads the prompt differently, which moves head vectors in the last float bits)."""
    return records_agree(actual, expected)


def request_body(item: dict, number: int) -> dict:
    # Images alternately as a data: URL and as bare base64: both encodings must reach the same pixels.
    images = [data_url(path) if number % 2 else b64(path) for path in item["images"]]
    return {"inputs": [{"text": item["text"], **({"images": images} if images else {})}]}


@pytest.mark.parametrize("case", golden.CASES)
def test_service_gives_the_clis_records(case, capsys):
    """Each item in its own request, all at once (so they are batched together), and all items in one request:
    every record equals the one `savpack-run classify --json` prints."""
    expected = cli_records(case, capsys)
    items = golden.items(case)
    with running_server(golden.bundle_dir(case), max_batch=4, max_wait_ms=50) as url, httpx.Client(timeout=60) as http:
        with concurrent.futures.ThreadPoolExecutor(len(items)) as pool:
            answers = list(pool.map(lambda pair: http.post(f"{url}/v1/classify", json=request_body(*pair)),
                                    [(item, number) for number, item in enumerate(items)]))
        assert [answer.status_code for answer in answers] == [200] * len(items), [answer.text for answer in answers]
        assert same_records([answer.json()["results"][0] for answer in answers], expected)
        together = http.post(f"{url}/v1/classify", json={"inputs": [request_body(item, 0)["inputs"][0] for item in items]})
        assert together.status_code == 200 and same_records(together.json()["results"], expected)
        bundle = together.json()["bundle"]
        assert bundle == {"model": classifier(golden.bundle_dir(case)).bundle.model["id"],
                          "packs": classifier(golden.bundle_dir(case)).pack_names}
        batches = http.get(f"{url}/metrics").text
    assert metric(batches, "savpack_items_total") == 2 * len(items)


def test_abstain_below_is_the_classifiers(capsys):
    """abstain_below withholds exactly the labels the Classifier withholds at that threshold (a threshold between the
    items' top probabilities, so some abstain and some do not), through JSON and multipart alike."""
    case = "qwen2"
    records = cli_records(case, capsys)
    tops = sorted(max(record["probabilities"].values()) for record in records)
    threshold = (tops[len(tops) // 2 - 1] + tops[len(tops) // 2]) / 2
    expected = [result.to_dict() for result in classifier(golden.bundle_dir(case)).classify_batch(
        [item["text"] for item in golden.items(case)], abstain_below=threshold)]
    assert 0 < sum(record["abstained"] for record in expected) < len(expected)
    with running_server(golden.bundle_dir(case)) as url, httpx.Client(timeout=60) as http:
        answer = http.post(f"{url}/v1/classify", json={"inputs": [item["text"] for item in golden.items(case)],
                                                       "abstain_below": threshold})
        assert answer.status_code == 200, answer.text
        assert same_records(answer.json()["results"], expected)
        for record in answer.json()["results"]:
            assert (record["label"] is None) == record["abstained"] == (max(record["probabilities"].values()) < threshold)
        form = http.post(f"{url}/v1/classify", files={"text": (None, golden.items(case)[0]["text"]),
                                                       "abstain_below": (None, str(threshold))})
        assert form.status_code == 200 and same_records(form.json()["results"], expected[:1])


def test_multipart_upload_equals_json():
    case = "qwen2_vl"
    item = golden.items(case)[3]  # two images
    with running_server(golden.bundle_dir(case)) as url, httpx.Client(timeout=60) as http:
        as_json = http.post(f"{url}/v1/classify", json=request_body(item, 1))
        files = [("images", (f"picture{number}.png", open(path, "rb"), "image/png")) for number, path in enumerate(item["images"])]
        as_form = http.post(f"{url}/v1/classify", data={"text": item["text"]}, files=files)
        for _, (_, handle, _) in files:
            handle.close()
        only_loo = http.post(f"{url}/v1/classify", data={"text": item["text"], "packs": ["colour-loo"]},
                             files=[("images", ("a.png", golden.case_dir(case).joinpath("items", "qwen2_vl-0-0.png").read_bytes(), "image/png"))])
    assert as_form.status_code == 200 and as_form.json() == as_json.json()
    assert "packs" in as_json.json()["results"][0]  # two packs: each pack's result is in the record
    assert only_loo.status_code == 200 and only_loo.json()["bundle"]["packs"] == ["colour-loo"]


def test_packs_pick_the_top_level_result():
    case = "qwen2_vl"
    item = golden.items(case)[0]
    with running_server(golden.bundle_dir(case)) as url, httpx.Client(timeout=60) as http:
        both = http.post(f"{url}/v1/classify", json=request_body(item, 0)).json()["results"][0]
        loo_first = http.post(f"{url}/v1/classify", json={**request_body(item, 0), "packs": ["colour-loo", "colour"]}).json()
        loo_only = http.post(f"{url}/v1/classify", json={**request_body(item, 0), "packs": ["colour-loo"]}).json()
    loo = both["packs"]["colour-loo"]
    assert loo["votes"] != both["votes"]  # the two packs differ (k 4 and 6), so the test can tell them apart
    assert same_records({key: loo_first["results"][0][key] for key in loo}, loo)
    assert list(loo_first["results"][0]["packs"]) == ["colour-loo", "colour"]
    assert same_records(loo_only["results"][0], loo) and loo_only["bundle"]["packs"] == ["colour-loo"]


def _concurrent_posts(url: str, bodies: list[dict], timeout: float = 60) -> list[httpx.Response]:
    with httpx.Client(timeout=timeout, limits=httpx.Limits(max_connections=len(bodies))) as http:
        with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
            return list(pool.map(lambda body: http.post(f"{url}/v1/classify", json=body), bodies))


@pytest.mark.parametrize("max_batch, most_batches", [(8, 8), (1, 16)])
def test_concurrent_requests_share_a_forward(max_batch, most_batches):
    """16 one-item requests at once: with --max-batch 8 they run in few batches of up to 8 items (the batch-size
    histogram in /metrics says so); with --max-batch 1, one by one."""
    texts = [f"the {word} thing number {number}" for number, word in enumerate(["red", "ice", "square", "sun"] * 4)]
    with running_server(golden.bundle_dir("qwen2"), max_batch=max_batch, max_wait_ms=500) as url:
        answers = _concurrent_posts(url, [{"inputs": [text]} for text in texts])
        metrics = httpx.get(f"{url}/metrics").text
    assert [answer.status_code for answer in answers] == [200] * 16
    expected = [result.to_dict() for result in classifier(golden.bundle_dir("qwen2")).classify_batch(texts)]
    assert [answer.json()["results"][0]["label"] for answer in answers] == [record["label"] for record in expected]
    batches = metric(metrics, "savpack_batch_items_count")
    assert metric(metrics, "savpack_batch_items_sum") == 16
    assert metric(metrics, "savpack_batch_items_bucket", le=f"{float(max_batch)}") == batches  # none above max_batch
    if max_batch == 1:
        assert batches == 16
    else:
        assert 2 <= batches <= 8, f"16 concurrent requests ran in {batches} batches"  # 16 / 8 = 2 when all arrive in time


def test_full_queue_answers_429_with_retry_after():
    """--max-queue 2: two one-item requests wait for a batch (held back by a long --max-wait-ms); a third is refused."""
    with running_server(golden.bundle_dir("qwen2"), max_batch=8, max_wait_ms=1500, max_queue=2) as url:
        answers = _concurrent_posts(url, [{"inputs": ["a circle"]}] * 3)
        metrics = httpx.get(f"{url}/metrics").text
    statuses = sorted(answer.status_code for answer in answers)
    assert statuses == [200, 200, 429]
    refused = next(answer for answer in answers if answer.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error_type"] == "overloaded" and "at capacity" in refused.json()["error"]
    assert metric(metrics, "savpack_http_requests_total", path="/v1/classify", status="429") == 1


def test_requests_still_sending_their_body_count_against_the_queue():
    """--max-queue 2: two clients that sent headers but not yet their bodies hold both places; a third request is
    refused with 429 at once instead of buffering a third body. When they go, the server takes requests again."""
    import socket

    with running_server(golden.bundle_dir("qwen2"), max_queue=2, max_inputs=2) as url:
        port = int(url.rsplit(":", 1)[1])
        slow = []
        for _ in range(2):
            connection = socket.create_connection(("127.0.0.1", port), timeout=10)
            connection.sendall(b"POST /v1/classify HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 1000\r\n\r\n{")
            slow.append(connection)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the server has read both requests' headers
            refused = httpx.post(f"{url}/v1/classify", json={"inputs": ["a circle"]}, timeout=30)
            if refused.status_code == 429:
                break
            time.sleep(0.05)
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
        assert "2 requests in progress, --max-queue 2" in refused.json()["error"]
        for connection in slow:
            connection.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answer = httpx.post(f"{url}/v1/classify", json={"inputs": ["a circle"]}, timeout=30)
            if answer.status_code == 200:
                break
            time.sleep(0.05)
        assert answer.status_code == 200
        metrics = httpx.get(f"{url}/metrics").text
    assert metric(metrics, "savpack_http_requests_total", path="/v1/classify", status="500") == 0  # hanging up is no server error
    assert metric(metrics, "savpack_http_requests_total", path="/v1/classify", status="400") == 2


def test_one_bad_request_does_not_fail_its_batch():
    """A prompt longer than the model's context fails inside the batch; the requests batched with it still get
    their labels, and the bad one gets 413 naming its own item."""
    long_text = "word " * 5000
    bodies = [{"inputs": ["a circle"]}, {"inputs": ["the red sun", long_text]}, {"inputs": ["blue ice"]}]
    with running_server(golden.bundle_dir("qwen2"), max_batch=8, max_wait_ms=500) as url:
        answers = _concurrent_posts(url, bodies)
        metrics = httpx.get(f"{url}/metrics").text
    assert [answer.status_code for answer in answers] == [200, 413, 200]
    assert re.search(r"item 1: prompt is \d+ tokens, longer than the model's context of \d+", answers[1].json()["error"])
    assert metric(metrics, "savpack_batch_items_count") >= 1


# -- bad requests: status and message, one table -------------------------------------------------------------------

def _png(width: int, height: int, mode: str = "1") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


BOMB = _png(20_000, 20_000)  # 400 M pixels declared in a few tens of kB: PIL itself refuses to open it
LARGE = _png(5_000, 5_000)  # 25 M pixels: over the server's limit, refused from the header before decoding
PICTURE = golden.case_dir("qwen2_vl") / "items" / "qwen2_vl-0-0.png"


def _expected_cli_message(case: str, item: dict) -> str:
    """The message the CLI prints for an item the Classifier refuses."""
    with pytest.raises(InputError) as refused:
        classifier(golden.bundle_dir(case)).check_item(item, 0)
    return str(refused.value)


BAD_REQUESTS = [
    # (name, case, body: dict (JSON) or bytes (raw), content type, status, words in the message)
    ("malformed JSON", "qwen2", b'{"inputs": [', "application/json", 422, "request body is not valid JSON: Expecting value"),
    ("not UTF-8", "qwen2", b'{"inputs": ["\xff"]}', "application/json", 422, "request body is not"),
    ("NaN", "qwen2", b'{"inputs": ["a"], "abstain_below": NaN}', "application/json", 422, "NaN is not a JSON number"),
    ("body not an object", "qwen2", [1, 2], "application/json", 422, "must be a JSON object with 'inputs', got a list"),
    ("inputs missing", "qwen2", {"packs": ["words"]}, "application/json", 422, "inputs: required"),
    ("inputs a string", "qwen2", {"inputs": "a circle"}, "application/json", 422, "inputs: must be a list of items, got a string"),
    ("empty inputs", "qwen2", {"inputs": []}, "application/json", 422, "inputs: empty; give at least one item"),
    ("item a number", "qwen2", {"inputs": [3]}, "application/json", 422, "inputs[0]: must be an object with text and images, or a string; got a number"),
    ("text a number", "qwen2", {"inputs": [{"text": 7}]}, "application/json", 422, "inputs[0].text: must be a string, got a number"),
    ("images not a list", "qwen2_vl", {"inputs": [{"images": "abc"}]}, "application/json", 422, "inputs[0].images: must be a list"),
    ("image a number", "qwen2_vl", {"inputs": [{"images": [5]}]}, "application/json", 422, "inputs[0].images[0]: must be a base64 string"),
    ("unknown field", "qwen2", {"inputs": ["a"], "model": "x"}, "application/json", 422, "unknown field(s) ['model']"),
    ("unknown item field", "qwen2", {"inputs": [{"txt": "a"}]}, "application/json", 422, "inputs[0]: unknown field(s) ['txt']"),
    ("lone surrogate", "qwen2", b'{"inputs": ["\\ud800"]}', "application/json", 422, "inputs[0].text: not valid Unicode"),
    ("empty item", "qwen2", {"inputs": [{"text": ""}]}, "application/json", 422, "item 0: has neither text nor images"),
    ("image for a text bundle", "qwen2", {"inputs": [{"text": "a", "images": [b64(PICTURE)]}]}, "application/json", 422,
     "item 0: this bundle's prompt is text-only; the item has 1 image(s)"),
    ("no image for an image bundle", "qwen2_vl", {"inputs": [{"text": "a"}]}, "application/json", 422,
     "item 0: this bundle's prompt takes 1 image(s); the item has none"),
    ("unknown pack", "qwen2", {"inputs": ["a"], "packs": ["nope"]}, "application/json", 422, "packs: unknown pack(s) ['nope']; this bundle holds ['words'"),
    ("packs twice", "qwen2_vl", {"inputs": [{"images": [b64(PICTURE)]}], "packs": ["colour", "colour"]}, "application/json", 422, "names a pack twice"),
    ("packs empty", "qwen2", {"inputs": ["a"], "packs": []}, "application/json", 422, "packs: empty"),
    ("abstain_below a string", "qwen2", {"inputs": ["a"], "abstain_below": "high"}, "application/json", 422, "abstain_below: must be a number between 0 and 1"),
    ("abstain_below above 1", "qwen2", {"inputs": ["a"], "abstain_below": 1.5}, "application/json", 422, "abstain_below: must be a number between 0 and 1"),
    ("corrupt base64", "qwen2_vl", {"inputs": [{"images": ["iVBORw0KGgo!!!"]}]}, "application/json", 422, "inputs[0].images[0]: not valid base64"),
    ("base64 of no image", "qwen2_vl", {"inputs": [{"images": ["aGVsbG8gd29ybGQ="]}]}, "application/json", 422,
     "inputs[0].images[0]: not an image file PIL can read"),
    ("truncated image", "qwen2_vl", {"inputs": [{"images": [b64(PICTURE)[:200]]}]}, "application/json", 422, "inputs[0].images[0]: image is corrupt or truncated"),
    ("data URL not base64", "qwen2_vl", {"inputs": [{"images": ["data:image/png,abc"]}]}, "application/json", 422, "a data: URL must be data:<media type>;base64,<data>"),
    ("data URL of text", "qwen2_vl", {"inputs": [{"images": ["data:text/plain;base64,YQ=="]}]}, "application/json", 422, "holds 'text/plain', not an image"),
    ("decompression bomb", "qwen2_vl", {"inputs": [{"images": [base64.b64encode(BOMB).decode()]}]}, "application/json", 413,
     "inputs[0].images[0]: image refused as a decompression bomb"),
    ("image over the pixel limit", "qwen2_vl", {"inputs": [{"images": [base64.b64encode(LARGE).decode()]}]}, "application/json", 413,
     "inputs[0].images[0]: image declares 5000x5000 pixels, more than the limit of 16777216"),
    ("oversized body", "qwen2", {"inputs": ["x" * 300_000]}, "application/json", 413,
     "request body of 300016 bytes is more than this server's limit of 262144"),
    ("too many inputs", "qwen2", {"inputs": ["a"] * 33}, "application/json", 413, "inputs: 33 items, more than this server's limit of 32 per request"),
    ("too many images", "qwen2_vl", {"inputs": [{"images": [b64(PICTURE)] * 9}]}, "application/json", 413, "inputs[0].images: 9 images, more than this server's limit of 8"),
    ("prompt too long", "qwen2", {"inputs": ["word " * 5000]}, "application/json", 413, "item 0: prompt is"),
    ("plain text body", "qwen2", b"a circle", "text/plain", 415, "Content-Type 'text/plain': send application/json or multipart/form-data"),
    ("multipart unknown field", "qwen2", None, "multipart", 422, "unknown form field(s) ['colour']"),
]


@pytest.fixture(scope="module")
def servers():
    with running_server(golden.bundle_dir("qwen2"), max_body_bytes=256 * 1024) as text_url, \
            running_server(golden.bundle_dir("qwen2_vl")) as image_url:
        yield {"qwen2": text_url, "qwen2_vl": image_url}


@pytest.mark.parametrize("name, case, body, content_type, status, words", BAD_REQUESTS, ids=[row[0] for row in BAD_REQUESTS])
def test_bad_requests(servers, name, case, body, content_type, status, words):
    url = f"{servers[case]}/v1/classify"
    if content_type == "multipart":
        answer = httpx.post(url, data={"text": "a", "colour": "red"}, files=[("images", ("a.png", b"x", "image/png"))], timeout=30)
    else:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        answer = httpx.post(url, content=content, headers={"content-type": content_type}, timeout=30)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"] == "application/json"
    error = answer.json()
    assert words in error["error"], error
    assert error["error_type"] == {413: "too_large", 415: "unsupported_media_type", 422: "validation"}[status]


def test_a_chunked_body_is_cut_off_at_the_limit(servers):
    """Without a Content-Length the body is read in chunks and refused as soon as it passes the limit."""
    sent = 0

    def chunks():
        nonlocal sent
        for _ in range(64):  # 64 x 16 KiB = 1 MiB offered, the limit is 256 KiB
            sent += 16 * 1024
            yield b'{"inputs": ["' if sent == 16 * 1024 else b"x" * 16 * 1024

    answer = httpx.post(f"{servers['qwen2']}/v1/classify", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert answer.status_code == 413
    assert answer.json()["error"] == "request body is more than this server's limit of 262144 bytes"


def test_item_refusals_are_the_clis_messages(servers):
    """For what the Classifier refuses, the service's message is the one `savpack-run classify` prints."""
    for case, item in (("qwen2_vl", {"text": "a"}), ("qwen2", {"text": ""})):
        answer = httpx.post(f"{servers[case]}/v1/classify", json={"inputs": [item]}, timeout=30)
        assert answer.status_code == 422 and answer.json()["error"] == _expected_cli_message(case, item)


def test_unknown_route_and_method_answer_json(servers):
    missing = httpx.get(f"{servers['qwen2']}/v2/nothing")
    assert missing.status_code == 404 and missing.json()["error_type"] == "not_found"
    wrong_method = httpx.get(f"{servers['qwen2']}/v1/classify")
    assert wrong_method.status_code == 405 and "error" in wrong_method.json()


def test_health_info_metrics_openapi(servers):
    url = servers["qwen2_vl"]
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    info = httpx.get(f"{url}/info").json()
    loaded = classifier(golden.bundle_dir("qwen2_vl"))
    assert [pack["name"] for pack in info["packs"]] == loaded.pack_names and {"colour", "colour-loo"} <= set(loaded.pack_names)
    assert info["packs"][0]["labels"] == list(loaded.bundle.packs[0].pack.labels)
    assert info["model"]["id"] == loaded.bundle.model["id"] and info["takes_images"] is True
    assert info["digests"]["graph"] == loaded.bundle.graph["sha256"]
    assert info["digests"]["packs"] == {entry["name"]: entry["sha256"] for entry in loaded.bundle.info["packs"]}
    assert info["versions"]["savpack_runtime"] and info["versions"]["onnxruntime"]
    assert info["limits"]["max_batch"] == 32 and info["limits"]["max_inputs"] == 32
    httpx.post(f"{url}/v1/classify", json={"inputs": [{"images": [b64(PICTURE)]}]}, timeout=30)
    metrics = httpx.get(f"{url}/metrics")
    assert metrics.headers["content-type"].startswith("text/plain")
    assert metric(metrics.text, "savpack_http_requests_total", path="/info", method="GET", status="200") == 1
    assert metric(metrics.text, "savpack_http_request_duration_seconds_count", path="/v1/classify", status="200") >= 1
    assert "savpack_queue_items" in metrics.text and "savpack_admitted_items" in metrics.text
    document = httpx.get(f"{url}/openapi.json").json()
    assert document["openapi"].startswith("3.") and "/v1/classify" in document["paths"]
    packs_schema = document["components"]["schemas"]["ClassifyRequest"]["properties"]["packs"]
    assert packs_schema["items"]["enum"] == loaded.pack_names
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html") and "savpack playground" in page.text


# -- the command line --------------------------------------------------------------------------------------------

def _start_cli_server(*options: str) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "savpack_runtime.cli", "serve", str(golden.bundle_dir("qwen2")),
                                "--port", "0", "--threads", "1", "--no-access-log", *options],
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        match = re.search(r"on (http://127\.0\.0\.1:\d+)/ ", line)
        if match:
            url = match.group(1)
            while time.monotonic() < deadline:
                try:
                    if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                        return process, url
                except httpx.HTTPError:
                    time.sleep(0.05)
        if not line and process.poll() is not None:
            break
    process.kill()
    raise AssertionError(f"savpack-run serve did not start: {process.stderr.read()}")


def test_sigterm_drains_requests_in_flight():
    """A request waiting in the queue (--max-wait-ms 3000) when SIGTERM arrives still gets its labels; then the
    server exits and takes no new connection."""
    process, url = _start_cli_server("--max-wait-ms", "3000")
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            pending = pool.submit(httpx.post, f"{url}/v1/classify", json={"inputs": ["a circle"]}, timeout=60)
            time.sleep(1.0)
            assert not pending.done()
            process.send_signal(signal.SIGTERM)
            answer = pending.result(timeout=60)
        assert answer.status_code == 200 and answer.json()["results"][0]["label"]
        assert time.monotonic() - started >= 2.5  # it really waited in the queue through the signal
        process.wait(timeout=60)
        log = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode in (0, -signal.SIGTERM), log
    assert "Shutting down" in log and "Application shutdown complete" in log and "Traceback" not in log
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/health", timeout=2)


@pytest.mark.parametrize("options, words", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--max-inputs", "300"], "--max-inputs 300 is more than --max-queue 256"),
    (["--max-wait-ms", "-1"], "--max-wait-ms between 0 and 60000"),
])
def test_serve_refuses_bad_options(capsys, options, words):
    with pytest.raises(SystemExit) as exited:
        main(["serve", str(golden.bundle_dir("qwen2")), *options])
    assert exited.value.code == 2 and words in capsys.readouterr().err


def test_serve_without_the_extra_names_it():
    """In a fresh interpreter where starlette cannot be imported: one line naming the extra, exit 1."""
    script = (
        "import sys\n"
        "class NoStarlette:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'starlette':\n"
        "            raise ImportError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, NoStarlette())\n"
        "from savpack_runtime.cli import main\n"
        f"sys.exit(main(['serve', {str(golden.bundle_dir('qwen2'))!r}, '--port', '0']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert done.stderr.strip() == ("error: savpack-run serve needs the serve extra (starlette is missing): "
                                   "pip install 'savpack-runtime[serve]'")


def test_serve_reports_a_busy_port(capsys):
    from savpack_runtime.serve.server import bind

    taken = bind("127.0.0.1", 0)
    try:
        assert main(["serve", str(golden.bundle_dir("qwen2")), "--port", str(taken.getsockname()[1]), "--threads", "1"]) == 1
    finally:
        taken.close()
    assert "cannot listen on 127.0.0.1:" in capsys.readouterr().err


def test_the_service_imports_no_torch():
    """The serve extra keeps the runtime's promise: a fresh interpreter builds the app without torch, transformers
    or onnx."""
    script = (
        "import sys\n"
        "from savpack_runtime import Classifier\n"
        "from savpack_runtime.serve import create_app\n"
        f"create_app(Classifier.load({str(golden.bundle_dir('qwen2'))!r}, threads=1))\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] in ('torch', 'transformers', 'onnx')))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
