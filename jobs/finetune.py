"""`ray job submit` entrypoint for fine-tuning: the same function as `muppet-ray finetune`.

    ray job submit --working-dir . -- python jobs/finetune.py --config jobs/configs/finetune.yaml \
        --from runs/<run> --task review --baseline auto --fractions 0.1,1 --seeds 0,1,2
"""

import sys

from muppet_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["finetune", *sys.argv[1:]]))
