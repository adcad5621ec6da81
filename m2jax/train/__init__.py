"""Training: the pretraining and GLUE jobs and the pieces they are composed of.

    launch/*.py -> jobs.py (config checks, data, model, evaluator) -> loop.py (step.py, state.py)
                -> checkpointing.py, results.py, console.py -> workdir.py (export)

Import the modules directly (`from m2jax.train.jobs import run_pretraining`); importing this
package pulls in nothing heavy.
"""
