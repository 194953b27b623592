"""The `cclm-jax` entry point in process: `info` on every config file (and the arguments they document), and
user errors as one `error:` line with exit status 2 (a traceback only when asked for)."""
import pathlib
import random
import re
import sys

import pytest
from absl import flags

from cclm_jax import main
from cclm_jax.data.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.py"))
DOCUMENTED_ARGS = ["configs/tiny.py:micro", "configs/tiny.py:small", "configs/cclm_base.py:runlocal",
                   "configs/finetune/flickr8k.py:tiny"]


@pytest.fixture(autouse=True)
def fresh_flags(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("CCLM_TRACEBACK", raising=False)
    yield
    for name in [n for n in flags.FLAGS if n.startswith("config.")]:  # config overrides register per parse
        delattr(flags.FLAGS, name)
    flags.FLAGS.unparse_flags()


def run_cli(monkeypatch, *args) -> None:
    """`cclm-jax ARGS` through the console-script entry point (config overrides are read from sys.argv)."""
    monkeypatch.setattr(sys, "argv", ["cclm-jax", *args])
    main.run()


@pytest.fixture()
def cli(monkeypatch):
    """cli(*args) -> the exit status of `cclm-jax ARGS`."""
    def call(*args) -> int:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(monkeypatch, *args)
        return exit_info.value.code or 0
    return call


def test_every_config_file_is_covered():
    assert len(CONFIGS) >= 11 and "configs/demo.py" in CONFIGS and "configs/finetune/xgqa.py" in CONFIGS


@pytest.mark.parametrize("config", CONFIGS + DOCUMENTED_ARGS)
def test_info_runs_on_every_config(config, cli, capsys):
    assert cli("info", f"--config={config}") == 0
    out = capsys.readouterr().out
    assert re.search(r"^total parameters: \d+", out, re.M), out
    assert "GFLOPs/example" in out or "FLOPs: not modelled for the fine-tuning task" in out


def test_info_resolves_the_vocabulary_from_a_readable_tokenizer(tmp_path, cli, capsys):
    assert cli("info", "--config=configs/tiny.py:micro", "--config.data.data_dir=" + str(tmp_path)) == 0
    unresolved = capsys.readouterr().out
    base, per_entry = map(int, re.search(r"^total parameters: (\d+) \+ (\d+) x vocab$", unresolved, re.M).groups())
    assert "vocab unresolved" in unresolved
    tokenizer = Tokenizer.train(["a dog runs on the grass", "two cats sleep"] * 20, tmp_path / "spm", vocab_size=60)
    assert cli("info", "--config=configs/tiny.py:micro", f"--config.data.tokenizer={tokenizer.model_path}") == 0
    resolved = capsys.readouterr().out
    assert f"total parameters: {base + per_entry * tokenizer.vocab_size}\n" in resolved
    assert "vocab unresolved" not in resolved


def test_user_errors_print_one_line_and_exit_2(tmp_path, cli, capsys, monkeypatch):
    missing = tmp_path / "missing.th"
    assert cli("import", f"--checkpoint={missing}", f"--workdir={tmp_path / 'run'}") == 2
    err = capsys.readouterr().err
    assert err == f"error: {missing}: no such checkpoint file\n"

    noise = tmp_path / "noise.model"
    noise.write_bytes(random.Random(0).randbytes(4096))
    assert cli("info", "--config=configs/tiny.py:micro", f"--config.data.tokenizer={noise}") == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: config\.data\.tokenizer: '.*noise\.model' is not a SentencePiece model \(.*\)\n", err)

    monkeypatch.setenv("CCLM_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        run_cli(monkeypatch, "import", f"--checkpoint={missing}", f"--workdir={tmp_path / 'run'}")
    monkeypatch.delenv("CCLM_TRACEBACK")
    with pytest.raises(FileNotFoundError, match="no such checkpoint file"):
        run_cli(monkeypatch, "import", f"--checkpoint={missing}", f"--workdir={tmp_path / 'run'}", "--verbosity=1")
