"""``python -m nvlm`` (also what torchrun runs: ``torchrun ... -m nvlm train ...``)."""

import sys

from nvlm.cli import main

sys.exit(main())
