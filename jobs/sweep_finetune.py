"""`ray job submit` entrypoint for fine-tuning hyperparameter search (`muppet-ray sweep finetune`).

    ray job submit --working-dir . -- python jobs/sweep_finetune.py --from runs/<run> \
        --task review --search "training.learning_rate=loguniform(1e-4,3e-3)" --samples 8
"""

import sys

from muppet_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["sweep", "finetune", *sys.argv[1:]]))
