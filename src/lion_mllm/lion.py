"""`Lion`: the model, its processor and (optionally) its RAM tagger behind a text-in, text-out API.

    from lion_mllm import Lion
    lion = Lion.from_official("configs/lion_flant5xl.yaml", device="cuda")
    lion.caption("photo.jpg")                       # 'A woman standing next to a luggage carousel ...'
    lion.ground("photo.jpg", "the dog").box_pixels  # (x0, y0, x1, y1) in pixels of the original image
"""

from __future__ import annotations

import functools
import itertools
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from .checkpoints.bundle import T5_TIED_KEYS, bundle_state, load_bundle_model, read_bundle_config, write_bundle_config
from .checkpoints.checkpoint_files import folder_written_whole, save_state_sharded
from .checkpoints.official import OfficialPaths, load_official_model, soft_prompt_token_id
from .engine import DecodeEngine, EngineOptions
from .errors import CheckpointError
from .model.boxes import Box, parse_box
from .model.config import LionConfig
from .model.generation import DecodingSettings, GenerationDefaults
from .model.modeling_lion import LionModel
from .model.processing import ImageInput, LionProcessor, load_image
from .model.taggers import Tagger, bundle_tagger, write_tagger


@dataclass(frozen=True)
class Grounding:
    text: str
    box: Box | None
    box_pixels: tuple[float, float, float, float] | None


def resolve_dtype(device: torch.device, dtype: torch.dtype | str | None) -> torch.dtype:
    """float32 on CPU, bfloat16 on GPU by default; float16 refused (T5 overflows in it)."""
    if isinstance(dtype, str):
        names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
        if dtype not in names:
            raise ValueError(f"unknown dtype {dtype!r}; use float32 or bfloat16")
        dtype = names[dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == torch.float16:
        raise ValueError("float16 is refused: FlanT5's activations overflow in float16 (inf/nan outputs); "
                         "use bfloat16 (GPU) or float32")
    return dtype


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


def _power_of_two(value: int, minimum: int = 1) -> int:
    """The smallest power of two >= value and >= minimum (engine sizes: few distinct shapes to compile)."""
    size = minimum
    while size < value:
        size *= 2
    return size


class Lion:
    """A LION model ready for text in, text out.

    Safe to call from several threads at once: each call binds its own task routes (a context variable
    of the model) and the processor never reconfigures its tokenizers, so concurrent calls with mixed
    tasks give the answers lone calls give (tests/test_thread_safety.py). Concurrent calls share the
    device and do not finish sooner together; to serve many requests, batch them (`lion serve` does,
    continuously)."""

    MAX_SLOTS = 256  # decoder sequences `generate` runs at once; a larger batch is admitted as slots free up

    def __init__(self, model: LionModel, processor: LionProcessor, tagger: Tagger | None = None,
                 generation_config: GenerationDefaults | None = None):
        self.model = model
        self.processor = processor
        self.tagger = tagger
        # decoding defaults and prompt templates: the model's own (generation_config.json), else the authors'
        self.generation_config = generation_config or GenerationDefaults()
        # compile the decoder step: None compiles on CUDA only (a CPU compile pays off for long jobs only)
        self.compile_decoder: bool | None = None
        self._engine: DecodeEngine | None = None
        self._engine_lock = threading.Lock()

    @property
    def config(self) -> LionConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return self.model.device

    # -- loading and saving -------------------------------------------------------------------------

    @classmethod
    def from_official(cls, config_or_paths: str | Path | OfficialPaths, *, device: str | torch.device = "cpu",
                      dtype: torch.dtype | str | None = None, round_like_reference: bool = True,
                      ignore_unexpected: bool = False, vision_num_heads: int | None = None,
                      tagger: Tagger | None = None, attn_implementation: str = "sdpa") -> Lion:
        """From the authors' YAML (`configs/models/lion_flant5xl.yaml`, read as it is) or OfficialPaths.

        When the YAML names a `ram_model` and no tagger is given, RAM is attached lazily: its weights
        are read the first time an image needs tags, with the YAML's `ram_config` / `ram_tag_list` /
        `ram_tag_list_threshold` when given. A `generation:` mapping in the YAML sets the decoding
        defaults and prompt templates (default: the authors').
        """
        paths = config_or_paths if isinstance(config_or_paths, OfficialPaths) else \
            OfficialPaths.from_yaml(config_or_paths)
        device = torch.device(_available_device(device))
        tokenizer, qformer_tokenizer = LionProcessor.load_tokenizers(paths.llm_model, paths.bert_model)
        model, _ = load_official_model(paths, device=device, dtype=resolve_dtype(device, dtype),
                                       round_like_reference=round_like_reference,
                                       ignore_unexpected=ignore_unexpected, vision_num_heads=vision_num_heads,
                                       attn_implementation=attn_implementation, t5_tokenizer=tokenizer)
        processor = LionProcessor(model.config, tokenizer, qformer_tokenizer)
        if tagger is None and paths.ram_model is not None and model.config.enable_semantic_tags:
            from .ram import LazyRamTagger

            tagger = LazyRamTagger(paths.ram_model, device=device, **paths.ram_tagger_options())
        return cls(model, processor, tagger, paths.extra.get("generation"))

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, tagger: Tagger | None = None,
                        attn_implementation: str = "sdpa") -> Lion:
        """From a bundle directory (`save_pretrained`), `local-dir:PATH`, `hf-hub:owner/repo[@revision]` or
        an installed name (`lion_mllm.checkpoints.hub.resolve_model`). `attn_implementation="eager"` runs attention as the
        authors' code does (for comparisons)."""
        from .checkpoints.hub import resolve_model

        directory = Path(resolve_model(name_or_path))
        if directory.suffix.lower() in (".yaml", ".yml"):
            raise CheckpointError(f"{directory}: the authors' YAML goes to Lion.from_official (or load_model)")
        device = torch.device(_available_device(device))
        model = load_bundle_model(directory, device=device, dtype=resolve_dtype(device, dtype),
                                  attn_implementation=attn_implementation)
        if tagger is None:
            tagger = bundle_tagger(Path(directory), device)
        processor = LionProcessor.from_pretrained(model.config, directory)
        if model.config.enable_semantic_tags:
            token_id = soft_prompt_token_id(processor.tokenizer, Path(directory) / "tokenizer")
            if token_id != model.config.language.soft_prompt_token_id:
                raise CheckpointError(f"{Path(directory) / 'tokenizer'}: <extra_id_0> is token {token_id}, but "
                                      f"config.json says {model.config.language.soft_prompt_token_id}: the "
                                      "tokenizer is not the model's")
        return cls(model, processor, tagger, GenerationDefaults.load(directory))

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | str | None = None) -> Path:
        """A bundle: the whole model in one folder. config.json (with model type and format version),
        safetensors shards, tokenizers, the tagger (RAM's weights, config and vocabulary, or a built-in
        tagger's settings: tagger.json) and generation_config.json (decoding defaults, prompt templates).
        `dtype` (e.g. float16, for a smaller file) is the storage dtype of the model's floating-point
        weights, converted back on loading as usual; RAM is stored in its own dtype.

        The bundle is written into a temporary folder beside `directory` and renamed into place when
        complete, so a failure leaves nothing at `directory`. An existing bundle there is replaced whole
        (files added to it are not kept); any other non-empty folder is refused (FileExistsError)."""
        directory = Path(directory)
        replace = directory.is_dir() and any(directory.iterdir())
        if replace and not _holds_a_bundle(directory):
            raise FileExistsError(f"{directory}: exists and holds something other than a lion-mllm bundle; "
                                  "save_pretrained replaces only a bundle, so choose a new or empty folder")
        with folder_written_whole(directory, replace=replace) as partial:
            self.write_bundle(partial, dtype)
        return directory

    def write_bundle(self, directory: Path, dtype: torch.dtype | str | None = None,
                     state: dict[str, torch.Tensor] | None = None) -> None:
        """The bundle's files, written into the existing folder `directory` (save_pretrained's temporary
        folder, or a trainer's). `state` replaces the model's own state dict (a trainer's gathered copy)."""
        write_bundle_config(self.config, directory)
        state = bundle_state(self.model) if state is None else {k: v for k, v in state.items()
                                                                 if k not in T5_TIED_KEYS}
        if dtype is not None:
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_state_sharded(state, directory)
        self.processor.save_pretrained(directory)
        write_tagger(self.tagger, directory)
        self.generation_config.save(directory)

    # -- inference ----------------------------------------------------------------------------------

    @property
    def lacks_tagger(self) -> bool:
        """Whether a call without tags cannot be answered: the model reads image tags and has no tagger."""
        return self.config.enable_semantic_tags and self.tagger is None

    def tag(self, images: Sequence[ImageInput]) -> list[str]:
        if self.tagger is None:
            raise ValueError("no tagger attached: load RAM (ram_model in the config) or pass tags")
        return self.tagger.tag([load_image(i) for i in images])

    def generate(self, images: Sequence[ImageInput], questions: Sequence[str], tasks: str | Sequence[str] = "vqa",
                 tags: Sequence[str | Sequence[str] | None] | None = None, *, num_beams: int | None = None,
                 max_new_tokens: int | None = None, min_length: int | None = None,
                 repetition_penalty: float | None = None, length_penalty: float | None = None,
                 do_sample: bool | None = None, temperature: float | None = None, top_p: float | None = None,
                 top_k: int | None = None, seed: int | None = None, num_return_sequences: int = 1,
                 notebook_format: bool = False) -> list[str]:
        """One answer per (image, question, task) (`num_return_sequences` per sample, in order);
        `questions` are the model's prompts as they are (see `caption`/`ask`/`ground` for the model's
        templates). Each sample has its own task (image-level "caption", "vqa" and region-level
        "grounding" mix in one batch) and is decoded with its task's settings from
        `self.generation_config` (the model's own; the authors' are 5 beams, up to 256 new tokens,
        repetition penalty 1.5), overridden by the arguments given. Sampling (`do_sample`) draws from
        a generator seeded with `seed` (else from torch's global generator, so `torch.manual_seed`
        makes it repeatable).

        Decoding runs on the decode engine (`lion_mllm.engine`): the token ids of transformers' `generate`
        (`LionModel.generate`, kept as the reference) from a preallocated cache and one decoder step
        for the whole batch; `compile_decoder` compiles that step."""
        if isinstance(tasks, str):
            tasks = [tasks] * len(questions)
        settings = [self.generation_config.settings(
            task, num_beams=num_beams, max_new_tokens=max_new_tokens, min_length=min_length,
            repetition_penalty=repetition_penalty, length_penalty=length_penalty, do_sample=do_sample,
            temperature=temperature, top_p=top_p, top_k=top_k, seed=seed,
            num_return_sequences=num_return_sequences) for task in tasks]
        pil_images = [load_image(i) for i in images]
        tags = self.fill_tags(pil_images, tags)
        batch = self.processor(pil_images, questions, tasks, tags, notebook_format=notebook_format)
        sequences = self.decode_engine(settings, batch).generate(batch, settings)
        return self.processor.decode([seq for sample in sequences for seq in sample])

    def generate_stream(self, samples: Iterable[tuple[Any, Image.Image, str, str, Any]], *, batch_size: int = 8,
                        **decoding: Any) -> Iterator[tuple[Any, list[str] | Exception]]:
        """Answers for a long stream of `(key, image, question, task, tags)` samples (`lion run`, evaluation),
        yielded as `(key, answers)` (`num_return_sequences` answers) in the order they finish: samples are
        prepared (tags, processor) and encoded `batch_size` at a time and decode continuously on an engine
        of their own, each leaving as soon as it is done and its slot going to the next sample. A sample
        that fails (its tags, its prompt, its encoders) comes back as `(key, exception)`; the rest go on.
        `decoding`: `generate`'s keyword arguments (default: the model's own per task)."""
        chunks = _chunks(samples, batch_size)
        first = next(chunks, None)
        if first is None:
            return
        settings_of = functools.partial(self.generation_config.settings, **{
            name: decoding.get(name) for name in ("num_beams", "max_new_tokens", "min_length", "repetition_penalty",
                                                  "length_penalty", "do_sample", "temperature", "top_p", "top_k",
                                                  "seed", "num_return_sequences")})
        unknown = set(decoding) - set(settings_of.keywords)
        if unknown:
            raise TypeError(f"unknown decoding arguments {sorted(unknown)}")
        widest = max((settings_of(task) for task in ("caption", "vqa", "grounding")),
                     key=lambda s: (s.slots, s.max_new_tokens))  # the most any task of the stream may need
        engine = DecodeEngine(self.model, EngineOptions(
            slots=batch_size * widest.slots, max_length=_power_of_two(widest.max_new_tokens, minimum=32),
            max_source_length=self.config.num_visual_tokens + 512, compile=self.compile_decoder))
        failures: list[tuple[Any, Exception]] = []

        def prepared() -> Iterator[tuple[list[Any], dict[str, torch.Tensor], list[DecodingSettings]]]:
            for chunk in itertools.chain([first], chunks):
                for part in self._prepare(chunk, failures):
                    yield [key for key, *_ in part[0]], part[1], [settings_of(task) for _, _, _, task, _ in part[0]]

        for key, outcome in engine.stream(prepared()):
            yield from failures
            failures.clear()
            yield key, outcome if isinstance(outcome, Exception) else self.processor.decode(outcome)
        yield from failures

    def _prepare(self, chunk: list[tuple[Any, Image.Image, str, str, Any]], failures: list[tuple[Any, Exception]]
                 ) -> Iterator[tuple[list[tuple[Any, Image.Image, str, str, Any]], dict[str, torch.Tensor]]]:
        """A chunk's model batch (tags made where missing, then the processor); if that fails, each sample
        on its own, the failing ones appended to `failures`."""
        try:
            tags = self.fill_tags([image for _, image, *_ in chunk], [t for *_, t in chunk])
            yield chunk, self.processor([image for _, image, *_ in chunk], [q for _, _, q, _, _ in chunk],
                                        [task for _, _, _, task, _ in chunk], tags)
        except Exception as error:  # noqa: BLE001 - isolated below, sample by sample
            if len(chunk) == 1:
                failures.append((chunk[0][0], error))
                return
            for sample in chunk:
                yield from self._prepare([sample], failures)

    def decode_engine(self, settings: Sequence[DecodingSettings], batch: dict[str, torch.Tensor]) -> DecodeEngine:
        """The engine `generate` decodes on: this Lion's own, made (again) larger when a call needs more
        slots, answer length or encoder positions than it has. Calls from several threads share it, one
        at a time (its lock)."""
        slots = max(s.slots for s in settings)
        prompt = batch["input_ids"].shape[1]
        wanted = EngineOptions(
            # the whole batch at once where it fits (a multiple of 8: a few sizes, not one per batch)
            slots=max(slots, min(-(-sum(s.slots for s in settings) // 8) * 8, self.MAX_SLOTS)),
            max_length=_power_of_two(max(s.max_new_tokens for s in settings), minimum=32),
            # encoder positions: the prompt rounded up to a multiple of 32 (a compiled CUDA step reads them all)
            max_source_length=self.config.num_visual_tokens + max(64, -(-prompt // 32) * 32),
            compile=self.compile_decoder)
        with self._engine_lock:
            engine = self._engine
            if engine is not None and engine.options.compile == wanted.compile and all(
                    getattr(engine.options, name) >= getattr(wanted, name)
                    for name in ("slots", "max_length", "max_source_length")):
                return engine
            if engine is not None:  # grow: never smaller than what earlier calls needed
                wanted = EngineOptions(**{name: max(getattr(engine.options, name), getattr(wanted, name))
                                          for name in ("slots", "max_length", "max_source_length")},
                                       compile=wanted.compile)
            self._engine = DecodeEngine(self.model, wanted)
            return self._engine

    def fill_tags(self, images: Sequence[Image.Image], tags: Sequence[Any] | None) -> list[Any] | None:
        """`tags` (one entry per image, None where absent; or None for all) with the absent ones made by the
        tagger in one batched call (the authors' code crashes here); None when the model reads no tags."""
        if not self.config.enable_semantic_tags:
            return None
        tags = list(tags) if tags is not None else [None] * len(images)
        todo = [i for i, t in enumerate(tags) if t is None]
        if todo:  # an image asked about several times (one loaded object) is tagged once
            distinct = list({id(images[i]): images[i] for i in todo}.values())
            found = dict(zip(map(id, distinct), self.tag(distinct)))
            for i in todo:
                tags[i] = found[id(images[i])]
        return tags

    def caption(self, image: ImageInput, prompt: str | None = None, tags: str | Sequence[str] | None = None,
                **kwargs: Any) -> str:
        """A caption; `prompt` replaces the model's caption instruction. Decoding: the model's defaults,
        overridden by `kwargs` (`Lion.generate`'s keywords)."""
        return self.generate([image], [self.generation_config.prompt("caption", prompt)], "caption", [tags],
                             **kwargs)[0]

    def ask(self, image: ImageInput, question: str, tags: str | Sequence[str] | None = None, **kwargs: Any) -> str:
        """The answer to `question`, put into the model's question template (`Question: {question} Short
        answer:` for lion-shapes; as typed for the authors' models)."""
        return self.generate([image], [self.generation_config.prompt("vqa", question)], "vqa", [tags], **kwargs)[0]

    def ground(self, image: ImageInput, phrase: str, prompt: str | None = None,
               tags: str | Sequence[str] | None = None, **kwargs: Any) -> Grounding:
        """The box of `phrase`, normalised and in pixels of the original image (None if unparsable).
        `prompt` (with `{}` for the phrase) replaces the model's grounding template."""
        pil = load_image(image)
        question = prompt.format(phrase) if prompt is not None else self.generation_config.prompt("grounding", phrase)
        text = self.generate([pil], [question], "grounding", [tags], **kwargs)[0]
        box = parse_box(text)
        return Grounding(text, box, box.to_pixels(*pil.size) if box else None)


def _holds_a_bundle(directory: Path) -> bool:
    try:
        read_bundle_config(directory)
    except CheckpointError:
        return False
    return True


def _available_device(device: str | torch.device) -> str:
    """`device` if this machine has it; else a ValueError listing the devices it has (before any loading)."""
    from .devices import resolve_device

    return resolve_device(str(device), label="device")
