"""Peak memory of decoding one prompt's 8 seeds at 512×512 with SD 1.5's VAE: the whole batch at once against
image by image (what bp_ray/rewards/render.py does above four 512 px images), side by side in one run.

Each variant runs in a fresh process on the same latents, with the VAE of the `paper-shapes` preset (SD 1.5's
AutoencoderKL at its real size, random weights: `bp-ray models build-shapes --roles sd`) in float32 on the CPU.
Printed: the process's peak resident memory above what it held with the VAE loaded and the latents made, the time,
and whether the images are the same.

    python benchmarks/vae_decode_memory.py [--images 8]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from fresh_process import in_fresh_process, peak_rss

GIB = 1024 ** 3


def _measure(sliced: bool, images: int, out: Any) -> None:
    from diffusers import AutoencoderKL

    from bp_ray.config_loader import load_config
    from bp_ray.models.loading import resolve_model

    torch.set_num_threads(2)
    cfg = load_config("paper-shapes")
    vae = AutoencoderKL.from_pretrained(resolve_model(cfg.models.diffusion, cfg.models), subfolder="vae").eval()
    latents = torch.randn(images, 4, 64, 64, generator=torch.Generator().manual_seed(0))
    if sliced:
        vae.enable_slicing()
    before = peak_rss()
    started = time.perf_counter()
    with torch.no_grad():
        pixels = vae.decode(latents / vae.config.scaling_factor).sample
    out.put({"sliced": sliced, "peak_above_model_bytes": peak_rss() - before,
             "seconds": time.perf_counter() - started, "pixels": pixels[:, :, ::64, ::64].numpy()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8)
    args = parser.parse_args()
    print(f"SD 1.5 VAE (83,653,863 parameters, float32, CPU): decoding {args.images} latents of 64×64 to 512×512")
    whole, sliced = in_fresh_process(_measure, False, args.images), in_fresh_process(_measure, True, args.images)
    for name, r in (("one batch", whole), ("per image", sliced)):
        print(f"  {name:<10} peak above the model {r['peak_above_model_bytes'] / GIB:6.2f} GiB   "
              f"{r['seconds']:6.1f} s")
    difference = float(np.abs(whole["pixels"] - sliced["pixels"]).max())
    print(f"per image / one batch: peak memory "
          f"{sliced['peak_above_model_bytes'] / whole['peak_above_model_bytes']:.2f}×, "
          f"time {sliced['seconds'] / whole['seconds']:.2f}×; largest pixel difference {difference:.2e}")


if __name__ == "__main__":
    main()
