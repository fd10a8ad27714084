"""The documentation as a reader meets it: README stays short and routes each reader from its
first screen, every relative link (and its #anchor) leads somewhere, and docs/commands.md names
every flag that the commands' --help prints."""
import os
import re

import pytest

from minimixer.commands import COMMANDS, main as minimixer_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = os.path.join(ROOT, "docs")
README_LIMIT = 15_000
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def doc_pages():
    return [README] + sorted(os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith(".md"))


def slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path):
    text = re.sub(r"```.*?```", "", read(path), flags=re.S)  # a '#' in a code block is no heading
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.*)$", text, flags=re.M)}


def test_readme_is_short():
    n = len(read(README))
    assert n <= README_LIMIT, f"README.md has {n} characters, over the {README_LIMIT} limit: move depth to docs/"


def test_readme_first_60_lines_route_each_reader():
    head = "\n".join(read(README).splitlines()[:60])
    targets = {m.group(1).split("#")[0].rstrip("/") for m in LINK.finditer(head)}
    wanted = {
        "the student": ["notebooks", "docs/walkthrough.md"],
        "the instructor": ["minimixer/coursework/README.md", "docs/instructors.md"],
    }
    for reader, paths in wanted.items():
        missing = [p for p in paths if p not in targets]
        assert not missing, f"README's first 60 lines do not link {reader} to {missing}"
    assert "python -m minimixer.eval" in head, "README's first 60 lines do not show the engineer `python -m minimixer.eval`"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(page):
    bad = []
    for m in LINK.finditer(read(page)):
        target = m.group(1)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if not os.path.exists(dest):
            bad.append(f"{target}: no such file")
        elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
            bad.append(f"{target}: no heading with anchor #{anchor}")
    assert not bad, f"{os.path.relpath(page, ROOT)}: broken links:\n  " + "\n  ".join(bad)


def invocations(help_text):
    """The flags of an argparse --help: each option line's first column ('-b N, --batch-size N')."""
    flags = set()
    for line in help_text.splitlines():
        if re.match(r"^\s+-", line):
            first_column = re.split(r"\s{2,}", line.strip())[0]
            flags |= set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", first_column))
    return flags - {"-h", "--help"}


def help_text(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        minimixer_main(argv + ["--help"])
    assert exit_.value.code == 0, f"minimixer {' '.join(argv)} --help exited with {exit_.value.code}"
    return capsys.readouterr().out


SUBCOMMANDS = {"weights": ["download", "list", "convert", "resize"], "coursework": ["release", "grade", "gradescope"]}


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_commands_page_names_every_flag(name, capsys):
    page = read(os.path.join(DOCS, "commands.md"))
    assert f"## {name}" in page, f"docs/commands.md has no section for {name}"
    missing = []
    for argv in [[name]] + [[name, sub] for sub in SUBCOMMANDS.get(name, [])]:
        text = help_text(argv, capsys)
        flags = invocations(text)
        missing += [f"{' '.join(argv)} {f}" for f in sorted(flags) if f"`{f}`" not in page]
        if len(argv) == 2:
            assert f"{name} {argv[1]}" in page, f"docs/commands.md does not describe `{name} {argv[1]}`"
    assert not missing, "docs/commands.md does not name these flags (as `--flag`):\n  " + "\n  ".join(missing)


def test_flag_scan_sees_flags(capsys):
    """The scan above finds what --help prints: a command's well-known flags are among them."""
    flags = invocations(help_text(["eval"], capsys))
    assert "-m" not in flags, "the scan took `python -m` in a help text for a flag"
    assert {"--data", "--data-dir", "-b", "--batch-size", "--results-file", "--model"} <= flags, sorted(flags)


def test_readme_fresh_machine_commands_are_ci_s():
    """README's two fresh-machine commands: the main job, and the test command .ci/run runs verbatim."""
    readme = read(README)
    main_job = "python3 -m venv .venv && . .venv/bin/activate && pip install -q -e . && python -m minimixer.eval"
    assert main_job in readme, f"README lost the main job's command: {main_job}"
    ci_default = [line for line in read(os.path.join(ROOT, ".ci", "run")).splitlines()
                  if line.startswith("python3 -m venv .venv &&")]
    assert ci_default, ".ci/run has no fresh-venv default test line"
    assert ci_default[0] in readme, f"README does not show the test command .ci/run runs: {ci_default[0]}"


def test_license_is_the_one_pyproject_names():
    pyproject = read(os.path.join(ROOT, "pyproject.toml"))
    assert re.search(r'^license = \{ text = "MIT" \}', pyproject, flags=re.M), "pyproject.toml no longer says MIT"
    assert read(os.path.join(ROOT, "LICENSE")).startswith("MIT License"), "LICENSE is not the MIT license"
    citation = read(os.path.join(ROOT, "CITATION.cff"))
    for needed in ("cff-version: 1.2.0", "preferred-citation:", "MLP-Mixer: An all-MLP Architecture for Vision", "2105.01601"):
        assert needed in citation, f"CITATION.cff lacks {needed!r}"
