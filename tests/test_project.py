"""Project-level checks: README vs CI, one version everywhere, what the algorithm scripts import and expose."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# one file per algorithm (all four must exist: a missing one fails, it is not skipped)
ALGORITHM_SCRIPTS = [REPO / "funcpg" / name
                     for name in ("reinforce.py", "reinforce_baseline.py", "actor_critic.py", "ppo.py")]
ALLOWED_THIRD_PARTY = {"torch", "gymnasium", "numpy", "tyro"}


def readme_test_command() -> str:
    """The command in the second ```bash block of README.md, the one right after "Tests:"."""
    readme = (REPO / "README.md").read_text()
    blocks = [(m.start(), m.group(1)) for m in re.finditer(r"^```bash\n(.*?)^```", readme, re.M | re.S)]
    assert len(blocks) >= 2, "README.md should have a quick-start and a tests ```bash block"
    tests_at = readme.index("Tests:")
    start, body = blocks[1]
    assert start > tests_at and all(s < tests_at for s, _ in blocks[:1]), "the second bash block must follow 'Tests:'"
    lines = [line for line in body.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one command in the tests block, got {lines}"
    return lines[0]


def test_readme_test_command_is_what_ci_runs():
    command = readme_test_command()
    assert "pytest" in command
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert command in ci_lines, f"{command!r} is not a line of .ci/run"


def _string_constant(path: Path, name: str) -> str:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            assert isinstance(node.value, ast.Constant) and isinstance(node.value.value, str), name
            return node.value.value
    pytest.fail(f"{path.name} has no module-level {name} = '...'")


def test_one_version_everywhere():
    try:
        import tomllib  # Python >= 3.11
    except ImportError:  # 3.10: the [project] table's version line
        text = (REPO / "pyproject.toml").read_text()
        version = re.search(r'^\[project\].*?^version\s*=\s*"([^"]+)"', text, re.M | re.S).group(1)
    else:
        with open(REPO / "pyproject.toml", "rb") as f:
            version = tomllib.load(f)["project"]["version"]
    assert _string_constant(REPO / "funcpg" / "__init__.py", "__version__") == version
    for script in ALGORITHM_SCRIPTS:
        assert _string_constant(script, "FUNCPG_VERSION") == version, script.name


def module_level_imports(tree: ast.Module) -> list[tuple[str, int]]:
    """(top-level package, line) of every import executed at import time: everything outside function bodies."""
    found = []

    def visit(node):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, ast.Import):
                found.extend((alias.name.split(".")[0], child.lineno) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                found.append(("." * child.level + (child.module or "").split(".")[0], child.lineno))
            visit(child)

    visit(tree)
    return found


def all_imports(tree: ast.Module) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((alias.name.split(".")[0], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.append(("." * node.level + (node.module or "").split(".")[0], node.lineno))
    return found


@pytest.mark.parametrize("script", ALGORITHM_SCRIPTS, ids=lambda p: p.name)
def test_algorithm_scripts_import_only_stdlib_torch_gymnasium_numpy_tyro(script):
    tree = ast.parse(script.read_text())
    allowed = set(sys.stdlib_module_names) | ALLOWED_THIRD_PARTY
    bad = [(name, line) for name, line in module_level_imports(tree) if name not in allowed]
    assert bad == [], f"{script.name}: module-level imports outside the allowed set: {bad}"
    # not even lazily: the file must run when copied alone, without the funcpg package or relative imports
    own = [(name, line) for name, line in all_imports(tree) if name.startswith(".") or name == "funcpg"]
    assert own == [], f"{script.name} imports the package itself: {own}"
    assert any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body), \
        f"{script.name} has no `if __name__ == \"__main__\":` guard"


IMPORT_PROBE = r"""
import importlib.util, os, sys, time
started = time.time()
import funcpg.{stem} as by_package
spec = importlib.util.spec_from_file_location("copied_{stem}", sys.argv[1])
by_path = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look the module up
spec.loader.exec_module(by_path)
for module in (by_package, by_path):
    missing = [name for name in ("Args", "train", "main") if not callable(getattr(module, name, None))]
    assert not missing, missing
print("IMPORTED", round(time.time() - started, 2))
"""


@pytest.mark.parametrize("script", ALGORITHM_SCRIPTS, ids=lambda p: p.name)
def test_importing_an_algorithm_script_runs_nothing(tmp_path, script):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-c", IMPORT_PROBE.replace("{stem}", script.stem), str(script)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("IMPORTED"), f"importing printed something:\n{r.stdout}"
    assert float(lines[0].split()[1]) < 30, "importing took too long: does it run something?"
    assert list(tmp_path.iterdir()) == [], f"importing wrote files: {list(tmp_path.iterdir())}"


def test_every_algorithm_script_exists_and_names_itself():
    """ALGORITHM (written into config.json and checkpoints) is the file's stem, and pyproject.toml installs a
    console script for each file's main()."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("needs tomllib (Python >= 3.11)")
    missing = [script.name for script in ALGORITHM_SCRIPTS if not script.exists()]
    assert missing == [], f"the algorithm scripts {missing} do not exist"
    for script in ALGORITHM_SCRIPTS:
        assert _string_constant(script, "ALGORITHM") == script.stem, script.name
    with open(REPO / "pyproject.toml", "rb") as f:
        entry_points = set(tomllib.load(f)["project"]["scripts"].values())
    assert {f"funcpg.{script.stem}:main" for script in ALGORITHM_SCRIPTS} <= entry_points, entry_points


def args_field_names(script: Path) -> list[str]:
    tree = ast.parse(script.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    return [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]


# the shared flags (as Args fields; --num-seeds comes with multi-seed training), plus num_steps and the
# experiment plumbing that the scripts share
COMMON_FIELDS = ["env_id", "seed", "num_envs", "num_steps", "total_timesteps", "learning_rate", "gamma", "ent_coef",
                 "max_grad_norm", "hidden_sizes", "compile", "device", "target_return", "eval_every", "eval_episodes",
                 "eval_temperature", "save_every", "resume", "run_dir", "exp_name", "tensorboard", "capture_video",
                 "quiet"]


@pytest.mark.parametrize("script", ALGORITHM_SCRIPTS, ids=lambda p: p.name)
def test_algorithm_scripts_share_the_common_args_and_names(script):
    fields = args_field_names(script)
    missing = [name for name in COMMON_FIELDS if name not in fields]
    assert missing == [], f"{script.name}'s Args lacks the common fields {missing}"
    # the names every script exposes, and the same names for the same things
    defined = {n.name for n in ast.parse(script.read_text()).body
               if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    expected = {"Args", "train", "main", "validate", "make_env", "check_env", "init_params", "mlp", "log_prob_entropy",
                "sample_action", "discounted_scan", "adam_init", "adam_step", "clip_grad_norm", "make_update",
                "evaluate", "load_checkpoint", "save_checkpoint"}
    assert expected <= defined, f"{script.name} lacks {sorted(expected - defined)}"


MARKER = "# TRY NOT TO MODIFY"
ALGORITHM_PART_BUDGET = {"ppo.py": 460}  # lines above the marker (420 for the others): what a researcher reads
PLUMBING_BUDGET = 892  # lines from the marker on: 900 at most, and it only shrinks as features come


def split_at_marker(script: Path) -> tuple[list[str], list[str]]:
    """(the algorithm part, the plumbing part from the marker line on) of a script, as lines."""
    lines = script.read_text().splitlines(keepends=True)
    at = [i for i, line in enumerate(lines) if line.startswith(MARKER)]
    assert len(at) == 1, f"{script.name}: {len(at)} lines start with {MARKER!r}; expected exactly one"
    return lines[:at[0]], lines[at[0]:]


def test_the_plumbing_below_the_marker_is_the_same_in_every_script():
    """Each script is the algorithm on top and, from the '# TRY NOT TO MODIFY' line on, a plumbing appendix that is
    byte-identical in the four files (only the names and constants above the marker differ), so that a diff of two
    scripts shows the algorithmic step only. The algorithm part stays within its line budget."""
    parts = {script.name: split_at_marker(script) for script in ALGORITHM_SCRIPTS}
    reference_name, (_, reference) = next(iter(parts.items()))
    for name, (algorithm, plumbing) in parts.items():
        budget = ALGORITHM_PART_BUDGET.get(name, 420)
        assert len(algorithm) <= budget, f"{name}: {len(algorithm)} lines above the marker; the budget is {budget}"
        assert len(plumbing) <= PLUMBING_BUDGET, f"{name}: {len(plumbing)} lines of plumbing; the budget is " \
                                                 f"{PLUMBING_BUDGET}"
        if plumbing != reference:
            first = next((i for i, (a, b) in enumerate(zip(plumbing, reference)) if a != b),
                         min(len(plumbing), len(reference)))
            pytest.fail(f"the plumbing of {name} differs from {reference_name}'s at its line {first + 1} after the "
                        f"marker: {plumbing[first:first + 1]} vs {reference[first:first + 1]}")
        # the plumbing is below every algorithmic definition: none of the names it defines is defined above it
        above = {n.name for n in ast.parse("".join(algorithm)).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        below = {n.name for n in ast.parse("".join(plumbing)).body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        assert above & below == set(), f"{name} defines {sorted(above & below)} on both sides of the marker"


def test_lock_pins_every_package_the_install_pulls_in():
    """Walk the installed requirements of funcpg[test] transitively (markers evaluated on this machine): every package
    it pulls in, direct or not, is pinned in requirements.lock, so an install through the lock is the tested one."""
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    lines = (REPO / "requirements.lock").read_text().splitlines()
    pins = {canonicalize_name(line.partition("==")[0]) for line in lines if line.strip() and not line.startswith("#")}
    seen, todo = set(), [("funcpg", "test")]
    while todo:
        name, extra = todo.pop()
        for requirement in map(Requirement, metadata.distribution(name).requires or []):
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": extra}):
                continue
            for wanted in [""] + sorted(requirement.extras):
                key = (canonicalize_name(requirement.name), wanted)
                if key not in seen:
                    seen.add(key)
                    todo.append((requirement.name, wanted))
    missing = sorted({name for name, _ in seen} - pins)
    assert missing == [], f"requirements.lock does not pin {missing}, which installing funcpg[test] pulls in"


def test_lock_pins_every_declared_dependency_within_its_range():
    """requirements.lock pins (==) every package that pyproject.toml's runtime and test dependencies name, at a
    version inside the declared range, and pyproject's ranges have an upper bound (below an untested major)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("needs tomllib (Python >= 3.11)")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version

    with open(REPO / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version and " " not in line, f"requirements.lock: not a pin: {line!r}"
            pins[canonicalize_name(name)] = Version(version)
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    for requirement in declared:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"requirements.lock does not pin {requirement.name}"
        assert requirement.specifier.contains(pins[name]), f"{name}=={pins[name]} is outside {requirement}"
    for extra, requirements in {"": project["dependencies"], **project["optional-dependencies"]}.items():
        for requirement in map(Requirement, requirements):
            assert any(s.operator == "<" for s in requirement.specifier), \
                f"{requirement} ({extra or 'runtime'}): no upper bound"
