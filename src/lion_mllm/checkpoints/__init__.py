"""Model files (layer 0): the authors' checkpoints, our bundle, the file formats under both, downloads,
and model names.

* `official`         -- the authors' five files -> a LionModel;
* `bundle`           -- our bundle (config.json, sharded safetensors, tokenizers, tagger.json);
* `checkpoint_files` -- .pth and safetensors reading and (sharded) writing, folders written whole;
* `downloads`        -- the resumable, checksum-verified downloader;
* `hub`              -- published models, `lion download`, and what a `--model` name resolves to.
"""
