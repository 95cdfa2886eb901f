"""The two images: hadolint-clean, pinned, multi-stage, non-root, and a build context
(.dockerignore) that holds what the Dockerfiles copy and nothing secret."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from tests.deploy.conftest import settings_from

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILES = {"api": ROOT / "docker/api.Dockerfile", "worker": ROOT / "docker/worker.Dockerfile"}
APP_UID = "10001"  # k8s/base runs the pods as this uid; the images must own /data with it


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.startswith("#"):  # a comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    """Instructions per build stage (the global ARGs before the first FROM are stage 0)."""
    result: list[list[tuple[str, str]]] = [[]]
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        result[-1].append(ins)
    return result


def base_images(path: Path) -> list[str]:
    """FROM images with global ARG defaults substituted; stage names are skipped."""
    args, names, images = {}, set(), []
    for keyword, rest in instructions(path):
        if keyword == "ARG" and "=" in rest and not images:
            key, _, value = rest.partition("=")
            args[key] = value.strip('"')
        if keyword == "FROM":
            parts = [p for p in rest.split() if not p.startswith("--")]
            image = re.sub(r"\$\{?(\w+)\}?", lambda m: args[m.group(1)], parts[0])
            if image not in names:
                images.append(image)
            if len(parts) == 3 and parts[1].upper() == "AS":
                names.add(parts[2])
    return images


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint_passes(name, hadolint):
    proc = subprocess.run(
        [hadolint, "--no-color", "--failure-threshold", "style", str(DOCKERFILES[name])],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_is_live(hadolint, tmp_path):
    """The check above can fail: an unpinned base image is reported."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install requests\n")
    proc = subprocess.run([hadolint, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_by_tag(name):
    images = base_images(DOCKERFILES[name])
    assert images
    for image in images:
        repo, _, tag = image.partition("@")[0].rpartition(":")
        assert repo and tag and tag != "latest", f"{image} is not pinned to a tag"
        assert re.search(r"\d+\.\d+", tag), f"{image}: pin a version, not a moving name"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_multi_stage_non_root_runtime(name):
    build, *_, runtime = stages(DOCKERFILES[name])[1:]
    assert any(k == "COPY" and a.startswith("--from=") for k, a in runtime), "runtime copies from a build stage"
    assert not any(k == "COPY" and "pyproject" in a for k, a in runtime), "sources stay in the build stage"
    users = [a for k, a in runtime if k == "USER"]
    assert users and users[-1].split(":")[0] == APP_UID, f"runtime runs as {users}"
    assert any(k == "RUN" and f"--uid {APP_UID}" in a and "chown" in a for k, a in runtime)


def _cmd(path: Path) -> list[str]:
    return json.loads([a for k, a in instructions(path) if k == "CMD"][-1])


def test_api_image():
    ins = instructions(DOCKERFILES["api"])
    assert _cmd(DOCKERFILES["api"]) == ["felis", "api"]
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    assert args["TORCH_INDEX_URL"].endswith("/whl/cpu"), "the API image gets CPU-only torch"
    health = [a for k, a in ins if k == "HEALTHCHECK"]
    assert health and "/healthz" in health[0]
    assert "FELIS_HOST=0.0.0.0" in " ".join(a for k, a in ins if k == "ENV")


def _image_env(path: Path) -> dict[str, str]:
    """The ENV of the runtime stage (the last one), as `docker run` starts with it."""
    env: dict[str, str] = {}
    for keyword, rest in stages(path)[-1]:
        if keyword == "ENV":
            env |= dict(pair.split("=", 1) for pair in shlex.split(rest))
    return env


def test_the_api_image_serves_the_network_only_with_keys(monkeypatch):
    """`docker run -p 8000:8000 felis-api`: every interface, so API keys (felis refuses otherwise)."""
    from service.config import bind_refusal

    env = _image_env(DOCKERFILES["api"])
    assert env["FELIS_HOST"] == "0.0.0.0" and env["FELIS_API_KEYS_REQUIRED"] == "true"
    settings = settings_from(env, monkeypatch)
    assert settings.api_keys_required is True
    assert bind_refusal(settings, settings.host) is None


def test_worker_image():
    ins = instructions(DOCKERFILES["worker"])
    assert _cmd(DOCKERFILES["worker"]) == ["felis", "worker", "--queues", "gpu", "--concurrency", "1"]
    assert all(image.startswith("nvidia/cuda:") for image in base_images(DOCKERFILES["worker"]))
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    cuda = re.search(r"cuda:(\d+)\.(\d+)", args["CUDA_IMAGE"])
    assert args["TORCH_INDEX_URL"].endswith(f"/whl/cu{cuda[1]}{cuda[2]}"), "torch built for the base's CUDA"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_torch_matches_the_project_pins(name):
    """The image pins must be the ones pyproject.toml pins, or `pip install .` would replace torch."""
    pyproject = ROOT / "pyproject.toml"
    if not pyproject.exists():
        pytest.skip("no pyproject.toml yet")
    pins = dict(re.findall(r'"(torch|torchvision)\s*==\s*([\w.]+)"', pyproject.read_text()))
    if not pins:
        pytest.skip("pyproject.toml does not pin torch")
    args = dict(a.split("=", 1) for k, a in instructions(DOCKERFILES[name]) if k == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == pins["torch"]
    assert args["TORCHVISION_VERSION"] == pins.get("torchvision", args["TORCHVISION_VERSION"])


@pytest.mark.parametrize("name", DOCKERFILES)
def test_installs_the_client_distribution_and_the_s3_extra(name):
    """felis depends on felis-client==0.1.0, which only ./felis_client provides: both go into one
    pip call. The s3 extra (boto3) is in both images, so FELIS_STORAGE_BACKEND=s3 works in either."""
    build = stages(DOCKERFILES[name])[1]
    installs = [a for k, a in build if k == "RUN" and "pip install" in a and "felis_client" in a]
    assert installs, "the build stage pip-installs ./felis_client"
    words = installs[0].split("&&")[0].split()
    assert "./felis_client" in words, installs[0]
    assert any(re.fullmatch(r"""["']?\.?/?\[([\w,]*)\]["']?""", w) and "s3" in w for w in words), \
        f"the project with its s3 extra: {installs[0]}"
    assert any(k == "COPY" and a.split()[0] == "felis_client" for k, a in build)


# --- .dockerignore -------------------------------------------------------------------


def _patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rules: the last matching pattern wins; a pattern that matches a parent
    directory matches everything below it; `**/` also matches no directory."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        candidates = [pat, pat[3:]] if pat.startswith("**/") else [pat]
        if any(fnmatch.fnmatchcase(p, c) for p in prefixes for c in candidates):
            ignored = not negate
    return ignored


@pytest.mark.parametrize(
    "path", [".env", ".git/config", ".venv/bin/python", "var/felis.db", "tests/deploy/conftest.py",
             "k8s/base/kustomization.yaml", "service/__pycache__/config.cpython-312.pyc"],
)
def test_dockerignore_keeps_out(path):
    assert _ignored(path, _patterns())


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerignore_keeps_what_the_dockerfile_copies(name):
    patterns = _patterns()
    for keyword, rest in instructions(DOCKERFILES[name]):
        if keyword != "COPY" or rest.startswith("--from="):
            continue
        *sources, _dest = rest.split()
        for src in sources:
            assert not _ignored(src.rstrip("/"), patterns), f"{src} is excluded by .dockerignore"
            assert not _ignored(f"{src.rstrip('/')}/x.py", patterns) or (ROOT / src).is_file(), src
