#!/usr/bin/env python3
"""Collect the still images the bundled model was fine-tuned on, from PyPI wheels.

    python scripts/gather_stills.py DIR      # then: ivvae train --data DIR <clips> ...

The pictures ship inside three packages' wheels (public-domain or freely licensed sample
images; see each project's data README): scikit-image's ``skimage/data``, scikit-learn's
``sklearn/datasets/images`` and matplotlib's ``sample_data``. The wheels are fetched with
``pip download`` at pinned versions (nothing is installed) and every extracted file is
checked against the SHA-256 recorded here, so DIR holds exactly the training set of
``service/ivvae/weights/MODEL_CARD.md``. Skipped on purpose: near-duplicates
(``motorcycle_right``), tiny or synthetic test patterns (chessboards, ``phantom``,
``horse``, ``microaneurysms``) and multi-page TIFFs.
"""

from __future__ import annotations

import argparse
import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEELS = {"scikit-image==0.26.0": "skimage/data/", "scikit-learn==1.9.1":
          "sklearn/datasets/images/", "matplotlib==3.10.9": "matplotlib/mpl-data/sample_data/"}

# name -> sha256 of the file as it is in the wheel
STILLS = {
    "astronaut.png": "88431cd9653ccd539741b555fb0a46b61558b301d4110412b5bc28b5e3ea6cb5",
    "brick.png": "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf",
    "camera.png": "b0793d2adda0fa6ae899c03989482bff9a42d3d5690fc7e3648f2795d730c23a",
    "cell.png": "8d23a7fb81f7cc877cd09f330357fc7f595651306e84e17252f6e0a1b3f61515",
    "chelsea.png": "596aa1e7cb875eb79f437e310381d26b338a81c2da23439704a73c4651e8c4bb",
    "china.jpg": "8378025ad2519d649d02e32bd98990db4ab572357d9f09841c2fbfbb4fefad29",
    "clock_motion.png": "f029226b28b642e80113d86622e9b215ee067a0966feaf5e60604a1e05733955",
    "coffee.png": "cc02f8ca188b167c775a7101b5d767d1e71792cf762c33d6fa15a4599b5a8de7",
    "coins.png": "f8d773fc9cfa6f4d8e5942dc34d0a0788fcaed2a4fefbbed0aef5398d7ef4cba",
    "color.png": "7d2df993de2b4fa2a78e04e5df8050f49a9c511aa75e59ab3bd56ac9c98aef7e",
    "flower.jpg": "a77f6ec41e353afdf8bdff2ea981b2955535d8d83294f8cfa49cf4e423dd5638",
    "grace_hopper.jpg": "a8ca6d734765703b09728ab47fe59f473d93ae3967fc24c7c0288c3c7adb7130",
    "grass.png": "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89",
    "gravel.png": "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12",
    "hubble_deep_field.jpg": "3a19c5dd8a927a9334bb1229a6d63711b1c0c767fb27e2286e7c84a3e2c2f5f4",
    "ihc.png": "f8dd1aa387ddd1f49d8ad13b50921b237df8e9b262606d258770687b0ef93cef",
    "logo.png": "f2c57fe8af089f08b5ba523d95573c26e62904ac5967f4c8851b27d033690168",
    "moon.png": "78739619d11f7eb9c165bb5d2efd4772cee557812ec847532dbb1d92ef71f577",
    "motorcycle_left.png": "db18e9c4157617403c3537a6ba355dfeafe9a7eabb6b9b94cb33f6525dd49179",
    "page.png": "341a6f0a61557662b02734a9b6e56ec33a915b2c41886b97509dedf2a43b47a3",
    "retina.jpg": "38a07f36f27f095e818aea7b96d34202c05176d30253c66733f2e00379e9e0e6",
    "rocket.jpg": "c2dd0de7c538df8d111e479619b129464d0269d0ae5fd18ca91d33a7fdfea95c",
    "text.png": "bd84aa3a6e3c9887850d45d606c96b2e59433fbef50338570b63c319e668e6d1",
}


def gather(out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with tempfile.TemporaryDirectory() as tmp:
        for req, folder in WHEELS.items():
            done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                                   "--only-binary=:all:", "-d", tmp, req],
                                  capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"pip download {req} failed:\n{done.stderr[-3000:]}")
            name = req.split("==")[0].replace("-", "_")
            wheel = next(Path(tmp).glob(f"{name}-*.whl"))
            with zipfile.ZipFile(wheel) as zf:
                for member in zf.namelist():
                    base = member.rsplit("/", 1)[-1]
                    if member.startswith(folder) and base in STILLS:
                        data = zf.read(member)
                        digest = hashlib.sha256(data).hexdigest()
                        if digest != STILLS[base]:
                            raise SystemExit(f"{req}: {base} has sha256 {digest}, "
                                             f"expected {STILLS[base]}")
                        (out / base).write_bytes(data)
                        written.append(out / base)
    missing = sorted(set(STILLS) - {p.name for p in written})
    if missing:
        raise SystemExit(f"not found in the wheels: {missing}")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    args = parser.parse_args()
    paths = gather(args.out)
    print(f"{len(paths)} images in {args.out}")


if __name__ == "__main__":
    main()
