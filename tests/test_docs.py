"""The documentation lives in the repository: every relative link in README.md, docs/ and the other
Markdown files resolves to a file (and heading) inside it, nothing points outside it, and README.md stays a
front page that keeps the set-up commands .ci/run greps for, and every option of every command-line tool
is documented in docs/."""
import argparse
import importlib
import importlib.util
import re
import shlex
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Not rglob from ROOT: CI creates its venv inside the checkout.
DOC_DIRS = ("docs", "nearl_rt", "export", "bench", "cpp", "tests")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)|^\s*\[[^\]]+\]:\s*(\S+)", re.M)
FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def markdown_files():
    files = [ROOT / "README.md"]
    for d in DOC_DIRS:
        files += sorted((ROOT / d).rglob("*.md"))
    return files


def prose(path: Path) -> str:
    """The text outside code blocks and code spans (where a bracket is code, not a link)."""
    return CODE_SPAN.sub("", FENCE.sub("", path.read_text(encoding="utf-8")))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = CODE_SPAN.sub(lambda m: m.group(0)[1:-1], heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set:
    return {slug(line.lstrip("#")) for line in FENCE.sub("", path.read_text(encoding="utf-8")).splitlines()
            if re.match(r"#{1,6} ", line)}


def relative_links(path: Path):
    for m in LINK.finditer(prose(path)):
        target = m.group(1) or m.group(2)
        if not re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto: are not files
            yield target


def link_problems(files, root: Path) -> tuple[list, int]:
    """(one line per broken relative link, number of relative links checked)."""
    problems, checked = [], 0
    for md in files:
        for target in relative_links(md):
            checked += 1
            file_part, _, anchor = target.partition("#")
            dest = (md.parent / file_part).resolve() if file_part else md
            where = f"{md.relative_to(root)}: ({target})"
            if not dest.is_relative_to(root):
                problems.append(f"{where} points outside the repository")
            elif not dest.exists():
                problems.append(f"{where} does not exist")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                problems.append(f"{where}: no heading #{anchor} in {dest.relative_to(root)}")
    return problems, checked


def test_every_relative_link_resolves_inside_the_repository():
    problems, checked = link_problems(markdown_files(), ROOT)
    assert checked >= 20  # the README and docs do link to each other
    assert not problems, "\n".join(problems)


def test_no_document_refers_outside_the_repository():
    for md in markdown_files():
        text = md.read_text(encoding="utf-8")
        assert "../shared" not in text and "/work/" not in text, md.relative_to(ROOT)


def test_link_checker_catches_broken_links(tmp_path):
    """A missing file, a missing heading and a path out of the repository are caught; code is not a link."""
    root = tmp_path / "repo"
    (root / "docs").mkdir(parents=True)
    (root / "docs" / "b.md").write_text("# Measured: ORT CPU vs eager\n\n## `python -m export.onnx`\n")
    page = root / "docs" / "a.md"
    page.write_text("[ok](b.md#measured-ort-cpu-vs-eager) [ok](b.md#python--m-exportonnx) [ok](#top)\n# Top\n"
                    "[web](https://example.org/x.md) `[code](missing.md)`\n```\n[code](missing.md)\n```\n"
                    "[1](nope.md) [2](b.md#no-such-heading) [3](../../outside.md)\n[ref]: gone.md\n")
    problems, checked = link_problems([page], root)
    assert checked == 7
    assert [p.split(": (")[1].split(")")[0] for p in problems] == ["nope.md", "b.md#no-such-heading",
                                                                  "../../outside.md", "gone.md"]


def test_readme_links_every_docs_page():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in relative_links(ROOT / "README.md")}
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
    assert not unlinked, f"add a row to README.md's documentation table for docs/{', docs/'.join(unlinked)}"


def test_readme_is_a_front_page_with_the_ci_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move reference material into docs/"
    for cmd in ("pip install -e '.[dev]'", "python -m pytest -q"):  # .ci/run greps for these exact lines
        assert cmd in lines
    first_run = next(i for i, line in enumerate(lines) if line.startswith("python -m nearl_rt demo"))
    assert first_run > lines.index("python -m pytest -q")


# ------------------------------------------------------------------ every CLI option is in docs/
class _ParserCaught(BaseException):  # BaseException: a CLI's own `except Exception` does not swallow it
    pass


def cli_modules(root: Path) -> list:
    """Dotted names of the repository's modules that define a `main` building an argparse parser."""
    skip = {"tests", "docs", "build"}
    names = []
    for top in sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name not in skip
                      and not (d / "pyvenv.cfg").exists()):
        for py in sorted(top.rglob("*.py")):
            text = py.read_text(encoding="utf-8", errors="replace")
            if "ArgumentParser" in text and re.search(r"^def main\(", text, re.M):
                names.append(".".join(py.relative_to(root).with_suffix("").parts))
    return names


def cli_parser(module: str):
    """The parser `module.main` builds, caught when it parses (nothing of the command runs); None when the
    module needs an optional package this environment lacks (its import fails on a module outside the
    repository)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError as e:
        if (ROOT / (e.name or "").split(".")[0]).exists():
            raise
        return None
    caught = []

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise _ParserCaught

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", catch):
        with pytest.raises(_ParserCaught):
            importlib.import_module(module).main([])
    return caught[0]


SHORTCUT = re.compile(r'run_module\("([\w.]+)"')


def target_module(module: str) -> str:
    """The module a command runs: a checkout shortcut (export/*.py, bench/latency.py) names its target."""
    spec = importlib.util.find_spec(module)
    origin = Path(spec.origin) if spec is not None and spec.origin else None
    m = SHORTCUT.search(origin.read_text(encoding="utf-8")) if origin and origin.suffix == ".py" else None
    return m.group(1) if m else module


def aliases(module: str) -> tuple:
    """Other names of the command `module`: its checkout shortcuts and `nearl-rt TOOL`."""
    from nearl_rt.__main__ import TOOLS
    names = [f"nearl-rt {tool}" for tool, target in TOOLS.items() if target == module]
    for folder in ("export", "bench"):
        for py in sorted((ROOT / folder).glob("*.py")):
            m = SHORTCUT.search(py.read_text(encoding="utf-8"))
            if m and m.group(1) == module:
                names += [f"{folder}.{py.stem}", f"{folder}/{py.name}"]
    return tuple(names)


def test_shortcuts_and_tools_name_real_commands():
    """Every checkout shortcut and every `nearl-rt TOOL` runs a module that has a command-line parser."""
    from nearl_rt.__main__ import TOOLS
    shortcuts = [f"{d}.{p.stem}" for d in ("export", "bench") for p in sorted((ROOT / d).glob("*.py"))
                 if SHORTCUT.search(p.read_text(encoding="utf-8"))]
    assert {"export.onnx", "export.triton", "export.serve", "export.preprocess_graph", "bench.latency"} <= set(shortcuts)
    known = set(cli_modules(ROOT))
    for module in {*map(target_module, shortcuts), *TOOLS.values()}:
        assert module in known, f"{module} has no main building a parser"


def commands(module: str, parser: argparse.ArgumentParser):
    """(names a page uses for the command, its long options), one per (sub)command."""
    base = module.removesuffix(".__main__")
    names = (base, base.replace(".", "/") + ".py", *aliases(base))
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for action in subs:
        for sub_name, sub in action.choices.items():
            yield (f"{base} {sub_name}",), long_options(sub)
    if not subs:
        yield names, long_options(parser)


def long_options(parser: argparse.ArgumentParser) -> set:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def undocumented_options(docs: dict, names: tuple, options: set) -> tuple[list, list]:
    """(pages naming the command, its options none of them mentions)."""
    pages = [p for p, text in docs.items() if any(n in text for n in names)]
    missing = sorted(o for o in options
                     if not any(re.search(re.escape(o) + r"(?![\w-])", docs[p]) for p in pages))
    return pages, missing


def test_every_cli_option_is_documented():
    docs = {p.name: p.read_text(encoding="utf-8") for p in sorted((ROOT / "docs").glob("*.md"))}
    modules = cli_modules(ROOT)
    assert {"nearl_rt.train", "nearl_rt.__main__", "nearl_rt.export.onnx", "nearl_rt.bench.latency"} <= set(modules)
    problems = []
    for module in modules:
        parser = cli_parser(module)
        for names, options in commands(module, parser) if parser is not None else ():
            pages, missing = undocumented_options(docs, names, options)
            if not pages:
                problems.append(f"no page in docs/ names {names[0]} (add it to docs/cli.md)")
            elif missing:
                problems.append(f"{names[0]}: {', '.join(missing)} in none of docs/{', docs/'.join(pages)}")
    assert not problems, "\n".join(problems)


def test_option_check_catches_an_undocumented_option():
    """An option only another page names, or only as the prefix of a longer option, is not documented."""
    docs = {"cli.md": "`python -m pkg.tool --out DIR --seed-file F`", "other.md": "--seed"}
    assert undocumented_options(docs, ("pkg.tool",), {"--out", "--seed"}) == (["cli.md"], ["--seed"])
    assert undocumented_options(docs, ("pkg.gone",), {"--x"}) == ([], ["--x"])


# ------------------------------------------------------------------ README commands parse
def python_commands(markdown: str):
    """(module, arguments, options named in its comment) of every `python -m X ...` / `python bench/x.py ...`
    line in the page's bash blocks (continuation lines joined)."""
    for block in re.findall(r"^```bash\n(.*?)^```", markdown, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            command, _, comment = line.partition("#")
            words = shlex.split(command)
            if words[:2] == ["python", "-m"]:
                module, args = words[2], words[3:]
            elif words[:1] == ["python"] and len(words) > 1 and words[1].endswith(".py"):
                module, args = words[1].removesuffix(".py").replace("/", "."), words[2:]
            else:
                continue
            if module == "pytest":
                continue
            if importlib.util.find_spec(module).submodule_search_locations:  # a package: its __main__
                module += ".__main__"
            yield module, args, set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", comment))


def test_every_readme_command_parses():
    """Each README command line is accepted by its CLI's own parser (options, choices, required arguments),
    and every option its comment mentions exists: the front page never shows a command that cannot run."""
    found = [(target_module(m), a, o) for m, a, o in python_commands((ROOT / "README.md").read_text(encoding="utf-8"))]
    assert {m for m, _, _ in found} >= {"nearl_rt.__main__", "nearl_rt.train", "nearl_rt.export.onnx",
                                        "nearl_rt.bench.latency"}
    for module, args, mentioned in found:
        parser = cli_parser(module)
        if parser is None:
            continue
        parser.parse_args(args)  # exits 2 (or raises) on an unknown option, a bad choice, a missing argument
        options = long_options(parser) | {o for a in parser._actions if isinstance(a, argparse._SubParsersAction)
                                          for sub in a.choices.values() for o in long_options(sub)}
        assert mentioned <= options, f"README: {module} has no {mentioned - options}"


def test_readme_command_check_reads_continuations_and_comments():
    page = "```bash\npython -m export.onnx a.pt \\\n    -o b.onnx   # --fp16, --opset\npython -m pytest -q\n```\n"
    assert list(python_commands(page)) == [("export.onnx", ["a.pt", "-o", "b.onnx"], {"--fp16", "--opset"})]
