"""File suffixes of the media that folders are searched for (encode-dataset, training data).

Only a convenience for picking files out of a folder: what a file is, and whether it is
accepted, is decided from its content by ``ivvae.video``. No imports: a leaf that
training and dataset listing share without pulling in the video stack.
"""

# Only suffixes of what ivvae.video opens (its demuxer list): MXF and DV files are not
# among them, and a folder's count of files left out names them instead.
MEDIA_SUFFIXES = frozenset({
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".ts", ".mts",
    ".m2ts", ".y4m", ".flv", ".wmv", ".ogv", ".3gp", ".gif", ".png", ".jpg", ".jpeg",
    ".webp", ".bmp", ".tif", ".tiff",
})
