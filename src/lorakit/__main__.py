"""`python -m lorakit ...` is `lorakit ...`."""

import sys

from .cli import main

sys.exit(main())
