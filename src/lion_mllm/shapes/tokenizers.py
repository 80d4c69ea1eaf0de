"""Tokenizers built from the world's vocabulary (T5-style and Q-Former BERT-style)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from ..model.tasks import SHORT_TAG_PROMPT, SOFT_PROMPT_TOKEN
from .world import COLOURS, NUMBER_WORDS, PROMPTS, SHAPES, SIZES


def coordinate_tokens(step: float = 0.01) -> list[str]:
    """One token per coordinate value, every `step`, written with 3 decimals: 0.000, 0.010, ..., 1.000."""
    count = round(1 / step)
    return [f"{i * step:.3f}" for i in range(count + 1)]


def world_words() -> list[str]:
    """Every word and punctuation piece the world's prompts, tags and answers use."""
    texts = [SHORT_TAG_PROMPT.replace(SOFT_PROMPT_TOKEN, " ").replace("{}", " "), PROMPTS["caption"], PROMPTS["vqa"],
             PROMPTS["grounding"], "Answer: [,]",
             "what colour is the shape ? how many shapes are there is there a yes no and left of right of above below "
             "leftmost rightmost what shape", " ".join(COLOURS), " ".join(SHAPES), " ".join(s + "s" for s in SHAPES),
             " ".join(SIZES), " ".join(NUMBER_WORDS), "0 1 2 3 4 5 6 7 8 9"]
    words: list[str] = []
    for text in texts:
        for piece in _PIECE.findall(" " + text):
            if piece not in words:
                words.append(piece)
    return words


_META = "\u2581"  # the sentencepiece word-start mark
# After Metaspace: a word, a coordinate or one punctuation character, each with its optional word mark.
_PIECE_PATTERN = r"\u2581?(?:\d\.\d{3}|[A-Za-z]+|[^A-Za-z\u2581\s])"
_PIECE = re.compile(_PIECE_PATTERN.replace(r"\u2581", " "))


def build_tokenizers(extra_words: Iterable[str] = ()):
    """(T5-style tokenizer, BERT-style Q-Former tokenizer) for the world, as `PreTrainedTokenizerFast`s.

    T5 side: WordLevel over Metaspace pieces (pad=0, eos=1, unk=2, then `<extra_id_0>`, then one token
    per coordinate 0.000-1.000 in steps of 0.01, then the words), so decoding restores the spacing of
    `Answer: [0.120,0.340,0.560,0.780]`. Q-Former side: lower-cased WordLevel with [PAD]=0, [UNK],
    [CLS], [SEP], [MASK], [DEC] and the same words.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    words = world_words() + [w for w in extra_words if w not in world_words()]
    coords = coordinate_tokens()
    vocab: dict[str, int] = {"<pad>": 0, "</s>": 1, "<unk>": 2, SOFT_PROMPT_TOKEN: 3, _META: 4}
    for piece in coords + [_META + c for c in coords]:
        vocab.setdefault(piece, len(vocab))
    for word in words:
        for piece in (word.replace(" ", _META), (_META + word.strip()) if not word.startswith(" ") else word.strip()):
            vocab.setdefault(piece.replace(" ", _META), len(vocab))
    t5 = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    t5.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement=_META, prepend_scheme="always", split=False),
        pre_tokenizers.Split(Regex(_PIECE_PATTERN), behavior="isolated"),
    ])
    t5.decoder = decoders.Metaspace(replacement=_META, prepend_scheme="always", split=False)
    t5.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=t5, pad_token="<pad>", eos_token="</s>",
                                        unk_token="<unk>", additional_special_tokens=[SOFT_PROMPT_TOKEN])

    bert_vocab: dict[str, int] = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}
    for word in words + coords:
        bert_vocab.setdefault(word.strip().lower(), len(bert_vocab))
    bert_vocab["[DEC]"] = len(bert_vocab)
    bert = Tokenizer(models.WordLevel(vocab=bert_vocab, unk_token="[UNK]"))
    bert.normalizer = normalizers.Lowercase()
    bert.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(r"\d\.\d{3}|[a-z]+|[^a-z\s]"), behavior="isolated"),
    ])
    bert.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    qformer_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bert, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="[DEC]")
    return tokenizer, qformer_tokenizer
