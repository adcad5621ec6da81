"""Print the top predictions for each [MASK] of a sentence, from a checkpoint directory.

  python launch/fill_mask.py --checkpoint=/path/to/m2-bert-80M \
      --text="The capital of France is [MASK]."
"""

from absl import app, flags

import m2jax
from m2jax.data import load_tokenizer
from m2jax.fill_mask import fill_mask

_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "checkpoint directory or weights file", required=True
)
_TEXT = flags.DEFINE_string("text", "The capital of France is [MASK].", "text with [MASK] tokens")
_TOP_K = flags.DEFINE_integer("top_k", 5, "predictions to print per [MASK]")


def main(argv: list[str]) -> None:
    del argv
    model = m2jax.from_pretrained(_CHECKPOINT.value, task="mlm")
    for i, predictions in enumerate(fill_mask(model, load_tokenizer(), _TEXT.value, _TOP_K.value)):
        print(f"[MASK] #{i}: " + ", ".join(f"{tok} ({p:.3f})" for tok, p in predictions))


if __name__ == "__main__":
    app.run(main)
