"""Every script's --help (common.script_parser): every flag with its help and its default, and at
the end the script's docstring with its example commands."""
import argparse
import ast
import runpy
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ["sample.py", "eval.py", "self_instruct.py", "data.py", "dedup.py", "demo.py",
           "train_code.py", "train_infill.py", "train_python.py", "train_longctx.py",
           "train_instruct.py",
           *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "bench").glob("*.py"))]


class Parsed(Exception):
    pass


def parsers_of(script, monkeypatch):
    """The parser a script builds, and its subcommands' parsers: run as __main__ up to
    parse_args."""
    built = []

    def grab(self, *args, **kwargs):
        built.append(self)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", grab)
    monkeypatch.setattr(sys, "argv", [script])
    with pytest.raises(Parsed):
        runpy.run_path(str(ROOT / script), run_name="__main__")
    out = []

    def walk(p):
        out.append(p)
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sub in a.choices.values():
                    walk(sub)
    walk(built[0])
    return out


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_every_flag_with_its_default_and_ends_with_the_examples(script, monkeypatch):
    doc = ast.get_docstring(ast.parse((ROOT / script).read_text()))
    commands = [line.strip() for line in doc.splitlines()
                if line.lstrip().startswith(("python ", "torchrun "))]
    for p in parsers_of(script, monkeypatch):
        text = p.format_help()
        flags = text.split("\noptions:\n")[1]
        for a in p._actions:
            if (isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
                    or a.help == argparse.SUPPRESS):  # internal flags, hidden on purpose
                continue
            assert a.help, f"{p.prog} {a.option_strings}: no help"
            if not a.required:  # what it is when not given: "(default: X)", or said in words
                rendered = p._get_formatter()._expand_help(a) if a.help else ""
                assert "default" in rendered.lower() or "none:" in rendered.lower(), (
                    p.prog, a.option_strings, rendered)
        # the example commands at the end: the docstring's (for eval.py's and data.py's
        # commands, those of that command)
        assert p.epilog and text.rstrip().endswith(p.epilog.rstrip().splitlines()[-1])
        mine = [line.strip() for line in p.epilog.splitlines()
                if line.lstrip().startswith(("python ", "torchrun "))]
        assert mine and all(c in flags for c in mine), p.prog
        if p.prog == script:
            assert all(c in flags for c in commands)
    assert commands or script == "data.py"  # data.py's are those of its `prepare` command
