r"""Builds a TFDS (array_record) dataset of Med-RwR records, images inside, from jsonl files.

    python launch/build_dataset.py --split=train=/data/mm_train.jsonl --split=test=/data/mm_test.jsonl \
        --data_dir=/data/tfds

Every row is checked first (a malformed one stops the build, naming its file and line;
--skip_malformed leaves such rows out and lists them); each split keeps its jsonl order.
Prints the dataset directory: give it to a config as `data.train_path` (training, split
`data.split` = train) or `data.path` (evaluation, split test); the records then read back
without the jsonl files or the images.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from rwr_jax.data import tfds_records  # noqa: E402

_SPLITS = flags.DEFINE_multi_string("split", None, "NAME=FILE.jsonl, once per split (e.g. train=..., test=...).")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the dataset is written (<data_dir>/med_rwr_records/1.0.0).")
_SKIP_MALFORMED = flags.DEFINE_bool("skip_malformed", False, "Leave out malformed rows (and rows naming a missing "
                                    "image), listing them, instead of stopping.")


def parse_splits(items: list[str]) -> dict[str, str]:
    """["train=/a.jsonl", ...] -> {"train": "/a.jsonl", ...}; a malformed or repeated name raises UsageError."""
    splits = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise app.UsageError(f"--split wants NAME=FILE.jsonl, got {item!r}")
        if name in splits:
            raise app.UsageError(f"--split {name!r} given twice")
        splits[name] = path
    return splits


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    dataset, skipped = tfds_records.build_dataset(parse_splits(_SPLITS.value), _DATA_DIR.value,
                                                  skip_malformed=_SKIP_MALFORMED.value)
    for split, problems in skipped.items():
        for problem in problems:
            print(f"left out of {split}: {problem}", file=sys.stderr)
    print(dataset)


if __name__ == "__main__":
    flags.mark_flags_as_required(["split", "data_dir"])
    app.run(main)
