"""Packaging: lazy subpackages, one version, the command line's options, the compilation cache."""

import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

import ppl
from ppl import cli


def test_subpackages_are_reachable_from_ppl_without_a_cycle():
    code = "import ppl; print(ppl.inference.smc.__name__, ppl.models.smollm2.__name__, ppl.plot.ess.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["smc", "smollm2", "ess"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        ppl.nope  # noqa: B018


def test_version_has_one_source():
    assert version("ppl-jax") == ppl.__version__


def test_cli_version_and_help_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"ppl-jax {ppl.__version__}"
    with pytest.raises(SystemExit):
        cli.main(["steer", "--help"])
    help_text = capsys.readouterr().out
    for flag in ("--no-letter e", "--regex", "--max-word-length 5", "--reward sentiment", "--json", "--seed"):
        assert flag in help_text, flag


@pytest.mark.parametrize("flag, value", [("--particles", "0"), ("--max-tokens", "0")])
def test_cli_rejects_empty_budgets(flag, value):
    with pytest.raises(SystemExit, match=flag):
        cli.main(["steer", "hi", flag, value])


def test_compilation_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("PPL_CACHE_DIR", str(tmp_path / "env"))
    assert ppl.default_cache_dir() == tmp_path / "env"
    monkeypatch.delenv("PPL_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert ppl.default_cache_dir() == tmp_path / "xdg" / "ppl-jax" / "jax"
    code = (
        "import jax, jax.numpy as jnp, ppl, sys; ppl.enable_compilation_cache(sys.argv[1]);"
        # write every entry, however quickly it compiled (the default keeps those over 0.1 s)
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0);"
        "jax.jit(lambda x: jnp.sin(x) @ x)(jnp.ones((4, 4))).block_until_ready()"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "given")], check=True)
    assert any((tmp_path / "given").iterdir()), "nothing was written to the compilation cache"
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="cannot create the compilation cache folder"):
        ppl.enable_compilation_cache(tmp_path / "file" / "sub")


def test_readme_links_stay_in_the_repository():
    root = Path(__file__).resolve().parent.parent
    targets = re.findall(r"\]\(([^)\s]+)\)", (root / "README.md").read_text(encoding="utf-8"))
    assert targets
    for target in targets:
        if target.startswith(("https://", "http://")):
            continue
        path = (root / target.split("#")[0]).resolve()
        assert path.is_relative_to(root) and path.exists(), f"README links to {target}, not a file of this repository"


def test_cli_report_says_how_each_answer_ended():
    answers = [
        {"text": "Calm sea.", "weight": 0.75, "count": 3, "ended_with_eos": True},
        {"text": "The big", "weight": 0.25, "count": 1, "ended_with_eos": False},
    ]
    report = {
        "prompt": "p", "all_dead": False, "answers": answers, "particles": 4, "log_z": -2.5, "ess": 3.2,
        "distinct_answers": 2, "steps": 8, "tokens_per_second": 40.0, "seconds": {"first_token": 1.5, "total": 3.0},
    }  # fmt: skip
    text = cli.format_report(report)
    assert "#1  weight 0.750  (3 particles, ended with EOS)\nCalm sea." in text
    assert "#2  weight 0.250  (1 particle, cut at --max-tokens)\nThe big" in text
    assert "log Z -2.50 | ESS 3.2/4" in text and text.endswith(cli.EXPLANATION)
