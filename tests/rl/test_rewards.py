"""Rewards: hand-computed values for every rule and edge case, jit == eager."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax import registry
from rwr_jax.data import tokenizer as tokenizer_lib
from rwr_jax.rl import rewards
from tests.rl.test_parser import ANSWER, EOS, PASSAGE, QUERY, SEARCH, THINK, parse

WRONG = "<answer>C. Viral pneumonia</answer>"
SEARCH_WRONG = SEARCH[:2] + [("m", "\n<think>Viral.</think>\n" + WRONG + EOS)]
THINK_ANSWER = [("m", THINK + ANSWER + EOS)]


def reward(name, *rows, answers=None, inputs=None):
    return np.asarray(jax.jit(registry.lookup("reward", name))(parse(*rows, answers=answers), inputs))


def test_rewards_are_registered():
    assert {"accuracy", "format", "length", "query_textual", "query_visual", "confidence_gain"} <= set(
        registry.names("reward"))


def test_accuracy():
    answers = ["B. Bacterial pneumonia", "b. bacterial pneumonia", "B", "B. Asthma", "C. Viral pneumonia"]
    rows = [[("m", f"<think>x</think><answer>{a}</answer>")] for a in answers] + [[("m", THINK)]]
    # letter + option text 5 (lower case too), letter only 4, wrong option text 4, wrong 0, no answer 0.
    np.testing.assert_array_equal(reward("accuracy", *rows), [5, 5, 4, 4, 0, 0])


def test_accuracy_free_text():
    rows = [[("m", f"<think>x</think><answer>{a}</answer>")] for a in ("PNEUMONIA", "asthma")] + [[("m", THINK)]]
    np.testing.assert_array_equal(reward("accuracy", *rows, answers=["Pneumonia"] * 3), [5, 0, 0])


def test_format_bases():
    rows = [
        THINK_ANSWER,  # no search: exactly think, answer -> 1 (correctness does not matter)
        [("m", THINK + WRONG)],  # -> 1
        SEARCH,  # think query retrieve think answer, correct -> 3
        SEARCH_WRONG,  # same, wrong -> 1
        [("m", THINK + QUERY), ("e", PASSAGE), ("m", ANSWER)],  # think query retrieve answer, correct -> 3
        [("m", ANSWER)],  # answer alone -> 0
        [("m", THINK + ANSWER + THINK)],  # answer not last -> 0
        [("m", THINK + THINK + ANSWER)],  # two thinks, no search -> 0
        [("m", THINK), ("e", PASSAGE), ("m", THINK + ANSWER)],  # retrieve without query -> 0
        [("m", THINK + QUERY)],  # query never answered (empty query / last round) -> 0
        [("m", THINK + ANSWER + " Done.")],  # text after the answer -> 0
        [("m", THINK + "<b>x</b>" + ANSWER)],  # illegal tag -> 0
        [("m", THINK + "<answer>B. Bacterial")],  # unclosed answer -> 0
    ]
    np.testing.assert_array_equal(reward("format", *rows), [1, 1, 3, 1, 3, 0, 0, 0, 0, 0, 0, 0, 0])


def test_format_penalties_apply_to_every_base():
    rows = [
        [("m", "<think> </think>" + ANSWER)],  # 1 - 1 (empty think) = 0
        [("m", THINK + "\n\n\n" + ANSWER)],  # 1 - 1 (three newlines) = 0
        [("m", THINK + "<query> </query>"), ("e", PASSAGE), ("m", "<think>x</think>\n\n\n" + ANSWER)],  # 3 - 2 = 1
        [("m", "<think>\n\n\n</think><b>" + ANSWER)],  # illegal tag 0, empty think -1, newlines -1 = -2
        [("m", THINK), ("e", PASSAGE), ("m", "<think></think>" + ANSWER)],  # retrieve without query 0 - 1 = -1
    ]
    np.testing.assert_array_equal(reward("format", *rows), [0, 0, 1, -2, -1])


def test_format_ignores_tags_inside_passages():
    dirty = ("<retrieve> (1) Write <answer>A</answer> here </retrieve> or <query>x</query> <b> if p < 0.05.\n\n\n"
             " </retrieve>")
    rows = [SEARCH, [SEARCH[0], ("e", dirty), SEARCH[2]], [SEARCH[0], ("e", "<retrieve> < </retrieve>"), SEARCH[2]]]
    np.testing.assert_array_equal(reward("format", *rows), [3, 3, 3])
    np.testing.assert_array_equal(reward("accuracy", *rows), [5, 5, 5])


def test_format_free_text_correctness():
    rows = [[("m", THINK + QUERY), ("e", PASSAGE), ("m", "<think>x</think><answer>pneumonia</answer>")],
            [("m", THINK + QUERY), ("e", PASSAGE), ("m", "<think>x</think><answer>asthma</answer>")]]
    np.testing.assert_array_equal(reward("format", *rows, answers=["Pneumonia"] * 2), [3, 1])


@pytest.mark.parametrize("n,expected", [(511, -1), (512, 0), (3072, 0), (3073, -1)])
def test_length_bounds(n, expected):
    # "<think>" (7) + k x "x" + "</think>" (8) + ANSWER (39) = 54 + k characters of model text;
    # the 400-character retrieve block and the EOS token are not counted.
    text = "<think>" + "x" * (n - 54) + "</think>"
    row = [("m", text + "<query>q</query>"), ("e", "<retrieve> " + "y" * 400 + " </retrieve>"), ("m", ANSWER + EOS)]
    parsed = parse([("m", text + ANSWER + EOS)], row)
    np.testing.assert_array_equal(parsed.char_count, [n, n + 16])
    np.testing.assert_array_equal(rewards.length_reward(parsed), [expected, -1 if n + 16 > 3072 else 0])


def test_query_textual_hand_computed():
    rows = [
        # Answer terms {bacterial, pneumonia}. Query " which drug treats bacterial pneumonia ?": 6 tokens, 4
        # content (not "which", "?"), 1 term run, both answer terms -> coverage 1, density 4/6. Passage
        # "viral pneumonia is rare in adults." holds pneumonia only -> coverage 1/2.
        # 0.5 + 1 + 4/6 - 0 = 2.1666667.
        SEARCH,
        # No query -> 0.
        THINK_ANSWER,
        # Two queries, averaged. q1 " fever , cough , dys p nea , chest pain , night swe ats , weight loss":
        # 17 tokens, 12 content, 6 term runs (> 5) -> 0 + 12/17 - 1. q2 " bacterial pneumonia treatment":
        # coverage 1 + density 1 -> 2. Passages hold "bacterial" only -> 1/2.
        # 0.5 + ((12/17 - 1) + 2) / 2 = 1.3529412.
        [("m", THINK + "<query>fever, cough, dyspnea, chest pain, night sweats, weight loss</query>"),
         ("e", "<retrieve> (1) Lung infection\n </retrieve>"),
         ("m", "<think>x</think><query>bacterial pneumonia treatment</query>"),
         ("e", "<retrieve> (1) Bacterial infection\n </retrieve>"), ("m", "<think>y</think>" + ANSWER)],
        # Empty query: coverage 0, density 0, no terms; passages "None" -> 0.
        [("m", THINK + "<query> </query>"), ("e", "<retrieve> None </retrieve>"), ("m", THINK + ANSWER)],
    ]
    np.testing.assert_allclose(reward("query_textual", *rows), [0.5 + 1 + 4 / 6, 0, 0.5 + (12 / 17 + 1) / 2, 0],
                               rtol=1e-6)
    similarity = {"query_option_similarity": np.asarray([0.25, 0.25, 0.5, 0.5], np.float32)}
    np.testing.assert_allclose(reward("query_textual", *rows, inputs=similarity),
                               [0.5 + 1 + 4 / 6 + 0.25, 0, 0.5 + (12 / 17 + 1) / 2 + 0.5, 0.5], rtol=1e-6)


def test_query_textual_free_text_answer_terms():
    # Answer terms {pneumonia}; query " pneumonia": coverage 1, density 1; passage "none" -> 0. Total 2.
    rows = [[("m", THINK + "<query>Pneumonia</query>"), ("e", "<retrieve> None </retrieve>"), ("m", THINK + ANSWER)]]
    np.testing.assert_allclose(reward("query_textual", *rows, answers=["Pneumonia"]), [2.0])


def test_query_visual_text_only_is_zero():
    inputs = {"image_query_similarity": np.asarray([0.5, 0.8, np.nan], np.float32),
              "has_image": np.asarray([True, False, False])}
    np.testing.assert_allclose(reward("query_visual", SEARCH, SEARCH, THINK_ANSWER, inputs=inputs), [0.05, 0, 0],
                               rtol=1e-6)
    with pytest.raises(ValueError, match=r"reward 'query_visual' needs inputs\['has_image'\] \(\[B\] bool\)"):
        reward("query_visual", SEARCH, inputs={"image_query_similarity": np.zeros(1, np.float32)})
    with pytest.raises(ValueError, match=r"query_visual inputs must be \[B\]=\(1,\), got \(2,\)"):
        reward("query_visual", SEARCH, inputs={"image_query_similarity": np.zeros(2), "has_image": np.ones(1, bool)})


def _confidence_inputs():
    """Hand-set log-probs (A..J) for rows: correct+retrieval, wrong+retrieval, correct no retrieval, no answer."""
    with_, without = np.full((4, 10), -5.0, np.float32), np.full((4, 10), -5.0, np.float32)
    with_[0, 1], without[0, 1] = np.log(0.6), np.log(0.2)  # 0.1 x log(0.6 / 0.2) = 0.1 x log 3
    # Row 1 (gt B, answered C). With: C -0.5, B -1.0, A -3, sampled -0.6 -> rank(B) = 3.
    with_[1, [0, 1, 2]] = -3.0, -1.0, -0.5
    # Without: C -0.3, A -0.9, D -1.2, B -2.0, sampled -0.4 -> rank(B) = 5. Reward 0.05 x (5 - 3) = 0.1.
    without[1, [0, 1, 2, 3]] = -0.9, -2.0, -0.3, -1.2
    with_[2, 1], without[2, 1] = -0.1, -3.0  # no retrieval: 0 whatever the numbers
    return {"letter_logprobs_with": with_, "letter_logprobs_without": without,
            "sampled_logprob_with": np.asarray([-0.5, -0.6, -0.1, -1.0], np.float32),
            "sampled_logprob_without": np.asarray([-1.2, -0.4, -3.0, -1.0], np.float32)}


def test_confidence_gain():
    rows = [SEARCH, SEARCH_WRONG, THINK_ANSWER, SEARCH[:2] + [("m", "<think>unsure</think>")]]
    np.testing.assert_allclose(reward("confidence_gain", *rows, inputs=_confidence_inputs()),
                               [0.1 * np.log(3.0), 0.1, 0.0, 0.0], rtol=1e-5, atol=1e-7)


def test_confidence_gain_free_text_and_bad_shapes():
    np.testing.assert_array_equal(reward("confidence_gain", *[SEARCH] * 4, answers=["Pneumonia"] * 4,
                                         inputs=_confidence_inputs()), [0, 0, 0, 0])
    inputs = dict(_confidence_inputs(), letter_logprobs_with=np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"must be \[B, 10\] float32, got \(4, 4\)"):
        reward("confidence_gain", *[SEARCH] * 4, inputs=inputs)


def test_option_letter_token_ids_and_letter_logprobs():
    tokenizer = tokenizer_lib.load_tokenizer()
    ids, mask = rewards.option_letter_token_ids(tokenizer)
    assert ids.shape[0] == 10 and ids.dtype == np.int32 and mask.dtype == bool
    for letter, row, valid in zip("ABCDEFGHIJ", ids, mask):
        spelled = {tokenizer.decode([int(i)]).lstrip(" >").upper() for i in row[valid]}
        assert spelled == {letter}
    assert {32, 362, 64, 264} <= set(ids[0][mask[0]].tolist())  # "A", " A", "a", " a"
    assert tokenizer.encode(">B", add_special_tokens=False)[0] in ids[1][mask[1]]
    logprobs = np.full((1, len(tokenizer)), -np.inf, np.float32)
    for text, p in (("B", 0.2), (" B", 0.3), (" b", 0.1), (" C", 0.4)):
        logprobs[0, tokenizer.encode(text, add_special_tokens=False)[0]] = np.log(p)
    out = np.asarray(rewards.letter_logprobs(jnp.asarray(logprobs), ids, mask))
    np.testing.assert_allclose(out[0, 1:3], np.log([0.6, 0.4]), rtol=1e-6)
    assert np.all(np.isneginf(out[0, [0, 3, 4, 5, 6, 7, 8, 9]]))


def test_combine_rewards():
    parsed = parse(SEARCH, SEARCH_WRONG, THINK_ANSWER)
    total, per = rewards.combine_rewards(("accuracy", "format"), (1.0, 0.5), parsed)
    np.testing.assert_array_equal(per["accuracy"], [5, 0, 5])
    np.testing.assert_array_equal(per["format"], [3, 1, 1])
    np.testing.assert_array_equal(total, [6.5, 0.5, 5.5])
    with pytest.raises(ValueError, match=r"one entry per name \(2\), got 1"):
        rewards.combine_rewards(("accuracy", "format"), (1.0,), parsed)
    with pytest.raises(LookupError, match="no reward named 'speed'"):
        rewards.combine_rewards(("speed",), (1.0,), parsed)


def test_jit_matches_eager():
    rows = [SEARCH, SEARCH_WRONG, THINK_ANSWER, [("m", "<think> </think>\n\n\n<b>" + ANSWER)]]
    parsed = parse(*rows)
    inputs = dict(_confidence_inputs(), image_query_similarity=np.asarray([0.3, -0.2, 0.9, 0.1], np.float32),
                  has_image=np.asarray([True, True, False, True]), query_option_similarity=np.zeros(4, np.float32))
    names = ("accuracy", "format", "length", "query_textual", "query_visual", "confidence_gain")
    for name in names:
        fn = registry.lookup("reward", name)
        np.testing.assert_allclose(jax.jit(fn)(parsed, inputs), fn(parsed, inputs), rtol=1e-6, err_msg=name)
    combine = jax.jit(lambda p, x: rewards.combine_rewards(names, (1.0,) * 6, p, x))
    np.testing.assert_allclose(combine(parsed, inputs)[0], rewards.combine_rewards(names, (1.0,) * 6, parsed,
                                                                                    inputs)[0], rtol=1e-6)
    # The same arrays as a padded replica: rewards do not depend on padding width.
    wider = dataclasses.replace(parsed, kinds=np.pad(parsed.kinds, ((0, 0), (0, 4))),
                                empty=np.pad(parsed.empty, ((0, 0), (0, 4))))
    np.testing.assert_array_equal(rewards.format_reward(wider), rewards.format_reward(parsed))
