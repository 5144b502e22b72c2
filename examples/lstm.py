"""LightningCLI entry point of the adding-problem LSTM example.

    python examples/lstm.py fit --config examples/configs/lstm.yaml
    python examples/lstm.py fit --config examples/configs/lstm.yaml --model.lr 0.01 --trainer.max_steps 300
    python examples/lstm.py fit --config examples/configs/lstm.yaml --trainer.callbacks null   # unguarded

The model and data module live in :mod:`lightning_gradguard.examples.lstm` (so that ``gradguard demo`` can run them).
"""

from lightning.pytorch.cli import LightningCLI

from lightning_gradguard import KeySuggestingParser
from lightning_gradguard.examples.lstm import AddingProblemDataModule, AddingProblemLSTM


def main() -> None:
    # KeySuggestingParser: a misspelled key in the YAML fails with the closest valid one ("did you mean ...")
    LightningCLI(
        AddingProblemLSTM, AddingProblemDataModule, seed_everything_default=0, parser_class=KeySuggestingParser
    )


if __name__ == "__main__":
    main()
