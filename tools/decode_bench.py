"""Decode: kleinbild (contiguous, channels-last, channels-last with sub-pixel upsampling) against diffusers'
AutoencoderKLFlux2 on the same random full-size weights, bf16, engines alternating, medians.
usage: python tools/decode_bench.py SIZE REPEATS THREADS"""

import copy
import statistics
import sys
import time

import torch
from diffusers import AutoencoderKLFlux2

from kleinbild.autoencoder import AutoEncoder
from kleinbild.bench.cpu import _diffusers_vae_config
from kleinbild.config import get_preset
from kleinbild.convert import vae_to_diffusers


def main() -> None:
    size, reps = int(sys.argv[1]), int(sys.argv[2])
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else torch.get_num_threads())
    cfg = get_preset("klein-4b").ae
    torch.manual_seed(0)
    ae = AutoEncoder(cfg).to(torch.bfloat16).eval()
    ref = AutoencoderKLFlux2(**{k: v for k, v in _diffusers_vae_config(cfg).items() if not k.startswith("_")})
    ref.load_state_dict(vae_to_diffusers(ae.state_dict()))
    ref = ref.to(torch.bfloat16).eval()
    fast = copy.deepcopy(ae)
    fast.use_channels_last()
    sub = copy.deepcopy(fast)
    sub.use_subpixel_upsample()
    z = torch.randn(1, cfg.z_channels, size // 8, size // 8, dtype=torch.bfloat16)  # before patchifying
    engines = {"kleinbild": lambda: ae.decoder(z),
               "kleinbild channels-last": lambda: fast.decoder(z.contiguous(memory_format=torch.channels_last)),
               "kleinbild channels-last + subpixel":
                   lambda: sub.decoder(z.contiguous(memory_format=torch.channels_last)),
               "diffusers": lambda: ref.decode(z).sample}
    times: dict[str, list[float]] = {k: [] for k in engines}
    with torch.inference_mode():
        for r in range(reps):
            for name, fn in engines.items() if r % 2 == 0 else reversed(list(engines.items())):
                t = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:<26} {v:8.3f} s   {v / med['diffusers']:.3f} x diffusers")


if __name__ == "__main__":
    main()
