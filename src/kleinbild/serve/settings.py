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



@dataclass(frozen=True)
class ReplicaOptions:
    """Serving on Ray Serve replicas (`kleinbild serve --replicas N`); see docs/scale-out.md."""

    replicas: int = 1  # fixed count; with max_replicas: the count to start with
    min_replicas: int | None = None  # autoscaling bounds (both, or max alone with min 1)
    max_replicas: int | None = None
    target_ongoing: float = 2.0  # autoscaling's target of ongoing requests per replica
    cpus_per_replica: float = 1.0  # also the torch threads of a CPU replica
    gpus_per_replica: float = 0.0
    ray_address: str | None = None  # join this cluster; None: start a local Ray, stopped with the server
    num_cpus: int | None = None  # a local Ray's CPUs (None: the machine's)
    num_gpus: int | None = None
    max_retries: int = 3  # runs of a job after the first when its replica is lost
    log_to_driver: bool = True

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise ValueError(f"replicas must be at least 1, got {self.replicas}")
        lo, hi = self.min_replicas, self.max_replicas
        if lo is not None and hi is None:
            raise ValueError("--min-replicas needs --max-replicas (autoscaling bounds)")
        if hi is not None and not 1 <= (lo or 1) <= hi:
            raise ValueError(f"autoscaling bounds must satisfy 1 <= min <= max, got min {lo}, max {hi}")
        if self.max_retries < 0:
            raise ValueError(f"max_retries must be 0 or more, got {self.max_retries}")
