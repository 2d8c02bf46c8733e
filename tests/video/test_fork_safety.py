"""Decoded frames can be collected in a forked child (a DataLoader worker): swscale runs
without slice threads, so freeing a frame's converter waits for no thread the child lacks.

Before ``SWSCALE_THREADS = 1`` the child below hung for good in ``sws_freeContext``: the
frames a read leaves in reference cycles are freed by the child's garbage collector, and
their converters joined threads that only the parent had (seen as a hung
``test_dataloader_workers_read_their_own_shards``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.media import sample_clip

ROOT = Path(__file__).resolve().parents[2]

CHILD = """
import gc, os, sys, time
from ivvae.video import Mp4Writer, Preprocess, open_video
import io
gc.disable()  # keep whatever a read leaves in cycles, as a busy parent would
for _ in range(3):
    with open_video(sys.argv[1], preprocess=Preprocess.parse({"resize": "64"})) as r:
        frames = r.read_all()
sink = io.BytesIO()
with Mp4Writer(sink, width=frames.shape[2], height=frames.shape[1], fps=24) as writer:
    writer.write(frames[:4])
pid = os.fork()
if pid == 0:
    gc.collect()
    os._exit(0)
deadline = time.monotonic() + 30
while time.monotonic() < deadline:
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        sys.exit(0 if status == 0 else 2)
    time.sleep(0.1)
os.kill(pid, 9)
sys.exit(3)
"""


def test_a_forked_child_collects_decoded_frames() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(sample_clip("bigbuckbunny"))],
        cwd=ROOT, env={"PYTHONPATH": f"{ROOT / 'service'}:{ROOT}", "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 3, "the forked child hung freeing decoded frames"
    assert result.returncode == 0, result.stderr
