"""The Kubernetes deployment in k8s/, checked offline: every kustomization renders with
``kubectl kustomize``; every RayJob and RayCluster validates against KubeRay's v1 CRD schemas (strictly,
see :func:`strict`) and every core object and pod template against Kubernetes' own schemas; every RayJob
passes the rules KubeRay's operator adds to the schema, retries a preempted run (``backoffLimit``) and, when
queued, what Kueue admits (the example Kueue quota holds the GPU RayJob); the pods follow the rules platform
teams set; the RayJob entrypoint is the README's ``ray job submit`` command;
the cluster has room for the job it runs; the Dockerfile installs what pyproject.toml declares. Two tests run the
head's preStop hook, taken from the rendered RayJob: against a live (dev-mode) training run, and against
stand-in Ray drivers it must wait for."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from orchestrator.config import load_config

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
STORAGE = "/mnt/ganforge"
AUTH_SECRET = "ganforge-ray-auth"
KUBERNETES = "1.32.0"
MIN_GRACE_SECONDS = 120
FAST_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
KUSTOMIZATIONS = sorted(
    p.parent.relative_to(K8S).as_posix() for p in K8S.rglob("kustomization.yaml") if "components" not in p.parts
)
VARIANTS = ["", "overlays/cpu-dev/", "overlays/gpu/"]


@lru_cache(maxsize=None)
def _render(directory: str) -> str:
    """``kubectl kustomize k8s/DIRECTORY`` as text (rendered once per directory)."""
    if shutil.which("kubectl") is None:
        pytest.fail("kubectl is not on PATH: tests/test_k8s.py renders k8s/ with `kubectl kustomize` (kubectl >= 1.27)")
    p = subprocess.run(["kubectl", "kustomize", str(K8S / directory)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"kubectl kustomize k8s/{directory} failed:\n{p.stderr}"
    return p.stdout


def render(directory: str) -> list[dict]:
    """The objects ``kubectl kustomize k8s/DIRECTORY`` prints (a fresh copy each call)."""
    return [d for d in yaml.safe_load_all(_render(directory)) if d]


def only(objs: list[dict], kind: str) -> dict:
    """The one object of this kind."""
    [obj] = [o for o in objs if o["kind"] == kind]
    return obj


def strict(schema):
    """An OpenAPI v3 structural schema as a JSON schema that rejects unknown fields.

    The API server prunes fields a structural schema does not declare, silently: a misspelt
    ``terminationGracePeriodSecond`` would vanish and the pod would get the default. A platform team
    wants that to be an error, so every object schema that lists its properties and says nothing about
    others gets ``additionalProperties: false`` (unless it is ``x-kubernetes-preserve-unknown-fields``).
    The other ``x-kubernetes-*`` keys (list types, CEL rules) have no JSON-schema meaning and are dropped.
    """
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-"):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {name: strict(s) for name, s in value.items()}
        elif key in ("items", "additionalProperties", "not", "allOf", "anyOf", "oneOf"):
            out[key] = strict(value)
        else:
            out[key] = value
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not schema.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def crd_validator(kind: str) -> jsonschema.Validator:
    """KubeRay's v1 schema for RayJob or RayCluster (k8s/crds/), strict, for ``ray.io/v1`` objects only.

    The CRD leaves a RayJob's entrypoint optional (interactive mode has none); the RayJobs here must
    run one, so the schema requires it."""
    crd = yaml.load((K8S / "crds" / f"ray.io_{kind.lower()}s.yaml").read_text(), Loader=FAST_LOADER)
    assert crd["spec"]["names"]["kind"] == kind
    [v1] = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = strict(v1["schema"]["openAPIV3Schema"])
    schema["required"] = ["apiVersion", "kind", "metadata", "spec"]
    schema["properties"]["apiVersion"]["enum"] = ["ray.io/v1"]
    schema["properties"]["kind"]["enum"] = [kind]
    if kind == "RayJob":
        schema["properties"]["spec"]["required"] = ["entrypoint", "rayClusterSpec"]
    return jsonschema.Draft7Validator(schema)


def crd_errors(obj: dict) -> list[str]:
    """Where and why a RayJob or RayCluster fails the strict CRD schema (empty: valid)."""
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in crd_validator(obj["kind"]).iter_errors(obj)]


SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def kuberay_spec_errors(rayjob: dict) -> list[str]:
    """The rules KubeRay's operator applies to a RayJob spec that the CRD schema cannot express (no CEL rule
    covers them; ``ValidateRayJobSpec`` in ray-operator/controllers/ray/utils/validation.go refuses such a
    RayJob when it reconciles it), plus ganforge's own: fields a submission mode would ignore are errors."""
    spec, errors = rayjob["spec"], []
    mode = spec.get("submissionMode", "K8sJobMode")
    suspend, shutdown = spec.get("suspend", False), spec.get("shutdownAfterJobFinishes", False)
    selector, backoff = bool(spec.get("clusterSelector")), spec.get("backoffLimit", 0)
    if mode not in SUBMISSION_MODES:
        errors.append(f"submissionMode {mode!r} is not one of {SUBMISSION_MODES}")
    if suspend and not shutdown:
        errors.append("a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended")
    if not shutdown and spec.get("ttlSecondsAfterFinished", 0) > 0:
        errors.append("a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished")
    if suspend and selector:
        errors.append("the ClusterSelector mode doesn't support the suspend operation")
    if selector and backoff > 0:
        errors.append("BackoffLimit is incompatible with ClusterSelector mode")
    if mode == "InteractiveMode" and backoff > 0:
        errors.append("BackoffLimit is incompatible with InteractiveMode")
    if mode == "SidecarMode":
        errors += [f"SidecarMode doesn't support {f}" for f in ("submitterPodTemplate", "submitterConfig") if f in spec]
    if spec.get("activeDeadlineSeconds", 1) <= 0 or backoff < 0:
        errors.append("activeDeadlineSeconds must be positive and backoffLimit not negative")
    if mode != "K8sJobMode":  # ganforge: only K8sJobMode runs a submitter pod; the fields would be ignored
        errors += [f"{f} is ignored in {mode}" for f in ("submitterPodTemplate", "submitterConfig") if f in spec]
    return errors


def kueue_errors(rayjob: dict) -> list[str]:
    """What keeps Kueue from admitting a RayJob (its RayJob integration's limitations): it must be queued
    (label), created suspended, delete its cluster when done, and bring its own cluster, not autoscaled."""
    spec, errors = rayjob["spec"], []
    if not rayjob["metadata"].get("labels", {}).get(KUEUE_QUEUE_LABEL):
        errors.append(f"no {KUEUE_QUEUE_LABEL} label")
    if spec.get("suspend") is not True:
        errors.append("not created suspended")
    if spec.get("shutdownAfterJobFinishes") is not True:
        errors.append("shutdownAfterJobFinishes is not true")
    if "clusterSelector" in spec or "rayClusterSpec" not in spec:
        errors.append("runs on an existing cluster (clusterSelector)")
    elif spec["rayClusterSpec"].get("enableInTreeAutoscaling"):
        errors.append("autoscaling")
    return errors


def cluster_spec(obj: dict) -> dict:
    """The RayCluster spec of a RayCluster, or the one a RayJob creates."""
    return obj["spec"]["rayClusterSpec"] if obj["kind"] == "RayJob" else obj["spec"]


def pod_templates(obj: dict) -> dict[str, dict]:
    """Every pod template of an object by role: head, each worker group, the RayJob's submitter, a Job's pod."""
    if obj["kind"] == "Job":
        return {"job": obj["spec"]["template"]}
    if obj["kind"] not in ("RayJob", "RayCluster"):
        return {}
    spec = cluster_spec(obj)
    pods = {"head": spec["headGroupSpec"]["template"]}
    pods.update({g["groupName"]: g["template"] for g in spec.get("workerGroupSpecs", [])})
    if obj["kind"] == "RayJob":
        pods["submitter"] = obj["spec"]["submitterPodTemplate"]
    return pods


def containers(pod: dict) -> list[dict]:
    """A pod template's init containers and containers."""
    return pod["spec"].get("initContainers", []) + pod["spec"]["containers"]


def env(container: dict) -> dict[str, dict]:
    """A container's environment variables by name."""
    return {e["name"]: e for e in container.get("env", [])}


def constraint_pins() -> dict[str, str]:
    """constraints.txt as {package: version}."""
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if "==" in line and not line.startswith("#"))


def readme_command() -> str:
    """The README's ``ray job submit`` command (the block after the ``<!-- ray-job-submit`` marker)."""
    return fenced_command(ROOT / "README.md", "<!-- ray-job-submit")


def fenced_command(path: Path, marker: str) -> str:
    """The first ``bash`` code block after MARKER in a Markdown file, as one line."""
    block = path.read_text().split(marker)[1].split("```bash\n")[1].split("```")[0]
    return " ".join(line.rstrip("\\").strip() for line in block.strip().splitlines())


def pod_entrypoint() -> list[str]:
    """The README's command after ``--`` with ``$PWD`` replaced by the storage root the pods mount."""
    tokens = shlex.split(readme_command())
    return [t.replace("$PWD", STORAGE) for t in tokens[tokens.index("--") + 1 :]]


def appended_overrides(entrypoint: str) -> list[str]:
    """The ``--set`` values a manifest appends to the README's entrypoint (fails on anything else)."""
    tokens, base = shlex.split(entrypoint), pod_entrypoint()
    assert tokens[: len(base)] == base, f"entrypoint is not the README's command:\n{entrypoint}\n{shlex.join(base)}"
    extra = tokens[len(base) :]
    assert extra[::2] == ["--set"] * (len(extra) // 2) and len(extra) % 2 == 0, f"only --set may be appended: {extra}"
    return extra[1::2]


def job_config(rayjob: dict):
    """The config the RayJob trains, loaded and validated as ``python -m launch.ray_job`` would."""
    tokens = shlex.split(rayjob["spec"]["entrypoint"])
    sets = [tokens[i + 1] for i, t in enumerate(tokens) if t == "--set"]
    return load_config(ROOT / tokens[3], sets)


def quantity(value) -> float:
    """A Kubernetes CPU or count quantity (``"500m"``, ``"2"``, ``1``) as a number."""
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def memory(value) -> float:
    """A Kubernetes memory quantity (``"16Gi"``, ``"500Mi"``, ``"1G"``, bytes) in bytes."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(value))
    return float(m.group(1)) * units.get(m.group(2), 1)


def requested(obj: dict) -> dict[str, float]:
    """What every pod of a RayJob asks for together (head, each worker replica, the submitter): the quota a
    queue must have to admit it. CPU in cores, memory in bytes, GPUs as a count."""
    spec, total = cluster_spec(obj), {"cpu": 0.0, "memory": 0.0, "nvidia.com/gpu": 0.0}
    pods = [(1, spec["headGroupSpec"]["template"])]
    pods += [(g["replicas"] * g.get("numOfHosts", 1), g["template"]) for g in spec.get("workerGroupSpecs", [])]
    pods += [(1, obj["spec"]["submitterPodTemplate"])] if obj["kind"] == "RayJob" else []
    for count, pod in pods:
        for c in containers(pod):
            req = c["resources"]["requests"]
            total["cpu"] += count * quantity(req["cpu"])
            total["memory"] += count * memory(req["memory"])
            total["nvidia.com/gpu"] += count * quantity(req.get("nvidia.com/gpu", 0))
    return total


def ray_nodes(obj: dict) -> list[dict]:
    """Each Ray node the cluster starts, as the logical resources Ray gives it (CPU, GPU, custom)."""
    spec, nodes = cluster_spec(obj), []
    groups = [("head", 1, spec["headGroupSpec"])] + [
        (g["groupName"], g["replicas"] * g.get("numOfHosts", 1), g) for g in spec.get("workerGroupSpecs", [])
    ]
    for name, count, group in groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        params = group.get("rayStartParams", {})
        node = {
            "CPU": quantity(params.get("num-cpus", limits["cpu"])),
            "GPU": quantity(params.get("num-gpus", limits.get("nvidia.com/gpu", 0))),
        }
        node.update(json.loads(json.loads(params["resources"])) if "resources" in params else {})
        nodes += [{"group": name, **node} for _ in range(count)]
    return nodes


def place(nodes: list[dict], demand: dict) -> str | None:
    """First fit, as a demand of Ray logical resources; returns the group of the node it went to."""
    for node in nodes:
        if all(node.get(k, 0) >= v for k, v in demand.items()):
            for k, v in demand.items():
                node[k] -= v
            return node["group"]
    return None


def dockerfile() -> list[tuple[str, str]]:
    """k8s/Dockerfile as (INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = re.sub(
        r"\\\n",
        " ",
        "\n".join(line for line in (K8S / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")),
    )
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in text.splitlines() if line.strip()]


def dockerfile_args() -> dict[str, str]:
    """The Dockerfile's ARG defaults."""
    return dict(a.split("=", 1) for i, a in dockerfile() if i == "ARG" and "=" in a)


# --------------------------------------------------------------------------------------------------


def test_the_expected_deployments_exist():
    """Storage, data job, RayJob and RayCluster as bases and in the cpu-dev and gpu overlays."""
    assert {f"{v}{k}" for v in VARIANTS for k in ("storage", "data-job", "rayjob", "raycluster")} <= set(KUSTOMIZATIONS)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_only_the_storage_kustomizations_hold_the_volume(directory):
    """`kubectl delete -k` of a job or cluster must never delete the data and checkpoints."""
    claims = [o["metadata"]["name"] for o in render(directory) if o["kind"] == "PersistentVolumeClaim"]
    assert claims == (["ganforge-storage"] if directory.endswith("storage") else [])


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_kustomization_renders_valid_objects(directory):
    """Renders offline; Ray objects pass the strict KubeRay schemas, core objects and pod templates the
    strict Kubernetes schemas; no Secret, ConfigMap or namespace is baked in."""
    objs = render(directory)
    assert objs and all(o.get("apiVersion") and o.get("kind") and o["metadata"].get("name") for o in objs)
    assert not [o for o in objs if o["kind"] in ("Secret", "ConfigMap")], (
        "secrets are created with kubectl, not committed"
    )
    assert not [o for o in objs if "namespace" in o["metadata"]], "the namespace is chosen at apply time (-n)"
    for obj in objs:
        if obj["apiVersion"] == "ray.io/v1":
            assert not crd_errors(obj), crd_errors(obj)
        else:
            kubernetes_validate.validate(obj, KUBERNETES, strict=True)
        for role, pod in pod_templates(obj).items():
            template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": role}, "template": pod}
            kubernetes_validate.validate(template, KUBERNETES, strict=True)


def test_validation_rejects_unknown_fields_and_a_missing_entrypoint():
    """Manifests broken on purpose fail validation, with a message that names the problem."""
    rayjob = only(render("overlays/cpu-dev/rayjob"), "RayJob")
    raycluster = only(render("overlays/cpu-dev/raycluster"), "RayCluster")
    assert not crd_errors(rayjob) and not crd_errors(raycluster)

    for obj, mutate, expected in [
        (rayjob, lambda o: o["spec"].pop("entrypoint"), "'entrypoint' is a required property"),
        (rayjob, lambda o: o["spec"].update(entrypoints="python -m launch.ray_job"), "'entrypoints' was unexpected"),
        (
            rayjob,
            lambda o: cluster_spec(o)["headGroupSpec"]["template"]["spec"].update(terminationGracePeriodSecond=300),
            "'terminationGracePeriodSecond' was unexpected",
        ),
        (raycluster, lambda o: o["spec"]["workerGroupSpecs"][0].update(replica=3), "'replica' was unexpected"),
        (raycluster, lambda o: o["spec"]["workerGroupSpecs"][0].pop("groupName"), "'groupName' is a required property"),
        (raycluster, lambda o: o["spec"]["authOptions"].update(mode="password"), "'password' is not one of"),
        (raycluster, lambda o: o.update(apiVersion="ray.io/v1alpha1"), "'ray.io/v1alpha1' is not one of"),
    ]:
        broken = copy.deepcopy(obj)
        mutate(broken)
        errors = crd_errors(broken)
        assert any(expected in e for e in errors), (expected, errors)

    pvc = only(render("overlays/cpu-dev/storage"), "PersistentVolumeClaim")
    pvc["spec"]["accesModes"] = ["ReadWriteOnce"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pvc, KUBERNETES, strict=True)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_pods_follow_the_platform_rules(directory):
    """Requests and limits, non-root without privilege escalation or capabilities, the pods' UID is the
    image's; Ray and data pods get a memory-backed /dev/shm and the storage volume at /mnt/ganforge; Ray
    pods get time to finish a checkpoint when evicted. The submitter only talks to the job API."""
    image_user = dict(dockerfile())["USER"].split(":")[0]
    pods = {f"{o['kind']}/{role}": pod for o in render(directory) for role, pod in pod_templates(o).items()}
    assert pods or directory.endswith("storage")
    for where, pod in pods.items():
        spec = pod["spec"]
        assert spec["securityContext"]["runAsNonRoot"] is True, where
        assert str(spec["securityContext"]["runAsUser"]) == image_user, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        for c in containers(pod):
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][bound]), (where, c["name"], bound)
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"]["drop"] == ["ALL"], (where, c["name"])
            assert not sc.get("privileged") and "add" not in sc["capabilities"], (where, c["name"])
        if where.endswith("/submitter"):
            continue
        volumes = {v["name"]: v for v in spec["volumes"]}
        for c in spec["containers"]:
            mounts = {m["mountPath"]: volumes[m["name"]] for m in c["volumeMounts"]}
            assert mounts["/dev/shm"]["emptyDir"]["medium"] == "Memory", where
            assert mounts[STORAGE]["persistentVolumeClaim"]["claimName"] == "ganforge-storage", where
        if not where.startswith("Job/"):
            assert spec["terminationGracePeriodSeconds"] >= MIN_GRACE_SECONDS, where
            assert all(c["workingDir"] == dict(dockerfile())["WORKDIR"] for c in spec["containers"]), where


@pytest.mark.parametrize("variant", VARIANTS)
def test_head_prestop_hook_and_grace_periods_are_consistent(variant):
    """Text and numbers only (the hook itself runs in the next test): the RayJob head's preStop hook writes the
    STOP file of the entrypoint's run directory and waits for it to go; the grace periods leave room for the
    loop's own (faults.grace_s), and ``ray job stop`` waits as long (RAY_JOB_STOP_WAIT_TIME_S)."""
    from launch.ray_job import PREEMPTED_FILE
    from orchestrator.faults import STOP_FILE

    rayjob = only(render(f"{variant}rayjob"), "RayJob")
    tokens = shlex.split(rayjob["spec"]["entrypoint"])
    run_dir = tokens[tokens.index("--run-dir") + 1]
    stop_file = f"{run_dir}/{STOP_FILE}"
    head = cluster_spec(rayjob)["headGroupSpec"]["template"]["spec"]
    hook = " ".join(head["containers"][0]["lifecycle"]["preStop"]["exec"]["command"])
    assert f"touch {stop_file};" in hook and f"while [ -e {stop_file} ]" in hook
    # a preemption, marked before the stop is asked for (the driver then exits 75 and the RayJob retries)
    assert 0 <= hook.find(f"echo preempted > {run_dir}/{PREEMPTED_FILE};") < hook.index(f"touch {stop_file};")
    wait = int(re.search(r"timeout (\d+)", hook).group(1))
    grace = job_config(rayjob).faults.grace_s
    assert grace < wait < head["terminationGracePeriodSeconds"]
    for obj in (rayjob, only(render(f"{variant}raycluster"), "RayCluster")):
        stop_wait = env(cluster_spec(obj)["headGroupSpec"]["template"]["spec"]["containers"][0])[
            "RAY_JOB_STOP_WAIT_TIME_S"
        ]
        assert grace < int(stop_wait["value"]) <= head["terminationGracePeriodSeconds"]
    assert (
        head["containers"][0]["lifecycle"]
        == only(render("rayjob"), "RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"][
            "containers"
        ][0]["lifecycle"]
    )  # the next test runs the base one


def _kill_tree(pid: int) -> None:
    """SIGKILL the process groups of ``pid`` and of all its descendants (found through /proc)."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    tree, frontier = [pid], [pid]
    while frontier:
        frontier = [child for child, parent in parents.items() if parent in frontier]
        tree += frontier
    for p in tree:
        try:
            os.killpg(os.getpgid(p), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_prestop_hook_waits_for_the_driver_of_its_run_to_exit(tmp_path):
    """The RayJob head's preStop command, run as the kubelet would with the entrypoint's run directory mapped to a
    temporary one, against stand-in drivers (processes whose command line is the entrypoint's): it marks the
    preemption (RUN_DIR/PREEMPTED, read by the driver), asks for the stop, and once the STOP file is served still
    waits for the driver of its run directory to exit (with 75 the job has failed, so KubeRay retries it, before
    Ray goes down with the pod); a driver of another run directory does not hold it."""
    from launch.ray_job import PREEMPTED_FILE
    from orchestrator.faults import STOP_FILE

    rayjob = only(render("rayjob"), "RayJob")
    tokens = shlex.split(rayjob["spec"]["entrypoint"])
    k8s_run_dir = tokens[tokens.index("--run-dir") + 1]
    head = cluster_spec(rayjob)["headGroupSpec"]["template"]["spec"]
    run = tmp_path / "run"
    run.mkdir()
    hook = [
        part.replace(k8s_run_dir, str(run)) for part in head["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    ]

    def driver(run_dir: str, seconds: float) -> subprocess.Popen:  # python -c SLEEP -m launch.ray_job ... --run-dir
        argv = [t.replace(k8s_run_dir, run_dir) for t in tokens[1:]]
        return subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})", *argv])

    other, mine, hooked = driver(f"{run}-other", 60), driver(str(run), 5), None
    try:
        hooked = subprocess.Popen(
            hook, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        deadline = time.monotonic() + 10
        while not (run / STOP_FILE).exists():
            assert time.monotonic() < deadline and hooked.poll() is None, "the hook wrote no STOP file"
            time.sleep(0.05)
        assert (run / PREEMPTED_FILE).read_text().strip() == "preempted"
        (run / STOP_FILE).unlink()  # served, as rank 0 does after its checkpoint
        time.sleep(1.5)
        assert mine.poll() is None and hooked.poll() is None, "the hook returned while the run's driver still ran"
        out, _ = hooked.communicate(timeout=30)
        assert hooked.returncode == 0, out
        assert mine.poll() is not None and other.poll() is None  # waited for this run's driver only
    finally:
        for proc in (other, mine):
            proc.kill()
            proc.wait()
        if hooked is not None and hooked.poll() is None:
            _kill_tree(hooked.pid)
            hooked.wait()


@pytest.mark.faults
def test_an_evicted_head_stops_the_run_with_a_checkpoint_in_time(digits16, tmp_path):
    """The rendered RayJob's preStop command, run as the kubelet would (``/bin/sh -c ...``) with the entrypoint's
    run directory mapped to a temporary one, against a live training run of the entrypoint's config (a
    ``ganforge train`` subprocess in dev mode on digits shards, evaluation off; not a Ray cluster and not a real
    eviction): the hook returns only once the run has written a new checkpoint and served the STOP file, within
    the hook's own timeout and the pod's grace period, and the run then exits 0 by itself."""
    from orchestrator.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
    from orchestrator.faults import STOP_FILE

    rayjob = only(render("rayjob"), "RayJob")
    tokens = shlex.split(rayjob["spec"]["entrypoint"])
    k8s_run_dir = tokens[tokens.index("--run-dir") + 1]
    head = cluster_spec(rayjob)["headGroupSpec"]["template"]["spec"]
    command = head["containers"][0]["lifecycle"]["preStop"]["exec"]["command"]
    run = tmp_path / "run"
    hook = [part.replace(k8s_run_dir, str(run)) for part in command]
    assert hook != command  # the hook names the entrypoint's run directory
    wait = int(re.search(r"timeout (\d+)", hook[-1]).group(1))

    sets = [tokens[i + 1] for i, t in enumerate(tokens) if t == "--set"]
    sets = [o for o in sets if not o.startswith("data.shards=")]
    sets += [
        f"data.shards={digits16 / 'train-*.tar'}",
        "data.shuffle_buffer=64",
        "eval.enabled=false",
        "tracking.wandb.mode=disabled",
        "tracking.progress_bar=false",
        "tracking.log_every=1",
    ]
    ganforge = Path(sys.executable).parent / "ganforge"
    cmd = [str(ganforge), "train", str(ROOT / tokens[3]), "--run-dir", str(run)]
    cmd += [x for o in sets for x in ("--set", o)]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text():  # training steps
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.2)
        before = set(list_checkpoints(run))
        t0 = time.monotonic()
        hooked = subprocess.Popen(
            hook, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )  # its own process group: ended whole if it hangs
        try:
            hook_out, _ = hooked.communicate(timeout=min(wait, 60))
        except subprocess.TimeoutExpired:
            _kill_tree(hooked.pid)  # `timeout` runs the wait loop in a process group of its own
            hooked.wait()
            raise AssertionError(
                "the preStop hook was still waiting after 60 s: the STOP file was not served"
            ) from None
        took = time.monotonic() - t0
        assert hooked.returncode == 0, hook_out
        assert not (run / STOP_FILE).exists()  # served, not timed out
        new = set(list_checkpoints(run)) - before
        assert new and latest_checkpoint(run) in new, proc.communicate()[0][-3000:]  # written before the hook returned
        grace = job_config(rayjob).faults.grace_s
        assert took < min(wait, grace, head["terminationGracePeriodSeconds"])
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    last = latest_checkpoint(run)
    assert f"{run / STOP_FILE} found: stopping after this step with a checkpoint" in out
    assert "stopped on request" in out and int(last.name.split("-")[1]) > 0
    load_checkpoint(last)  # complete and verified


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_secrets_reach_pods_only_through_secret_refs(directory):
    """No env var whose name says key, token, secret or password has a literal value anywhere in the
    rendered manifests; the W&B key is optional (W&B stays offline without it)."""

    def env_vars(node):
        if isinstance(node, dict):
            if (
                "name" in node
                and ("value" in node or "valueFrom" in node)
                and set(node) <= {"name", "value", "valueFrom"}
            ):
                yield node
            for v in node.values():
                yield from env_vars(v)
        elif isinstance(node, list):
            for v in node:
                yield from env_vars(v)

    objs = render(directory)
    secret_like = [e for e in env_vars(objs) if re.search("KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", e["name"], re.I)]
    for e in secret_like:
        assert "value" not in e and "secretKeyRef" in e["valueFrom"], e
    for obj in objs:
        for role, pod in pod_templates(obj).items():
            if obj["kind"] in ("RayJob", "RayCluster") and role != "submitter":
                for c in pod["spec"]["containers"]:
                    ref = env(c)["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]
                    assert ref == {"name": "ganforge-wandb", "key": "api_key", "optional": True}, (role, ref)


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_ray_job_api_needs_a_token_and_stays_inside_the_cluster(directory):
    """Ray's token authentication (Ray >= 2.52, KubeRay authOptions) is on, with the token from a Secret
    the user creates, in every Ray container and the submitter; the head service is a ClusterIP."""
    ray_objs = [o for o in render(directory) if o["apiVersion"] == "ray.io/v1"]
    assert not [o for o in render(directory) if o["kind"] in ("Service", "Ingress", "Route")]
    for obj in ray_objs:
        spec = cluster_spec(obj)
        assert spec["rayVersion"] == constraint_pins()["ray"]
        assert tuple(map(int, spec["rayVersion"].split(".")[:2])) >= (2, 52)
        assert spec["authOptions"] == {"mode": "token", "secretName": AUTH_SECRET}
        head = spec["headGroupSpec"]
        assert head.get("serviceType", "ClusterIP") == "ClusterIP" and not head.get("enableIngress")
        assert "headService" not in head
        for role, pod in pod_templates(obj).items():
            for c in pod["spec"]["containers"]:
                e = env(c)
                assert e["RAY_AUTH_MODE"]["value"] == "token", (role, c["name"])
                assert e["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": AUTH_SECRET, "key": "auth_token"}
                assert not [p for p in c.get("ports", []) if "hostPort" in p], (role, c["name"])


@pytest.mark.parametrize("directory", [k for k in KUSTOMIZATIONS if k.endswith("rayjob")])
def test_rayjob_runs_the_readme_command_and_cleans_up(directory):
    """The entrypoint is the README's command (plus valid --set overrides in overlays); the cluster goes
    away after the job, the job has a deadline and a retry."""
    rayjob = only(render(directory), "RayJob")
    spec = rayjob["spec"]
    sets = appended_overrides(spec["entrypoint"])
    job_config(rayjob)  # every appended key and value is a valid config override
    if directory == "rayjob":
        assert sets == []
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0
    assert spec["activeDeadlineSeconds"] > 0 and spec["backoffLimit"] >= 1
    assert spec.get("submissionMode", "K8sJobMode") == "K8sJobMode" and "clusterSelector" not in spec


@pytest.mark.parametrize("directory", KUSTOMIZATIONS)
def test_every_rayjob_retries_a_preempted_run_and_passes_the_operators_rules(directory):
    """A preempted run's driver exits 75 (launch/ray_job.py): only a backoffLimit above 0 makes KubeRay run it
    again, on a new cluster; the submitter pod (K8sJobMode) may be evicted too and has its own retries. The
    rules KubeRay's operator applies beyond the CRD schema hold (:func:`kuberay_spec_errors`), and a RayJob
    labelled for Kueue is one Kueue admits (:func:`kueue_errors`)."""
    rayjobs = [o for o in render(directory) if o["kind"] == "RayJob"]
    assert bool(rayjobs) == directory.endswith("rayjob")
    for rayjob in rayjobs:
        spec = rayjob["spec"]
        assert spec["backoffLimit"] >= 2, "a retry or two for preemptions, each on a new Ray cluster"
        assert spec["submitterConfig"]["backoffLimit"] >= 1
        assert kuberay_spec_errors(rayjob) == []
        if KUEUE_QUEUE_LABEL in rayjob["metadata"]["labels"] or spec.get("suspend"):
            assert kueue_errors(rayjob) == []


def test_the_operators_rules_catch_what_the_schema_lets_through():
    """Each rule of :func:`kuberay_spec_errors` and :func:`kueue_errors` fails a RayJob broken on purpose that
    the strict CRD schema still accepts (the API server would take it; the operator or Kueue would not)."""
    queued = only(render("overlays/gpu-kueue/rayjob"), "RayJob")
    plain = only(render("rayjob"), "RayJob")
    assert not kuberay_spec_errors(queued) and not kueue_errors(queued)
    assert kueue_errors(plain) == [f"no {KUEUE_QUEUE_LABEL} label", "not created suspended"]

    selector = {"ray.io/cluster": "ganforge"}
    for obj, mutate, expected in [
        (queued, lambda s: s.update(shutdownAfterJobFinishes=False), "not allowed to be suspended"),
        (queued, lambda s: s.update(clusterSelector=selector), "doesn't support the suspend operation"),
        (plain, lambda s: s.update(clusterSelector=selector), "BackoffLimit is incompatible with ClusterSelector"),
        (plain, lambda s: s.update(submissionMode="InteractiveMode"), "BackoffLimit is incompatible with Interactive"),
        (plain, lambda s: s.update(submissionMode="SidecarMode"), "SidecarMode doesn't support submitterPodTemplate"),
        (plain, lambda s: s.update(submissionMode="HTTPMode"), "submitterPodTemplate is ignored in HTTPMode"),
        (plain, lambda s: s.update(submissionMode="HttpMode"), "submissionMode 'HttpMode' is not one of"),
        (plain, lambda s: s.update(backoffLimit=-1), "backoffLimit not negative"),
        (plain, lambda s: s.update(shutdownAfterJobFinishes=False), "cannot have TTLSecondsAfterFinished"),
    ]:
        broken = copy.deepcopy(obj)
        mutate(broken["spec"])
        assert not crd_errors(broken), crd_errors(broken)  # the schema alone lets it through
        assert any(expected in e for e in kuberay_spec_errors(broken)), (expected, kuberay_spec_errors(broken))

    for mutate, expected in [
        (lambda o: o["metadata"]["labels"].pop(KUEUE_QUEUE_LABEL), "label"),
        (lambda o: o["spec"].pop("suspend"), "not created suspended"),
        (lambda o: o["spec"].update(shutdownAfterJobFinishes=False), "shutdownAfterJobFinishes is not true"),
        (lambda o: o["spec"].update(clusterSelector=selector), "clusterSelector"),
        (lambda o: cluster_spec(o).update(enableInTreeAutoscaling=True), "autoscaling"),
    ]:
        broken = copy.deepcopy(queued)
        mutate(broken)
        assert not crd_errors(broken), crd_errors(broken)
        assert any(expected in e for e in kueue_errors(broken)), (expected, kueue_errors(broken))


def test_kueue_overlay_is_the_gpu_rayjob_queued_and_suspended():
    """k8s/overlays/gpu-kueue/rayjob is the GPU RayJob plus the queue label and ``suspend: true``, nothing else:
    Kueue unsuspends it once admitted (and suspends it again to preempt it)."""
    queued = only(render("overlays/gpu-kueue/rayjob"), "RayJob")
    gpu = only(render("overlays/gpu/rayjob"), "RayJob")
    assert queued["metadata"]["labels"].pop(KUEUE_QUEUE_LABEL) == "ganforge"
    assert queued["spec"].pop("suspend") is True and "suspend" not in gpu["spec"]
    assert queued == gpu
    assert "overlays/gpu-kueue/rayjob" in KUSTOMIZATIONS  # so every other test of this file covers it too


def test_kueue_example_queues_admit_the_gpu_rayjob():
    """k8s/kueue/queues.yaml (Kueue's CRDs are not vendored, so a hand check): one ResourceFlavor, a ClusterQueue
    whose resource group covers CPU, memory and GPUs with that flavor, the LocalQueue the overlay's label names
    pointing at it, and a quota that holds every pod of the GPU RayJob at once (Kueue admits a RayJob whole,
    submitter included, or not at all)."""
    objs = {o["kind"]: o for o in yaml.safe_load_all((K8S / "kueue" / "queues.yaml").read_text()) if o}
    assert set(objs) == {"ResourceFlavor", "ClusterQueue", "LocalQueue"}
    assert {o["apiVersion"] for o in objs.values()} == {"kueue.x-k8s.io/v1beta1"}
    assert all(set(o) <= {"apiVersion", "kind", "metadata", "spec"} and "namespace" not in o["metadata"]
               for o in objs.values())  # fmt: skip
    queued = only(render("overlays/gpu-kueue/rayjob"), "RayJob")
    local, cluster = objs["LocalQueue"], objs["ClusterQueue"]
    assert local["metadata"]["name"] == queued["metadata"]["labels"][KUEUE_QUEUE_LABEL]
    assert local["spec"] == {"clusterQueue": cluster["metadata"]["name"]}
    [group] = cluster["spec"]["resourceGroups"]
    [flavor] = group["flavors"]
    assert flavor["name"] == objs["ResourceFlavor"]["metadata"]["name"]
    quota = {r["name"]: r["nominalQuota"] for r in flavor["resources"]}
    assert set(group["coveredResources"]) == set(quota) == {"cpu", "memory", "nvidia.com/gpu"}
    need = requested(queued)
    assert need["nvidia.com/gpu"] >= 5  # 4 training GPUs and the evaluator's
    for resource, amount in need.items():
        have = memory(quota[resource]) if resource == "memory" else quantity(quota[resource])
        assert amount <= have, f"the GPU RayJob needs {amount} {resource}, the ClusterQueue holds {have}"


def test_readme_and_docs_submit_the_same_command():
    """docs/kubernetes.md's laptop command is the README's with the pods' storage root for $PWD."""
    readme = shlex.split(readme_command())
    assert readme[: readme.index("--")] == [
        "ray",
        "job",
        "submit",
        "--address",
        "http://127.0.0.1:8265",
        "--working-dir",
        ".",
    ]
    docs = shlex.split(fenced_command(ROOT / "docs" / "kubernetes.md", "<!-- k8s-ray-job-submit"))
    assert docs[: docs.index("--")] == readme[: readme.index("--")]
    assert docs[docs.index("--") + 1 :] == pod_entrypoint()


@pytest.mark.parametrize("variant", VARIANTS)
def test_rayjob_and_raycluster_are_the_same_cluster(variant):
    """The RayJob's cluster and the long-lived RayCluster do not drift apart (but for the RayJob head's
    preStop hook, which names the one run directory it stops)."""
    rayjob = only(render(variant + "rayjob"), "RayJob")
    raycluster = only(render(variant + "raycluster"), "RayCluster")
    del rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["lifecycle"]
    assert rayjob["spec"]["rayClusterSpec"] == raycluster["spec"]


@pytest.mark.parametrize("directory", [k for k in KUSTOMIZATIONS if k.endswith("rayjob")])
def test_cluster_has_room_for_the_job(directory):
    """The evaluator actor (started first) and every Ray Train worker fit the cluster's Ray resources;
    with a custom evaluator resource the evaluator lands on its own group and no worker shares it."""
    rayjob = only(render(directory), "RayJob")
    cfg, nodes = job_config(rayjob), ray_nodes(rayjob)
    r = cfg.ray
    evaluator = place(nodes, {"CPU": cfg.eval.cpus, "GPU": cfg.eval.gpus, **cfg.eval.resources})
    assert evaluator is not None, "no room for the evaluator actor"
    worker = {"CPU": r.cpus_per_worker, "GPU": r.gpus_per_worker, **r.resources_per_worker}
    groups = [place(nodes, worker) for _ in range(r.num_workers)]
    assert None not in groups, f"only {groups.index(None)} of {r.num_workers} Ray Train workers fit: {nodes}"
    if cfg.eval.resources:
        assert evaluator not in groups


def test_gpu_overlay_requests_gpus_and_a_separate_evaluator():
    """GPU limits and tolerations on every worker group, an evaluator group that only the evaluator
    actor uses, and as many training GPUs as the job asks for."""
    for obj in render("overlays/gpu/rayjob") + render("overlays/gpu/raycluster"):
        if obj["apiVersion"] != "ray.io/v1":
            continue
        groups = {g["groupName"]: g for g in cluster_spec(obj)["workerGroupSpecs"]}
        assert "nvidia.com/gpu" not in str(cluster_spec(obj)["headGroupSpec"])
        for name, g in groups.items():
            c = g["template"]["spec"]["containers"][0]
            assert quantity(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1, name
            assert c["resources"]["requests"]["nvidia.com/gpu"] == c["resources"]["limits"]["nvidia.com/gpu"], name
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in g["template"]["spec"][
                "tolerations"
            ]
        assert "evaluator" in groups and len(groups) >= 2
        if obj["kind"] == "RayJob":
            cfg = job_config(obj)
            assert cfg.ray.gpus_per_worker > 0 and cfg.eval.gpus > 0 and cfg.eval.resources
            advertised = {g: json.loads(json.loads(groups[g]["rayStartParams"]["resources"])) for g in groups}
            assert [g for g, res in advertised.items() if set(cfg.eval.resources) <= set(res)] == ["evaluator"]
            gpus = lambda g: quantity(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
            trainer_gpus = sum(
                groups[g]["replicas"] * gpus(groups[g])
                for g, res in advertised.items()
                if set(cfg.ray.resources_per_worker) <= set(res)
            )
            assert trainer_gpus == cfg.ray.num_workers * cfg.ray.gpus_per_worker


@pytest.mark.parametrize("directory", [k for k in KUSTOMIZATIONS if not k.startswith("overlays/gpu")])
def test_cpu_deployments_ask_for_no_gpu(directory):
    """The bases and the cpu-dev overlay run without GPUs."""
    text = _render(directory)
    assert "nvidia.com/gpu" not in text
    for obj in render(directory):
        if obj["kind"] == "RayJob":
            assert job_config(obj).ray.gpus_per_worker == 0 and job_config(obj).eval.gpus == 0


def test_dockerfile_installs_what_pyproject_declares():
    """One source of truth: the image installs the project (pyproject.toml's dependencies) under
    constraints.txt, after torch and torchvision at the pins of constraints.txt from a CUDA index."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())

    steps, args, pins = dockerfile(), dockerfile_args(), constraint_pins()
    requirements = {Requirement(r).name: Requirement(r) for r in project["project"]["dependencies"]}
    assert [i for i, _ in steps].count("FROM") == 1 and "cuda" in args["CUDA_IMAGE"]
    for package in ("torch", "torchvision"):
        assert args[f"{package.upper()}_VERSION"] == pins[package]
        assert pins[package] in requirements[package].specifier
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", args["TORCH_INDEX_URL"])
    python = re.fullmatch(r"python(\d+\.\d+)", args["PYTHON"]).group(1)
    assert python + ".0" in SpecifierSet(project["project"]["requires-python"])

    copied = {Path(src).as_posix().rstrip("/") for i, a in steps if i == "COPY" for src in a.split()[:-1]}
    packages = {p.rstrip("*") for p in project["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert {"pyproject.toml", "constraints.txt", project["project"]["readme"], "configs"} | packages <= copied
    installs = [cmd.strip() for i, a in steps if i == "RUN" for cmd in a.split("&&") if "pip install" in cmd]
    assert "pip install -c constraints.txt ." in installs
    [torch_install] = [c for c in installs if c != "pip install -c constraints.txt ."]
    assert shlex.split(torch_install)[2:4] == ["torch==${TORCH_VERSION}", "torchvision==${TORCHVISION_VERSION}"]
    assert installs.index(torch_install) < installs.index("pip install -c constraints.txt .")

    [user] = [a for i, a in steps if i == "USER"]
    assert re.fullmatch(r"[1-9]\d*(:\d+)?", user), "USER must be a numeric non-root UID (runAsNonRoot checks it)"
    assert user.split(":")[0] == args["UID"]
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "data", "runs", "wandb"} <= set(ignored)
