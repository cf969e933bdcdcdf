"""ray job submit entry point: the whole paper run (models, corpus, pairs, reward labels, SFT, reward models, PPO,
evaluation) on one run directory, each stage in its folder under --out.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/pipeline.py --preset paper --prompts /mnt/shared/diffusiondb --out /mnt/shared/bp-ray/paper
"""

import sys

from bp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["pipeline", *sys.argv[1:]]))
