"""`python -m fastllm ...`: the same command line as the `fastllm` console script."""

import sys

from fastllm.cli import main

if __name__ == "__main__":
    sys.exit(main())
