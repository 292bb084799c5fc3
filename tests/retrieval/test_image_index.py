"""CDIR image index: nearest-image search over generated PNGs, manifest checks, row-naming errors."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from rwr_jax.models import hf_conversion
from rwr_jax.models.clip.config import ClipConfig, ClipVisionConfig
from rwr_jax.models.clip.model import ClipImageModel
from rwr_jax.retrieval import image_index, index as index_lib

NUM_CASES = 10
CONFIG = ClipConfig(vision=ClipVisionConfig(hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                                            image_size=32, patch_size=8), projection_dim=16)


def make_encoder(seed: int = 0, batch_size: int = 4) -> image_index.ClipImageEncoder:
    """A tiny image tower with N(0, 0.3) weights (LayerNorm scales around 1), so that images differ clearly."""
    abstract = jax.eval_shape(lambda: ClipImageModel(CONFIG).init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))
    rng = np.random.default_rng(seed)
    flat = {path: (rng.standard_normal(nn_leaf.shape) * 0.3 + (path[-1] == "scale")).astype(np.float32)
            for path, nn_leaf in hf_conversion.flatten_params(nn.unbox(abstract["params"])).items()}
    return image_index.ClipImageEncoder(CONFIG, jax.tree.map(jnp.asarray, hf_conversion.unflatten_params(flat)),
                                        name="tiny-clip", batch_size=batch_size)


def case_row(i: int) -> dict:
    """Rows alternate the three text layouts: caption, text, conversations."""
    row = {"id": f"case{i}" if i % 4 else i, "image": f"images/img{i}.png"}
    if i % 3 == 0:
        row["caption"] = f"CT scan of case {i}"
    elif i % 3 == 1:
        row["text"] = f"X-ray of case {i}"
    else:
        row["conversations"] = [{"from": "human", "value": f"<image>\nWhat is shown in case {i}?"},
                                {"from": "gpt", "value": f"An MRI of case {i}."}]
    return row


def write_corpus(root, rows=None, num=NUM_CASES):
    """Distinct PNGs (4 x 4 random colour blocks, seeded per image, varied sizes) and the corpus.jsonl naming them."""
    os.makedirs(root / "images", exist_ok=True)
    for i in range(num):
        blocks = np.random.default_rng(100 + i).integers(0, 256, (4, 4, 3), dtype=np.uint8)
        image = Image.fromarray(blocks).resize((40 + 3 * i, 36 + 2 * (i % 5)), Image.NEAREST)
        image.save(root / "images" / f"img{i}.png")
    rows = rows if rows is not None else [case_row(i) for i in range(num)]
    with open(root / "corpus.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(root / "corpus.jsonl")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("cdir")
    corpus = image_index.ImageCorpus(write_corpus(root))
    encoder = make_encoder()
    retriever = image_index.build_image_index(str(root / "index"), corpus, encoder, searcher="brute_force",
                                              batch_size=4, chunk_rows=4)
    return root, retriever, encoder


def test_corpus_rows_and_texts(built):
    root, retriever, _ = built
    corpus = retriever.corpus
    assert len(corpus) == NUM_CASES
    assert corpus.case(0) == image_index.Case("0", str(root / "images" / "img0.png"), "CT scan of case 0")
    assert corpus.case(1).text == "X-ray of case 1"
    assert corpus.case(2).text == "What is shown in case 2?\nAn MRI of case 2."


def test_nearest_image_is_the_image_itself(built):
    root, retriever, encoder = built
    paths = [str(root / "images" / f"img{i}.png") for i in range(NUM_CASES)]
    queries = [Image.open(p).convert("RGB") for p in paths[:5]] + paths[5:]  # PIL images and paths
    hits = retriever.search_images(queries, k=3)
    assert len(hits) == NUM_CASES and all(len(h) == 3 for h in hits)
    for i, case_hits in enumerate(hits):
        best = case_hits[0]
        assert (best.row, best.case_id, best.image_path) == (i, retriever.corpus.case(i).id, paths[i])
        assert best.text == retriever.corpus.case(i).text
        assert best.score == pytest.approx(1.0, abs=1e-5)
        assert case_hits[1].score < best.score - 1e-4  # another image is clearly further away
        assert [h.score for h in case_hits] == sorted((h.score for h in case_hits), reverse=True)
    # Batches of 4 (corpus chunks of 4 rows, 10 queries) and 2: one compile per batch bucket.
    assert encoder.num_compiles == 2
    manifest = retriever.index.manifest
    assert manifest["encoder"] == json.loads(json.dumps(encoder.fingerprint()))
    assert manifest["encoder"]["kind"] == "clip_image" and manifest["corpus"]["format"] == "image_jsonl"
    assert manifest["normalized"] and manifest["dim"] == 16


def test_reopened_index_gives_the_same_hits(built):
    root, retriever, encoder = built
    reopened = image_index.open_image_index(str(root / "index"), encoder)
    query = [str(root / "images" / "img7.png")]
    assert reopened.search_images(query, k=4) == retriever.search_images(query, k=4)


def test_encoder_mismatch_is_refused(built):
    root, _, _ = built
    with pytest.raises(ValueError, match=r"manifest.json does not match: encoder\.weights_sha256: index has"):
        image_index.open_image_index(str(root / "index"), make_encoder(seed=1))


def test_missing_image_error_names_the_row(tmp_path):
    path = write_corpus(tmp_path)
    os.remove(tmp_path / "images" / "img6.png")
    corpus = image_index.ImageCorpus(path)
    with pytest.raises(FileNotFoundError, match=r"1 of 10 images .*corpus\.jsonl:7 \(row 6, id 'case6'\): "
                                                r".*img6\.png"):
        image_index.build_image_index(str(tmp_path / "index"), corpus, make_encoder(), searcher="brute_force")


def test_corrupt_image_error_names_the_row(tmp_path):
    path = write_corpus(tmp_path)
    (tmp_path / "images" / "img3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    corpus = image_index.ImageCorpus(path)
    with pytest.raises(ValueError, match=r"corpus\.jsonl:4 \(row 3, id 'case3'\): image .*img3\.png.*"
                                         r"not a readable image"):
        image_index.build_image_index(str(tmp_path / "index"), corpus, make_encoder(), searcher="brute_force")


@pytest.mark.parametrize("row, message", [
    ({"id": "a", "caption": "no image"}, r"corpus\.jsonl:2: field 'image' must be one non-empty path"),
    ({"id": "a", "image": "images/img0.png"}, r"corpus\.jsonl:2: no case text"),
    ({"id": "", "image": "images/img0.png", "caption": "x"}, r"corpus\.jsonl:2: field 'id' must be"),
])
def test_malformed_row_names_file_and_line(tmp_path, row, message):
    path = write_corpus(tmp_path, rows=[case_row(0), row], num=1)
    with pytest.raises(ValueError, match=message):
        image_index.ImageCorpus(path)


def test_text_index_is_not_an_image_index(built, tmp_path):
    _, retriever, encoder = built
    manifest = dict(retriever.index.manifest, corpus=dict(retriever.index.manifest["corpus"], format="jsonl"))
    with pytest.raises(ValueError, match="not an image index"):
        image_index.ImageRetriever(retriever.corpus, index_lib.Index(str(tmp_path), manifest,
                                                                     retriever.index.searcher), encoder)
