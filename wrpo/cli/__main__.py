"""``python -m wrpo.cli ...``: the ``wrpo`` command (as ``accelerate launch ... -m wrpo.cli`` runs it)."""

import sys

from wrpo.cli.main import main

sys.exit(main())
