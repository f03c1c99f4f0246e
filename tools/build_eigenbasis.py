"""Build an EigenLoRAx basis from peft LoRA adapters (``lrx eigenbasis``): see lrx/eigenbasis.py and --help.

    python tools/build_eigenbasis.py runs/basis runs/rte/adapter_peft runs/mrpc/adapter_peft --k 8
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx.cli import eigenbasis_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(eigenbasis_main())
