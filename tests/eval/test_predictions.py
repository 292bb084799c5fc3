"""predictions.jsonl: durable appends, a torn last line cut off on reading, bad lines named; the summary."""

import json

import pytest

from rwr_jax.eval import predictions


def line(i, correct, prediction="B. x", rounds=1, queries=(), finish="answer", cdir=None):
    out = {"id": f"r{i}", "correct": correct, "prediction": prediction, "rounds": rounds, "queries": list(queries),
           "finish_reason": finish}
    if cdir is not None:
        out["cdir"] = cdir
    return out


def test_append_then_read_round_trips(tmp_path):
    path = str(tmp_path / "p.jsonl")
    assert predictions.read_predictions(path) == {}
    predictions.append_predictions(path, [line(0, True), line(1, False)])
    predictions.append_predictions(path, [line(2, True, prediction=None)])
    assert list(predictions.read_predictions(path)) == ["r0", "r1", "r2"]
    assert predictions.read_predictions(path)["r2"]["prediction"] is None


def test_a_torn_last_line_is_cut_off(tmp_path):
    path = tmp_path / "p.jsonl"
    predictions.append_predictions(str(path), [line(0, True)])
    whole = path.read_bytes()
    path.write_bytes(whole + b'{"id": "r1", "corr')  # a crash in the middle of a write
    assert list(predictions.read_predictions(str(path))) == ["r0"]
    assert path.read_bytes() == whole  # the next append starts on a fresh line


@pytest.mark.parametrize("text, message", [
    ('{"id": "r0"}\nnot json\n', r"p.jsonl:2: not a JSON line"),
    ('{"id": 3}\n', r"p.jsonl:1: a prediction must be a JSON object with a string 'id'"),
    ('[1]\n', r"p.jsonl:1: a prediction must be"),
    ('{"id": "a"}\n{"id": "a"}\n', r"p.jsonl:2: id 'a' repeats an earlier line"),
])
def test_bad_lines_are_named(tmp_path, text, message):
    path = tmp_path / "p.jsonl"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        predictions.read_predictions(str(path))


def test_summary_by_hand():
    lines = [line(0, True, rounds=1), line(1, False, prediction=None, rounds=2, queries=["q"], finish="eos"),
             line(2, False, prediction="C", rounds=3, queries=["q", "r"])]
    assert predictions.summarize(lines) == {
        "num_records": 3, "accuracy": pytest.approx(1 / 3), "no_answer": pytest.approx(1 / 3), "mean_rounds": 2.0,
        "mean_queries": 1.0, "finish_reasons": {"answer": 2, "eos": 1}}
    assert predictions.summarize([])["accuracy"] is None


def test_summary_with_cdir_counts_fixed_and_broken_answers():
    first = lambda correct: {"first_pass": {"correct": correct}}  # noqa: E731
    lines = [line(0, True, cdir=first(False)),   # CDIR fixed it
             line(1, False, cdir=first(True)),   # CDIR broke it
             line(2, True, cdir=first(True)),    # consulted, stayed right
             line(3, False),                     # not consulted (confident, or text-only)
             line(4, True)]
    summary = predictions.summarize(lines)
    assert summary["accuracy"] == pytest.approx(3 / 5)
    assert summary["accuracy_first_pass"] == pytest.approx(3 / 5)  # r1, r2, r4
    assert (summary["cdir_consulted"], summary["cdir_fixed"], summary["cdir_broken"]) == (3, 1, 1)
    assert json.loads(json.dumps(summary)) == summary
    assert "cdir_consulted" not in predictions.summarize(lines[3:])
    assert predictions.summarize(lines[3:], cdir=True)["cdir_consulted"] == 0


def test_cdir_threshold_curve_by_hand():
    def consulted(correct, first_correct, confidence):
        return line(0, correct, cdir={"first_pass": {"correct": first_correct, "confidence": confidence}})
    lines = [consulted(True, False, 0.3),    # fixed when consulted (t > 0.3)
             consulted(False, True, 0.8),    # broken when consulted (t > 0.8)
             consulted(True, False, None),   # no first answer: consulted at every t > 0
             line(3, False)]                 # never consulted (text-only, or confident at the run's 1.0)
    curve = predictions.cdir_threshold_curve(lines, [0.0, 0.3, 0.5, 0.9, 1.0], run_threshold=1.0)
    assert curve[0.0] == {"accuracy": 0.25, "consulted": 0}  # the first pass: line 2 right
    assert curve[0.3] == {"accuracy": 0.5, "consulted": 1}  # 0.3 is not below 0.3: line 3 only
    assert curve[0.5] == {"accuracy": 0.75, "consulted": 2}
    assert curve[0.9] == curve[1.0] == {"accuracy": 0.5, "consulted": 3}
    assert curve[1.0]["accuracy"] == predictions.summarize(lines)["accuracy"]  # t = the run's: its own result
    with pytest.raises(ValueError, match=r"threshold 0.95 is outside \[0, 0.9\]"):
        predictions.cdir_threshold_curve(lines, [0.95], run_threshold=0.9)
