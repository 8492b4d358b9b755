"""Triton kernels of VisionCoach, installed as ``visioncoach.kernels``.

Every kernel module holds the kernel, its host launcher, an ``autograd.Function`` where it
has a backward, a ``torch.library.custom_op`` registration with a fake implementation, and
the plain PyTorch reference the tests compare against. On CPU the public functions run the
PyTorch path unless asked for ``backend="triton"`` (tests, with ``TRITON_INTERPRET=1``).
"""

if __name__ != "visioncoach.kernels":
    # Imported as a top-level `kernels`: the checkout root is on sys.path (`python -m` or
    # `python -c` run from the checkout). That name belongs to Hugging Face's package, which
    # transformers imports to probe for it, so step aside instead of shadowing it.
    import importlib as _importlib
    import os as _os
    import sys as _sys

    _root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    _saved = _sys.path[:]
    _sys.path[:] = [p for p in _sys.path if _os.path.abspath(p or _os.getcwd()) != _root]
    del _sys.modules[__name__]
    try:
        _sys.modules[__name__] = _importlib.import_module(__name__)  # the real one, if installed
    except ImportError:
        # Not installed: look like a bare namespace directory (no file, nothing inside), which
        # transformers already treats as "not installed" rather than failing on it.
        from importlib.machinery import ModuleSpec as _ModuleSpec

        _empty = type(_sys)(__name__)
        _empty.__spec__ = _ModuleSpec(__name__, None, is_package=True)
        _empty.__path__ = []
        _sys.modules[__name__] = _sys.modules.get(__name__) or _empty
    finally:
        _sys.path[:] = _saved
else:
    from visioncoach.kernels._backend import Backend, interpreting, resolve_backend  # noqa: F401

    __all__ = ["Backend", "interpreting", "resolve_backend"]
