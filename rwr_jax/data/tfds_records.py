"""Med-RwR records as a TFDS dataset (array_record), images inside: build once, read with grain.

    path, _ = build_dataset({"train": "/data/train.jsonl", "test": "/data/test.jsonl"}, "/data/tfds")
    source = TfdsSource(path, split="train")     # random access `Record`s, as `records.JsonlSource`
    source = records_source(path_or_jsonl, split="train")    # either kind, chosen by the path

Building reads each jsonl with `records.JsonlSource` (every row checked; a malformed one
stops the build naming its file and line, or with `skip_malformed` is left out and logged)
and stores every field a `Record` holds, its
images as their encoded bytes, so the dataset directory is self-contained: copy it to a
bucket or a pod's disks and the image paths of the machine that built it no longer
matter. Reading needs neither TensorFlow nor the original files: `tfds.data_source`
gives random access to the array_record shards, and a record's images are decoded
from memory (`Record.image_bytes`) in the pipeline's workers. Records keep their jsonl
order (`DatasetInfo.disable_shuffling`), so a dataset reads back in the order it was written.
"""

import json
import os
from typing import Mapping

import numpy as np
import tensorflow_datasets as tfds

from rwr_jax.data import records

DATASET_NAME = "med_rwr_records"
VERSION = "1.0.0"
_INFO_FILE = "dataset_info.json"


class MedRwrRecords(tfds.core.GeneratorBasedBuilder):
    """The Med-RwR record schema (`records.Record`), one split per jsonl file."""

    VERSION = tfds.core.Version(VERSION)
    name = DATASET_NAME

    def __init__(self, *, splits: Mapping[str, str] | None = None, skip_malformed: bool = False, **kwargs):
        self._jsonl = dict(splits or {})
        self._config = records.RecordsConfig(validate_on_open=True, skip_malformed=skip_malformed)
        self.skipped: dict[str, tuple[str, ...]] = {}  # split -> "file:line: problem" of each row left out
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        text, strings = tfds.features.Text(), tfds.features.Sequence(tfds.features.Text())
        features = tfds.features.FeaturesDict({
            "id": text, "question": text, "answer": text, "answer_letter": text, "answer_text": text,
            "options": text, "difficulty": text, "location": text,  # (difficulty as repr: exact)
            "image_names": strings,
            "image_bytes": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
        })
        return tfds.core.DatasetInfo(builder=self, description=__doc__.splitlines()[0], features=features,
                                     disable_shuffling=True)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        return {split: self._generate_examples(split, path) for split, path in self._jsonl.items()}

    def _generate_examples(self, split: str, path: str):
        source = records.JsonlSource(path, self._config)
        self.skipped[split] = source.skipped
        for index in range(len(source)):
            record = source[index]
            yield f"{index:012d}", {
                "id": record.id, "question": record.question, "answer": record.answer,
                "answer_letter": record.answer_letter or "", "answer_text": record.answer_text,
                "options": "" if record.options is None else json.dumps(record.options, ensure_ascii=False),
                "difficulty": "" if record.difficulty is None else repr(record.difficulty),
                "location": record.location, "image_names": list(record.images),
                "image_bytes": [_read(name) for name in record.images],
            }


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def build_dataset(splits: Mapping[str, str], data_dir: str, *, skip_malformed: bool = False
                  ) -> tuple[str, dict[str, tuple[str, ...]]]:
    """Builds the dataset of `splits` (split name -> jsonl file) under `data_dir`.

    Args:
      splits: split name -> jsonl file.
      data_dir: where the dataset goes (<data_dir>/med_rwr_records/1.0.0).
      skip_malformed: leave out malformed rows (and rows naming a missing image) instead
        of stopping; each is logged and returned.

    Returns:
      (the dataset directory, split -> "file:line: problem" of every row left out).

    Raises:
      ValueError: no splits, or a row is malformed (file, line and field named).
      FileNotFoundError: a jsonl file or an image it names is missing.
    """
    if not splits:
        raise ValueError("build_dataset needs at least one split: {name: jsonl path}")
    builder = MedRwrRecords(splits={name: os.path.abspath(path) for name, path in splits.items()},
                            skip_malformed=skip_malformed, data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return str(builder.data_dir), builder.skipped


def is_dataset_dir(path: str) -> bool:
    """True for a directory that `build_dataset` wrote (it holds dataset_info.json)."""
    return os.path.isfile(os.path.join(path, _INFO_FILE))


class TfdsSource:
    """A grain `RandomAccessDataSource` of `Record`s over one split of a built dataset.

    Records are those of the jsonl the split was built from, with `images` their original
    paths (names for messages) and `image_bytes` the encoded images.
    """

    def __init__(self, dataset_dir: str, split: str):
        if not is_dataset_dir(dataset_dir):
            raise FileNotFoundError(f"{dataset_dir!r} is not a dataset directory of build_dataset "
                                    f"(no {_INFO_FILE}); build one with launch/build_dataset.py")
        self.dataset_dir, self.split = os.path.abspath(dataset_dir), split
        builder = tfds.builder_from_directory(self.dataset_dir)
        if split not in builder.info.splits:
            raise ValueError(f"{self.dataset_dir} has no split {split!r}; it has {sorted(builder.info.splits)}")
        self._source = builder.as_data_source(split=split)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> records.Record:
        row = self._source[int(index)]
        text = {k: _text(row[k]) for k in ("id", "question", "answer", "answer_letter", "answer_text", "options",
                                             "difficulty", "location")}
        return records.Record(
            id=text["id"], question=text["question"], answer=text["answer"],
            images=tuple(_text(name) for name in row["image_names"]), image_bytes=tuple(row["image_bytes"]),
            options=json.loads(text["options"]) if text["options"] else None,
            difficulty=float(text["difficulty"]) if text["difficulty"] else None,
            answer_letter=text["answer_letter"] or None,
            answer_text=text["answer_text"], location=text["location"])

    def __repr__(self) -> str:
        return f"TfdsSource({self.dataset_dir!r}, split={self.split!r}, {len(self)} records)"


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def records_source(path: str, split: str, config: records.RecordsConfig = records.RecordsConfig()):
    """A `TfdsSource` for a dataset directory (`split` of it), else a `records.JsonlSource` of a jsonl file."""
    if os.path.isdir(path):
        return TfdsSource(path, split)
    return records.JsonlSource(path, config)
