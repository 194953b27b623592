"""Result reports: JSON round trip, markdown rows and averages, PNG charts, input validation."""
import json
import struct

import numpy as np
import pytest

from cclm_jax.evaluation import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

RESULTS = {
    "xflickrco": {
        "en": {"txt_r1": 60.0, "txt_r5": 80.0, "txt_r10": 90.0, "txt_r_mean": 76.6667,
               "img_r1": 50.0, "img_r5": 70.0, "img_r10": 80.0, "img_r_mean": 66.6667, "r_mean": 71.6667},
        "de": {"txt_r1": 40.0, "txt_r5": 60.0, "txt_r10": 70.0, "txt_r_mean": 56.6667,
               "img_r1": 30.0, "img_r5": 50.0, "img_r10": 60.0, "img_r_mean": 46.6667, "r_mean": 51.6667},
        "ja": {"txt_r1": 20.0, "txt_r5": 40.0, "txt_r10": 50.0, "txt_r_mean": 36.6667,
               "img_r1": 10.0, "img_r5": 30.0, "img_r10": 40.0, "img_r_mean": 26.6667, "r_mean": 31.6667},
    },
    "xvnli": {"en": {"acc": 58.5}, "ar": {"acc": 40.25}, "fr": {"acc": 49.75}, "ru": {"acc": 45.0}},
    "multi30k": {"en": {"r_mean": 80.0}, "de": {"r_mean": 70.0}},
}


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def table_rows(markdown, task):
    section = markdown.split(f"## {task}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and not line.startswith("| language")]
    return {row.split("|")[1].strip(): [c.strip() for c in row.split("|")[2:-1]] for row in rows}


def test_write_results_files_and_json_round_trip(tmp_path):
    written = report.write_results(RESULTS, tmp_path / "out")
    out = tmp_path / "out"
    assert written["json"] == str(out / "results.json") and written["markdown"] == str(out / "results.md")
    assert json.loads((out / "results.json").read_text()) == RESULTS
    assert report.read_results(out) == RESULTS
    for task in RESULTS:
        width, height = png_size(out / f"{task}.png")
        assert width > 100 and height > 100 and written[f"chart:{task}"] == str(out / f"{task}.png")


def test_numpy_scalars_are_written_as_floats(tmp_path):
    report.write_results({"xgqa": {"de": {"acc": np.float32(41.5)}, "en": {"acc": np.int64(60)}}}, tmp_path)
    assert report.read_results(tmp_path / "results.json") == {"xgqa": {"de": {"acc": 41.5}, "en": {"acc": 60.0}}}


def test_markdown_rows_and_iglue_averages(tmp_path):
    report.write_results(RESULTS, tmp_path)
    markdown = (tmp_path / "results.md").read_text()
    rows = table_rows(markdown, "xflickrco")
    assert list(rows) == ["en", "de", "ja", "**avg (excl. en)**"]
    header = next(line for line in markdown.split("## xflickrco", 1)[1].splitlines() if line.startswith("| language"))
    assert [c.strip() for c in header.split("|")[2:-1]] == list(report.RETRIEVAL_ORDER)
    assert rows["**avg (excl. en)**"][0] == "30.00"  # txt_r1 mean of de, ja
    assert rows["**avg (excl. en)**"][-1] == "41.67"  # r_mean mean of de, ja
    assert rows["de"][0] == "40.00"
    xvnli = table_rows(markdown, "xvnli")
    assert list(xvnli) == ["en", "ar", "fr", "ru", "**avg (excl. en)**"]
    assert xvnli["**avg (excl. en)**"] == ["45.00"]
    multi30k = table_rows(markdown, "multi30k")
    assert multi30k["**avg (all)**"] == ["75.00"]


def test_missing_metric_cells_and_averages():
    per_language = {"en": {"acc": 70.0, "consistency": 10.0}, "id": {"acc": 50.0}, "zh": {"acc": 60.0}}
    rows = table_rows(report.markdown_table("marvl", per_language), "marvl")
    assert rows["id"] == ["50.00", "-"]
    assert rows["**avg (excl. en)**"] == ["55.00", "-"]  # consistency only has English
    assert report.task_averages("marvl", per_language) == {"acc": 55.0}
    assert report.chart_metrics(per_language) == ["acc"]
    assert report.chart_metrics(RESULTS["xflickrco"]) == ["txt_r1", "img_r1", "r_mean"]


@pytest.mark.parametrize("results,match", [
    ({}, "non-empty mapping"),
    ({"../x": {"en": {"acc": 1.0}}}, "task name '../x'"),
    ({"xvnli": {}}, r"results\['xvnli'\] must be a non-empty mapping"),
    ({"xvnli": {"en": {"acc": float("nan")}}}, r"results\['xvnli'\]\['en'\]\['acc'\] = nan is not a finite number"),
    ({"xvnli": {"en": {"acc": "50"}}}, r"\['acc'\] = '50' is not a finite number"),
    ({"xvnli": {"en": {}}}, r"results\['xvnli'\]\['en'\] must be a non-empty mapping"),
])
def test_bad_results_are_rejected(tmp_path, results, match):
    with pytest.raises(ValueError, match=match):
        report.write_results(results, tmp_path)
    assert not (tmp_path / "results.json").exists()
