"""Strict parsers for text that arrives from outside: latent metadata, cache entries, settings.

Python's ``int`` and ``Fraction`` accept far more than a file we wrote can contain
(``" 17 "``, ``"1_7"``, Arabic-Indic digits, 5,000-digit numbers, ``"1e3"``), and each such
value is a way to reach a code path with a number nobody planned for. These accept exactly
what the service writes and raise ``ValueError`` naming the problem otherwise.

Stdlib only: every layer may import it.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

# Frame rates the service reads and writes: outside this range a stream's timestamps are
# broken (90000/1) and the MP4 writer cannot represent the rate (its time base denominator
# is at most 1001, so anything below 1/1001 fps would round to 0).
MIN_FPS = Fraction(1, 1001)
MAX_FPS = 1000
_MAX_RATE_DENOMINATOR = 1001
# Sample aspect ratios (a pixel's shown width over its height) the service believes: a
# stream's outside this range has a broken header and is read as square pixels, and a
# latent's must be within it. Real ones are near 1 (DVD 16:9 is 32:27, HDV 4:3).
MIN_SAR = Fraction(1, 4)
MAX_SAR = Fraction(4)
# No count the service handles (frames, pixels, seeds < 2**63) needs more digits.
MAX_DIGITS = 19
# Model names go into response headers, file names and log lines: a conservative charset
# that is safe in all three, and short enough to read.
MODEL_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"
_MODEL_NAME = re.compile(MODEL_NAME_PATTERN)
# API keys travel in an HTTP Authorization header and in gRPC metadata: visible ASCII, inner
# spaces allowed (both carry them), none at either end (the server strips those).
_API_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?")
_DIGITS = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}")
_DECIMAL = re.compile(r"-?[0-9]{1,20}(?:\.[0-9]{1,20})?(?:[eE][-+]?[0-9]{1,3})?")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_NUMBER = re.compile(rf"[0-9]{{1,{MAX_DIGITS}}}(?:\.[0-9]{{1,{MAX_DIGITS}}})?"
                     r"(?:[eE][-+]?[0-9]{1,3})?|"
                     rf"[0-9]{{1,{MAX_DIGITS}}}/[0-9]{{1,{MAX_DIGITS}}}")
_RATE = re.compile(rf"([0-9]{{1,{MAX_DIGITS}}})(?:/([0-9]{{1,{MAX_DIGITS}}}))?")
_SAR = re.compile(rf"([0-9]{{1,{MAX_DIGITS}}}):([0-9]{{1,{MAX_DIGITS}}})")


def shown(text: str) -> str:
    """``text`` fit for an error message: repr'd (no control characters) and cut short."""
    return repr(text) if len(text) <= 40 else repr(text[:40]) + "..."


def is_count(text: str) -> bool:
    """Whether ``text`` is what ``count`` takes. ``str.isdigit`` is not that: it takes
    ``"²"``, which ``int`` refuses, and 5,000 digits, over ``int``'s limit."""
    return isinstance(text, str) and _DIGITS.fullmatch(text) is not None


def count(text: str, *, minimum: int = 0) -> int:
    """A decimal integer of ASCII digits only (no sign, spaces, underscores), >= minimum."""
    if not is_count(text):
        raise ValueError(f"{shown(str(text))} is not a decimal number of at most "
                         f"{MAX_DIGITS} ASCII digits")
    value = int(text)
    if value < minimum:
        raise ValueError(f"{value} is below the minimum {minimum}")
    return value


def number(text: str) -> Fraction:
    """A non-negative number a person types for a rate or a time: ``12``, ``12.5``,
    ``1e-3``, ``30000/1001`` (ASCII digits, an exponent of at most 3 digits). ``Fraction``
    takes ``"1e100000000"`` too, and spends minutes computing it."""
    if not isinstance(text, str) or not _NUMBER.fullmatch(text):
        raise ValueError(f"{shown(str(text))} is not a number such as 12, 12.5 or 30000/1001")
    try:
        return Fraction(text)
    except ZeroDivisionError:
        raise ValueError(f"{shown(text)} has a zero denominator") from None


def fps_in_range(rate: float | Fraction) -> bool:
    """Whether a frame rate is within [``MIN_FPS``, ``MAX_FPS``]: what the MP4 writer can
    represent (see ``FPS_RANGE``)."""
    if isinstance(rate, float) and not math.isfinite(rate):
        return False
    return MIN_FPS <= rate <= MAX_FPS  # exact for a Fraction (float() of 1e400 overflows)


FPS_RANGE = "[1/1001, 1000]"


def frame_rate(text: str) -> Fraction:
    """``"N"`` or ``"N/D"`` in ASCII digits, within [``MIN_FPS``, ``MAX_FPS``]."""
    match = _RATE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"frame rate {shown(str(text))} is not N or N/D in ASCII digits")
    numerator, denominator = int(match[1]), int(match[2] or 1)
    if denominator == 0:
        raise ValueError(f"frame rate {text!r} has a zero denominator")
    rate = Fraction(numerator, denominator)
    if not fps_in_range(rate):
        raise ValueError(f"frame rate {text} is outside {FPS_RANGE} fps")
    return rate


def model_name(text: str) -> str:
    """A model name: 1-64 of ``A-Z a-z 0-9 . _ -``, starting with a letter or digit."""
    if not isinstance(text, str) or not _MODEL_NAME.fullmatch(text):
        raise ValueError(f"model name {shown(str(text))} is not 1-64 characters of "
                         "A-Z a-z 0-9 . _ - starting with a letter or digit")
    return text


def decimal(text: str) -> float:
    """A finite decimal number as ``repr(float)`` writes it (``-0.25``, ``1e-05``)."""
    if not isinstance(text, str) or not _DECIMAL.fullmatch(text):
        raise ValueError(f"{shown(str(text))} is not a decimal number")
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{shown(text)} is out of range")
    return value


def sha256_hex(text: str) -> str:
    """64 lowercase hex digits."""
    if not isinstance(text, str) or not _SHA256.fullmatch(text):
        raise ValueError(f"{shown(str(text))} is not a sha256 (64 lowercase hex digits)")
    return text


def is_api_key(text: str) -> bool:
    """Whether ``text`` can be sent as an API key over HTTP and gRPC alike."""
    return _API_KEY.fullmatch(text) is not None


def sample_aspect_ratio_text(sar: Fraction) -> str:
    """A sample aspect ratio as latent metadata writes it, ``"N:D"`` in lowest terms
    (``"32:27"``), as FFmpeg prints one."""
    return f"{sar.numerator}:{sar.denominator}"


def sample_aspect_ratio(text: str) -> Fraction:
    """``"N:D"`` in ASCII digits (``sample_aspect_ratio_text``), within [``MIN_SAR``,
    ``MAX_SAR``]."""
    match = _SAR.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"sample aspect ratio {shown(str(text))} is not N:D in ASCII digits")
    numerator, denominator = int(match[1]), int(match[2])
    if denominator == 0:
        raise ValueError(f"sample aspect ratio {text!r} has a zero denominator")
    sar = Fraction(numerator, denominator)
    if not MIN_SAR <= sar <= MAX_SAR:
        raise ValueError(f"sample aspect ratio {text} is outside [1:4, 4:1]")
    return sar


def exact_rate(fps: float | Fraction) -> Fraction:
    """The frame rate a float ``fps`` stands for: the closest fraction with a denominator of
    at most 1001. The one rate of a frames tensor: which frames a time selects, the key of
    its cached result, what its latent and its MP4 record.

    29.97 -> 2997/100, 23.976 -> 2997/125, 30000/1001 (as a float or a ``Fraction``) ->
    30000/1001. Raises ``ValueError`` outside (0, ``MAX_FPS``].
    """
    if not math.isfinite(fps) or not 0 < fps <= MAX_FPS:
        raise ValueError(f"fps must be in (0, {MAX_FPS}], got {fps}")
    rate = Fraction(fps).limit_denominator(_MAX_RATE_DENOMINATOR)
    if rate <= 0:
        raise ValueError(f"fps {fps} is too small to encode")
    return rate
