"""Load a policy (model + processor + LoRA) from a Hub id, a local folder or a builtin tiny model.

One code path for `Qwen/Qwen3-VL-8B-Instruct` and the offline tiny folder: both go through
`from_pretrained`. Loaders: `hf` (plain transformers) and `unsloth` (FastVisionModel, GPU only).
The KL reference is the same model under `peft_model.disable_adapter()`, never a second copy.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from cua_kit.config import LoraConfig, ModelConfig
from cua_kit.models.lora import ResolvedTargets, model_arch, resolve_targets

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model ready for rollout and training."""

    model: Any  # a PeftModel when LoRA is on
    processor: Any
    arch: str
    device: torch.device
    dtype: torch.dtype
    targets: ResolvedTargets | None = None
    # set by `constrain_actions`: generation and scoring both restrict the policy to this grammar
    action_grammar: Any = None

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"model.device={device} but no CUDA GPU is visible; use model.device=cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """auto = bf16 on CUDA, fp32 on CPU (CPU bf16 matmuls are slow and hurt log-prob agreement)."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def resolve_model_path(cfg: ModelConfig) -> str:
    """`builtin:<arch>-<size>` is built once into cfg.cache_dir; anything else is returned as is."""
    if not cfg.name.startswith("builtin:"):
        return cfg.name
    spec = cfg.name.removeprefix("builtin:")
    arch, _, size = spec.rpartition("-")
    from cua_kit.models.tiny import ARCHS, BUILDER_VERSION, SIZES

    if arch not in ARCHS or size not in SIZES:
        raise ValueError(f"model.name={cfg.name!r}: builtin models are "
                         f"builtin:<{'|'.join(ARCHS)}>-<{'|'.join(SIZES)}>")

    folder = Path(cfg.cache_dir).expanduser() / f"{spec}-v{BUILDER_VERSION}"
    if not (folder / "config.json").exists():
        from cua_kit.models.tiny import make_tiny_model

        log.info("building %s into %s (offline, random weights)", cfg.name, folder)
        tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
        make_tiny_model(tmp, arch, size)  # type: ignore[arg-type]
        try:  # atomic: a concurrent builder may have won the race; its folder is as good as ours
            tmp.rename(folder)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return str(folder)


def load_processor(path: str) -> Any:
    """AutoProcessor; without torchvision, the same processor class minus its video processor.

    transformers 5.x's Qwen-VL *video* processors import torchvision, so AutoProcessor raises ImportError
    without it (platform-facts); images + text work the same without the video part.
    """
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path)
    except ImportError as exc:
        log.warning("AutoProcessor needs torchvision (%s); using the image-only processor", exc)
        return _image_only_processor(path)


def _image_only_processor(path: str) -> Any:
    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor, Qwen3VLProcessor

    base = Qwen3VLProcessor if AutoConfig.from_pretrained(path).model_type == "qwen3_vl" else Qwen2_5_VLProcessor

    class ImageOnlyProcessor(base):  # type: ignore[misc, valid-type]
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    tok = AutoTokenizer.from_pretrained(path)
    return ImageOnlyProcessor(AutoImageProcessor.from_pretrained(path), tok, chat_template=tok.chat_template)


REFERENCE_ADAPTER = "reference"


def load_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, adapter_path: str | None = None,
                reference_adapter: str | None = None) -> LoadedModel:
    """Load model + processor with the configured loader, then add (or load) the LoRA adapter.

    `reference_adapter` (a warm-start adapter, e.g. from `cua-kit sft`) is loaded frozen beside the trained
    one: the KL reference is then "base + warm start", not the base model the warm start moved away from.
    """
    if model_cfg.loader == "unsloth":
        return _load_unsloth(model_cfg, lora_cfg, adapter_path)
    path = resolve_model_path(model_cfg)
    device = resolve_device(model_cfg.device)
    dtype = resolve_dtype(model_cfg.dtype, device)
    if model_cfg.load_in_4bit:
        raise ValueError("model.load_in_4bit needs model.loader=unsloth (the hf loader loads 16/32-bit weights)")
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation=model_cfg.attn_implementation
    ).to(device)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    policy = LoadedModel(model, load_processor(path), model_arch(model), device, dtype)
    if lora_cfg.enabled:
        policy.model, policy.targets = apply_lora(model, lora_cfg, adapter_path)
        if reference_adapter:
            policy.model.load_adapter(reference_adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            policy.model.set_adapter("default")
    return policy


def apply_lora(model: Any, lora_cfg: LoraConfig, adapter_path: str | None = None) -> tuple[Any, ResolvedTargets]:
    """Wrap `model` in peft LoRA on the resolved groups (or load a saved adapter, trainable)."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    targets = resolve_targets(model, lora_cfg.groups)
    for group in targets.dropped:
        log.warning("LoRA group %r matched no module of this model: dropped", group)
    if adapter_path:
        return PeftModel.from_pretrained(model, adapter_path, is_trainable=True), targets
    peft_cfg = PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                              target_modules=targets.regex, bias="none")
    return get_peft_model(model, peft_cfg), targets


@contextlib.contextmanager
def reference_model(model: Any) -> Iterator[Any]:
    """The frozen reference for the KL: the same weights with the trained adapter switched off, or
    switched to the frozen warm-start adapter when there is one (no second model copy either way)."""
    if REFERENCE_ADAPTER in getattr(model, "peft_config", {}):
        trained = model.active_adapter
        model.set_adapter(REFERENCE_ADAPTER)
        try:
            yield model
        finally:
            model.set_adapter(trained)  # also restores requires_grad on the trained adapter only
    elif hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:  # no LoRA: the model is its own reference only if nothing trains; callers set kl_ctl=0
        yield model


def _load_unsloth(model_cfg: ModelConfig, lora_cfg: LoraConfig, adapter_path: str | None) -> LoadedModel:
    """Unsloth's FastVisionModel ("accelerated mode"). Fails clearly without Unsloth or a GPU."""
    if not torch.cuda.is_available():
        raise RuntimeError("model.loader=unsloth needs an NVIDIA GPU (Unsloth refuses to run on CPU); "
                           "use model.loader=hf on this machine")
    try:
        from unsloth import FastVisionModel
    except ImportError as exc:
        raise RuntimeError(f"model.loader=unsloth but Unsloth is not installed ({exc}); "
                           "install it with `pip install -e '.[unsloth]'` on a GPU machine") from exc
    path = resolve_model_path(model_cfg)
    model, tokenizer_or_processor = FastVisionModel.from_pretrained(
        path, load_in_4bit=model_cfg.load_in_4bit,
        use_gradient_checkpointing="unsloth" if model_cfg.gradient_checkpointing else False,
    )
    targets = resolve_targets(model, lora_cfg.groups)
    if adapter_path:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    elif lora_cfg.enabled:
        model = FastVisionModel.get_peft_model(model, r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
                                               lora_dropout=lora_cfg.dropout, target_modules=targets.regex)
    device = next(model.parameters()).device
    return LoadedModel(model, load_processor(path), model_arch(model), device,
                        next(model.parameters()).dtype, targets)
