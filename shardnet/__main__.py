"""``python -m shardnet`` runs the command line."""

import sys

from shardnet.cli.main import main

sys.exit(main())
