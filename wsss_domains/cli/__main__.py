"""`python -m wsss_domains.cli`."""

import sys

from wsss_domains.cli import main

sys.exit(main())
