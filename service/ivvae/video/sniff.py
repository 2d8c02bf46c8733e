"""Cheap looks at an upload's first bytes (and an MP4's box headers), used only where
FFmpeg cannot tell us.

Questions FFmpeg leaves open:

* Was it a media file at all? ``avformat_open_input`` fails the same way for random bytes
  and for an MP4 whose ``moov`` box was cut off. A known container signature at the start
  turns "not media" (``UnsupportedMedia``) into "damaged media" (``CorruptMedia``).
* How big is a still image? FFmpeg's image demuxers learn the size only by decoding, and
  ``open_video`` does not let them decode a picture over the pixel limit, so the size of
  an oversized PNG or JPEG is read from its header here.
* Was an MP4, AVI, Matroska, JPEG or GIF file cut short? With an MP4's index (``moov``)
  in front, a cut that lands between two samples of the media data (``mdat``) is a clean
  end of file to FFmpeg's demuxer; an AVI without its trailing index is read chunk by
  chunk until the data stops; a Matroska file ends quietly at any cut. The clip just
  decodes shorter. The declared size of the box, chunk or element the cut went through
  says otherwise. A JPEG's decoder fills a cut scan in grey and a GIF's demuxer ends at
  the last whole frame; their end markers (EOI, the trailer) say otherwise.
* Which way up is a JPEG? FFmpeg reads the EXIF orientation, but PyAV cannot always show
  it (see ``orientation``), so it is read here too.

Nothing here is trusted beyond that: a signature or a header only picks an error class,
and an orientation only turns pictures FFmpeg has decoded.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

# Read this much of an upload for the checks below. A JPEG's frame header can sit behind
# EXIF/ICC segments of up to 64 KiB each, so this is more than a few bytes.
HEAD_BYTES = 1 << 20

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_Y4M_SIGNATURE = b"YUV4MPEG2"
# JPEG start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field: TEM, RST0-7, SOI.
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD9)})
_JPEG_SOS = 0xDA
_EXIF_ORIENTATION = 0x0112
_TIFF_SHORT = 3
# Box types that can open an ISO BMFF / QuickTime file.
_ISOBMFF_FIRST_BOXES = frozenset({b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"})
_MPEGTS_PACKET = 188
# Top-level boxes that carry samples; one cut short means samples are missing.
_ISOBMFF_MEDIA_BOXES = frozenset({b"mdat", b"moof"})
# The walks below stop (unchecked, not refused) past this many top-level boxes, chunks or
# elements, so a file of tiny ones cannot make them slow. A fragmented MP4 has two per
# fragment, a Matroska file one per cluster (seconds of video).
MAX_TOP_LEVEL_BOXES = 100_000
# The size FFmpeg's AVI muxer leaves in a RIFF header it could not go back to (a pipe).
_RIFF_UNKNOWN_SIZE = 0xFFFFFFFF
_EBML_HEADER = 0x1A45DFA3
_EBML_SEGMENT = 0x18538067
_EBML_CLUSTER = 0x1F43B675
# Elements that may sit between two clusters without ending the media data.
_EBML_FILLERS = frozenset({0xEC, 0xBF})  # Void, CRC-32
_EBML_MAX_HEADER = 12  # a 4-byte id and an 8-byte size


def container_signature(head: bytes) -> str | None:
    """Name of the media container whose signature ``head`` starts with, else ``None``."""
    if len(head) >= 8 and head[4:8] in _ISOBMFF_FIRST_BOXES:
        return "mp4"
    if head.startswith(b"RIFF") and len(head) >= 12:
        return {b"AVI ": "avi", b"WAVE": "wav", b"WEBP": "webp"}.get(head[8:12])
    prefixes = (
        (b"\x1a\x45\xdf\xa3", "matroska"),
        (b"GIF87a", "gif"),
        (b"GIF89a", "gif"),
        (_PNG_SIGNATURE, "png"),
        (b"\xff\xd8\xff", "jpeg"),
        (b"OggS", "ogg"),
        (b"FLV\x01", "flv"),
        (b"\x30\x26\xb2\x75\x8e\x66\xcf\x11", "asf"),
        (b"DKIF", "ivf"),
        (_Y4M_SIGNATURE, "y4m"),
        (b"\x00\x00\x01\xba", "mpeg"),
        (b"fLaC", "flac"),
        (b"ID3", "mp3"),
    )
    for prefix, name in prefixes:
        if head.startswith(prefix):
            return name
    if len(head) > 2 * _MPEGTS_PACKET and all(
        head[i] == 0x47 for i in range(0, 3 * _MPEGTS_PACKET, _MPEGTS_PACKET)
    ):
        return "mpegts"
    return None


def cut_isobmff_box(file: BinaryIO, size: int) -> tuple[str, int] | None:
    """The first top-level media box (``mdat``, ``moof``) of an ISO BMFF / QuickTime file
    of ``size`` bytes that declares more bytes than the file has left, as ``(type, its
    declared end offset)``; ``None`` when every box fits or the walk cannot tell (a box of
    size 0 runs to the end by definition; a malformed size is left to FFmpeg). Reads only
    box headers, seeking from one to the next."""
    offset = 0
    for _ in range(MAX_TOP_LEVEL_BOXES):
        if offset + 8 > size:
            return None
        file.seek(offset)
        header = file.read(16)
        box_size, kind = struct.unpack(">I4s", header[:8])
        if box_size == 1:  # a 64-bit size follows the type
            if len(header) < 16:
                return None
            (box_size,) = struct.unpack(">Q", header[8:16])
        if box_size < 8:
            return None
        if offset + box_size > size:
            name = kind.decode("latin-1")
            return (name, offset + box_size) if kind in _ISOBMFF_MEDIA_BOXES else None
        offset += box_size
    return None


_SEARCH_CHUNK = 1 << 20


def cut_jpeg(file: BinaryIO, size: int) -> bool:
    """Whether a JPEG file of ``size`` bytes lacks the end-of-image marker after its first
    scan (or that has no scan): cut inside its data, which FFmpeg's decoder fills in grey.
    What follows the marker is left to FFmpeg. In the scan a 0xFF byte is stuffed
    (``FF 00``) or a restart marker, so ``FF D9`` ends it."""
    file.seek(0)
    head = file.read(HEAD_BYTES)
    scan = _jpeg_scan_start(head)
    if scan is None:  # no scan and no end is a cut; a scan past the head is left to FFmpeg
        return size <= len(head) and b"\xff\xd9" not in head
    file.seek(scan)
    carry = b""
    while chunk := file.read(_SEARCH_CHUNK):
        if b"\xff\xd9" in carry + chunk:
            return False
        carry = chunk[-1:]
    return True


def _jpeg_scan_start(data: bytes) -> int | None:
    """Where the first scan's entropy-coded data starts in ``data``, if it does there."""
    for marker, _, end in _jpeg_segments(data):
        if marker == _JPEG_SOS:
            return end if end <= len(data) else None
    return None


def cut_gif(file: BinaryIO, size: int) -> bool:
    """Whether a GIF file of ``size`` bytes ends before its trailer (``0x3B``): cut after
    one of its frames, or inside one, which FFmpeg reads as a shorter animation. Its blocks
    are walked from the header (extensions and images are runs of sub-blocks of at most 255
    bytes); what follows the trailer is left to FFmpeg, and so is a block no GIF has."""
    ahead = _Ahead(file)
    screen = ahead.take(13)  # signature, version, logical screen descriptor
    if len(screen) < 13:
        return True
    if screen[10] & 0x80 and not ahead.skip(3 << ((screen[10] & 7) + 1)):
        return True
    while kind := ahead.take(1):
        if kind == b"\x3b":
            return False
        if kind == b"\x21":  # an extension: its label, then sub-blocks
            if not ahead.skip(1):
                return True
        elif kind == b"\x2c":  # an image: its descriptor, colour table, LZW code size
            descriptor = ahead.take(9)
            if len(descriptor) < 9:
                return True
            table = 3 << ((descriptor[8] & 7) + 1) if descriptor[8] & 0x80 else 0
            if not ahead.skip(table + 1):
                return True
        else:
            return False
        while (length := ahead.take(1)) and length[0]:
            if not ahead.skip(length[0]):
                return True
        if not length:
            return True
    return True


class _Ahead:
    """Sequential reads through a file, a chunk at a time (a GIF's blocks are small)."""

    def __init__(self, file: BinaryIO) -> None:
        file.seek(0)
        self._file, self._buffer, self._at = file, b"", 0

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes, fewer at the end of the file."""
        while len(self._buffer) - self._at < n:
            more = self._file.read(_SEARCH_CHUNK)
            if not more:
                break
            self._buffer, self._at = self._buffer[self._at:] + more, 0
        out = self._buffer[self._at : self._at + n]
        self._at += len(out)
        return out

    def skip(self, n: int) -> bool:
        """Past the next ``n`` bytes; ``False`` when the file ends first."""
        return len(self.take(n)) == n


def cut_avi_movi(file: BinaryIO, size: int) -> tuple[str, int] | None:
    """Where an AVI file of ``size`` bytes was cut inside its media data, as ``("movi",
    the list's declared end)``; else ``None``.

    Walks the top-level ``RIFF`` chunks (an OpenDML file has one per gigabyte) and each
    one's children. Only the ``LIST movi`` holding the frames counts: a RIFF size that
    runs a few bytes past the end (a sloppy writer), or a cut inside the trailing index
    (``idx1``), loses no frame. A RIFF cut before its ``movi`` list even started is
    ``("RIFF", its declared end)``. ``None`` as well when a size is the placeholder of a
    file written to a pipe, or the walk reaches anything it does not know (FFmpeg's call).
    """
    offset = 0
    for _ in range(MAX_TOP_LEVEL_BOXES):
        if offset + 12 > size:
            file.seek(offset)
            rest = file.read(4)
            # The file ends inside the header of the next RIFF (an OpenDML file's AVIX).
            in_header = len(rest) > 0 and b"RIFF".startswith(rest) and offset > 0
            return ("RIFF", offset + 12) if in_header else None
        file.seek(offset)
        kind, chunk_size, _ = struct.unpack("<4sI4s", file.read(12))
        if kind != b"RIFF" or chunk_size == _RIFF_UNKNOWN_SIZE:
            return None
        end = offset + 8 + chunk_size
        cut = _cut_movi_list(file, offset + 12, end, size)
        if cut is not None:
            return cut
        if end > size:
            return None
        offset = end + (chunk_size & 1)  # chunks are padded to an even length
    return None


def _cut_movi_list(file: BinaryIO, offset: int, riff_end: int, size: int
                   ) -> tuple[str, int] | None:
    """``("movi", its end)`` when the ``LIST movi`` among one RIFF's children (from
    ``offset`` to ``riff_end``) runs past ``size``; ``("RIFF", riff_end)`` when the file
    ends before one started; ``None`` when one fits, or none was there to fit."""
    stop = min(riff_end, size)
    for _ in range(MAX_TOP_LEVEL_BOXES):
        if offset + 12 > stop:
            return ("RIFF", riff_end) if riff_end > size else None
        file.seek(offset)
        kind, chunk_size, form = struct.unpack("<4sI4s", file.read(12))
        if chunk_size == _RIFF_UNKNOWN_SIZE:
            return None
        end = offset + 8 + chunk_size
        if kind == b"LIST" and form == b"movi":
            return ("movi", end) if end > size else None
        offset = end + (chunk_size & 1)
    return None


def cut_matroska_cluster(file: BinaryIO, size: int) -> tuple[str, int] | None:
    """Where a Matroska/WebM file of ``size`` bytes was cut inside its media data, as
    ``("Cluster", its declared end)`` for a cut through a cluster, ``("Segment", its
    declared end)`` for a cut between elements; else ``None``.

    Walks the top-level elements of the first Segment. The cut went through media data when
    the file ends inside a Cluster, or between elements of a Segment that declares more,
    while no other element (Cues, Tags: the trailing index; a Void filler does not count)
    has followed the Clusters yet.
    ``None`` as well when a size is unknown (a live recording, such as a browser's
    MediaRecorder writes) or malformed: the stream's DURATION tag is the check left there.
    """
    header = _ebml_element(file, size)
    if header is None or header[0] != _EBML_HEADER or header[2] is None:
        return None
    segment = _ebml_element(file, size, offset=header[2])
    if segment is None:
        return None
    segment_id, offset, segment_end = segment
    if segment_id != _EBML_SEGMENT or segment_end is None:
        return None
    seen_cluster = after_clusters = False
    for _ in range(MAX_TOP_LEVEL_BOXES):
        if offset >= min(segment_end, size):
            break
        element = _ebml_element(file, size, offset=offset)
        if element is None:
            if size - offset >= _EBML_MAX_HEADER:
                return None  # malformed: FFmpeg's call
            # The cut went through an element's header.
            cut = segment_end > size and not after_clusters
            return ("Segment", segment_end) if cut else None
        element_id, _, end = element
        if end is None:
            return None
        if element_id == _EBML_CLUSTER:
            seen_cluster = True
        elif seen_cluster and element_id not in _EBML_FILLERS:
            after_clusters = True
        if end > size:
            if after_clusters:
                return None
            if element_id == _EBML_CLUSTER:
                return "Cluster", end
            return ("Segment", segment_end) if segment_end > size else None
        offset = end
    else:
        return None
    if segment_end > size and not after_clusters:
        return "Segment", segment_end
    return None


def _ebml_element(file: BinaryIO, size: int, *, offset: int = 0
                  ) -> tuple[int, int, int | None] | None:
    """``(id, data start, data end)`` of the EBML element at ``offset`` (``end`` is
    ``None`` for an unknown size); ``None`` when its header is cut off or malformed."""
    file.seek(offset)
    head = file.read(_EBML_MAX_HEADER)
    id_length = _vint_length(head[0]) if head else 0
    if not id_length or id_length > 4 or len(head) < id_length + 1:
        return None
    element_id = int.from_bytes(head[:id_length], "big")
    size_length = _vint_length(head[id_length])
    if not size_length or len(head) < id_length + size_length:
        return None
    raw = head[id_length : id_length + size_length]
    value = int.from_bytes(raw, "big") & ((1 << (7 * size_length)) - 1)
    start = offset + id_length + size_length
    if value == (1 << (7 * size_length)) - 1:  # all ones: unknown size
        return element_id, start, None
    return element_id, start, start + value


def _vint_length(first: int) -> int:
    """The byte length an EBML variable-length integer declares in its first byte (1-8),
    or 0 when the byte is 0 (invalid)."""
    return 9 - first.bit_length() if first else 0


def image_size(head: bytes) -> tuple[int, int] | None:
    """``(width, height)`` declared by a PNG, JPEG or Y4M header, else ``None``."""
    if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR" and len(head) >= 24:
        width, height = struct.unpack(">II", head[16:24])
        return int(width), int(height)
    if head.startswith(b"\xff\xd8"):
        return _jpeg_size(head)
    if head.startswith(_Y4M_SIGNATURE + b" "):
        return _y4m_size(head)
    return None


def _y4m_size(head: bytes) -> tuple[int, int] | None:
    """The ``W`` and ``H`` parameters of a YUV4MPEG2 stream header (one line of
    space-separated parameters, each a letter and its value)."""
    line, newline, _ = head[len(_Y4M_SIGNATURE):].partition(b"\n")
    if not newline:
        return None
    params = {p[:1]: p[1:] for p in line.split(b" ") if p}
    width, height = params.get(b"W", b""), params.get(b"H", b"")
    if not (width.isdigit() and height.isdigit()):
        return None
    return int(width), int(height)


def jpeg_exif_orientation(head: bytes) -> int | None:
    """The EXIF Orientation tag (1-8) of a JPEG, else ``None``."""
    if not head.startswith(b"\xff\xd8"):
        return None
    for marker, payload, _ in _jpeg_segments(head):
        if marker in _JPEG_SOF:
            break  # EXIF comes before the frame header
        if marker == 0xE1 and payload.startswith(b"Exif\x00\x00"):
            return _tiff_orientation(payload[6:])
    return None


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    for marker, payload, _ in _jpeg_segments(data):
        if marker in _JPEG_SOF and len(payload) >= 5:
            height, width = struct.unpack(">HH", payload[1:5])
            return int(width), int(height)
    return None


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, bytes, int]]:
    """``(marker, payload, where it ends)`` of each JPEG segment up to the end of ``data``
    or the scan."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:  # stray bytes before a marker: skipped, as libjpeg does
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2 : pos + 4])
        yield marker, data[pos + 4 : pos + 2 + length], pos + 2 + length
        if marker == _JPEG_SOS:
            return
        pos += 2 + length


def _tiff_orientation(tiff: bytes) -> int | None:
    """Orientation (tag 0x0112) from the first IFD of a TIFF structure (EXIF's layout)."""
    if len(tiff) < 8 or tiff[:2] not in (b"II", b"MM"):
        return None
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return None
    (entries,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
    for index in range(entries):
        entry = ifd + 2 + 12 * index
        if entry + 12 > len(tiff):
            return None
        tag, kind, _count = struct.unpack(order + "HHI", tiff[entry : entry + 8])
        if tag == _EXIF_ORIENTATION and kind == _TIFF_SHORT:
            (value,) = struct.unpack(order + "H", tiff[entry + 8 : entry + 10])
            return int(value) if 1 <= value <= 8 else None
    return None
