"""``dent serve``: auth, predictions equal to the defense's, sample isolation, queue limits, timeouts, hostile
uploads, graceful shutdown, and the isolation policy's refusals. Each service runs in real uvicorn on a free
127.0.0.1 port, with a tiny model."""

from __future__ import annotations

import io
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

pytest.importorskip("fastapi", reason="dent serve needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve tests' HTTP client: pip install -e '.[test]'")

from PIL import Image  # noqa: E402

from dent.cli.main import main  # noqa: E402
from dent.confbase import validated  # noqa: E402
from dent.data.datasets import CIFAR10_CLASSES  # noqa: E402
from dent.defenses import Dent  # noqa: E402
from dent.errors import ConfigError  # noqa: E402
from dent.serving.app import create_app  # noqa: E402
from dent.serving.auth import read_token  # noqa: E402
from dent.serving.config import ServeConfig  # noqa: E402
from dent.serving.inputs import ImageSpec  # noqa: E402
from dent.serving.served import Served, build_served  # noqa: E402
from dent.serving.server import uvicorn_server  # noqa: E402
from eval_support import fake_data, tiny_net  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: Sample-wise dent+ (no diversity term), 2 steps: cheap on the tiny model.
SAMPLE_WISE = {"preset": "dent_plus_bsi", "diversity_weight": 0.0, "steps": 2}
TOKEN = "test-token-0123456789abcdef"


def config(defense=None, **serve) -> ServeConfig:
    return validated(ServeConfig, {"device": "cpu", "defense": defense or SAMPLE_WISE, "serve": serve})


@contextmanager
def running(served: Served, cfg: ServeConfig, token: bytes | None = None):
    """The service in uvicorn on a free port, in a thread: yields (base URL, uvicorn server); stops it after."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn_server(create_app(served, cfg.serve, token), cfg.serve, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def serve_tiny(cfg: ServeConfig, token: bytes | None = None):
    return running(build_served(tiny_net(), cfg), cfg, token)


class Gate(nn.Module):
    """The tiny model, held at each call until ``release`` is set: requests stay in flight as long as a test needs."""

    def __init__(self):
        super().__init__()
        self.model = tiny_net()
        self.entered = threading.Event()
        self.release = threading.Event()

    def forward(self, x):
        self.entered.set()
        assert self.release.wait(30)
        return self.model(x)


def gated(max_batch: int = 1) -> Served:
    return Served(Gate(), torch.device("cpu"), ImageSpec(32, max_batch), CIFAR10_CLASSES, "tiny", "gate")


def post(url: str, images: torch.Tensor, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}/predict", json=images.tolist(), timeout=60, **kwargs)


def probabilities(response: httpx.Response) -> torch.Tensor:
    assert response.status_code == 200, response.text
    return torch.tensor([p["probabilities"] for p in response.json()["predictions"]])


def metric(url: str, name: str, headers: dict | None = None) -> float:
    text = httpx.get(f"{url}/metrics", headers=headers).text
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def wait_until(condition, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


def png(pixels: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode).save(buffer, "PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels in its header, with almost no data behind it."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


# -- access ----------------------------------------------------------------------------------------


def test_a_token_protected_service_refuses_requests_without_the_token(monkeypatch):
    monkeypatch.setenv("DENT_TEST_TOKEN", TOKEN)
    cfg = config(token_env="DENT_TEST_TOKEN", max_wait_ms=0)
    image = fake_data(1, 32).images
    with serve_tiny(cfg, read_token(cfg.serve)) as (url, _):
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN},
                        {"Authorization": f"Basic {TOKEN}"}):
            refused = post(url, image, headers=headers)
            assert refused.status_code == 401 and "bearer token" in refused.json()["error"]
            assert refused.headers["WWW-Authenticate"] == "Bearer"
            assert httpx.get(f"{url}/metrics", headers=headers).status_code == 401
        auth = {"Authorization": f"Bearer {TOKEN}"}
        assert post(url, image, headers=auth).status_code == 200
        assert httpx.get(f"{url}/metrics", headers=auth).status_code == 200
        assert httpx.get(f"{url}/healthz").json() == {"status": "ok"}  # open, and says nothing else
        assert metric(url, 'dent_serve_requests_total{endpoint="/predict",status="401"}', auth) == 4


def test_token_sources_are_checked_at_start_and_never_echoed(monkeypatch, tmp_path):
    monkeypatch.delenv("DENT_TEST_TOKEN", raising=False)
    with pytest.raises(ConfigError, match="'DENT_TEST_TOKEN' holds no token"):
        read_token(config(token_env="DENT_TEST_TOKEN").serve)
    monkeypatch.setenv("DENT_TEST_TOKEN", "short-secret")
    with pytest.raises(ConfigError, match="at least 16 characters") as refused:
        read_token(config(token_env="DENT_TEST_TOKEN").serve)
    assert "short-secret" not in str(refused.value)
    (tmp_path / "token").write_text(f"{TOKEN}\n")
    assert read_token(config(token_file=tmp_path / "token").serve) == TOKEN.encode()
    with pytest.raises(ConfigError, match="cannot read the token"):
        read_token(config(token_file=tmp_path / "missing").serve)


def test_a_non_local_bind_needs_a_token_unless_explicitly_insecure():
    with pytest.raises(ConfigError, match="needs a bearer token"):
        config(host="0.0.0.0")
    assert config(host="0.0.0.0", token_env="DENT_TEST_TOKEN").serve.host == "0.0.0.0"
    assert config(host="0.0.0.0", insecure_no_token=True).serve.insecure_no_token
    assert config().serve.host == "127.0.0.1"


# -- answers ---------------------------------------------------------------------------------------


def test_predictions_equal_the_defense_built_directly():
    cfg = config(max_wait_ms=0)
    x = fake_data(5, 32).images
    pixels = (fake_data(2, 32, seed=1).images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    decoded = torch.from_numpy(pixels.astype(np.float32)).permute(0, 3, 1, 2).div(255)
    dent = Dent(tiny_net(), cfg.defense)
    with torch.no_grad():
        expected_json, expected_png = dent(x).softmax(1), dent(decoded).softmax(1)
    with serve_tiny(cfg) as (url, _):
        answer = post(url, x)
        files = [("file", (f"{i}.png", png(p), "image/png")) for i, p in enumerate(pixels)]
        uploaded = httpx.post(f"{url}/predict", files=files, timeout=60)
    assert torch.equal(probabilities(answer), expected_json)
    assert [p["label"] for p in answer.json()["predictions"]] == expected_json.argmax(1).tolist()
    assert answer.json()["predictions"][0]["class"] == CIFAR10_CLASSES[int(expected_json[0].argmax())]
    assert torch.equal(probabilities(uploaded), expected_png)
    meta = answer.json()["metadata"]
    assert meta["isolation"] == "sample" and "own image only" in meta["guarantee"] and "warning" not in meta
    assert meta["batch_images"] == 5 and meta["batch_requests"] == 1


def answers_alone_and_together(cfg: ServeConfig) -> tuple[list, list, float]:
    """Four requests of 1-3 images, each alone, then all at once; and how many batches held several requests."""
    images = fake_data(7, 32).images
    requests = [images[0:1], images[1:3], images[3:6], images[6:7]]
    with serve_tiny(cfg) as (url, _):
        alone = [post(url, r) for r in requests]
        assert all(a.json()["metadata"]["batch_requests"] == 1 for a in alone)
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: post(url, r), requests))
        mixed = metric(url, "dent_serve_batch_requests_count") - \
            metric(url, 'dent_serve_batch_requests_bucket{le="1.0"}')
    assert max(t.json()["metadata"]["batch_requests"] for t in together) > 1
    return [probabilities(a) for a in alone], [probabilities(t) for t in together], mixed


def test_under_sample_isolation_an_answer_does_not_depend_on_its_batch_mates():
    alone, together, mixed = answers_alone_and_together(config(max_batch=16, max_wait_ms=400))
    assert mixed >= 1  # the metric shows batches of several requests did form
    for a, t in zip(alone, together):
        torch.testing.assert_close(t, a, rtol=0, atol=1e-6)
        assert torch.equal(t.argmax(1), a.argmax(1))
    # The same measurement tells a batch-wise defense apart: dent+ with its diversity term, under 'shared'.
    alone, together, _ = answers_alone_and_together(
        config({"preset": "dent_plus_bsi", "steps": 2}, max_batch=16, max_wait_ms=400, isolation="shared",
               allow_shared=True))
    assert max(float((t - a).abs().max()) for a, t in zip(alone, together)) > 1e-4


def test_client_isolation_never_puts_two_requests_in_one_batch():
    cfg = config({"preset": "dent", "steps": 1}, max_batch=16, max_wait_ms=300, isolation="client")
    requests = fake_data(6, 32).images.split(2)
    with serve_tiny(cfg) as (url, _):
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda r: post(url, r), requests))
    assert [a.json()["metadata"]["batch_requests"] for a in answers] == [1, 1, 1]
    assert all(a.json()["metadata"]["batch_images"] == 2 for a in answers)


def test_shared_isolation_warns_in_every_answer():
    cfg = config({"preset": "dent", "steps": 1}, max_wait_ms=0, isolation="shared", allow_shared=True)
    with serve_tiny(cfg) as (url, _):
        meta = post(url, fake_data(1, 32).images).json()["metadata"]
    assert meta["isolation"] == "shared" and "other clients' images" in meta["warning"]


# -- limits ----------------------------------------------------------------------------------------


def test_a_full_queue_answers_503_with_retry_after():
    served, cfg = gated(), config(max_batch=1, queue_size=1, max_wait_ms=0)
    image = fake_data(1, 32).images
    with running(served, cfg) as (url, _), ThreadPoolExecutor(2) as pool:
        first = pool.submit(post, url, image)
        assert served.defense.entered.wait(20)  # the first request is in the defense
        second = pool.submit(post, url, image)
        wait_until(lambda: metric(url, "dent_serve_queue_depth") == 1)  # the second waits in the queue
        refused = post(url, image)
        served.defense.release.set()
        assert first.result().status_code == second.result().status_code == 200
    assert refused.status_code == 503 and "queue is full" in refused.json()["error"]
    assert int(refused.headers["Retry-After"]) >= 1


def test_a_request_not_answered_in_time_gets_504_and_the_service_recovers():
    served, cfg = gated(), config(max_batch=1, max_wait_ms=0, timeout_s=0.5)
    image = fake_data(1, 32).images
    with running(served, cfg) as (url, _):
        with ThreadPoolExecutor(2) as pool:
            late = list(pool.map(lambda _: post(url, image), range(2)))  # one in the defense, one queued
        assert [r.status_code for r in late] == [504, 504]
        assert "not answered within 0.5 s" in late[0].json()["error"]
        assert metric(url, "dent_serve_queue_depth") == 0  # the queued one was dropped, not left behind
        served.defense.release.set()
        assert post(url, image).status_code == 200


# -- hostile input ---------------------------------------------------------------------------------

GOOD = (np.arange(32 * 32 * 3) % 256).astype(np.uint8).reshape(32, 32, 3)


def json_body(text: str) -> dict:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def upload(*contents: bytes) -> dict:
    return {"files": [("file", (f"{i}.png", c, "image/png")) for i, c in enumerate(contents)]}


ONE = np.full((3, 32, 32), 0.5).tolist()

MALFORMED = {
    "not an image": (upload(b"this is not an image"), 400, "file '0.png' is not a PNG or JPEG image"),
    "GIF": (upload(b"GIF89a" + b"\0" * 64), 400, "is not a PNG or JPEG image"),
    "wrong size": (upload(png(GOOD[:16, :16])), 422, "is 16x16 pixels; the model expects 32x32"),
    "bomb over PIL's limit": (upload(png_header(50_000, 50_000)), 400, "decompression bomb"),
    "bomb under PIL's limit": (upload(png_header(10_000, 10_000)), 422, "is 10000x10000 pixels"),
    "truncated": (upload(png(GOOD)[:80]), 400, "not a readable"),
    "alpha": (upload(png(np.dstack([GOOD, GOOD[..., :1]]), "RGBA")), 422, "image mode 'RGBA'"),
    "too many files": (upload(*[png(GOOD)] * 5), 400, "Too many files"),
    "form field": ({"data": {"x": "1"}, "files": [("file", ("0.png", png(GOOD), "image/png"))]}, 422,
                   "form field 'x' is not a file"),
    "text body": ({"content": b"hello", "headers": {"content-type": "text/plain"}}, 415, "unsupported content type"),
    "no content type": ({"content": b"[]"}, 415, "unsupported content type"),
    "invalid JSON": (json_body("[[0.5, "), 400, "not a JSON array"),
    "NaN": (json_body("[NaN]"), 422, "the JSON holds NaN"),
    "Infinity": (json_body(str([ONE]).replace("0.5", "Infinity", 1)), 422, "the JSON holds Infinity"),
    "overflowing number": (json_body(str([ONE]).replace("0.5", "1e999", 1)), 422, "must be finite"),
    "out of range": (json_body(str([ONE]).replace("0.5", "1.5", 1)), 422, "must lie in [0, 1]"),
    "negative": (json_body(str(ONE).replace("0.5", "-0.1", 1)), 422, "must lie in [0, 1]"),
    "strings": (json_body('[["a"]]'), 422, "expected a JSON array of numbers"),
    "ragged": (json_body("[[0.5], [0.5, 0.5]]"), 400, "not a JSON array"),
    "wrong shape": (json_body(str(np.full((3, 16, 16), 0.5).tolist())), 422, "got shape [1, 3, 16, 16]"),
    "empty": (json_body("[]"), 422, "got shape [0]"),
    "too many images": (json_body(str([ONE] * 5)), 413, "at most 4 per request"),
    "deep nesting": (json_body("[" * 100_000 + "]" * 100_000), 400, "not a JSON array"),
    "too large": (json_body("[" + "0.5, " * 100_000 + "0.5]"), 413, "exceeds 300000 bytes"),
}


@pytest.fixture(scope="module")
def hostile_target():
    cfg = config({"steps": 0}, max_batch=4, max_wait_ms=0, max_request_bytes=300_000)
    with serve_tiny(cfg) as (url, _):
        yield url


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # the bomb cases are meant to warn
@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_gets_a_4xx_with_a_message_and_the_service_keeps_serving(hostile_target, case):
    request, status, message = MALFORMED[case]
    refused = httpx.post(f"{hostile_target}/predict", timeout=60, **request)
    assert refused.status_code == status, refused.text
    assert message in refused.json()["error"]
    assert post(hostile_target, fake_data(1, 32).images).status_code == 200


# -- lifecycle -------------------------------------------------------------------------------------


def test_a_graceful_shutdown_finishes_the_requests_in_flight():
    served, cfg = gated(), config(max_batch=1, max_wait_ms=0, queue_size=8)
    image = fake_data(1, 32).images
    with running(served, cfg) as (url, server), ThreadPoolExecutor(3) as pool:
        answers = [pool.submit(post, url, image) for _ in range(3)]
        assert served.defense.entered.wait(20)
        wait_until(lambda: metric(url, "dent_serve_queue_depth") == 2)  # one in the defense, two queued
        server.should_exit = True  # what SIGTERM does
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no longer listening ...
            httpx.get(f"{url}/healthz", timeout=5)
        served.defense.release.set()  # ... but every request in flight is answered
        assert [a.result().status_code for a in answers] == [200, 200, 200]


def test_dent_serve_starts_from_the_sample_config_answers_and_stops_on_sigterm(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "dent.cli.main", "serve", "--cfg", str(ROOT / "cfgs/serve.yaml"),
                             "serve.port", str(port), "device", "cpu", "defense.steps", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"

        def up() -> bool:
            assert proc.poll() is None, proc.stdout.read()
            try:
                return httpx.get(f"{url}/healthz").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(up, 120)
        answer = httpx.post(f"{url}/predict", files=upload(png(GOOD))["files"], timeout=60)
        assert answer.status_code == 200 and answer.json()["metadata"]["model"] == "autoattack_resnet18"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == -signal.SIGTERM  # uvicorn re-raises the signal once it has shut down
    finally:
        if proc.poll() is None:
            proc.kill()
    output = proc.stdout.read()
    assert "isolation sample" in output and "Finished server process" in output and "Traceback" not in output


# -- the isolation policy --------------------------------------------------------------------------


def test_isolation_shared_is_refused_without_the_allow_key(capsys):
    with pytest.raises(ConfigError, match="set serve.allow_shared true"):
        config({"preset": "dent"}, isolation="shared")
    assert main(["serve", "serve.isolation", "shared"]) == 2
    err = capsys.readouterr().err
    assert "isolation 'shared'" in err and "Traceback" not in err


@pytest.mark.parametrize("defense, reason", [
    ({"preset": "dent"}, "affine='batch' adapts one BatchNorm scale and shift shared by the batch"),
    ({"preset": "dent_plus_bsi"}, "objective 'infomax' with diversity_weight 1.0 is not a mean of per-input terms"),
    ({"preset": "dent_plus_official", "diversity_weight": 0.0}, "sample_grad='batch_mean'"),
    ({"steps": 0, "stats": "batch"}, "stats='batch'"),
    ({"kind": "resize_pad"}, "randomized"),
    ({"kind": "pipeline", "stages": ["jpeg", {"preset": "dent"}]}, "Dent 'model': affine='batch'"),
])
def test_a_batch_wise_defense_is_refused_under_sample_isolation(defense, reason):
    with pytest.raises(ConfigError, match="isolation 'sample' needs a sample-wise defense") as refused:
        build_served(tiny_net(), config(defense))
    assert reason in str(refused.value)


def test_the_policies_admit_what_they_can_keep_their_promise_with():
    for defense in (SAMPLE_WISE, {"steps": 0}, {"kind": "jpeg"}, {"kind": "pipeline", "stages": ["jpeg", SAMPLE_WISE]},
                    {"preset": "dent_plus_bsi", "objective": "entropy"}):
        build_served(tiny_net(), config(defense))
    build_served(tiny_net(), config({"preset": "dent"}, isolation="client"))
    with pytest.raises(ConfigError, match="not episodic"):  # carried state would leak across clients
        build_served(tiny_net(), config({"preset": "dent", "episodic": False}, isolation="client"))


def test_the_sample_config_is_sample_wise():
    cfg = ServeConfig.load(ROOT / "cfgs/serve.yaml")
    assert cfg.model.arch == "autoattack_resnet18" and cfg.serve.isolation.value == "sample"
    assert cfg.defense.batch_couplings() == [] and not cfg.defense.carries_state


def test_a_whole_defense_override_replaces_the_default_entry_and_a_dotted_one_merges_into_it():
    assert ServeConfig.load(None, ["defense={kind: jpeg, quality: 50}"]).defense.quality == 50
    merged = ServeConfig.load(None, ["defense.steps", "1"]).defense
    assert merged.steps == 1 and merged.preset == "dent_plus_bsi" and merged.diversity_weight == 0
