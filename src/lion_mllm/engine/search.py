"""How the next token of each sequence is chosen: greedy and sampled rows, and beam search.

A *group* is what one request decodes: `TokenGroup` holds sequences that each continue on their own
(greedy, or sampling with the request's own seeded generator; several rows for several return
sequences), `BeamGroup` one beam search of k beams per source. Every step the engine hands each group
the logits of its slots; the group returns the tokens its slots feed next and, for beams, which slot
each beam continues from. The choices are transformers' (`generate`) for the same settings, so the
engine's token ids equal `LionModel.generate`'s:

- greedy/sampling: repetition penalty on every token of the sequence (the start token included), the
  end token masked below `min_length`, then argmax; sampling adds temperature, top-k and top-p before
  drawing from the softmax.
- beams: log-softmax, the same processors, running scores, the best 2k continuations over all beams,
  finished hypotheses kept by length-penalised score, transformers' early-stop heuristic (a group is
  done when no running beam can beat its worst kept hypothesis, or at the maximum length).

The repetition penalty of token groups is applied for all rows of all groups at once (`TokenRows`):
rows of different lengths cannot share transformers' processor, which reads the ids as one tensor,
so each row keeps a mask of the tokens it has produced and the same elementwise rule is applied.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ..model.generation import DecodingSettings

__all__ = ["BeamGroup", "Group", "TokenGroup", "TokenRows"]

_NEG = -1.0e9  # transformers' "never" score in beam search (finite, so sums stay ordered)


@dataclass(eq=False)
class Group:
    """One request's sequences in the engine. `slots` are the cache slots it holds (in row order);
    `results` are its finished decoder sequences (start token first), best first for beams."""

    settings: DecodingSettings
    start_token: int
    eos_token: int
    slots: list[int] = field(default_factory=list)
    results: list[list[int]] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)  # per result: "stop" (end token) or "length"
    done: bool = False

    @property
    def slots_needed(self) -> int:
        raise NotImplementedError


@dataclass(eq=False)
class TokenGroup(Group):
    """Rows that each continue on their own: greedy (one row) or sampled (`num_return_sequences` rows
    with one generator, seeded from the settings)."""

    generator: torch.Generator | None = None
    tokens: list[list[int]] = field(default_factory=list)  # per row, the decoder sequence so far
    finished: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        rows = self.settings.num_return_sequences if self.settings.do_sample else 1
        self.tokens = [[self.start_token] for _ in range(rows)]
        self.finished = [False] * rows
        self.results = [[] for _ in range(rows)]
        self.finish_reasons = [""] * rows

    @property
    def slots_needed(self) -> int:
        return len(self.tokens)

    def start_generator(self, device: torch.device) -> None:
        if self.settings.do_sample:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(self.settings.seed if self.settings.seed is not None
                                       else int(torch.randint(0, 2**62, ()).item()))

    def warpers(self) -> LogitsProcessorList:
        """transformers' sampling warpers for these settings, in its order."""
        s, warpers = self.settings, LogitsProcessorList()
        if s.temperature != 1.0:
            warpers.append(TemperatureLogitsWarper(s.temperature))
        if s.top_k:
            warpers.append(TopKLogitsWarper(top_k=s.top_k))
        if s.top_p < 1.0:
            warpers.append(TopPLogitsWarper(top_p=s.top_p))
        return warpers


class TokenRows:
    """The per-slot state of token groups for the vectorised processors: the tokens each slot has seen
    (for the repetition penalty), its penalty and its minimum length."""

    def __init__(self, slots: int, vocab: int, eos_token: int, device: torch.device):
        self.seen = torch.zeros((slots, vocab), dtype=torch.bool, device=device)
        self.is_eos = torch.arange(vocab, device=device) == eos_token  # (V,)
        self.penalty = torch.ones(slots, device=device)
        self.min_length = torch.zeros(slots, dtype=torch.long, device=device)
        self.length = torch.zeros(slots, dtype=torch.long, device=device)

    def admit(self, slot: int, settings: DecodingSettings, start_token: int) -> None:
        self.seen[slot] = False
        if start_token < self.seen.shape[1]:
            self.seen[slot, start_token] = True
        self.penalty[slot] = settings.repetition_penalty
        self.min_length[slot] = settings.min_length
        self.length[slot] = 1

    def process(self, slots: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """logits (m, V) of these slots, with the repetition penalty and the minimum length applied
        (transformers' RepetitionPenalty and MinLength processors, row by row)."""
        penalty = self.penalty[slots].unsqueeze(1)
        penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(self.seen[slots], penalised, logits)
        too_short = (self.length[slots] < self.min_length[slots]).unsqueeze(1)
        return torch.where(too_short & self.is_eos, -math.inf, logits)

    def record(self, slots: torch.Tensor, tokens: torch.Tensor) -> None:
        self.seen[slots, tokens.clamp(max=self.seen.shape[1] - 1)] = True
        self.length[slots] += 1


@dataclass(eq=False)
class BeamGroup(Group):
    """Beam search of `num_beams` beams over `sources` encoder outputs admitted together (rows
    source-major: source 0's beams first), as transformers' `_beam_search` runs a batch."""

    sources: int = 1
    generator: torch.Generator | None = None
    early_stopping: bool | str = False
    processors: LogitsProcessorList = field(default_factory=LogitsProcessorList)
    length: int = 1  # the decoder length so far (start token included), transformers' cur_len
    running: torch.Tensor | None = None  # (G, k, max_length) ids
    running_scores: torch.Tensor | None = None  # (G, k)
    kept: torch.Tensor | None = None  # (G, k, max_length) finished hypotheses
    kept_scores: torch.Tensor | None = None  # (G, k)
    kept_lengths: torch.Tensor | None = None  # (G, k) decoder length of each kept hypothesis
    kept_finished: torch.Tensor | None = None  # (G, k) bool
    improvable: torch.Tensor | None = None  # (G, 1) bool: transformers' is_early_stop_heuristic_unsatisfied

    @property
    def beams(self) -> int:
        return self.settings.num_beams

    @property
    def slots_needed(self) -> int:
        return self.sources * self.beams

    @property
    def max_length(self) -> int:
        return 1 + self.settings.max_new_tokens

    def start(self, device: torch.device) -> None:
        s, g, k = self.settings, self.sources, self.beams
        self.running = torch.full((g, k, self.max_length), self.eos_token, dtype=torch.long, device=device)
        self.running[:, :, 0] = self.start_token
        self.kept = self.running.clone()
        self.running_scores = torch.zeros((g, k), device=device)
        self.running_scores[:, 1:] = _NEG  # only the first beam's continuations count at the first step
        self.kept_scores = torch.full((g, k), _NEG, device=device)
        self.kept_lengths = torch.ones((g, k), dtype=torch.long, device=device)
        self.kept_finished = torch.zeros((g, k), dtype=torch.bool, device=device)
        self.improvable = torch.ones((g, 1), dtype=torch.bool, device=device)
        eos = torch.tensor([self.eos_token], device=device)
        if s.repetition_penalty != 1.0:
            self.processors.append(RepetitionPenaltyLogitsProcessor(s.repetition_penalty))
        if s.min_length > 0:
            self.processors.append(MinLengthLogitsProcessor(s.min_length, eos, device=device))
        if s.do_sample:
            if s.temperature != 1.0:
                self.processors.append(TemperatureLogitsWarper(s.temperature))
            if s.top_k:
                self.processors.append(TopKLogitsWarper(top_k=s.top_k, min_tokens_to_keep=2))
            if s.top_p < 1.0:
                self.processors.append(TopPLogitsWarper(top_p=s.top_p, min_tokens_to_keep=2))
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(s.seed if s.seed is not None else int(torch.randint(0, 2**62, ()).item()))

    def advance(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (G k, V) of the group's slots (row order) -> (next tokens (G k,), parent rows (G k,)):
        row j of the next step continues row parent[j] and feeds token[j]."""
        g, k, cur = self.sources, self.beams, self.length
        vocab = logits.shape[-1]
        history = self.running[:, :, :cur].reshape(g * k, cur)
        log_probs = self.processors(history, torch.log_softmax(logits, dim=-1))
        totals = (log_probs.view(g, k, vocab) + self.running_scores[:, :, None]).view(g, k * vocab)
        # the best 2k continuations over all beams (or 2k drawn without replacement when sampling)
        width = 2 * k
        if self.generator is not None:
            picked = torch.multinomial(torch.softmax(totals, dim=-1), width, generator=self.generator)
            scores, order = totals.gather(1, picked).sort(dim=-1, descending=True)
            picked = picked.gather(1, order)
        else:
            scores, picked = torch.topk(totals, k=width)
        parents, tokens = picked // vocab, picked % vocab
        candidates = self.running.gather(1, parents[:, :, None].expand(-1, -1, self.max_length)).clone()
        candidates[:, :, cur] = tokens
        ends = (tokens == self.eos_token) | (cur + 1 >= self.max_length)
        # the k best candidates that go on
        going_on = scores + ends.float() * _NEG
        next_rows = torch.topk(going_on, k=k).indices
        self.running = candidates.gather(1, next_rows[:, :, None].expand(-1, -1, self.max_length))
        self.running_scores = going_on.gather(1, next_rows)
        parent_beams = parents.gather(1, next_rows)
        self._keep_finished(candidates, scores, ends)
        self.length = cur + 1
        self._update_improvable()
        if not bool(self.improvable.any()) or self.length >= self.max_length:
            self._finish()
        offsets = torch.arange(g, device=logits.device).unsqueeze(1) * k
        return self.running[:, :, cur].reshape(-1), (parent_beams + offsets).reshape(-1)

    def _keep_finished(self, candidates: torch.Tensor, scores: torch.Tensor, ends: torch.Tensor) -> None:
        """Merge the candidates that just ended (among the first k) into the kept hypotheses."""
        k, cur = self.beams, self.length
        first_k = torch.arange(ends.shape[1], device=ends.device) < k
        just_ended = ends & first_k
        final = scores / ((cur + 1 - 1) ** self.settings.length_penalty)
        if self.early_stopping is True:
            final = final + (self.kept_finished.all(dim=-1, keepdim=True)).float() * _NEG
        final = final + (~self.improvable).float() * _NEG
        final = final + (~just_ended).float() * _NEG
        merged_scores = torch.cat([self.kept_scores, final], dim=1)
        best = torch.topk(merged_scores, k=k).indices
        merged = torch.cat([self.kept, candidates], dim=1)
        self.kept = merged.gather(1, best[:, :, None].expand(-1, -1, self.max_length))
        self.kept_scores = merged_scores.gather(1, best)
        lengths = torch.cat([self.kept_lengths, torch.full_like(scores, cur + 1, dtype=torch.long)], dim=1)
        self.kept_lengths = lengths.gather(1, best)
        self.kept_finished = torch.cat([self.kept_finished, just_ended], dim=1).gather(1, best)

    def _update_improvable(self) -> None:
        """transformers' early-stop heuristic: can a running beam still beat the worst kept hypothesis?"""
        s = self.settings
        if self.early_stopping == "never" and s.length_penalty > 0.0:
            best_length = self.max_length - 1
        else:
            best_length = self.length - 1
        best_running = self.running_scores[:, :1] / (best_length ** s.length_penalty)
        worst_kept = torch.where(self.kept_finished, self.kept_scores.min(dim=1, keepdim=True).values, _NEG)
        self.improvable = self.improvable & (best_running > worst_kept).any(dim=-1, keepdim=True)

    def _finish(self) -> None:
        n = self.settings.num_return_sequences
        kept, lengths = self.kept[:, :n].tolist(), self.kept_lengths[:, :n].tolist()
        self.results = [seq[:length] for rows, row_lengths in zip(kept, lengths)
                        for seq, length in zip(rows, row_lengths)]
        self.finish_reasons = ["stop" if seq[-1] == self.eos_token else "length" for seq in self.results]
        self.done = True
