"""BUILD against the tree: every source file, launcher and test is in a target, every glob matches,
and every first-party import of a target's sources is in the target or its dependencies.

Bazel cannot run on the project's machines (BUILD's header says why), so this evaluates BUILD
with Python stand-ins for the rules it uses: BUILD is Starlark, whose syntax here is Python's.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import REPO, first_party_imports


def _glob(patterns: list[str], exclude: list[str] = ()) -> list[str]:
    """Bazel's ``glob`` (files only), which must match something for each pattern."""
    excluded = {str(p.relative_to(REPO)) for pattern in exclude for p in REPO.glob(pattern)}
    files = []
    for pattern in patterns:
        matched = sorted(str(p.relative_to(REPO)) for p in REPO.glob(pattern) if p.is_file())
        assert matched, f"BUILD: glob {pattern!r} matches nothing"
        files += [f for f in matched if f not in excluded]
    return files


def _evaluate_build() -> dict[str, dict]:
    targets: dict[str, dict] = {}

    def rule(kind):
        def define(name, **kwargs):
            assert name not in targets, f"BUILD: target {name!r} defined twice"
            targets[name] = {"kind": kind, **kwargs}
        return define

    namespace = {"load": lambda *args: None, "package": lambda **kwargs: None, "glob": _glob,
                 "exports_files": lambda *args, **kwargs: None,
                 "py_library": rule("py_library"), "py_binary": rule("py_binary"), "py_test": rule("py_test")}
    exec(compile((REPO / "BUILD").read_text(), "BUILD", "exec"), namespace)  # noqa: S102
    return targets


@pytest.fixture(scope="module")
def targets() -> dict[str, dict]:
    return _evaluate_build()


def _tracked_python_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True)
    return [line for line in out.stdout.splitlines() if line and (REPO / line).exists()]


def test_every_python_file_is_in_a_target(targets):
    listed = {src for target in targets.values() for src in target.get("srcs", [])}
    missing = sorted(set(_tracked_python_files()) - listed - {"tests/oracles/" + p.name for p in
                                                              (REPO / "tests" / "oracles").glob("*.py")})
    assert not missing, f"not in any BUILD target: {missing}"
    stale = sorted(src for src in listed if not (REPO / src).exists())
    assert not stale, f"BUILD lists files that do not exist: {stale}"


def test_every_launcher_and_test_has_its_target(targets):
    binaries = {t["main"] for t in targets.values() if t["kind"] == "py_binary"}
    launchers = {str(p.relative_to(REPO)) for p in (REPO / "experiments").glob("*.py")
                 if p.name not in ("__init__.py", "cli.py", "step_profile.py")}  # shared modules, not launchers
    assert launchers <= binaries, f"launchers without a py_binary: {sorted(launchers - binaries)}"
    tests = {t["srcs"][0] for t in targets.values() if t["kind"] == "py_test"}
    expected = {str(p.relative_to(REPO)) for p in (REPO / "tests").rglob("test_*.py")}
    assert tests == expected
    for target in targets.values():
        if target["kind"] == "py_test":  # the runner gets the test module: pytest, not the module's (absent) main
            assert target["main"] == "tests/bazel_pytest.py" and target["args"] == [f"$(location {target['srcs'][0]})"]


def _imports(path: str) -> set[str]:
    """First-party files ``path`` imports (function-level and ``TYPE_CHECKING`` imports included)."""
    return {imported.file for imported in first_party_imports(path)}


def test_first_party_imports_follow_the_dependencies(targets):
    def closure(name, seen=None):
        seen = set() if seen is None else seen
        if name not in seen:
            seen.add(name)
            for dep in targets[name].get("deps", []):
                if dep.startswith(":"):
                    closure(dep[1:], seen)
        return seen

    owner = {src: name for name, t in targets.items() for src in t.get("srcs", []) if t["kind"] == "py_library"}
    problems = []
    for name, target in targets.items():
        reachable = {src for dep in closure(name) for src in targets[dep].get("srcs", [])}
        for src in target.get("srcs", []):
            for imported in _imports(src) - reachable:
                problems.append(f"{name}: {src} imports {imported} ({owner.get(imported, 'in no library')})")
    assert not problems, "\n".join(sorted(set(problems)))


def test_source_tree_imports_without_installation(tmp_path):
    """What Bazel's runfiles (or PYTHONPATH=.) give: kernels/ is qlora_jax.kernels, experiments/ is
    qlora_jax.experiments, with no installed package (the editable install's finder removed)."""
    code = (
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f).lower()]\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import qlora_jax.kernels, qlora_jax.experiments.cli, qlora_jax.quant\n"
        "print(qlora_jax.kernels.__file__, qlora_jax.experiments.cli.__file__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.split() == [str(REPO / "kernels" / "__init__.py"), str(REPO / "experiments" / "cli.py")]
