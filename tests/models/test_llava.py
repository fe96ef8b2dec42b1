"""LLaVA adapter on the tiny preset: signals, attention recomputation, loading, templates, bad input."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from edgeprune import models
from edgeprune.errors import ModelError
from edgeprune.models.llava import split_template
from edgeprune.models.tiny import tiny_llava_model


@pytest.fixture(scope="module")
def tiny():
    return models.load("tiny-llava")


@pytest.fixture(scope="module")
def pixels(tiny):
    rng = np.random.default_rng(0)
    images = [(rng.random((300, 400, 3)) * 255).astype(np.uint8), (rng.random((360, 340, 3)) * 255).astype(np.uint8)]
    return tiny.preprocess(images)


def test_presets_listed():
    assert set(models.presets()) >= {"tiny-llava", "edgeprune-mini"}


def test_signal_shapes(tiny, pixels):
    with torch.no_grad():
        s = tiny.encode(pixels)
    assert s.grid == (24, 24) and tiny.num_image_tokens == 576
    assert s.tokens.shape == (2, 576, 64)      # projector output, LLM hidden 64
    assert s.feats.shape == (2, 576, 64)       # CLIP hidden 64, [CLS] dropped
    assert s.keys.shape == (2, 576, 16)        # head_dim 64 / 4 heads
    assert s.attn.shape == (2, 576)
    assert s.pixels is pixels


def test_encode_computes_only_what_is_needed(tiny, pixels):
    with torch.no_grad():
        s = tiny.encode(pixels, need=("attn",))
    assert s.attn is not None and s.tokens is None and s.feats is None and s.keys is None and s.pixels is None
    with torch.no_grad():
        s = tiny.encode(pixels, need=("tokens",))
    assert s.tokens is not None and s.feats is None


def test_feats_are_hidden_state_minus_2_and_tokens_the_projection(tiny, pixels):
    with torch.no_grad():
        s = tiny.encode(pixels, need=("tokens", "feats"))
        hidden = tiny.vision(pixels, output_hidden_states=True).hidden_states  # the way LLaVA selects features
        torch.testing.assert_close(s.feats, hidden[-2][:, 1:], rtol=0, atol=1e-5)
        torch.testing.assert_close(s.tokens, tiny.projector(hidden[-2][:, 1:]), rtol=0, atol=1e-5)


def test_attn_and_keys_equal_eager_attention(pixels):
    adapter = models.load("tiny-llava")      # own copy: the encoder is switched to eager here
    with torch.no_grad():
        s = adapter.encode(pixels, need=("attn", "keys"))
    layer = adapter.vision.encoder.layers[adapter.feature_layer]
    assert adapter.feature_layer == 1          # 3 layers, hidden state -2 = output of layer index 1
    adapter.vision.config._attn_implementation = "eager"
    captured = {}

    def keep_k(module, inputs, output):   # returns None: the output is not replaced
        captured["k"] = output

    layer.self_attn.k_proj.register_forward_hook(keep_k)
    with torch.no_grad():
        hidden = adapter.vision(pixels, output_hidden_states=True).hidden_states
        _, weights = layer.self_attn(layer.layer_norm1(hidden[adapter.feature_layer]), attention_mask=None)
    assert weights is not None and weights.shape == (2, 4, 577, 577)
    torch.testing.assert_close(s.attn, weights[:, :, 0, 1:].sum(dim=1), rtol=0, atol=1e-6)
    k = captured["k"].reshape(2, 577, 4, 16)
    torch.testing.assert_close(s.keys, k.mean(dim=2)[:, 1:], rtol=0, atol=1e-6)


def test_tiny_is_seeded_and_consistent(tiny):
    other = models.load("tiny-llava")
    for (name, a), (_, b) in zip(tiny.state_dict().items(), other.state_dict().items()):
        assert torch.equal(a, b), name
    assert tiny.tokenizer.get_vocab_size() == tiny.llm.config.vocab_size == 260
    assert tiny.eos_token_ids == (tiny.tokenizer.token_to_id("</s>"),)
    assert not torch.equal(models.load("tiny-llava", seed=1).projector.linear_1.weight, tiny.projector.linear_1.weight)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    models.load("tiny-llava")                  # seeded privately: the caller's RNG stream is untouched
    assert torch.equal(torch.rand(3), expected)


def test_tiny_eos_does_not_win_the_first_step(tiny):
    ids = torch.tensor([tiny.tokenizer.encode("<s>USER: hello ASSISTANT:", add_special_tokens=False).ids])
    with torch.no_grad():
        logits = tiny.llm(input_ids=ids).logits[0, -1]
    assert int(logits.argmax()) != tiny.eos_token_ids[0]


def test_loads_a_llava_directory(tmp_path, tiny, pixels):
    from transformers import PreTrainedTokenizerFast

    model, tok = tiny_llava_model()
    model.save_pretrained(tmp_path)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>").save_pretrained(tmp_path)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": {"height": 336, "width": 336}, "size": {"shortest_edge": 336}, "do_center_crop": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.25, 0.25], "resample": 3}))
    adapter = models.load(tmp_path)
    assert adapter.preprocess_config.mean == (0.5, 0.5, 0.5) and adapter.preprocess_config.shortest_edge == 336
    assert adapter.eos_token_ids == tiny.eos_token_ids
    assert adapter.tokenizer.encode("<s>USER: ").ids == tiny.tokenizer.encode("<s>USER: ").ids
    with torch.no_grad():
        assert torch.equal(adapter.encode(pixels).tokens, tiny.encode(pixels).tokens)


def test_unknown_model_errors(tmp_path):
    with pytest.raises(ModelError, match="tiny-llava, edgeprune-mini"):
        models.load("tiny-lava")
    with pytest.raises(ModelError, match="no config.json"):
        models.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ModelError, match="model_type 'bert' is not supported"):
        models.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3",
                                                      "architectures": ["Gemma3ForConditionalGeneration"]}))
    with pytest.raises(ModelError, match=r"model_type 'gemma3' \(Gemma3ForConditionalGeneration\) is not supported; "
                                         r"supported architectures: LlavaForConditionalGeneration \(llava\), .*"
                                         r"Qwen3VLForConditionalGeneration \(qwen3_vl\), InternVLForConditionalGeneration "
                                         r"\(internvl\), SmolVLMForConditionalGeneration \(smolvlm\), "
                                         r"Idefics3ForConditionalGeneration \(idefics3\)"):
        models.load(tmp_path)
    with pytest.raises(ModelError, match="unknown option"):
        models.load("tiny-llava", colour="red")


def test_chat_template_needs_room_for_the_image():
    t = split_template("<s>USER: <image>\n{prompt} ASSISTANT:")
    assert (t.prefix, t.suffix) == ("<s>USER: ", "\n{prompt} ASSISTANT:")
    with pytest.raises(ModelError, match="0 <image> placeholders"):
        split_template("USER: {prompt} ASSISTANT:")
    with pytest.raises(ModelError, match="2 <image> placeholders"):
        split_template("<image><image>{prompt}")
    with pytest.raises(ModelError, match="expected \\{prompt\\} after <image>"):
        split_template("USER: {prompt} <image> ASSISTANT:")


def test_images_of_any_mode_and_size_are_converted(tiny):
    gray = np.full((50, 80), 128, dtype=np.uint8)
    rgba = np.zeros((400, 300, 4), dtype=np.uint8)
    px = tiny.preprocess([gray, rgba])
    assert px.shape == (2, 3, 336, 336) and px.dtype == torch.float32
    with pytest.raises(ModelError, match="expected uint8"):
        tiny.preprocess(np.zeros((10, 10, 3), dtype=np.float32))
    with pytest.raises(ModelError, match="cannot read image"):
        tiny.preprocess("/nonexistent.png")


def test_encode_rejects_bad_pixels(tiny):
    with pytest.raises(ModelError, match=r"expected \[B, 3, 336, 336\]"):
        tiny.encode(torch.zeros(1, 3, 224, 224))
    with pytest.raises(ModelError, match="unknown signal"):
        tiny.encode(torch.zeros(1, 3, 336, 336), need=("tokens", "grid2"))


class _EncodeGraph(torch.nn.Module):
    def __init__(self, adapter):
        super().__init__()
        self.adapter = adapter

    def forward(self, pixels):
        s = self.adapter.encode(pixels, need=("tokens", "feats", "keys", "attn"))
        return s.tokens, s.feats, s.keys, s.attn


def test_encode_exports_to_onnx_and_matches(tmp_path, tiny, pixels):
    import onnxruntime as ort

    from edgeprune.export.lint import check
    from edgeprune.export.onnx_io import export_onnx

    names = ["tokens", "feats", "keys", "attn"]
    path = export_onnx(_EncodeGraph(tiny), (pixels,), tmp_path / "encode.onnx", input_names=["pixels"],
                       output_names=names, dynamic_axes={n: {0: "batch"} for n in ["pixels", *names]})
    check(path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(names, {"pixels": pixels[:1].numpy()})   # another batch size than traced
    with torch.no_grad():
        want = _EncodeGraph(tiny)(pixels[:1])
    for name, g, w in zip(names, got, want):
        np.testing.assert_allclose(g, w.numpy(), rtol=0, atol=1e-4, err_msg=name)


def test_tokenizer_json_round_trips(tiny):
    from tokenizers import Tokenizer

    again = Tokenizer.from_str(tiny.tokenizer_json())
    text = "<s>USER: héllo ✓ ASSISTANT:</s>"
    ids = tiny.tokenizer.encode(text, add_special_tokens=False).ids
    assert again.encode(text, add_special_tokens=False).ids == ids
    assert ids[0] == 256 and ids[-1] == 257 and ids[1:6] == list(b"USER:")   # specials matched, bytes = ids
    assert again.decode(ids, skip_special_tokens=True) == "USER: héllo ✓ ASSISTANT:"
