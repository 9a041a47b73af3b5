"""`python -m gateway` is `infusion-telemetry`."""

import sys

from gateway.cli import main

sys.exit(main())
