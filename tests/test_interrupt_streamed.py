"""Ctrl-C and SIGTERM stop a merge promptly, even in the middle of a long tensor.

A streamed tensor's passes run in worker threads, which see no signal: before, an
interrupted merge waited for every tensor in flight to finish (a 1.1B SCE merge had not
exited 40 s after SIGTERM). Now the executor sets a stop flag and each streamed job ends
before its next block. The CLI runs in a subprocess on a synthetic model whose two big
embedding takes about 20 s: each of its blocks is slowed by a sleep, as a long kernel
would take on a big model, while the other worker finishes the rest; the merge is
interrupted a few seconds into the embedding. It must exit within a few seconds with exit code 130, publish no output, keep
its working folder, and ``--resume`` must then finish it to the uninterrupted merge's bytes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from alloykit.ops import jit
from alloykit.testing.fixtures import LlamaShape, write_family
from alloykit.testing.helpers import read_state, run_cli

#: seconds each block of the slowed merge sleeps: the embedding (8192 x 256) is 32 blocks a
#: pass and TIES makes 3 passes, so one such tensor takes about 20 s without the stop flag
BLOCK_SLEEP = 0.2

SLOWED_CLI = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from alloykit.methods import stream
    from alloykit.cli.main import main

    original = stream.StreamInput.blocks
    marker = Path(os.environ["SLOW_MARKER"])

    def slow_blocks(self):
        for block in original(self):
            if "embed_tokens" in self.name:
                with open(marker, "a") as fh:
                    fh.write(self.name + "\\n")
                time.sleep(float(os.environ["SLOW_SLEEP"]))
            yield block

    stream.StreamInput.blocks = slow_blocks
    sys.exit(main(sys.argv[1:]))
""")


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("interrupt")
    write_family(root, 2, LlamaShape(vocab=8192, hidden=256, intermediate=512, layers=1), shard_bytes=2_000_000)
    recipe = root / "r.yaml"
    recipe.write_text("merge_method: ties\nbase_model: base\ndtype: float32\nmodels:\n"
                      "  - model: ft1\n    parameters: {weight: 1.0, density: 0.5}\n"
                      "  - model: ft2\n    parameters: {weight: 0.5, density: 0.3}\n")
    return root, recipe


@pytest.mark.skipif(not jit.available(), reason="numba is not installed (no streamed fast path)")
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_inside_a_long_tensor_stops_within_seconds(family, tmp_path, capsys, signum):
    root, recipe = family
    out, marker = tmp_path / "out", tmp_path / "marker"
    env = {**os.environ, "SLOW_MARKER": str(marker), "SLOW_SLEEP": str(BLOCK_SLEEP)}
    # a shard per small tensor, so that some are finished when the signal comes; SIGINT at its
    # default in the child (a shell's background job inherits it ignored, and Python then keeps it so)
    proc = subprocess.Popen([sys.executable, "-c", SLOWED_CLI, "merge", str(recipe), str(out), "-q", "--threads", "2",
                             "--max-shard-size", "100KB"], env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        # 15 blocks (3 s) into the embedding: the other worker has finished the rest
        while not (marker.exists() and len(marker.read_text().split()) >= 15):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline, "the merge never reached its big tensors"
            time.sleep(0.05)
        sent = time.monotonic()
        proc.send_signal(signum)
        code = proc.wait(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    # the embedding had ~80 blocks (~16 s) to go: its worker ended at its next block
    assert took < 5.0, f"exited {took:.1f} s after the signal"
    assert code == 130, err
    assert "Traceback" not in err and "interrupted" in err and "finished shard(s)" in err and "--resume" in err, err
    tmp = tmp_path / ".out.alloykit-tmp"
    assert not out.exists() and tmp.is_dir()
    # the stopped tensors were not written half-done: --resume finishes to the plain merge's bytes
    result = run_cli(capsys, "merge", recipe, out, "-q", "--resume", "--max-shard-size", "100KB")
    assert result.code == 0, result.err
    ref = tmp_path / "ref"
    assert run_cli(capsys, "merge", recipe, ref, "-q", "--max-shard-size", "100KB").code == 0
    merged, expected = read_state(out), read_state(ref)
    assert merged.keys() == expected.keys()
    assert all(merged[name].equal(expected[name]) for name in expected)
