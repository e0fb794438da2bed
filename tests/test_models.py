"""Offline tiny Qwen-VL models, the loader and LoRA target groups, through the real Auto classes."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from cua_kit.config import LoraConfig, ModelConfig
from cua_kit.models.loader import apply_lora, load_model, load_processor, reference_model
from cua_kit.models.lora import resolve_targets


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl"])
def tiny_dir(request, tmp_path_factory):
    out = tmp_path_factory.mktemp(request.param)
    cmd = [sys.executable, "-m", "cua_kit.cli", "make-tiny-model", str(out), "--arch", request.param, "--size", "tiny"]
    subprocess.run(cmd, check=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    return out, request.param


def _prompt_inputs(processor):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Tap the OK button"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert "<|vision_start|><|image_pad|><|vision_end|>" in text and text.endswith("<|im_start|>assistant\n")
    return processor(text=[text], images=[Image.new("RGB", (224, 224), "white")], return_tensors="pt")


def test_tiny_model_loads_through_auto_classes_and_generates(tiny_dir):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path, arch = tiny_dir
    model = AutoModelForImageTextToText.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    assert model.config.model_type == arch
    assert type(processor).__name__ == {"qwen3_vl": "Qwen3VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}[arch]
    assert sum(p.numel() for p in model.parameters()) < 1_000_000
    assert model.config.text_config.head_dim >= 32 if arch == "qwen3_vl" else True
    inputs = _prompt_inputs(processor)
    out = model.generate(**inputs, max_new_tokens=5, do_sample=True)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_tokenizer_round_trips_and_has_qwen_specials(tiny_dir):
    processor = load_processor(str(tiny_dir[0]))
    tok = processor.tokenizer
    text = '<tool_call>\n{"name": "mobile_use", "arguments": {"action": "type", "text": "héllo wörld 42"}}\n</tool_call>'
    assert tok.decode(tok(text)["input_ids"]) == text
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    ids = [tok.convert_tokens_to_ids(s) for s in specials]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)


EXPECTED_GROUPS = {
    "qwen3_vl": {
        "vision_attention": {"model.visual.blocks.0.attn.qkv", "model.visual.blocks.0.attn.proj",
                             "model.visual.blocks.1.attn.qkv", "model.visual.blocks.1.attn.proj"},
        "merger": {"model.visual.merger.linear_fc1", "model.visual.merger.linear_fc2",
                   "model.visual.deepstack_merger_list.0.linear_fc1", "model.visual.deepstack_merger_list.0.linear_fc2"},
    },
    "qwen2_5_vl": {
        "vision_attention": {"model.visual.blocks.0.attn.qkv", "model.visual.blocks.0.attn.proj",
                             "model.visual.blocks.1.attn.qkv", "model.visual.blocks.1.attn.proj"},
        "merger": {"model.visual.merger.mlp.0", "model.visual.merger.mlp.2"},
    },
}


def test_lora_groups_resolve_to_exact_module_sets(tiny_dir):
    from transformers import AutoModelForImageTextToText

    path, arch = tiny_dir
    model = AutoModelForImageTextToText.from_pretrained(path)
    targets = resolve_targets(model, ["vision_attention", "merger", "language"])
    for group, expected in EXPECTED_GROUPS[arch].items():
        assert set(targets.modules[group]) == expected
    language = {f"model.language_model.layers.{i}.{m}" for i in range(2) for m in
                ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]}
    assert set(targets.modules["language"]) == language
    # never the patch-embedding Conv3d, the vision block MLPs or lm_head
    everything = {n for names in targets.modules.values() for n in names}
    assert not any("patch_embed" in n or "lm_head" in n or ".mlp.linear_fc" in n and "blocks" in n for n in everything)
    peft_model, _ = apply_lora(model, LoraConfig(r=4, alpha=8, groups=["vision_attention", "merger", "language"]))
    wrapped = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert wrapped == everything


def test_group_that_matches_nothing_is_reported_and_dropped(tiny_dir, caplog):
    from transformers import AutoModelForImageTextToText

    from cua_kit.models import lora

    model = AutoModelForImageTextToText.from_pretrained(tiny_dir[0])
    saved = dict(lora.LORA_GROUPS["merger"])
    lora.LORA_GROUPS["merger"][tiny_dir[1]] = r"model\.visual\.nothing_here"
    try:
        targets = resolve_targets(model, ["merger", "language"])
        assert targets.dropped == ["merger"] and "merger" not in targets.modules
        with caplog.at_level("WARNING"):
            apply_lora(model, LoraConfig(groups=["merger", "language"]))
        assert "matched no module" in caplog.text
    finally:
        lora.LORA_GROUPS["merger"].update(saved)


def test_adapter_disabled_logprobs_equal_base_exactly(tiny_dir):
    path, _ = tiny_dir
    policy = load_model(ModelConfig(name=str(path), device="cpu"), LoraConfig(r=4, alpha=8))
    base = load_model(ModelConfig(name=str(path), device="cpu"), LoraConfig(enabled=False)).model
    with torch.no_grad():  # make the adapter non-trivial so "disabled" means something
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    inputs = _prompt_inputs(policy.processor)
    with torch.no_grad():
        lora_logits = policy.model(**inputs).logits
        with reference_model(policy.model) as ref:
            ref_logits = ref(**inputs).logits
        base_logits = base(**inputs).logits
    assert torch.equal(ref_logits, base_logits)
    assert not torch.allclose(lora_logits, base_logits)


def test_saved_adapter_loads_in_plain_peft(tiny_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    path, _ = tiny_dir
    policy = load_model(ModelConfig(name=str(path), device="cpu"), LoraConfig(r=4, alpha=8))
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    policy.model.save_pretrained(tmp_path / "adapter")
    plain = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(path), tmp_path / "adapter").eval()
    policy.model.eval()
    inputs = _prompt_inputs(policy.processor)
    with torch.no_grad():
        assert torch.allclose(plain(**inputs).logits, policy.model(**inputs).logits, atol=1e-6)


def test_builtin_model_is_built_once_into_the_cache(tmp_path):
    from cua_kit.models.loader import resolve_model_path

    cfg = ModelConfig(name="builtin:qwen3_vl-tiny", cache_dir=str(tmp_path))
    first = resolve_model_path(cfg)
    config = Path(first) / "config.json"
    mtime = config.stat().st_mtime
    assert Path(first).parent == tmp_path and resolve_model_path(cfg) == first and config.stat().st_mtime == mtime
    with pytest.raises(ValueError, match="builtin:<qwen3_vl|qwen2_5_vl>"):
        resolve_model_path(ModelConfig(name="builtin:llama-tiny", cache_dir=str(tmp_path)))


def test_image_only_processor_matches_the_real_one(tiny_dir):
    from cua_kit.models.loader import _image_only_processor

    real = load_processor(str(tiny_dir[0]))
    image_only = _image_only_processor(str(tiny_dir[0]))
    a, b = _prompt_inputs(real), _prompt_inputs(image_only)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("device", ["auto", "cpu"])
def test_unsloth_loader_fails_at_once_saying_what_it_needs(tmp_path, device):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the message is for CPU machines")
    cfg = ModelConfig(loader="unsloth", device=device, name="builtin:qwen3_vl-tiny", cache_dir=str(tmp_path))
    with pytest.raises(RuntimeError, match=r"needs an NVIDIA GPU .*unsloth==2026\.10\.7 unsloth_zoo==2026\.10\.7.*"
                                           r"model\.loader=hf"):
        load_model(cfg, LoraConfig())
    assert not list(tmp_path.iterdir())  # failed before building (or reading) any model


@pytest.mark.parametrize("four_bit", [False, True])
def test_unsloth_loads_the_configured_device_dtype_and_attention(four_bit):
    """The arguments the Unsloth loader hands FastVisionModel.from_pretrained (it ignored all three before)."""
    from cua_kit.models.loader import unsloth_load_kwargs

    cfg = ModelConfig(loader="unsloth", attn_implementation="eager", load_in_4bit=four_bit,
                      gradient_checkpointing=True)
    kwargs = unsloth_load_kwargs(cfg, torch.device("cuda", 1), torch.float16)
    assert kwargs["device_map"] == {"": "cuda:1"} and kwargs["dtype"] is torch.float16
    assert kwargs["attn_implementation"] == "eager" and kwargs["use_exact_model_name"] is True
    assert (kwargs["load_in_4bit"], kwargs["load_in_16bit"]) == (four_bit, not four_bit)  # Unsloth's default: 4-bit
    assert kwargs["use_gradient_checkpointing"] == "unsloth"
    assert unsloth_load_kwargs(ModelConfig(), torch.device("cuda"), torch.bfloat16)["use_gradient_checkpointing"] is False


def test_any_loaders_fresh_adapter_gets_the_reference_adapter_beside_it(tiny_dir, tmp_path):
    """`apply_lora` is shared by both loaders: whatever makes the fresh adapter (the Unsloth loader passes
    FastVisionModel.get_peft_model), the warm-start adapter is loaded frozen beside it as the KL reference."""
    from transformers import AutoModelForImageTextToText

    from cua_kit.models.loader import REFERENCE_ADAPTER, peft_adapter

    path, _ = tiny_dir
    warm, _ = apply_lora(AutoModelForImageTextToText.from_pretrained(path), LoraConfig(r=4, alpha=8))
    warm.save_pretrained(tmp_path / "warm")
    made = []

    def new_adapter(model, lora_cfg, regex):  # another loader's factory: records the call, rank 2
        made.append(regex)
        return peft_adapter(model, LoraConfig(r=2, alpha=4), regex)

    model, targets = apply_lora(AutoModelForImageTextToText.from_pretrained(path), LoraConfig(r=4, alpha=8),
                                reference_adapter=str(tmp_path / "warm"), new_adapter=new_adapter)
    assert made == [targets.regex] and model.peft_config["default"].r == 2
    assert set(model.peft_config) == {"default", REFERENCE_ADAPTER} and model.active_adapter == "default"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)  # the reference stays frozen
    with reference_model(model):
        assert model.active_adapter == REFERENCE_ADAPTER


@pytest.mark.parametrize("head_dim", [32, 64])
def test_width_axis_turns_as_fast_per_patch_as_in_the_real_qwen3_vl(head_dim):
    """The builder's rope_theta keeps the width axis's fastest mrope frequency (interleaved index 2) at the
    real Qwen3-VL-8B's angle per patch; with the real theta a 32-dim head turned 4x slower and tiny models
    could not tell columns apart."""
    from cua_kit.models.tiny import qwen3_vl_rope_theta

    real = 5_000_000.0 ** (-4 / 128)
    assert qwen3_vl_rope_theta(head_dim) ** (-4 / head_dim) == pytest.approx(real, rel=1e-3)


def test_built_tiny_model_uses_the_scaled_rope_theta(tiny_model_dir):
    import json

    from cua_kit.models.tiny import qwen3_vl_rope_theta

    text = json.loads((Path(tiny_model_dir) / "config.json").read_text())["text_config"]
    assert text["rope_parameters"]["rope_theta"] == qwen3_vl_rope_theta(text["head_dim"])
