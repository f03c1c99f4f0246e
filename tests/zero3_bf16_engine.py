"""``launch/train.py`` with ZeRO-3's bf16 engine switched on as lrx switches it on a GPU, on CPU.

DeepSpeed's bf16 engine runs on CPU too; lrx enables it only on GPUs (``train.bf16``), so the
tests that check what it does to SRLoRA's events turn the same switch on here (through
``tests/train_many.py``, which imports ``OnAsOnAGPU``; or ``python tests/zero3_bf16_engine.py ARGS``).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lrx import cli  # noqa: E402
from lrx.distributed import zero3  # noqa: E402


class OnAsOnAGPU(zero3.ZeRO3):
    def __init__(self, device="auto", bf16=True, ds_config=None, **kwargs):
        super().__init__(device, bf16=bf16, ds_config=ds_config, **kwargs)
        self.bf16 = bf16  # what use_cuda and bf16 gives on a GPU


if __name__ == "__main__":
    zero3.ZeRO3 = OnAsOnAGPU
    sys.exit(cli.main(sys.argv[1:]))
