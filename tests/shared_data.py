"""Where the project's real test data is: ``shared/data`` (videos, annotations) in the nearest
folder above the checkout that has one (the project keeps it beside the checkout, ../shared),
or ``$VISIONCOACH_SHARED_DATA``. Tests import ``DATA`` instead of counting parent folders, so a
clone anywhere under that folder finds it."""

import os
from pathlib import Path


def _find() -> Path:
    env = os.environ.get("VISIONCOACH_SHARED_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for folder in here.parents:
        if (folder / "shared" / "data" / "videos").is_dir():
            return folder / "shared" / "data"
    return here.parents[2] / "shared" / "data"   # where the project keeps it; tests then say what is missing


DATA = _find()
VIDEOS = DATA / "videos"
ANNOTATIONS = DATA / "annotations"
