"""Images and text in and out of LION, exactly as the authors' code prepares them.

Image: PIL RGB -> 224x224 bicubic squash (aspect ratio not kept) -> [0,1] -> CLIP mean/std.
Prompt: `TAG_PROMPT.format(tags) + question` when semantic tags are on; the Q-Former reads the
question alone. T5 prompts are left-truncated to 128 tokens in training and not truncated in generation.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .config import LionConfig
from .images import ImageInput, ImageLoadError, load_image
from .resample import Filter, resize
from .tasks import route_of

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

__all__ = ["ImageInput", "ImageLoadError", "LionImageProcessor", "LionProcessor", "load_image"]


class LionImageProcessor:
    """RGB image -> normalised (3, S, S) float tensor: the authors' torchvision `Resize((S, S), BICUBIC)`
    on a PIL image under their Pillow 9.4, computed by `resample.resize` whatever Pillow is installed."""

    def __init__(self, size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                 resample: Filter = "bicubic"):
        self.size, self.resample = size, resample
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    def __call__(self, images: Sequence[ImageInput]) -> torch.Tensor:
        """images -> (B, 3, S, S) float32. Paths, bytes and URLs are read by `load_image`; PIL images are
        taken as given (`Lion` has loaded them already, with the orientation it chose)."""
        loaded = [image if isinstance(image, Image.Image) else load_image(image) for image in images]
        pixels = {id(image): self.one(image) for image in loaded}  # one loaded image asked twice: resized once
        return torch.stack([pixels[id(image)] for image in loaded])

    def one(self, image: Image.Image) -> torch.Tensor:
        """(3, S, S) float32 from an RGB image."""
        rgb = image if image.mode == "RGB" else image.convert("RGB")  # load_image gives RGB: no second copy
        resized = resize(np.asarray(rgb, dtype=np.uint8), (self.size, self.size), self.resample)
        pixels = torch.from_numpy(resized).permute(2, 0, 1)
        return (pixels.float().div(255) - self.mean) / self.std


def render_tags(tags: str | Sequence[str]) -> str:
    """A tag list as it goes between the brackets of the tag prompt: `a, b, c`."""
    return tags if isinstance(tags, str) else ", ".join(tags)


class LionProcessor:
    """Tokenisers, image transform and prompt template of one LION model."""

    def __init__(self, config: LionConfig, tokenizer: PreTrainedTokenizerBase,
                 qformer_tokenizer: PreTrainedTokenizerBase | None):
        self.config = config
        self.tokenizer = tokenizer
        self.qformer_tokenizer = qformer_tokenizer
        # HF tokenizers keep padding/truncation settings in their (Rust) backend and may rewrite them on
        # a call: one call at a time per processor, so concurrent `Lion` calls cannot race on them.
        self._tokenizer_lock = threading.RLock()
        self.image_processor = LionImageProcessor(config.vision.image_size)

    @staticmethod
    def load_tokenizers(t5_dir: str | Path, bert_dir: str | Path | None) -> tuple[Any, Any]:
        """(T5 tokenizer, Q-Former tokenizer or None) from their folders; `[DEC]` added as the authors do."""
        tokenizer = AutoTokenizer.from_pretrained(str(t5_dir))
        qformer_tokenizer = None
        if bert_dir is not None:
            qformer_tokenizer = AutoTokenizer.from_pretrained(str(bert_dir))
            if "[DEC]" not in qformer_tokenizer.get_vocab():
                qformer_tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        return tokenizer, qformer_tokenizer

    @classmethod
    def from_dirs(cls, config: LionConfig, t5_dir: str | Path, bert_dir: str | Path | None) -> LionProcessor:
        return cls(config, *cls.load_tokenizers(t5_dir, bert_dir))

    def save_pretrained(self, directory: str | Path) -> None:
        self.tokenizer.save_pretrained(str(Path(directory) / "tokenizer"))
        if self.qformer_tokenizer is not None:
            self.qformer_tokenizer.save_pretrained(str(Path(directory) / "qformer_tokenizer"))

    @classmethod
    def from_pretrained(cls, config: LionConfig, directory: str | Path) -> LionProcessor:
        qformer_dir = Path(directory) / "qformer_tokenizer"
        return cls.from_dirs(config, Path(directory) / "tokenizer", qformer_dir if qformer_dir.is_dir() else None)

    # -- prompts ---------------------------------------------------------------------------------------

    def build_prompt(self, question: str, tags: str | Sequence[str] | None, notebook_format: bool = False) -> str:
        """The T5 prompt. `notebook_format` renders tags as the authors' notebook does (a list in a list:
        `[['a, b']]`), to reproduce its prompts exactly; the default renders `[a, b]`."""
        if not self.config.enable_semantic_tags:
            return question
        if tags is None:
            raise ValueError("this model was trained with semantic tags: pass tags, or use a tagger")
        rendered = [render_tags(tags)] if notebook_format else render_tags(tags)
        return self.config.tag_prompt.format(rendered) + question

    # -- batches ---------------------------------------------------------------------------------------

    def __call__(self, images: Sequence[ImageInput] | torch.Tensor, questions: Sequence[str],
                 tasks: Sequence[str], tags: Sequence[str | Sequence[str] | None] | None = None,
                 answers: Sequence[str] | None = None, truncate_prompt: bool | None = None,
                 notebook_format: bool = False) -> dict[str, torch.Tensor]:
        """A model batch. Prompts are truncated (from the left, to 128 tokens) when answers are given
        (training), not in generation: the authors' asymmetry."""
        if not (len(questions) == len(tasks) and (tags is None or len(tags) == len(questions))):
            raise ValueError("questions, tasks and tags must have one entry per image")
        pixel_values = images if isinstance(images, torch.Tensor) else self.image_processor(images)
        if pixel_values.shape[0] != len(questions):
            raise ValueError(f"{pixel_values.shape[0]} images for {len(questions)} questions")
        tags = tags if tags is not None else [None] * len(questions)
        prompts = [self.build_prompt(q, t, notebook_format) for q, t in zip(questions, tags)]
        truncate = answers is not None if truncate_prompt is None else truncate_prompt
        lang = self.config.language
        input_ids, attention_mask = self.encode_text(self.tokenizer, prompts,
                                                     lang.max_text_length if truncate else None, "left")
        batch = {
            "pixel_values": pixel_values,
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "route_ids": torch.tensor([route_of(t) for t in tasks], dtype=torch.long),
        }
        if self.config.uses_qformer:
            if self.qformer_tokenizer is None:
                raise ValueError("this model has a Q-Former but no Q-Former tokenizer")
            batch["qformer_input_ids"], batch["qformer_attention_mask"] = self.encode_text(
                self.qformer_tokenizer, list(questions), self.config.qformer.max_text_length, "left")
        if answers is not None:
            target_ids, target_mask = self.encode_text(self.tokenizer, list(answers), lang.max_output_text_length,
                                                       "right")
            batch["labels"] = target_ids.masked_fill(target_ids == self.tokenizer.pad_token_id, -100)
            batch["decoder_attention_mask"] = target_mask
        return batch

    def encode_text(self, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_length: int | None,
                    side: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask) as `tokenizer(texts, padding="longest", truncation=..., max_length=...)`
        gives them when truncating on `side`, without setting the tokenizer's `truncation_side` (shared by
        every caller): the text tokens are cut here, the template's special tokens (T5's `</s>`, BERT's
        `[CLS]`/`[SEP]`) kept, as the tokenizer's own truncation does."""
        with self._tokenizer_lock:
            encoded = tokenizer(list(texts), return_special_tokens_mask=True)
            template = tokenizer("a", return_special_tokens_mask=True).special_tokens_mask
            head = template.index(0)  # special tokens the template puts before the text
            tail = len(template) - head - 1  # and after it
            pad_id, pad_left = tokenizer.pad_token_id, tokenizer.padding_side == "left"
        rows = []
        for ids in encoded.input_ids:
            body = ids[head: len(ids) - tail]
            if max_length is not None:
                keep = max(max_length - head - tail, 0)
                if len(body) > keep:
                    body = body[len(body) - keep:] if side == "left" else body[:keep]
            rows.append(ids[:head] + body + ids[len(ids) - tail:])
        longest = max(map(len, rows), default=0)
        input_ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for i, row in enumerate(rows):
            span = slice(longest - len(row), longest) if pad_left else slice(0, len(row))
            input_ids[i, span] = torch.tensor(row, dtype=torch.long)
            attention_mask[i, span] = 1
        return input_ids, attention_mask

    def decode(self, token_ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        # transformers 4.42 (the authors') cleaned up tokenisation spaces by default; newer ones don't.
        with self._tokenizer_lock:
            return self.tokenizer.batch_decode(token_ids, skip_special_tokens=True,
                                               clean_up_tokenization_spaces=True)
