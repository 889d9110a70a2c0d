"""A second device on a CPU-only machine, for tests of device placement.

Under :class:`FakeDevice`, the device ``cpu:0`` (``FAKE``) behaves like a separate accelerator: a tensor
created on it or moved to it (``.to(FAKE)``, ``device=FAKE``, ``module.to(FAKE)``) is *on the device*, and so
is everything computed from it; ``.cpu()`` / ``.to("cpu")`` bring it back. The mode raises, as CUDA would,
when an op mixes device tensors with host tensors (0-dim host tensors and host index tensors are allowed, as
on CUDA) and when ``.numpy()`` is called on a device tensor. ``tensor.device`` reports ``FAKE`` for device
tensors, so code that places new tensors with ``device=x.device`` works as it would on a GPU.

Written for this test suite from PyTorch's rules for CUDA tensors; it knows nothing of the package.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.overrides import TorchFunctionMode

FAKE = torch.device("cpu", 0)
_TAG = "_on_fake_device"
_MOVES = {torch.Tensor.to, torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.type}
_INDEXING = {torch.Tensor.__getitem__, torch.Tensor.__setitem__, torch.Tensor.index_select, torch.index_select,
             torch.Tensor.index_put_, torch.Tensor.index_add_, torch.gather, torch.Tensor.gather}
_COPIES = {torch.Tensor.copy_}
_NO_DATA = {torch._has_compatible_shallow_copy_type, torch.Tensor.is_floating_point, torch.Tensor.dim,
            torch.Tensor.size, torch.Tensor.numel, torch.Tensor.element_size}


class DeviceMismatch(AssertionError):
    pass


def on_device(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _TAG, False)


def _tensors(obj: Any, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            _tensors(o, out)
    elif isinstance(obj, dict):
        for o in obj.values():
            _tensors(o, out)
    return out


def _is_fake(d: Any) -> bool | None:
    """True for FAKE, False for another device, None when ``d`` names no device."""
    if isinstance(d, str):
        try:
            d = torch.device(d)
        except RuntimeError:
            return None
    if isinstance(d, torch.device):
        return d == FAKE
    return None


def _mark(obj: Any, value: bool) -> None:
    for t in _tensors(obj, []):
        try:
            setattr(t, _TAG, value)
        except (AttributeError, RuntimeError):  # pragma: no cover - some internal tensors refuse attributes
            pass


class FakeDevice(TorchFunctionMode):
    """Simulate a second device (see the module docstring). ``ops`` counts the ops that touched it."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        descriptor = getattr(getattr(func, "__self__", None), "__name__", "")
        if getattr(func, "__name__", "") == "__get__" and descriptor == "device":
            return FAKE if on_device(args[0]) else func(*args, **kwargs)
        if func in _NO_DATA:
            return func(*args, **kwargs)
        if getattr(func, "__name__", "") == "__set__":
            out = func(*args, **kwargs)
            if descriptor == "data" and isinstance(args[1], torch.Tensor):  # module.to(): param.data = moved
                _mark(args[0], on_device(args[1]))
            return out
        inputs = _tensors(args, []) + _tensors(kwargs, [])
        dev_in = [t for t in inputs if on_device(t)]
        if getattr(func, "__name__", "") == "numpy" and dev_in:
            raise DeviceMismatch("numpy() of a tensor on the device: call .cpu() first")
        target: bool | None = None
        if func in _MOVES:
            if func is torch.Tensor.cpu:
                target = False
            elif func is torch.Tensor.cuda:
                target = True
            else:
                for a in list(args[1:]) + [kwargs.get("device")]:
                    if isinstance(a, torch.Tensor):
                        target = on_device(a)
                        break
                    fake = _is_fake(a)
                    if fake is not None:
                        target = fake
                        break
        elif "device" in kwargs and _is_fake(kwargs["device"]) is not None:
            target = _is_fake(kwargs["device"])
        elif dev_in and func not in _COPIES:
            host = [t for t in inputs if not on_device(t) and t.ndim > 0]
            if func in _INDEXING:
                host = [t for t in host if t.dtype not in (torch.long, torch.int, torch.bool)]
            if host:
                name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
                raise DeviceMismatch(f"{name}: tensors on the device and on the host in one op "
                                     f"(host shapes {[tuple(t.shape) for t in host]})")
        out = func(*args, **kwargs)
        if target is not None and isinstance(out, torch.Tensor) and any(out is t for t in inputs) \
                and on_device(out) != target:
            out = out.view_as(out)  # a move returned its input: the moved tensor must be another object
        if dev_in or target:
            self.ops += 1
        if target is not None:
            _mark(out, target)
        elif dev_in:
            if func in _COPIES:
                _mark(out, on_device(args[0]))
            else:
                _mark(out, True)
        return out
