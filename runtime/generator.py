"""The generation loop: prefill and decode a batch of prompts over the paged KV cache.

Each step packs, in order, as many running sequences as the engine's batch and token limits
allow; a sequence contributes its not-yet-computed tokens (a prefill chunk) or its one newest
token (decode), so prefills and decodes share steps. A sequence is admitted only when the pool
can reserve every block it may need, so no step ever runs out of blocks mid-sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from llmc import contract
from llmc.backends import Session
from llmc.errors import LlmcError
from llmc.limits import BuildLimits as Limits
from llmc.runtime.kv_cache import BlockPool, blocks_needed
from llmc.runtime.sampler import SamplingParams, sample


@dataclass
class Sequence:
    index: int
    tokens: list[int]
    prompt_len: int
    max_len: int                # prompt + max_new_tokens, capped by the engine's max_seq_len
    rng: np.random.Generator   # host sampling
    seed: int                  # device sampling: one Philox stream per sequence
    num_computed: int = 0
    blocks: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]


def check_prompt(n_tokens: int, limits: Limits) -> None:
    if n_tokens == 0:
        raise LlmcError("the prompt is empty (0 tokens)")
    if n_tokens >= limits.max_seq_len:
        raise LlmcError(
            f"the prompt has {n_tokens} tokens; this engine allows at most "
            f"{limits.max_seq_len - 1} prompt tokens (max_seq_len {limits.max_seq_len}). "
            "Shorten the prompt or rebuild with a larger --max-seq-len."
        )


def generate(session: Session, limits: Limits, prompts: list[list[int]], max_new_tokens: int,
             params: SamplingParams, eos_ids: tuple[int, ...] = (),
             on_token: Callable[[int, int], None] | None = None) -> list[Sequence]:
    """Generate for every prompt; returns the sequences with tokens and finish reasons."""
    params.validate()
    if max_new_tokens < 1:
        raise LlmcError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for p in prompts:
        check_prompt(len(p), limits)
    seed = np.random.SeedSequence(params.seed)
    seqs = [Sequence(i, list(p), len(p), min(len(p) + max_new_tokens, limits.max_seq_len),
                     np.random.default_rng(s), int(s.generate_state(1, np.uint64)[0]))
            for i, (p, s) in enumerate(zip(prompts, seed.spawn(len(prompts))))]
    # The GPU sampler does temperature, top_k and top_p; anything more samples on the host.
    on_device = hasattr(session, "step_sample") and not params.needs_host
    need = [blocks_needed(s.max_len, limits.kv_block_size) for s in seqs]
    # A GPU session sizes its pool from memory and says how many blocks it holds.
    capacity = getattr(session, "kv_capacity", limits.max_num_blocks)
    pool = BlockPool(min(sum(need), limits.max_num_blocks, capacity))
    session.allocate_kv(pool.num_blocks)

    waiting, running = list(zip(seqs, need)), []
    while waiting or running:
        while waiting and len(running) < limits.max_batch_size:
            blocks = pool.allocate(waiting[0][1])
            if blocks is None:
                break
            seq = waiting.pop(0)[0]
            seq.blocks = blocks
            running.append(seq)
        batch = schedule(running, limits)
        inputs = step_inputs(batch, limits)
        if on_device:   # sampled on the device: only ids come back
            sampled = session.step_sample(
                inputs, params.temperature, params.top_k, params.top_p,
                [s.seed for s, _ in batch], [len(s.generated) for s, _ in batch])
        else:
            logits = session.step(inputs)
        for row, (seq, n) in enumerate(batch):
            seq.num_computed += n
            if seq.num_computed < len(seq.tokens):
                continue  # prefill chunk: more of the prompt to go
            token = (int(sampled[row]) if on_device
                     else sample(logits[row], params, seq.rng, seq.generated,
                                 seq.tokens[:seq.prompt_len], eos_ids))
            seq.tokens.append(token)
            if on_token:
                on_token(seq.index, token)
            if token in eos_ids and not params.ignore_eos:
                seq.finish_reason = "eos"
            elif token in params.stop_token_ids:
                seq.finish_reason = "stop"
            elif len(seq.tokens) >= seq.max_len:
                seq.finish_reason = "length"
            if seq.finish_reason:
                running.remove(seq)
                pool.free(seq.blocks)
    return seqs


def schedule(running: list[Sequence], limits: Limits) -> list[tuple[Sequence, int]]:
    budget, batch = limits.max_num_tokens, []
    for seq in running:
        n = min(len(seq.tokens) - seq.num_computed, budget)
        if n == 0:
            break
        batch.append((seq, n))
        budget -= n
    return batch


def step_inputs(batch: list[tuple[Sequence, int]], limits: Limits) -> dict[str, np.ndarray]:
    return contract.pack_step([contract.Chunk(seq.tokens[seq.num_computed:seq.num_computed + n],
                                              seq.num_computed, seq.blocks)
                               for seq, n in batch], limits.kv_block_size)
