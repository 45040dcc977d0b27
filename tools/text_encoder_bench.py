"""Text encoder, compute only: kleinbild (27 layers, no LM head) against transformers' Qwen3ForCausalLM (36 layers
and the head, output_hidden_states, as diffusers runs it), klein-4b widths, random bf16 weights, a 30-token prompt
padded to 512. usage: python tools/text_encoder_bench.py THREADS"""

import sys
import time

import torch
import transformers
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

from kleinbild.bench.cpu import _qwen3_config
from kleinbild.bench.device import _materialise
from kleinbild.config import get_preset
from kleinbild.text_encoder import Qwen3TextEncoder


def timed(fn, n: int = 2) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(round(time.perf_counter() - t, 2))
    return out


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else torch.get_num_threads())
    c = get_preset("klein-4b").text
    ids = torch.randint(0, 1000, (1, 512), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, 512, dtype=torch.long)
    mask[:, 30:] = 0
    with torch.inference_mode():
        ours = _materialise(lambda: Qwen3TextEncoder(c), torch.device("cpu"), torch.bfloat16, 1)
        print("kleinbild", timed(lambda: ours(ids, mask)), flush=True)
        ours = None  # frees its 5 GB before the reference is built
        cfg = transformers.Qwen3Config(**{k: v for k, v in _qwen3_config(c, True).items()
                                          if k not in ("architectures", "model_type")})
        ref = _materialise(lambda: transformers.Qwen3ForCausalLM(cfg), torch.device("cpu"), torch.bfloat16, 2,
                           rebuilt_buffers=("model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"))
        ref.model.rotary_emb = Qwen3RotaryEmbedding(config=cfg)
        print("transformers", timed(lambda: ref(input_ids=ids, attention_mask=mask, output_hidden_states=True)))


if __name__ == "__main__":
    main()
