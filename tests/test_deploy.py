"""The deployment files: every command they run is a valid ``diffuserve`` command line, every setting they
set is one the code reads, and the shutdown budgets nest (worker grace < pod/container grace).

No Docker daemon or cluster runs in CI, so this checks the files' content, not a live deployment."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"


def k8s_docs() -> list[dict]:
    docs = []
    for f in sorted(K8S.glob("*.yaml")):
        if f.name == "kustomization.yaml":
            continue
        docs += [d for d in yaml.safe_load_all(f.read_text()) if d]
    return docs


def known_env_vars() -> set[str]:
    """DIFFUSERVE_* names the code reads: Settings fields, plus the worker/serve flags' env defaults."""
    from server.settings import ENV_PREFIX, Settings

    names = {ENV_PREFIX + f.upper() for f in Settings.model_fields}
    for src in ("workers/main.py", "workers/supervisor.py"):
        names |= set(re.findall(r'"(DIFFUSERVE_[A-Z_]+)"', (ROOT / src).read_text()))
    return names


def parses(argv: list[str]) -> None:
    from workers.cli import build_parser

    build_parser().parse_args(argv)  # SystemExit on an unknown flag or role


def test_compose_commands_and_settings_are_real():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"redis", "api", "worker"} <= set(services)
    assert "--appendonly" in services["redis"]["command"]  # queued jobs survive a Redis restart
    known = known_env_vars()
    for name in ("api", "worker", "worker-gpu"):
        svc = services[name]
        parses(svc["command"])
        for var in svc["environment"]:
            assert var in known, f"{name} sets {var}, which nothing reads"
    grace = float(services["worker"]["environment"]["DIFFUSERVE_GRACE_S"])
    assert grace < int(services["worker"]["stop_grace_period"].rstrip("s"))
    for name in ("worker", "worker-gpu"):  # compiled graphs survive a container restart
        mounts = dict(v.split(":")[::-1] for v in services[name]["volumes"])
        assert mounts.get(inductor_cache_volume()) in compose["volumes"], name


def inductor_cache_volume() -> str:
    """The mount point holding the image's TORCHINDUCTOR_CACHE_DIR (not /tmp, which a new container loses)."""
    cache = re.search(r"TORCHINDUCTOR_CACHE_DIR=(\S+)", (ROOT / "Dockerfile").read_text()).group(1)
    assert cache.startswith("/cache/")
    return "/cache"


def test_dockerfile_default_command_is_real():
    text = (ROOT / "Dockerfile").read_text()
    entry = yaml.safe_load(re.search(r"^ENTRYPOINT (.+)$", text, re.M).group(1))
    cmd = yaml.safe_load(re.search(r"^CMD (.+)$", text, re.M).group(1))
    assert entry == ["diffuserve"]
    parses(cmd)
    assert "HF_HUB_OFFLINE=1" in text  # no weight downloads at run time
    assert re.search(r"^USER (?!root)", text, re.M)


def test_kubernetes_manifests():
    docs = k8s_docs()
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert ("StatefulSet", "diffuserve-redis") in kinds and ("Deployment", "diffuserve-api") in kinds
    config = next(d for d in docs if d["kind"] == "ConfigMap")["data"]
    known = known_env_vars()
    assert set(config) <= known
    for d in docs:
        if d["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = d["spec"]["template"]["spec"]
        for c in pod["containers"]:
            if c["image"] == "diffuserve":
                parses(c["args"])
                for e in c.get("env", []):
                    assert e["name"] in known
        if d["metadata"]["name"] == "diffuserve-worker":
            assert float(config["DIFFUSERVE_GRACE_S"]) < pod["terminationGracePeriodSeconds"]
            assert pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
            mounts = {m["mountPath"]: m["name"] for m in pod["containers"][0]["volumeMounts"]}
            assert mounts[inductor_cache_volume()] in {v["name"] for v in pod["volumes"]}
        if d["metadata"]["name"] == "diffuserve-api":
            probe = pod["containers"][0]["readinessProbe"]["httpGet"]["path"]
            assert probe == "/readyz"


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_kustomization_renders():
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert len([d for d in yaml.safe_load_all(out.stdout) if d]) == len(k8s_docs())
