"""`ray job submit` entrypoint for evaluation: the same function as `muppet-ray evaluate`.

    ray job submit --working-dir . -- \
        python jobs/evaluate.py --from runs/<run> --tasks needs,who_has
"""

import sys

from muppet_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
