"""ray job submit entry point: prompt-pair generation.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python jobs/generate_data.py --preset paper --out /mnt/shared/bp-ray/paper/data
"""

import sys

from bp_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["data", "generate", *sys.argv[1:]]))
