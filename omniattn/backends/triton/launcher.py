"""Kernel launches with Triton's per-call host work done once per specialization.

``kernel[grid](*args, **constexprs)`` makes Triton bind ~100 arguments, specialize each, build a
cache key (including ``str(options)``) and check globals on every call: for these kernels about as
long as a short sequence's GPU time, which then bounds (and makes jittery) every benchmark of short
sequences. FastLaunch keys the compiled kernel on what Triton specializes on (each tensor's dtype
and 16-byte alignment; each int's value 1, divisibility by 16 and width; the constexprs) and calls
the compiled kernel's launcher directly. The first call of a key goes through Triton as usual.
OMNIATTN_FAST_LAUNCH=0 turns it off; the interpreter always takes Triton's path.
"""

from __future__ import annotations

import os

import torch

from .configs import interpreting


_INT32 = (-(2**31), 2**31)


def _spec(a):
    """What Triton specializes an argument on, cheaply (this runs for every argument of every launch)."""
    kind = type(a)
    if kind is int:  # value 1, divisibility by 16, 32-bit range: one small int
        return (a == 1) + ((a % 16 == 0) << 1) + ((_INT32[0] <= a < _INT32[1]) << 2)
    if kind is float or kind is bool or a is None:
        return kind
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    return kind, a


class FastLaunch:
    def __init__(self, fn):
        self.fn = fn
        self.cache: dict = {}
        self._constexprs = None

    @property
    def constexprs(self) -> list:
        """Names of the kernel's constexpr parameters, in signature order (they follow the runtime ones)."""
        if self._constexprs is None:
            self._constexprs = [p.name for p in self.fn.params if p.is_constexpr]
        return self._constexprs

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def launch(self, grid, args, kwargs):
        if interpreting() or os.environ.get("OMNIATTN_FAST_LAUNCH", "1") == "0":
            return self.fn[grid](*args, **kwargs)
        device = _driver().get_current_device()  # (a kernel's handles belong to one device)
        key = (device, tuple(kwargs.items()), tuple(map(_spec, args)))
        kernel = self.cache.get(key)
        if kernel is None:
            kernel = self.fn[grid](*args, **kwargs)  # compiles if needed, and launches
            kernel._init_handles()
            self.cache[key] = kernel
            return kernel
        _run(kernel, device, _grid3(grid), args + tuple(kwargs[name] for name in self.constexprs))
        return kernel

    def bind(self, grid, kwargs) -> "Bound":
        """This kernel on one grid with one set of constexprs, for calls whose arguments all
        specialize alike (see Bound)."""
        return Bound(self, grid, kwargs)


class Bound:
    """A FastLaunch bound to a grid and constexprs, for a launch plan (launch.py) whose key fixes
    what Triton specializes on: every call's ints are the plan's and its tensors have the plan's
    dtypes and 16-byte alignment. The first call on a device goes through FastLaunch; later ones
    skip even its key (one small tuple per argument: ~20 us for the forward's 75 arguments)."""

    def __init__(self, fast: FastLaunch, grid, kwargs: dict):
        self.fast, self.grid, self.kwargs = fast, grid, kwargs
        self.bound = None  # (kernel, device, 3-D grid, constexpr values), set in one assignment

    def __call__(self, *args) -> None:
        bound = self.bound
        if bound is not None:
            kernel, device, grid, constexprs = bound
            if _driver().get_current_device() == device:
                return _run(kernel, device, grid, args + constexprs)
        kernel = self.fast.launch(self.grid, args, self.kwargs)
        if not interpreting() and os.environ.get("OMNIATTN_FAST_LAUNCH", "1") != "0":
            self.bound = (kernel, _driver().get_current_device(), _grid3(self.grid),
                          tuple(self.kwargs[name] for name in self.fast.constexprs))


def _driver():
    import triton

    return triton.runtime.driver.active


def _grid3(grid) -> tuple:
    return tuple(grid) + (1,) * (3 - len(grid))


def _run(kernel, device, grid, args) -> None:
    """Launch a compiled kernel on ``device``'s current stream, as Triton itself does."""
    from triton import knobs

    stream = _driver().get_current_stream(device)
    kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata, None,
               knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args)
