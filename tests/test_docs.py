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


def test_make_installs_torch_first_with_the_readmes_torch_args(tmp_path):
    """`make` installs torch 2.13.0 before anything that depends on it, passing `TORCH_PIP_ARGS` (what the README
    says selects the CPU build from stock PyPI) to that install only."""
    import subprocess

    args = "--index-url https://download.pytorch.org/whl/cpu"
    out = subprocess.run(
        ["make", "-n", "install", f"VENV={tmp_path / 'venv'}", f"TORCH_PIP_ARGS={args}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    installs = [line for line in out.splitlines() if " pip install " in line and "--upgrade pip" not in line]
    assert "torch==2.13.0" in installs[0] and installs[0].endswith(args)
    assert all(args not in line for line in installs[1:]) and '-e ".[test,demo]"' in installs[1]
    assert f'`TORCH_PIP_ARGS="{args}"`' in " ".join((ROOT / "README.md").read_text().split())
