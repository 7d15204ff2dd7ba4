"""README.md against the code, cheaply (no training): every script it names exists, every option in its documented
commands is one the script's command line accepts (what `--help` lists), and every relative link resolves."""

import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PYTHON = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(?:\.venv/bin/)?python3?\s+(.*)$")  # optional VAR=value prefixes


def readme_commands(text: str) -> list[str]:
    """The command lines of README's code blocks that start with `python` or `.venv/bin/python`."""
    lines, inside = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            inside = not inside
        elif inside and PYTHON.match(line.strip()):
            lines.append(PYTHON.match(line.strip()).group(1).split(" #")[0].strip())
    return lines


def load_app(script: str) -> typer.Typer:
    path = ROOT / script
    name = "readme_" + re.sub(r"\W", "_", script)
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name].app


def options_of(command) -> set[str]:
    return {opt for p in command.params for opt in (*p.opts, *p.secondary_opts) if opt.startswith("--")} | {"--help"}


def accepted_options(script: str, words: list[str]) -> tuple[set[str], list[str]]:
    """The options the script's command (or the subcommand named in `words`) accepts, and the argv for its --help."""
    command = typer.main.get_command(load_app(script))
    argv = []
    if getattr(command, "commands", None):  # a group (Typer vendors its own click: no isinstance)
        options = options_of(command)  # a group's own options (report.py --script ...) come before a subcommand
        sub = next((w for w in words if w in command.commands), None)
        if sub:
            command, argv = command.commands[sub], [sub]
            options = options_of(command)
        return options, argv + ["--help"]
    return options_of(command), ["--help"]


def used_options(words: list[str]) -> list[str]:
    return [w.split("=")[0] for w in words if w.startswith("--")]


def check_command(line: str) -> list[str]:
    """What is wrong with one README command line: a missing script, or options the script does not accept."""
    words = shlex.split(line)
    script, rest = words[0], words[1:]
    if not (ROOT / script).is_file():
        return [f"{line}: no script {script}"]
    options, help_argv = accepted_options(script, rest)
    result = CliRunner().invoke(load_app(script), help_argv)
    problems = [] if result.exit_code == 0 else [f"{script} {' '.join(help_argv)}: exit code {result.exit_code}"]
    return problems + [f"{line}: {script} has no option {o}" for o in used_options(rest) if o not in options]


def test_readme_names_only_scripts_that_exist():
    text = README.read_text()
    named = set(re.findall(r"(?<![\w/.-])((?:benchmarks/|tests/)?[a-z_][a-z0-9_]*\.py)\b", text))
    assert named, "README names no scripts"
    missing = sorted(n for n in named if not (ROOT / n).is_file() and not (ROOT / "benchmarks" / n).is_file())
    assert not missing, f"README names scripts that do not exist: {missing}"


def test_readme_commands_use_only_options_the_scripts_accept():
    commands = readme_commands(README.read_text())
    assert len(commands) >= 10, commands
    problems = [p for line in commands for p in check_command(line)]
    assert not problems, "\n".join(problems)


def test_a_misspelled_option_is_caught():
    assert check_command("train_mlp.py --epochs 5") == []
    assert check_command("train_mlp.py --epoch 5") == ["train_mlp.py --epoch 5: train_mlp.py has no option --epoch"]
    assert check_command("report.py ablations --epochs 3") == []
    assert check_command("report.py reproduce --epochs 3")  # --epochs belongs to ablations, not reproduce
    assert check_command("no_such_script.py --x") == ["no_such_script.py --x: no script no_such_script.py"]


def slug(heading: str) -> str:
    """GitHub's anchor for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", ["README.md", *(f"docs/{p.name}" for p in sorted((ROOT / "docs").glob("*.md")))])
def test_relative_links_resolve(page):
    text = (ROOT / page).read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        path = (ROOT / page).parent / file if file else ROOT / page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md":
            headings = re.findall(r"^#+\s+(.*)$", path.read_text(), flags=re.M)
            if anchor not in {slug(h) for h in headings}:
                broken.append(target)
    assert not broken, f"{page}: broken links {broken}"
