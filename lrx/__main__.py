"""``python -m lrx COMMAND ...``: the ``lrx`` command (see ``lrx.cli``)."""

import sys

from lrx.cli import main

if __name__ == "__main__":
    sys.exit(main())
