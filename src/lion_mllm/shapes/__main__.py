"""`python -m lion_mllm.shapes`."""

from .cli import main

raise SystemExit(main())
