"""LightningCLI entry point of the deep plain CNN example (scikit-learn digits).

    python examples/deep_cnn.py fit --config examples/configs/deep_cnn.yaml
    python examples/deep_cnn.py fit --config examples/configs/deep_cnn.yaml --model.batch_norm true
    python examples/deep_cnn.py fit --config examples/configs/deep_cnn.yaml --model.residual true --model.init he

The model and data module live in :mod:`lightning_gradguard.examples.deep_cnn`.
"""

from lightning.pytorch.cli import LightningCLI

from lightning_gradguard import KeySuggestingParser
from lightning_gradguard.examples.deep_cnn import DeepPlainCNN, DigitsDataModule


def main() -> None:
    # KeySuggestingParser: a misspelled key in the YAML fails with the closest valid one ("did you mean ...")
    LightningCLI(DeepPlainCNN, DigitsDataModule, seed_everything_default=0, parser_class=KeySuggestingParser)


if __name__ == "__main__":
    main()
