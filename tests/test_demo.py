"""The demo (`make demo`, examples/diloco_train.py --local 3 --chaos) in a
short form: it must tell its story - the kill, the survivors' retry, the
newcomer pending then admitted, its shared-state sync, every finisher at the
same state - with the master's names matching the demo's, and print no line
twice."""

from __future__ import annotations

import collections
import os
import re
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = [
        sys.executable, os.path.join(ROOT, "examples", "diloco_train.py"),
        "--local", "3", "--chaos", "--outer-steps", "5", "--sync-every", "10",
        "--model", "tiny", "--chars", "300000", "--eval-batches", "1", "--warmup", "10",
        "--out-dir", str(out),
    ]
    env = dict(os.environ)
    env.pop("PCCL_LOG", None)
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    return run.stdout, out


def test_demo_tells_the_story(demo):
    text, out = demo
    assert re.search(r"^status page: http://127\.0\.0\.1:\d+/", text, re.M), text
    assert re.search(r"^\*\*\* SIGKILL peer1 .* after outer step (\d+)", text, re.M), text
    # The master names the killed peer as the demo does.
    assert re.search(r"^master: event=lost peer=p\d+ name=peer1 ", text, re.M), text
    # Each survivor: one failed step, retried among the two of them.
    for peer in ("peer0", "peer2"):
        retried = re.findall(
            rf"^{peer}: \[{peer}\] outer (\d+): the all-reduce failed \(a peer was lost\) and "
            r"was retried among the 2 survivors", text, re.M)
        assert len(retried) == 1, text
    # The newcomer: pending, admitted, synced from the others.
    assert re.search(r"^peer3: \[peer3\] joining the running run: pending", text, re.M), text
    assert re.search(r"^master: event=joined peer=p\d+ name=peer3 ", text, re.M), text
    assert re.search(r"^master: event=admitted peer=p\d+ name=peer3 ", text, re.M), text
    assert re.search(r"^peer3: \[peer3\] admitted as p\d+ after [\d.]+ s pending", text, re.M)
    sync = re.search(r"^peer3: \[peer3\] shared-state sync: ([\d.]+) MB from (\d+) peers? in "
                     r"[\d.]+ s; joins the run at outer step (\d+)", text, re.M)
    assert sync, text
    assert float(sync.group(1)) > 0 and int(sync.group(2)) == 2 and int(sync.group(3)) >= 2
    assert "peer3 joined after outer step" in text
    assert "final outer state: identical on every peer that finished" in text
    assert "peer1: killed after outer step" in text
    assert (out / "loss.png").stat().st_size > 10_000


def test_demo_repeats_no_line(demo):
    text, _ = demo
    lines = [line for line in text.splitlines() if line.strip()]
    repeated = {line: n for line, n in collections.Counter(lines).items() if n > 1}
    assert not repeated, repeated
