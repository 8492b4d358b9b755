"""Data flow stage 1 for training: records -> decoded clips, in worker processes.

Decoding runs in DataLoader workers (PyAV on CPU); a sample whose video cannot be decoded is
returned as a ``SampleFailure`` instead of raising, so one bad file costs one sample, never
the epoch: the training loop counts failures and logs them. Sharding across ranks is
deterministic in (seed, epoch), so a resumed run sees the same order.

A video record gives ``nframes`` uniform frames plus its key frames in time order: a key frame
whose image file the record names (``key_frames[].path``, found through the dataset's sources)
is read and resized to the video's frame size, as the reference does; the others are decoded
at their times. An image record gives its one image. ``ClipSample.meta`` says which files were
opened and where each key frame came from.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from visioncoach.data.clip import DecodedClip, insert_frames, read_image
from visioncoach.data.decode import DecodeError, decode
from visioncoach.data.stgr import STGRDataset

# (record, sample index, decoded frames [F, H, W, 3]) -> what later stages need of the record,
# computed once in the worker (the trainer passes ``rewards.records.RewardTargets``). Raises
# ValueError for a sample it cannot serve, which then becomes a counted SampleFailure.
TargetsFn = Callable[[dict, int, torch.Tensor], Any]


@dataclass
class ClipSample:
    index: int
    record: dict
    frames: torch.Tensor   # [F, H, W, 3] uint8, original resolution (resized on the device later)
    times: torch.Tensor    # [F] float64 seconds
    is_key: torch.Tensor   # [F] bool
    duration: float
    # The record's reward ground truth in pixels of the resized frames the model sees
    # (a ``rewards.records.Record`` from the dataset's ``targets``), converted once, in the
    # worker, so the reward never re-validates it per rollout; None without ``targets``.
    reward_record: Any = None
    kind: str = "video"    # or "image": one image, no time axis (visual QA records)
    # Files opened ("media", "key_frame_images") and, per key frame, "image" or "decoded".
    meta: dict = field(default_factory=dict)


@dataclass
class SampleFailure:
    index: int
    id: str
    reason: str


class ClipDataset(Dataset):
    """Decodes ``nframes`` uniform frames + the record's key frames for each record.

    With ``targets`` (see ``TargetsFn``; picklable, it runs in the workers) each sample also
    carries its reward record for the frame size the model will see.
    """

    def __init__(self, data: STGRDataset, nframes: int, backend: str = "auto",
                 max_side: int | None = None, targets: TargetsFn | None = None):
        self.data, self.nframes, self.backend, self.max_side = data, nframes, backend, max_side
        self.targets = targets

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> ClipSample | SampleFailure:
        rec = self.data.records[i]
        try:
            clip, meta = self._image(i) if self.data.is_image(i) else self._video(i)
        except DecodeError as exc:
            return SampleFailure(i, rec["id"], exc.reason)
        reward_record = None
        if self.targets is not None:
            try:
                reward_record = self.targets(rec, i, clip.frames)
            except ValueError as exc:  # validated at load; only a frame size can fail here
                return SampleFailure(i, rec["id"], f"reward record: {exc}")
        return ClipSample(i, rec, clip.frames, clip.times, clip.is_key, clip.duration, reward_record,
                          kind="image" if self.data.is_image(i) else "video", meta=meta)

    def _video(self, i: int) -> tuple[DecodedClip, dict]:
        rec = self.data.records[i]
        key_frames = sorted(rec.get("key_frames") or [], key=lambda kf: float(kf["time"]))
        files = [self.data.key_frame_image(i, kf) for kf in key_frames]
        media = self.data.media(i)
        clip = decode(media, nframes=self.nframes, backend=self.backend, max_side=self.max_side,
                      key_times=[kf["time"] for kf, f in zip(key_frames, files) if f is None])
        size = tuple(clip.frames.shape[1:3])
        images = [read_image(f, size=size) for f in files if f is not None]
        clip = insert_frames(clip, images, [float(kf["time"]) for kf, f in zip(key_frames, files) if f is not None])
        return clip, {"media": str(media), "key_frame_images": [str(f) for f in files if f is not None],
                      "key_frames": [{"time": float(kf["time"]), "from": "decoded" if f is None else "image"}
                                     for kf, f in zip(key_frames, files)]}

    def _image(self, i: int) -> tuple[DecodedClip, dict]:
        media = self.data.media(i)
        frame = read_image(media, max_side=self.max_side)
        clip = DecodedClip(frame[None], torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.bool), 0.0)
        return clip, {"media": str(media), "key_frame_images": [], "key_frames": []}


class ShardSampler(Sampler[int]):
    """Rank ``rank`` of ``world`` takes every world-th index of a (seed, epoch) permutation.

    Every rank gets the same number of indices (the permutation is padded by wrapping), so
    collective steps never wait on a rank that ran out of data.
    """

    def __init__(self, n: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0):
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} not in [0, {world})")
        self.n, self.rank, self.world, self.shuffle, self.seed = n, rank, world, shuffle, seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Epoch of the permutation, and how many of this rank's indices to skip (resume)."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return math.ceil(self.n / self.world) - self.start

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
        total = math.ceil(self.n / self.world) * self.world
        order = (order * math.ceil(total / max(self.n, 1)))[:total]
        return iter(order[self.rank::self.world][self.start:])


def _keep_list(batch):
    return batch


def make_loader(dataset: ClipDataset, *, batch_size: int, rank: int = 0, world: int = 1,
                shuffle: bool = True, seed: int = 0, num_workers: int = 2) -> DataLoader:
    """DataLoader yielding lists of ``ClipSample | SampleFailure`` (split with ``split_failures``).

    When decoding goes to DALI on a GPU, it runs in this process (DALI has its own decode
    threads and CUDA cannot be used in forked workers), so ``num_workers`` is then 0.
    """
    from visioncoach.data.dali import dali_gpu_available

    if dataset.backend in ("auto", "dali") and dali_gpu_available():
        num_workers = 0
    sampler = ShardSampler(len(dataset), rank, world, shuffle, seed)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      collate_fn=_keep_list, persistent_workers=num_workers > 0,
                      prefetch_factor=2 if num_workers > 0 else None)


class FailureCounter:
    """Counts skipped samples by reason; ``summary()`` for the logs."""

    def __init__(self) -> None:
        self.total = 0
        self.by_reason: Counter = Counter()
        self.first: list[SampleFailure] = []

    def add(self, failure: SampleFailure) -> None:
        self.total += 1
        self.by_reason[failure.reason.split(" (")[0]] += 1
        if len(self.first) < 5:
            self.first.append(failure)

    def summary(self) -> str:
        if not self.total:
            return "no samples skipped"
        reasons = ", ".join(f"{r}: {n}" for r, n in self.by_reason.most_common())
        return f"{self.total} sample(s) skipped ({reasons}); first: " + "; ".join(
            f"{f.id} ({f.reason})" for f in self.first)


def split_failures(batch: list, counter: FailureCounter) -> list[ClipSample]:
    """The decodable samples of a batch; failures go to ``counter``."""
    good = []
    for item in batch:
        if isinstance(item, SampleFailure):
            counter.add(item)
        else:
            good.append(item)
    return good
