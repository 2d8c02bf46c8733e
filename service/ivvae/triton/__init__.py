"""What runs inside Triton: the gateway <-> model contract (``contract``: model, tensor and
parameter names) and the python model that runs the step engine there (``python_model``).
Launching Triton for development and in the container lives in ``ivvae.devtools``."""
