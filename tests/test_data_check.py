"""`cclm-jax data check` and `data prepare`: statistics, one line per problem, exit status."""
import json
import os
import subprocess
import sys
import textwrap

from cclm_jax.data import check
from cclm_jax.data.config import default_data_config
from tests import data_fixtures
from tests.conftest import REPO


def _tiny(cfg, data_dir):
    cfg.data_dir = str(data_dir)
    cfg.demo.update(image_size=32, num_train=20, num_val=8, num_parallel=24, vocab_size=300)
    return cfg


def test_check_reports_statistics_of_good_sources(tmp_path):
    cfg = _tiny(default_data_config(), tmp_path)
    reports, problems = check.check_config(cfg, sample=0)
    assert problems == []
    by_section = {r.section: r for r in reports}
    assert sorted(by_section) == ["eval", "image_caption", "parallel_text"]
    image = by_section["image_caption"]
    assert image.examples == 20 and set(image.languages) == {"en", "de", "fr", "es"}
    assert set(image.sizes) == {(32, 32)}
    assert min(image.tokens) >= 3 and len(image.tokens) == len(image.words) == sum(image.languages.values())
    text = "\n".join(image.lines())
    assert "image width: min 32" in text and "languages: de 20, en 20, es 20, fr 20" in text


def test_check_of_broken_inputs_lists_each_problem_with_locations(tmp_path):
    shards = data_fixtures.write_webdataset(tmp_path / "wds", shards=2, per_shard=6)
    cfg = _tiny(default_data_config(), tmp_path / "cache")
    cfg.image_caption.update(kind="img2dataset", paths=tuple(shards["paths"]))
    reports, problems = check.check_config(cfg, sample=0)
    assert reports[0].examples == 8 and reports[0].skipped == shards["skips"]
    expected = {"corrupt_image": "00000.tar:000000001", "invalid_json": "00001.tar:000010000",
                "missing_image": "00000.tar:000000003", "no_caption": "00000.tar:000000002"}
    assert len(problems) == 4
    for problem, (reason, where) in zip(problems, sorted(expected.items())):
        assert problem.startswith(f"image_caption: 1 record(s) skipped as {reason}; first: ") and where in problem


def _cli(*args, cwd=REPO):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-m", "cclm_jax", "data", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def test_cli_check_fails_on_broken_input_and_prepare_builds_it(tmp_path):
    shards = data_fixtures.write_webdataset(tmp_path / "wds", shards=1, per_shard=6)
    aligned = [tmp_path / "corpus.en", tmp_path / "corpus.de"]
    aligned[0].write_text("one\ntwo\nthree\n")
    aligned[1].write_text("eins\nzwei\n")
    config = tmp_path / "broken.py"
    config.write_text(textwrap.dedent(f"""
        from configs import demo
        def get_config(arg=None):
            config = demo.get_config()
            config.data.data_dir = {str(tmp_path / 'cache')!r}
            config.data.demo.update(image_size=32, num_train=20, num_val=8, num_parallel=24, vocab_size=300)
            config.data.image_caption.update(kind="img2dataset", paths=({shards['paths'][0]!r},))
            config.data.parallel_text.update(kind="aligned_text", paths=(({str(aligned[0])!r}, {str(aligned[1])!r}),))
            return config
    """))
    result = _cli("check", f"--config={config}")
    assert result.returncode == 1, result.stderr[-2000:]
    problems = [line for line in result.stderr.splitlines() if line.startswith("problem: ")]
    assert len(problems) == 4, result.stderr[-2000:]  # 3 broken samples, aligned files of different lengths
    assert sum("image_caption: 1 record(s) skipped as" in p for p in problems) == 3
    assert any("parallel_text: cannot read the source: aligned files differ in length" in p for p in problems)
    assert "image_caption (img2dataset: 1 file(s)): 3 examples read, 3 records skipped" in result.stdout

    aligned[1].write_text("eins\nzwei\ndrei\n")
    result = _cli("prepare", f"--config={config}", f"--prepared_dir={tmp_path / 'prepared'}", "--num_shards=2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--config.data.image_caption.tfds_name=cclm_image_caption/" in result.stdout
    infos = (tmp_path / "prepared" / "cclm_image_caption").glob("*/1.0.0/dataset_info.json")
    lengths = sorted(json.loads(info.read_text())["splits"][0]["shardLengths"] for info in infos)
    assert lengths == [["2", "1"], ["4", "4"]]  # the 3 usable samples and the 8 demo dev images, in 2 files each
    result = _cli("check", "--config=configs/demo.py", "--config.data.image_caption.kind=nonsense")
    assert result.returncode == 1 and "problem: config: config.data.image_caption.kind: must be one of" in result.stderr


def test_check_on_shared_data(shared_data_dir, tmp_path):
    from benchmarks.input_pipeline import config

    cfg = config(str(tmp_path), 0)
    reports, problems = check.check_config(cfg, sample=200)
    assert problems == [], problems
    assert all(r.examples == 200 for r in reports if r.section != "eval")
