"""Data generation on a local multi-node Ray cluster (bp_ray/local_cluster.py): rows/s with one and with two
worker nodes, and where the actor pools ran. All nodes share this machine's cores, so two nodes show placement
and overhead here, not more compute. Then the `grow` scenario on --grow-rows: one worker node with room for one
actor per pool, a second node joining after the first committed batch; how many actors each pool had alive
before the join and at most after it.

    python benchmarks/multinode_data.py [--rows 240] [--grow-rows 2400]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile


def scenario(name: str, rows: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bp-ray-multinode-") as out:
        result = subprocess.run([sys.executable, "-m", "bp_ray.local_cluster", name, out, "--rows", str(rows)],
                                capture_output=True, text=True, check=True)
    line = next(line for line in result.stdout.splitlines() if line.startswith("REPORT "))
    return json.loads(line[len("REPORT "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=240)
    parser.add_argument("--grow-rows", type=int, default=2400)
    args = parser.parse_args()
    one, two = scenario("one", args.rows), scenario("spread", args.rows)
    print(f"{'worker nodes':<14}{'rows':>6}{'seconds':>10}{'rows/s':>9}  actors on")
    for nodes, report in ((1, one), (2, two)):
        placed = "; ".join(f"{cls.split('(')[-1].rstrip(')')}: {', '.join(where)}"
                           for cls, where in report["actors_on"].items())
        print(f"{nodes:<14}{report['rows_processed']:>6}{report['seconds']:>10.1f}{report['rows_per_s']:>9.2f}  "
              f"{placed}")
    print(f"two / one worker nodes: {two['rows_per_s'] / one['rows_per_s']:.2f}x rows/s")
    grow = scenario("grow", args.grow_rows)
    print(f"\ngrow ({grow['rows_processed']} rows, {grow['seconds']:.1f} s; {grow['events'][0]}): "
          "alive actors per pool")
    for cls, size in grow["pool_sizes"].items():
        print(f"  {cls.split('(')[-1].rstrip(')'):<16} {size['before_join']} before the join, up to "
              f"{size['after_join']} after; ran on {', '.join(grow['actors_on'].get(cls, []))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
