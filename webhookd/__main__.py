from __future__ import annotations

import sys

from webhookd.cli import main

sys.exit(main())
