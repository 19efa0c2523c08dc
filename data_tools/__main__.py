"""`python -m data_tools ...`: the same commands as the `data_tools` console script."""

import sys

from data_tools.cli import main

sys.exit(main())
