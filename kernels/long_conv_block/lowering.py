"""Lower a backend-specific kernel call for its own platform only.

`jax.lax.platform_dependent` lowers every branch for every platform of a multi-platform module
(``jax.export(..., platforms=["cpu", "cuda"])``): the CUDA branch's `pallas_call` would then be
lowered for the CPU too, which Pallas refuses ("Only interpret mode is supported on CPU
backend"). `lower_only_for` wraps such a call in a primitive whose lowering rule for the named
platform lowers the call itself and, for any other platform of the module, a NaN placeholder of
the same shapes. The placeholder is unreachable when the call sits in `platform_dependent`'s
branch for that platform (the module selects the branch by platform at run time); lowering the
wrapper for other platforms alone, where it would be reached, is an error.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.extend import core as jex_core
from jax.interpreters import mlir

Array = jax.Array

_platform_only_p = jex_core.Primitive("m2jax_platform_only")
_platform_only_p.multiple_results = True


def _run_jaxpr(*args: Array, jaxpr: jex_core.ClosedJaxpr, platform: str) -> list[Array]:
    del platform
    return jex_core.jaxpr_as_fun(jaxpr)(*args)


def _abstract_eval(*avals: Any, jaxpr: jex_core.ClosedJaxpr, platform: str) -> list[Any]:
    del avals, platform
    return list(jaxpr.out_avals)


def _placeholder(*args: Array, jaxpr: jex_core.ClosedJaxpr, platform: str) -> list[Array]:
    del args
    return [jnp.full(a.shape, jnp.nan, a.dtype) for a in jaxpr.out_avals]


def _placeholder_lowering(ctx: mlir.LoweringRuleContext, *args: Any, jaxpr: jex_core.ClosedJaxpr,
                          platform: str) -> Sequence[Any]:
    if len(ctx.module_context.platforms) < 2:
        raise ValueError(
            f"this kernel runs only on {platform!r}; it is being compiled for "
            f"{list(ctx.module_context.platforms)}. Use implementation='auto' (which picks a "
            f"path per platform) or an XLA implementation there.")
    return mlir.lower_fun(_placeholder, multiple_results=True)(ctx, *args, jaxpr=jaxpr,
                                                               platform=platform)


_platform_only_p.def_impl(_run_jaxpr)
_platform_only_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(_platform_only_p, _placeholder_lowering)
_REGISTERED: set[str] = set()


def lower_only_for(platform: str, fn: Callable[..., Sequence[Array]], *args: Array
                   ) -> list[Array]:
    """``fn(*args)`` (a list of arrays), lowered as itself for `platform` ("cuda", "tpu") only.

    Not differentiable by itself: use it inside a `jax.custom_vjp`'s forward and backward.
    """
    if platform not in _REGISTERED:
        # The rule narrows the lowering context to `platform`, so `fn`'s primitives (pallas_call)
        # are lowered for that platform alone.
        mlir.register_lowering(_platform_only_p, mlir.lower_fun(_run_jaxpr, multiple_results=True),
                               platform=platform)
        _REGISTERED.add(platform)
    specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args]
    jaxpr = jax.make_jaxpr(lambda *a: list(fn(*a)))(*specs)
    return _platform_only_p.bind(*args, jaxpr=jaxpr, platform=platform)
