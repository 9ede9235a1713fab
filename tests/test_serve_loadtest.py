"""``dent serve-load`` (dent.serving.loadtest): the client stops by itself, sends every request exactly once,
reconstructs the batches the service formed, and refuses bad arguments with a message. Against the tiny model
in real uvicorn (tests/test_serve.py's helpers)."""

from __future__ import annotations

import os
from collections import Counter

import pytest
import torch

pytest.importorskip("fastapi", reason="dent serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="the load test's HTTP client: pip install -e '.[serve]'")

from dent.cli.main import main  # noqa: E402
from dent.serving.loadtest import Level, format_table, measure, request_bodies  # noqa: E402
from test_serve import SAMPLE_WISE, config, metric, serve_tiny  # noqa: E402

ANSWERED = 'dent_serve_requests_total{endpoint="/predict",status="200"}'


def test_the_client_sends_each_request_once_stops_and_reports_the_batches_formed():
    bodies = request_bodies(torch.rand(8, 3, 32, 32), 2)
    with serve_tiny(config(SAMPLE_WISE, max_batch=16, max_wait_ms=100)) as (url, _):
        levels = measure(url, "dent+", bodies, 2, [1, 3], requests=7, pid=os.getpid(), warmup=1)
        assert metric(url, ANSWERED) == 1 + 7 + 7  # the warm-up, then each level's requests, once each
    assert [(level.concurrency, level.answered, level.errors) for level in levels] == \
        [(1, 7, Counter()), (3, 7, Counter())]
    for level in levels:
        assert sum(size * count for size, count in level.batches.items()) == pytest.approx(7 * 2)  # every image once
        assert level.throughput() > 0 and level.percentile(50) <= level.percentile(99)
        assert level.peak_rss_mib > 0
    assert set(levels[0].batches) == {2}  # one request at a time: batches of one request
    assert max(levels[1].batches) > 2  # three in flight, 100 ms to wait: batches of several requests formed


def test_dent_serve_load_measures_a_running_service_and_writes_its_table(tmp_path, capsys):
    with serve_tiny(config({"steps": 0}, max_wait_ms=0)) as (url, _):
        assert main(["serve-load", "--url", url, "--concurrency", "2", "--requests", "5", "--images-from", "random",
                     "--warmup", "0", "--out", str(tmp_path / "load.md")]) == 0
        assert metric(url, ANSWERED) == 5
    out = capsys.readouterr().out
    assert "| service | 2 | 5 | 0 |" in out and "ATen CPU capability" in out and "OMP_NUM_THREADS" in out
    assert (tmp_path / "load.md").read_text().strip() == out.strip()


def test_the_table_gives_each_defense_over_the_static_model_at_the_same_concurrency():
    def level(defense: str, seconds: float, latency: float) -> Level:
        return Level(defense, 4, 10, 1, seconds=seconds, latencies=[latency] * 10, batches=Counter({4: 2, 2: 1}))

    rows = format_table([level("static", 1.0, 0.1), level("dent+_k6", 4.0, 0.3)]).splitlines()
    assert rows[2].startswith("| static | 4 | 10 | 0 | 10.00 | 10.00 | 1.000 | 100 |")
    assert "| 2.50 | 2.50 | 0.250 | 300 | 300 | 300 | 3.00 | 2x1, 4x2 | 3.33 |" in rows[3]
    refused = Level("static", 4, 10, 1, seconds=1.0, errors=Counter({"504": 10}))  # nothing to compare with
    rows = format_table([refused, level("dent", 4.0, 0.3)]).splitlines()
    assert "| 504: 10 | 0.00 | 0.00 | - | nan | nan | nan | - | - | - |" in rows[2]
    assert "| 2.50 | 2.50 | - | 300 | 300 | 300 | - |" in rows[3]


@pytest.mark.parametrize("argv, message", [
    (["--concurrency", "0"], "argument --concurrency: expected an integer of at least 1, got '0'"),
    (["--defenses", "dent++"], "argument --defenses: invalid choice: 'dent++'"),
    (["--requests", "dent++=3"], "unknown defense 'dent++' in 'dent++=3'"),
    (["--requests", "many"], "expected an integer of at least 1, got 'many'"),
])
def test_bad_arguments_are_refused_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["serve-load", *argv])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--url", "http://127.0.0.1:1", "--defenses", "static"], "--url measures the service already running there"),
    (["--url", "http://127.0.0.1:1"], "no service answers http://127.0.0.1:1/healthz"),
])
def test_a_url_with_services_to_start_or_no_service_is_refused(argv, message, capsys):
    assert main(["serve-load", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
