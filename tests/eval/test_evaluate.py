"""Evaluation: answers scored by hand, unique ids, the demo run resumed after a crash, and
several processes splitting the records."""

import json
import os
import sys

import jax
import numpy as np
import pytest

from configs import eval as eval_config
from rwr_jax.data import records
from rwr_jax.eval import evaluate, predictions
from rwr_jax.rl import parser
from tests.multiprocess import free_address, run_processes, subprocess_env
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


def _write_lines(path, ids, torn=b""):
    with open(path, "wb") as f:
        f.write(b"".join(json.dumps({"id": i, "correct": True}).encode() + b"\n" for i in ids) + torn)


def test_process_files_merge_into_predictions_in_record_order(tmp_path):
    """A multi-process run's files (one with a torn last line) become predictions.jsonl in the
    records' order, lines of records outside the evaluated set last; the process files go."""
    _write_lines(tmp_path / evaluate.PREDICTIONS_FILE, ["r1", "old"])
    _write_lines(tmp_path / evaluate.PROCESS_PREDICTIONS_FILE.format(0), ["r0", "r4"])
    _write_lines(tmp_path / evaluate.PROCESS_PREDICTIONS_FILE.format(1), ["r3"], torn=b'{"id": "r5", "cor')
    assert sorted(evaluate._finished(str(tmp_path))) == ["old", "r0", "r1", "r3", "r4"]
    evaluate._merge_process_predictions(str(tmp_path), ["r0", "r1", "r2", "r3", "r4", "r5"])
    assert list(predictions.read_predictions(str(tmp_path / evaluate.PREDICTIONS_FILE))) == [
        "r0", "r1", "r3", "r4", "old"]
    assert sorted(os.listdir(tmp_path)) == [evaluate.PREDICTIONS_FILE]


def test_an_id_in_two_predictions_files_is_refused(tmp_path):
    _write_lines(tmp_path / evaluate.PREDICTIONS_FILE, ["r1"])
    _write_lines(tmp_path / evaluate.PROCESS_PREDICTIONS_FILE.format(1), ["r1"])
    with pytest.raises(ValueError, match=r"predictions.process-1.jsonl: id 'r1' is also in another predictions"):
        evaluate._finished(str(tmp_path))


@pytest.mark.slow
def test_two_processes_split_the_records_and_answer_as_one(tmp_path):
    """launch/eval.py as two processes (greedy, with CDIR): each answers its share of the records
    on its own device; predictions.jsonl then holds every record once, in order, with the
    answers and completions of a one-process run."""
    cfg = eval_config.get_config("demo,cdir,limit=6")
    cfg.rollout.temperature = 0.0
    one = evaluate.evaluate(cfg, str(tmp_path / "one"), devices=ONE_DEVICE)
    address, work = free_address(), tmp_path / "two"
    run_processes([[sys.executable, "launch/eval.py", "--config=configs/eval.py:demo,cdir,limit=6",
                    "--config.rollout.temperature=0", f"--workdir={work}", f"--coordinator_address={address}",
                    "--num_processes=2", f"--process_id={p}"] for p in (0, 1)], subprocess_env(devices=1))
    assert sorted(os.listdir(work)) == ["compilation_cache", "demo_data", "image_index", "index",
                                        evaluate.METRICS_FILE, evaluate.PREDICTIONS_FILE]
    expected = predictions.read_predictions(str(tmp_path / "one" / evaluate.PREDICTIONS_FILE))
    got = predictions.read_predictions(str(work / evaluate.PREDICTIONS_FILE))
    assert list(got) == list(expected)
    # A multi-process run that crashed, finished by one process: its lines are merged in too.
    os.rename(work / evaluate.PREDICTIONS_FILE, work / evaluate.PROCESS_PREDICTIONS_FILE.format(1))
    assert evaluate.evaluate(cfg, str(work), devices=ONE_DEVICE)["num_records"] == 6
    assert list(predictions.read_predictions(str(work / evaluate.PREDICTIONS_FILE))) == list(expected)
    assert not os.path.exists(work / evaluate.PROCESS_PREDICTIONS_FILE.format(1))
    for record_id, line in expected.items():
        for key in ("prediction", "correct", "completion", "queries", "finish_reason"):
            assert got[record_id][key] == line[key], (record_id, key)
    with open(work / evaluate.METRICS_FILE) as f:
        metrics = json.load(f)
    assert metrics["num_records"] == 6 and metrics["accuracy"] == one["accuracy"]
    assert metrics["cdir_consulted"] == one["cdir_consulted"]
