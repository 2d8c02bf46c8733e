"""The Indexed Job of k8s/examples/encode-dataset-job.yaml agrees with the code: its command
line parses as ``ivvae encode-dataset``, and each pod's shard is its completion index out of
``completions`` (schemas and hardening: scripts/validate_deploy.py --check k8s)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from ivvae.cli import build_parser
from ivvae.dataset.command import _index_shard

JOB = Path(__file__).resolve().parents[2] / "k8s" / "examples" / "encode-dataset-job.yaml"


def test_job_command_parses_and_shards_cover_the_completions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    (job,) = [o for o in yaml.safe_load_all(JOB.read_text()) if o and o["kind"] == "Job"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    (container,) = spec["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container.get("env", [])}
    args = build_parser().parse_args(container["args"])
    assert args.command == "encode-dataset" and args.shard is None
    monkeypatch.setenv("IVVAE_SHARD_COUNT", env["IVVAE_SHARD_COUNT"])
    shards = set()
    for index in range(spec["completions"]):
        monkeypatch.setenv("JOB_COMPLETION_INDEX", str(index))  # what Kubernetes sets
        shards.add(_index_shard(args))
    assert shards == {(i, spec["completions"]) for i in range(spec["completions"])}
