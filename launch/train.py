"""Train an adapter (``lrx train``): python launch/train.py --config configs/<model>/<method>.yaml [key=value ...].

All logic lives in ``lrx.cli``; this file only makes the repository importable when lrx is
not installed and hands over.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx.cli import train_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(train_main())
