"""Export an lrx adapter merged into its base as a plain transformers checkpoint (``lrx export``):
see lrx/export.py and --help.

    python tools/export_merged.py runs/smollm2-lora/adapter runs/smollm2-lora/merged --dtype bfloat16
"""

import sys

from lrx.cli import export_main

if __name__ == "__main__":
    sys.exit(export_main())
