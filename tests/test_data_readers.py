"""Annotation readers on generated fixtures of every format and, when present, on the real IGLUE files."""
import json
import os

import numpy as np
import pytest

from cclm_jax.data import annotations, iglue, retrieval_sets


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def touch(*paths):
    for p in paths:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        open(p, "wb").close()


# ----------------------------------------------------------------------------------------------------
# Retrieval
# ----------------------------------------------------------------------------------------------------
def test_xflickrco_jsonl_layout_coco_routing_and_empty_skip(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", [
        {"sentences": ["ein Hund", "zwei Hunde"], "id": "111", "img_path": "111.jpg"},
        {"sentences": ["", ""], "id": "222", "img_path": "222.jpg"},
        {"sentences": ["eine Katze"], "id": 333, "img_path": "COCO_val2014_000000000333.jpg"},
    ])
    roots = {"flickr30k": str(tmp_path / "f30k"), "coco": str(tmp_path / "coco")}
    got = retrieval_sets.read_retrieval_jsonl(path, roots, language="de")
    assert got.language == "de" and got.source == str(path)
    assert [i.image_id for i in got.images] == ["111", "333"]
    assert got.image_paths == [os.path.join(roots["flickr30k"], "111.jpg"),
                               os.path.join(roots["coco"], "COCO_val2014_000000000333.jpg")]
    assert got.texts == ["ein Hund", "zwei Hunde", "eine Katze"]
    assert got.txt2img.tolist() == [0, 0, 1]
    assert [a.tolist() for a in got.img2txt] == [[0, 1], [2]]
    with pytest.raises(annotations.AnnotationError, match=r"needs image_root\['coco'\]"):
        retrieval_sets.read_retrieval_jsonl(path, {"flickr30k": "x"})


def test_missing_images_are_reported_with_their_paths(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [
        {"sentences": ["a"], "id": "1", "img_path": "1.jpg"},
        {"sentences": ["b"], "id": "2", "img_path": "2.jpg"},
        {"sentences": ["c"], "id": "3", "img_path": "3.jpg"},
    ])
    touch(str(tmp_path / "img" / "2.jpg"))
    retrieval_sets.read_retrieval_jsonl(path, tmp_path / "img")  # not checked by default
    with pytest.raises(FileNotFoundError) as err:
        retrieval_sets.read_retrieval_jsonl(path, tmp_path / "img", check_images=True)
    message = str(err.value)
    assert "2 of 3 images" in message and str(path) in message
    assert str(tmp_path / "img" / "1.jpg") in message and str(tmp_path / "img" / "3.jpg") in message
    paths = [str(tmp_path / "img" / "2.jpg"), "/no/such.jpg", "/no/such.jpg"]
    assert annotations.missing_images(paths) == ["/no/such.jpg"]
    touch(str(tmp_path / "img" / "1.jpg"), str(tmp_path / "img" / "3.jpg"))
    assert len(retrieval_sets.read_retrieval_jsonl(path, tmp_path / "img", check_images=True).images) == 3


@pytest.mark.parametrize("line,where,field,problem", [
    ('{"sentences": ["a"], "id": "1", "img_path": "1.jpg"', "line 2", None, "invalid JSON"),
    ('{"id": "1", "img_path": "1.jpg"}', "line 2", "sentences", "missing"),
    ('{"sentences": "a", "id": "1", "img_path": "1.jpg"}', "line 2", "sentences", "expected list"),
    ('{"sentences": ["a", 7], "id": "1", "img_path": "1.jpg"}', "line 2", "sentences", "item 1 must be a string"),
    ('{"sentences": ["a"], "id": "1", "img_path": null}', "line 2", "img_path", "expected str"),
    ('["a"]', "line 2", None, "expected a JSON object"),
])
def test_malformed_jsonl_names_file_line_and_field(tmp_path, line, where, field, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"sentences": ["ok"], "id": "0", "img_path": "0.jpg"}\n' + line + "\n")
    with pytest.raises(annotations.AnnotationError, match=problem) as err:
        retrieval_sets.read_retrieval_jsonl(path, tmp_path)
    assert err.value.path == str(path) and err.value.where == where and err.value.field == field
    assert str(path) in str(err.value) and where in str(err.value)


def test_wit_groups_captions_by_url(tmp_path):
    url_a = "https://upload.wikimedia.org/wikipedia/commons/2/21/Baumol_%2C_1968.tif"
    url_b = "http://upload.wikimedia.org/wikipedia/commons/4/42/B.JPG"
    path = write_jsonl(tmp_path / "test_da.jsonl", [
        {"image_url": url_a, "caption_reference_description": "første", "language": "da"},
        {"image_url": url_b, "caption_reference_description": "", "language": "da"},
        {"image_url": url_b, "caption_reference_description": "anden", "language": "da", "image_content": "QUJD"},
        {"image_url": url_a, "caption_reference_description": "tredje", "language": "da"},
    ])
    got = retrieval_sets.read_wit_jsonl(path, tmp_path)
    assert got.language == "da"
    assert [i.image_id for i in got.images] == [url_a, url_b]
    assert [i.captions for i in got.images] == [("første", "tredje"), ("anden",)]
    assert got.images[0].image_path == str(tmp_path / "Baumol_,_1968.tif")
    assert got.images[1].image_b64 == "QUJD"
    assert got.txt2img.tolist() == [0, 0, 1]
    with pytest.raises(FileNotFoundError, match=r"1 of 1 images"):  # the embedded image is not looked up
        retrieval_sets.read_wit_jsonl(path, tmp_path, check_images=True)
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [
        {"image_url": url_a, "caption_reference_description": "a", "language": "da"},
        {"image_url": url_b, "caption_reference_description": "b", "language": "et"}])
    with pytest.raises(annotations.AnnotationError, match=r"mixes languages \['da', 'et'\]"):
        retrieval_sets.read_wit_jsonl(mixed, tmp_path)


def test_cclm_retrieval_json_eval_and_train_layouts(tmp_path):
    evaluation = tmp_path / "test_2016_flickr.fr.json"
    evaluation.write_text(json.dumps([{"image": "flickr30k-images/1.jpg", "caption": ["un chien", "le chien"]},
                                      {"image": "flickr30k-images/2.jpg", "caption": ["un chat"]}]))
    got = retrieval_sets.read_cclm_retrieval_json(evaluation, "/data/images", language="fr")
    assert got.image_paths == ["/data/images/flickr30k-images/1.jpg", "/data/images/flickr30k-images/2.jpg"]
    assert [a.tolist() for a in got.img2txt] == [[0, 1], [2]]
    train = tmp_path / "train.fr.json"
    train.write_text(json.dumps([{"image": "a.jpg", "caption": "x", "image_id": 0},
                                 {"image": "b.jpg", "caption": "y", "image_id": 1},
                                 {"image": "a.jpg", "caption": "z", "image_id": 0}]))
    got = retrieval_sets.read_cclm_retrieval_json(train, "/r")
    assert [i.captions for i in got.images] == [("x", "z"), ("y",)]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"image": "a.jpg", "caption": ["x"]}, {"image": "b.jpg", "caption": 3}]))
    with pytest.raises(annotations.AnnotationError, match=r"bad.json, record 1, field 'caption': expected str or list"):
        retrieval_sets.read_cclm_retrieval_json(bad, "/r")
    (tmp_path / "broken.json").write_text('[{"image": "a.jpg",\n "caption": ]')
    with pytest.raises(annotations.AnnotationError, match=r"broken.json, line 2.*invalid JSON"):
        retrieval_sets.read_cclm_retrieval_json(tmp_path / "broken.json", "/r")


def flickr8k_record(flickr_id):
    return {"image": f"images/{flickr_id}_x.jpg", "flickr_id": flickr_id, "multi30k_split": "val",
            "multi30k_task1": {"en": f"dog {flickr_id}", "de": f"Hund {flickr_id}", "fr": "chien", "cs": "pes"},
            "multi30k_task2": {"en": ["e1", "e2"], "de": ["d1", "d2"]},
            "flickr8k_en": ["c1", "c2", "c3"], "flickr8kcn_zh": ["狗", "小狗"]}


def test_flickr8k_languages_and_fields(tmp_path):
    path = write_jsonl(tmp_path / "val.jsonl", [flickr8k_record("1"), flickr8k_record("2")])
    de = retrieval_sets.read_flickr8k(path, tmp_path, "de")
    assert de.texts == ["Hund 1", "Hund 2"] and de.language == "de"
    assert de.image_paths[0] == str(tmp_path / "images" / "1_x.jpg")
    assert retrieval_sets.read_flickr8k(path, tmp_path, "zh").texts == ["狗", "小狗", "狗", "小狗"]
    assert retrieval_sets.read_flickr8k(path, tmp_path, "de", field="multi30k_task2").txt2img.tolist() == [0, 0, 1, 1]
    assert len(retrieval_sets.read_flickr8k(path, tmp_path, "en", field="flickr8k_en").texts) == 6
    with pytest.raises(ValueError, match="holds only 'en' captions"):
        retrieval_sets.read_flickr8k(path, tmp_path, "de", field="flickr8k_en")
    with pytest.raises(annotations.AnnotationError, match=r"line 1, field 'multi30k_task2': no 'fr' captions"):
        retrieval_sets.read_flickr8k(path, tmp_path, "fr", field="multi30k_task2")


# ----------------------------------------------------------------------------------------------------
# XVNLI, MaRVL, NLVR2
# ----------------------------------------------------------------------------------------------------
def test_xvnli_labels_and_no_consensus_skip(tmp_path):
    rows = [("contradiction", "c"), ("entailment", "e"), ("-", "x"), ("neutral", "n")]
    path = write_jsonl(tmp_path / "test.jsonl", [
        {"gold_label": g, "sentence1": "p", "sentence2": h, "Flikr30kID": "42", "pairID": f"42#{i}"}
        for i, (g, h) in enumerate(rows)])
    got = iglue.read_xvnli_jsonl(path, tmp_path, language="fr")
    assert [(e.hypothesis, e.label) for e in got] == [("c", 0), ("e", 1), ("n", 2)]
    assert got[0].image_path == str(tmp_path / "42.jpg") and got[2].pair_id == "42#3"
    assert got[0].language == "fr" and got[0].premise == "p"
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"gold_label": "entailed", "sentence2": "h", "Flikr30kID": "1"}])
    with pytest.raises(annotations.AnnotationError, match=r"line 1, field 'gold_label': 'entailed' is not one of"):
        iglue.read_xvnli_jsonl(bad, tmp_path)
    no_hyp = write_jsonl(tmp_path / "nohyp.jsonl", [{"gold_label": "neutral", "Flikr30kID": "1"}])
    with pytest.raises(annotations.AnnotationError, match=r"field 'sentence2': missing"):
        iglue.read_xvnli_jsonl(no_hyp, tmp_path)


def marvl_record(i, label, left="39-Panci/39-n-5.jpg"):
    return {"concept": "39-Panci", "language": "id", "caption": f"kalimat {i}", "left_img": left,
            "right_img": "39-2.jpg", "id": f"id-{i}", "label": label}


def test_marvl_layouts_and_labels(tmp_path):
    path = write_jsonl(tmp_path / "marvl-id.jsonl", [marvl_record(0, True), marvl_record(1, False)])
    zero = iglue.read_marvl_jsonl(path, "/m")
    assert [e.label for e in zero] == [1, 0] and zero[1].example_id == "id-1"
    assert zero[0].image_paths == ("/m/id/images/39-Panci/39-Panci/39-n-5.jpg", "/m/id/images/39-Panci/39-2.jpg")
    few = iglue.read_marvl_jsonl(path, "/m", layout="few_shot")
    assert few[0].image_paths == ("/m/id/all/39-n-5.jpg", "/m/id/all/39-2.jpg")
    bad = write_jsonl(tmp_path / "bad.jsonl", [marvl_record(0, True), marvl_record(1, 1)])
    with pytest.raises(annotations.AnnotationError, match=r"line 2, field 'label'"):
        iglue.read_marvl_jsonl(bad, "/m")
    with pytest.raises(ValueError, match="unknown MaRVL image layout"):
        iglue.read_marvl_jsonl(path, "/m", layout="flat")


def test_nlvr_json(tmp_path):
    path = tmp_path / "nlvr_dev.json"
    path.write_text(json.dumps([{"images": ["dev/a-img0.png", "dev/a-img1.png"], "sentence": "s", "label": "True"},
                                {"images": ["dev/b-img0.png", "dev/b-img1.png"], "sentence": "t", "label": False}]))
    got = iglue.read_nlvr_json(path, "/nlvr2", language="en")
    assert [e.label for e in got] == [1, 0]
    assert got[0].image_paths == ("/nlvr2/dev/a-img0.png", "/nlvr2/dev/a-img1.png")
    path.write_text(json.dumps([{"images": ["only-one.png"], "sentence": "s", "label": "True"}]))
    with pytest.raises(annotations.AnnotationError, match=r"record 0, field 'images': expected 2 image paths, got 1"):
        iglue.read_nlvr_json(path, "/nlvr2")


# ----------------------------------------------------------------------------------------------------
# GQA / xGQA
# ----------------------------------------------------------------------------------------------------
def test_gqa_object_and_list_layouts(tmp_path):
    xgqa = tmp_path / "test.json"
    xgqa.write_text(json.dumps({"201640614": {"imageId": "n235859", "question": "Wer?", "answer": "women"},
                                "7": {"imageId": "n1", "question": "Was?"}}))
    got = iglue.read_gqa_json(xgqa, "/gqa", language="de")
    assert [(e.question_id, e.image_path, e.answer) for e in got] == [
        ("201640614", "/gqa/n235859.jpg", "women"), ("7", "/gqa/n1.jpg", None)]
    assert got[0].answers == ("women",) and got[1].answers == ()
    gqa = tmp_path / "train.json"
    gqa.write_text(json.dumps([{"question_id": "07333408", "img_id": "2375429", "sent": "What?",
                                "label": {"pipe": 0.3, "tube": 1.0}},
                               {"question_id": "1", "img_id": "2", "sent": "Why?", "label": {}}]))
    got = iglue.read_gqa_json(gqa, "/gqa")
    assert got[0].answer == "tube" and got[0].answers == ("pipe", "tube") and got[1].answer is None
    gqa.write_text(json.dumps([{"question_id": "1", "img_id": "2", "sent": "Why?", "label": {"x": "high"}}]))
    with pytest.raises(annotations.AnnotationError, match=r"record 0, field 'label.x': score must be a number"):
        iglue.read_gqa_json(gqa, "/gqa")
    xgqa.write_text(json.dumps({"5": {"imageId": "n1", "answer": "no"}}))
    with pytest.raises(annotations.AnnotationError, match=r"question '5', field 'question': missing"):
        iglue.read_gqa_json(xgqa, "/gqa")


def test_answer_list_keeps_file_order(tmp_path):
    path = tmp_path / "ans2label.json"
    path.write_text('{"puddle": 1, "soap": 0, "water glass": 2}')
    assert iglue.read_answer_list(path) == ["puddle", "soap", "water glass"]
    path.write_text('{"a": 0, "b": 0}')
    with pytest.raises(annotations.AnnotationError, match="label id 0 already used by 'a'"):
        iglue.read_answer_list(path)


def test_iglue_paths():
    root = "/iglue"
    assert iglue.iglue_annotation_path(root, "xFlickrCO", "ja", shots="100x5") == \
        "/iglue/xFlickrCO/annotations/ja/train_100x5.jsonl"
    assert iglue.iglue_annotation_path(root, "wit", "ko", translate_test=True) == \
        "/iglue/wit/annotations_machine-translate/test_ko_gmt.jsonl"
    assert iglue.iglue_annotation_path(root, "xvnli", "ru") == "/iglue/XVNLI/annotations/ru/test.jsonl"
    assert iglue.iglue_annotation_path(root, "marvl", "ta", translate_test=True) == \
        "/iglue/marvl/zero_shot/annotations_machine-translate/marvl-ta_gmt.jsonl"
    assert iglue.iglue_annotation_path(root, "xgqa", "pt", "dev") == "/iglue/xGQA/annotations/few_shot/pt/dev.json"
    with pytest.raises(ValueError, match="no translate-test layout is known for xGQA"):
        iglue.iglue_annotation_path(root, "xgqa", "pt", translate_test=True)
    with pytest.raises(ValueError, match="has no split 'dev'"):
        iglue.iglue_annotation_path(root, "marvl", "id", "dev")
    with pytest.raises(ValueError, match="unknown IGLUE task 'vqa'"):
        iglue.iglue_annotation_path(root, "vqa", "id")


# ----------------------------------------------------------------------------------------------------
# Real IGLUE files (skipped without ../shared/data)
# ----------------------------------------------------------------------------------------------------
def count_lines(path, keep=lambda record: True):
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip() and keep(json.loads(line)))


def test_real_wit(shared_data_dir):
    iglue_root = shared_data_dir / "iglue"
    expected_images = {"ar": 792, "bg": 806, "da": 814, "el": 541, "en": 685, "et": 780, "id": 854,
                       "ja": 842, "ko": 889, "tr": 681, "vi": 869}
    for lang, n_images in expected_images.items():
        got = iglue.read_iglue(iglue_root, "wit", lang, "/wit-images")
        assert got.language == lang and len(got.images) == n_images
        assert len(got.texts) == count_lines(iglue.iglue_annotation_path(iglue_root, "wit", lang))
    assert len(iglue.read_iglue(iglue_root, "wit", "en", "/w", "valid").images) == 4632


def test_real_xflickrco_and_flickr30k(shared_data_dir):
    iglue_root = shared_data_dir / "iglue"
    valid = iglue.read_iglue(iglue_root, "xflickrco", "en", "/f30k", "valid")
    assert len(valid.images) == 1014 and len(valid.texts) == 5070
    for lang in ("de", "es", "id", "ja", "ru", "tr", "zh"):
        for shots in (1, 5, 10, 25, 50, 100):
            got = iglue.read_iglue(iglue_root, "xflickrco", lang, "/f30k", shots=shots)
            assert len(got.images) == shots and len(got.texts) == shots and got.language == lang
    five = iglue.read_iglue(iglue_root, "xflickrco", "de", "/f30k", shots="100x5")
    assert len(five.images) == 100 and len(five.texts) == 500


def test_real_xvnli(shared_data_dir):
    iglue_root = shared_data_dir / "iglue"
    for lang in ("ar", "en", "es", "fr", "ru"):
        for shots in (1, 5, 10, 20, 25, 48):
            got = iglue.read_iglue(iglue_root, "xvnli", lang, "/f30k", shots=shots)
            path = iglue.iglue_annotation_path(iglue_root, "xvnli", lang, shots=shots)
            assert len(got) == count_lines(path, lambda r: r["gold_label"] != "-")
            assert {e.label for e in got} <= {0, 1, 2}
    assert {e.label for e in iglue.read_iglue(iglue_root, "xvnli", "en", "/f", shots=48)} == {0, 1, 2}


def test_real_marvl(shared_data_dir):
    iglue_root = shared_data_dir / "iglue"
    sizes = {"id": 1128, "sw": 1108, "ta": 1242, "tr": 1180, "zh": 1012}
    for lang, size in sizes.items():
        native = iglue.read_iglue(iglue_root, "marvl", lang, "/marvl")
        translated = iglue.read_iglue(iglue_root, "marvl", lang, "/marvl", translate_test=True)
        assert len(native) == len(translated) == size
        assert {e.language for e in native} == {lang} and {e.label for e in native} == {0, 1}
        assert [(e.image_paths, e.label) for e in native] == [(e.image_paths, e.label) for e in translated]
        assert native[0].sentence != translated[0].sentence
    for lang in ("id", "tr", "zh"):
        for shots, size in (("1", 4), ("2", 8), ("4", 16), ("10", 40), ("10x2", 80)):
            few = iglue.read_iglue(iglue_root, "marvl", lang, "/marvl", shots=shots)
            assert len(few) == size and few[0].image_paths[0].startswith(f"/marvl/{lang}/all/")


def test_real_xgqa_and_answer_list(shared_data_dir):
    iglue_root = shared_data_dir / "iglue"
    answers = iglue.read_answer_list(iglue_root / "gqa" / "annotations" / "trainval_ans2label.json")
    assert len(answers) == len(set(answers)) == 1842
    with open(iglue_root / "gqa" / "annotations" / "trainval_label2ans.json") as f:
        assert set(json.load(f)) == set(answers)
    known = set(answers)
    for lang in ("bn", "de", "en", "id", "ko", "pt", "ru", "zh"):
        dev = iglue.read_iglue(iglue_root, "xgqa", lang, "/gqa", "dev")
        assert len(dev) == 1422 and all(e.answer in known for e in dev)
        assert len(iglue.read_iglue(iglue_root, "xgqa", lang, "/gqa", shots=1)) == 27


def test_real_flickr8k_images_exist(shared_data_dir):
    root = shared_data_dir / "flickr8k"
    for lang, n_texts in (("en", 237), ("de", 237), ("fr", 237), ("cs", 237), ("zh", 1185)):
        got = retrieval_sets.read_flickr8k(root / "val.jsonl", root, lang, check_images=True)
        assert len(got.images) == 237 and len(got.texts) == n_texts
    five_each = retrieval_sets.read_flickr8k(root / "val.jsonl", root, "en", field="flickr8k_en")
    assert np.bincount(five_each.txt2img).tolist() == [5] * 237
