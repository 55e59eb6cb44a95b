"""rbee-keeper's help teaches: every option of every command is described and shows its
default; ``--stop`` is repeatable and shown so; shell completion for bash, zsh and fish."""

from __future__ import annotations

import inspect
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import cyclopts
import pytest

from rbee.keeper.help_text import plain_help, use_plain_help
from rbee.keeper.main import app
from rbee.requests import DEFAULT_SAMPLING
from tests.processes import program
from tests.queen.support import keeper_env

#: Wide enough that every option of a help page is one row.
WIDE = {"COLUMNS": "250"}
SHELLS = ("bash", "zsh", "fish")


def keeper(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **keeper_env(home), **WIDE, **(env or {})}
    return subprocess.run([program("rbee-keeper"), *args], capture_output=True, text=True, env=full, timeout=60)


def commands(root: cyclopts.App) -> Iterator[tuple[str, cyclopts.App]]:
    """Every command of the keeper, as (``"queen start"``, its App), sub-apps walked."""
    todo: list[tuple[str, cyclopts.App]] = [("", root)]
    seen: set[int] = set()
    while todo:
        path, current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if inspect.isfunction(current.default_command):
            yield path, current
        for name in current:
            if not name.startswith("-"):
                todo.append((f"{path} {name}".strip(), current[name]))


def option_row(help_text: str, option: str) -> str:
    """The row of ``option`` in a help page drawn ``WIDE``."""
    rows = [line for line in help_text.splitlines() if f" {option} " in line or f" {option}\u2502" in line]
    assert len(rows) == 1, (option, help_text)
    return rows[0]


def test_every_option_of_every_command_has_a_description_and_shows_its_default() -> None:
    use_plain_help(app)
    found = dict(commands(app))
    assert {"infer", "chat", "ps", "queen start", "setup add-node", "models download", "completion"} <= set(found)
    missing: list[str] = []
    for path, command in sorted(found.items()):
        for argument in command.assemble_argument_collection(parse_docstring=True):
            if not argument.show:
                continue
            name = f"{path} {argument.names[0]}"
            if not (argument.parameter.help or "").strip():
                missing.append(f"{name}: no description")
            if not argument.required and not argument.show_default:
                missing.append(f"{name}: no default shown")
    assert missing == []


def test_sampling_options_show_the_request_defaults(rbee_home: Path) -> None:
    proc = keeper(rbee_home, "infer", "--help")
    assert proc.returncode == 0, proc.stderr
    for option, field in [("--max-tokens", "max_tokens"), ("--temperature", "temperature"), ("--top-p", "top_p"),
                          ("--top-k", "top_k"), ("--min-p", "min_p"), ("--repeat-penalty", "repeat_penalty")]:
        assert f"[default: {getattr(DEFAULT_SAMPLING, field)}]" in option_row(proc.stdout, option)
    assert "[default: random]" in option_row(proc.stdout, "--seed")
    assert "[default: the queen places the job]" in option_row(proc.stdout, "--node")
    chat = keeper(rbee_home, "chat", "--help")
    assert f"[default: {DEFAULT_SAMPLING.temperature}]" in option_row(chat.stdout, "--temperature")


def test_queen_start_describes_port_and_host(rbee_home: Path) -> None:
    proc = keeper(rbee_home, "queen", "start", "--help")
    assert proc.returncode == 0, proc.stderr
    port, host = option_row(proc.stdout, "--port"), option_row(proc.stdout, "--host")
    assert "The port the queen listens on" in port and "RBEE_QUEEN_URL" in port
    assert "The address the queen listens on" in host and "[default: 127.0.0.1]" in host


def test_help_pages_are_plain_text(rbee_home: Path) -> None:
    use_plain_help(app)
    for path, command in commands(app):
        # Every docstring was made plain: each paragraph and description on one line.
        assert plain_help(command.default_command.__doc__) == command.default_command.__doc__, path
        proc = keeper(rbee_home, *path.split(), "--help")
        assert proc.returncode == 0, (path, proc.stderr)
        assert "`" not in proc.stdout, (path, proc.stdout)


def test_plain_help_joins_paragraphs_and_descriptions_keeps_the_sections() -> None:
    doc = """Summary that goes
    on.

    Parameters
    ----------
    name
        The ``name``,
        continued.
    other
        Other.
    """
    assert plain_help(doc) == ("Summary that goes on.\n\nParameters\n----------\nname\n    The name, continued.\n"
                               "other\n    Other.")


def test_stop_is_repeatable_and_shown_so(rbee_home: Path) -> None:
    base = ["infer", "--model", "gemma3-270m", "--prompt", "hi"]
    _, bound, _ = app.parse_args([*base, "--stop", "x", "--stop", "-y"], exit_on_error=False, print_error=False)
    assert bound.arguments["stop"] == ["x", "-y"]  # one per flag, and it may start with a hyphen
    with pytest.raises(cyclopts.CycloptsError):
        app.parse_args([*base, "--stop", "x", "y"], exit_on_error=False, print_error=False)
    row = option_row(keeper(rbee_home, "infer", "--help").stdout, "--stop")
    assert "--stop TEXT" in row and "..." not in row and "--empty-stop" not in row and "Repeat" in row
    # The real program reads both: the second one (empty) is refused by the request check.
    proc = keeper(rbee_home, *base, "--stop", "x", "--stop", "")
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == ["Error: invalid infer request: stop[1] must not be empty"]
    assert list(rbee_home.iterdir()) == []


def test_completion_scripts_for_bash_zsh_and_fish(rbee_home: Path) -> None:
    top = [name for name in app if not name.startswith("-")]
    assert "completion" in top
    markers = {"bash": "complete -F _rbee_keeper rbee-keeper", "zsh": "#compdef rbee-keeper",
               "fish": "complete -c rbee-keeper"}
    for shell in SHELLS:
        proc = keeper(rbee_home, "completion", shell)
        assert proc.returncode == 0, proc.stderr
        assert markers[shell] in proc.stdout
        for word in [*top, "--max-tokens", "--narration", "--ssh-host"]:
            assert word in proc.stdout, (shell, word)
    assert keeper(rbee_home, "completion", "tcsh").returncode == 2


def bash_completes(script: str, *words: str) -> list[str]:
    """What bash offers for the last of ``words`` (``rbee-keeper`` first), with ``script`` loaded."""
    line = " ".join(words)
    program_text = (
        f'source /dev/stdin; COMP_WORDS=({" ".join(repr(w) for w in words)}); '
        f'COMP_CWORD={len(words) - 1}; COMP_LINE={line!r}; COMP_POINT=${{#COMP_LINE}}; '
        '_rbee_keeper; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    proc = subprocess.run(["bash", "--norc", "--noprofile", "-c", program_text], input=script,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return [w for w in proc.stdout.splitlines() if w]


def test_bash_completes_commands_options_and_choices(rbee_home: Path) -> None:
    script = keeper(rbee_home, "completion", "bash").stdout
    assert subprocess.run(["bash", "-n"], input=script, text=True, timeout=30).returncode == 0
    assert bash_completes(script, "rbee-keeper", "inf") == ["infer"]
    assert bash_completes(script, "rbee-keeper", "infer", "--max") == ["--max-tokens"]
    assert bash_completes(script, "rbee-keeper", "infer", "--narration", "") == ["human", "cute", "story", "json",
                                                                                  "quiet"]
    assert "start" in bash_completes(script, "rbee-keeper", "queen", "")


def test_completion_install_writes_where_each_shell_looks(tmp_path: Path, rbee_home: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    env: dict[str, Any] = {"HOME": str(home), "ZSH": "", "ZSH_CUSTOM": ""}
    where = {"bash": home / ".local/share/bash-completion/completions/rbee-keeper",
             "zsh": home / ".zsh/completions/_cyclopts_rbee-keeper",
             "fish": home / ".config/fish/completions/rbee-keeper.fish"}
    for shell in SHELLS:
        proc = keeper(rbee_home, "completion", shell, "--install", env=env)
        assert proc.returncode == 0, proc.stderr
        assert str(where[shell]) in proc.stdout
        assert where[shell].read_text() == keeper(rbee_home, "completion", shell).stdout
    assert str(where["bash"]) in (home / ".bashrc").read_text()
    assert f"fpath=({where['zsh'].parent} $fpath)" in (home / ".zshrc").read_text()
