"""Train a Vision Transformer: ``python train.py --data synthetic`` (see ``--help`` and README)."""

from vit.train import main

if __name__ == "__main__":
    raise SystemExit(main())
