"""`Lion`: the model, its processor and (optionally) its RAM tagger behind a text-in, text-out API.

    from lion_mllm import Lion
    lion = Lion.from_official("configs/lion_flant5xl.yaml", device="cuda")
    lion.caption("photo.jpg")                       # 'A woman standing next to a luggage carousel ...'
    lion.ground("photo.jpg", "the dog").box_pixels  # (x0, y0, x1, y1) in pixels of the original image
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from PIL import Image

from .boxes import Box, parse_box
from .config import LionConfig
from .loading import OfficialPaths, bundle_state, load_bundle_model, load_official_model, save_state_sharded
from .modeling_lion import LionModel
from .processing import ImageInput, LionProcessor, load_image

CAPTION_PROMPT = "Please describe the image using a single short sentence."
# The authors' playground REC prompt (a Shikra template, `<image>` kept literally).
GROUNDING_PROMPT = "In the image <image>, can you locate {} and let me know its coordinates?"


TAGGER_FILE = "tagger.json"


def write_tagger_spec(tagger: Any, directory: Path) -> None:
    """Record in a bundle which built-in tagger its model was trained with (`tagger.json`), for taggers
    that can be rebuilt from a few settings (`bundle_spec`); RAM is attached by the caller instead."""
    spec = getattr(tagger, "bundle_spec", None)
    if spec is not None:
        (Path(directory) / TAGGER_FILE).write_text(json.dumps(spec, indent=1) + "\n")


def bundle_tagger(directory: Path) -> Any:
    """The tagger a bundle's `tagger.json` names, or None without that file."""
    path = directory / TAGGER_FILE
    if not path.is_file():
        return None
    spec = json.loads(path.read_text())
    kind = spec.pop("type", None)
    if kind == "shapes":
        from .shapes import ShapesTagger  # the demo world's pixel tagger (RAM's stand-in)

        return ShapesTagger(**spec)
    raise ValueError(f"{path}: unknown tagger type {kind!r} (known: 'shapes')")


class Tagger(Protocol):
    def tag(self, images: list[Image.Image]) -> list[str]: ...


@dataclass(frozen=True)
class Grounding:
    text: str
    box: Box | None
    box_pixels: tuple[float, float, float, float] | None


def resolve_dtype(device: torch.device, dtype: torch.dtype | str | None) -> torch.dtype:
    """float32 on CPU, bfloat16 on GPU by default; float16 refused (T5 overflows in it)."""
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                 "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[dtype]
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype == torch.float16:
        raise ValueError("float16 is refused: FlanT5's activations overflow in float16 (inf/nan outputs); "
                         "use bfloat16 (GPU) or float32")
    return dtype


class Lion:
    """A LION model ready for text in, text out."""

    def __init__(self, model: LionModel, processor: LionProcessor, tagger: Tagger | None = None):
        self.model = model
        self.processor = processor
        self.tagger = tagger

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
                      tagger: Tagger | None = None, attn_implementation: str = "sdpa") -> "Lion":
        """From the authors' YAML (`configs/models/lion_flant5xl.yaml`, read as it is) or OfficialPaths.

        When the YAML names a `ram_model` and no tagger is given, RAM is attached lazily: its weights
        are read the first time an image needs tags.
        """
        paths = config_or_paths if isinstance(config_or_paths, OfficialPaths) else \
            OfficialPaths.from_yaml(config_or_paths)
        device = torch.device(device)
        tokenizer, qformer_tokenizer = LionProcessor.load_tokenizers(paths.llm_model, paths.bert_model)
        model, _ = load_official_model(paths, device=device, dtype=resolve_dtype(device, dtype),
                                       round_like_reference=round_like_reference,
                                       ignore_unexpected=ignore_unexpected, vision_num_heads=vision_num_heads,
                                       attn_implementation=attn_implementation, t5_tokenizer=tokenizer)
        processor = LionProcessor(model.config, tokenizer, qformer_tokenizer)
        if tagger is None and paths.ram_model is not None and model.config.enable_semantic_tags:
            from .tagger import LazyRamTagger

            tagger = LazyRamTagger(paths.ram_model, device=device)
        return cls(model, processor, tagger)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype | str | None = None, tagger: Tagger | None = None,
                        attn_implementation: str = "sdpa") -> "Lion":
        """From a bundle directory (`save_pretrained`), `local-dir:PATH`, or `hf-hub:owner/repo`.
        `attn_implementation="eager"` runs attention as the authors' code does (for comparisons)."""
        directory = resolve_bundle(name_or_path)
        device = torch.device(device)
        model = load_bundle_model(directory, device=device, dtype=resolve_dtype(device, dtype),
                                  attn_implementation=attn_implementation)
        if tagger is None:
            tagger = bundle_tagger(Path(directory))
        return cls(model, LionProcessor.from_pretrained(model.config, directory), tagger)

    def save_pretrained(self, directory: str | Path, dtype: torch.dtype | str | None = None) -> Path:
        """A bundle (config.json, safetensors shards, tokenizers); `dtype` (e.g. float16, for a smaller
        file) is the storage dtype of floating-point weights, converted back on loading as usual."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.config.to_json(directory / "config.json")
        state = bundle_state(self.model)
        if dtype is not None:
            dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        save_state_sharded(state, directory)
        self.processor.save_pretrained(directory)
        write_tagger_spec(self.tagger, directory)
        return directory

    # -- inference ----------------------------------------------------------------------------------

    def tag(self, images: Sequence[ImageInput]) -> list[str]:
        if self.tagger is None:
            raise ValueError("no tagger attached: load RAM (ram_model in the config) or pass tags")
        return self.tagger.tag([load_image(i) for i in images])

    def generate(self, images: Sequence[ImageInput], questions: Sequence[str], tasks: str | Sequence[str] = "vqa",
                 tags: Sequence[str | Sequence[str] | None] | None = None, *, num_beams: int = 5,
                 max_new_tokens: int = 256, min_length: int = 1, repetition_penalty: float = 1.5,
                 length_penalty: float = 1.0, do_sample: bool = False, temperature: float = 1.0,
                 top_p: float = 0.9, num_return_sequences: int = 1, use_cache: bool = True,
                 static_cache: bool = False, notebook_format: bool = False) -> list[str]:
        """One answer per (image, question, task); the authors' decoding defaults (5 beams, up to 256
        new tokens, repetition penalty 1.5). Each sample has its own task: image-level ("caption",
        "vqa") and region-level ("grounding") samples mix in one batch.

        `static_cache=True` preallocates the KV cache, which lets transformers compile the decoder step
        on a GPU (CUDA graphs): about 4x faster greedy decoding at small batches on an H200, after a
        first call that compiles for 30-50 s per batch shape. Same tokens as the dynamic cache."""
        if isinstance(tasks, str):
            tasks = [tasks] * len(questions)
        pil_images = [load_image(i) for i in images]
        tags = self._complete_tags(pil_images, tags)
        batch = self.processor(pil_images, questions, tasks, tags, notebook_format=notebook_format)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        batch["pixel_values"] = batch["pixel_values"].to(self.model.dtype)
        sampling: dict[str, Any] = {"temperature": temperature, "top_p": top_p} if do_sample else {}
        if static_cache:
            sampling["cache_implementation"] = "static"
        output = self.model.generate(
            **batch, num_beams=num_beams, max_new_tokens=max_new_tokens, min_length=min_length,
            repetition_penalty=repetition_penalty, length_penalty=length_penalty, do_sample=do_sample,
            num_return_sequences=num_return_sequences, use_cache=use_cache, **sampling,
        )
        return self.processor.decode(output)

    def _complete_tags(self, images: list[Image.Image], tags: Sequence[Any] | None) -> list[Any] | None:
        """Fill absent tags with the tagger's, in one batched call (the authors' code crashes here)."""
        if not self.config.enable_semantic_tags:
            return None
        tags = list(tags) if tags is not None else [None] * len(images)
        todo = [i for i, t in enumerate(tags) if t is None]
        if todo:
            for i, found in zip(todo, self.tag([images[i] for i in todo])):
                tags[i] = found
        return tags

    def caption(self, image: ImageInput, prompt: str = CAPTION_PROMPT, tags: str | Sequence[str] | None = None,
                **kwargs: Any) -> str:
        return self.generate([image], [prompt], "caption", [tags], **kwargs)[0]

    def ask(self, image: ImageInput, question: str, tags: str | Sequence[str] | None = None, **kwargs: Any) -> str:
        return self.generate([image], [question], "vqa", [tags], **kwargs)[0]

    def ground(self, image: ImageInput, phrase: str, prompt: str = GROUNDING_PROMPT,
               tags: str | Sequence[str] | None = None, **kwargs: Any) -> Grounding:
        """The box of `phrase`, normalised and in pixels of the original image (None if unparsable)."""
        pil = load_image(image)
        text = self.generate([pil], [prompt.format(phrase)], "grounding", [tags], **kwargs)[0]
        box = parse_box(text)
        return Grounding(text, box, box.to_pixels(*pil.size) if box else None)


def resolve_bundle(name_or_path: str | Path) -> Path:
    """`hf-hub:owner/repo[@revision]` (downloaded into the Hugging Face cache), `local-dir:PATH`, or a path."""
    text = str(name_or_path)
    if text.startswith("hf-hub:"):
        from huggingface_hub import snapshot_download

        repo, _, revision = text[len("hf-hub:"):].partition("@")
        return Path(snapshot_download(repo, revision=revision or None))
    if text.startswith("local-dir:"):
        text = text[len("local-dir:"):]
    path = Path(text).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{text}: not a lion-mllm bundle directory (nor hf-hub:/local-dir:)")
    return path
