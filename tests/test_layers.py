"""The package's layers point one way (DESIGN.md): an import that points up, or sideways where it should not,
fails here rather than in a review. Every import counts, also the ones inside functions."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "gpt2forge"

# Top to bottom. A unit is a top-level module or package of gpt2forge.
LAYERS = [
    {"commands", "cli", "__main__", "__init__"},
    {"quickstart", "bench"},
    {"train", "eval", "sample"},
    {"optim", "data", "weights", "hf", "runs"},
    {"config"},
    {"models", "tokenizer", "hf_remote"},
    {"files", "device", "progress", "dist"},
    {"errors"},
]
SIDEWAYS = {("train", "eval"), ("train", "sample"), ("weights", "hf"), ("weights", "runs"),  # allowed within a layer
            ("eval", "sample"),  # the lm-eval adapter generates through sample.stream
            ("cli", "commands"), ("__main__", "commands")}
ISOLATED = {"models", "hf_remote"}  # import nothing else of the package (hf_remote: shipped with exports)


def layer_of(unit: str) -> int:
    return next(i for i, units in enumerate(LAYERS) if unit in units)


def module_name(path: Path) -> list[str]:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" and len(parts) > 1 else parts


def imported_units(path: Path) -> set[str]:
    """The gpt2forge units ``path`` imports (relative or absolute, at any depth of the file)."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here[:-1]
    units = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "gpt2forge"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
            elif (node.module or "").split(".")[0] == "gpt2forge":
                base = []
            else:
                continue
            relative = node.module and node.level
            target = base + (node.module.split(".") if relative else (node.module or "").split(".")[1:])
            names = [target] if target else [[a.name] for a in node.names]
        else:
            continue
        units.update(n[0] for n in names if n)
    return units


def test_layers_point_one_way():
    back_edges = []
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = module_name(path)[0]
        for target in imported_units(path) - {unit}:
            if unit in ISOLATED:
                back_edges.append(f"{path.relative_to(PACKAGE)} imports {target}: {unit}/ imports nothing else")
            elif layer_of(target) < layer_of(unit) or (
                    layer_of(target) == layer_of(unit) and (unit, target) not in SIDEWAYS):
                back_edges.append(f"{path.relative_to(PACKAGE)} ({unit}) imports {target}")
    assert not back_edges, "imports against the layering (DESIGN.md):\n" + "\n".join(back_edges)


def test_every_unit_has_a_layer():
    units = {module_name(p)[0] for p in PACKAGE.rglob("*.py")}
    assert units <= set().union(*LAYERS), sorted(units - set().union(*LAYERS))


def test_the_rule_catches_a_back_edge(tmp_path, monkeypatch):
    """The checker itself: a model file importing the tokenizer (as model.py once did) is reported."""
    fake = tmp_path / "gpt2forge"
    (fake / "models").mkdir(parents=True)
    (fake / "models" / "bad.py").write_text("from ..tokenizer import EOT_TOKEN\n")
    (fake / "eval").mkdir()
    (fake / "eval" / "bad.py").write_text("def f():\n    from ..train import trainer\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    assert imported_units(fake / "models" / "bad.py") == {"tokenizer"}
    assert imported_units(fake / "eval" / "bad.py") == {"train"}
    try:
        test_layers_point_one_way()
    except AssertionError as e:
        assert "models/bad.py imports tokenizer" in str(e) and "eval/bad.py (eval) imports train" in str(e)
    else:
        raise AssertionError("the back edges were not reported")
