"""Load test for `sdruntime serve`: N clients post generations for a bounded time and count, then report
throughput, latency percentiles and every request that did not come back with an image.

    python scripts/load_test.py --url http://127.0.0.1:8000 --concurrency 20 --duration 60
    python scripts/load_test.py --mix valid=3,oversized=1,malformed=1 --duration 300   # a soak run

With --mix, requests cycle through kinds in the given proportions: valid ones, oversized ones (a size no
replica's memory admits: 400 expected), malformed ones (400 expected), streamed ones (`"stream": true`, read to
their `result` event, as the server's page asks) and loads of the page itself (GET /); the report counts outcomes
per kind and names every outcome a kind should not get (a valid request may get 503 when the queue is full).

Bounded on purpose: it stops at --duration seconds or --max-requests requests, whichever comes first, each
request gives up after --request-timeout, and it talks to this machine only (localhost), so it cannot be
turned on someone else's server. Standard library only, so it runs anywhere the runtime does.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import math
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass
from urllib.parse import urlsplit

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# prompts the shapes model was trained on (scripts/make_shapes_dataset.py's captions)
PROMPTS = (
    "a red circle on a blue background, center",
    "a green star on a yellow background, top left",
    "a blue square on a white background, bottom right",
    "a yellow triangle on a black background, center",
)


# what each kind of request adds to the body (None: GET the page instead), and the outcomes a server that
# survives should give it
KINDS = {
    "valid": ({}, {"ok", "503"}),
    "oversized": ({"size": "4096x4096"}, {"400"}),
    "malformed": ({"steps": 0}, {"400"}),
    "stream": ({"stream": True}, {"ok", "503"}),
    "page": (None, {"ok"}),
}
PAGE_MARK = b'<form id="form">'  # sdruntime/web/index.html's form: the page came whole


@dataclass
class Outcome:
    started: float  # seconds since the run began
    latency: float
    status: str  # "ok", an HTTP status such as "503", "timeout" or "connection"
    kind: str = "valid"


def parse_mix(text: str) -> list[str]:
    """ "valid=3,oversized=1" -> the kinds in one cycle: ["valid", "valid", "valid", "oversized"]."""
    cycle = []
    for part in text.split(","):
        kind, _, count = part.partition("=")
        if kind.strip() not in KINDS or not count.strip().isdigit():
            raise ValueError(f"--mix {text!r}: write KIND=COUNT,... with kinds {', '.join(KINDS)}")
        cycle += [kind.strip()] * int(count)
    if not cycle:
        raise ValueError(f"--mix {text!r}: give at least one request")
    return cycle


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile (q in 0-100) of values; NaN for none."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def check_local(url: str) -> str:
    """The generations endpoint of a local server; anything else raises ValueError."""
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in LOCAL_HOSTS:
        raise ValueError(f"{url}: the load test talks to this machine only (http://localhost:PORT)")
    return f"{url.rstrip('/')}/v1/images/generations"


def answer_status(answer: bytes, streamed: bool) -> str:
    """The status "ok" for an answer that carries PNGs: a PNG file, a b64_json answer, or server-sent events ending in a
    `result` event; else what is wrong with it (an `error` event, which comes only once the stream began: a
    replica that stopped, the time limit)."""
    if answer.startswith(PNG_SIGNATURE):
        return "ok"
    try:
        if streamed:
            name, _, data = answer.decode().strip().rpartition("\n\n")[2].partition("\ndata: ")
            if name == "event: error":
                return f"error event ({json.loads(data)['error']['type']})"
            if name != "event: result":
                return "no result event"
            answer = data.encode()
        images = [base64.b64decode(item["b64_json"]) for item in json.loads(answer)["data"]]
    except (ValueError, KeyError, TypeError, binascii.Error):
        return "not a png"
    return "ok" if images and all(i.startswith(PNG_SIGNATURE) for i in images) else "not a png"


def fetch(url: str, body: dict | None, timeout: float) -> str:
    """One request's status: a POST of `body` ("ok" for its PNGs: answer_status), or with no body a GET of the
    page ("ok" when it came whole); else the HTTP status or how it failed."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = response.read()
            if body is None:
                return "ok" if PAGE_MARK in answer else "not the page"
            return answer_status(answer, bool(body.get("stream")))
    except urllib.error.HTTPError as e:
        e.read()
        return str(e.code)
    except TimeoutError:
        return "timeout"
    except (urllib.error.URLError, ConnectionError, OSError) as e:
        return "timeout" if "timed out" in str(e) else "connection"


def run(
    url: str,
    concurrency: int,
    duration: float,
    max_requests: int,
    request_timeout: float,
    steps: int | None = None,
    size: str | None = None,
    mix: list[str] | None = None,
) -> dict:
    """Drive `concurrency` clients until `duration` seconds or `max_requests` requests; the report as a dict.
    `mix` cycles the kinds of request (parse_mix); by default all are valid."""
    cycle = mix or ["valid"]
    endpoint = check_local(url)
    page = endpoint.removesuffix("v1/images/generations")
    outcomes: list[Outcome] = []
    lock = threading.Lock()
    issued = 0
    begin = time.monotonic()

    def client() -> None:
        nonlocal issued
        while time.monotonic() - begin < duration:
            with lock:
                if issued >= max_requests:
                    return
                number = issued
                issued += 1
            kind = cycle[number % len(cycle)]
            body = {"prompt": PROMPTS[number % len(PROMPTS)], "seed": number}
            body.update({k: v for k, v in (("steps", steps), ("size", size)) if v is not None})
            extra = KINDS[kind][0]
            started = time.monotonic()
            if extra is None:
                status = fetch(page, None, request_timeout)
            else:
                status = fetch(endpoint, body | extra, request_timeout)
            with lock:
                outcomes.append(Outcome(started - begin, time.monotonic() - started, status, kind))

    threads = [threading.Thread(target=client) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return summarize(outcomes, cycle, concurrency, time.monotonic() - begin)


def summarize(outcomes: list[Outcome], cycle: list[str], concurrency: int, wall: float) -> dict:
    """The report: counts, throughput and latency percentiles of the image requests, the page loads' own latency,
    errors, lost requests, and per kind what came back and what should not have."""
    ok = [o.latency for o in outcomes if o.status == "ok" and o.kind != "page"]
    pages = [o.latency for o in outcomes if o.status == "ok" and o.kind == "page"]
    by_kind = {kind: dict(Counter(o.status for o in outcomes if o.kind == kind)) for kind in dict.fromkeys(cycle)}
    return {
        "concurrency": concurrency,
        "requests": len(outcomes),
        "ok": len(ok),  # images
        "pages": len(pages),  # page loads (GET /) that came whole
        "errors": dict(Counter(o.status for o in outcomes if o.status != "ok")),
        # no answer at all, as against an HTTP error the server chose to send
        "lost": sum(o.status in ("timeout", "connection") for o in outcomes),
        "wall_s": round(wall, 2),
        "images_per_s": round(len(ok) / wall, 3) if wall else 0.0,
        "latency_s": {f"p{q}": round(percentile(ok, q), 3) for q in (50, 95, 99)},
        "page_latency_s": {f"p{q}": round(percentile(pages, q), 3) for q in (50, 95, 99)} if pages else None,
        "by_kind": by_kind,
        # what a kind should never get: a lost request, a 5xx other than a full queue's 503, a wrong answer
        "unexpected": {
            kind: {status: n for status, n in counts.items() if status not in KINDS[kind][1]}
            for kind, counts in by_kind.items()
            if any(status not in KINDS[kind][1] for status in counts)
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="The server (localhost only).")
    parser.add_argument("--concurrency", type=int, default=20, help="Clients, each one request at a time.")
    parser.add_argument("--duration", type=float, default=60.0, help="Seconds before no new request starts.")
    parser.add_argument("--max-requests", type=int, default=10_000, help="Requests in all, at most.")
    parser.add_argument("--request-timeout", type=float, default=300.0, help="Seconds one request may take.")
    parser.add_argument("--steps", type=int, help="Steps per image (default: the server's).")
    parser.add_argument("--size", help="WIDTHxHEIGHT (default: the model's).")
    parser.add_argument("--mix", help="Kinds of request in proportion, e.g. valid=3,oversized=1,malformed=1.")
    parser.add_argument("--json", dest="json_path", help="Also write the report here.")
    args = parser.parse_args(argv)
    if not (1 <= args.concurrency <= 256 and args.duration > 0 and args.max_requests >= 1):
        parser.error("--concurrency 1-256, a positive --duration and --max-requests are needed")
    try:
        mix = parse_mix(args.mix) if args.mix else None
        report = run(
            args.url,
            args.concurrency,
            args.duration,
            args.max_requests,
            args.request_timeout,
            args.steps,
            args.size,
            mix,
        )
    except ValueError as e:
        print(f"load_test: error: {e}", file=sys.stderr)
        return 2
    latency = report["latency_s"]
    print(
        f"{report['concurrency']} clients, {report['wall_s']} s: {report['requests']} requests, {report['ok']} images, "
        f"{report['images_per_s']} images/s; latency p50 {latency['p50']} s, p95 {latency['p95']} s, "
        f"p99 {latency['p99']} s; errors {report['errors'] or 'none'}, lost {report['lost']}"
    )
    if report["page_latency_s"]:
        page = report["page_latency_s"]
        print(f"{report['pages']} page loads: latency p50 {page['p50']} s, p95 {page['p95']} s, p99 {page['p99']} s")
    if mix:
        print(f"by kind {report['by_kind']}; unexpected {report['unexpected'] or 'none'}")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
    if mix:  # the errors a mix asks for are expected
        return 0 if not report["unexpected"] else 1
    return 0 if not report["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
