"""`ray job submit` entrypoint for pre-finetuning: the same function as `muppet-ray prefinetune`.

    ray job submit --working-dir . -- python jobs/prefinetune.py --config jobs/configs/default.yaml
"""

import sys

from muppet_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["prefinetune", *sys.argv[1:]]))
