"""One way to put hooks on a model and take them all off again, whatever happens in between.

Capture, steering and the CAA baseline all add forward hooks (and the fused paths swap MLP
forwards). A `HookSet` owns every handle and patch it registers: closing it removes them in
reverse order, and a failure while registering removes the ones already added, so a half-built
hook set never stays on the model.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

from torch import nn
from torch.utils.hooks import RemovableHandle

_MISSING = object()


class HookSet:
    """Handles and context managers to undo together; usable as a context manager."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()

    def pre_hook(self, module: nn.Module, hook: Callable, *, with_kwargs: bool = False) -> RemovableHandle:
        """Register a forward pre-hook on `module`, removed when the set closes."""
        return self._keep(module.register_forward_pre_hook(hook, with_kwargs=with_kwargs))

    def post_hook(self, module: nn.Module, hook: Callable) -> RemovableHandle:
        """Register a forward hook on `module`, removed when the set closes."""
        return self._keep(module.register_forward_hook(hook))

    def replace_forward(self, module: nn.Module, forward: Callable) -> None:
        """Run `forward` instead of `module.forward`; the exact previous state comes back when the set closes."""
        previous = module.__dict__.get("forward", _MISSING)
        module.forward = forward

        def restore() -> None:
            if previous is _MISSING:
                del module.forward
            else:
                module.forward = previous

        self._stack.callback(restore)

    def enter(self, context: ContextManager) -> None:
        """Enter `context` (e.g. an MLP patch) now; exit it when the set closes."""
        self._stack.enter_context(context)

    def _keep(self, handle: RemovableHandle) -> RemovableHandle:
        self._stack.callback(handle.remove)
        return handle

    def close(self) -> None:
        """Remove every hook and undo every patch, last registered first."""
        self._stack.close()

    @classmethod
    @contextlib.contextmanager
    def building(cls):
        """Yield a new set; if the block raises, close the set before the error propagates."""
        hooks = cls()
        try:
            yield hooks
        except BaseException:
            hooks.close()
            raise

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HookedSteering:
    """A steering method whose hooks live in one HookSet (`self._hooks`): `remove()` restores the model
    exactly; usable as a context manager (the CAA baseline, directional ablation)."""

    _hooks: HookSet

    def remove(self) -> None:
        """Remove the hooks; the model is exactly as before."""
        self._hooks.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
