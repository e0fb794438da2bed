"""The in-process HF backend: concurrent episodes' turns batched into one left-padded `generate` call.

A queue gathers requests for up to `batch_wait_ms` or until `max_batch`; the batch runs in a worker
thread so the event loop keeps stepping envs meanwhile. `model_lock` is shared with the trainer in the
colocated layout: a generation never sees half-updated weights, and each completion records the version
the weights had while it was produced.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time
from dataclasses import dataclass

import torch

from cua_kit.inference.base import Completion, GenerationRequest, SamplingParams
from cua_kit.models.inputs import Row, collate, vision_special_ids
from cua_kit.models.loader import LoadedPolicy


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future


class HFPolicy:
    """Policy protocol over a transformers model (optionally a peft LoRA model) in this process."""

    def __init__(self, loaded: LoadedPolicy, max_batch: int = 8, batch_wait_ms: float = 5.0,
                 kv_cache: str = "dynamic", generate_kwargs: dict | None = None):
        if kv_cache not in ("dynamic", "static"):
            raise ValueError(f"kv_cache must be 'dynamic' or 'static', got {kv_cache!r}")
        self.loaded = loaded
        self.static = kv_cache == "static"
        self.generate_kwargs = generate_kwargs or {}  # extra `generate` arguments (benchmarks)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000
        self.model_lock = threading.RLock()
        # one generation thread for the policy's life: the CUDA graphs that a compiled static-cache decode step
        # records are thread-local, and asyncio.to_thread could hand each batch to a different thread
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")
        self._version = 0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._suppress = vision_special_ids(loaded.tokenizer)
        tok = loaded.tokenizer
        self._eos = [tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id]
        self.batch_sizes: list[int] = []  # for tests and benchmarks: how well requests were batched
        self.busy_s = 0.0

    @property
    def version(self) -> int:
        return self._version

    def set_version(self, version: int) -> None:
        """Called by the trainer after an optimizer step (weights are shared in-process)."""
        self._version = version

    async def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        self._ensure_worker()
        loop = asyncio.get_running_loop()
        pending = [_Pending(r, loop.create_future()) for r in requests]
        for p in pending:
            self._queue.put_nowait(p)  # type: ignore[union-attr]
        return list(await asyncio.gather(*(p.future for p in pending)))

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            await asyncio.gather(self._worker, return_exceptions=True)
            self._worker = None

    def _ensure_worker(self) -> None:
        loop = asyncio.get_running_loop()
        if self._worker is None or self._worker.done() or self._worker.get_loop() is not loop:
            self._queue = asyncio.Queue()
            self._worker = loop.create_task(self._batch_loop())

    async def _batch_loop(self) -> None:
        assert self._queue is not None
        while True:
            batch = [await self._queue.get()]
            deadline = time.monotonic() + self.batch_wait_s
            while len(batch) < self.max_batch:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                # not asyncio.wait_for: on 3.10/3.11 it can swallow a cancel, and close() then hangs
                getter = asyncio.ensure_future(self._queue.get())
                try:
                    done, _ = await asyncio.wait({getter}, timeout=remaining)
                finally:
                    if not getter.done():
                        getter.cancel()  # Queue.get leaves the item queued when cancelled
                if getter not in done:
                    break
                batch.append(getter.result())
            for group in _by_sampling(batch):
                await self._run(group)

    async def _run(self, batch: list[_Pending]) -> None:
        try:
            loop = asyncio.get_running_loop()
            results = await loop.run_in_executor(self._thread, self.generate_sync, [p.request for p in batch])
        except Exception as exc:  # a failed batch fails its requests, not the worker
            for p in batch:
                if not p.future.done():
                    p.future.set_exception(exc)
            return
        for p, result in zip(batch, results):
            if not p.future.done():
                p.future.set_result(result)

    def generate_sync(self, requests: list[GenerationRequest]) -> list[Completion]:
        """One left-padded generate call for requests that share sampling params."""
        sampling, n = requests[0].sampling, len(requests)
        model, processor = self.loaded.model, self.loaded.processor
        rows = [Row(r.prompt_ids, r.images) for r in requests]
        cache: dict = {}
        if self.static:  # shapes from few buckets: the compiled decode step is reused, not recompiled
            rows += [rows[-1]] * (_bucket(n, self.max_batch) - n)
            cache = {"cache_implementation": "static"}
        with self.model_lock, torch.no_grad():
            start = time.perf_counter()
            version = self._version
            model.eval()
            inputs = collate(processor, rows, self.loaded.device, pad_to_multiple=STATIC_WIDTH if self.static else 1)
            out = model.generate(
                **inputs, **_sampling_kwargs(sampling), max_new_tokens=sampling.max_new_tokens,
                suppress_tokens=self._suppress, eos_token_id=self._eos,
                pad_token_id=self.loaded.tokenizer.pad_token_id, return_dict_in_generate=True, output_scores=True,
                logits_processor=self._grammar_processors(), **cache, **self.generate_kwargs,
            )
            self.batch_sizes.append(n)
            self.busy_s += time.perf_counter() - start
        width = inputs["input_ids"].shape[1]
        new_tokens = out.sequences[:n, width:]  # kv_cache=static: the bucket's padding rows are dropped here
        # scores are the *processed* logits (temperature, top-k/top-p, suppression applied): their
        # log-softmax is the behaviour distribution the tokens were drawn from.
        logprobs = torch.stack([torch.log_softmax(s[:n].float(), dim=-1) for s in out.scores], dim=1)
        chosen = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        return [self._completion(new_tokens[i], chosen[i], version) for i in range(n)]

    def _grammar_processors(self) -> list:
        grammar = self.loaded.action_grammar
        return [grammar.logits_processor()] if grammar is not None else []

    def _completion(self, tokens: torch.Tensor, logprobs: torch.Tensor, version: int) -> Completion:
        ids = tokens.tolist()
        end = next((i + 1 for i, t in enumerate(ids) if t in self._eos), None)
        finish = "stop" if end is not None else "length"
        ids = ids[:end] if end is not None else ids
        text = self.loaded.tokenizer.decode(ids, skip_special_tokens=False)
        for eos in ("<|im_end|>", "<|endoftext|>"):
            text = text.removesuffix(eos)
        return Completion(ids, logprobs[: len(ids)].tolist(), text, version, finish)


STATIC_WIDTH = 64  # kv_cache=static: prompt widths are rounded up to a multiple of this


def _bucket(n: int, max_batch: int) -> int:
    """kv_cache=static: the batch is padded up to a power of two (at most max_batch, at least n)."""
    return max(n, min(max_batch, 1 << (n - 1).bit_length()))


def _sampling_kwargs(sampling: SamplingParams) -> dict:
    """Explicit sampling knobs (generation_config defaults such as top_k=50 must not leak in);
    temperature 0 means greedy (evaluation)."""
    if sampling.temperature == 0:
        return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": sampling.top_k}


def _by_sampling(batch: list[_Pending]) -> list[list[_Pending]]:
    """Requests with different sampling params can't share a generate call."""
    groups: dict[SamplingParams, list[_Pending]] = {}
    for p in batch:
        groups.setdefault(p.request.sampling, []).append(p)
    return list(groups.values())
