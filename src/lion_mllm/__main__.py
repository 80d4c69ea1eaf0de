"""`python -m lion_mllm ...`: the same program as the `lion` command."""

from .cli import main

raise SystemExit(main())
