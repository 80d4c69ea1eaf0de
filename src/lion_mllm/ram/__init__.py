"""RAM (Recognize Anything) image tagger, as LION uses it, on current PyTorch / transformers.

LION prompts its LLM with image tags from RAM (``ram_swin_large_14m.pth``). This module rebuilds the
part of RAM that produces those tags and loads the authors' checkpoint as users have it:

* backbone: Swin-L 384 on transformers' :class:`~transformers.SwinModel` (the authors' Swin keys are
  mapped: fused ``qkv`` split into q/k/v, relative position tables, patch merging, norms); its output is
  ``cat(mean over tokens, tokens)`` after the final norm, (B, 1 + 144, 1536) for Swin-L 384;
* ``image_proj`` (1536 -> 512), the label embeddings (4585 x 512) and their projection into label
  queries ``relu(wordvec_proj(label_embed))`` (-> 768);
* the tagging head: two cross-attention-only BERT layers (label queries attend to the image tokens;
  RAM deletes their self-attention and embeddings), written here on
  :func:`torch.nn.functional.scaled_dot_product_attention`; then ``fc`` (768 -> 1) gives one logit per tag;
* tag decision: tag *i* fires when ``sigmoid(logit_i) > class_threshold[i]`` (strict), with RAM's
  per-class thresholds (``ram_tag_list_threshold.txt``). The authors' ``generate_tag`` ignores the
  single ``threshold`` passed to it (LION passes 0.85 for nothing); we replicate that by default and
  let a caller override it per call with ``threshold=``;
* output per image: English tags in tag-list index order, formatted exactly as LION's
  ``generate_tags`` (``' | '.join(tags).replace(' |', ',')``, i.e. ``"tag1, tag2, ..."``).

Determinism (a deliberate difference from the authors' code): LION never calls ``.eval()`` on RAM,
so the official tags come from a train-mode network (stochastic depth in Swin, dropout in the
tagging head) and change from run to run. Here the tagger is always in eval mode (``train()`` is a
no-op) and runs under ``torch.no_grad()``: the same image always gives the same tags.

Configuration: :class:`RamConfig` holds every size. ``RamConfig.swin_large()`` is the real model;
``RamConfig.from_official_dir()`` reads RAM's own config folder layout
(``configs/swin/config_swinL_384.json`` + ``configs/q2l_config.json``); and when no config is given,
:meth:`RamTagger.from_official` infers it from the checkpoint's tensor shapes
(:meth:`RamConfig.from_state_dict`). Shapes cannot tell the tagging head's number of attention
heads (RAM always uses 4) nor, without the stored ``attn_mask`` buffers, the image size (384 for
window 12, 224 for window 7, as in RAM's two Swin-L configs); both can be overridden.

Vocabulary: the 4585 English tags and their thresholds are not in the checkpoint; they are public
files of RAM's repository, fetched (md5-verified) into the package cache by
:func:`fetch_ram_vocabulary_files`, or read from local paths (or from ``<dir>/data/`` when ``config``
is a RAM config folder).

Precision: float32 reproduces the authors' logits to float32 noise (a few 1e-6); in bfloat16 the
logits move by ~1e-2..1e-1, enough to flip tags whose probability sits next to its threshold.
"""

from .config import IMAGENET_MEAN, IMAGENET_STD, OFFICIAL_NUM_TAGS, RamConfig
from .lazy import LazyRamTagger
from .modeling_ram import RAM_BUNDLE_WEIGHTS, RamLoadReport, RamTagger, RamTaggingHead, preprocess_images
from .vocabulary import RAM_TAG_LIST_FILE, RAM_THRESHOLDS_FILE, RamVocabulary, fetch_ram_vocabulary_files
from .weights import installed_swin_layout, ram_state_from_official, ram_state_to_official, split_official_state_dict

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "OFFICIAL_NUM_TAGS", "RAM_BUNDLE_WEIGHTS", "RAM_TAG_LIST_FILE",
           "RAM_THRESHOLDS_FILE", "LazyRamTagger", "RamConfig", "RamLoadReport", "RamTagger", "RamTaggingHead",
           "RamVocabulary", "fetch_ram_vocabulary_files", "installed_swin_layout", "ram_state_from_official",
           "ram_state_to_official", "preprocess_images", "split_official_state_dict"]
