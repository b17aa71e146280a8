"""The documentation stays true: README.md and docs/*.md.

1. Every relative link and image (`[text](path)`, `![alt](path)`, `path#anchor`) resolves to a file of the repository,
   and an anchor into a markdown file to one of its headings (GitHub's slugs: lowercase, punctuation dropped except
   '-' and '_', spaces to '-', a repeated heading gets -1, -2, ...).
2. Every command in a code block that runs a funcpg script (`python funcpg/<script>.py ...`, `python -m
   funcpg.<script> ...`) is accepted by that script's own command-line parsing and validation, without training:
   the algorithm scripts' `parse_args(argv=...)` then `validate(args)` (the checks `main` runs before any work:
   flags, env, sizes, run directory); compare.py's `parse_cli` then `plan` (which checks every training run's flags
   with its script's parser and `validate`); benchmark.py's command-line parsing; sb3_reference.py's parser (and
   `validate` in its run mode). One subprocess per script, in a temporary working directory.
   Commands that cannot run here are checked by parsing only: `--resume` of a run directory the docs only name,
   `--device cuda` (no GPU needed to read the docs), and the Stable-Baselines3 ones where the bench extra is not
   installed (the test extra does not pull it in).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
ALGORITHMS = ["reinforce", "reinforce_baseline", "actor_critic", "ppo"]
TOOLS = ["compare", "benchmark", "sb3_reference"]
FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(([^()\s]+)(?:\s+\"[^\"]*\")?\)")


def without_code(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (links there are not links)."""
    text = FENCE.sub("", text)
    return re.sub(r"`[^`\n]*`", "", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercase, punctuation but '-' and '_' dropped, ' ' to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading: its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", path.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        base = slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def test_slug_follows_githubs_rules():
    assert slug("The run directory") == "the-run-directory"
    assert slug("`--compile`: off by default, by measurement") == "--compile-off-by-default-by-measurement"
    assert slug("2026-11-30: the discrete defaults") == "2026-11-30-the-discrete-defaults"
    assert slug("Defaults per env: `--env-id` is enough") == "defaults-per-env---env-id-is-enough"


def relative_links(path: Path) -> list[str]:
    return [t for t in LINK.findall(without_code(path.read_text()))
            if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]  # http:, https:, mailto: are not checked here


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(doc):
    assert doc.exists()
    broken = []
    for target in relative_links(doc):
        file_part, _, anchor = target.partition("#")
        dest = (doc.parent / file_part).resolve() if file_part else doc
        if not dest.exists():
            broken.append(f"{target}: no file {dest}")
        elif REPO not in dest.parents and dest != REPO:
            broken.append(f"{target}: outside the repository")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target}: no heading with anchor #{anchor} in {dest.relative_to(REPO)}")
    assert broken == [], f"{doc.relative_to(REPO)}: broken links:\n" + "\n".join(broken)


def test_the_docs_link_every_page_from_the_readme():
    """No orphan page: README.md links every docs/*.md (directly)."""
    linked = {(REPO / t.partition("#")[0]).resolve() for t in relative_links(REPO / "README.md")}
    orphans = [p.name for p in DOCS[1:] if p.resolve() not in linked]
    assert orphans == [], f"docs pages the README does not link: {orphans}"


# --- commands ---------------------------------------------------------------------------------------------------


def shell_lines(block: str, lang: str) -> list[str]:
    """The command lines of a code block: a bash/sh/shell block's lines, or a plain block's `$ ` lines; `\\`
    continuations joined."""
    lines = block.splitlines()
    prompted = [line[2:] for line in lines if line.startswith("$ ")]
    if lang in ("", "console", "text") and prompted:
        lines = prompted
    elif lang not in ("bash", "sh", "shell"):
        return []
    joined, current = [], ""
    for line in lines:
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
        else:
            joined.append(current + line)
            current = ""
    if current:
        joined.append(current)
    return joined


def script_commands(line: str) -> list[tuple[str, list[str]]]:
    """(script, argv) of every `python funcpg/X.py ...` or `python -m funcpg.X ...` in a shell line (comments
    dropped; `&&`, `||`, `;` and `|` separate commands)."""
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        return []
    commands, current = [], []
    for token in tokens + [";"]:
        if token in ("&&", "||", ";", "|"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(token)
    found = []
    for words in commands:
        if len(words) < 2 or not re.fullmatch(r"python(3(\.\d+)?)?", words[0]):
            continue
        m = re.fullmatch(r"(?:\./)?funcpg/(\w+)\.py", words[1])
        if m:
            found.append((m.group(1), words[2:]))
        elif words[1] == "-m" and len(words) > 2 and words[2].startswith("funcpg."):
            found.append((words[2].split(".", 1)[1], words[3:]))
    return found


def doc_commands() -> list[tuple[str, str, list[str]]]:
    """(where, script, argv) of every script command in a code block of the docs."""
    found = []
    for doc in DOCS:
        for m in FENCE.finditer(doc.read_text()):
            for line in shell_lines(m.group(2), m.group(1)):
                for script, argv in script_commands(line):
                    found.append((f"{doc.relative_to(REPO)}: {line.strip()}", script, argv))
    return found


def test_the_command_finder_reads_shell_lines():
    block = ("python funcpg/ppo.py --env-id X \\\n    --seed 3   # a comment\n"
             "pip install x && python -m funcpg.reinforce -h\n")
    lines = shell_lines(block, "bash")
    assert [c for line in lines for c in script_commands(line)] == [
        ("ppo", ["--env-id", "X", "--seed", "3"]), ("reinforce", ["-h"])]
    assert shell_lines("$ python funcpg/ppo.py --seed 1\ndefaults for ...\n", "") == ["python funcpg/ppo.py --seed 1"]


CHECKER = r"""
import argparse, contextlib, importlib.util, io, json, sys, time
sys.path.insert(0, sys.argv[1])  # funcpg/: the scripts and tools import each other by file, as the tools do
name, commands = sys.argv[2], json.loads(sys.argv[3])
module = __import__(name)
failures = []
SB3 = importlib.util.find_spec("stable_baselines3") is not None  # (the test extra installs it; without: parse only)


class Parsed(Exception):
    pass


def parse_only(argv):
    return "--resume" in argv or any(a == "--device" and b == "cuda" for a, b in zip(argv, argv[1:])) \
        or "--device=cuda" in argv


def check(argv):
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured), contextlib.redirect_stdout(io.StringIO()):
            if name in ("reinforce", "reinforce_baseline", "actor_critic", "ppo"):
                args = module.parse_args(argv=argv)
                if not parse_only(argv):
                    module.validate(args)
            elif name == "compare":
                args = module.parse_cli(argv)
                if not (any(a.startswith("sb3_") for a in args.algos) and not SB3):  # the bench extra: parse only
                    module.plan(args, int(time.time()))
            elif name == "benchmark":
                module.tools_common.parse_cli(module.BenchArgs, "benchmark", argv)
            elif name == "sb3_reference":
                if module.is_run_mode(argv):
                    args = module.parse_args(argv)
                    if SB3:  # the bench extra: parse only without it
                        module.validate(args)
                else:  # report mode: its parser is built in main(); stop right after it has parsed
                    def parsed(self, args=None, namespace=None):
                        raise Parsed(argparse.ArgumentParser.parse_args(self, args, namespace))
                    module._Parser.parse_args = parsed
                    try:
                        module.main(argv)
                    except Parsed:
                        pass
                    else:
                        return "main() returned without parsing its flags"
            else:
                return f"no checker for {name}"
    except SystemExit as e:
        if e.code in (0, None):  # --help
            return None
        errors = [line for line in captured.getvalue().splitlines() if line.strip()]
        return f"exit {e.code}: {errors[-1] if errors else '(nothing on stderr)'}"
    except ValueError as e:
        return f"validate: {e}"
    return None


for where, argv in commands:
    problem = check(argv)
    if problem:
        failures.append(f"{where}\n    -> {problem}")
print(json.dumps(failures))
"""


def test_every_command_in_the_docs_is_accepted_by_its_script(tmp_path):
    """Parse and validate (no training) every script command the docs show; one subprocess per script, in parallel."""
    by_script: dict[str, list] = {}
    for where, script, argv in doc_commands():
        by_script.setdefault(script, []).append((where, argv))
    unknown = sorted(set(by_script) - set(ALGORITHMS) - set(TOOLS))
    assert unknown == [], f"the docs run scripts that do not exist: {unknown}"
    assert set(ALGORITHMS) <= set(by_script), f"no command in the docs runs {set(ALGORITHMS) - set(by_script)}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    processes = {}
    for script, commands in by_script.items():
        cwd = tmp_path / script
        cwd.mkdir()
        processes[script] = subprocess.Popen(
            [sys.executable, "-c", CHECKER, str(REPO / "funcpg"), script, json.dumps(commands)], cwd=cwd, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    failures = []
    for script, process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 0, f"the checker of {script} failed:\n{err[-3000:]}"
        failures += json.loads(out.strip().splitlines()[-1])
    assert failures == [], "commands in the docs that their script refuses:\n" + "\n".join(failures)
