"""Export an lrx adapter merged into its base as a plain transformers checkpoint (``lrx export``):
see lrx/export.py and --help.

    python tools/export_merged.py runs/smollm2-lora/adapter runs/smollm2-lora/merged --dtype bfloat16
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx.cli import export_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(export_main())
