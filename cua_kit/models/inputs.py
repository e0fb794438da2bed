"""Model inputs from token ids + images: one collate for generation (prompts) and scoring (prompt+completion).

Token-in-token-out: the ids are the exact ones produced at generation time; images are re-run through
the same image processor (deterministic), so a scoring forward sees exactly what sampling saw.
Rows are left-padded, so every row's last token sits at the right edge (completions are aligned and
`logits_to_keep` can cut the vocab projection to the completion part).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image


@dataclass
class Row:
    """One sequence: token ids and the images whose <|image_pad|> runs appear in it, in order."""

    ids: list[int]
    images: list[Image.Image]


def vision_special_ids(tokenizer: Any) -> list[int]:
    """Tokens a sampled completion must never contain: an `<|image_pad|>` in a completion crashes the
    scoring forward (the model expects pixel features for it), so generation suppresses them."""
    names = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
    ids = [tokenizer.convert_tokens_to_ids(n) for n in names]
    return [i for i in ids if i is not None and i != tokenizer.unk_token_id]


def end_token_ids(tokenizer: Any) -> list[int]:
    """The tokens a completion ends with: <|im_end|> (the chat turn's end) and the pad token <|endoftext|>
    (the model's other end of text); generation stops at either, in every backend."""
    return [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id]


def image_pixels(processor: Any, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    if not images:
        return {}
    # do_resize=False: resize_for_model already made the sizes the model sees (see there)
    out = processor.image_processor(images=images, do_resize=False, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


def collate(processor: Any, rows: list[Row], device: torch.device | str = "cpu", pad_to_multiple: int = 1
            ) -> dict[str, torch.Tensor]:
    """Left-padded batch with attention_mask, mm_token_type_ids (1 on image tokens) and pixel inputs;
    the width is rounded up to `pad_to_multiple` (fewer distinct shapes for a compiled decode step).

    Qwen3-VL's forward needs `mm_token_type_ids` whenever images are passed (platform-facts): it is
    derived from the ids, so completion tokens get 0 automatically.
    """
    tok = processor.tokenizer
    width = -(-max(len(r.ids) for r in rows) // pad_to_multiple) * pad_to_multiple
    pad = tok.pad_token_id
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row.ids):] = torch.tensor(row.ids, dtype=torch.long)
        mask[i, width - len(row.ids):] = 1
    image_id = tok.convert_tokens_to_ids("<|image_pad|>")
    batch: dict[str, torch.Tensor] = {
        "input_ids": ids, "attention_mask": mask, "mm_token_type_ids": (ids == image_id).long() * mask,
    }
    batch.update(image_pixels(processor, [im for r in rows for im in r.images]))
    return {k: v.to(device) for k, v in batch.items()}


def resize_for_model(image: Image.Image, processor: Any, max_pixels: int) -> Image.Image:
    """The one resize every prompt image gets: sides a multiple of patch*merge (Qwen's smart_resize),
    at most `max_pixels`. The processor is then called with do_resize=False, so the image the model sees
    is exactly this one. Relative (0-999) coordinates are unaffected; absolute ones refer to this size."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    ip = processor.image_processor
    factor = ip.patch_size * ip.merge_size
    h, w = smart_resize(image.height, image.width, factor=factor, min_pixels=4 * factor * factor,
                        max_pixels=max(max_pixels, 4 * factor * factor))
    if (w, h) == image.size:
        return image
    return image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC)
