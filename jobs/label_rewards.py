"""ray job submit entry point: reward labels (N seeds per prompt, PickScore + aesthetic + CLIP relevance).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/label_rewards.py --preset paper --pairs /mnt/shared/bp-ray/paper/data \\
        --out /mnt/shared/bp-ray/paper/rewards
"""

import sys

from bp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["rewards", "label", *sys.argv[1:]]))
