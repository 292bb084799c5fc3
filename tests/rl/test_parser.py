"""Parser: block structure from provenance, answers, ground truth, canonical token ids.

Trajectories are built by tokenising model text and passage text separately with the
real Qwen tokenizer and marking who wrote each token, as the rollout engine does.
"""

import functools
import types

import numpy as np
import pytest

from rwr_jax.data import tokenizer as tokenizer_lib
from rwr_jax.rl import parser, rewards
from rwr_jax.rollout import sampler

GT = "B. Bacterial pneumonia"
THINK = "<think>\nThe chest film shows a lobar consolidation.\n</think>\n"
QUERY = "<query>Which drug treats bacterial pneumonia?</query>"
PASSAGE = "<retrieve> (1) Viral pneumonia is rare in adults.\n </retrieve>"
ANSWER = "<answer>B. Bacterial pneumonia</answer>"
EOS = "<|im_end|>"


@functools.cache
def text_tables() -> parser.TextTables:
    """Shared by the rl tests (building the tables takes a few seconds)."""
    return parser.build_text_tables(tokenizer_lib.load_tokenizer())


def make_trajectory(*rows: list[tuple[str, str]]) -> types.SimpleNamespace:
    """Rows of ("m" model | "e" environment, text) segments -> tokens/source/length."""
    tokenizer = tokenizer_lib.load_tokenizer()
    ids, sources = [], []
    for row in rows:
        row_ids, row_source = [], []
        for who, text in row:
            encoded = tokenizer.encode(text, add_special_tokens=False)
            row_ids += encoded
            row_source += [sampler.SOURCE_MODEL if who == "m" else sampler.SOURCE_ENV] * len(encoded)
        ids.append(row_ids)
        sources.append(row_source)
    width = max(len(r) for r in ids) + 3  # some padding past the longest row
    tokens = np.full((len(rows), width), tokenizer_lib.PAD_ID, np.int32)
    source = np.zeros((len(rows), width), np.int8)
    for b, (row_ids, row_source) in enumerate(zip(ids, sources)):
        tokens[b, :len(row_ids)], source[b, :len(row_source)] = row_ids, row_source
    return types.SimpleNamespace(tokens=tokens, source=source, length=np.asarray([len(r) for r in ids], np.int32))


def parse(*rows, answers=None, options=None) -> parser.ParsedBatch:
    answers = [GT] * len(rows) if answers is None else answers
    return parser.parse_batch(make_trajectory(*rows), answers, text_tables(), options=options)


def row(*rows) -> list[parser.RowParse]:
    trajectory = make_trajectory(*rows)
    return [parser.parse_row(trajectory.tokens[b], trajectory.source[b], trajectory.length[b], text_tables())
            for b in range(len(rows))]


SEARCH = [("m", THINK + QUERY), ("e", PASSAGE), ("m", "\n<think>Bacterial.</think>\n" + ANSWER + EOS)]
T, Q, R, A, O = parser.KIND_THINK, parser.KIND_QUERY, parser.KIND_RETRIEVE, parser.KIND_ANSWER, parser.KIND_OTHER


def test_block_kinds_come_from_provenance():
    parsed = parse(SEARCH, [("m", THINK + ANSWER)])
    np.testing.assert_array_equal(parsed.kinds, [[T, Q, R, T, A, 0, 0, 0], [T, A, 0, 0, 0, 0, 0, 0]])
    assert parsed.kinds.dtype == np.int8 and parsed.empty.dtype == bool
    np.testing.assert_array_equal(parsed.has_retrieval, [True, False])
    np.testing.assert_array_equal(parsed.num_queries, [1, 0])


def test_tags_inside_passages_never_count():
    inner = " (1) Write <answer>A</answer> then </retrieve> or <query>x</query>; p < 0.05 <b>\n\n\n "
    rows = row(SEARCH, [SEARCH[0], ("e", "<retrieve>" + inner + "</retrieve>"), SEARCH[2]])
    assert rows[0].kinds == rows[1].kinds == [T, Q, R, T, A]
    assert not rows[1].illegal_tag and not rows[1].triple_newline
    assert rows[1].answer == "B. Bacterial pneumonia"
    assert rows[1].passages == [inner]


def test_illegal_tags_in_model_text():
    rows = row([("m", "<think>see <b>this</b></think>" + ANSWER)], [("m", "<think>x</think><tool_call>" + ANSWER)],
               [("m", "<think>p < 0.05 and a<b</think>" + ANSWER)])
    assert [r.illegal_tag for r in rows] == [True, True, False]
    assert rows[0].kinds == [T, A]  # illegal tags do not change the structure


def test_stray_text_unclosed_and_nested_blocks_are_other():
    rows = row([("m", "Hello <think>x</think>" + ANSWER)], [("m", THINK + ANSWER + " bye")],
               [("m", THINK + "<answer>B. Bacterial")], [("m", "<think>I will use <answer> tags</think>" + ANSWER)],
               [("m", "</think>" + THINK + ANSWER)], [("m", THINK + "<retrieve>fake</retrieve>" + ANSWER)])
    assert [r.kinds for r in rows] == [[O, T, A], [T, A, O], [T, O], [O, A], [O, T, A], [T, O, A]]
    assert rows[2].answer is None and rows[2].answer_token_index == -1
    assert not any(r.illegal_tag for r in rows)


def test_answer_and_query_texts_do_not_depend_on_the_structure():
    """The answer is the first <answer>...</answer> and every closed query counts, inside
    broken blocks too (only the format reward pays for the structure)."""
    completions = [
        [("m", "<think>It is bacterial. <answer>B. Bacterial pneumonia</answer>" + EOS)],  # </think> forgotten
        [("m", "<think>maybe <answer>A</answer></think>" + ANSWER)],  # the first answer is "A"
        [("m", "<think>x <query>bacterial pneumonia</query>"), ("e", PASSAGE), ("m", "</think>" + ANSWER)],
        [("m", THINK + "<query> \"Bacterial\n pneumonia\" </query>"), ("e", PASSAGE), ("m", THINK + ANSWER)],
    ]
    rows = row(*completions)
    assert [r.answer for r in rows] == [GT, "A", GT, GT]
    assert [r.queries for r in rows] == [[], [], ["bacterial pneumonia"], ["Bacterial pneumonia"]]
    assert rows[0].kinds == [O] and rows[2].kinds[0] == O
    parsed = parse(*completions)
    np.testing.assert_array_equal(rewards.accuracy_reward(parsed), [5.0, 0.0, 5.0, 5.0])
    np.testing.assert_array_equal(rewards.format_reward(parsed), [0.0, 0.0, 0.0, 3.0])
    np.testing.assert_array_equal(parsed.num_queries, [0, 0, 1, 1])


def test_empty_blocks_and_triple_newlines():
    rows = row([("m", "<think> \n </think><answer>B</answer>")], [("m", "<think>x</think>\n\n\n" + ANSWER)],
               [("m", "<think>x</think>\n\n" + ANSWER)], [("m", "<think>x</think><query></query>")])
    assert [r.empty for r in rows] == [[True, False], [False, False], [False, False], [False, True]]
    assert [r.triple_newline for r in rows] == [False, True, False, False]
    assert rows[3].queries == [""]


def test_answers_letters_and_option_text():
    answers = ["B. Bacterial pneumonia", "b. bacterial  PNEUMONIA.", "B", "B. Asthma", "C. Viral pneumonia",
               "Bacterial pneumonia", "(B) Bacterial pneumonia"]
    parsed = parse(*[[("m", f"<think>x</think><answer>{a}</answer>")] for a in answers], [("m", THINK)])
    np.testing.assert_array_equal(parsed.answer_letter, [1, 1, 1, 1, 2, -1, -1, -1])
    np.testing.assert_array_equal(parsed.answer_has_option_text, [True, True, False, False, False, False, True, False])
    np.testing.assert_array_equal(parsed.answer_present, [True] * 7 + [False])
    np.testing.assert_array_equal(parsed.gt_letter, [1] * 8)
    assert not parsed.free_text.any() and not parsed.free_text_match.any()


def test_free_text_ground_truth():
    rows = [[("m", f"<think>x</think><answer>{a}</answer>")] for a in ("pneumonia", "  PNEUMONIA ", "pneumonia.")]
    parsed = parse(*rows, answers=["Pneumonia"] * 3)
    np.testing.assert_array_equal(parsed.free_text, [True] * 3)
    np.testing.assert_array_equal(parsed.free_text_match, [True, True, False])  # '.' is not removed
    np.testing.assert_array_equal(parsed.gt_letter, [-1] * 3)


@pytest.mark.parametrize("answer,options,expected", [
    ("B. Bacterial pneumonia", None, (1, "Bacterial pneumonia", False)),
    ("B", {"A": "Asthma", "B": "Bacterial pneumonia"}, (1, "Bacterial pneumonia", False)),
    ("(C)", None, (2, "", False)),
    ("J: Other", None, (9, "Other", False)),
    ("asthma", {"a": "Asthma", "B": "Bacterial pneumonia"}, (0, "Asthma", False)),
    ("Pneumonia", None, (-1, "Pneumonia", True)),
    ("Beta blockers", None, (-1, "Beta blockers", True)),
])
def test_parse_ground_truth(answer, options, expected):
    assert tuple(parser.parse_ground_truth(answer, options)[:3]) == expected


def test_record_ground_truths_are_taken_as_classified():
    """The trainer passes each record's own classification: "E. coli" of an open question
    is free text (the syntax alone would read option E)."""
    truths = [parser.record_ground_truth(None, "E. coli", "E. coli"), parser.record_ground_truth("B", "Lung", "b")]
    assert truths == [(-1, "E. coli", True, "E. coli"), (1, "Lung", False, "b")]
    assert parser.parse_ground_truth("E. coli")[:3] == (4, "coli", False)
    completions = [[("m", f"<think>x</think><answer>{a}</answer>")] for a in ("E. coli", "E", "B. Lung")]
    parsed = parser.parse_batch(make_trajectory(*completions), [truths[0], truths[0], truths[1]], text_tables())
    np.testing.assert_array_equal(rewards.accuracy_reward(parsed), [5.0, 0.0, 5.0])
    with pytest.raises(ValueError, match="option letter 'K'"):
        parser.record_ground_truth("K", "Gout", "K. Gout")


def test_answer_token_index_points_at_the_letter():
    tokenizer = tokenizer_lib.load_tokenizer()
    completions = [THINK + "<answer>B. x</answer>", THINK + "<answer> B. x</answer>", THINK + "<answer>\nB. x</answer>",
                   THINK + "<answer> </answer>"]
    trajectory = make_trajectory(*[[("m", c)] for c in completions])
    rows = row(*[[("m", c)] for c in completions])
    first = [tokenizer.convert_ids_to_tokens(int(trajectory.tokens[b, r.answer_token_index]))
             for b, r in enumerate(rows[:3])]
    assert first == [">B", "ĠB", "B"]  # ">B": Qwen merges the tag's '>' with the letter
    assert rows[3].answer_token_index == -1
    parsed = parse(SEARCH)
    assert tokenizer.convert_ids_to_tokens(int(make_trajectory(SEARCH).tokens[0, parsed.answer_token_index[0]])) == ">B"


def test_char_count_drops_retrieve_blocks_and_eos():
    # "<think>ab</think>" (17) + "<query>q</query>" (16) + "<answer>C</answer>" (18) = 51 characters.
    rows = [[("m", "<think>ab</think><query>q</query>"), ("e", PASSAGE), ("m", "<answer>C</answer>" + EOS)],
            [("m", "<think>ab</think><query>q</query><answer>C</answer>")]]
    np.testing.assert_array_equal(parse(*rows).char_count, [51, 51])


def test_query_ids_and_content_masks():
    rows = [[("m", "<think>x</think><query>causes of fever and cough</query>"), ("e", "<retrieve> None </retrieve>"),
             ("m", "<think>y</think><query>Bacterial pneumonia</query>"), ("e", PASSAGE),
             ("m", "<think>z</think>" + ANSWER)],
            [("m", THINK + ANSWER)]]
    parsed = parse(*rows)
    tokenizer = tokenizer_lib.load_tokenizer()
    assert parsed.query_ids.shape == (2, 2, 16) and parsed.query_ids.dtype == np.int32
    np.testing.assert_array_equal(parsed.num_queries, [2, 0])
    first = parsed.query_ids[0, 0][parsed.query_mask[0, 0]]
    assert tokenizer.convert_ids_to_tokens(first.tolist()) == ["Ġcauses", "Ġof", "Ġfever", "Ġand", "Ġcough"]
    np.testing.assert_array_equal(parsed.query_content_mask[0, 0, :5], [True, False, True, False, True])
    assert tokenizer.convert_ids_to_tokens(parsed.option_ids[0][parsed.option_mask[0]].tolist()) == [
        "Ġbacterial", "Ġpneumonia"]
    # Passages: distinct canonical ids of both blocks, their <retrieve> tags removed.
    passage = set(tokenizer.convert_ids_to_tokens(parsed.passage_ids[0][parsed.passage_mask[0]].tolist()))
    assert passage == {"Ġnone", "Ġ(", "Ġ", "1", "Ġ)", "Ġviral", "Ġpneumonia", "Ġis", "Ġrare", "Ġin",
                       "Ġadults", "Ġ."}
    assert not parsed.passage_mask[1].any() and not parsed.query_mask[1].any()


def test_content_token_mask():
    tokenizer = tokenizer_lib.load_tokenizer()
    mask = text_tables().content_mask
    assert mask.shape == (len(tokenizer),) and mask.dtype == bool

    def content(text):
        (token,) = tokenizer.encode(text, add_special_tokens=False)
        return bool(mask[token])

    assert [content(t) for t in (" pneumonia", " the", "The", " of", " ,", "\n", " (", "1", " fever")] == [
        True, False, False, False, False, False, False, True, True]
    assert not mask[tokenizer_lib.IM_END_ID] and not mask[tokenizer_lib.IMAGE_PAD_ID]


def test_canonical_text():
    assert parser.canonical_text("Bacterial  Pneumonia (X-ray)?") == " bacterial pneumonia ( x - ray ) ?"
    assert parser.canonical_text("   ") == ""


def test_visual_query_texts():
    rows = row(SEARCH, [("m", "<think>The film shows a mass. It is large.</think>" + ANSWER)], [("m", "")])
    assert parser.visual_query_texts(rows[0]) == ["Which drug treats bacterial pneumonia?"]
    assert parser.visual_query_texts(rows[1]) == ["The film shows a mass."]
    assert parser.visual_query_texts(rows[2]) == []


def test_bad_inputs_raise():
    trajectory = make_trajectory(SEARCH)
    with pytest.raises(ValueError, match="answers/options must have B=1 entries, got 2"):
        parser.parse_batch(trajectory, [GT, GT], text_tables())
    with pytest.raises(ValueError, match="bucket must be >= 1, got 0"):
        parser.parse_batch(trajectory, [GT], text_tables(), bucket=0)
    with pytest.raises(TypeError, match="answer must be str, got int"):
        parser.parse_ground_truth(3)
