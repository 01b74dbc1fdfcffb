"""The house rules that a reader notices: lines at most 100 characters."""

from conftest import ROOT


def test_lines_at_most_100_characters():
    long = []
    for f in sorted([*ROOT.glob("*.py"), *ROOT.glob("tests/*.py"), *ROOT.glob("bench/*.py")]):
        for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1):
            if len(line) > 100:
                long.append(f"{f.relative_to(ROOT)}:{i} ({len(line)})")
    assert not long, "lines over 100 characters:\n" + "\n".join(long)
