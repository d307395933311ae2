"""Entry point: `python -m connectors --help`."""
import sys

from .cli import main

sys.exit(main())
