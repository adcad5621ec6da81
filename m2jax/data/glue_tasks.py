"""The GLUE task table: text fields, label ids (tfds `glue/*` 2.0.0 conventions), metrics,
evaluation splits, and where each lives in the classic GLUE TSV folder layout.

Label ids are tfds's for both sources, so a model fine-tuned on tfds data evaluates correctly
on TSV data and vice versa (e.g. MNLI entailment/neutral/contradiction = 0/1/2; WNLI's TSV
'1' is tfds 'entailment' = 1).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GlueTask:
    """One sentence(-pair) task.

    Attributes:
      name: tfds config name ('cola', ..., or 'wnsense' / 'wnpos' for the shipped offline tasks).
      num_labels: classes (1 for the regression task STS-B).
      is_regression: labels are float32 scores, not class ids.
      text_fields: tfds feature names of the one or two texts.
      label_names: class names in id order (None for regression).
      metric_names: keys `glue_metrics` returns besides 'score'.
      headline: the metric that is the task's score (MNLI: mean of the m and mm accuracies).
      eval_splits: dev splits a GLUE evaluation reports.
      tsv_folder: folder of the task in the GLUE download ('CoLA', 'SST-2', ...).
      tsv_files: split -> file name in that folder.
      tsv_text_columns, tsv_label_column: header names of those columns.
      tsv_label_values: label strings in the TSV, in label-id order (None: float scores).
      tsv_headerless: (text column indices, label column index) for files without a header
        row (CoLA train/dev), used for splits in `tsv_headerless_splits`.
    """

    name: str
    num_labels: int
    is_regression: bool
    text_fields: tuple[str, ...]
    label_names: tuple[str, ...] | None
    metric_names: tuple[str, ...]
    headline: str
    eval_splits: tuple[str, ...]
    tsv_folder: str
    tsv_text_columns: tuple[str, ...]
    tsv_label_column: str
    tsv_label_values: tuple[str, ...] | None
    tsv_files: tuple[tuple[str, str], ...] = (
        ("train", "train.tsv"), ("validation", "dev.tsv"), ("test", "test.tsv"))
    tsv_headerless: tuple[tuple[int, ...], int] | None = None
    tsv_headerless_splits: tuple[str, ...] = ()
    in_tfds: bool = True

    @property
    def is_pair(self) -> bool:
        return len(self.text_fields) == 2

    def tsv_file(self, split: str) -> str:
        files = dict(self.tsv_files)
        if split not in files:
            raise ValueError(f"GLUE task {self.name!r} has splits {sorted(files)}, not {split!r}")
        return files[split]


_ACC = dict(metric_names=("accuracy",), headline="accuracy")
_BINARY = ("0", "1")
_NLI2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {t.name: t for t in (
    GlueTask("cola", 2, False, ("sentence",), ("unacceptable", "acceptable"),
             ("matthews_corrcoef",), "matthews_corrcoef", ("validation",), "CoLA",
             ("sentence",), "label", _BINARY, tsv_headerless=((3,), 1),
             tsv_headerless_splits=("train", "validation")),
    GlueTask("sst2", 2, False, ("sentence",), ("negative", "positive"), **_ACC,
             eval_splits=("validation",), tsv_folder="SST-2", tsv_text_columns=("sentence",),
             tsv_label_column="label", tsv_label_values=_BINARY),
    GlueTask("mrpc", 2, False, ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
             ("f1", "accuracy"), "f1", ("validation",), "MRPC", ("#1 String", "#2 String"),
             "Quality", _BINARY),
    GlueTask("qqp", 2, False, ("question1", "question2"), ("not_duplicate", "duplicate"),
             ("accuracy", "f1", "accuracy_and_f1"), "accuracy_and_f1", ("validation",), "QQP",
             ("question1", "question2"), "is_duplicate", _BINARY),
    GlueTask("stsb", 1, True, ("sentence1", "sentence2"), None, ("pearson", "spearman"),
             "spearman", ("validation",), "STS-B", ("sentence1", "sentence2"), "score", None),
    GlueTask("mnli", 3, False, ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
             **_ACC, eval_splits=("validation_matched", "validation_mismatched"),
             tsv_folder="MNLI", tsv_text_columns=("sentence1", "sentence2"),
             tsv_label_column="gold_label", tsv_label_values=("entailment", "neutral", "contradiction"),
             tsv_files=(("train", "train.tsv"), ("validation_matched", "dev_matched.tsv"),
                        ("validation_mismatched", "dev_mismatched.tsv"),
                        ("test_matched", "test_matched.tsv"),
                        ("test_mismatched", "test_mismatched.tsv"))),
    GlueTask("qnli", 2, False, ("question", "sentence"), _NLI2, **_ACC,
             eval_splits=("validation",), tsv_folder="QNLI", tsv_text_columns=("question", "sentence"),
             tsv_label_column="label", tsv_label_values=_NLI2),
    GlueTask("rte", 2, False, ("sentence1", "sentence2"), _NLI2, **_ACC,
             eval_splits=("validation",), tsv_folder="RTE", tsv_text_columns=("sentence1", "sentence2"),
             tsv_label_column="label", tsv_label_values=_NLI2),
    GlueTask("wnli", 2, False, ("sentence1", "sentence2"), ("not_entailment", "entailment"), **_ACC,
             eval_splits=("validation",), tsv_folder="WNLI", tsv_text_columns=("sentence1", "sentence2"),
             tsv_label_column="label", tsv_label_values=_BINARY),
    # Not GLUE: the offline sentence-pair task shipped in m2jax/data/assets/WNSENSE (WordNet
    # 3.0 examples vs definitions; 1 = the definition is the sense the example uses).
    GlueTask("wnsense", 2, False, ("sentence1", "sentence2"), ("other_sense", "same_sense"), **_ACC,
             eval_splits=("validation",), tsv_folder="WNSENSE",
             tsv_text_columns=("sentence1", "sentence2"), tsv_label_column="label",
             tsv_label_values=_BINARY, tsv_files=(("train", "train.tsv"), ("validation", "dev.tsv")),
             in_tfds=False),
    # Not GLUE: the offline single-sentence task in m2jax/data/assets/WNPOS (WordNet 3.0
    # definitions; 1 = the definition is a verb's, 0 = a noun's). Learnable by a small model,
    # so the offline fine-tuning smoke run can show a score above chance.
    GlueTask("wnpos", 2, False, ("sentence",), ("noun", "verb"), **_ACC,
             eval_splits=("validation",), tsv_folder="WNPOS", tsv_text_columns=("sentence",),
             tsv_label_column="label", tsv_label_values=_BINARY,
             tsv_files=(("train", "train.tsv"), ("validation", "dev.tsv")), in_tfds=False),
)}

# The eight tasks whose mean is the GLUE score (WNLI excluded, as in the M2 paper).
GLUE_SCORE_TASKS = ("mnli", "qnli", "qqp", "rte", "sst2", "mrpc", "cola", "stsb")


def get_task(name: str) -> GlueTask:
    key = name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {name!r}; known: {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[key]
