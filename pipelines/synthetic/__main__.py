"""`python -m pipelines.synthetic`: writes a synthetic dataset (see `pipelines.synthetic.generator.main`)."""

import sys

from pipelines.synthetic.generator import main

if __name__ == "__main__":  # the generator's worker processes (spawn) import this module under another name
    sys.exit(main())
