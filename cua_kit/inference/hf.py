"""The in-process HF backend: concurrent episodes' turns batched into one left-padded `generate` call.

A queue gathers requests for up to `batch_wait_ms` or until `max_batch`; the batch runs on one worker
thread so the event loop keeps stepping envs meanwhile. The backend generates with the trainer's own weights
(`shares_weights`): `pause()` waits for the batch in flight and holds back the next one until `resume()`, so a
generation never sees half-updated weights, and each completion records the version its weights had.
With `shares_weights=False` it generates with a copy of its own (rank 0 of an FSDP run, whose trainer holds
only shards: `cua_kit.distributed`), and `update_weights` loads each new adapter into it, like a server.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from dataclasses import dataclass

import torch

from cua_kit.inference.base import Completion, GenerationRequest, SamplingParams, decode_completion
from cua_kit.inference.distribution import DistributionProcessor, hf_sampling_kwargs
from cua_kit.models.inputs import Row, collate, end_token_ids, vision_special_ids
from cua_kit.models.loader import LoadedModel


@dataclass
class _Pending:
    request: GenerationRequest
    future: asyncio.Future


class HFPolicy:
    """Policy protocol over a transformers model (optionally a peft LoRA model) in this process."""

    def __init__(self, loaded: LoadedModel, max_batch: int = 8, batch_wait_ms: float = 5.0,
                 kv_cache: str = "dynamic", generate_kwargs: dict | None = None, shares_weights: bool = True):
        if kv_cache not in ("dynamic", "static"):
            raise ValueError(f"kv_cache must be 'dynamic' or 'static', got {kv_cache!r}")
        self.loaded = loaded
        self.shares_weights = shares_weights  # False: `loaded` is a copy that update_weights keeps current
        self.static = kv_cache == "static"
        self.generate_kwargs = generate_kwargs or {}  # extra `generate` arguments (benchmarks)
        self.max_batch = max_batch
        self.batch_wait_s = batch_wait_ms / 1000
        self._open: asyncio.Event | None = None  # cleared by pause(): no batch starts until resume()
        self._idle: asyncio.Event | None = None  # set while no batch is in flight
        # one generation thread for the policy's life: the CUDA graphs that a compiled static-cache decode step
        # records are thread-local, and asyncio.to_thread could hand each batch to a different thread
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-generate")
        self._version = 0
        self._queue: asyncio.Queue[_Pending] | None = None
        self._worker: asyncio.Task | None = None
        self._suppress = vision_special_ids(loaded.tokenizer)
        self._eos = end_token_ids(loaded.tokenizer)
        self.batch_sizes: list[int] = []  # how well requests were batched (tests, benchmarks, `stats`)
        self.busy_s = 0.0

    @property
    def version(self) -> int:
        return self._version

    async def pause(self) -> None:
        """Hold back new batches, then wait for the one in flight (the trainer is about to write the weights)."""
        self._events()[0].clear()
        await self._events()[1].wait()

    async def resume(self) -> None:
        self._events()[0].set()

    async def update_weights(self, version: int, adapter_dir=None) -> None:
        """Shared weights: the trainer changed them in place, only the version number is news. Own copy: the
        adapter's tensors are loaded into it between two generate calls."""
        if not self.shares_weights and adapter_dir is not None:
            try:
                await self.pause()
                await asyncio.get_running_loop().run_in_executor(self._thread, _load_adapter, self.loaded.model,
                                                                 adapter_dir)
            finally:
                await self.resume()
        self._version = version

    def stats(self) -> dict[str, float]:
        return {"gen_calls": float(len(self.batch_sizes)), "gen_requests": float(sum(self.batch_sizes)),
                "gen_busy_s": self.busy_s}

    async def failed(self) -> BaseException:
        """In-process generation has no server to lose: never returns."""
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    def _events(self) -> tuple[asyncio.Event, asyncio.Event]:
        """(open, idle), made on first use in the running loop: both start set."""
        if self._open is None or self._idle is None:
            self._open, self._idle = asyncio.Event(), asyncio.Event()
            self._open.set()
            self._idle.set()
        return self._open, self._idle

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
            if self._worker is not None and self._worker.get_loop() is not loop:
                self._open = self._idle = None  # asyncio events belong to one loop
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
            opened, idle = self._events()
            for group in _by_sampling(batch):
                await opened.wait()  # paused while the trainer writes the weights
                idle.clear()  # no await between the gate and this: pause() sees the batch as in flight
                try:
                    await self._run(group)
                finally:
                    idle.set()

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
        with torch.no_grad():
            start = time.perf_counter()
            version = self._version
            model.eval()
            inputs = collate(processor, rows, self.loaded.device, pad_to_multiple=STATIC_WIDTH if self.static else 1)
            out = model.generate(
                **inputs, **hf_sampling_kwargs(sampling), max_new_tokens=sampling.max_new_tokens,
                eos_token_id=self._eos, pad_token_id=self.loaded.tokenizer.pad_token_id,
                return_dict_in_generate=True, output_scores=True, logits_processor=[self._processor(sampling)],
                **cache, **self.generate_kwargs,
            )
            self.batch_sizes.append(n)
            self.busy_s += time.perf_counter() - start
        width = inputs["input_ids"].shape[1]
        new_tokens = out.sequences[:n, width:]  # kv_cache=static: the bucket's padding rows are dropped here
        # scores are the *processed* logits (`DistributionProcessor`: the policy's one definition): their
        # log-softmax is the behaviour distribution the tokens were drawn from.
        logprobs = torch.stack([torch.log_softmax(s[:n].float(), dim=-1) for s in out.scores], dim=1)
        chosen = logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        return [self._completion(new_tokens[i], chosen[i], version) for i in range(n)]

    def _processor(self, sampling) -> DistributionProcessor:
        """A fresh processor per call (the grammar's matchers follow one batch)."""
        grammar = self.loaded.action_grammar
        return DistributionProcessor(sampling, self._suppress, grammar.logits_processor() if grammar else None)

    def _completion(self, tokens: torch.Tensor, logprobs: torch.Tensor, version: int) -> Completion:
        ids = tokens.tolist()
        end = next((i + 1 for i, t in enumerate(ids) if t in self._eos), None)
        finish = "stop" if end is not None else "length"
        ids = ids[:end] if end is not None else ids
        return Completion(ids, logprobs[: len(ids)].tolist(), decode_completion(self.loaded.tokenizer, ids), version,
                          finish)


def _load_adapter(model, adapter_dir) -> None:
    """A plain peft adapter folder's tensors into `model`'s trained adapter ("default"), in place."""
    from peft import set_peft_model_state_dict
    from peft.utils import load_peft_weights

    result = set_peft_model_state_dict(model, load_peft_weights(str(adapter_dir)), adapter_name="default")
    if result.unexpected_keys:
        raise ValueError(f"{adapter_dir}: tensors this model has no LoRA module for: {result.unexpected_keys[:3]}")


STATIC_WIDTH = 64  # kv_cache=static: prompt widths are rounded up to a multiple of this


def _bucket(n: int, max_batch: int) -> int:
    """kv_cache=static: the batch is padded up to a power of two (at most max_batch, at least n)."""
    return max(n, min(max_batch, 1 << (n - 1).bit_length()))


def _by_sampling(batch: list[_Pending]) -> list[list[_Pending]]:
    """Requests with different sampling params can't share a generate call."""
    groups: dict[SamplingParams, list[_Pending]] = {}
    for p in batch:
        groups.setdefault(p.request.sampling, []).append(p)
    return list(groups.values())
