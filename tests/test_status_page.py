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
