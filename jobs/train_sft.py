"""ray job submit entry point: SFT on Ray Train + DeepSpeed.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train_sft.py --preset paper --pairs /mnt/shared/bp-ray/paper/data --out /mnt/shared/bp-ray/paper/sft
"""

import sys

from bp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "sft", *sys.argv[1:]]))
