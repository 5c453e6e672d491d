"""The image's install step is the README's: a change to one without the other fails here."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _normalise(command: str) -> list[str]:
    """`pip install -e ".[dev]"` -> ['pip', 'install', '-e', '.']: the same install without extras."""
    return [re.sub(r"\[[^\]]*\]$", "", word) for word in shlex.split(command)]


def readme_install() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    commands = [line.strip() for block in blocks for line in block.splitlines()
                if line.strip().startswith("pip install")]
    assert commands, "README.md has no `pip install` command in a bash block"
    return _normalise(commands[0])


def dockerfile_stages() -> dict[str, list[str]]:
    """Instructions (continuations joined) per `FROM ... AS name` stage."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, list[str]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            current = line.split()[-1]
            stages[current] = [line]
        elif current:
            stages[current].append(line)
    return stages


def test_readme_install_is_the_editable_project_install():
    assert readme_install() == ["pip", "install", "-e", "."]


def test_each_image_installs_exactly_as_the_readme_says():
    stages = dockerfile_stages()
    assert {"cpu", "gpu"} <= set(stages)
    for target in ("cpu", "gpu"):
        installs = [ins[len("RUN "):] for ins in stages[target] if ins.startswith("RUN ") and "pip install" in ins]
        assert [_normalise(cmd) for cmd in installs] == [readme_install()], (target, installs)
        copies = " ".join(ins for ins in stages[target] if ins.startswith("COPY "))
        for needed in ("pyproject.toml", "README.md", "cluster", "actors", "service", "serve_app.py"):
            assert needed in copies, (target, needed)  # the editable install needs the sources first
        assert any(ins.startswith("ENV ") and "PYTHONPATH=/app" in ins for ins in stages[target])


def test_bases_cuda_runtime_for_gpu_slim_python_for_cpu_same_python():
    stages = dockerfile_stages()
    cpu_base = stages[stages["cpu"][0].split()[1]][0]
    gpu_base = stages[stages["gpu"][0].split()[1]][0]
    assert re.match(r"FROM python:3\.12-slim", cpu_base), cpu_base
    assert re.match(r"FROM nvidia/cuda:12\.[\d.]+-cudnn-runtime-ubuntu24\.04", gpu_base), gpu_base
    # ubuntu 24.04's python3 is 3.12: a Ray cluster needs one Python minor version on every node
    assert "python3-venv" in " ".join(stages[stages["gpu"][0].split()[1]])
