"""TFDS (array_record) datasets of records: built from jsonl, read back identical, images inside."""

import dataclasses
import json
import os
import shutil

import numpy as np
import pytest

from rwr_jax.data import demo, records, tfds_records, tokenizer as tokenizer_lib
from rwr_jax.data.pipeline import PipelineConfig, PromptPipeline
from rwr_jax.models.qwen2_vl.vision import VisionConfig


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("tfds")
    paths = demo.generate_demo_data(root / "demo", num_train=6, num_eval=3, seed=5)
    dataset, skipped = tfds_records.build_dataset({"train": paths.train, "test": paths.eval}, str(root / "tfds"))
    assert skipped == {"train": (), "test": ()}
    return paths, dataset


def test_records_read_back_identical_with_their_images_inside(built, tmp_path):
    paths, dataset = built
    assert tfds_records.is_dataset_dir(dataset) and not tfds_records.is_dataset_dir(paths.root)
    for split, jsonl in (("train", paths.train), ("test", paths.eval)):
        source, expected = tfds_records.TfdsSource(dataset, split), records.JsonlSource(jsonl)
        assert len(source) == len(expected)
        for i in range(len(source)):
            record, original = source[i], expected[i]
            assert dataclasses.replace(record, image_bytes=None) == original  # same order, every field
            assert record.image_bytes == tuple(open(p, "rb").read() for p in original.images)
    # Self-contained: the images are read from the dataset, not from where they were.
    moved = tmp_path / "moved"
    shutil.copytree(dataset, moved)
    shutil.rmtree(paths.images_dir)
    try:
        record = tfds_records.TfdsSource(str(moved), "test")[0]
        assert len(record.image_bytes[0]) > 0
    finally:
        demo.generate_demo_data(paths.root, num_train=6, num_eval=3, seed=5)  # the images back for other tests


def test_prompt_batches_equal_those_of_the_jsonl(built):
    paths, dataset = built
    tokenizer = tokenizer_lib.load_tokenizer()
    vision = VisionConfig(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                          fullatt_block_indexes=(0,))
    config = PipelineConfig(batch_size=3, max_prompt_length=512, shuffle=False, num_epochs=1, shard_index=0,
                            shard_count=1)
    ours = next(iter(PromptPipeline(tfds_records.TfdsSource(dataset, "train"), tokenizer, config, vision)))
    reference = next(iter(PromptPipeline(records.JsonlSource(paths.train), tokenizer, config, vision)))
    for name in ("tokens", "token_mask", "positions", "image_grid_thw", "num_image_tokens"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(reference, name), err_msg=name)
    np.testing.assert_array_equal(ours.images.patches, reference.images.patches)
    assert ours.ids == reference.ids and ours.answers == reference.answers


def test_records_source_picks_the_kind_by_path(built):
    paths, dataset = built
    assert isinstance(tfds_records.records_source(dataset, "test"), tfds_records.TfdsSource)
    assert isinstance(tfds_records.records_source(paths.eval, "test"), records.JsonlSource)
    with pytest.raises(ValueError, match=r"has no split 'validation'; it has \['test', 'train'\]"):
        tfds_records.TfdsSource(dataset, "validation")
    with pytest.raises(FileNotFoundError, match="is not a dataset directory of build_dataset"):
        tfds_records.TfdsSource(paths.root, "train")


def test_a_malformed_row_stops_the_build_naming_it_or_is_left_out(tmp_path):
    rows = [{"id": "a", "question": "Q?\nA. x\nB. y", "answer": "A. x", "images": []},
            {"id": "b", "question": "Q?", "answer": 3, "images": []}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'answer'"):
        tfds_records.build_dataset({"train": str(path)}, str(tmp_path / "tfds"))
    with pytest.raises(ValueError, match="at least one split"):
        tfds_records.build_dataset({}, str(tmp_path / "tfds"))
    assert not os.path.exists(tmp_path / "tfds" / tfds_records.DATASET_NAME / tfds_records.VERSION)
    # skip_malformed: the row is left out and reported; the others keep their order.
    rows.append({"id": "c", "question": "Q?\nA. x\nB. y", "answer": "B. y", "images": ["missing.png"]})
    rows.append({"id": "d", "question": "Q?\nA. x\nB. y", "answer": "B. y", "images": []})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dataset, skipped = tfds_records.build_dataset({"train": str(path)}, str(tmp_path / "tfds"), skip_malformed=True)
    assert [problem.split(": ")[0] for problem in skipped["train"]] == [f"{path}:2", f"{path}:3"]
    source = tfds_records.TfdsSource(dataset, "train")
    assert [source[i].id for i in range(len(source))] == ["a", "d"]


def test_training_and_evaluation_configs_read_a_dataset_directory(built, tmp_path):
    from configs import stage2  # pylint: disable=g-import-not-at-top
    from rwr_jax.eval import evaluate  # pylint: disable=g-import-not-at-top
    from rwr_jax.train import trainer  # pylint: disable=g-import-not-at-top
    paths, dataset = built
    cfg = stage2.get_config("demo")
    cfg.data.demo, cfg.data.train_path = False, dataset  # split "train" by default
    tokenizer = tokenizer_lib.load_tokenizer()
    pipeline = trainer.build_pipeline(cfg, str(tmp_path), tokenizer, trainer._demo_model_config(cfg))
    assert pipeline.num_records == 6
    assert set(next(iter(pipeline)).ids) <= {r.id for r in records.JsonlSource(paths.train)}
    source = tfds_records.records_source(dataset, "test")
    assert [r.id for r in evaluate._records(source, 2)] == [r.id for r in records.JsonlSource(paths.eval)][:2]
