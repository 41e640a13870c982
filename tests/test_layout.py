"""The README's Layout section lists the package as it is: every module, and nothing that is not there."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def listed_modules() -> set[str]:
    text = REPO.joinpath("README.md").read_text()
    block = text[text.index("## Layout"):].split("```")[1]
    lines = block[block.index("src/e1/"):].splitlines()[1:]
    out, folder = set(), ""
    for line in lines:
        if not line.startswith("  "):
            break
        m = re.match(r"  (\w+/)?\s*((?:[\w.]+\.py\s*|archs/\s*)+)", line)
        if m and (m.group(1) or not line.startswith("   ")):
            folder = m.group(1) or ""
            out |= {folder + name for name in m.group(2).split() if name.endswith(".py")}
    return out


def test_layout_lists_every_module():
    actual = {str(p.relative_to(REPO / "src" / "e1")) for p in (REPO / "src" / "e1").rglob("*.py")
              if p.name != "__init__.py"}
    listed = listed_modules()
    assert listed == actual, f"not listed: {sorted(actual - listed)}; listed but absent: {sorted(listed - actual)}"
