"""Operator settings of `lion serve` (plain data: importable without FastAPI installed)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ..model.generation import DECODING_RULES


@dataclass
class ServerSettings:
    """Limits and defaults of one server. Every limit is enforced before the model sees a request."""

    model_name: str = "lion"
    # other ids clients may send for the same model (the --model they know it by, e.g. "lion-shapes")
    model_aliases: tuple[str, ...] = ()
    # batching: "continuous" (requests join and leave the decoding batch between decoder steps) or
    # "request" (whole requests gathered into one `Lion.generate` call, the earlier behaviour)
    batching: str = "continuous"
    max_batch_size: int = 8
    max_wait_ms: float = 10.0  # request-level batching: how long a batch's first request waits for others
    queue_size: int = 64
    timeout_s: float = 120.0
    shutdown_timeout_s: float = 30.0  # on shutdown, in-flight requests get this long to finish (then 503)
    # security
    api_key: str | None = None
    max_image_pixels: int = 40_000_000  # ~ a 7700x5200 photo; checked from the header, before decoding
    max_body_bytes: int = 20 * 1024 * 1024
    max_json_depth: int = 32
    allow_remote_images: bool = False
    remote_timeout_s: float = 10.0
    max_prompt_chars: int = 4000
    max_prompt_tokens: int = 512  # T5 prompt tokens (tags included) the decode engine's slots hold
    # compile the decoder step (CUDA graphs on a GPU, C++ kernels on a CPU); None: on CUDA only
    compile: bool | None = None
    # decoding defaults: None means the model's own (`lion.generation_config`), else the authors'
    # (5 beams, repetition penalty 1.5, up to 256 new tokens); request fields override both
    num_beams: int | None = None
    max_num_beams: int = 10
    default_max_tokens: int | None = None
    max_tokens_limit: int = 512
    repetition_penalty: float | None = None
    # web page
    ui: bool = True

    def serves(self, model: str) -> bool:
        """Whether a request naming `model` is for this server's model."""
        return model == self.model_name or model in self.model_aliases

    def served_names(self) -> tuple[str, ...]:
        """Every model id this server answers to, its own name first."""
        return tuple(dict.fromkeys((self.model_name, *self.model_aliases)))

    def __post_init__(self) -> None:
        positive = ("max_batch_size", "queue_size", "timeout_s", "max_image_pixels", "max_body_bytes",
                    "max_json_depth", "max_num_beams", "max_tokens_limit", "max_prompt_chars",
                    "max_prompt_tokens")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        for name, field in (("num_beams", "num_beams"), ("default_max_tokens", "max_new_tokens"),
                            ("repetition_penalty", "repetition_penalty")):
            valid, wanted = DECODING_RULES[field]  # the decoding type's rules
            if getattr(self, name) is not None and not valid(getattr(self, name)):
                raise ValueError(f"{name} must be {wanted}, got {getattr(self, name)!r}")
        if self.max_wait_ms < 0 or self.shutdown_timeout_s < 0:
            raise ValueError("max_wait_ms and shutdown_timeout_s must be >= 0")
        if self.default_max_tokens is not None and self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens exceeds max_tokens_limit")
        if self.batching not in ("continuous", "request"):
            raise ValueError(f"batching must be 'continuous' or 'request', got {self.batching!r}")
        if self.api_key == "":
            self.api_key = None


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
