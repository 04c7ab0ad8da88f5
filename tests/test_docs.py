"""The README and the pages under docs/ say what the code does: every python block runs, every
command names a real program with real flags, every relative link (and anchor) resolves, and the
README stays short.

``docs/results.md`` is generated (``experiments.results_page``) and ``docs/stop20/`` is frozen: they
are link targets here, not pages checked.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = "README.md"
GENERATED = {"docs/results.md"}
README_MAX_LINES = 200
SLOW_MARK = "<!-- test: slow -->"  # on the line before a ```python fence: the block's test is slow
QUICK_RUN_BEGIN = "<!-- quick-run: begin"
QUICK_RUN_END = "<!-- quick-run: end -->"


def _pages() -> list[str]:
    docs = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
    return [README, *(p for p in docs if p not in GENERATED)]


PAGES = _pages()


def _read(page: str) -> str:
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


@dataclass(frozen=True)
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    slow: bool


def _blocks(page: str) -> list[Block]:
    """Fenced code blocks, in order (``` fences only, as the pages use)."""
    lines = _read(page).split("\n")
    out, i = [], 0
    while i < len(lines):
        m = re.match(r"^```(\w*)\s*$", lines[i])
        if not m:
            i += 1
            continue
        start, lang = i, m.group(1)
        j = i + 1
        while j < len(lines) and lines[j].rstrip() != "```":
            j += 1
        assert j < len(lines), f"{page}:{start + 1}: code block never closed"
        prev = next((ln.strip() for ln in reversed(lines[:start]) if ln.strip()), "")
        out.append(
            Block(page, start + 1, lang, "\n".join(lines[i + 1 : j]) + "\n", prev == SLOW_MARK)
        )
        i = j + 1
    return out


def _prose(page: str) -> str:
    """The page without its fenced code blocks (blank lines in their place)."""
    lines = _read(page).split("\n")
    out, inside = [], False
    for ln in lines:
        if re.match(r"^```", ln):
            inside = not inside
            out.append("")
            continue
        out.append("" if inside else ln)
    return "\n".join(out)


def _is_readme_loop(block: Block) -> bool:
    """The training-loop snippet, run (and its output checked) by tests/test_readme.py."""
    return block.page == README and "cem_loss" in block.code and "fit_mixture" in block.code


# ------------------------------------------------------------------------------------------------
# (a) every python block runs


def _python_params() -> list:
    params = []
    for page in PAGES:
        for b in _blocks(page):
            if b.lang != "python" or _is_readme_loop(b):
                continue
            marks = [pytest.mark.slow] if b.slow else []
            params.append(pytest.param(b, id=f"{b.page}:{b.line}", marks=marks))
    return params


def test_every_page_has_been_read_and_python_blocks_exist():
    assert README in PAGES and len(PAGES) > 5, PAGES
    blocks = [b for p in PAGES for b in _blocks(p) if b.lang == "python"]
    assert sum(_is_readme_loop(b) for b in blocks) == 1
    assert len(blocks) >= 3, "docs lost their python examples"
    for b in blocks:
        assert b.code.strip(), f"{b.page}:{b.line}: empty python block"


@pytest.mark.parametrize("block", _python_params())
def test_python_block_runs(block: Block, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # anything a block writes lands here
    namespace: dict = {"__name__": "__docs_block__"}
    exec(compile(block.code, f"{block.page}:{block.line}", "exec"), namespace)
    assert capsys.readouterr().out.strip(), f"{block.page}:{block.line}: the block prints nothing"


# ------------------------------------------------------------------------------------------------
# (b) every command names a real program and real flags (not run: they train for minutes)

_OPERATORS = {"|", "||", "&", "&&", ";", ">", ">>", "<", "2>&1"}
_OUR_PACKAGES = ("experiments.", "benchmarks.", "cem_jax.")


@functools.cache
def _scripts() -> dict[str, str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    return {name: target.split(":")[0] for name, target in scripts.items()}


@functools.cache
def _extras() -> frozenset[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return frozenset(tomllib.load(f)["project"]["optional-dependencies"])


def _command_lines(page: str) -> list[tuple[str, str]]:
    """``(where, text)`` of each shell command: bash block lines (continuations joined, full-line
    comments that hold a command included) and inline code spans that start like a command."""
    found = []
    for b in _blocks(page):
        if b.lang not in ("bash", "sh", "shell"):
            continue
        for k, ln in enumerate(b.code.replace("\\\n", " ").split("\n")):
            text = ln.strip()
            if text.startswith("#"):  # "# or: python -m ..." documents a command too
                m = re.search(r"(\S+=\S+\s+)*(python -m |cem-)", text)
                text = text[m.start() :] if m else ""
            if text:
                found.append((f"{page}:{b.line + 1 + k}", text))
    for m in re.finditer(r"`([^`]+)`", _prose(page)):
        span = " ".join(m.group(1).split())
        if span.startswith(("python -m ", "cem-run", "cem-sweep", "cem-attack", "pip install")):
            found.append((f"{page} (inline)", span))
    return found


def _split(text: str) -> list[list[str]]:
    """The simple commands of one shell line (comments dropped, split at operators)."""
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote: check the words anyway
        tokens = text.split()
    commands, current = [], []
    for t in tokens:
        if t in _OPERATORS or t.startswith((">", "2>")):
            commands.append(current)
            current = []
            continue
        if t.endswith(";"):
            current.append(t[:-1])
            commands.append(current)
            current = []
            continue
        current.append(t)
    commands.append(current)
    return [c for c in commands if c]


def _program(words: list[str]) -> tuple[str, list[str]] | None:
    """``(module, arguments)`` of a ``python -m MODULE`` / console-script command, else None."""
    for i, w in enumerate(words):
        if w in ("python", "python3") and words[i + 1 : i + 2] == ["-m"] and i + 2 < len(words):
            return words[i + 2], words[i + 3 :]
        if w in _scripts():
            return _scripts()[w], words[i + 1 :]
    return None


def _commands() -> list[tuple[str, str, list[str]]]:
    out = []
    for page in PAGES:
        for where, text in _command_lines(page):
            for words in _split(text):
                prog = _program(words)
                if prog is not None:
                    out.append((where, prog[0], prog[1]))
    return out


_FLAG_LINE = re.compile(r"^  (?:-\S+,\s?)?--(\[no\])?([A-Za-z0-9][\w-]*)", re.M)


@functools.cache
def _flags_of(module: str) -> tuple[frozenset[str], frozenset[str]]:
    """``(flags, boolean flags)`` the program's own help lists (absl ``--helpfull``, argparse
    ``--help``), read in a subprocess: the programs define flags on one global registry."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    for arg in ("--helpfull", "--help"):
        proc = subprocess.run(
            [sys.executable, "-m", module, arg],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        found = _FLAG_LINE.findall(proc.stdout)  # absl exits 1 after --helpfull
        if found:
            return frozenset(n for _, n in found), frozenset(n for no, n in found if no)
    raise AssertionError(f"python -m {module} --help listed no flags:\n{proc.stderr[-2000:]}")


def test_commands_were_found():
    modules = {m for _, m, _ in _commands()}
    for expected in ("experiments.run", "experiments.sweep", "experiments.attack"):
        assert expected in modules, f"no documented command runs {expected}"


def test_every_documented_module_exists():
    missing = sorted({(w, m) for w, m, _ in _commands() if importlib.util.find_spec(m) is None})
    assert not missing, f"python -m of modules that do not exist: {missing}"


def _our_modules() -> list[str]:
    return sorted({m for _, m, _ in _commands() if m.startswith(_OUR_PACKAGES)})


@pytest.mark.parametrize("module", _our_modules())
def test_every_flag_of_a_documented_command_is_a_flag_of_its_program(module):
    names, bools = _flags_of(module)
    bad = []
    for where, mod, args in _commands():
        if mod != module:
            continue
        for a in args:
            if not a.startswith("--") or a == "--":
                continue
            name = a[2:].split("=", 1)[0]
            negated = name.startswith("no") and name[2:] in bools
            if name not in names and not negated:
                bad.append(f"{where}: {a}")
    assert not bad, f"flags python -m {module} does not have:\n" + "\n".join(bad)


def test_every_pip_extra_named_exists():
    bad = []
    for page in PAGES:
        for where, text in _command_lines(page):
            for m in re.finditer(r"\.\[([\w,-]+)\]", text):
                bad += [f"{where}: {e}" for e in m.group(1).split(",") if e not in _extras()]
    assert not bad, f"extras pyproject.toml does not declare: {bad}"


def test_the_flags_table_lists_flags_of_experiments_run():
    names, _ = _flags_of("experiments.run")
    rows = [ln for ln in _read("docs/flags.md").split("\n") if ln.startswith("| `--")]
    assert len(rows) > 10
    bad = []
    for row in rows:
        first = row.split("|")[1]
        bad += [f for f in re.findall(r"`--(\w+)`", first) if f not in names]
    assert not bad, f"docs/flags.md lists flags experiments.run does not have: {bad}"


# ------------------------------------------------------------------------------------------------
# (c) every relative link and anchor resolves


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]{2,}|`", "", heading.strip().lower())  # code spans and bold markers
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(path: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", _prose(path), flags=re.M):
        base = _slug(m.group(1))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def _links(page: str) -> list[str]:
    prose = re.sub(r"`[^`\n]*`", "", _prose(page))  # links inside code spans are not links
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", prose)


def test_slug_matches_github():
    assert _slug("Records: a study that outlives its machine") == (
        "records-a-study-that-outlives-its-machine"
    )
    assert _slug("Several hosts, one run per device, and `gs://` workdirs") == (
        "several-hosts-one-run-per-device-and-gs-workdirs"
    )
    assert _slug("A finished run's client: `load_client`") == "a-finished-runs-client-load_client"


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_resolves(page):
    bad = []
    for target in _links(page):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto:, ...
            continue
        path, _, anchor = target.partition("#")
        resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(os.path.join(ROOT, resolved)):
            bad.append(f"{target}: no file {resolved}")
        elif anchor:
            if not resolved.endswith(".md"):
                bad.append(f"{target}: an anchor into a file that is not markdown")
            elif anchor not in _anchors(resolved):
                bad.append(f"{target}: no heading #{anchor} in {resolved}")
    assert not bad, f"{page}: broken links:\n" + "\n".join(bad)


def test_the_readme_links_every_docs_page_and_each_links_back():
    linked = {
        os.path.normpath(t.partition("#")[0]) for t in _links(README) if t.startswith("docs/")
    }
    pages = [p for p in PAGES if p != README]
    assert not [p for p in pages if p not in linked], "docs pages the README does not link"
    for p in pages:
        assert "../README.md" in _links(p), f"{p} does not link back to the README"


# ------------------------------------------------------------------------------------------------
# (d) the README stays a five-minute read


def test_readme_is_short():
    n = len(_read(README).rstrip("\n").split("\n"))
    assert n <= README_MAX_LINES, (
        f"README.md has {n} lines (at most {README_MAX_LINES}): move detail to docs/"
    )


def test_the_quick_run_figures_live_in_one_delimited_place():
    text = _read(README)
    assert text.count(QUICK_RUN_BEGIN) == 1 and text.count(QUICK_RUN_END) == 1
    begin, end = text.index(QUICK_RUN_BEGIN), text.index(QUICK_RUN_END)
    assert begin < end
    assert "min" in text[begin:end], "the quick run's timing belongs inside the delimited block"
