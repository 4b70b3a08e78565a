"""The LLM engine, transport-free: KV contexts, text decoding and the flow-matching image loop.

The ladder, bottom up:
  _forward(seqs, commit)       one packed forward over several (context, block) pairs
  append(pairs)                add blocks to contexts (text, ViT or clean-VAE), all in one forward
  build_cfg_contexts(items)    the cond / no-text / no-image contexts of the reference inferencer
  run_units(units)             the units of many requests: all decode steps in one forward, every
                               CFG branch of every denoising step in another
  decode_steps / denoise_steps a request's loops as generators: yield a unit, receive its result
  understand_steps / generate_image_steps   the workflows' LLM side, think mode included; each
                               returns a Turn (its result, and a conversation's new contexts when
                               it continued one given as `base`: services/llm/sessions.py keeps them)
  drive(steps)                 one request alone (in-process use); the scheduler drives many at once

The request and result types are the shared contracts (services/common/contracts/).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any, Callable, Generator, Sequence

import torch

from services.common.contracts import (ANSWER_TOKENS, THINK_END, THINK_TOKENS, ContextItem, Controls, ImageParams,
                                       ImageResult, InputError, Progress, TextItem, TextParams, UnderstandResult,
                                       VAEImageItem, ViTImageItem)
from services.common.tokenizer import BagelTokenizer
from services.attention import AttentionBackend, AttentionMetadata, get_backend
from services.llm.flow import apply_cfg, cfg_active, sample_token, timestep_schedule
from services.llm.kv_cache import KVContext, PagedKVCache
from services.llm.latents import latent_position_ids, patchify_latent, unpatchify_latent
from services.llm.model import BagelLLM
from services.vit.model import vit_position_ids

UNDERSTAND_THINK_PROMPT = (
    "You should first think about the reasoning process in the mind and then provide the user with the answer. \n"
    "The reasoning process is enclosed within <think> </think> tags, i.e. <think> reasoning process here </think> "
    "answer here"
)
GENERATE_THINK_PROMPT = (
    "You should first think about the planning process in the mind and then generate the image. \n"
    "The planning process is enclosed within <think> </think> tags, i.e. <think> planning process here </think> "
    "image here"
)


@dataclass
class Block:
    """New tokens for one context: their embeddings, routing, attention mode and RoPE positions."""

    embeds: torch.Tensor            # [n, hidden]
    is_gen: torch.Tensor | None     # [n] bool, None = all und
    causal: bool                    # text: causal; image blocks: bidirectional
    image: bool                     # image blocks share one RoPE position and advance it by 1

    def positions(self, ctx: KVContext) -> torch.Tensor:
        n = self.embeds.shape[0]
        if self.image:
            return torch.full((n,), ctx.rope_position, dtype=torch.long)
        return torch.arange(ctx.rope_position, ctx.rope_position + n)

    def advance(self, ctx: KVContext) -> None:
        ctx.rope_position += 1 if self.image else self.embeds.shape[0]


@dataclass
class CFGContexts:
    cond: KVContext
    notext: KVContext | None  # context without the text (None when text guidance is off)
    noimg: KVContext | None   # context without the input images (None: off, or still equal to cond)
    track_noimg: bool = False  # whether a no-image context is wanted at all

    def noimg_is_cond(self) -> bool:
        # Same blocks, same length: the very same cached keys and values.
        # (noimg is None when it was never kept apart: it is then cond by definition)
        return self.noimg is None or (self.noimg.blocks == self.cond.blocks and self.noimg.length == self.cond.length)

    def all(self) -> list[KVContext]:
        return [c for c in (self.cond, self.notext, self.noimg) if c is not None]


@dataclass
class DecodeUnit:
    """Feed `token` at the context's next position (it is cached); result: next-token logits [V]."""

    ctx: KVContext
    token: int


@dataclass
class DenoiseUnit:
    """One denoising step of one request; result: its guided velocity [h*w, 64]."""

    x: torch.Tensor
    t: float
    ctxs: CFGContexts
    h: int
    w: int
    params: ImageParams


@dataclass
class DenoisePlan:
    branches: list[KVContext]                            # the CFG branches this step runs, cond first
    block: Block                                         # the query block shared by all branches
    guide: Callable[[list[torch.Tensor]], torch.Tensor]  # branch velocities -> guided velocity


@dataclass
class Turn:
    """A request's result, and (for a turn of a conversation) the conversation's contexts after it."""

    result: UnderstandResult | ImageResult
    contexts: CFGContexts | None = None  # owned by the caller: adopt them or free them


Unit = DecodeUnit | DenoiseUnit
# A request's work as a generator: it yields units, is sent their results, and returns its result.
Steps = Generator[Unit, Any, Any]


class LLMEngine:
    def __init__(self, model: BagelLLM, tokenizer: BagelTokenizer, *, attention: AttentionBackend | None = None,
                 kv_cache_tokens: int = 65536, block_size: int = 16, max_context_tokens: int | None = None):
        self.model, self.tok, self.cfg = model, tokenizer, model.cfg
        weight = model.vae2llm.weight
        self.device, self.dtype = weight.device, weight.dtype
        self.attention = attention or get_backend(device=self.device)
        llm = self.cfg.llm
        self.cache = PagedKVCache(llm.num_hidden_layers, llm.num_key_value_heads, llm.head_dim,
                                  num_blocks=-(-kv_cache_tokens // block_size), block_size=block_size,
                                  dtype=self.dtype, device=self.device)
        self.max_context_tokens = min(max_context_tokens or llm.max_position_embeddings, kv_cache_tokens)
        self.scale = llm.head_dim ** -0.5
        self.forward_count = 0  # model forwards run; lets tests and metrics see batching

    # ---- one packed forward ----------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, seqs: Sequence[tuple[KVContext, Block]], commit: bool) -> list[torch.Tensor]:
        """Run new blocks of several contexts in one forward; returns final-normed hidden per block.

        commit=True writes the blocks' K/V to their contexts (and advances RoPE); commit=False only
        reads the contexts (denoising queries are never cached).
        """
        ctxs, blocks = [c for c, _ in seqs], [b for _, b in seqs]
        q_lens = [b.embeds.shape[0] for b in blocks]
        ctx_lens = [c.length for c in ctxs]
        embeds = torch.cat([b.embeds for b in blocks]).to(self.dtype)
        positions = torch.cat([b.positions(c) for c, b in seqs]).to(self.device)
        masks = [b.is_gen if b.is_gen is not None else torch.zeros(n, dtype=torch.bool) for b, n in zip(blocks, q_lens)]
        is_gen = torch.cat(masks).to(self.device) if any(b.is_gen is not None for b in blocks) else None
        slots = torch.cat([self.cache.reserve(c, n) for c, n in zip(ctxs, q_lens)]) if commit else None
        meta = AttentionMetadata.build(q_lens, ctx_lens, [b.causal for b in blocks],
                                       self.cache.block_table(ctxs, ctx_lens), self.cache.block_size)
        cache, attention, scale = self.cache, self.attention, self.scale
        meta = attention.prepare(meta)  # the backend's per-batch work, once for all layers

        def attend_layer(i: int, q, k, v):
            if slots is not None:
                cache.write(i, slots, k, v)
            return attention.paged_attention(q, k, v, cache.k[i], cache.v[i], meta, scale)

        hidden = self.model.language_model(embeds, is_gen, positions, attend_layer)
        self.forward_count += 1
        if commit:
            for c, b in seqs:
                b.advance(c)
        return list(hidden.split(q_lens))

    def append(self, pairs: Sequence[tuple[KVContext, Block]]) -> None:
        """Add blocks to contexts (each context at most once), all in one forward."""
        for c, b in pairs:
            if c.length + b.embeds.shape[0] > self.max_context_tokens:
                raise InputError(f"context would hold {c.length + b.embeds.shape[0]} tokens; the limit is "
                                 f"{self.max_context_tokens}")
        self._forward(pairs, commit=True)

    # ---- blocks ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def text_block(self, ids: list[int]) -> Block:
        """`<|im_start|>` + ids + `<|im_end|>`, causal."""
        full = torch.tensor([self.tok.bos_id, *ids, self.tok.eos_id], device=self.device)
        return Block(self.model.embed_text(full), None, causal=True, image=False)

    def _image_block(self, inner: torch.Tensor, gen: bool) -> Block:
        markers = self.model.embed_text(torch.tensor([self.tok.start_of_image_id, self.tok.end_of_image_id],
                                                     device=self.device))
        embeds = torch.cat([markers[:1], inner.to(markers.dtype), markers[1:]])  # [n + 2, hidden]
        is_gen = None
        if gen:  # markers stay und; the latent tokens take the gen weights
            is_gen = torch.ones(embeds.shape[0], dtype=torch.bool)
            is_gen[0] = is_gen[-1] = False
        return Block(embeds, is_gen, causal=False, image=True)

    @torch.inference_mode()
    def vit_block(self, item: ViTImageItem) -> Block:
        h, w = item.grid
        side = self.cfg.vit_max_num_patch_per_side
        if item.features.dim() != 2 or item.features.shape != (h * w, self.cfg.vit.hidden_size):
            raise InputError(f"ViT features must be [{h}*{w}, {self.cfg.vit.hidden_size}], got "
                             f"{list(item.features.shape)}")
        if not (0 < h <= side and 0 < w <= side):
            raise InputError(f"ViT patch grid {h}x{w} exceeds {side}x{side}")
        pos = vit_position_ids(h, w, side).to(self.device)
        return self._image_block(self.model.embed_vit(item.features.to(self.device), pos), gen=False)

    @torch.inference_mode()
    def vae_block(self, item: VAEImageItem) -> Block:
        tokens, (h, w) = self._latent_tokens(item.latent)
        t = torch.zeros(tokens.shape[0], device=self.device)  # clean conditioning image: t = 0
        pos = latent_position_ids(h, w, self.cfg.max_latent_size).to(self.device)
        return self._image_block(self.model.embed_latent(tokens, t, pos), gen=True)

    def _latent_tokens(self, latent: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        c, p = self.cfg.latent_channels, self.cfg.latent_patch_size
        if latent.dim() != 3 or latent.shape[0] != c or latent.shape[1] % p or latent.shape[2] % p:
            raise InputError(f"latent must be [{c}, H/8, W/8] with even sides, got {list(latent.shape)}")
        h, w = latent.shape[1] // p, latent.shape[2] // p
        if h > self.cfg.max_latent_size or w > self.cfg.max_latent_size:
            raise InputError(f"latent grid {h}x{w} exceeds {self.cfg.max_latent_size} tokens per side")
        return patchify_latent(latent.to(self.device), p), (h, w)

    def block_for(self, item: ContextItem) -> Block:
        if isinstance(item, TextItem):
            return self.text_block(self.tok.encode(item.text))
        if isinstance(item, ViTImageItem):
            return self.vit_block(item)
        if isinstance(item, VAEImageItem):
            return self.vae_block(item)
        raise InputError(f"unknown context item {type(item).__name__}")

    # ---- contexts --------------------------------------------------------------------------------
    def check_context_size(self, items: Sequence[ContextItem], extra: int = 0) -> None:
        """Refuse a request whose context would not fit, before any work is done."""
        total = extra
        for item in items:
            if isinstance(item, TextItem):
                total += len(self.tok.encode(item.text)) + 2
            elif isinstance(item, ViTImageItem):
                total += item.grid[0] * item.grid[1] + 2
            else:
                total += item.latent.shape[1] * item.latent.shape[2] // self.cfg.latent_patch_size ** 2 + 2
        if total > self.max_context_tokens:
            raise InputError(f"the prompt needs {total} context tokens; the limit is {self.max_context_tokens}")

    def build_cfg_contexts(self, items: Sequence[ContextItem], *, need_notext: bool, need_noimg: bool,
                           system_prompt: str | None = None) -> CFGContexts:
        """The reference inferencer's three contexts, built with shared blocks instead of deep copies."""
        ctxs = CFGContexts(self.cache.new_context(), self.cache.new_context() if need_notext else None, None,
                           track_noimg=need_noimg)
        try:
            self.extend_cfg_contexts(ctxs, items, system_prompt)
            self.separate_noimg(ctxs)
        except BaseException:
            self.free(ctxs)
            raise
        return ctxs

    def extend_cfg_contexts(self, ctxs: CFGContexts, items: Sequence[ContextItem],
                            system_prompt: str | None = None) -> None:
        """Append items to the contexts in place, with the reference's semantics.

        cond: everything. no-text: the cond context as it stood before the last text item (after the
        last image); the system prompt is not a "text item" here. no-image: every text item (system
        prompt included), no image. While no image has been seen the no-image context is not kept
        apart (`noimg is None`): it is cond, and costs nothing.
        """
        cache = self.cache
        seq = ([TextItem(system_prompt)] if system_prompt else []) + list(items)
        for index, item in enumerate(seq):
            is_system = system_prompt is not None and index == 0
            block = self.block_for(item)
            if isinstance(item, TextItem):
                if ctxs.notext is not None and not is_system:
                    cache.free(ctxs.notext)
                    ctxs.notext = cache.fork(ctxs.cond)
                targets = [ctxs.cond] + ([ctxs.noimg] if ctxs.noimg is not None else [])
                self.append([(c, block) for c in targets])
            else:
                if ctxs.track_noimg and ctxs.noimg is None:
                    ctxs.noimg = cache.fork(ctxs.cond)
                self.append([(ctxs.cond, block)])
                if ctxs.notext is not None:
                    cache.free(ctxs.notext)
                    ctxs.notext = cache.fork(ctxs.cond)

    def separate_noimg(self, ctxs: CFGContexts) -> None:
        """Before cond diverges from a no-image context it still equals (think text), give it its own."""
        if ctxs.track_noimg and ctxs.noimg is None:
            ctxs.noimg = self.cache.fork(ctxs.cond)

    def fork_contexts(self, ctxs: CFGContexts) -> CFGContexts:
        fork = self.cache.fork
        return CFGContexts(fork(ctxs.cond), ctxs.notext and fork(ctxs.notext), ctxs.noimg and fork(ctxs.noimg),
                           track_noimg=ctxs.track_noimg)

    # ---- units: what one request needs from one forward -------------------------------------------
    @torch.inference_mode()
    def run_units(self, units: Sequence["Unit"], batch_cfg: bool = True) -> list:
        """Execute the units of any number of requests: all decode units in one forward, all denoise
        units (every active CFG branch of every request) in another. Returns one result per unit:
        next-token logits [V] for a DecodeUnit, the guided velocity [h*w, 64] for a DenoiseUnit."""
        results: list = [None] * len(units)
        decode = [(i, u) for i, u in enumerate(units) if isinstance(u, DecodeUnit)]
        if decode:
            pairs = [(u.ctx, self._token_block(u.token)) for _, u in decode]
            for (i, _), hidden in zip(decode, self._forward(pairs, commit=True)):
                results[i] = self.model.logits(hidden[-1])
        denoise = [(i, u) for i, u in enumerate(units) if isinstance(u, DenoiseUnit)]
        if denoise:
            plans = [self._denoise_plan(u) for _, u in denoise]
            pairs = [(c, plan.block) for plan in plans for c in plan.branches]
            if batch_cfg:
                hidden = self._forward(pairs, commit=False)
            else:  # the reference's way: one forward per branch (for benchmarks and the equality test)
                hidden = [self._forward([pair], commit=False)[0] for pair in pairs]
            for (i, _), plan in zip(denoise, plans):
                results[i] = plan.guide([self.model.velocity(h[1:-1]).float() for h in hidden[:len(plan.branches)]])
                hidden = hidden[len(plan.branches):]
        return results

    def _token_block(self, token: int) -> Block:
        return Block(self.model.embed_text(torch.tensor([token], device=self.device)), None, causal=True, image=False)

    def _denoise_plan(self, u: "DenoiseUnit") -> "DenoisePlan":
        """Which branches this step runs, the shared query block, and how to combine their velocities."""
        params = u.params
        active = cfg_active(u.t, params.cfg_interval)
        text_scale = params.cfg_text_scale if active else 1.0
        img_scale = params.cfg_img_scale if active else 1.0
        branches = [u.ctxs.cond]
        if text_scale > 1.0:  # without text guidance no branch but cond changes the result
            branches.append(u.ctxs.notext)
            # Without input images (text-to-image) the no-image context holds what cond holds: its
            # velocity is cond's, so the branch is not run again.
            if img_scale > 1.0 and not u.ctxs.noimg_is_cond():
                branches.append(u.ctxs.noimg)
        pos = latent_position_ids(u.h, u.w, self.cfg.max_latent_size).to(self.device)
        tt = torch.full((u.x.shape[0],), float(u.t), device=self.device)
        block = self._image_block(self.model.embed_latent(u.x.to(self.device), tt, pos), gen=True)

        def guide(v: list[torch.Tensor]) -> torch.Tensor:
            v_notext = v[1] if len(v) > 1 else None
            v_noimg = v[2] if len(v) > 2 else v[0]
            return apply_cfg(v[0], v_notext, v_noimg, text_scale, img_scale, params.cfg_renorm_type,
                             params.cfg_renorm_min)

        return DenoisePlan(branches, block, guide)

    def denoise_step(self, x: torch.Tensor, t: float, ctxs: CFGContexts, h: int, w: int, params: ImageParams,
                     batch_cfg: bool = True) -> torch.Tensor:
        """Guided velocity [h*w, 64] at (x, t) for one request."""
        return self.run_units([DenoiseUnit(x, t, ctxs, h, w, params)], batch_cfg)[0]

    # ---- per-request step generators: yield units, receive their results ----------------------------
    def decode_steps(self, ctx: KVContext, params: TextParams, controls: Controls, stage: str = "answer") -> Steps:
        """Greedy or sampled decoding on a fork of ctx; returns the new ids (without the end token)."""
        work = self.cache.fork(ctx)
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        out: list[int] = []
        token = self.tok.bos_id  # the answer block starts with <|im_start|> at the current position
        try:
            for _ in range(params.max_new_tokens):
                controls.check()
                if work.length + 1 > self.max_context_tokens:
                    break
                logits = yield DecodeUnit(work, token)
                token = sample_token(logits, self.tok.vocab_size, params.do_sample, params.temperature,
                                     params.top_p, gen)
                if token == self.tok.eos_id:
                    break
                out.append(token)
                if controls.on_progress is not None:  # decoding the text so far is only for listeners
                    controls.report(Progress(stage, len(out), params.max_new_tokens, self.tok.decode(out)))
        finally:
            self.cache.free(work)
        return out

    def initial_noise(self, params: ImageParams) -> tuple[torch.Tensor, int | None]:
        """The reference's noise for a seed: randn((h*w, 64)) from a CPU generator, fp32."""
        if params.noise is not None:
            return params.noise.float().cpu(), params.seed
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        n = (params.height // self.cfg.latent_downsample) * (params.width // self.cfg.latent_downsample)
        return torch.randn((n, self.cfg.patch_latent_dim), generator=torch.Generator("cpu").manual_seed(seed)), seed

    def denoise_steps(self, ctxs: CFGContexts, params: ImageParams, controls: Controls) -> Steps:
        """The Euler loop over the shifted schedule; returns (latent [z, H/8, W/8], seed)."""
        h, w = params.height // self.cfg.latent_downsample, params.width // self.cfg.latent_downsample
        x, seed = self.initial_noise(params)
        x = x.to(self.device)
        timesteps, dts = timestep_schedule(params.num_timesteps, params.timestep_shift)
        for i, (t, dt) in enumerate(zip(timesteps.tolist(), dts.tolist())):
            controls.check()
            v = yield DenoiseUnit(x, t, ctxs, h, w, params)
            x = x - v * dt  # Euler, x_t -> x_{t - dt}, in fp32
            controls.report(Progress("denoise", i + 1, len(timesteps)))
        latent = unpatchify_latent(x.cpu(), h, w, self.cfg.latent_patch_size, self.cfg.latent_channels)
        return latent, seed

    def _turn_contexts(self, items: Sequence[ContextItem], system: str | None, base: CFGContexts | None,
                       need_notext: bool, need_noimg: bool) -> CFGContexts:
        """A request's contexts: built from scratch, or forked from a conversation's and extended."""
        prefix = base.cond.length if base is not None else 0
        self.check_context_size(items, extra=prefix + (len(self.tok.encode(system)) + 2 if system else 0))
        if base is None:
            return self.build_cfg_contexts(items, need_notext=need_notext, need_noimg=need_noimg,
                                           system_prompt=system)
        ctxs = self.fork_contexts(base)
        try:
            self.extend_cfg_contexts(ctxs, items, system)
        except BaseException:
            self.free(ctxs)
            raise
        return ctxs

    def _end_turn(self, ctxs: CFGContexts, base: CFGContexts | None, answer: str | None) -> CFGContexts | None:
        """Without a base the turn's contexts are freed; a conversation's turn hands its contexts (with the
        answer as the next text item) back to the caller, who owns them from then on."""
        if base is None:
            self.free(ctxs)
            return None
        try:
            if answer:
                self.extend_cfg_contexts(ctxs, [TextItem(answer)])
        except BaseException:
            self.free(ctxs)
            raise
        return ctxs

    def understand_steps(self, items: Sequence[ContextItem], params: TextParams | None = None, think: bool = False,
                         controls: Controls | None = None, base: CFGContexts | None = None) -> Steps:
        """Returns a Turn of UnderstandResult. With `base` (a conversation's contexts, left untouched) the
        turn starts from it and returns the conversation's new contexts."""
        params = params or TextParams(max_new_tokens=THINK_TOKENS if think else ANSWER_TOKENS)
        controls = controls or Controls()
        params.validate()
        system = UNDERSTAND_THINK_PROMPT if think else None
        ctxs = self._turn_contexts(items, system, base, need_notext=False, need_noimg=False)
        try:
            ids = yield from self.decode_steps(ctxs.cond, params, controls, stage="think" if think else "answer")
        except BaseException:
            self.free(ctxs)
            raise
        full = self.tok.decode(ids)
        kept = self._end_turn(ctxs, base, full)
        text, thought = full, None
        if think and THINK_END in full:
            thought, text = full.split(THINK_END, 1)
            thought = thought.replace("<think>", "").strip()
            text = text.strip()
        return Turn(UnderstandResult(text=text, think=thought, tokens=len(ids)), kept)

    def generate_image_steps(self, items: Sequence[ContextItem], params: ImageParams, think: bool = False,
                             think_params: TextParams | None = None, controls: Controls | None = None,
                             base: CFGContexts | None = None) -> Steps:
        """Returns a Turn of ImageResult (see understand_steps for `base`)."""
        controls = controls or Controls()
        params.validate(self.cfg)
        think_params = think_params or TextParams(max_new_tokens=THINK_TOKENS)
        think_params.validate()
        system = GENERATE_THINK_PROMPT if think else None
        need_notext = params.cfg_text_scale > 1.0
        need_noimg = need_notext and params.cfg_img_scale > 1.0
        ctxs = self._turn_contexts(items, system, base, need_notext, need_noimg)
        try:
            thought = None
            if think:
                ids = yield from self.decode_steps(ctxs.cond, think_params, controls, stage="think")
                thought = self.tok.decode(ids)
                self.separate_noimg(ctxs)  # the thinking joins cond only
                # The reference decodes the thinking text and tokenizes it again before adding it.
                self.append([(ctxs.cond, self.text_block(self.tok.encode(thought)))])
            latent, seed = yield from self.denoise_steps(ctxs, params, controls)
        except BaseException:
            self.free(ctxs)
            raise
        kept = self._end_turn(ctxs, base, None)
        return Turn(ImageResult(latent=latent, seed=seed, think=thought), kept)

    # ---- one request alone ---------------------------------------------------------------------------
    def drive(self, steps: Steps, batch_cfg: bool = True):
        """Run one request's steps to completion, each unit in a forward of its own."""
        try:
            unit = next(steps)
            while True:
                (result,) = self.run_units([unit], batch_cfg)
                unit = steps.send(result)
        except StopIteration as stop:
            return stop.value
        except BaseException:
            steps.close()  # runs the generator's finally blocks: its contexts are freed
            raise

    def understand(self, items: Sequence[ContextItem], params: TextParams | None = None, think: bool = False,
                   controls: Controls | None = None) -> UnderstandResult:
        """One request alone, outside any conversation (sessions: services/llm/sessions.py)."""
        return self.drive(self.understand_steps(items, params, think, controls)).result

    def generate_image(self, items: Sequence[ContextItem], params: ImageParams, think: bool = False,
                       think_params: TextParams | None = None, controls: Controls | None = None,
                       batch_cfg: bool = True) -> ImageResult:
        return self.drive(self.generate_image_steps(items, params, think, think_params, controls),
                          batch_cfg).result

    def free(self, ctxs: CFGContexts) -> None:
        for c in ctxs.all():
            self.cache.free(c)
