"""`ray job submit` entrypoint for the task-count sweep: the same as `muppet-ray sweep tasks`.

    ray job submit --working-dir . -- python jobs/sweep_tasks.py \
        --counts 0,2,4,6 --eval-tasks review,who_has --fractions 0.1,1 --seeds 0,1
"""

import sys

from muppet_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", "tasks", *sys.argv[1:]]))
