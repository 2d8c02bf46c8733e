"""Dev tooling, apart from the runtime: running Triton without Docker.

* :mod:`.repository`: the one model-repository preparer (torch-free), used by
  ``docker/triton_prepare.py``, ``ivvae triton-serve`` and the local stack.
* :mod:`.triton_launcher`: find the ``tritonserver`` of the ``nvidia-pytriton`` wheel,
  start it on loopback ports, stop it with its stub processes.
* :mod:`.triton_serve`: ``ivvae triton-serve`` (export, prepare, launch).

Nothing in the runtime (pipeline, backends, transports) imports this package.
"""
