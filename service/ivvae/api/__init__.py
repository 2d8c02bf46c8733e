"""Transports: HTTP (FastAPI) and gRPC. They parse, validate, call the pipeline, map errors."""
