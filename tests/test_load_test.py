"""scripts/load_test.py against a stand-in server: counts, errors, limits, and localhost only."""

from __future__ import annotations

import base64
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from sdruntime.serving import error_body, sse_event

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import load_test  # noqa: E402

PNG = load_test.PNG_SIGNATURE + b"rest"
PAGE = (Path(__file__).resolve().parents[1] / "runtime/sdruntime/web/index.html").read_bytes()


def b64_answer(*pngs: bytes) -> dict:
    return {"created": 0, "data": [{"b64_json": base64.b64encode(png).decode(), "seed": 0} for png in pngs]}


class StandIn(BaseHTTPRequestHandler):
    """Answers a PNG signature, or 503 for every seed divisible by 3, after `delay` seconds; a streamed request's
    events (the server's own sse_event) end in a `result`, or for seeds divisible by 7 in an `error` (a replica
    that stopped mid-stream); GET / the page."""

    delay = 0.0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        time.sleep(self.delay)
        status, payload = (503, b"{}") if body["seed"] % 3 == 0 else (200, PNG)
        if body.get("steps") == 0 or body.get("size") == "4096x4096":
            status, payload = (400, b"{}") if body["seed"] % 5 else (500, b"{}")  # a 500 now and then
        if body.get("stream") and status == 200:
            last = sse_event("error", error_body("the replica stopped", 503)) if body["seed"] % 7 == 0 else None
            events = sse_event("progress", {"step": 1, "steps": 1}) + (last or sse_event("result", b64_answer(PNG)))
            payload = events.encode()
        self.reply(status, payload)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.reply(*((200, PAGE) if self.path == "/" else (404, b"{}")))

    def reply(self, status: int, payload: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def stand_in():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    StandIn.delay = 0.0


def test_counts_images_errors_and_latencies(stand_in, tmp_path):
    url = f"http://127.0.0.1:{stand_in.server_address[1]}"
    report = load_test.run(url, concurrency=3, duration=30, max_requests=9, request_timeout=5)
    # seeds 0-8: 0, 3, 6 get 503
    assert report["requests"] == 9 and report["ok"] == 6 and report["errors"] == {"503": 3} and report["lost"] == 0
    assert 0 <= report["latency_s"]["p50"] <= report["latency_s"]["p95"] <= report["latency_s"]["p99"] < 5
    out = tmp_path / "report.json"
    assert load_test.main(["--url", url, "--concurrency", "2", "--max-requests", "4", "--json", str(out)]) == 1
    assert json.loads(out.read_text())["errors"] == {"503": 2}


def test_stops_at_the_time_limit_and_counts_timeouts_as_lost(stand_in):
    StandIn.delay = 0.4
    url = f"http://127.0.0.1:{stand_in.server_address[1]}"
    started = time.monotonic()
    report = load_test.run(url, concurrency=2, duration=0.5, max_requests=1000, request_timeout=0.2)
    assert time.monotonic() - started < 2 and 0 < report["requests"] <= 6
    assert report["ok"] == 0 and report["lost"] == report["requests"] == report["errors"]["timeout"]


def test_a_mix_counts_each_kind_and_names_what_it_should_not_get(stand_in, capsys):
    url = f"http://127.0.0.1:{stand_in.server_port}"
    report = load_test.run(url, 4, 30, 20, 5, mix=load_test.parse_mix("valid=2,oversized=1,malformed=1"))
    kinds = report["by_kind"]
    assert sum(sum(c.values()) for c in kinds.values()) == report["requests"] == 20
    assert sum(kinds["valid"].values()) == 10 and sum(kinds["oversized"].values()) == 5
    # seeds 2, 6, 10, ... are oversized and 3, 7, 11, ... malformed; the stand-in answers 500 to those
    # divisible by 5 (10 and 15); the valid ones' 503s are expected
    assert report["unexpected"] == {"oversized": {"500": 1}, "malformed": {"500": 1}}
    assert "503" in kinds["valid"] and "503" not in report["unexpected"].get("valid", {})
    assert load_test.main(["--url", url, "--max-requests", "8", "--mix", "valid=1,malformed=1"]) == 1
    assert "unexpected {'malformed'" in capsys.readouterr().out
    with pytest.raises(ValueError, match="kinds valid, oversized, malformed"):
        load_test.parse_mix("valid=1,huge=2")


def test_percentile_is_nearest_rank():
    values = [float(v) for v in range(1, 101)]
    assert [load_test.percentile(values, q) for q in (50, 95, 99)] == [50.0, 95.0, 99.0]
    assert load_test.percentile([3.0], 99) == 3.0


@pytest.mark.parametrize("url", ["http://example.com:8000", "https://127.0.0.1:8000", "http://10.0.0.5:8000"])
def test_refuses_other_machines(url, capsys):
    assert load_test.main(["--url", url, "--max-requests", "1"]) == 2
    assert "talks to this machine only" in capsys.readouterr().err


def test_a_mix_with_streams_and_the_page_counts_them_apart(stand_in, capsys):
    url = f"http://127.0.0.1:{stand_in.server_port}"
    report = load_test.run(url, 3, 30, 24, 5, mix=load_test.parse_mix("page=1,valid=1,stream=1"))
    # seeds 1, 4, ..., 22 are valid and 2, 5, ..., 23 streamed; the stand-in ends 14's stream with an error event
    assert report["by_kind"]["valid"] == {"ok": 8}
    assert report["by_kind"]["stream"] == {"ok": 7, "error event (server_error)": 1}
    assert report["by_kind"]["page"] == {"ok": 8} and report["pages"] == 8 and report["page_latency_s"]["p50"] < 5
    assert report["ok"] == 15  # images only, not page loads
    assert report["unexpected"] == {"stream": {"error event (server_error)": 1}} and report["lost"] == 0
    assert load_test.main(["--url", url, "--max-requests", "6", "--mix", "valid=1,page=1"]) == 0
    assert "3 page loads: latency p50" in capsys.readouterr().out


def test_answers_without_pngs_are_not_ok():
    assert load_test.answer_status(PNG, False) == "ok"
    assert load_test.answer_status(json.dumps(b64_answer(PNG, PNG)).encode(), False) == "ok"
    assert load_test.answer_status(json.dumps(b64_answer(PNG, b"GIF89a")).encode(), False) == "not a png"
    assert load_test.answer_status(b'{"data": []}', False) == "not a png"
    progress_only = sse_event("progress", {"step": 1, "steps": 2}).encode()
    assert load_test.answer_status(progress_only, True) == "no result event"
    late = sse_event("error", error_body("not drawn within the server's limit", 504)).encode()
    assert load_test.answer_status(progress_only + late, True) == "error event (server_error)"
