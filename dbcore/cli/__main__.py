"""``python -m dbcore.cli``: the ``dbmigrate`` command."""

import sys

from dbcore.cli.main import main

sys.exit(main())
