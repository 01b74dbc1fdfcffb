"""The README cannot rot: every `python X.py ...` and `torchrun ... X.py ...` command it shows (code
blocks, table cells, inline code) and the example in scripts/slurm.sh is parsed by that script's own
argument parser here, so a renamed or removed flag fails this test. Parsing stops right after
parse_args: nothing is trained or loaded. What the commands then do is what the other tests run."""

import argparse
import re
import runpy
import shlex
import sys

import pytest

from conftest import ROOT


def commands(text: str) -> list[str]:
    """Shell commands of a markdown or shell text: lines of ``` blocks (joined at trailing
    backslashes, '#' comments cut) and inline `...` spans that start with python or torchrun."""
    found = []
    for lang, block in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        if lang in ("", "bash", "sh"):
            found += [c.split(" #")[0].strip() for c in block.replace("\\\n", " ").splitlines()]
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    found += re.findall(r"`((?:python|torchrun) [^`]+)`", text)
    return [c for c in found if re.match(r"(python|torchrun) ", c)]


def script_and_argv(cmd: str):
    """('train_infill.py', [flags]) of a python or torchrun command; None for other programs."""
    words = shlex.split(cmd)
    for i, w in enumerate(words[1:], 1):
        if w.endswith(".py"):
            return w, words[i + 1:]
        if words[0] == "python" and w == "-m":
            return None
    return None


def readme_commands():
    text = (ROOT / "README.md").read_text()
    slurm = (ROOT / "scripts" / "slurm.sh").read_text()
    # the sbatch example: its arguments are a stage script and its flags
    example = " ".join(line.lstrip("# ").rstrip("\\").strip() for line in slurm.splitlines()
                       if line.startswith("#   ") or line.startswith("#       "))
    example = "python " + example.split("scripts/slurm.sh ", 1)[1]
    cmds = [c for c in commands(text) + [example] if script_and_argv(c)]
    assert len(cmds) >= 20, cmds  # the README shows the stages, evaluation and self-instruct
    return cmds


class Parsed(Exception):
    pass


@pytest.mark.parametrize("cmd", readme_commands())
def test_readme_command_parses(cmd, monkeypatch):
    script, argv = script_and_argv(cmd)
    path = ROOT / script
    assert path.is_file(), f"the README runs {script}, which does not exist"
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, args=None, namespace=None):
        real(self, args, namespace)
        raise Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    monkeypatch.syspath_prepend(str(ROOT))
    try:
        runpy.run_path(str(path), run_name="__main__")
    except Parsed:
        return
    except SystemExit as e:  # argparse's error (code 2) names the bad flag on stderr
        assert e.code == 0, f"{cmd}\n  exits with {e.code}: its flags do not parse"
        return
    pytest.fail(f"{cmd}\n  never parsed its arguments")
