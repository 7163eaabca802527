"""`fastat info`: as a module (subprocess) and through fastat.cli.main."""
import os
import subprocess
import sys

import pytest
import torch

import fastat
from fastat import cli
from fastat._backend import BACKENDS


def check_info(text):
    assert f"fastat   {fastat.__version__}" in text
    assert f"torch    {torch.__version__}" in text
    assert "triton" in text and "python" in text and "device" in text
    assert "backends:" in text
    for name in BACKENDS:
        ok, why = fastat.backend_status(name)
        assert f"  {name:<7} {'yes' if ok else 'no ':<4} {why}" in text, name
    assert "kernels per op:" in text
    for op in ("noisy_input", "pgd_step", "equivariant_mse"):
        assert op in text


def test_info_subprocess():
    env = dict(os.environ, FASTAT_BACKEND="torch")
    res = subprocess.run([sys.executable, "-m", "fastat", "info"], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    check_info(res.stdout)
    assert "backend  torch" in res.stdout  # the environment variable is reported


def test_info_main(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    check_info(out)
    assert f"backend  {fastat.get_backend()}" in out


def test_cli_needs_a_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    assert "info" in capsys.readouterr().out


def test_version_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastat {fastat.__version__}"


def test_subcommand_defaults_write_outside_the_source_tree():
    parser = cli.build_parser()
    for argv in (["demo"], ["bench"], ["experiment", "digits"]):
        out = parser.parse_args(argv).out
        assert not out.startswith(("benchmarks", "fastat/", "/")), (argv, out)
    with pytest.raises(SystemExit) as exc:  # a bad flag value: argparse's one-line error, exit status 2
        cli.main(["experiment", "digits", "--seeds", "0"])
    assert exc.value.code == 2
