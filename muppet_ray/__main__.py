from muppet_ray.cli import main

raise SystemExit(main())
