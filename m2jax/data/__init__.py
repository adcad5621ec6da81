"""Input pipelines: masked-LM pretraining batches (C4 via tfds, local files, the embedded
corpus), GLUE fine-tuning data (tfds or TSV folders) and GLUE metrics.

Importing this package needs only NumPy: `tokenizers`, `grain` and `tensorflow_datasets` are
imported inside the functions that use them, so the package imports on machines without them.
"""

from m2jax.data.glue import GlueSplit, glue_dataset, read_glue_tfds, read_glue_tsv
from m2jax.data.glue_tasks import GLUE_SCORE_TASKS, GLUE_TASKS, GlueTask, get_task
from m2jax.data.masking import IGNORE_INDEX, mask_tokens
from m2jax.data.metrics import glue_average, glue_metrics, glue_task_score
from m2jax.data.pretrain import host_shard, pretrain_batches
from m2jax.data.text_sources import FileTextSource, TfdsTextSource, embedded_source, open_text_source
from m2jax.data.tokenizer import BertWordPiece, load_tokenizer

__all__ = [
    "BertWordPiece", "FileTextSource", "GLUE_SCORE_TASKS", "GLUE_TASKS", "GlueSplit", "GlueTask",
    "IGNORE_INDEX", "TfdsTextSource", "embedded_source", "get_task", "glue_average",
    "glue_dataset", "glue_metrics", "glue_task_score", "host_shard", "load_tokenizer",
    "mask_tokens", "open_text_source", "pretrain_batches", "read_glue_tfds", "read_glue_tsv",
]
