"""Every package tunesmith needs at run time is declared in pyproject.toml, and pinned in constraints.txt.

A fresh machine once failed `make demo`: transformers needs accelerate to read GGUF, and only a test
extra (peft) had brought it into the environment the tests ran in. These checks read the sources and
the metadata, so they fail in the test environment too, where the extras hide such a gap at run time
(`make smoke` proves the runtime-only environment by running it).
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "tunesmith"

# Imports that are legitimately optional: (file under tunesmith/, top-level module) -> the extra that
# installs it. Such an import must sit in that file only, inside a function that explains what to install.
OPTIONAL_IMPORTS = {
    ("tunesmith/methods/peft_bridge.py", "peft"): "peft",  # method.name=peft only
    ("tunesmith/evaluate/harness.py", "lm_eval"): "harness",  # tunesmith eval --harness only
    ("tunesmith/train/trackers.py", "mlflow"): "mlflow",  # train.report_to=[mlflow] only
    ("tunesmith/train/trackers.py", "wandb"): "wandb",  # train.report_to=[wandb] only
}

# Runtime needs of the libraries tunesmith calls, which the import scan cannot see: package -> why it is
# needed. (tunesmith now imports accelerate itself too, in models/streaming.py and models/gguf_convert.py, but
# transformers would need it even if those imports went.)
INDIRECT_RUNTIME = {
    "accelerate": "transformers loads a GGUF file (the built-in model ships as one) only with accelerate",
    "tensorboard": "torch.utils.tensorboard (train/trackers.py, train.report_to's default) writes with tensorboard",
}

# Left out of constraints.txt on purpose: the Makefile's TORCH picks the torch build (CPU or CUDA).
NOT_PINNED = {"torch"}


def normalize(name: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def declared_dependencies(project: dict) -> set[str]:
    return {requirement_name(r) for r in project["project"]["dependencies"]}


def declared_extras(project: dict) -> dict[str, set[str]]:
    return {extra: {requirement_name(r) for r in reqs}
            for extra, reqs in project["project"].get("optional-dependencies", {}).items()}


def imported_modules(package: Path = PACKAGE) -> dict[tuple[str, str], int]:
    """(file relative to the repository, top-level module) -> first line, for every absolute `import` and
    `from` statement in the package, at module level or inside functions, classes and conditionals."""
    found: dict[tuple[str, str], int] = {}
    for path in sorted(package.rglob("*.py")):
        rel = path.relative_to(package.parent).as_posix()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                key = (rel, name.split(".")[0])
                found[key] = min(found.get(key, node.lineno), node.lineno)
    return found


def third_party(imports: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    return {key: line for key, line in imports.items()
            if key[1] not in sys.stdlib_module_names and key[1] != "tunesmith"}


def undeclared_imports(imports: dict[tuple[str, str], int], declared: set[str], extras: dict[str, set[str]],
                       optional: dict[tuple[str, str], str], module_dists: dict[str, list[str]]) -> list[str]:
    """One line per import that a runtime-only install could not satisfy."""
    problems = []
    for (path, module), line in sorted(third_party(imports).items()):
        dists = {normalize(d) for d in module_dists.get(module, [])} or {normalize(module)}
        extra = optional.get((path, module))
        if extra is not None:
            if extra not in extras:
                problems.append(f"{path}:{line}: import {module} is listed as optional in extra {extra!r}, "
                                "which pyproject.toml does not define")
            elif not dists & extras[extra]:
                problems.append(f"{path}:{line}: import {module} is listed as optional in extra {extra!r}, "
                                f"which does not contain {' or '.join(sorted(dists))}")
        elif not dists & declared:
            where = [e for e, pkgs in sorted(extras.items()) if dists & pkgs]
            problems.append(f"{path}:{line}: import {module} needs {' or '.join(sorted(dists))}, which is not "
                            "in [project.dependencies]" + (f" (only in the extras {', '.join(where)})" if where else "")
                            + "; declare it, or, if the import is optional, list it in OPTIONAL_IMPORTS")
    return problems


def undeclared_indirect(declared: set[str], indirect: dict[str, str] = INDIRECT_RUNTIME) -> list[str]:
    return [f"{name} is not in [project.dependencies]: {why}"
            for name, why in sorted(indirect.items()) if normalize(name) not in declared]


def constraint_pins(text: str) -> dict[str, str]:
    """name -> version of every `name==version` line; other non-comment lines map to ''."""
    pins = {}
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        pins[normalize(name.strip())] = version.strip() if sep and re.fullmatch(r"[\w.!+]+", version.strip()) else ""
    return pins


def unpinned(required: set[str], pins: dict[str, str], not_pinned: set[str] = NOT_PINNED) -> list[str]:
    return [f"{name} has no exact version (name==version) in constraints.txt"
            for name in sorted(required - {normalize(n) for n in not_pinned}) if not pins.get(name)]


# ------------------------------------------------------------------------------------------------ tests


def test_every_runtime_import_is_a_declared_dependency():
    project = pyproject()
    imports = imported_modules()
    assert any(module == "transformers" for _, module in imports), "the import scan found nothing"
    problems = undeclared_imports(imports, declared_dependencies(project), declared_extras(project),
                                  OPTIONAL_IMPORTS, importlib.metadata.packages_distributions())
    assert not problems, "\n".join(problems)


def test_optional_imports_are_still_there():
    """An OPTIONAL_IMPORTS entry whose import is gone would silently allow the next one."""
    imports = imported_modules()
    assert not [key for key in OPTIONAL_IMPORTS if key not in imports], "stale OPTIONAL_IMPORTS entries"


def test_indirect_runtime_needs_are_declared():
    assert not undeclared_indirect(declared_dependencies(pyproject())), undeclared_indirect(
        declared_dependencies(pyproject()))


def test_constraints_pin_every_dependency_and_test_extra():
    project = pyproject()
    pins = constraint_pins((ROOT / "constraints.txt").read_text(encoding="utf-8"))
    required = declared_dependencies(project) | declared_extras(project)["test"]
    problems = unpinned(required, pins)
    # torch's build (CPU or CUDA) is the Makefile's TORCH; tunesmith itself is installed editable.
    problems += [f"constraints.txt pins {name}, which it must leave out" for name in pins
                 if name in {"torch", "triton", "tunesmith"} or name.startswith("nvidia-")]
    assert not problems, "\n".join(problems)


def test_the_checks_can_fail():
    """Each check reports a gap when one is made: a copy of the declarations, the real files untouched."""
    project = pyproject()
    declared, extras = declared_dependencies(project), declared_extras(project)
    module_dists = importlib.metadata.packages_distributions()
    imports = imported_modules()

    assert undeclared_indirect(declared - {"accelerate"}) == [
        f"accelerate is not in [project.dependencies]: {INDIRECT_RUNTIME['accelerate']}"]

    problems = undeclared_imports(imports, declared - {"bitsandbytes"}, extras, OPTIONAL_IMPORTS, module_dists)
    assert problems and all("bitsandbytes" in p for p in problems)
    assert any("models/quantize.py" in p for p in problems)

    moved = {**extras, "test": extras["test"] | {"bitsandbytes"}}
    problems = undeclared_imports(imports, declared - {"bitsandbytes"}, moved, OPTIONAL_IMPORTS, module_dists)
    assert problems and all("only in the extras" in p for p in problems)

    assert any("peft" in p for p in undeclared_imports(imports, declared, extras, {}, module_dists))
    assert any("does not define" in p for p in undeclared_imports(
        imports, declared, {k: v for k, v in extras.items() if k != "peft"}, OPTIONAL_IMPORTS, module_dists))
    assert any("does not contain" in p for p in undeclared_imports(
        imports, declared, {**extras, "peft": set()}, OPTIONAL_IMPORTS, module_dists))

    pins = constraint_pins("# header\naccelerate==1.16.0\nnumpy>=2\ntorch==2.13.0\n")
    assert unpinned({"accelerate", "numpy", "pyyaml", "torch"}, pins) == [
        "numpy has no exact version (name==version) in constraints.txt",
        "pyyaml has no exact version (name==version) in constraints.txt"]
