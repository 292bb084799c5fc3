"""The evaluation's record of work: one JSON line per record, and their summary.

    done = read_predictions("/tmp/rwr_eval/predictions.jsonl")   # id -> line, {} if none yet
    append_predictions(path, lines)                               # flushed and fsynced
    metrics = summarize(list(done.values()))                      # {"accuracy": ..., ...}

A line (`evaluate.prediction_line`): `id`, `answer` (the record's), `prediction` (the text
of the model's first answer block, None without one), `letter` (its option letter, ""
if none), `correct`, `confidence` (the probability of the answer's first token, None
without an answer), `rounds`, `queries`, `finish_reason` and `completion` (the text,
retrieved blocks included). A record CDIR consulted also has `cdir`: `case_id`,
`case_score`, `case_image`, `answered` (the second pass gave an answer; the top-level
answer fields and `completion` are then the second pass's), `finish_reason`,
`completion` (the kept text, the consultation and the new text) and `first_pass`
(prediction, letter, correct, confidence and completion of the first answer).

A line is written only when its record is finished, and every batch's lines are
flushed to disk before the next batch starts, so after a crash or preemption the file
holds whole records; a rerun skips their ids. A last line torn by a crash in the
middle of a write is cut off when the file is read again (logged); any other line that
is not a JSON object with an `id` raises a ValueError naming the file and line.
"""

import collections
import json
import os
from typing import Any, Iterable

from absl import logging


def read_predictions(path: str) -> dict[str, dict[str, Any]]:
    """id -> prediction line of every finished record in `path` ({} if the file does not exist).

    Raises:
      ValueError: a line (other than a torn last one) is not a JSON object with a string `id`,
        or an id repeats.
    """
    if not os.path.exists(path):
        return {}
    with open(path, "rb") as f:
        data = f.read()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # the last write was cut short: drop its partial line
        logging.warning("%s: dropping a torn last line of %d bytes (an interrupted write)", path, len(data) - end)
        with open(path, "r+b") as f:
            f.truncate(end)
        data = data[:end]
    done: dict[str, dict[str, Any]] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{number}: not a JSON line ({e.msg}); delete the file to evaluate again") from None
        if not isinstance(row, dict) or not isinstance(row.get("id"), str):
            raise ValueError(f"{path}:{number}: a prediction must be a JSON object with a string 'id'")
        if row["id"] in done:
            raise ValueError(f"{path}:{number}: id {row['id']!r} repeats an earlier line")
        done[row["id"]] = row
    return done


def append_predictions(path: str, lines: Iterable[dict[str, Any]]) -> None:
    """Appends one JSON line per prediction and makes it durable (flush + fsync)."""
    with open(path, "a", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(lines: list[dict[str, Any]], cdir: bool = False) -> dict[str, Any]:
    """The metrics of a set of prediction lines (`evaluate.prediction_line`).

    Args:
      lines: the lines.
      cdir: report the CDIR counts even when no line was consulted.

    Returns:
      num_records; accuracy (final answers; None without records); no_answer (share of
      records whose completion has no answer); mean_rounds, mean_queries; finish_reasons
      (counts); and with `cdir` or CDIR lines: cdir_consulted (records answered again),
      accuracy_first_pass (before CDIR), cdir_fixed / cdir_broken (records it made
      correct / wrong).
    """
    consulted = [line for line in lines if line.get("cdir")]
    metrics = {
        "num_records": len(lines),
        "accuracy": _mean([float(line["correct"]) for line in lines]),
        "no_answer": _mean([float(line["prediction"] is None) for line in lines]),
        "mean_rounds": _mean([float(line["rounds"]) for line in lines]),
        "mean_queries": _mean([float(len(line["queries"])) for line in lines]),
        "finish_reasons": dict(sorted(collections.Counter(line["finish_reason"] for line in lines).items())),
    }
    if cdir or consulted:
        first = [line["cdir"]["first_pass"]["correct"] if line.get("cdir") else line["correct"] for line in lines]
        metrics.update(
            cdir_consulted=len(consulted), accuracy_first_pass=_mean([float(x) for x in first]),
            cdir_fixed=sum(line["correct"] and not line["cdir"]["first_pass"]["correct"] for line in consulted),
            cdir_broken=sum(not line["correct"] and line["cdir"]["first_pass"]["correct"] for line in consulted))
    return metrics


def cdir_threshold_curve(lines: list[dict[str, Any]], thresholds: Iterable[float],
                         run_threshold: float) -> dict[float, dict[str, float | int | None]]:
    """Accuracy and records consulted had CDIR used each threshold, from one run's lines.

    A record is consulted at threshold t exactly when its first answer's confidence is
    below t (or it gave none; t > 0), and its second answer does not depend on t; so a run at
    `run_threshold` (1.0: every multimodal record) gives the result of every t <= it.
    t = 0 is the first pass alone.

    Args:
      lines: the prediction lines of a CDIR run.
      thresholds: the thresholds t, each in [0, run_threshold].
      run_threshold: the run's `cdir.threshold` (metrics.json's `cdir_threshold`).

    Returns:
      {t: {"accuracy": ..., "consulted": records answered again at t}}.
    """
    curve = {}
    for t in thresholds:
        if not 0 <= t <= run_threshold:
            raise ValueError(f"threshold {t} is outside [0, {run_threshold}]: a run at cdir.threshold="
                             f"{run_threshold} did not consult the records a higher one would")
        correct, consulted = [], 0
        for line in lines:
            first = line["cdir"]["first_pass"] if line.get("cdir") else None
            if first is not None and t > 0 and (first["confidence"] is None or first["confidence"] < t):
                consulted += 1
                correct.append(float(line["correct"]))
            else:
                correct.append(float(first["correct"] if first is not None else line["correct"]))
        curve[t] = {"accuracy": _mean(correct), "consulted": consulted}
    return curve

