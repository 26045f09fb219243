"""Train SimpleCNN on MNIST with Lightning, test the best checkpoint, and log feature maps.

    python train.py                                  # configs/default.yaml (CPU-friendly)
    python train.py --config configs/debug.yaml      # seconds-long smoke run
    python train.py --config configs/wandb.yaml      # W&B (offline without an API key)
    python train.py --help                           # every flag

Everything lives in fm_lightning/cli.py; this file is only the entry point.
"""

from fm_lightning.cli import main

if __name__ == "__main__":
    main()
