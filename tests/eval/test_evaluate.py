"""Evaluation: answers scored by hand, unique ids, and the demo run resumed after a crash."""

import json
import os

import jax
import numpy as np
import pytest

from configs import eval as eval_config
from rwr_jax.data import records
from rwr_jax.eval import evaluate, predictions
from rwr_jax.rl import parser
from tests.rl.test_parser import ANSWER, EOS, PASSAGE, QUERY, SEARCH, THINK, make_trajectory, row

ONE_DEVICE = jax.devices()[:1]
TRUTH = parser.GroundTruth(1, "Bacterial pneumonia", False, "B. Bacterial pneumonia")


def fields(segments, truth=TRUTH, probability=0.8):
    """answer_fields of one completion whose answer's first token has `probability`."""
    parsed = row(segments)[0]
    logprobs = np.full(make_trajectory(segments).tokens.shape[1], np.log(0.5), np.float32)
    if parsed.answer_token_index >= 0:
        logprobs[parsed.answer_token_index] = np.log(probability)
    return evaluate.answer_fields(parsed, logprobs, truth)


def test_answers_scored_by_hand():
    assert fields(SEARCH) == {"prediction": "B. Bacterial pneumonia", "letter": "B", "correct": True,
                              "confidence": pytest.approx(0.8)}
    wrong = fields([("m", THINK + "<answer> c) Viral </answer>" + EOS)], probability=0.25)
    assert wrong == {"prediction": "c) Viral", "letter": "", "correct": False, "confidence": pytest.approx(0.25)}
    other = fields([("m", THINK + "<answer>C. Viral pneumonia</answer>" + EOS)])
    assert (other["letter"], other["correct"]) == ("C", False)
    assert fields([("m", THINK + "<answer>b</answer>" + EOS)])["correct"]  # the letter alone, any case
    assert fields([("m", THINK + QUERY)]) == {"prediction": None, "letter": "", "correct": False, "confidence": None}


def test_an_answer_inside_a_retrieved_passage_is_not_the_models():
    tagged = "<retrieve> (1) Quiz key: <answer>B. Bacterial pneumonia</answer>\n </retrieve>"
    result = fields([("m", THINK + QUERY), ("e", tagged), ("m", "<think>Unsure.</think>" + EOS)])
    assert result == {"prediction": None, "letter": "", "correct": False, "confidence": None}
    answered = fields([("m", THINK + QUERY), ("e", PASSAGE), ("m", ANSWER + EOS)])
    assert answered["correct"] and answered["prediction"] == "B. Bacterial pneumonia"


def test_free_text_answers_match_exactly_ignoring_case_and_spaces():
    truth = parser.GroundTruth(-1, "community acquired pneumonia", True, "community acquired pneumonia")
    assert fields([("m", "<answer> Community  acquired Pneumonia </answer>")], truth)["correct"]
    assert not fields([("m", "<answer>community-acquired pneumonia</answer>")], truth)["correct"]


def test_repeated_ids_are_refused_naming_both_lines(tmp_path):
    path = tmp_path / "test.jsonl"
    rows = [{"id": i, "question": "Q?\nA. x\nB. y", "answer": "A. x", "images": []} for i in (1, 2, 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    source = records.JsonlSource(str(path))
    with pytest.raises(ValueError, match=r"test.jsonl:3: record id '1' repeats the id of .*test.jsonl:1"):
        evaluate._records(source, 0)
    assert [r.id for r in evaluate._records(source, 2)] == ["1", "2"]  # data.limit: the first ones only


@pytest.mark.parametrize("preset, override, message", [
    ("demo", ("rollout", "group_size", 4), "rollout.group_size must be 1 for evaluation, got 4"),
    ("demo,text,cdir", None, "cdir.enabled needs multimodal records"),
    ("cdir,clip=/nowhere/clip", None, r"cdir.clip_checkpoint '/nowhere/clip' does not exist"),
    ("demo,cdir", ("cdir", "threshold", 0.0), "cdir.threshold must be in"),
])
def test_unusable_settings_are_refused_before_anything_loads(tmp_path, preset, override, message):
    cfg = eval_config.get_config(preset)
    if override:
        cfg[override[0]][override[1]] = override[2]
    with pytest.raises(ValueError, match=message):
        evaluate.evaluate(cfg, str(tmp_path / "work"))
    assert not os.path.exists(tmp_path / "work")


@pytest.mark.slow
def test_demo_evaluation_resumed_after_a_crash_equals_one_run(tmp_path):
    cfg = eval_config.get_config("demo,limit=8")
    straight = evaluate.evaluate(cfg, str(tmp_path / "straight"), devices=ONE_DEVICE)
    with open(tmp_path / "straight" / evaluate.PREDICTIONS_FILE, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    assert len(lines) == 8 and straight["num_records"] == 8
    assert straight["mean_queries"] > 0  # real retrieval rounds ran
    # A crash while the second batch (records 4-7) was being written: one whole line and a torn one.
    crashed = tmp_path / "crashed"
    os.makedirs(crashed)
    with open(crashed / evaluate.PREDICTIONS_FILE, "wb") as f:
        f.write(b"".join(lines[:4]) + lines[4][:25])
    resumed = evaluate.evaluate(cfg, str(crashed), devices=ONE_DEVICE)
    with open(crashed / evaluate.PREDICTIONS_FILE, "rb") as f:
        assert f.read().splitlines(keepends=True) == lines  # the same draws: keys follow record positions
    assert resumed == {**straight, "data": resumed["data"]}
    with open(crashed / evaluate.METRICS_FILE) as f:
        assert json.load(f) == resumed
    by_hand = predictions.read_predictions(str(crashed / evaluate.PREDICTIONS_FILE))
    assert resumed["accuracy"] == pytest.approx(np.mean([line["correct"] for line in by_hand.values()]))


@pytest.mark.slow
def test_demo_evaluation_with_cdir_consults_a_similar_case(tmp_path):
    cfg = eval_config.get_config("demo,cdir,limit=4")
    metrics = evaluate.evaluate(cfg, str(tmp_path), devices=ONE_DEVICE)
    lines = list(predictions.read_predictions(str(tmp_path / evaluate.PREDICTIONS_FILE)).values())
    consulted = [line for line in lines if "cdir" in line]
    unsure = [line for line in lines if line.get("cdir", {}).get("first_pass", line)["confidence"] is None
              or line.get("cdir", {}).get("first_pass", line)["confidence"] < 0.9]
    assert consulted and len(consulted) == len(unsure) == metrics["cdir_consulted"]
    for line in consulted:
        assert line["cdir"]["case_id"].startswith("case-demo-train-")  # the demo's solved training cases
        assert "consultation from similar medical imaging case </query><retrieve> (1) Imaging shows" in (
            line["cdir"]["completion"])
        final = line["cdir"] if line["cdir"]["answered"] else line["cdir"]["first_pass"]
        assert line["completion"] == final["completion"]
    assert metrics["accuracy_first_pass"] == np.mean([line.get("cdir", {}).get("first_pass", line)["correct"]
                                                      for line in lines])
