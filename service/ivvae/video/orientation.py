"""Which way up a decoded picture is shown: rotation and mirroring from the metadata.

Phones store pictures as the sensor saw them and say how to show them: MP4 and MKV with a
display matrix (FFmpeg exports it as frame side data), JPEG with the EXIF Orientation tag
(FFmpeg 8 turns it into a display matrix too). ``Orientation`` is the one of the eight
quarter-turn/mirror transforms that makes the picture upright, chosen the way the
``ffmpeg`` command line's autorotation chooses it, so frames come out as players show them.
Rotations by other angles than quarter turns (not seen in practice) round to the nearest.

PyAV 18 cannot list a frame's side data when one of them is of a type it does not know
(FFmpeg 8's EXIF side data, for one), so the display matrix is not always readable. Then a
JPEG's EXIF tag is read from the file itself, and otherwise the rotation PyAV reports is
used on its own (which would show a mirrored picture turned by 180 degrees instead). PNG
frames are never asked for their side data at all (``UNSAFE_SIDE_DATA``): their rotation
comes from ``frame.rotation`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any, cast

import numpy as np
import numpy.typing as npt
from av.sidedata.sidedata import Type as SideDataType
from av.video.frame import VideoFrame


@dataclass(frozen=True)
class Orientation:
    """Turn the picture ``clockwise`` degrees (0, 90, 180, 270), then mirror it left-right.

    Every combination of quarter turns and flips is one of these eight. ``clockwise`` is
    what ``VideoInfo.rotation`` reports.
    """

    clockwise: int = 0
    mirror: bool = False

    def apply(self, image: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """``(H, W, C)`` -> the upright picture (a view: no copy)."""
        turned = np.rot90(image, -self.clockwise // 90)
        return turned[:, ::-1] if self.mirror else turned

    def display_size(self, width: int, height: int) -> tuple[int, int]:
        return (height, width) if self.clockwise % 180 else (width, height)

    def sample_aspect_ratio(self, stored: Fraction) -> Fraction:
        """The upright picture's sample aspect ratio (pixel width over height) for a
        stored picture's: a quarter turn swaps the axes, so the ratio inverts."""
        return 1 / stored if self.clockwise % 180 else stored


# EXIF Orientation (1-8) -> the transform that shows the stored picture upright.
_EXIF = {
    1: Orientation(0),
    2: Orientation(0, mirror=True),
    3: Orientation(180),
    4: Orientation(180, mirror=True),  # top-bottom flip
    5: Orientation(90, mirror=True),  # transpose
    6: Orientation(90),
    7: Orientation(270, mirror=True),  # transverse
    8: Orientation(270),
}


def from_exif(tag: int) -> Orientation:
    return _EXIF.get(tag, Orientation())


def from_display_matrix(matrix: tuple[int, ...], rotation: float) -> Orientation:
    """The transform for an FFmpeg display matrix (9 ints, row-major).

    ``rotation`` is ``av_display_rotation_get`` of it (counter-clockwise degrees); the
    signs of the matrix entries then tell a mirrored picture from a turned one, as in the
    ``ffmpeg`` command line's autorotation.
    """
    a, _, _, c, d = matrix[:5]
    quarter = _clockwise_quarters(rotation)
    if quarter == 1:  # c > 0: a transpose, else a clockwise quarter turn
        return Orientation(90, mirror=c > 0)
    if quarter == 2:  # a < 0 flips left-right, d < 0 top-bottom: both make a half turn
        flip_left_right, flip_top_bottom = a < 0, d < 0
        return Orientation(180 if flip_top_bottom else 0, mirror=flip_left_right != flip_top_bottom)
    if quarter == 3:  # c < 0: a transverse, else a counter-clockwise quarter turn
        return Orientation(270, mirror=c < 0)
    return Orientation(180, mirror=True) if d < 0 else Orientation(0)


def from_rotation(rotation: float) -> Orientation:
    """The transform for a pure rotation, ``rotation`` counter-clockwise degrees."""
    return Orientation(90 * _clockwise_quarters(rotation))


def of_frame(frame: VideoFrame, exif_tag: int | None = None, *, codec: str = "") -> Orientation:
    """How to show ``frame`` upright. ``exif_tag``: the file's EXIF Orientation, if any;
    ``codec``: the decoder's name (frames of ``UNSAFE_SIDE_DATA`` codecs are not asked for
    their display matrix)."""
    matrix = None if codec in UNSAFE_SIDE_DATA else _display_matrix(frame)
    if matrix is not None:
        return from_display_matrix(matrix, frame.rotation)
    if exif_tag is not None:
        return from_exif(exif_tag)
    return from_rotation(frame.rotation)


def _clockwise_quarters(rotation: float) -> int:
    return round(-rotation / 90) % 4


# PyAV 18 bug: listing a frame's side data wraps each entry's metadata (an AVDictionary the
# frame owns) in an object that frees it when collected, and the frame frees it again: a
# double free that kills the whole process at the next garbage collection. The decoders
# whose frames carry side data with metadata (PNG's ICC profile has a "name") are never
# asked; their pictures come with no display matrix anyway (still images use EXIF).
UNSAFE_SIDE_DATA = frozenset({"png", "apng"})


def _display_matrix(frame: VideoFrame) -> tuple[int, ...] | None:
    try:
        side_data = cast(Any, frame.side_data)
    except ValueError:  # a side data type this PyAV does not know
        return None
    entry = side_data.get(SideDataType.DISPLAYMATRIX)
    if entry is None:
        return None
    values = np.frombuffer(bytes(entry), dtype=np.int32)
    return tuple(int(v) for v in values[:9]) if values.size >= 9 else None
