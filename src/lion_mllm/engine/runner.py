"""The decode engine: LION's encoders once per request, a slot cache, a compiled decoder step, and the
requests decoding in it. Every decoding path runs on it: `Lion.generate`, the server's continuous
batching, `lion run`, evaluation.

    engine = DecodeEngine(lion.model, EngineOptions(slots=8, max_length=64))
    encoded = engine.encode(lion.processor(images, questions, tasks, tags))
    group = engine.admit(encoded, 0, DecodingSettings(max_new_tokens=40))   # sample 0 takes a slot
    while not group.done:
        engine.step()                     # one decoder step for every admitted request
    group.results                         # [[0, 12, 57, ..., 1]]: decoder ids, start token first

`admit` takes free slots between steps (a request that does not fit raises `EngineFull` and can wait;
one longer than a slot is refused with ValueError), `step` advances every admitted request by one
token, and a finished or `release`d request frees its slots at once, without copying the others.
`generate` runs a whole batch this way (admitting as slots free up when the batch is larger).

Memory: the cache holds `slots x layers x heads x d_kv x 2 (max_length + max_source_length)` values
(`DecodeEngine.cache_bytes`): for FlanT5-XL in bfloat16 with 32 slots, 256 answer tokens and 417
encoder positions, 24 x 32 x 32 x 64 x 2 x 673 x 2 bytes = 4.2 GB.

Compiling (`EngineOptions.compile`): the step is traced by `torch.compile` once per slot-count bucket
(1, 2, 4, ... up to `slots`) and sequence sizes; a CUDA device replays it as a CUDA graph, a CPU runs
the generated C++ kernels (inductor's C++ wrapper). Compile time is paid on the first step of each
bucket (`compile_seconds` reports it) and reused for every later request; the eager step gives the
same tokens (`compile=False`).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..model.generation import DecodingSettings
from ..model.modeling_lion import LionModel
from .search import BeamGroup, Group, TokenGroup, TokenRows
from .step import DecoderStep, SlotCache

__all__ = ["DecodeEngine", "Encoded", "EngineFull", "EngineOptions"]


class EngineFull(Exception):
    """Not enough free slots for this request now; admit it after others finish."""


@dataclass(frozen=True)
class EngineOptions:
    """Sizes of the slot cache and how the step runs.

    slots: decoder sequences at once (a beam search of k beams takes k slots).
    max_length: self-attention positions per slot = the longest answer in tokens (`max_new_tokens`).
    max_source_length: encoder positions per slot (visual tokens + prompt); None: visual tokens + 128.
    compile: `torch.compile` the decoder step (CUDA graphs on a GPU, C++ kernels on a CPU); None
      compiles on CUDA only (a CPU compile costs tens of seconds: worth it for a server, a `lion run`
      job or an evaluation, not for one question).
    """

    slots: int = 8
    max_length: int = 256
    max_source_length: int | None = None
    compile: bool | None = None

    def __post_init__(self) -> None:
        if self.slots < 1 or self.max_length < 1 or (self.max_source_length is not None
                                                       and self.max_source_length < 1):
            raise ValueError(f"engine options must be positive: {self}")


@dataclass(frozen=True)
class Encoded:
    """The T5 encoder outputs of a processed batch, one row per sample; admission turns a row into
    cross-attention keys/values in its slots."""

    hidden: torch.Tensor  # (B, S_b, d) encoder output
    mask: torch.Tensor  # (B, S_b) bool: real positions ([visual tokens; prompt], padding False)
    routes: torch.Tensor  # (B,) adapter route of each sample

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def source_length(self, row: int) -> int:
        return int(self.mask[row].sum())


def _bucket(value: int, smallest: int, largest: int) -> int:
    """The smallest power of two >= value (and >= smallest), capped at largest."""
    size = smallest
    while size < value:
        size *= 2
    return min(size, largest)


class DecodeEngine:
    """Owns a slot cache and runs requests' decoder sequences in it (see the module docstring).

    One thread drives `admit`/`step`/`release` at a time: the server's scheduler, or `generate`
    (which holds `lock`)."""

    def __init__(self, model: LionModel, options: EngineOptions | None = None):
        # the cache is written in place by every later call: made as normal tensors even when the engine
        # is built inside `torch.inference_mode()` (which would make them read-only outside it)
        with torch.inference_mode(False):
            self._build(model, options)

    def _build(self, model: LionModel, options: EngineOptions | None) -> None:
        self.model = model
        self.options = options = options or EngineOptions()
        language = model.language_model
        config = language.config
        self.device, self.dtype = model.device, model.dtype
        self.max_source_length = options.max_source_length or model.config.num_visual_tokens + 128
        self.cache = SlotCache(config.num_decoder_layers, options.slots, config.num_heads, config.d_kv,
                               options.max_length, self.max_source_length, self.dtype, self.device)
        self.start_token = config.decoder_start_token_id
        self.eos_token = config.eos_token_id
        self.vocab = language.lm_head.out_features
        self.early_stopping = language.generation_config.early_stopping
        self.step_module = DecoderStep(language, options.max_length)
        self.compile = options.compile if options.compile is not None else self.device.type == "cuda"
        self._compiled = None
        self._compiled_shapes: set[tuple[int, int, int]] = set()
        self.compile_seconds: dict[tuple[int, int, int], float] = {}  # (slots, length, source) -> first step's s
        # per-slot inputs of the step, preallocated so a compiled step always reads the same buffers
        self.tokens = torch.full((options.slots,), self.start_token, dtype=torch.long, device=self.device)
        self.positions = torch.zeros(options.slots, dtype=torch.long, device=self.device)
        self.routes = torch.zeros(options.slots, dtype=torch.long, device=self.device)
        self.rows = TokenRows(options.slots, self.vocab, self.eos_token, self.device)
        # the same per-slot facts on the host, where the loop reads them without waiting on the device
        self._owner: list[tuple[Group, int] | None] = [None] * options.slots  # slot -> (group, row)
        self._position = [0] * options.slots
        self._source_length = [0] * options.slots
        self.groups: list[Group] = []
        self.lock = threading.Lock()  # held by `generate`; a scheduler that drives the engine holds none
        self.steps = 0

    # -- sizes -------------------------------------------------------------------------------------

    @property
    def cache_bytes(self) -> int:
        return self.cache.nbytes

    @property
    def free_slots(self) -> int:
        return sum(owner is None for owner in self._owner)

    @property
    def active(self) -> bool:
        return bool(self.groups)

    def buckets(self) -> list[int]:
        """The slot counts a step runs at: powers of two below `slots`, and `slots` (powers of four for a
        compiled CUDA step: each bucket is a graph compiled before serving, so fewer of them)."""
        factor = 4 if self.compile and self.device.type == "cuda" else 2
        sizes, size = [], 1
        while size < self.options.slots:
            sizes.append(size)
            size *= factor
        return [*sizes, self.options.slots]

    @torch.no_grad()
    def warm_up(self) -> float:
        """Compile the step for the shapes decoding will meet, before any request: returns the seconds it
        took (0 for an eager engine). On CPU one graph with symbolic sizes serves all slot counts and
        lengths once sizes 1 and 2 and two lengths have been seen; on CUDA each slot bucket is a graph.
        Runs on free slots only (their contents are overwritten when a request takes them)."""
        if not self.compile:
            return 0.0
        if self.groups:
            raise RuntimeError("warm_up runs before any request is admitted")
        started = time.perf_counter()
        if self.device.type == "cuda":
            shapes = [(size, self.options.max_length, self.max_source_length) for size in self.buckets()]
        else:
            small = [(size, min(length, self.options.max_length), min(length, self.max_source_length))
                     for size in dict.fromkeys((1, min(2, self.options.slots))) for length in (16, 32)]
            shapes = [*small, (self.options.slots, self.options.max_length, self.max_source_length)]
        for size, length, source_length in shapes:
            self._run_step(size, length, source_length)
        return time.perf_counter() - started

    # -- encoding ----------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, batch: dict[str, torch.Tensor]) -> Encoded:
        """A processed batch (`LionProcessor` output) -> its T5 encoder outputs: the image encoders, the
        Q-Former and aggregator and the T5 encoder each run once per sample."""
        model = self.model
        batch = {k: v.to(self.device) for k, v in batch.items()}
        embeds, mask = model.encoder_inputs(batch["pixel_values"].to(self.dtype), batch["input_ids"],
                                            batch["attention_mask"], batch.get("qformer_input_ids"),
                                            batch.get("qformer_attention_mask"))
        with model.routing(batch["route_ids"]):
            hidden = model.language_model.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return Encoded(hidden, mask.bool(), batch["route_ids"])

    # -- admission ---------------------------------------------------------------------------------

    def check(self, settings: DecodingSettings, source_length: int) -> None:
        """ValueError if a request with these settings can never run here (before it takes a slot)."""
        if settings.max_new_tokens > self.options.max_length:
            raise ValueError(f"max_new_tokens {settings.max_new_tokens} exceeds the engine's slot length "
                             f"{self.options.max_length}")
        if settings.slots > self.options.slots:
            raise ValueError(f"{settings.slots} sequences (beams or return sequences) exceed the engine's "
                             f"{self.options.slots} slots")
        if source_length > self.max_source_length:
            raise ValueError(f"the prompt is too long: {source_length} encoder positions (visual tokens + prompt "
                             f"tokens) exceed the engine's {self.max_source_length}")

    @torch.no_grad()
    def admit(self, encoded: Encoded, rows: int | Sequence[int], settings: DecodingSettings) -> Group:
        """Start decoding sample(s) `rows` of `encoded` (several rows: one beam search over all of them,
        as `LionModel.generate` batches them). Raises EngineFull when the slots are taken, ValueError
        when the request cannot fit at all."""
        rows = [rows] if isinstance(rows, int) else list(rows)
        lengths = [encoded.source_length(r) for r in rows]
        self.check(settings, max(lengths))
        common = dict(settings=settings, start_token=self.start_token, eos_token=self.eos_token)
        if settings.num_beams > 1:
            group: Group = BeamGroup(**common, sources=len(rows), early_stopping=self.early_stopping)
        elif len(rows) == 1:
            group = TokenGroup(**common)
        else:
            raise ValueError("a greedy or sampling request decodes one sample")
        free = [slot for slot, owner in enumerate(self._owner) if owner is None]
        if group.slots_needed > len(free):
            raise EngineFull(f"{group.slots_needed} slots needed, {len(free)} free")
        group.slots = free[: group.slots_needed]  # the lowest free slots: steps stay in small buckets
        copies = group.slots_needed // len(rows)  # beams (or return sequences) per sample
        keys, values = self._cross_attention(encoded.hidden[rows])  # (layers, rows, heads, S_b, d_kv)
        for index, (row, length) in enumerate(zip(rows, lengths)):
            positions = encoded.mask[row].nonzero().squeeze(1)  # real positions first, padding after
            row_keys, row_values = keys[:, index][:, :, positions], values[:, index][:, :, positions]
            for copy in range(copies):
                slot = group.slots[index * copies + copy]
                self.cache.write_source(slot, row_keys, row_values, length)
                self.routes[slot] = encoded.routes[row]
                self._source_length[slot] = length
        for row_index, slot in enumerate(group.slots):
            self._owner[slot] = (group, row_index)
            self._position[slot] = 0
        slots = torch.tensor(group.slots, device=self.device)
        self.tokens[slots] = self.start_token
        self.positions[slots] = 0
        if isinstance(group, TokenGroup):
            for slot in group.slots:
                self.rows.admit(slot, settings, self.start_token)
            group.start_generator(self.device)
        else:
            group.start(self.device)
        self.groups.append(group)
        return group

    def _cross_attention(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder output (B, S, d) -> every decoder layer's cross-attention keys and values, stacked
        (layers, B, heads, S, d_kv): computed once per sample, read at every step."""
        config = self.model.language_model.config
        shape = (*hidden.shape[:2], config.num_heads, config.d_kv)
        keys, values = [], []
        for block in self.model.language_model.decoder.block:
            attention = block.layer[1].EncDecAttention
            keys.append(attention.k(hidden).view(shape).transpose(1, 2))
            values.append(attention.v(hidden).view(shape).transpose(1, 2))
        return torch.stack(keys), torch.stack(values)

    def release(self, group: Group) -> None:
        """Stop decoding `group` now (finished or cancelled) and free its slots; the others go on."""
        for slot in group.slots:
            if slot >= 0 and self._owner[slot] is not None and self._owner[slot][0] is group:
                self._owner[slot] = None
        group.slots = [-1] * len(group.slots)
        if group in self.groups:
            self.groups.remove(group)

    # -- decoding ----------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> list[Group]:
        """One decoder step for every admitted group; returns the groups that moved (their new tokens are
        in `tokens`/`results`). Finished groups are released (their slots free) before it returns."""
        if not self.groups:
            return []
        used = [slot for slot, owner in enumerate(self._owner) if owner is not None]
        size = next(b for b in self.buckets() if b > used[-1])
        if self.compile and self.device.type == "cuda":  # one CUDA graph per slot bucket, at full lengths
            length, source_length = self.options.max_length, self.max_source_length
        else:  # read only the positions in use (rounded up: few distinct shapes)
            length = _bucket(max(self._position[s] for s in used) + 1, 16, self.options.max_length)
            source_length = _bucket(max(self._source_length[s] for s in used), 16, self.max_source_length)
        logits = self._run_step(size, length, source_length)
        self.steps += 1
        moved = list(self.groups)
        token_groups = [g for g in moved if isinstance(g, TokenGroup)]
        if token_groups:
            self._advance_token_groups(token_groups, logits)
        for group in moved:
            if isinstance(group, BeamGroup):
                self._advance_beams(group, logits)
        for group in moved:
            if group.done:
                self.release(group)
        return moved

    def _run_step(self, size: int, length: int, source_length: int) -> torch.Tensor:
        """Logits (size, V) of slots [0, size), attending over `length` positions and `source_length`
        encoder positions."""
        args = (self.tokens[:size], self.positions[:size], self.routes[:size], length, source_length,
                *self.cache.tensors)
        if not self.compile:
            return self.step_module(*args)
        if self._compiled is None:
            self._compiled = self._compile()
        shape = (size, length, source_length)
        on_cuda = self.device.type == "cuda"
        if on_cuda:  # a new CUDA graph replay: the previous step's outputs are no longer read
            torch.compiler.cudagraph_mark_step_begin()
        if shape in self._compiled_shapes:
            logits = self._compiled(*args)
        else:
            started = time.perf_counter()
            # a few graphs per bucket and length: more than dynamo's default of 8 per function
            with torch._dynamo.config.patch(recompile_limit=64):
                logits = self._compiled(*args)
            self.compile_seconds[shape] = time.perf_counter() - started
            self._compiled_shapes.add(shape)
        return logits.clone() if on_cuda else logits  # the graph's output buffer is reused by the next replay

    def _compile(self):
        if self.device.type == "cuda":
            # CUDA graphs replay a step's kernels without launching them one by one; they need the
            # step's inputs at fixed addresses (the preallocated cache and slot buffers)
            for tensor in (*self.cache.tensors, self.tokens, self.positions, self.routes):
                torch._dynamo.mark_static_address(tensor)
            return torch.compile(self.step_module, mode="reduce-overhead", fullgraph=True, dynamic=False)
        # on CPU the C++ wrapper calls the kernels without Python in between (per-step overhead is the
        # cost), and one graph with symbolic sizes serves every slot count and length (one compile)
        return torch.compile(self.step_module, fullgraph=True, dynamic=True, options={"cpp_wrapper": True})

    def _advance_token_groups(self, groups: list[TokenGroup], logits: torch.Tensor) -> None:
        """Greedy and sampled rows of all token groups: processors for all at once, then each row's token."""
        slots = [slot for g in groups for slot in g.slots if slot >= 0]
        index = torch.tensor(slots, device=self.device)
        scores = self.rows.process(index, logits[index])
        chosen = scores.argmax(dim=-1)
        at = {slot: i for i, slot in enumerate(slots)}
        for group in groups:
            if group.generator is not None:
                rows = torch.tensor([at[s] for s in group.slots if s >= 0], device=self.device)
                warped = group.warpers()(None, scores[rows])
                chosen[rows] = torch.multinomial(torch.softmax(warped, dim=-1), 1, generator=group.generator)[:, 0]
        self.rows.record(index, chosen)
        self.tokens[index] = chosen
        self.positions[index] += 1
        picked = chosen.tolist()
        for group in groups:
            for row, slot in enumerate(group.slots):
                if slot < 0:
                    continue
                token = picked[at[slot]]
                sequence = group.tokens[row]
                sequence.append(token)
                self._position[slot] += 1
                ended, full = token == self.eos_token, len(sequence) - 1 >= group.settings.max_new_tokens
                if ended or full:
                    group.results[row] = sequence
                    group.finish_reasons[row] = "stop" if ended else "length"
                    group.finished[row] = True
                    self._owner[slot] = None
                    group.slots[row] = -1
            group.done = all(group.finished)

    def _advance_beams(self, group: BeamGroup, logits: torch.Tensor) -> None:
        slots = torch.tensor(group.slots, device=self.device)
        tokens, parents = group.advance(logits[slots])
        if group.done:
            return
        self.cache.copy_slots(slots, slots[parents], group.length - 1)  # positions 0 .. length-2 are written
        self.tokens[slots] = tokens
        self.positions[slots] = group.length - 1
        for slot in group.slots:
            self._position[slot] = group.length - 1

    # -- whole batches -----------------------------------------------------------------------------

    def generate(self, batch: dict[str, torch.Tensor], settings: DecodingSettings | Sequence[DecodingSettings]
                 ) -> list[list[list[int]]]:
        """Every sample of a processed batch to the end, each with its settings (one for all, or one per
        sample): per sample, its finished decoder sequences (start token first; `num_return_sequences`
        of them, best first for beams). Samples are admitted as slots allow, so a batch larger than the
        cache runs in overlapping waves; beam searches with the same settings admitted together run as
        one (as `LionModel.generate` batches them)."""
        with self.lock:
            encoded = self.encode(batch)
            per_sample = [settings] * len(encoded) if isinstance(settings, DecodingSettings) else list(settings)
            if len(per_sample) != len(encoded):
                raise ValueError(f"{len(per_sample)} decoding settings for {len(encoded)} samples")
            for row, row_settings in enumerate(per_sample):
                self.check(row_settings, encoded.source_length(row))
            pending, admitted = list(range(len(encoded))), []
            while pending or self.groups:
                admitted += self._admit_waiting(encoded, pending, per_sample)
                self.step()
            results: list[list[list[int]]] = [[] for _ in range(len(encoded))]
            for wave, group in admitted:
                count = len(group.results) // len(wave)
                for index, row in enumerate(wave):
                    results[row] = group.results[index * count:(index + 1) * count]
            return results

    def _admit_waiting(self, encoded: Encoded, pending: list[int], settings: list[DecodingSettings]
                       ) -> list[tuple[list[int], Group]]:
        """Admit waiting samples (in order) while slots are free; removes them from `pending`."""
        admitted = []
        while pending and self.free_slots >= settings[pending[0]].slots:
            first = settings[pending[0]]
            wave = [pending[0]]
            if first.num_beams > 1:  # the following samples with the same settings join its beam search
                room = self.free_slots // first.slots
                for row in pending[1:]:
                    if len(wave) == room or settings[row] != first:
                        break
                    wave.append(row)
            del pending[: len(wave)]
            admitted.append((wave, self.admit(encoded, wave, first)))
        return admitted

    def stream(self, batches: Iterable[tuple[Sequence[Any], dict[str, torch.Tensor], Sequence[DecodingSettings]]]
               ) -> Iterator[tuple[Any, list[list[int]] | Exception]]:
        """Decode a stream of processed batches `(keys, batch, settings per row)` with the slots kept busy:
        a batch is encoded when its rows can start, rows are admitted (in order) as slots free up, and each
        sample is yielded -- `(key, finished sequences)` -- the moment it finishes, so no sample waits for
        the longest of its batch. A row that cannot run here (too long) or a batch whose encoders fail
        yields `(key, exception)` for the rows concerned; the stream goes on.

        Meant for an engine of its own (a long job: `lion run`, an evaluation); it does not take `lock`."""
        source = iter(batches)
        waiting: deque[tuple[Any, Encoded, int, DecodingSettings]] = deque()
        owners: dict[int, Any] = {}  # id(group) -> key
        groups: dict[int, Group] = {}
        exhausted = False
        while True:
            failed: list[tuple[Any, Exception]] = []
            while True:
                if not waiting and not exhausted:
                    try:
                        keys, batch, settings = next(source)
                    except StopIteration:
                        exhausted = True
                        continue
                    failed += self._queue_rows(keys, batch, settings, waiting)
                    continue
                if waiting and self.free_slots >= waiting[0][3].slots:
                    key, encoded, row, row_settings = waiting.popleft()
                    group = self.admit(encoded, row, row_settings)
                    owners[id(group)], groups[id(group)] = key, group
                    continue
                break
            yield from failed
            if not self.groups:
                if exhausted and not waiting:
                    return
                continue
            for group in self.step():
                if group.done:
                    groups.pop(id(group))
                    yield owners.pop(id(group)), group.results

    def _queue_rows(self, keys: Sequence[Any], batch: dict[str, torch.Tensor], settings: Sequence[DecodingSettings],
                    waiting: deque) -> list[tuple[Any, Exception]]:
        """Encode a batch and queue its rows; the rows that cannot run come back with their error (a batch
        whose encoders fail is encoded row by row, so only the failing rows are lost)."""
        try:
            encoded = self.encode(batch)
        except Exception as error:  # noqa: BLE001 - isolated below, row by row
            if len(keys) == 1:
                return [(keys[0], error)]
            failed = []
            for row in range(len(keys)):
                single = {name: value[row:row + 1] for name, value in batch.items()}
                failed += self._queue_rows(keys[row:row + 1], single, settings[row:row + 1], waiting)
            return failed
        failed = []
        for row, (key, row_settings) in enumerate(zip(keys, settings)):
            try:
                self.check(row_settings, encoded.source_length(row))
            except ValueError as error:
                failed.append((key, error))
                continue
            waiting.append((key, encoded, row, row_settings))
        return failed
