"""Tests for rwr_jax.data.demo: a deterministic synthetic set whose answers the corpus supports."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from rwr_jax.data import demo, records


def _contents(root):
    """Relative path -> bytes of every file under root."""
    files = {}
    for directory, _, names in os.walk(root):
        for name in names:
            path = os.path.join(directory, name)
            with open(path, "rb") as file:
                files[os.path.relpath(path, root)] = file.read()
    return files


def _rows(path):
    with open(path) as file:
        return [json.loads(line) for line in file]


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    return demo.generate_demo_data(tmp_path_factory.mktemp("mm"), num_train=24, num_eval=8, seed=3)


def test_same_arguments_same_bytes(tmp_path, multimodal):
    again = demo.generate_demo_data(tmp_path / "again", num_train=24, num_eval=8, seed=3)
    first, second = _contents(multimodal.root), _contents(again.root)
    assert first == second
    assert len([name for name in first if name.startswith("images")]) == 32
    other = demo.generate_demo_data(tmp_path / "other", num_train=24, num_eval=8, seed=4)
    assert _contents(other.root)["train.jsonl"] != first["train.jsonl"]


def test_rerun_in_place_is_idempotent(tmp_path):
    paths = demo.generate_demo_data(tmp_path, num_train=10, num_eval=2, seed=1)
    before = _contents(tmp_path)
    stamps = {name: os.stat(tmp_path / name).st_mtime_ns for name in before}
    assert demo.generate_demo_data(tmp_path, num_train=10, num_eval=2, seed=1) == paths
    assert _contents(tmp_path) == before
    assert {name: os.stat(tmp_path / name).st_mtime_ns for name in before} == stamps  # Untouched.
    demo.generate_demo_data(tmp_path, num_train=4, num_eval=2, seed=1)  # A smaller run drops stale images.
    assert sorted(os.listdir(paths.images_dir)) == [f"eval-0000{i}.png" for i in range(2)] + [
        f"train-0000{i}.png" for i in range(4)]


def _supporting_passages(passages, *facts):
    return [p for p in passages if all(fact in p["text"] for fact in facts)]


@pytest.mark.parametrize("modal", [True, False])
def test_answers_are_supported_by_the_corpus(tmp_path, multimodal, modal):
    paths = multimodal if modal else demo.generate_demo_data(tmp_path, num_train=24, num_eval=8, seed=3,
                                                              multimodal=False)
    conditions = {c.id: c for c in demo.make_conditions(24, 3)}
    passages = _rows(paths.corpus)
    for split in (paths.train, paths.eval):
        source = records.JsonlSource(split, records.RecordsConfig(validate_on_open=True))
        for index, row in enumerate(_rows(split)):
            record, condition = source[index], conditions[row["condition"]]
            assert len(record.options) == 4 and record.answer == f"{record.answer_letter}. {record.answer_text}"
            assert len(record.images) == (1 if modal else 0)
            kind = row["kind"]
            if kind in ("treatment", "image_treatment"):
                assert record.answer_text == condition.treatment
                assert _supporting_passages(passages, condition.name, condition.treatment)
            elif kind == "finding":
                assert record.answer_text == condition.finding
                assert _supporting_passages(passages, condition.name, condition.finding)
            else:  # The condition behind a finding (written in the question or drawn in the image).
                assert record.answer_text == condition.name
                assert _supporting_passages(passages, condition.name, condition.finding)
            if kind == "condition_from_finding":
                assert condition.finding in record.question
            wrong = [text for letter, text in record.options.items() if letter != record.answer_letter]
            assert record.answer_text not in wrong


def test_images_draw_the_finding(multimodal):
    conditions = {c.id: c for c in demo.make_conditions(24, 3)}
    for row in _rows(multimodal.train)[:12]:
        pixels = np.asarray(Image.open(os.path.join(multimodal.root, row["images"][0])).convert("RGB"))
        assert pixels.shape[0] in demo.SIDES and pixels.shape[1] in demo.SIDES
        color = demo.COLORS[conditions[row["condition"]].color]
        marked = np.all(pixels == color, axis=-1).mean()
        others = [np.all(pixels == c, axis=-1).mean() for c in demo.COLORS.values() if c != color]
        assert marked > 0.01 and max(others) == 0


def test_corpus_and_readme(multimodal):
    passages = _rows(multimodal.corpus)
    assert len(passages) == 3 * 24 and len({p["id"] for p in passages}) == 72
    assert all(set(p) == {"id", "title", "text"} for p in passages)
    assert "SYNTHETIC" in open(multimodal.readme).read()


def test_cdir_cases_solve_the_training_images(tmp_path, multimodal):
    from rwr_jax.retrieval import image_index  # pylint: disable=g-import-not-at-top
    train, cases = _rows(multimodal.train), _rows(multimodal.cases)
    assert [c["id"] for c in cases] == [f"case-{r['id']}" for r in train]
    conditions = {c.id: c for c in demo.make_conditions(24, seed=3)}
    for row, case in zip(train, cases):
        condition = conditions[row["condition"]]
        assert case["image"] == row["images"][0]
        assert case["caption"] == (f"Imaging shows {condition.finding}. Diagnosis: {condition.name}. First-line "
                                   f"treatment: {condition.treatment}.")
    corpus = image_index.ImageCorpus(multimodal.cases)  # the image index's case-corpus format
    assert len(corpus) == 24 and not corpus.missing_images()
    text_only = demo.generate_demo_data(tmp_path, num_train=4, num_eval=2, seed=3)
    assert os.path.isfile(text_only.cases)
    assert not os.path.exists(demo.generate_demo_data(tmp_path, num_train=4, num_eval=2, seed=3,
                                                      multimodal=False).cases)


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="num_conditions must be in 4..80, got 2"):
        demo.generate_demo_data(tmp_path, num_conditions=2)
    with pytest.raises(ValueError, match="num_train must be an int >= 0, got -1"):
        demo.generate_demo_data(tmp_path, num_train=-1)
