"""m2jax: Monarch Mixer BERT (M2-BERT) in JAX/Flax."""

from setuptools import find_packages, setup

# One list per concern so that each concern's owner edits only its own line.
CORE = [
    "jax>=0.10.2",
    "flax>=0.12.8",
    "optax>=0.2.8",
    "numpy>=2.0",
    "safetensors>=0.4",
    # Loading by Hub id (m2jax.hub; imported only when a path is not local).
    "huggingface_hub>=0.24",
    "absl-py>=2.1",
]
DATA = [
    "tokenizers>=0.23",
    # Progress bars of m2jax.Embedder (optional at run time: no bar without it).
    "tqdm>=4.66",
    "grain>=0.2.18",
    "tensorflow-datasets>=4.9.10",
    "array-record>=0.8.6",
    # tfds builders (glue, c4) import TensorFlow; the CPU build is enough for input pipelines.
    "tensorflow-cpu>=2.21",
]
TRAIN = [
    "orbax-checkpoint>=0.12.8",
    "ml_collections>=1.0",
    # TensorBoard event files through clu's metric writers (without them: metrics.jsonl).
    "clu>=0.0.12",
    "tensorboard>=2.20",
]
TEST = [
    "pytest>=8.0",
    "pytest-xdist>=3.8",  # pytest.ini: two workers, --no-loadscope-reorder
    "scikit-learn>=1.9",
    "scipy>=1.13",
    # v5: BertTokenizer (Rust) and BertTokenizerLegacy (Python) for the tokenizer parity test.
    "transformers>=5.0",
    # The quickstart notebook runs top to bottom in the tests (tests/test_notebook.py).
    "nbclient>=0.10",
    "nbformat>=5.10",
    "ipykernel>=6.29",
    "matplotlib>=3.8",
]

setup(
    name="m2jax",
    version="0.1.0",
    description="Monarch Mixer BERT (M2-BERT) in JAX/Flax",
    python_requires=">=3.11",
    packages=find_packages(include=["m2jax", "m2jax.*", "kernels", "kernels.*"]),
    include_package_data=True,
    package_data={"m2jax": ["assets/*", "data/assets/*", "data/assets/WNSENSE/*", "data/assets/WNPOS/*"]},
    install_requires=CORE,
    extras_require={
        "data": DATA,
        "train": TRAIN,
        "test": DATA + TRAIN + TEST,
    },
)
