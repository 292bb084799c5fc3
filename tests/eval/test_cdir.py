"""CDIR's pieces: who is consulted, what is kept, the fixed blocks, the similar case, the second prompt."""

import numpy as np
import pytest

from configs import common
from rwr_jax.data import records, tokenizer as tokenizer_lib
from rwr_jax.data.pipeline import PipelineConfig
from rwr_jax.eval import cdir
from rwr_jax.models.qwen2_vl.vision import VisionConfig
from rwr_jax.retrieval import image_index
from rwr_jax.retrieval.image_index import ImageHit
from tests.retrieval import test_image_index as image_fixtures
from tests.rl.test_parser import ANSWER, EOS, PASSAGE, QUERY, THINK, make_trajectory

CASE = ImageHit(case_id="c7", row=7, image_path="/data/img7.png", text="Imaging shows two red rings. Diagnosis: X.",
                score=0.93)
BLOCKS = ("<think> I need a consultation from a case with similar imaging findings before I answer. </think> "
          "<query> consultation from similar medical imaging case </query>")


@pytest.mark.parametrize("kwargs, message", [
    (dict(threshold=0.0), "threshold must be in"), (dict(threshold=1.5), "threshold must be in"),
    (dict(max_case_tokens=0), "max_case_tokens must be >= 1"), (dict(think="see <query>"), "cdir.think must be"),
    (dict(query=" "), "cdir.query must be"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        cdir.CdirConfig(**kwargs)


def test_who_is_consulted():
    image = records.Record(id="a", question="q", images=("/x.png",), answer="A. y")
    text = records.Record(id="b", question="q", answer="A. y")
    assert cdir.wants_consultation(image, 0.5, 0.9) and cdir.wants_consultation(image, None, 0.9)  # None: no answer
    assert not cdir.wants_consultation(image, 0.9, 0.9) and not cdir.wants_consultation(image, 0.99, 0.9)
    assert not cdir.wants_consultation(text, 0.1, 0.9) and not cdir.wants_consultation(text, None, 0.9)


def test_kept_completion_ends_with_the_last_retrieved_block():
    tokenizer = tokenizer_lib.load_tokenizer()
    second = "<retrieve> (1) A <answer>C</answer> tag in a passage.\n </retrieve>"
    traj = make_trajectory([("m", THINK + QUERY), ("e", PASSAGE), ("m", QUERY), ("e", second),
                            ("m", "<think>so</think>" + ANSWER + EOS)],
                           [("m", THINK + ANSWER + EOS)])
    kept = cdir.kept_completion(traj.tokens[0], traj.source[0], int(traj.length[0]))
    assert tokenizer.decode(kept.tolist()) == THINK + QUERY + PASSAGE + QUERY + second
    assert kept.dtype == np.int32
    assert cdir.kept_completion(traj.tokens[1], traj.source[1], int(traj.length[1])).size == 0


def test_consultation_blocks():
    tokenizer = tokenizer_lib.load_tokenizer()
    config = cdir.CdirConfig()
    block = "<retrieve> (1) Imaging shows two red rings. Diagnosis: X.\n </retrieve>"
    assert tokenizer.decode(cdir.consultation_ids(tokenizer, CASE, config, continues=False)) == BLOCKS + block
    assert tokenizer.decode(cdir.consultation_ids(tokenizer, CASE, config, continues=True)) == " " + BLOCKS + block
    short = cdir.consultation_ids(tokenizer, CASE, cdir.CdirConfig(max_case_tokens=16), continues=False)
    text = tokenizer.decode(short)
    assert text.startswith(BLOCKS + "<retrieve> (1) Imaging") and text.endswith("\n </retrieve>")
    assert len(tokenizer.encode(text[len(BLOCKS):])) <= 16 < len(tokenizer.encode(block))


def test_nearest_case_is_never_the_query_image_itself(tmp_path):
    corpus = image_index.ImageCorpus(image_fixtures.write_corpus(tmp_path))
    retriever = image_index.build_image_index(str(tmp_path / "index"), corpus, image_fixtures.make_encoder(),
                                              searcher="brute_force", batch_size=4, chunk_rows=4)
    inside = str(tmp_path / "images" / "img3.png")
    outside = str(tmp_path / "copy.png")
    with open(inside, "rb") as f, open(outside, "wb") as g:
        g.write(f.read())
    hits = retriever.search_images([inside], k=2)[0]
    assert hits[0].image_path == inside  # the search itself finds the image first
    found = cdir.nearest_cases(retriever, [records.Record(id=str(i), question="q", images=(path,), answer="A")
                                           for i, path in enumerate((inside, outside))])
    assert (found[0].case_id, found[0].image_path) == (hits[1].case_id, hits[1].image_path)
    assert found[0].score == pytest.approx(hits[1].score, abs=1e-5)  # (batched: fp32 rounding)
    assert found[1].image_path == inside  # another file with the same pixels is a fair case


def test_nearest_case_of_a_record_with_two_images_is_the_best_match_of_either(tmp_path):
    corpus = image_index.ImageCorpus(image_fixtures.write_corpus(tmp_path))
    retriever = image_index.build_image_index(str(tmp_path / "index"), corpus, image_fixtures.make_encoder(),
                                              searcher="brute_force", batch_size=4, chunk_rows=4)
    inside, copy = str(tmp_path / "images" / "img3.png"), str(tmp_path / "copy5.png")
    with open(tmp_path / "images" / "img5.png", "rb") as f, open(copy, "wb") as g:
        g.write(f.read())
    first_only = cdir.nearest_cases(retriever, [records.Record(id="a", question="q", images=(inside,), answer="A")])
    both, swapped = cdir.nearest_cases(retriever, [
        records.Record(id=i, question="q", images=images, answer="A")
        for i, images in (("b", (inside, copy)), ("c", (copy, inside)))])
    assert first_only[0].image_path != str(tmp_path / "images" / "img5.png")
    # The second image's copy matches corpus image 5 exactly: the best case over both images, in either order.
    assert both.image_path == swapped.image_path == str(tmp_path / "images" / "img5.png")
    assert both.score == pytest.approx(1.0, abs=1e-5) and both.score > first_only[0].score
    img5 = str(tmp_path / "images" / "img5.png")
    own = cdir.nearest_cases(retriever, [records.Record(id="d", question="q", images=(inside, img5), answer="A")])
    assert own[0].image_path not in (inside, img5)  # neither own file counts


def test_second_pass_prompt_adds_the_case_image_and_continues_the_kept_completion(tmp_path):
    tokenizer = tokenizer_lib.load_tokenizer()
    image_fixtures.write_corpus(tmp_path, rows=[], num=2)
    record = records.Record(id="r1", question="Which condition?\nA. x\nB. y", images=(str(tmp_path / "images" /
                                                                                          "img0.png"),),
                            answer="B. y", answer_letter="B", answer_text="y", location="test.jsonl:1")
    case = ImageHit(case_id="c1", row=1, image_path=str(tmp_path / "images" / "img1.png"), text="Case one.",
                    score=0.5)
    vision = VisionConfig(**dict(common.demo_text_model(vision=True).vision))
    config = PipelineConfig(batch_size=2, max_prompt_length=512, length_bucket=None, max_images_per_prompt=1)
    prompts = cdir.SecondPassPrompts(tokenizer, config, vision, cdir.CdirConfig(), max_completion_length=64)
    kept = np.asarray(tokenizer.encode(THINK + QUERY + PASSAGE), np.int32)
    batch = prompts([(record, kept, case)])
    assert batch.tokens.shape[0] == 2 and batch.example_mask.tolist() == [True, False]
    assert batch.num_images.tolist() == [2, 2]  # the short batch is filled with copies
    assert batch.ids == ("r1", "r1")
    tokens = batch.tokens[0][batch.token_mask[0]].tolist()
    tail = kept.tolist() + cdir.consultation_ids(tokenizer, case, cdir.CdirConfig(), continues=True)
    assert tokens[-len(tail):] == tail
    text = tokenizer.decode(tokens)
    assert text.count("<|vision_start|>") == 2 and text.index("<|vision_end|>") < text.index("Which condition?")
    assert text[:-len(tokenizer.decode(tail))].endswith("<|im_start|>assistant\n")
    assert batch.tokens.shape[1] % 64 == 0  # bucketed: length_bucket None -> 64
    with pytest.raises(ValueError, match="1 to 2 items"):
        prompts([])
