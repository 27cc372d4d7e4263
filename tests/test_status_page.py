"""The master's status page (``/`` of ``--status``) in a real headless
Chromium, against a live run: a real ``pccl-master`` subprocess and real
peer processes (pccl.testing.peer_worker).

The page is loaded once and never reloaded: every later check reads the
live DOM that the page's own one-second refresh produced, polled with a
deadline (pccl.testing.browser).  Chromium is Debian's ``chromium``
package, installed with apt-get when missing and we are root; the test
skips, saying why, when it cannot be had.  The screenshot and DOM dumps
land in build/artifacts/.
"""

from __future__ import annotations

import http.client
import json
import signal
from html.parser import HTMLParser
from pathlib import Path

import pytest

from pccl.testing.browser import Browser, ensure_chromium
from pccl.testing.peer_worker import PeerRun, gather, join_all, request_all, send_all

ARTIFACTS = Path(__file__).resolve().parents[1] / "build" / "artifacts"
HEARTBEAT_TIMEOUT = 1.5
HEARTBEAT_INTERVAL = 0.25
PAGE_TIMEOUT = 20.0  # for the page to show a change: refresh is 1 s, the box is busy


@pytest.fixture(scope="session")
def chromium() -> str:
    path, why = ensure_chromium()
    if path is None:
        pytest.skip(f"no headless browser: {why}")
    return path


class Dom(HTMLParser):
    """What the test reads from a DOM dump: the rows of the peers table,
    the ring nodes and edges of each group, pending joiners, events."""

    def __init__(self, html: str):
        super().__init__()
        self.rows: dict[str, str] = {}  # peer id -> state (peers table)
        self.nodes: dict[str, dict[str, str]] = {}  # group -> {peer id -> state}
        self.edges: dict[str, list[tuple[str, str]]] = {}
        self.pending: list[str] = []
        self.events: list[tuple[str, str | None]] = []  # (kind, peer id)
        self._group: str | None = None
        self._section: str | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("id") in ("peers", "pending", "events"):
            self._section = a["id"]
        if tag == "svg" and "data-group" in a:
            self._group = a["data-group"]
            self.nodes[self._group] = {}
            self.edges[self._group] = []
        elif tag == "g" and a.get("class") == "node" and self._group is not None:
            self.nodes[self._group][a["data-peer"]] = a["data-state"]
        elif tag == "path" and a.get("class") == "edge" and self._group is not None:
            self.edges[self._group].append((a["data-from"], a["data-to"]))
        elif tag == "tr" and "data-peer" in a and self._section == "peers":
            self.rows[a["data-peer"]] = a["data-state"]
        elif tag == "li" and "data-peer" in a and self._section == "pending":
            self.pending.append(a["data-peer"])
        elif tag == "li" and "data-kind" in a and self._section == "events":
            self.events.append((a["data-kind"], a.get("data-peer")))

    def handle_endtag(self, tag):
        if tag == "svg":
            self._group = None


def _dump(page, name: str) -> Dom:
    html = page.dom()
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / f"status_page_{name}.html").write_text(html)
    return Dom(html)


def _rows_are(ids: dict[str, str]) -> str:
    """A JS condition: the peers table holds exactly these peer -> state."""
    want = json.dumps(ids, sort_keys=True, separators=(",", ":"))
    return (
        "(() => { const o = {}; for (const r of document.querySelectorAll('#peers tr[data-peer]'))"
        " o[r.dataset.peer] = r.dataset.state;"
        f" return JSON.stringify(o, Object.keys(o).sort()) === {json.dumps(want)}; }})()"
    )


def _status(address: str) -> dict:
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/status")
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def test_http_root_serves_the_page(tmp_path):
    with PeerRun(str(tmp_path), extra=["--status", "127.0.0.1:0"]) as run:
        host, port = run.master.status_address.rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=10)
        conn.request("GET", "/")
        resp = conn.getresponse()
        body = resp.read().decode()
        conn.close()
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "text/html; charset=utf-8"
    assert body.startswith("<!DOCTYPE html>") and 'fetch("status"' in body
    # Self-contained: nothing is loaded from anywhere else.
    for needle in ("http://", "https://", "<link rel=\"stylesheet\"", "<script src"):
        assert needle not in body.replace("http://www.w3.org/2000/svg", "")


@pytest.mark.timeout(240)
def test_status_page_follows_a_live_run(tmp_path, chromium):
    with PeerRun(
        str(tmp_path),
        heartbeat_timeout=HEARTBEAT_TIMEOUT,
        heartbeat_interval=HEARTBEAT_INTERVAL,
        vote_timeout=20,
        extra=["--status", "127.0.0.1:0"],
    ) as run, Browser.launch(chromium, width=1280, height=900) as browser:
        peers = [run.peer(i) for i in range(3)]
        ids = [r["peer_id"] for r in join_all(peers)]
        page = browser.open(f"http://{run.master.status_address}/")

        # 1. The three peers of the run, admitted, on one ring of three.
        page.wait_for(_rows_are(dict.fromkeys(ids, "admitted")), PAGE_TIMEOUT)
        dom = _dump(page, "joined")
        assert dom.nodes == {"0": dict.fromkeys(ids, "admitted")}
        (group,) = _status(run.master.status_address)["groups"]
        ring = group["ring"]
        assert sorted(ring) == sorted(ids)
        # Arrows in send order: rank i sends to rank i+1.
        assert dom.edges["0"] == [(ring[i], ring[(i + 1) % 3]) for i in range(3)]
        assert group["edges"] == [{"from": a, "to": b} for a, b in dom.edges["0"]]
        assert dom.pending == []
        assert [k for k, _ in dom.events].count("admitted") == 3

        # Collectives per second, while the peers all-reduce.
        send_all(peers, "bench", n=1024, iters=400, warmup=2)
        page.wait_for(
            "parseFloat(document.querySelector('#tile-cps .v').textContent) > 0", PAGE_TIMEOUT
        )
        gather(peers, 120, what="bench")

        # 2. SIGKILL one: it leaves the table, its node on the ring (fixed
        # for this epoch) is drawn as gone, a "lost" event names it.
        victim, survivors = peers[2], peers[:2]
        victim.signal(signal.SIGKILL)
        page.wait_for(_rows_are(dict.fromkeys(ids[:2], "admitted")), PAGE_TIMEOUT)
        page.wait_for(
            f"document.querySelector('#events li[data-kind=lost][data-peer={ids[2]}]')",
            PAGE_TIMEOUT,
        )
        dom = _dump(page, "killed")
        assert dom.nodes["0"][ids[2]] == "gone"
        assert ("lost", ids[2]) in dom.events
        assert ids[2] not in dom.rows
        assert page.evaluate("document.querySelector('#tile-lost .v').textContent") == "1"

        # 3. A newcomer connects: listed as a pending joiner...
        joiner = run.peer(3)
        joiner.send("connect", timeout=60)
        survivors[0].request("wait_pending", timeout=30)
        page.wait_for("document.querySelectorAll('#pending li[data-peer]').length === 1",
                      PAGE_TIMEOUT)
        dom = _dump(page, "pending")
        (new_id,) = dom.pending
        assert dom.rows[new_id] == "pending"

        # ...then admitted by the survivors' vote: a new ring of three.
        request_all(survivors, "update_topology")
        assert joiner.reply(30, "connect")["ok"]
        everyone = [*ids[:2], new_id]
        page.wait_for(_rows_are(dict.fromkeys(everyone, "admitted")), PAGE_TIMEOUT)
        page.wait_for("document.querySelectorAll('#pending li[data-peer]').length === 0",
                      PAGE_TIMEOUT)
        page.wait_for(
            f"document.querySelectorAll('svg[data-group=\"0\"] g.node').length === 3 && "
            f"document.querySelector('svg[data-group=\"0\"] g.node[data-peer={new_id}]')",
            PAGE_TIMEOUT,
        )
        live = [*survivors, joiner]
        send_all(live, "bench", n=1024, iters=400, warmup=2)
        page.wait_for(
            "parseFloat(document.querySelector('#tile-cps .v').textContent) > 0", PAGE_TIMEOUT
        )
        dom = _dump(page, "rejoined")
        assert dom.nodes == {"0": dict.fromkeys(everyone, "admitted")}
        assert ("admitted", new_id) in dom.events
        shot = page.screenshot(str(ARTIFACTS / "status_page.png"))
        gather(live, 120, what="bench")
        assert Path(shot).stat().st_size > 10_000
        assert page.errors == [], page.errors


# --------------------------------------------------------------------------
# The fields status.py derives (no browser needed).


def test_ring_edges_follow_send_order():
    from pccl.master.status import ring_edges

    assert ring_edges([]) == [] and ring_edges(["a"]) == []
    assert ring_edges(["a", "b"]) == [{"from": "a", "to": "b"}, {"from": "b", "to": "a"}]
    assert ring_edges(["a", "b", "c"]) == [
        {"from": "a", "to": "b"}, {"from": "b", "to": "c"}, {"from": "c", "to": "a"}
    ]


def test_rates_and_edge_bandwidth_from_samples():
    from pccl.master.status import RATE_WINDOW, RateSampler, ring_edges

    def doc(ok, aborted, tx):
        return {
            "counters": {"ops_ok": ok, "ops_aborted": aborted},
            "peers": [{"peer_id": pid, "tx_bytes": n} for pid, n in tx.items()]
            + [{"peer_id": "c"}],  # reports no byte count
            "groups": [{"ring": ["a", "b", "c"], "edges": ring_edges(["a", "b", "c"])}],
        }

    sampler = RateSampler()
    fresh = doc(0, 0, {})
    sampler.annotate(0.0, fresh)  # no sample yet: rates unknown, not zero
    assert fresh["rates"]["collectives_per_s"] is None
    t = 0.0
    ok = 0
    while t <= 3 * RATE_WINDOW:  # 40 collectives/s, 1 abort/s, a sends 1 MB/s, b 2 MB/s
        sampler.add(t, ok, int(t), {"a": int(1e6 * t), "b": int(2e6 * t)})
        t += 0.5
        ok += 20
    now = t
    d = doc(ok, int(now), {"a": int(1e6 * now), "b": int(2e6 * now)})
    sampler.annotate(now, d)
    assert d["rates"]["window_s"] == pytest.approx(RATE_WINDOW, abs=0.5)
    assert d["rates"]["collectives_per_s"] == pytest.approx(40, rel=0.01)
    assert d["rates"]["aborted_per_s"] == pytest.approx(1, rel=0.1)
    edges = {(e["from"], e["to"]): e.get("bytes_per_s") for e in d["groups"][0]["edges"]}
    assert edges[("a", "b")] == pytest.approx(1e6, rel=0.01)
    assert edges[("b", "c")] == pytest.approx(2e6, rel=0.01)
    assert edges[("c", "a")] is None  # c reports nothing: no bandwidth, not zero
    assert len(sampler.samples) <= RATE_WINDOW / 0.5 + 2  # bounded memory


def test_page_renders_names_bandwidth_and_broken_rings(tmp_path, chromium):
    """Fields today's master does not fill yet (peer names, byte counts, edge
    bandwidth) and states a short live run rarely shows (a broken ring, a
    ring of 12): the page is served with a fixed /status document."""
    import http.server
    import threading

    from pccl.master.status import ring_edges, status_page

    big = [f"q{i}" for i in range(12)]
    ring = ["p1", "p2", "p3"]
    peers = [
        {"peer_id": pid, "name": f"trainer-{i}", "state": "admitted", "group": 0,
         "address": f"127.0.0.1:{5000 + i}", "last_heartbeat_age": 0.1 * i,
         "connected_for": 30.0, "tx_bytes": 123_456_789 * (i + 1), "rx_bytes": 98_765_432}
        for i, pid in enumerate(ring)
    ] + [
        {"peer_id": pid, "state": "admitted", "group": 1, "address": "127.0.0.1:6000",
         "last_heartbeat_age": 0.2, "connected_for": 12.0} for pid in big[:11]
    ] + [
        {"peer_id": "p9", "name": "<b>late</b>", "state": "pending", "group": 0,
         "address": "127.0.0.1:7000", "last_heartbeat_age": 0.0, "connected_for": 2.0},
    ]
    edges = ring_edges(ring)
    for i, e in enumerate(edges):
        e["bytes_per_s"] = 1.5e9 / (i + 1)
    doc = {
        "listen": "127.0.0.1:40001", "epoch": 7, "world_size": 14, "auth": True,
        "uptime_s": 3723.0, "open_ops": 2, "pending": ["p9"],
        "heartbeat": {"interval": 0.5, "timeout": 3.0},
        "rates": {"window_s": 5.0, "collectives_per_s": 123.4, "aborted_per_s": 0.0},
        "counters": {"ops_ok": 98765, "ops_aborted": 3, "peers_joined": 16, "peers_lost": 1,
                     "peers_evicted": 1, "peers_left": 0},
        "peers": peers,
        "groups": [
            {"group": 0, "ring": ring, "broken": False, "edges": edges},
            {"group": 1, "ring": big, "broken": True, "edges": ring_edges(big)},
        ],
        "events": [
            {"kind": "lost", "peer_id": "q11", "group": 1, "epoch": 7, "age": 4.0,
             "reason": "silent for 3.10 s"},
            {"kind": "joined", "peer_id": "p9", "name": "<b>late</b>", "group": 0, "epoch": 7,
             "age": 2.0},
        ],
    }
    page_html, body = status_page(), json.dumps(doc).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            data, ctype = (body, "application/json") if self.path == "/status" else (
                page_html, "text/html; charset=utf-8")
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with Browser.launch(chromium) as browser:
            page = browser.open(f"http://127.0.0.1:{server.server_address[1]}/")
            page.wait_for("Number(document.body.dataset.updates) >= 1", PAGE_TIMEOUT)
            dom = _dump(page, "designed_fields")
            labels = page.evaluate(
                "[...document.querySelectorAll('svg[data-group=\"0\"] text.bw')]"
                ".map(t => t.textContent)"
            )
            names = page.evaluate(
                "[...document.querySelectorAll('#peers tr[data-peer] td:first-child b')]"
                ".map(b => b.textContent)"
            )
            bytes_sent = page.evaluate(
                "document.querySelector('#peers tr[data-peer=p1] td:nth-child(6)').textContent"
            )
            injected = page.evaluate("document.querySelectorAll('#pending li b b').length")
            page.screenshot(str(ARTIFACTS / "status_page_designed_fields.png"))
            errors = page.errors
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
    assert errors == [], errors
    assert labels == ["1.50 GB/s", "750.0 MB/s", "500.0 MB/s"], labels
    assert names[:3] == ["trainer-0", "trainer-1", "trainer-2"]
    assert "<b>late</b>" in names  # a name is text, never markup
    assert injected == 0
    assert bytes_sent == "123.5 MB"
    assert dom.pending == ["p9"]
    assert len(dom.nodes["1"]) == 12 and dom.nodes["1"]["q11"] == "gone"
    assert len(dom.edges["1"]) == 12
    assert ("lost", "q11") in dom.events
