"""VisionCoach: visual-prompt-guided GSPO training of Qwen2.5-VL for grounded video reasoning.

Data flow, one home per stage: decode (``data``) -> VP render (``vp``) -> model inputs
(``processor``) -> rollout (``rollout``) -> reward (``rewards``) -> loss (``algorithm`` and the
fused ``kernels.gspo_sd_loss``) -> step (``trainer``); ``train`` wires them. Triton kernels live
in ``visioncoach.kernels`` (source folder ``kernels/`` of the checkout), native ops in
``visioncoach.ops``.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _drop_checkout_root_from_path() -> None:
    # `python -m` from the checkout puts its root on sys.path, where the source folder
    # kernels/ would shadow Hugging Face's `kernels` package, which transformers imports
    # to probe for it. Our kernels are only ever `visioncoach.kernels`.
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    if not _os.path.isfile(_os.path.join(root, "kernels", "__init__.py")):
        return
    cwd = _os.getcwd()
    _sys.path[:] = [p for p in _sys.path
                    if _os.path.abspath(p or cwd) != root]
    mod = _sys.modules.get("kernels")
    if mod is not None and _os.path.dirname(getattr(mod, "__file__", "") or "") == _os.path.join(root, "kernels"):
        del _sys.modules["kernels"]


_drop_checkout_root_from_path()
