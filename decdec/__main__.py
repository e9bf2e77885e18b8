"""python -m decdec ... (see decdec/cli.py)."""
import sys

from .cli import main

sys.exit(main())
