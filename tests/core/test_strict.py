"""ivvae.strict: what untrusted text may look like."""

from __future__ import annotations

from fractions import Fraction

import pytest

from ivvae.core import strict


@pytest.mark.parametrize(("text", "value"), [("0", 0), ("17", 17), ("0017", 17),
                                             ("9" * 19, int("9" * 19))])
def test_count_accepts_ascii_digits(text: str, value: int) -> None:
    assert strict.count(text) == value


@pytest.mark.parametrize("text", ["", " 17 ", "17 ", "1_7", "+17", "-1", "١٧", "１７", "1e3",
                                  "17.0", "0x11", "9" * 20, "9" * 5000, "1\n"])
def test_count_refuses_everything_else(text: str) -> None:
    with pytest.raises(ValueError, match="ASCII digits"):
        strict.count(text)


def test_count_minimum_and_short_messages() -> None:
    with pytest.raises(ValueError, match="minimum 1"):
        strict.count("0", minimum=1)
    with pytest.raises(ValueError) as info:
        strict.count("x" * 10_000)
    assert len(str(info.value)) < 200


@pytest.mark.parametrize(
    ("text", "rate"),
    [("25", Fraction(25)), ("30000/1001", Fraction(30000, 1001)), ("1000", Fraction(1000)),
     ("1/1001", Fraction(1, 1001))],
)
def test_frame_rate_in_range(text: str, rate: Fraction) -> None:
    assert strict.frame_rate(text) == rate


@pytest.mark.parametrize("text", ["0", "0/1", "1/0", "1001", "2000/1", "1/2000", "-25", "25.0",
                                  "1e3", " 25", "25/", "/25", "٢٥", "nan", "inf", "9" * 40])
def test_frame_rate_refuses_out_of_range_and_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="frame rate"):
        strict.frame_rate(text)


def test_sample_aspect_ratio_round_trip() -> None:
    for sar in (Fraction(32, 27), Fraction(128, 117), Fraction(1, 4), Fraction(4)):
        text = strict.sample_aspect_ratio_text(sar)
        assert strict.sample_aspect_ratio(text) == sar
    assert strict.sample_aspect_ratio_text(Fraction(64, 54)) == "32:27"


@pytest.mark.parametrize("text", ["32/27", "0:1", "1:0", "5:1", "1:5", " 1:1", "1:1 ", "1.5:1",
                                  "-1:1", "٢:١", ":", "1:", "9" * 40 + ":1"])
def test_sample_aspect_ratio_refuses_out_of_range_and_malformed(text: str) -> None:
    with pytest.raises(ValueError, match="sample aspect ratio"):
        strict.sample_aspect_ratio(text)


@pytest.mark.parametrize("name", ["ivvae-base", "a", "IV_VAE.dim64-z16", "x" * 64])
def test_model_name_accepts_the_safe_charset(name: str) -> None:
    assert strict.model_name(name) == name


@pytest.mark.parametrize("name", ["", "x" * 65, "-lead", ".hidden", "a b", "a\r\nX-Evil: 1",
                                  "modèle", "名前", "a/b", "a\x00"])
def test_model_name_refuses_what_headers_and_logs_cannot_carry(name: str) -> None:
    with pytest.raises(ValueError, match="model name") as info:
        strict.model_name(name)
    assert "\r" not in str(info.value) and "\n" not in str(info.value)
