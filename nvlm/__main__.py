"""``python -m nvlm`` (also what torchrun runs: ``torchrun ... -m nvlm train ...``)."""

import sys

from nvlm.cli import main

if __name__ == "__main__":  # not when a spawned data worker re-imports this module
    sys.exit(main())
