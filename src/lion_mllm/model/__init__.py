"""The model itself (layer 0): its configuration and arithmetic, its inputs, how it is meant to be asked.

* `config`         -- LionConfig and the authors' FlanT5-XL/XXL presets;
* `modeling_lion`  -- LionModel, the network (ViT, Q-Former, aggregator, FlanT5 with adapters);
* `images`, `resample`, `processing` -- every image read, the authors' resize, images and text -> tensors;
* `tasks`, `boxes` -- task names, prompt texts, the box format;
* `generation`     -- decoding defaults and prompt templates (`generation_config.json`);
* `taggers`        -- what a tagger is, and the kinds a bundle's `tagger.json` names;
* `cpu_inference`  -- CPU-only options (oneDNN linear layers).

Nothing is re-exported here: importing a light module (`tasks`, `boxes`) does not import torch.
"""
