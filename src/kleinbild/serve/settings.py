"""The server's limits and policies, one `kleinbild serve` flag each."""

from __future__ import annotations

from dataclasses import dataclass

from kleinbild.images import MAX_PIXELS


@dataclass
class ServerSettings:
    """Limits and policies; every field is a `kleinbild serve` flag."""

    api_keys: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    max_pixels: int = MAX_PIXELS  # output width * height
    max_n: int = 8
    max_images: int = 4  # reference images per request
    max_upload_bytes: int = 32 * 2**20  # whole request body
    max_image_pixels: int = 4096 * 4096  # one uploaded image, before the engine downsizes it
    max_steps: int = 100
    max_prompt_chars: int = 32000
    max_queue: int = 64
    max_batch: int = 8
    output_dir: str | None = None
    ttl: float = 3600.0  # seconds that finished jobs and url results are kept
    preview_every: int = 1  # steps between previews; 0: none
    preview_px: int = 256
    prompt_cache: int = 32
    reference_cache: int = 32
    model_id: str | None = None
    # Host header values answered ("name" or "name:port"); empty: any. `kleinbild serve` on a loopback address
    # allows only the loopback names, so a web page elsewhere cannot reach it through DNS rebinding.
    allowed_hosts: tuple[str, ...] = ()
    public_url: str | None = None  # what url results start with; None: this server's own address, as asked
    max_generation_bytes: int = 2**20  # a generation's body (no images in it)
    body_timeout: float = 30.0  # seconds a request body may take to arrive
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open
    # Hosts ("name" or "name:port") a BFL-style `webhook_url` may point at; empty: no webhooks, so a client cannot
    # make the server call arbitrary URLs.
    webhook_hosts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # An empty key (an unset $KEY on the command line) would make `Authorization: Bearer` with no token pass.
        if any(not k.strip() for k in self.api_keys):
            raise ValueError("an API key is empty (an unset variable on the command line?); give non-empty keys "
                             "or none")

