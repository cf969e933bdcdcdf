"""ray job submit entry point: evaluation (systems x prompts x seeds rendered and scored, statistics, HTML report).

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/evaluate.py --preset paper --sft /mnt/shared/bp-ray/paper/sft \\
        --ppo /mnt/shared/bp-ray/paper/ppo --out /mnt/shared/bp-ray/paper/eval
"""

import sys

from bp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
