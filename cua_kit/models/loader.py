"""Load a policy (model + processor + LoRA) from a Hub id, a local folder or a builtin tiny model.

One code path for `Qwen/Qwen3-VL-8B-Instruct` and the offline tiny folder: both go through
`from_pretrained`. Loaders: `hf` (plain transformers) and `unsloth` (FastVisionModel, GPU only); both
honour model.device/dtype/attn_implementation and put LoRA on through `apply_lora`. The KL reference is the
same model with the adapter disabled, or switched to a frozen warm-start adapter, never a second copy.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

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
# Unsloth's releases that resolve beside the GPU machine's torch/transformers/peft (pyproject's `unsloth` extra)
UNSLOTH_PIN = "unsloth==2026.10.7 unsloth_zoo==2026.10.7"

# (model, lora_cfg, target regex) -> a PeftModel with a fresh trainable adapter named "default"
NewAdapter = Callable[[Any, LoraConfig, str], Any]


def load_model(model_cfg: ModelConfig, lora_cfg: LoraConfig, adapter_path: str | None = None,
                reference_adapter: str | None = None) -> LoadedModel:
    """Load model + processor with the configured loader, then add (or load) the LoRA adapter.

    Both loaders honour model.device, model.dtype and model.attn_implementation, and share `apply_lora`:
    `reference_adapter` (a warm-start adapter, e.g. from `cua-kit sft`) is loaded frozen beside the trained
    one, so the KL reference is "base + warm start", not the base model the warm start moved away from.
    """
    device = resolve_device(model_cfg.device)
    if model_cfg.loader == "unsloth":
        require_unsloth(model_cfg, device)  # at once: before any model is built or read
    elif model_cfg.load_in_4bit:
        raise ValueError("model.load_in_4bit needs model.loader=unsloth (the hf loader loads 16/32-bit weights)")
    path = resolve_model_path(model_cfg)
    dtype = resolve_dtype(model_cfg.dtype, device)
    if model_cfg.loader == "unsloth":
        model, new_adapter = _unsloth_model(path, model_cfg, device, dtype)
    else:
        model, new_adapter = _hf_model(path, model_cfg, device, dtype), peft_adapter
    policy = LoadedModel(model, load_processor(path), model_arch(model), device, dtype)
    if lora_cfg.enabled:
        policy.model, policy.targets = apply_lora(model, lora_cfg, adapter_path, reference_adapter, new_adapter)
    return policy


def _hf_model(path: str, model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(
        path, dtype=dtype, attn_implementation=model_cfg.attn_implementation
    ).to(device)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def peft_adapter(model: Any, lora_cfg: LoraConfig, regex: str) -> Any:
    """The hf loader's fresh adapter: plain peft LoRA on the resolved modules."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    return get_peft_model(model, PeftLoraConfig(r=lora_cfg.r, lora_alpha=lora_cfg.alpha, lora_dropout=lora_cfg.dropout,
                                                target_modules=regex, bias="none"))


def apply_lora(model: Any, lora_cfg: LoraConfig, adapter_path: str | None = None,
               reference_adapter: str | None = None, new_adapter: NewAdapter = peft_adapter
               ) -> tuple[Any, ResolvedTargets]:
    """The one place where LoRA is put on a loaded model, whatever loaded it: a fresh adapter from
    `new_adapter` on the resolved groups (or the saved `adapter_path`, trainable), then the frozen
    `reference_adapter` beside it (the KL reference; see `reference_model`)."""
    from peft import PeftModel

    targets = resolve_targets(model, lora_cfg.groups)
    for group in targets.dropped:
        log.warning("LoRA group %r matched no module of this model: dropped", group)
    if adapter_path:
        peft_model = PeftModel.from_pretrained(model, adapter_path, is_trainable=True)
    else:
        peft_model = new_adapter(model, lora_cfg, targets.regex)
    if reference_adapter:
        peft_model.load_adapter(reference_adapter, adapter_name=REFERENCE_ADAPTER, is_trainable=False)
        peft_model.set_adapter("default")
    return peft_model, targets


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


def require_unsloth(model_cfg: ModelConfig, device: torch.device) -> None:
    """Fail at once, saying what is missing, where the Unsloth loader cannot run: it needs an NVIDIA GPU
    (`import unsloth` refuses to run without one), the pinned Unsloth, and bitsandbytes for 4-bit weights
    (without it Unsloth would quietly load 16-bit weights instead)."""
    if device.type != "cuda":
        raise RuntimeError(f"model.loader=unsloth needs an NVIDIA GPU (model.device resolved to {device}) and "
                           f"{UNSLOTH_PIN} (pip install -e '.[unsloth]'); on this machine use model.loader=hf")
    try:
        import unsloth  # noqa: F401  (patches transformers/peft on import)
    except ImportError as exc:
        raise RuntimeError(f"model.loader=unsloth needs {UNSLOTH_PIN} (pip install -e '.[unsloth]'): {exc}") from exc
    if model_cfg.load_in_4bit and importlib.util.find_spec("bitsandbytes") is None:
        raise RuntimeError("model.load_in_4bit=true needs bitsandbytes (pip install bitsandbytes); without it "
                           "Unsloth loads 16-bit weights instead; or set model.load_in_4bit=false")


def unsloth_load_kwargs(model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """`FastVisionModel.from_pretrained` arguments (names as in unsloth 2026.10.7's FastModel.from_pretrained)
    for the same model the hf loader would load: the exact name (no remap to Unsloth's hub copies), this device,
    dtype and attention, 4-bit or explicitly 16-bit (Unsloth's default is 4-bit), its offloaded checkpointing."""
    return {"dtype": dtype, "device_map": {"": str(device)}, "attn_implementation": model_cfg.attn_implementation,
            "load_in_4bit": model_cfg.load_in_4bit, "load_in_16bit": not model_cfg.load_in_4bit,
            "use_gradient_checkpointing": _unsloth_checkpointing(model_cfg), "use_exact_model_name": True,
            "full_finetuning": False}


def _unsloth_checkpointing(model_cfg: ModelConfig) -> str | bool:
    return "unsloth" if model_cfg.gradient_checkpointing else False


def _unsloth_model(path: str, model_cfg: ModelConfig, device: torch.device, dtype: torch.dtype
                   ) -> tuple[Any, NewAdapter]:
    """Unsloth's FastVisionModel ("accelerated mode") and its own LoRA wrapper for fresh adapters."""
    from unsloth import FastVisionModel

    model, _ = FastVisionModel.from_pretrained(path, **unsloth_load_kwargs(model_cfg, device, dtype))

    def new_adapter(base: Any, lora_cfg: LoraConfig, regex: str) -> Any:
        # a str target_modules goes to peft as is (re.fullmatch), like the hf path's; get_peft_model's own
        # use_gradient_checkpointing default ("unsloth") would turn checkpointing on against model.gradient_checkpointing
        return FastVisionModel.get_peft_model(base, r=lora_cfg.r, lora_alpha=lora_cfg.alpha,
                                              lora_dropout=lora_cfg.dropout, target_modules=regex, bias="none",
                                              use_gradient_checkpointing=_unsloth_checkpointing(model_cfg))

    return model, new_adapter
