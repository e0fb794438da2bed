"""The vLLM backend (`rollout.backend: vllm`): a vLLM server generates, and gets the trainer's LoRA after each update.

    policy = VLLMPolicy(loaded, vllm_server(cfg), cfg.run_dir / "adapters", max_model_len(cfg))
    await policy.update_weights(version, adapter_dir)       # after each trainer update (train.py does this)
    completions = await policy.generate([GenerationRequest(ids, images, sampling)])

Token-in-token-out: each request sends the kit's prompt token ids and its resized images to the server's
`/cua/generate` route (`vllm_server.py`); each image's `<|image_pad|>` run is sent as one token, which vLLM
expands again from the same image (the server's prompt length is checked against ours). The completion's ids
come back with vLLM's processed log-probs (after the action grammar, the banned vision tokens, temperature,
top-k and top-p: the distribution of `inference.distribution`, which the trainer scores under).

The whole adapter, per version: `update_weights(version, dir)` loads `dir` (LoRA on the vision blocks, the merger
and the language model; the server runs with tower/connector LoRA on) under a fresh name `v<version>-<random>`, which
also keys vLLM's encoder cache, so no stale vision output is reused (vLLM #44939: reloading under the same
name does reuse it). New requests use it at once. Versions no request uses any more are unloaded.

Interruptible generation: requests still running on an older version when a new one lands are aborted; each
returns its partial tokens, and the rest is generated on the new version from prompt + partial tokens, so one
completion can span versions (`Completion.token_versions`; `version` is the oldest, which staleness counts).
Under the action grammar the partial tokens are dropped and the turn restarts on the new version instead:
vLLM's structured output can only start a grammar at the prompt's end, not in the middle of a call.

A request lost with its server (killed, crashed) raises `PolicyError` (that episode ends as `policy_error`, the
run goes on); a managed server is restarted (`vllm.max_restarts`) and the current adapter loaded again. A server
that can't start stops the run with its own error and log tail (`ServerStartError`, also through `failed()`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import itertools
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from cua_kit.config import VLLM_LORA_RANKS, Config
from cua_kit.inference.base import Completion, GenerationRequest, PolicyError, decode_completion
from cua_kit.inference.vllm_process import ExternalServer, ManagedServer, ServerStartError
from cua_kit.models.inputs import end_token_ids, vision_special_ids
from cua_kit.models.loader import LoadedModel

log = logging.getLogger(__name__)
MAX_LOADED_ADAPTERS = 4  # vLLM LoRA slots: the served version, plus older ones whose aborts are still returning


class _Lost(Exception):
    """The server could not be reached: it died (or, for an external one, is down). `unsent`: the request never
    reached it (connection refused), so sending it again is safe."""

    def __init__(self, message: str, unsent: bool):
        super().__init__(message)
        self.unsent = unsent


@dataclass(frozen=True)
class _Adapter:
    version: int
    name: str  # fresh per load (even of the same version): vLLM keys its encoder cache with it
    path: Path


@dataclass
class _Result:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # stop | length | abort (by the kit, for an update) | unsent (the server was down)


class VLLMPolicy:
    """Policy protocol over a vLLM server (see the module docstring)."""

    shares_weights = False

    def __init__(self, loaded: LoadedModel, server: ManagedServer | ExternalServer, adapters_dir: Path | None = None,
                 max_model_len: int = 0):
        """`loaded`: the trainer's model (tokenizer, the adapter to export before any update, and its action grammar,
        which the server applies through structured output: the very mask the trainer's scoring applies)."""
        tok = loaded.tokenizer
        self.loaded, self.server = loaded, server
        self.adapters_dir, self.max_model_len = adapters_dir, max_model_len
        grammar = loaded.action_grammar
        self.grammar: str | None = grammar.ebnf if grammar is not None else None
        self._banned = vision_special_ids(tok) + (grammar.never if grammar is not None else [])
        self._stop = end_token_ids(tok)
        self._image_pad = tok.convert_tokens_to_ids("<|image_pad|>")
        self._version = 0
        self._current: _Adapter | None = None
        self._loaded: dict[str, _Adapter] = {}  # on the server now
        self._inflight: dict[str, str | None] = {}  # request id -> the adapter name it runs on
        self._interrupted: set[str] = set()
        self._client: httpx.AsyncClient | None = None
        self._started = False
        self._lock: asyncio.Lock | None = None  # server start/restart and adapter loads
        self._up: asyncio.Event | None = None  # cleared while the server restarts
        self._failure: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._first_load: asyncio.Future | None = None
        self._active, self._busy_since = 0, 0.0
        self.counts = {"gen_calls": 0.0, "gen_requests": 0.0, "gen_busy_s": 0.0, "vllm_resubmits": 0.0,
                       "vllm_lost_requests": 0.0, "vllm_tokens": 0.0}

    # ------------------------------------------------------------------ protocol
    @property
    def version(self) -> int:
        return self._version

    async def pause(self) -> None:
        """Nothing to do: the server generates with its own copy of the weights."""

    async def resume(self) -> None:
        pass

    def stats(self) -> dict[str, float]:
        busy = self.counts["gen_busy_s"] + (time.monotonic() - self._busy_since if self._active else 0.0)
        return {**self.counts, "gen_busy_s": busy, "vllm_restarts": float(self.server.restarts)}

    async def failed(self) -> BaseException:
        """Returns once the server is beyond repair (could not restart): the error that stops the run."""
        self._bind_loop()
        return await asyncio.shield(self._failed_future())

    async def close(self) -> None:
        if not self.server.owned and self._started:  # a server kept across runs keeps none of this run's adapters
            self._current = None
            self._inflight.clear()
            await self._unload_unused()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self.server.owned:
            await self.server.stop()
        self._started = False

    async def update_weights(self, version: int, adapter_dir: Path | None) -> None:
        """Serve `version` from `adapter_dir` (None: export the loaded model's adapter): load it under a fresh name,
        point new requests at it, interrupt the older versions' requests, unload what nothing uses."""
        await self._ensure_server()
        if adapter_dir is None:
            adapter_dir = await asyncio.to_thread(self._export, version)
        for attempt in range(2):
            try:
                async with self._guard():
                    adapter = await self._load(version, Path(adapter_dir))
                    self._current, self._version = adapter, version
                break
            except _Lost:
                if attempt:
                    raise ServerStartError("the vLLM server was lost twice while loading an adapter") from None
                await self._recover()  # ServerStartError when it can't come back: the run stops
        stale = [rid for rid, name in self._inflight.items() if name != adapter.name]
        if stale:
            self._interrupted.update(stale)
            try:
                await self._post("/cua/abort", {"request_ids": stale})
            except _Lost:
                pass  # those requests are lost with the server; their episodes recover on their own
        await self._unload_unused()

    async def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        await self._ensure_server()
        if self._current is None and self._has_adapter():  # used before any update (eval): serve `loaded`'s adapter
            if self._first_load is None:  # once, however many episodes start at the same time
                self._first_load = asyncio.ensure_future(self.update_weights(self._version, None))
            try:
                await asyncio.shield(self._first_load)
            except Exception:
                self._first_load = None  # the next call tries again instead of re-raising this error forever
                raise
        self.counts["gen_requests"] += len(requests)
        return list(await asyncio.gather(*(self._one(r) for r in requests)))

    # ------------------------------------------------------------------ one request
    async def _one(self, request: GenerationRequest) -> Completion:
        images = await asyncio.to_thread(lambda: [_png(im) for im in request.images])
        tokens: list[int] = []
        logprobs: list[float] = []
        versions: list[int] = []
        base_id = uuid.uuid4().hex
        resent = False
        for attempt in itertools.count():
            budget = request.sampling.max_new_tokens - len(tokens)
            if budget <= 0:
                return self._completion(tokens, logprobs, versions, "length")
            adapter, rid = self._current, f"{base_id}-{attempt}"
            result = await self._generate(rid, request, images, tokens, adapter, budget)
            interrupted = rid in self._interrupted
            self._interrupted.discard(rid)
            version = adapter.version if adapter is not None else self._version
            if result.finish_reason == "unsent":  # the server was down; it is back: send it again, once
                if resent:
                    raise PolicyError("vLLM request could not be sent twice: the server is down")
                resent = True
                continue
            if result.finish_reason == "abort":
                if not interrupted:
                    raise PolicyError(f"vLLM aborted request {rid} (not the kit)")
                self.counts["vllm_resubmits"] += 1
                if self.grammar is not None:  # the grammar can't resume mid-call: restart the turn
                    tokens, logprobs, versions = [], [], []
                    continue
            tokens += result.token_ids
            logprobs += result.logprobs
            versions += [version] * len(result.token_ids)
            if result.finish_reason != "abort":
                return self._completion(tokens, logprobs, versions, result.finish_reason)
        raise AssertionError("unreachable")

    def _completion(self, tokens: list[int], logprobs: list[float], versions: list[int], finish: str) -> Completion:
        self.counts["vllm_tokens"] += len(tokens)
        oldest = min(versions, default=self._version)
        spans = versions if len(set(versions)) > 1 else None
        return Completion(tokens, logprobs, decode_completion(self.loaded.tokenizer, tokens), oldest,
                          "stop" if finish == "stop" else "length", spans)

    async def _generate(self, rid: str, request: GenerationRequest, images: list[str], partial: list[int],
                        adapter: _Adapter | None, budget: int) -> _Result:
        """One /cua/generate call for `request` continued after `partial` tokens, registered as in flight on
        `adapter` while it runs (no await between reading the adapter and registering: an update sees it)."""
        self._inflight[rid] = adapter.name if adapter is not None else None
        self._busy(+1)
        try:
            prompt = self._collapse(request.prompt_ids) + partial
            room = self.max_model_len - len(request.prompt_ids) - len(partial) if self.max_model_len else budget
            if room <= 0:
                raise PolicyError(f"the prompt ({len(request.prompt_ids)} tokens) fills vllm.max_model_len="
                                  f"{self.max_model_len}")
            s = request.sampling
            body = {"request_id": rid, "prompt_ids": prompt, "images": images,
                    "adapter": adapter.name if adapter is not None else None,
                    "temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k, "max_tokens": min(budget, room),
                    "stop_token_ids": self._stop, "banned_token_ids": self._banned, "grammar": self.grammar}
            self.counts["gen_calls"] += 1
            try:
                out = await self._post("/cua/generate", body)
            except _Lost as lost:
                try:
                    await self._recover()
                except ServerStartError as exc:
                    raise PolicyError(f"vLLM request lost ({lost}); the server could not be restarted") from exc
                if lost.unsent:
                    return _Result([], [], "unsent")
                self.counts["vllm_lost_requests"] += 1
                raise PolicyError(f"vLLM request lost ({lost}) with the server") from None
            except RuntimeError as exc:
                raise PolicyError(str(exc)) from exc
        finally:
            self._busy(-1)
            self._inflight.pop(rid, None)
            await self._unload_unused()
        expected = len(request.prompt_ids) + len(partial)
        if out["prompt_len"] != expected:
            raise PolicyError(f"vLLM saw a {out['prompt_len']}-token prompt, the kit built {expected}: the images "
                              "were expanded to a different number of <|image_pad|> tokens")
        return _Result(out["token_ids"], out["logprobs"], out["finish_reason"])

    def _collapse(self, ids: list[int]) -> list[int]:
        """Each image's run of <|image_pad|> tokens as one token: vLLM expands it again from the image itself."""
        pad = self._image_pad
        return [t for i, t in enumerate(ids) if t != pad or i == 0 or ids[i - 1] != pad]

    def _busy(self, delta: int) -> None:
        """gen_busy_s: wall time with at least one request in flight."""
        now = time.monotonic()
        if delta > 0 and self._active == 0:
            self._busy_since = now
        self._active += delta
        if delta < 0 and self._active == 0:
            self.counts["gen_busy_s"] += now - self._busy_since

    # ------------------------------------------------------------------ server and adapters
    def _guard(self) -> asyncio.Lock:
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def _ready_event(self) -> asyncio.Event:
        if self._up is None:
            self._up = asyncio.Event()
            self._up.set()
        return self._up

    def _failed_future(self) -> asyncio.Future:
        if self._failure is None:
            self._failure = asyncio.get_running_loop().create_future()
        return self._failure

    def _bind_loop(self) -> None:
        """asyncio objects belong to one event loop: a policy used from a new loop (a notebook's asyncio.run per
        cell) makes fresh ones (the old loop's client is dropped, not closed: that loop may be gone)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop, self._lock, self._up, self._client, self._first_load = loop, None, None, None, None
            if self._failure is not None and not self._failure.done():
                self._failure = None

    async def _ensure_server(self) -> None:
        self._bind_loop()
        if self._failure is not None and self._failure.done():
            raise PolicyError(f"the vLLM server is down: {self._failure.result()}")
        await self._ready_event().wait()  # a restart in progress
        if self._started:
            return
        async with self._guard():
            if not self._started:
                await self.server.start()  # ServerStartError: the run stops with the server's own words
                self._started = True

    def _http(self) -> httpx.AsyncClient:
        """One client (connection pool) per event loop; generation has no read timeout (a turn can be long)."""
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(None, connect=10.0),
                                             limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        return self._client

    async def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST to the server: _Lost when it can't be reached (died), RuntimeError on an error answer."""
        try:
            response = await self._http().post(self.server.url + path, json=body)
        except httpx.TransportError as exc:
            raise _Lost(f"{type(exc).__name__}: {exc}", isinstance(exc, httpx.ConnectError)) from exc
        if response.status_code != 200:
            message = f"vLLM {path} answered {response.status_code}: {response.text[:500]}"
            log.warning(message)
            raise RuntimeError(message)
        json_body = response.headers.get("content-type", "").startswith("application/json")
        return response.json() if json_body else {"text": response.text}  # vLLM's LoRA routes answer in plain text

    async def _recover(self) -> None:
        """After a lost request: if the server died, restart it and load the current adapter again.
        ServerStartError (also given to `failed()`) when it can't come back."""
        up = self._ready_event()
        async with self._guard():
            if not await self._server_gone():
                return  # restarted by another request meanwhile, or not ours to restart
            up.clear()
            try:
                log.warning("the vLLM server died; restarting it (restart %d, vllm.max_restarts=%d)",
                            self.server.restarts + 1, getattr(self.server, "max_restarts", 0))
                await self.server.restart()
                self._loaded.clear()
                if self._current is not None:
                    self._current = await self._load(self._current.version, self._current.path)
            except (ServerStartError, _Lost, RuntimeError) as exc:
                error = exc if isinstance(exc, ServerStartError) else ServerStartError(f"after a restart: {exc}")
                if not self._failed_future().done():
                    self._failed_future().set_result(error)
                raise error from None
            finally:
                up.set()

    async def _server_gone(self) -> bool:
        """Did the server die? A killed server's sockets close before its process can be reaped, so a dying one
        gets a few seconds to exit; one that answers /health is fine (only a request was lost)."""
        deadline = time.monotonic() + 5.0
        while self.server.alive() and time.monotonic() < deadline:
            try:
                if (await self._http().get(self.server.url + "/health", timeout=1.0)).status_code == 200:
                    return False
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
        return not self.server.alive()

    async def _load(self, version: int, path: Path) -> _Adapter:
        """Load `path` under a fresh name (caller holds the guard)."""
        adapter = _Adapter(version, f"v{version}-{uuid.uuid4().hex[:8]}", path)  # unique on the server
        await self._post("/v1/load_lora_adapter", {"lora_name": adapter.name, "lora_path": str(path)})
        self._loaded[adapter.name] = adapter
        return adapter

    async def _unload_unused(self) -> None:
        current = self._current.name if self._current is not None else None
        used = set(self._inflight.values())
        for name in [n for n in self._loaded if n != current and n not in used]:
            if self._loaded.pop(name, None) is None:  # before the await: two callers never unload the same name
                continue  # another caller took it during one of our awaits
            try:
                await self._post("/v1/unload_lora_adapter", {"lora_name": name})
            except (_Lost, RuntimeError) as exc:
                log.warning("could not unload adapter %s: %s", name, exc)

    def _has_adapter(self) -> bool:
        return bool(getattr(self.loaded.model, "peft_config", None))

    def _export(self, version: int) -> Path:
        from cua_kit.checkpoint import export_adapter

        if self.adapters_dir is None:
            raise ValueError("VLLMPolicy needs adapters_dir to export the loaded model's adapter")
        return export_adapter(self.loaded.model, self.adapters_dir, version)


def max_model_len(cfg: Config) -> int:
    """vllm.max_model_len, or trainer.max_seq_length (the trainer drops longer samples anyway)."""
    return cfg.vllm.max_model_len or cfg.trainer.max_seq_length


def lora_slot_rank(cfg: Config) -> int:
    """vllm.max_lora_rank, or the smallest rank vLLM offers that holds lora.r."""
    return cfg.vllm.max_lora_rank or next(r for r in VLLM_LORA_RANKS if r >= cfg.lora.r)


def server_args(cfg: Config) -> list[str]:
    """vLLM's server flags for the run's model, LoRA and memory settings."""
    from cua_kit.models.loader import resolve_device, resolve_dtype, resolve_model_path

    v = cfg.vllm
    dtype = v.dtype if v.dtype != "auto" else str(resolve_dtype(cfg.model.dtype, resolve_device(cfg.model.device)))
    args = ["--model", resolve_model_path(cfg.model), "--dtype", dtype.removeprefix("torch."),
            "--max-model-len", str(max_model_len(cfg)), "--gpu-memory-utilization", str(v.gpu_memory_utilization),
            "--tensor-parallel-size", str(v.tensor_parallel_size), "--seed", str(cfg.trainer.seed),
            # the log-probs of the distribution tokens are drawn from (grammar, bans, temperature, top-k/top-p)
            "--logprobs-mode", "processed_logprobs",
            "--enable-lora", "--max-lora-rank", str(lora_slot_rank(cfg)),
            "--max-loras", str(MAX_LOADED_ADAPTERS), "--max-cpu-loras", str(MAX_LOADED_ADAPTERS),
            # encoder CUDA graphs can apply the wrong adapter to the vision tower (vLLM PR #52376); off by default
            # in 0.26 and 0.32, said explicitly so a newer default can't turn them on
            "--compilation-config", '{"cudagraph_mm_encoder": false}']
    if {"vision_attention", "merger"} & set(cfg.lora.groups):
        args.append("--enable-tower-connector-lora")  # LoRA on the vision blocks and the merger, not only the LM
    if v.enforce_eager:
        args.append("--enforce-eager")
    return args + list(v.extra_args)


def vllm_server(cfg: Config) -> ManagedServer | ExternalServer:
    """The server of the run: vllm.api_base if set, else the kit's own (log in <run>/vllm.log)."""
    v = cfg.vllm
    if v.api_base:
        return ExternalServer(v.api_base)
    env = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # /v1/load_lora_adapter and /v1/unload_lora_adapter
           "VLLM_CPU_KVCACHE_SPACE": str(v.cpu_kv_cache_gib)}
    if v.gpus:
        env["CUDA_VISIBLE_DEVICES"] = v.gpus
    return ManagedServer(server_args(cfg), v.python, cfg.run_dir / "vllm.log", env, v.port, v.startup_timeout_s,
                         v.max_restarts)


def _png(image: Image.Image) -> str:
    """Lossless, fast: the server must see exactly the pixels the kit's scoring forward sees."""
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()
