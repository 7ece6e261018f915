"""What a packager and a bug report need: a LICENSE, ``gpt2forge --version``, and every third-party module the
package imports declared in pyproject.toml (else a clean install fails at the first command that needs it)."""

import ast
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import gpt2forge
from gpt2forge.cli import main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_mit():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License") and "gpt2forge authors" in text
    assert tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["license"] == {"text": "MIT"}


def test_version_is_printed_and_is_the_packages(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.startswith(f"gpt2forge {gpt2forge.__version__} (Python ")
    result = subprocess.run([sys.executable, "-m", "gpt2forge.cli", "-V"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("gpt2forge ")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" in project["project"]["dynamic"]  # one source of the version: the package's
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "gpt2forge.__version__"}


def imported_modules() -> dict[str, str]:
    """Top-level third-party modules imported anywhere in the package (inside functions too): module → a file."""
    found = {}
    for path in sorted((ROOT / "src" / "gpt2forge").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "gpt2forge":
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_every_imported_dependency_is_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"].values()
    requirements = [*project["dependencies"], *(r for extra in extras for r in extra)]
    declared = {normalized(re.match(r"[A-Za-z0-9_.-]+", r).group(0)) for r in requirements}
    distributions = metadata.packages_distributions()
    modules = imported_modules()
    assert {"torch", "numpy", "tiktoken"} <= set(modules)  # the scan sees imports
    missing = {module: where for module, where in modules.items()
               if not {normalized(d) for d in distributions.get(module, [module])} & declared}
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
