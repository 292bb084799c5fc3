"""Benchmark evaluation: one retrieval-interleaved rollout per record, scored; CDIR.

    python launch/eval.py --config=configs/eval.py:demo --workdir=/tmp/rwr_eval
    metrics = evaluate(config, workdir)          # also written to workdir/metrics.json

Every record of `data.path` (a jsonl file, or the `data.split` of a dataset directory,
`data.tfds_records`; file order; the first `data.limit` when > 0) gets one
completion from `rollout.engine.rollout` with real retrieval rounds (greedy by
default). Its answer is the text of the first `<answer>` block the model wrote
(`rl.parser`; a tag inside a retrieved passage is not the model's), correct when its
option letter is the record's (free-text records: exact match, case and spaces
ignored), as the accuracy reward reads it. Its confidence is the probability the model
gave the answer's first token (the one holding its first character). With
`cdir.enabled`, unsure multimodal answers are given again with a similar case
(`eval.cdir`).

Results go to `workdir/predictions.jsonl` (`eval.predictions`), one line per record,
flushed batch by batch: a rerun in the same workdir skips the records already there,
so a crash or preemption loses at most the batch in flight. `metrics.json` summarises
every line once all records are done.

Several processes (hosts, `train.multihost`) split the records still to do, each on its
own devices, writing `predictions.process-<i>.jsonl`; at the end process 0 merges those
lines into predictions.jsonl in record order (a rerun reads all of these files).
"""

import dataclasses
import glob
import json
import os
import time
from typing import Any, Sequence

from absl import logging
import jax
import numpy as np

from rwr_jax import sharding
from rwr_jax.data import records, tfds_records, tokenizer as tokenizer_lib
from rwr_jax.data.pipeline import HostPromptBatch, PipelineConfig, PromptPipeline
from rwr_jax.eval import cdir as cdir_lib, predictions as predictions_lib
from rwr_jax.models.qwen2_vl.model import VLConfig
from rwr_jax.rl import parser
from rwr_jax.rollout import engine
from rwr_jax.rollout.trajectory import Trajectory
from rwr_jax.train import multihost, trainer

PREDICTIONS_FILE, METRICS_FILE = "predictions.jsonl", "metrics.json"
PROCESS_PREDICTIONS_FILE = "predictions.process-{}.jsonl"  # a process's lines in a multi-process run


def answer_fields(row: parser.RowParse, logprobs: np.ndarray, truth: parser.GroundTruth) -> dict[str, Any]:
    """prediction (answer text, stripped; None without an answer block), letter ("" if none), correct,
    confidence (None without an answer).

    Args:
      row: the parsed completion.
      logprobs: [C] its sampler log-probs (the model's own with greedy or temperature-1 sampling).
      truth: the record's answer.
    """
    index, _, free_match = parser.score_answer(row.answer, truth)
    confidence = None if row.answer_token_index < 0 else float(np.exp(logprobs[row.answer_token_index]))
    return {"prediction": None if row.answer is None else row.answer.strip(),
            "letter": parser.LETTERS[index] if index >= 0 else "",
            "correct": bool(free_match if truth.free_text else index == truth.letter), "confidence": confidence}


def _completion_text(tokenizer, traj: Trajectory, b: int) -> str:
    return tokenizer.decode(traj.tokens[b, :traj.length[b]].tolist(), skip_special_tokens=False)


def prediction_line(record: records.Record, traj: Trajectory, b: int, row: parser.RowParse, tokenizer) -> dict:
    """The predictions.jsonl line of row b of a first-pass trajectory."""
    truth = parser.record_ground_truth(record.answer_letter, record.answer_text, record.answer)
    return {"id": record.id, "answer": record.answer, **answer_fields(row, traj.logprobs[b], truth),
            "rounds": int(traj.rounds[b]), "queries": traj.queries[b],
            "finish_reason": traj.finish_reason_names()[b], "completion": _completion_text(tokenizer, traj, b)}


def eval_data_path(cfg, workdir: str) -> str:
    """The records to evaluate: `data.path`, or the demo set's eval split."""
    return trainer.demo_paths(cfg, workdir).eval if cfg.data.get("demo") else cfg.data.path


def _records(source, limit: int) -> list[records.Record]:
    """The records to evaluate, in file order; ids must be unique (predictions are keyed by id)."""
    count = min(limit, len(source)) if limit > 0 else len(source)
    chosen, seen = [], {}
    for index in range(count):
        record = source[index]
        if record.id in seen:
            raise ValueError(f"{record.location}: record id {record.id!r} repeats the id of {seen[record.id]}; "
                             "evaluation needs unique ids (its predictions are keyed by id)")
        seen[record.id] = record.location
        chosen.append(record)
    return chosen


def pipeline_config(cfg, model_config) -> PipelineConfig:
    """The evaluation's prompt pipeline: every record once, in order, the last batch padded."""
    text = model_config.text if isinstance(model_config, VLConfig) else model_config
    return PipelineConfig(batch_size=cfg.data.batch_size, max_prompt_length=cfg.data.max_prompt_length,
                          length_bucket=cfg.data.length_bucket or None, system_prompt=cfg.system_prompt,
                          max_images_per_prompt=cfg.data.max_images_per_prompt, skip_oversized=cfg.data.skip_oversized,
                          mrope=text.mrope_section is not None, seed=cfg.seed, shuffle=False, num_epochs=1,
                          drop_remainder=False, shard_index=0, shard_count=1)


@dataclasses.dataclass
class _Cdir:
    """CDIR's pieces: settings, the image retriever and the second-pass prompt builder."""

    config: cdir_lib.CdirConfig
    retriever: Any
    prompts: cdir_lib.SecondPassPrompts


def check_config(cfg) -> cdir_lib.CdirConfig | None:
    """Refuses settings evaluation cannot use before anything is loaded; returns the CDIR settings (None: off)."""
    if cfg.rollout.group_size != 1:
        raise ValueError(f"rollout.group_size must be 1 for evaluation, got {cfg.rollout.group_size}")
    c = cfg.cdir
    if not c.enabled:
        return None
    if cfg.data.max_images_per_prompt == 0:
        raise ValueError("cdir.enabled needs multimodal records: data.max_images_per_prompt is 0")
    if not c.get("demo"):
        for name, exists in (("clip_checkpoint", os.path.isdir), ("corpus_path", os.path.isfile)):
            if not exists(c[name]):
                raise ValueError(f"cdir.{name} {c[name]!r} does not exist: CDIR needs a local CLIP checkpoint "
                                 "directory (preset clip=DIR) and a case corpus jsonl (preset cases=FILE)")
    return cdir_lib.CdirConfig(threshold=c.threshold, think=c.think, query=c.query, max_case_tokens=c.max_case_tokens)


def _build_cdir(cfg, workdir: str, settings: cdir_lib.CdirConfig, tokenizer, config: PipelineConfig,
                model_config) -> _Cdir:
    """The image index over the case corpus (built on first use) and the second-pass prompts."""
    from rwr_jax.models.clip import demo as clip_demo  # pylint: disable=g-import-not-at-top
    from rwr_jax.retrieval import image_index, index as index_lib  # pylint: disable=g-import-not-at-top

    if not isinstance(model_config, VLConfig):
        raise ValueError("cdir.enabled needs a vision-language model (a Qwen2.5-VL checkpoint)")
    c = cfg.cdir
    clip_path, corpus_path = c.clip_checkpoint, c.corpus_path
    if c.get("demo"):  # a random CLIP; the demo's solved training cases
        if not clip_path:
            clip_path = os.path.join(workdir, "demo_data", "clip")
            multihost.run_on_main(lambda: clip_demo.write_demo_clip(clip_path, cfg.seed))
        corpus_path = corpus_path or trainer.demo_paths(cfg, workdir).cases
    encoder = image_index.ClipImageEncoder.from_pretrained(clip_path)
    index_dir = c.index_dir or os.path.join(workdir, "image_index")

    def build_index():
        if not os.path.isfile(os.path.join(index_dir, index_lib.MANIFEST_FILE)):
            os.makedirs(index_dir, exist_ok=True)
            corpus = image_index.ImageCorpus(corpus_path, os.path.join(index_dir, index_lib.OFFSETS_FILE))
            image_index.build_image_index(index_dir, corpus, encoder)
    multihost.run_on_main(build_index)
    retriever = image_index.open_image_index(index_dir, encoder, corpus_path)
    prompts = cdir_lib.SecondPassPrompts(tokenizer, config, model_config.vision, settings,
                                         cfg.rollout.max_completion_length)
    return _Cdir(settings, retriever, prompts)


class _Evaluator:
    """Rolls out batches and turns them into prediction lines (first pass, then CDIR)."""

    def __init__(self, cfg, model, params, tokenizer, retrieve, cdir: _Cdir | None, vocab_size: int):
        self.cfg, self.model, self.params, self.tokenizer, self.retrieve, self.cdir = (
            cfg, model, params, tokenizer, retrieve, cdir)
        self.rollout_config = trainer.rollout_config(cfg)
        self.text_tables, self.stop_tables = trainer.host_tables(tokenizer, vocab_size)
        self.key = jax.random.key(cfg.seed)

    def _rollout(self, batch: HostPromptBatch, config: engine.RolloutConfig,
                 key: jax.Array) -> tuple[Trajectory, list[parser.RowParse]]:
        traj = engine.rollout(self.model, self.params, engine.PromptBatch(**batch.prompt_fields()), self.tokenizer,
                              self.retrieve, config, key, stop_tables=self.stop_tables, eos_ids=tokenizer_lib.EOS_IDS,
                              max_retrieved_tokens=self.cfg.retrieval.max_retrieved_tokens)
        return traj, parser.parse_rows(traj, self.text_tables)

    def __call__(self, batch: HostPromptBatch, by_id: dict[str, records.Record], position: int) -> list[dict]:
        """The prediction lines of a batch's real rows; `position`: its first record's index in the
        evaluated set (the sampling key derives from it, so a resumed run draws as the first one did)."""
        key = jax.random.fold_in(self.key, position)
        second_key = jax.random.fold_in(key, 1)  # (the rollout consumes its key: donated)
        traj, rows = self._rollout(batch, self.rollout_config, key)
        real = np.flatnonzero(batch.example_mask)
        lines = [prediction_line(by_id[batch.ids[b]], traj, b, rows[b], self.tokenizer) for b in real]
        if self.cdir is not None:
            self._consult(lines, [by_id[batch.ids[b]] for b in real], [kept_row(traj, b) for b in real], second_key)
        return lines

    def _consult(self, lines: list[dict], records_: list[records.Record], kept: list[np.ndarray],
                 key: jax.Array) -> None:
        """Answers the unsure multimodal records again with a similar case; updates their lines."""
        unsure = [i for i, (line, record) in enumerate(zip(lines, records_))
                  if cdir_lib.wants_consultation(record, line["confidence"], self.cdir.config.threshold)]
        if not unsure:
            return
        cases = cdir_lib.nearest_cases(self.cdir.retriever, [records_[i] for i in unsure])
        items = [(i, case) for i, case in zip(unsure, cases) if case is not None]
        if not items:
            return
        batch = self.cdir.prompts([(records_[i], kept[i], case) for i, case in items])
        config = dataclasses.replace(self.rollout_config, max_rounds=1,
                                     max_completion_length=self.rollout_config.max_new_tokens_per_round)
        traj, rows = self._rollout(batch, config, key)
        for b, (i, case) in enumerate(items):
            record, line = records_[i], lines[i]
            truth = parser.record_ground_truth(record.answer_letter, record.answer_text, record.answer)
            second = answer_fields(rows[b], traj.logprobs[b], truth)
            first = {k: line[k] for k in ("prediction", "letter", "correct", "confidence", "completion")}
            start = cdir_lib.continuation(self.tokenizer, kept[i], case, self.cdir.config)
            second_text = self.tokenizer.decode(np.concatenate([start, traj.tokens[b, :traj.length[b]]]).tolist(),
                                                skip_special_tokens=False)
            line["cdir"] = {"case_id": case.case_id, "case_score": case.score, "case_image": case.image_path,
                            "answered": second["prediction"] is not None,
                            "finish_reason": traj.finish_reason_names()[b], "completion": second_text,
                            "first_pass": first}
            if second["prediction"] is not None:
                line.update(second, completion=second_text)


def kept_row(traj: Trajectory, b: int) -> np.ndarray:
    """`cdir.kept_completion` of trajectory row b."""
    return cdir_lib.kept_completion(traj.tokens[b], traj.source[b], int(traj.length[b]))


def evaluate(cfg, workdir: str, devices: Sequence[jax.Device] | None = None) -> dict[str, Any]:
    """Evaluates `cfg.model` on `cfg.data` (resuming in `workdir`); returns the metrics.

    Args:
      cfg: the config (configs/eval.py).
      workdir: predictions.jsonl, metrics.json, the demo data, the indexes.
      devices: the devices of the mesh `cfg.mesh` describes (default: the first
        `cfg.mesh_devices`, 0 = all).

    Returns:
      `predictions.summarize` of every record's line.
    """
    settings = check_config(cfg)
    os.makedirs(workdir, exist_ok=True)
    if cfg.data.get("demo"):
        multihost.run_on_main(lambda: trainer.demo_paths(cfg, workdir))
    path = eval_data_path(cfg, workdir)
    source = tfds_records.records_source(path, cfg.data.split,
                                         records.RecordsConfig(skip_malformed=cfg.data.skip_malformed))
    chosen = _records(source, cfg.data.limit)
    predictions_path = os.path.join(workdir, PREDICTIONS_FILE)
    done = _finished(workdir)
    multihost.barrier("rwr_jax eval: read what is done")  # before any process appends to its file
    todo = [record for record in chosen if record.id not in done]
    logging.info("Evaluating %d records of %s: %d already in %s", len(chosen), path, len(chosen) - len(todo),
                 predictions_path)
    if todo:
        positions = {record.id: index for index, record in enumerate(chosen)}
        own_path = predictions_path
        if jax.process_count() > 1:
            own_path = os.path.join(workdir, PROCESS_PREDICTIONS_FILE.format(jax.process_index()))
        _run(cfg, workdir, settings, todo[jax.process_index()::jax.process_count()], positions, own_path, devices)
    multihost.barrier("rwr_jax eval: every process's lines written")  # process 0 then merges them
    # (Also after a multi-process run that crashed and is finished by one process.)
    multihost.run_on_main(lambda: _merge_process_predictions(workdir, [record.id for record in chosen]))
    wanted = {record.id for record in chosen}
    metrics = predictions_lib.summarize([line for key, line in predictions_lib.read_predictions(
        predictions_path).items() if key in wanted], cdir=cfg.cdir.enabled)
    metrics["data"] = path
    if settings is not None:
        metrics["cdir_threshold"] = settings.threshold
    if jax.process_index() == 0:
        with open(os.path.join(workdir, METRICS_FILE), "w") as f:
            json.dump(metrics, f, indent=2)
    logging.info("Evaluation of %d records: %s", len(chosen), json.dumps(metrics))
    return metrics


def _process_files(workdir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(workdir, PROCESS_PREDICTIONS_FILE.format("*"))))


def _finished(workdir: str) -> dict[str, dict[str, Any]]:
    """id -> line of every record predictions.jsonl or a process's file holds."""
    done = {}
    for path in [os.path.join(workdir, PREDICTIONS_FILE), *_process_files(workdir)]:
        for record_id, line in predictions_lib.read_predictions(path).items():
            if record_id in done:
                raise ValueError(f"{path}: id {record_id!r} is also in another predictions file of {workdir}")
            done[record_id] = line
    return done


def _merge_process_predictions(workdir: str, order: list[str]) -> None:
    """Every process's lines into predictions.jsonl (the evaluated records in `order`, then any
    others as they were), written atomically; the process files are then removed."""
    done, files = _finished(workdir), _process_files(workdir)
    if not files:
        return
    rank = {record_id: i for i, record_id in enumerate(order)}
    lines = sorted(done.values(), key=lambda line: rank.get(line["id"], len(order)))
    path = os.path.join(workdir, PREDICTIONS_FILE)
    staging = f"{path}.merging"
    if os.path.exists(staging):
        os.remove(staging)
    predictions_lib.append_predictions(staging, lines)
    os.replace(staging, path)
    for file in files:
        os.remove(file)


def _run(cfg, workdir: str, settings: cdir_lib.CdirConfig | None, todo: list[records.Record],
         positions: dict[str, int], predictions_path: str, devices: Sequence[jax.Device] | None) -> None:
    """Evaluates the `todo` records batch by batch, appending their lines to predictions_path;
    `positions`: each evaluated record's index in the whole set. Every process calls it (files
    it builds on first use are written by process 0), also one with no records left to do."""
    tokenizer = tokenizer_lib.load_tokenizer(cfg.tokenizer_path or None)
    devices = devices if devices is not None else sharding.first_devices(cfg.mesh_devices, jax.local_devices())
    mesh, rules = sharding.make_mesh(dict(cfg.mesh), devices), sharding.rules_from_config(cfg.sharding_rules)
    with jax.set_mesh(mesh), sharding.axis_rules(rules):
        model, model_config, params, _ = trainer.build_model(cfg, tokenizer, mesh, rules)
        config = pipeline_config(cfg, model_config)
        vision_config = model_config.vision if isinstance(model_config, VLConfig) else None
        pipeline = PromptPipeline(todo, tokenizer, config, vision_config) if todo else None
        retrieve = (trainer.build_retrieve(cfg, workdir) if cfg.rollout.max_rounds > 1
                    else (lambda queries: [[] for _ in queries]))
        cdir = None if settings is None else _build_cdir(cfg, workdir, settings, tokenizer, config, model_config)
        text = model_config.text if isinstance(model_config, VLConfig) else model_config
        evaluator = _Evaluator(cfg, model, params, tokenizer, retrieve, cdir, text.vocab_size)
        by_id = {record.id: record for record in todo}
        start, finished, correct = time.perf_counter(), 0, 0
        for batch in pipeline or ():
            lines = evaluator(batch, by_id, positions[batch.ids[0]])
            predictions_lib.append_predictions(predictions_path, lines)
            finished += len(lines)
            correct += sum(line["correct"] for line in lines)
            rate = finished / (time.perf_counter() - start)
            logging.info("eval: %d/%d records of this run%s, accuracy %.3f, %.2f records/s, ETA %.0f s", finished,
                         len(todo), f" (process {jax.process_index()})" if jax.process_count() > 1 else "",
                         correct / max(finished, 1), rate, (len(todo) - finished) / rate)
        for record_id, problem in (pipeline.skipped_oversized if pipeline else {}).items():
            logging.warning("Not evaluated (data.skip_oversized): %s %s", record_id, problem)
