"""ray job submit entry point: PPO with an adaptive KL penalty, reference and reward actors, on Ray Train.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/train_ppo.py --preset paper --pairs /mnt/shared/bp-ray/paper/data \\
        --sft /mnt/shared/bp-ray/paper/sft --rm /mnt/shared/bp-ray/paper/rm --out /mnt/shared/bp-ray/paper/ppo
"""

import sys

from bp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", "ppo", *sys.argv[1:]]))
