"""ray job submit entry point: reward models (PickScore, aesthetic) on Ray Train + DeepSpeed.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train_rm.py --preset paper --labels /mnt/shared/bp-ray/paper/rewards \\
        --out /mnt/shared/bp-ray/paper/rm
"""

import sys

from bp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "rm", *sys.argv[1:]]))
