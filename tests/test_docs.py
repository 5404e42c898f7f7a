"""The docs say what the code does: the config reference is generated from DistillConfig and current, every
field is documented once, and every relative link of the README and docs/ points at a file that exists."""

import re
import runpy
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = runpy.run_path(str(ROOT / "docs" / "generate_config_reference.py"))


def test_config_reference_is_current():
    assert (ROOT / "docs" / "config.md").read_text() == GENERATOR["render"](), (
        "docs/config.md is stale: run python docs/generate_config_reference.py"
    )


def test_every_distill_config_field_is_documented_once():
    documented = [name for name, *_ in GENERATOR["parameters"]()]
    assert sorted(documented) == sorted(GENERATOR["own_fields"]()) and len(set(documented)) == len(documented)


def test_relative_links_point_at_files():
    for page in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), ROOT / "benchmarks" / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"


def test_readme_stays_short_and_free_of_history():
    """A README for users: at most 250 lines, no issue numbers, no account of past runs or machines."""
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert not re.search(r"(issue|#)\s?#?\d{2}\b", text), re.search(r"(issue|#)\s?#?\d{2}\b", text)
