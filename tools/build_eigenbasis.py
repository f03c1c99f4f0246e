"""Build an EigenLoRAx basis from peft LoRA adapters (``lrx eigenbasis``): see lrx/eigenbasis.py and --help.

    python tools/build_eigenbasis.py runs/basis runs/rte/adapter_peft runs/mrpc/adapter_peft --k 8
"""

import sys

from lrx.cli import eigenbasis_main

if __name__ == "__main__":
    sys.exit(eigenbasis_main())
