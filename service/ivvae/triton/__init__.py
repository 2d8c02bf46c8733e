"""Running a real Triton Inference Server without Docker (the binary from the PyPI wheel)."""
