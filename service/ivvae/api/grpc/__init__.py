"""The gRPC transport (``ivvae.v1``): ``server.start_grpc_server``; the protocol is
``ivvae.proto`` and its generated modules are in ``gen/``. Importing this package imports
nothing else (clients use ``gen`` without the server side)."""
