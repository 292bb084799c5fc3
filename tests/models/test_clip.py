"""CLIP dual encoder: parity with transformers' CLIPModel; open_clip (BiomedCLIP) name mapping and towers."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rwr_jax import sharding
from rwr_jax.models.clip import config as clip_config
from rwr_jax.models.clip import convert
from rwr_jax.models.clip.model import ClipImageModel, ClipModel, OpenClipTextTower, cosine_similarity

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
F = torch.nn.functional

ATOL = 1e-5
VOCAB = 64
PAD_ID = 1
# name -> (text kwargs, vision kwargs): current EOS rule + quick_gelu; legacy EOS (= largest id) + erf GELU.
CONFIGS = {
    "eos_id": (dict(hidden_act="quick_gelu", eos_token_id=VOCAB - 1),
               dict(hidden_act="quick_gelu", image_size=32, patch_size=8)),
    "legacy_eos_gelu": (dict(hidden_act="gelu", eos_token_id=2), dict(hidden_act="gelu", image_size=24, patch_size=6)),
}


def _randomize(model, seed: int):
    """Re-initialises every parameter (biases and LayerNorms included) so none is trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            value = torch.randn(param.shape, generator=gen) * 0.2
            param.copy_(value + 1.0 if "norm" in name and name.endswith("weight") else value)
    return model.eval()


def make_hf_clip(name: str, seed: int = 0):
    text, vision = CONFIGS[name]
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=16, pad_token_id=PAD_ID, bos_token_id=0,
                         **text),
        vision_config=dict(hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                           num_channels=3, **vision),
        projection_dim=16, logit_scale_init_value=2.6592)
    return _randomize(transformers.CLIPModel(config), seed)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def reference(request, tmp_path_factory):
    """(config name, HF CLIPModel, saved checkpoint directory)."""
    model = make_hf_clip(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    return request.param, model, str(path)


def text_batch(lengths, total: int, eos_id: int, seed: int = 2):
    """Right-padded rows: random ids in [3, VOCAB - 2], EOS at the end of each row, PAD_ID after it."""
    rng = np.random.default_rng(seed)
    tokens = np.full((len(lengths), total), PAD_ID, np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for row, n in enumerate(lengths):
        tokens[row, :n - 1] = rng.integers(3, VOCAB - 2, n - 1)
        tokens[row, n - 1] = eos_id if eos_id != 2 else VOCAB - 1  # legacy rule pools at the largest id
        mask[row, :n] = 1
    return tokens, mask


def test_matches_transformers(reference):
    name, hf_model, path = reference
    config = clip_config.read_clip_config(path)
    v = config.vision
    tokens, mask = text_batch([9, 4, 16], total=16, eos_id=config.text.eos_token_id)
    pixels = np.random.default_rng(3).standard_normal((2, 3, v.image_size, v.image_size)).astype(np.float32)
    with torch.no_grad():
        out = hf_model(input_ids=torch.tensor(tokens), pixel_values=torch.tensor(pixels),
                       attention_mask=torch.tensor(mask))
        ref_image = hf_model.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output.numpy()
        ref_text = hf_model.get_text_features(input_ids=torch.tensor(tokens),
                                              attention_mask=torch.tensor(mask)).pooler_output.numpy()
    model = ClipModel(config)
    params = {"params": convert.load_hf_params(path, config)}
    pixels_nhwc = jnp.asarray(pixels.transpose(0, 2, 3, 1))
    tokens_j, mask_j = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, bool)

    @jax.jit
    def run(params, pixels, tokens, token_mask):
        return (model.apply(params, pixels, False, method=model.image_embeds),
                model.apply(params, tokens, token_mask, False, method=model.text_embeds),
                model.apply(params, pixels, method=model.image_embeds),
                model.apply(params, tokens, token_mask, method=model.text_embeds),
                model.apply(params, pixels, tokens, token_mask))

    image, text, image_n, text_n, (per_image, per_text) = run(params, pixels_nhwc, tokens_j, mask_j)
    pairs = {"image features": (image, ref_image), "text features": (text, ref_text),
             "image embeds": (image_n, out.image_embeds.numpy()), "text embeds": (text_n, out.text_embeds.numpy()),
             "logits_per_image": (per_image, out.logits_per_image.numpy()),
             "logits_per_text": (per_text, out.logits_per_text.numpy())}
    for label, (ours, ref) in pairs.items():
        ours = np.asarray(ours)
        assert ours.shape == ref.shape and ours.dtype == np.float32, label
        diff = float(np.abs(ours - ref).max())
        print(f"{name} {label}: max |d| = {diff:.2e} (scale {np.abs(ref).max():.2f})")
        assert diff <= ATOL, label
    np.testing.assert_allclose(np.asarray(cosine_similarity(text, image)), np.asarray(text_n @ image_n.T), atol=1e-6)
    # Padding changes no row: each text alone (unpadded) gives the same embedding.
    text_only = jax.jit(lambda params, tokens, token_mask: model.apply(params, tokens, token_mask,
                                                                       method=model.text_embeds))
    alone = [np.asarray(text_only(params, tokens_j[i:i + 1, :n], mask_j[i:i + 1, :n]))[0]
             for i, n in enumerate([9, 4, 16])]
    np.testing.assert_allclose(np.stack(alone), np.asarray(text_n), atol=1e-6)


def test_image_only_config_loads_the_image_side(reference):
    _, hf_model, path = reference
    config = clip_config.read_clip_config(path, text=None)
    params = {"params": convert.load_hf_params(path, config)}
    assert set(params["params"]) == {"vision_model", "visual_projection"}
    v = config.vision
    pixels = np.random.default_rng(4).standard_normal((3, 3, v.image_size, v.image_size)).astype(np.float32)
    ours = ClipImageModel(config).apply(params, jnp.asarray(pixels.transpose(0, 2, 3, 1)))
    with torch.no_grad():
        ref = F.normalize(hf_model.get_image_features(pixel_values=torch.tensor(pixels)).pooler_output, dim=-1)
    np.testing.assert_allclose(np.asarray(ours), ref.numpy(), atol=ATOL)


def test_errors_name_the_problem(reference, tmp_path):
    _, _, path = reference
    config = clip_config.read_clip_config(path)
    wrong = config.replace(vision=dataclasses.replace(config.vision, num_layers=1))
    with pytest.raises(ValueError, match=r"unexpected tensor vision_model\.encoder\.layers\.1\."):
        convert.load_hf_params(path, wrong)
    with pytest.raises(ValueError, match=r"pixel_values must be \[N, "):
        ClipImageModel(config).init(jax.random.key(0), jnp.zeros((1, 3, 8, 8)))
    with pytest.raises(ValueError, match="ClipVisionConfig.image_size .* multiple of patch_size"):
        clip_config.ClipVisionConfig(hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2, image_size=30,
                                     patch_size=8)
    with pytest.raises(ValueError, match="model_type must be 'clip', got 'bert'"):
        clip_config.from_hf_config({"model_type": "bert"})


def test_every_logical_axis_has_a_sharding_rule(reference):
    config = clip_config.read_clip_config(reference[2])
    sharding.check_rules_cover(convert.abstract_params(config))
    encoder = open_clip_encoder_config()
    sharding.check_rules_cover(convert.open_clip_text_abstract_params(encoder, EMBED_DIM))


# ---------------------------------------------------------------------------------------------
# open_clip BiomedCLIP layout, tiny: timm ViT (width 32, 2 blocks, 4 heads, MLP 64, patch 8, 32 px)
# + BERT (width 32, 2 layers, 4 heads, MLP 48, vocab 80, 24 positions) + MLP head, embed_dim 16.
WIDTH, BLOCKS, HEADS, MLP, PATCH, IMAGE = 32, 2, 4, 64, 8, 32
EMBED_DIM = 16
OPEN_CLIP_CONFIG = {
    "model_cfg": {"embed_dim": EMBED_DIM,
                  "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False,
                                 "timm_pool": "", "timm_proj": "linear", "image_size": 224},
                  "text_cfg": {"hf_model_name": "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract",
                               "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                               "context_length": 24}},
    "preprocess_cfg": {"mean": list(clip_config.OPENAI_CLIP_MEAN), "std": list(clip_config.OPENAI_CLIP_STD)}}
BERT_KWARGS = dict(vocab_size=80, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=24, type_vocab_size=2, pad_token_id=0)


def open_clip_image_config():
    """The tiny image tower, built the way BiomedCLIP's config is read (timm switches included)."""
    full = clip_config.open_clip_vision_config(OPEN_CLIP_CONFIG)
    assert (full.vision.hidden_size, full.vision.patch_size, full.vision.num_layers) == (768, 16, 12)
    assert (full.vision.patch_bias, full.vision.pre_layernorm, full.vision.hidden_act) == (True, False, "gelu")
    assert full.vision.layer_norm_eps == 1e-6 and full.projection_dim == EMBED_DIM and full.text is None
    tiny = dataclasses.replace(full.vision, hidden_size=WIDTH, intermediate_size=MLP, num_layers=BLOCKS,
                               num_heads=HEADS, patch_size=PATCH, image_size=IMAGE)
    return full.replace(vision=tiny)


def open_clip_encoder_config():
    return clip_config.open_clip_text_encoder_config(dict(BERT_KWARGS, model_type="bert"), OPEN_CLIP_CONFIG)


def open_clip_names():
    """open_clip state-dict names and shapes of the tiny BiomedCLIP layout, written out by hand.

    Read off the module attribute names: open_clip `TimmModel` (`trunk` = timm
    VisionTransformer: cls_token, pos_embed, patch_embed.proj, blocks.i.{norm1, attn.qkv,
    attn.proj, norm2, mlp.fc1, mlp.fc2}, norm; `head.proj` without bias as timm_proj
    "linear" builds it), open_clip `HFTextEncoder` (`transformer` = HF BertModel with its
    pooler, `proj` = Sequential(Linear, GELU, Linear), both without bias) and
    `logit_scale`; BERT names are transformers' BertModel names.
    """
    d, h = WIDTH, (WIDTH + EMBED_DIM) // 2
    names = {"logit_scale": (), "visual.trunk.cls_token": (1, 1, d), "visual.trunk.pos_embed": (1, 17, d),
             "visual.trunk.patch_embed.proj.weight": (d, 3, PATCH, PATCH), "visual.trunk.patch_embed.proj.bias": (d,),
             "visual.trunk.norm.weight": (d,), "visual.trunk.norm.bias": (d,),
             "visual.head.proj.weight": (EMBED_DIM, d)}
    for i in range(BLOCKS):
        block = f"visual.trunk.blocks.{i}."
        names.update({block + "norm1.weight": (d,), block + "norm1.bias": (d,), block + "attn.qkv.weight": (3 * d, d),
                      block + "attn.qkv.bias": (3 * d,), block + "attn.proj.weight": (d, d),
                      block + "attn.proj.bias": (d,), block + "norm2.weight": (d,), block + "norm2.bias": (d,),
                      block + "mlp.fc1.weight": (MLP, d), block + "mlp.fc1.bias": (MLP,),
                      block + "mlp.fc2.weight": (d, MLP), block + "mlp.fc2.bias": (d,)})
    bert = "text.transformer."
    names.update({bert + "embeddings.word_embeddings.weight": (80, d), bert + "embeddings.position_ids": (1, 24),
                  bert + "embeddings.position_embeddings.weight": (24, d),
                  bert + "embeddings.token_type_embeddings.weight": (2, d), bert + "embeddings.LayerNorm.weight": (d,),
                  bert + "embeddings.LayerNorm.bias": (d,), bert + "pooler.dense.weight": (d, d),
                  bert + "pooler.dense.bias": (d,), "text.proj.0.weight": (h, d), "text.proj.2.weight": (EMBED_DIM, h)})
    for i in range(2):
        layer = f"{bert}encoder.layer.{i}."
        for sub in ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense"):
            names.update({f"{layer}{sub}.weight": (d, d), f"{layer}{sub}.bias": (d,)})
        names.update({layer + "attention.output.LayerNorm.weight": (d,),
                      layer + "attention.output.LayerNorm.bias": (d,),
                      layer + "intermediate.dense.weight": (48, d), layer + "intermediate.dense.bias": (48,),
                      layer + "output.dense.weight": (d, 48), layer + "output.dense.bias": (d,),
                      layer + "output.LayerNorm.weight": (d,), layer + "output.LayerNorm.bias": (d,)})
    return names


def random_open_clip_state(seed: int = 5):
    gen = np.random.default_rng(seed)
    state = {}
    for name, shape in open_clip_names().items():
        value = (gen.standard_normal(shape) * 0.2).astype(np.float32)
        state[name] = value + 1.0 if ("norm" in name or "LayerNorm" in name) and name.endswith("weight") else value
    state["text.transformer.embeddings.position_ids"] = np.arange(24, dtype=np.int64)[None]
    return state


def test_open_clip_names_cover_our_params_exactly():
    names = open_clip_names()
    image_table = convert.conversion_table(open_clip_image_config())
    mapped = dict(convert.open_clip_vision_tensors((n, np.zeros(s, np.float32)) for n, s in names.items()))
    vision = {n: a.shape for n, a in mapped.items() if n.startswith(("vision_model.", "visual_projection."))}
    assert not [n for n in mapped if n.startswith("visual.")], "every visual.* name is mapped"
    assert vision == {n: e.hf_shape for n, e in image_table.items()}
    text_table = convert.open_clip_text_table(open_clip_encoder_config(), EMBED_DIM)
    skipped = {"text.transformer.embeddings.position_ids", "text.transformer.pooler.dense.weight",
               "text.transformer.pooler.dense.bias"}
    text = {n: s for n, s in names.items() if n.startswith("text.") and n not in skipped}
    assert text == {n: e.hf_shape for n, e in text_table.items()}


def timm_vit_reference(state, pixels):
    """timm VisionTransformer (class-token pool) + open_clip linear head, in torch ops, on open_clip names."""
    sd = {k: torch.tensor(v) for k, v in state.items()}
    x = F.conv2d(torch.tensor(pixels), sd["visual.trunk.patch_embed.proj.weight"],
                 sd["visual.trunk.patch_embed.proj.bias"], stride=PATCH).flatten(2).transpose(1, 2)
    n, t = x.shape[0], x.shape[1] + 1
    x = torch.cat([sd["visual.trunk.cls_token"].expand(n, -1, -1), x], 1) + sd["visual.trunk.pos_embed"]
    norm = lambda x, p: F.layer_norm(x, (WIDTH,), sd[p + ".weight"], sd[p + ".bias"], eps=1e-6)  # noqa: E731
    linear = lambda x, p: F.linear(x, sd[p + ".weight"], sd.get(p + ".bias"))  # noqa: E731
    for i in range(BLOCKS):
        b = f"visual.trunk.blocks.{i}."
        qkv = linear(norm(x, b + "norm1"), b + "attn.qkv").reshape(n, t, 3, HEADS, WIDTH // HEADS)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attended = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, WIDTH)
        x = x + linear(attended, b + "attn.proj")
        x = x + linear(F.gelu(linear(norm(x, b + "norm2"), b + "mlp.fc1")), b + "mlp.fc2")
    return linear(norm(x, "visual.trunk.norm")[:, 0], "visual.head.proj").numpy()


@pytest.fixture(scope="module")
def open_clip_checkpoint(tmp_path_factory):
    """A torch.save'd open_clip-style state dict (as `open_clip_pytorch_model.bin`)."""
    state = random_open_clip_state()
    path = str(tmp_path_factory.mktemp("biomedclip") / "open_clip_pytorch_model.bin")
    torch.save({k: torch.tensor(v) for k, v in state.items()}, path)
    return state, path


def test_open_clip_image_tower_matches_timm_forward(open_clip_checkpoint):
    state, path = open_clip_checkpoint
    config = open_clip_image_config()
    params = {"params": convert.load_open_clip_image_params(path, config)}
    pixels = np.random.default_rng(6).standard_normal((2, 3, IMAGE, IMAGE)).astype(np.float32)
    ours = ClipImageModel(config).apply(params, jnp.asarray(pixels.transpose(0, 2, 3, 1)), False)
    ref = timm_vit_reference(state, pixels)
    diff = float(np.abs(np.asarray(ours) - ref).max())
    print(f"open_clip timm ViT image tower: max |d| = {diff:.2e} (scale {np.abs(ref).max():.2f})")
    assert diff <= ATOL


def test_open_clip_text_tower_matches_bert_and_mlp_head(open_clip_checkpoint):
    state, path = open_clip_checkpoint
    bert = transformers.BertModel(transformers.BertConfig(**BERT_KWARGS)).eval()
    prefix = "text.transformer."
    bert.load_state_dict({k[len(prefix):]: torch.tensor(v) for k, v in state.items() if k.startswith(prefix)},
                         strict=False)
    tokens = np.zeros((3, 10), np.int64)  # pad id 0 on the right, as open_clip's HF tokenizer pads
    for row, n in enumerate([10, 6, 2]):
        tokens[row, :n] = np.random.default_rng(row).integers(1, 80, n)
    with torch.no_grad():  # open_clip HFTextEncoder.forward: mask = ids != pad, CLS state, proj MLP
        cls = bert(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(tokens != 0).long()
                   ).last_hidden_state[:, 0]
        hidden = F.gelu(F.linear(cls, torch.tensor(state["text.proj.0.weight"])))
        ref = F.linear(hidden, torch.tensor(state["text.proj.2.weight"])).numpy()
    encoder = open_clip_encoder_config()
    assert (encoder.pooling, encoder.normalize, encoder.max_length) == ("cls", False, 24)
    params = {"params": convert.load_open_clip_text_params(path, encoder, EMBED_DIM)}
    ours = OpenClipTextTower(encoder, EMBED_DIM).apply(params, jnp.asarray(tokens, jnp.int32),
                                                       jnp.asarray(tokens != 0), False)
    diff = float(np.abs(np.asarray(ours) - ref).max())
    print(f"open_clip BERT text tower: max |d| = {diff:.2e} (scale {np.abs(ref).max():.2f})")
    assert diff <= ATOL


def test_open_clip_loading_names_unknown_tensors(tmp_path):
    state = random_open_clip_state()
    state["visual.trunk.blocks.0.ls1.gamma"] = np.ones(WIDTH, np.float32)  # a layer-scale ViT: not this layout
    path = str(tmp_path / "open_clip_pytorch_model.bin")
    torch.save({k: torch.tensor(v) for k, v in state.items()}, path)
    with pytest.raises(ValueError, match=r"unexpected tensor visual\.trunk\.blocks\.0\.ls1\.gamma"):
        convert.load_open_clip_image_params(path, open_clip_image_config())
    with pytest.raises(ValueError, match="timm_model_name must be one of"):
        clip_config.open_clip_vision_config(json.loads(json.dumps(OPEN_CLIP_CONFIG).replace(
            "vit_base_patch16_224", "convnext_base")))
