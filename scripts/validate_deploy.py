#!/usr/bin/env python3
"""Validate the deployment files offline: Dockerfiles, docker-compose.yml and k8s/.

    python scripts/validate_deploy.py                   # every check
    python scripts/validate_deploy.py --check k8s       # one (repeatable)

The checks (hadolint, shellcheck, compose, k8s, drift) are the package scripts/deploy_checks/;
its docstring says what each one checks.
"""

import sys

from deploy_checks.cli import main

if __name__ == "__main__":
    sys.exit(main())
