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


# Bad command lines stop before any work, each with one line naming the problem.
OPENAI = ["--backend", "openai", "--base-url", "http://127.0.0.1:9/v1"]
BAD = [
    ("eval.py", ["humaneval", "--ckpt", "x", "--temperature", "0", "--samples", "2"],
     "greedy decoding (--temperature 0) gives one answer: --samples 1"),
    ("eval.py", ["humaneval", "--ckpt", "x", "--temperature", "0.8", "--samples", "2",
                 "--k", "5,10"], "every k exceeds --samples 2"),
    ("eval.py", ["humaneval", "--base-url", "http://127.0.0.1:9/v1", "--model", "m"],
     "--base-url goes with --backend openai"),
    ("eval.py", ["humaneval", *OPENAI, "--tasks", "0"],
     "--backend openai needs --base-url and --model"),
    ("eval.py", ["humaneval", "--backend", "hf", "--ckpt", "x", "--compile", "--tasks", "0"],
     "--compile is for --backend local"),
    ("eval.py", ["retrieval", "--ckpt", "x", "--samples", "0"], "--samples must be positive"),
    ("eval.py", ["retrieval", "--ckpt", "x", "--positions", "0.5,2"],
     "--positions must lie in [0, 1], got '0.5,2'"),
    ("eval.py", ["retrieval", "--ckpt", "x", "--positions", "0.5,end"],
     "--positions: expected comma-separated numbers, got '0.5,end'"),
    ("eval.py", ["ppl", "--ckpt", "x", "--data", "x", "--chunk", "0"],
     "--chunk and --tokens-per-length must be positive"),
    ("self_instruct.py", [*OPENAI, "--model", "m", "--shard", "0/2"],
     "with --shard, run one --stage at a time"),
    ("self_instruct.py", [*OPENAI, "--model", "m", "--stage", "dedup", "--shard", "1/2"],
     "--stage dedup reads every shard: run it without --shard"),
]


@pytest.mark.parametrize("script, argv, message", BAD, ids=[" ".join(b[1][:3]) for b in BAD])
def test_bad_command_lines_are_one_error_line(script, argv, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main = {"eval.py": "eval", "self_instruct.py": "self_instruct"}[script]
    module = __import__(main)
    with pytest.raises(SystemExit) as e:
        module.main(argv + ["--out", str(tmp_path / "out")])
    text = str(e.value.code)
    assert text.startswith("error: ") and "\n" not in text and message in text, text
