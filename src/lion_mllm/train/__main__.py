"""`python -m lion_mllm.train --config FILE` (also under torchrun): the same program as `lion train`."""

import sys

from . import main

if __name__ == "__main__":
    sys.exit(main())
