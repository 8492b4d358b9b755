"""VP-Selector (paper section 3.3, appendix C): picks the visual prompt for a video and question.

* ``python -m visioncoach.selector.build``: pseudo-labels from proxy reasoners (eq. 3),
* ``python -m visioncoach.selector.train``: LoRA training of the generative classifier,
* ``Selector(path).predict(batch)``: frozen greedy prediction (the trainer's ``model`` mode),
* ``python -m visioncoach.selector.apply``: plug-and-play prompting of one video.
"""

from visioncoach.selector.labels import LabelMapper, map_label, selector_labels
from visioncoach.selector.model import Selector, SelectorInput

__all__ = ["LabelMapper", "map_label", "selector_labels", "Selector", "SelectorInput"]
