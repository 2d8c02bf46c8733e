"""Preprocessing on encode: what a diffusion-training user asks of a clip before it is encoded.

One definition for every encode path (HTTP query parameters, gRPC ``EncodeOptions``, the
Python clients, ``ivvae encode --options``, ``ivvae encode-dataset``): the same names, parsed
and checked here, written back in one canonical string that goes into cache keys and latent
metadata. Nothing here imports torch or PyAV; ``ivvae.video.reader`` applies the options
while frames stream out of the decoder.

The options (all optional; none given means "the video as it is"):

=================  =========================================================================
``resize``         ``N``: the short side becomes N, the aspect ratio is kept (the long side
                   is rounded to the nearest pixel). ``WxH``: exactly W x H; with
                   ``crop=center`` (the default) the picture is scaled to cover W x H and
                   the middle is cut out, with ``crop=none`` it is stretched.
``crop``           ``center`` (default) or ``none``; only meaningful with an exact size
                   (``resize=WxH`` or ``bucket``).
``bucket``         one or more ``WxHxF`` (repeat the parameter or separate with commas):
                   the bucket closest in aspect ratio (``|log(w/h) - log(W/H)|``) among
                   those whose F frames the clip fills is taken, ties going to the longer
                   and then the larger bucket; the clip is scaled to cover W x H,
                   center-cropped (or stretched with ``crop=none``) and cut to exactly F
                   frames. A clip that fills no bucket is refused (``InvalidInput``).
``start_frame``    the first source frame taken (0-based) ...
``start_s``        ... or the first frame as a time in seconds from the first frame: the
                   frame on screen at that time.
``num_frames``     exactly this many output frames; a clip that has fewer is refused.
                   ``1 + 4N`` counts map to whole latent frames; any count is accepted
                   (the encoder repeats the last frame to the next ``1 + 4N``).
``max_frames``     at most this many output frames: a longer clip is cut, not refused.
``stride``         take every ``stride``-th source frame ...
``fps``            ... or resample to this rate (``24``, ``12.5`` or ``30000/1001``) by
                   timestamp: output frame k is the source frame on screen at
                   ``start + k / fps``, so frames are dropped or repeated as needed.
=================  =========================================================================

Contradictions are refused, naming both options: ``start_frame`` with ``start_s``, ``stride``
with ``fps``, ``bucket`` with ``resize``, ``num_frames`` or ``max_frames``, ``num_frames``
with ``max_frames``, ``crop`` without an exact size.

Sizes and aspect ratios are those of the picture as a player shows it. An anamorphic clip
(a sample aspect ratio other than 1:1: a 720x480 DVD picture of SAR 32:27 is shown 853x480)
is planned from its displayed shape when ``resize`` or ``bucket`` scale it anyway, and comes
out square-pixel at the planned size; without them its stored pixels are kept as they are
(the plan's ``sample_aspect_ratio`` then says how they are to be shown).
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Literal

from ivvae.core import strict
from ivvae.errors import InvalidInput

# The option names, in canonical order. Every transport uses exactly these.
PREPROCESS_KEYS = (
    "resize", "crop", "bucket", "start_frame", "start_s", "num_frames", "max_frames",
    "stride", "fps",
)
# One line each, for command-line help (the table above is the whole story).
OPTION_HELP = {
    "resize": "N: the short side becomes N (aspect kept); WxH: exactly W x H (see --crop)",
    "crop": "with an exact size: center (default, cut the middle out) or none (stretch)",
    "bucket": "WxHxF, repeatable: the bucket closest in aspect ratio whose F frames the "
              "clip fills; scaled to cover, cropped, cut to F frames",
    "start_frame": "the first source frame taken (0-based)",
    "start_s": "or the first frame as a time in seconds",
    "num_frames": "exactly this many frames (a shorter clip is refused)",
    "max_frames": "at most this many frames (a longer clip is cut)",
    "stride": "take every N-th source frame",
    "fps": "or resample to this frame rate by timestamp: 24, 12.5, 30000/1001",
}
CROPS = ("center", "none")
# Sizes beyond these are typos, not requests (the service's own limits apply after).
MAX_SIDE = 16384
MAX_COUNT = 1 << 20
# Training setups use tens of buckets; they all go into each latent file's metadata, which
# a reader caps (64 KiB of safetensors header).
MAX_BUCKETS = 256

# ASCII digits, as many as a count may have (``\d`` takes any script's digits; ``int``
# refuses more than 4,300 of them).
_N = rf"([0-9]{{1,{strict.MAX_DIGITS}}})"
_SIZE = re.compile(rf"^\s*{_N}\s*[xX]\s*{_N}\s*$")
_BUCKET = re.compile(rf"^\s*{_N}\s*[xX]\s*{_N}\s*[xX]\s*{_N}\s*$")


@dataclass(frozen=True, order=True)
class Bucket:
    """A resolution bucket: ``width`` x ``height`` pixels, ``frames`` frames."""

    width: int
    height: int
    frames: int

    def __str__(self) -> str:
        return f"{self.width}x{self.height}x{self.frames}"


@dataclass(frozen=True)
class Resize:
    """``short_side`` (keep the aspect ratio) or an exact ``width`` x ``height``."""

    short_side: int | None = None
    width: int | None = None
    height: int | None = None

    def __str__(self) -> str:
        if self.short_side is not None:
            return str(self.short_side)
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class Geometry:
    """How one source size becomes the output size: scale the (upright) picture to
    ``scaled_width`` x ``scaled_height``, then keep the ``width`` x ``height`` window whose
    top-left corner is (``left``, ``top``)."""

    scaled_width: int
    scaled_height: int
    left: int
    top: int
    width: int
    height: int

    @property
    def crops(self) -> bool:
        return (self.width, self.height) != (self.scaled_width, self.scaled_height)


@dataclass(frozen=True)
class Preprocess:
    """Preprocessing options; see the module docstring. Build with ``parse`` (from
    strings) or directly (then ``validate`` runs in ``__post_init__``)."""

    resize: Resize | None = None
    crop: Literal["center", "none"] | None = None  # None: the default, center
    buckets: tuple[Bucket, ...] = field(default=())
    start_frame: int | None = None
    start_s: Fraction | None = None
    num_frames: int | None = None
    max_frames: int | None = None
    stride: int | None = None
    fps: Fraction | None = None

    def __post_init__(self) -> None:
        # Bucket order decides nothing (ties are broken by size), so one order is kept.
        object.__setattr__(self, "buckets", tuple(sorted(set(self.buckets))))
        self._validate()

    # -- parsing ---------------------------------------------------------------------------

    @classmethod
    def parse(
        cls,
        params: Mapping[str, str] | Iterable[tuple[str, str]],
        *,
        other_keys: Collection[str] = (),
    ) -> Preprocess:
        """Options from string parameters (a query string's items, CLI ``--options``).

        ``params`` is a mapping or (name, value) pairs; ``bucket`` may repeat and may hold
        a comma-separated list. Names in ``other_keys`` belong to the caller and are
        skipped; any other unknown name, a repeated option, a malformed value and a
        contradiction raise ``InvalidInput`` naming the option.
        """
        items = list(params.items()) if isinstance(params, Mapping) else list(params)
        seen: dict[str, str] = {}
        buckets: list[Bucket] = []
        for name, value in items:
            if name in other_keys:
                continue
            if name not in PREPROCESS_KEYS:
                raise InvalidInput(
                    f"unknown option {name!r}; preprocessing options are "
                    f"{', '.join(PREPROCESS_KEYS)}"
                    + (f"; other options here: {', '.join(sorted(other_keys))}"
                       if other_keys else "")
                )
            if name == "bucket":
                parts = [part for part in value.split(",") if part.strip()]
                if not parts:
                    raise InvalidInput(f"option 'bucket' is empty ({value!r}); expected WxHxF")
                if len(buckets) + len(parts) > MAX_BUCKETS:
                    raise InvalidInput(f"option 'bucket' lists more than {MAX_BUCKETS} buckets")
                buckets.extend(_bucket(part) for part in parts)
                continue
            if name in seen:
                raise InvalidInput(f"option {name!r} is given more than once")
            seen[name] = value
        crop = seen.get("crop")
        if crop is not None and crop.strip().lower() not in CROPS:
            raise InvalidInput(f"option 'crop' must be one of {', '.join(CROPS)}, got {crop!r}")
        return cls(
            resize=_resize(seen["resize"]) if "resize" in seen else None,
            crop=None if crop is None else ("center" if crop.strip().lower() == "center"
                                            else "none"),
            buckets=tuple(buckets),
            start_frame=_int("start_frame", seen, minimum=0),
            start_s=_fraction("start_s", seen, positive=False),
            num_frames=_int("num_frames", seen, minimum=1),
            max_frames=_int("max_frames", seen, minimum=1),
            stride=_int("stride", seen, minimum=1),
            fps=_fraction("fps", seen, positive=True),
        )

    @classmethod
    def from_canonical(cls, text: str) -> Preprocess:
        """The inverse of ``canonical`` (``""`` is no preprocessing)."""
        return cls.parse(canonical_pairs(text))

    # -- canonical forms -------------------------------------------------------------------

    @property
    def is_identity(self) -> bool:
        return self == Preprocess()

    def to_params(self) -> dict[str, str]:
        """The options as string parameters (what ``parse`` reads), canonical order."""
        out: dict[str, str] = {}
        if self.resize is not None:
            out["resize"] = str(self.resize)
        if self.crop is not None:
            out["crop"] = self.crop
        if self.buckets:
            out["bucket"] = ",".join(str(b) for b in self.buckets)
        for name in ("start_frame", "num_frames", "max_frames", "stride"):
            value = getattr(self, name)
            if value is not None:
                out[name] = str(value)
        for name in ("start_s", "fps"):
            value = getattr(self, name)
            if value is not None:
                out[name] = _fraction_text(value)
        return {k: out[k] for k in PREPROCESS_KEYS if k in out}

    def canonical(self) -> str:
        """One string per distinct set of options (cache keys, latent metadata):
        ``name=value`` pairs in ``PREPROCESS_KEYS`` order joined by ``;``, ``""`` for none.
        Equal options give equal strings whatever spelling they were parsed from."""
        return canonical_text(self.to_params())

    # -- what the options mean for one clip ------------------------------------------------

    @property
    def exact_size(self) -> bool:
        return bool(self.buckets) or (self.resize is not None and self.resize.short_side is None)

    @property
    def resamples(self) -> bool:
        """Whether the options scale the picture (``resize`` or ``bucket``): then an
        anamorphic clip comes out square-pixel, at a size planned from its displayed shape."""
        return bool(self.buckets) or self.resize is not None

    def choose_bucket(self, width: int, height: int, frames: int | None,
                      sample_aspect_ratio: Fraction = Fraction(1)) -> Bucket | None:
        """The bucket for an upright ``width`` x ``height`` clip (of pixels
        ``sample_aspect_ratio`` wide for 1 high: its displayed aspect ratio decides) with
        ``frames`` frames available after the window and rate options (``None``: unknown,
        every bucket counts as filled; the reader refuses a clip that ends short). ``None``
        without buckets. Raises ``InvalidInput`` when the clip fills no bucket."""
        if not self.buckets:
            return None
        fits = [b for b in self.buckets if frames is None or b.frames <= frames]
        if not fits:
            shortest = min(b.frames for b in self.buckets)
            raise InvalidInput(
                f"the clip has {frames} frames after preprocessing, fewer than the "
                f"shortest bucket's {shortest} (buckets: "
                f"{', '.join(str(b) for b in self.buckets)})"
            )
        aspect = math.log(_shown_width(width, sample_aspect_ratio) / height)

        def rank(b: Bucket) -> tuple[float, int, int]:
            return (round(abs(math.log(b.width / b.height) - aspect), 9), -b.frames,
                    -b.width * b.height)

        return min(fits, key=rank)

    def geometry(self, width: int, height: int, bucket: Bucket | None = None,
                 sample_aspect_ratio: Fraction = Fraction(1)) -> Geometry:
        """How an upright ``width`` x ``height`` picture becomes the output picture.

        ``sample_aspect_ratio``: how wide its pixels are shown (for 1 high). A resize or a
        bucket is planned from the displayed shape (``width * sample_aspect_ratio`` x
        ``height``, exactly) and its output is square-pixel; without them the stored
        ``width`` x ``height`` is kept."""
        if bucket is not None:
            return _exact(_shown_width(width, sample_aspect_ratio), height, bucket.width,
                          bucket.height, self.crop != "none")
        r = self.resize
        if r is None:
            return Geometry(width, height, 0, 0, width, height)
        shown = _shown_width(width, sample_aspect_ratio)
        if r.short_side is not None:
            n = r.short_side
            if shown <= height:
                w, h = n, max(1, round(height * n / shown))
            else:
                w, h = max(1, round(shown * n / height)), n
            return Geometry(w, h, 0, 0, w, h)
        assert r.width is not None and r.height is not None
        return _exact(shown, height, r.width, r.height, self.crop != "none")

    def frame_limit(self, bucket: Bucket | None) -> tuple[int | None, bool]:
        """``(count, exact)``: how many output frames to take at most (``None``: all),
        and whether fewer is an error."""
        if bucket is not None:
            return bucket.frames, True
        if self.num_frames is not None:
            return self.num_frames, True
        return self.max_frames, False

    def available_frames(self, source_frames: int | None, source_fps: float) -> int | None:
        """Output frames a clip of ``source_frames`` frames at ``source_fps`` gives under
        the window and rate options, before any count limit (``None`` if unknown)."""
        if source_frames is None:
            return None
        start = self.start_frame or 0
        if self.start_s is not None:
            start = math.floor(float(self.start_s) * source_fps + 1e-6)
        left = max(0, source_frames - start)
        if self.stride is not None:
            return -(-left // self.stride)
        if self.fps is not None:
            # Output frame k is shown at k / fps; those before the clip's end count (as the
            # frame selector counts them, within timestamp rounding).
            tolerance = time_tolerance(source_fps, self.fps)
            return max(0, math.ceil((left / source_fps - tolerance) * float(self.fps)))
        return left

    # -- checks ----------------------------------------------------------------------------

    def _validate(self) -> None:
        pairs = (
            ("start_frame", "start_s"), ("stride", "fps"), ("bucket", "resize"),
            ("bucket", "num_frames"), ("bucket", "max_frames"), ("num_frames", "max_frames"),
        )
        given = {k for k in PREPROCESS_KEYS if self._given(k)}
        for a, b in pairs:
            if a in given and b in given:
                raise InvalidInput(f"options {a!r} and {b!r} contradict each other: give one")
        if self.crop is not None and self.crop not in CROPS:
            raise InvalidInput(f"option 'crop' must be one of {', '.join(CROPS)}")
        if self.crop is not None and not self.exact_size:
            raise InvalidInput("option 'crop' needs an exact size: resize=WxH or bucket")
        r = self.resize
        if r is not None:
            sides = (r.short_side,) if r.short_side is not None else (r.width, r.height)
            exact = r.width is not None or r.height is not None
            if (r.short_side is not None and exact) or any(
                    s is None or not 1 <= s <= MAX_SIDE for s in sides):
                raise InvalidInput(f"option 'resize' must be N or WxH with sides in "
                                   f"[1, {MAX_SIDE}]")
        if len(self.buckets) > MAX_BUCKETS:
            raise InvalidInput(f"option 'bucket' lists more than {MAX_BUCKETS} buckets")
        for bucket in self.buckets:
            _check_bucket(bucket)
        for name in ("start_frame", "num_frames", "max_frames", "stride"):
            value = getattr(self, name)
            low = 0 if name == "start_frame" else 1
            if value is not None and not low <= value <= MAX_COUNT:
                raise InvalidInput(f"option {name!r} must be in [{low}, {MAX_COUNT}], "
                                   f"got {value}")
        if self.start_s is not None and not 0 <= self.start_s <= 10 * 86400:
            raise InvalidInput("option 'start_s' must be in [0, 864000] seconds")
        if self.fps is not None and not strict.fps_in_range(self.fps):
            raise InvalidInput(f"option 'fps' must be in {strict.FPS_RANGE}, got {self.fps}")

    def _given(self, name: str) -> bool:
        if name == "bucket":
            return bool(self.buckets)
        return getattr(self, name) is not None

    def plan(self, width: int, height: int, frames: int | None, fps: float,
             sample_aspect_ratio: Fraction = Fraction(1), *,
             variable_rate: bool = False) -> Plan:
        """What these options do to one upright ``width`` x ``height`` clip declaring
        ``frames`` frames (``None``: unknown) at ``fps`` (its average rate;
        ``variable_rate``: its frames are not evenly spaced), whose pixels are shown
        ``sample_aspect_ratio`` wide for 1 high (see ``geometry``). Raises ``InvalidInput``
        when the clip fills no bucket or is known to be shorter than ``num_frames``."""
        available = self.available_frames(frames, fps)
        bucket = self.choose_bucket(width, height, available, sample_aspect_ratio)
        limit, exact = self.frame_limit(bucket)
        slack = 0
        if variable_rate and (self.start_s is not None or self.fps is not None):
            # Through the average rate, a time start or a resample of a variable-rate clip
            # is counted only roughly: short by a few frames is not known to be short (a
            # window ``ivvae windows`` counted frame by frame ends there); the reader
            # refuses a clip that does end short.
            slack = max(1, (limit or 0) // 10)
        if (exact and limit is not None and available is not None
                and available + slack < limit):
            raise InvalidInput(f"the clip has {available} frames after preprocessing; "
                               f"num_frames asks for {limit}")
        out_fps = Fraction(fps) if self.fps is None else self.fps
        if self.stride is not None:
            out_fps = Fraction(fps) / self.stride
            if not strict.fps_in_range(out_fps):
                raise InvalidInput(f"option 'stride' {self.stride} makes the {fps:g} fps clip "
                                   f"{float(out_fps):.3g} fps, outside {strict.FPS_RANGE}")
        return Plan(self, self.geometry(width, height, bucket, sample_aspect_ratio), bucket,
                    limit, exact, out_fps.limit_denominator(1_000_000),
                    Fraction(1) if self.resamples else sample_aspect_ratio)


def canonical_text(params: Mapping[str, str]) -> str:
    """Option strings (``to_params``' values) as ``canonical`` writes them: ``name=value``
    in ``PREPROCESS_KEYS`` order, joined by ``;``."""
    return ";".join(f"{k}={params[k]}" for k in PREPROCESS_KEYS if k in params)


def canonical_pairs(text: str) -> list[tuple[str, str]]:
    """``canonical_text``'s ``(name, value)`` pairs, unchecked (``from_canonical`` checks
    them as options)."""
    pairs = []
    for part in text.split(";") if text else []:
        name, sep, value = part.partition("=")
        if not sep:
            raise InvalidInput(f"malformed preprocessing string {text!r}")
        pairs.append((name, value))
    return pairs


# The finest time base a timestamp is read back as a fraction in (1/90000 s is MPEG's).
_TIME_DENOMINATOR = 1_000_000


def time_tolerance(source_fps: float, fps: Fraction | None) -> float:
    """How far before a frame's timestamp an output time still counts as that frame's.

    Timestamps are rounded to the stream's time base, a millisecond in Matroska/WebM: a
    24 fps clip's frame "at 0.042 s" is the one at 1/24 s, and resampling it at its own
    rate must take every frame once. A millisecond, or a quarter of a frame (source or
    output) where that is less."""
    return min(1e-3, 0.25 / source_fps, 0.25 / float(fps) if fps else math.inf)


@dataclass(frozen=True)
class Plan:
    """``Preprocess.plan``: the options as decided for one clip. ``frame_limit`` output
    frames at most (``None``: every frame); fewer is an error when ``exact``. ``fps`` is
    the output rate, ``sample_aspect_ratio`` the output's (1 once resized: only an
    anamorphic clip kept at its stored size has another)."""

    options: Preprocess
    geometry: Geometry
    bucket: Bucket | None
    frame_limit: int | None
    exact: bool
    fps: Fraction
    sample_aspect_ratio: Fraction = Fraction(1)

    @property
    def width(self) -> int:
        return self.geometry.width

    @property
    def height(self) -> int:
        return self.geometry.height

    def selector(self, source_fps: float) -> FrameSelector:
        return FrameSelector(self.options, source_fps)


class FrameSelector:
    """Which source frames become output frames, decided as frames stream in.

    A source frame shown from ``t_i`` to ``t_{i+1}`` (seconds from the first frame; the
    last one until the stream's declared end, else for ``1 / source_fps``) is emitted once
    for every output time that falls in that interval: with ``fps``, the times
    ``start + k / fps`` (so frames are dropped or repeated; ``start`` is ``start_s``, or the
    time of frame ``start_frame``); otherwise the frame on screen at ``start_s`` (or frame
    ``start_frame``) and every ``stride``-th frame after it. The
    interval of a frame is known only when the next one arrives, so ``push`` answers for
    the previous frame.
    """

    def __init__(self, options: Preprocess, source_fps: float) -> None:
        self._o = options
        self._frame_s = 1.0 / source_fps
        self._eps = time_tolerance(source_fps, options.fps)
        self._start = float(options.start_s or 0)
        # With fps: the start as output frames of the clip, exactly (whole and fraction).
        offset = Fraction(options.start_s or 0) * (options.fps or 0)
        self._offset_frames = math.floor(offset)
        self._offset_rest = float(offset - self._offset_frames)
        self._start_index: int | None = options.start_frame or 0
        if options.start_s is not None:
            self._start_index = None  # found by time
        self._prev: float | None = None
        self._index = -1
        self._emitted_targets = 0

    def push(self, time: float) -> int:
        """A source frame at ``time`` arrived: how many times to emit the previous one."""
        copies = 0 if self._prev is None else self._copies(self._prev, time)
        self._prev = time if self._prev is None else max(time, self._prev)
        self._index += 1
        return copies

    def finish(self, end: float | None = None) -> int:
        """The stream ended: how many times to emit the last frame. ``end``: where the
        stream declares it ends (seconds from the first frame), if it does.

        The declared end is what ``Preprocess.available_frames`` counts with (a declared
        frame count over the average rate is the declared duration), so a variable-rate
        clip gives the frames its plan promised: its last frame's own length is not
        ``1 / average rate``. An end before the last frame, or far past it (a header
        that disagrees with the timestamps), is not taken; nor one within rounding of
        ``1 / average rate`` (a stream-copied trim declares its length in milliseconds:
        taken, a 23.976 fps trim resampled at its own rate gained a frame)."""
        if self._prev is None:
            return 0
        last = self._prev + self._frame_s
        if (end is not None and self._prev + self._eps < end <= self._prev + 4 * self._frame_s
                and abs(end - last) > max(2e-3, 0.05 * self._frame_s)):
            last = end
        return self._copies(self._prev, last)

    def _copies(self, begin: float, end: float) -> int:
        o = self._o
        if o.fps is not None:
            if self._start_index:  # start_frame: the targets run from that frame's time
                if self._index < self._start_index:
                    return 0
                # That frame's time as the fraction its timestamp is (a millisecond, a
                # 1/90000 s tick), so that it rounds as start_s at that time does.
                offset = Fraction(begin).limit_denominator(_TIME_DENOMINATOR) * o.fps
                self._offset_frames = math.floor(offset)
                self._offset_rest = float(offset - self._offset_frames)
                self._start_index = None
            # Targets start + k / fps with k >= emitted so far, before ``end``: the clip's
            # own targets k / fps, offset by start * fps. Counted so, a start at one of the
            # clip's output times (a window ``ivvae windows`` cut) rounds exactly as reading
            # the whole clip does: in seconds, a millisecond timestamp that lands on an
            # output time went one way for one and the other way for the other.
            upto = math.ceil((end - self._eps) * float(o.fps) - self._offset_rest
                             ) - self._offset_frames
            copies = max(0, upto - self._emitted_targets)
            self._emitted_targets += copies
            return copies
        i = self._index
        if self._start_index is None:
            if self._start >= end - self._eps:
                return 0
            self._start_index = i
        if i < self._start_index:
            return 0
        return 1 if (i - self._start_index) % (o.stride or 1) == 0 else 0


def _shown_width(width: int, sample_aspect_ratio: Fraction) -> int | Fraction:
    """The displayed width of a picture ``width`` pixels wide, exactly (square pixels: the
    int itself, so their sizes are computed as they always were)."""
    return width if sample_aspect_ratio == 1 else width * sample_aspect_ratio


def _exact(width: int | Fraction, height: int, out_w: int, out_h: int,
           cover: bool) -> Geometry:
    if not cover:
        return Geometry(out_w, out_h, 0, 0, out_w, out_h)
    scale = max(out_w / width, out_h / height)
    # Rounding up keeps the scaled picture at least as large as the window on both sides.
    sw = max(out_w, round(width * scale))
    sh = max(out_h, round(height * scale))
    return Geometry(sw, sh, (sw - out_w) // 2, (sh - out_h) // 2, out_w, out_h)


def _resize(value: str) -> Resize:
    text = value.strip()
    if strict.is_count(text):
        return Resize(short_side=int(text))
    m = _SIZE.match(text)
    if m is None:
        raise InvalidInput(f"option 'resize' must be N (short side) or WxH, got {value!r}")
    return Resize(width=int(m[1]), height=int(m[2]))


def _bucket(value: str) -> Bucket:
    m = _BUCKET.match(value)
    if m is None:
        raise InvalidInput(f"option 'bucket' must be WxHxF (e.g. 480x272x17), got {value!r}")
    made = Bucket(int(m[1]), int(m[2]), int(m[3]))
    _check_bucket(made)
    return made


def _check_bucket(b: Bucket) -> None:
    if not (1 <= b.width <= MAX_SIDE and 1 <= b.height <= MAX_SIDE
            and 1 <= b.frames <= MAX_COUNT):
        raise InvalidInput(f"option 'bucket' {b} is out of range: sides in [1, {MAX_SIDE}], "
                           f"frames in [1, {MAX_COUNT}]")


def _int(name: str, seen: Mapping[str, str], *, minimum: int) -> int | None:
    if name not in seen:
        return None
    text = seen[name].strip()
    if not strict.is_count(text):
        raise InvalidInput(f"option {name!r} must be an integer >= {minimum}, "
                           f"got {seen[name]!r}")
    return int(text)


def _fraction(name: str, seen: Mapping[str, str], *, positive: bool) -> Fraction | None:
    if name not in seen:
        return None
    text = seen[name].strip()
    try:
        value = strict.number(text.removeprefix("-"))  # a sign is checked below, by name
    except ValueError:
        raise InvalidInput(f"option {name!r} must be a number (e.g. 12, 12.5 or "
                           f"30000/1001), got {seen[name]!r}") from None
    if text.startswith("-"):
        value = -value
    if value < 0 or (positive and value == 0):
        raise InvalidInput(f"option {name!r} must be {'> 0' if positive else '>= 0'}, "
                           f"got {seen[name]!r}")
    return value


def _fraction_text(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else (
        f"{value.numerator}/{value.denominator}")
