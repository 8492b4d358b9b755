"""GPU check step 4: the video path on the GPU, on the shared videos (../shared/data/videos).

Per video, 16 uniform + 2 key frames (as bench_video_pipeline.py):
  decode   ``decode(backend="dali")`` (NVDEC, frames stay on the GPU) vs ``backend="pyav"``
           (CPU): median wall time of ``REPEATS`` after one untimed call (DALI builds its
           pipeline there; ``dali_first_call_s``), frames/s; the same frames picked (times,
           key flags) and the pixel difference (DALI and PyAV convert YUV -> RGB differently:
           tests/test_dali_decode.py bounds the mean at 4)
  VP       the DALI frames resized on the GPU to the 7B config's pixel budget, then every VP
           type with a kernel drawn on all frames on the GPU (Triton), median time and
           frames/s; ``equal_cpu_reference``: the same input frames copied to the CPU and
           drawn by the PyTorch reference there are bit-identical
  pipeline the whole GPU path (DALI -> resize -> darken, Triton) vs the whole CPU path (PyAV ->
           resize -> darken, reference): their pixel difference (decoding and resizing differ
           across devices, so this is a figure, not an equality)
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIDEOS = ROOT.parent / "shared" / "data" / "videos"
NFRAMES, KEY_TIMES = 16, (2.0, 5.5)
MIN_PIXELS, MAX_PIXELS = 3136, 100352   # the 7B config's data.min_pixels / max_pixels
REPEATS = 3
DECODE_MEAN_DIFF_MAX = 4.0              # tests/test_dali_decode.py's bound


def videos() -> list[Path]:
    return sorted(VIDEOS.glob("*.mp4"))


def vp_inputs(frames):
    """Per-frame VP inputs for frames [F, H, W, 3] on their device: one box in pixels, the
    1-based frame numbers, a fixed pseudo-random heatmap."""
    import torch

    F, H, W = frames.shape[:3]
    dev = frames.device
    boxes = torch.tensor([[0.3 * W, 0.3 * H, 0.6 * W, 0.7 * H]], device=dev).expand(F, 1, 4).contiguous()
    box_count = torch.ones(F, dtype=torch.int64, device=dev)
    frame_index = torch.arange(1, F + 1, dtype=torch.int64, device=dev)
    heatmap = torch.rand(F, 14, 14, generator=torch.Generator().manual_seed(0)).to(dev)
    return boxes, box_count, frame_index, heatmap


def kernel_types() -> list[str]:
    from visioncoach.vp.spec import vp_spec, vp_types

    return [v for v in vp_types() if vp_spec(v).kernel is not None]


def dry_run(ctx) -> tuple[str, str | None]:
    """Without a GPU: DALI imports, each video's codec is one NVDEC decodes, PyAV decodes it,
    and the CPU reference side (resize + every VP type's reference) runs. Nothing timed."""
    import av

    from visioncoach.data.dali import GPU_CODECS, dali_available
    from visioncoach.data.decode import decode
    from visioncoach.processor import resize_frames
    from visioncoach.vp.render import render_vp_reference

    problems = [] if dali_available() else ["nvidia.dali does not import"]
    rows = []
    if not videos():
        problems.append(f"no videos in {VIDEOS}")
    for path in videos():
        with av.open(str(path)) as c:
            codec = c.streams.video[0].codec_context.name
        clip = decode(path, nframes=NFRAMES, key_times=KEY_TIMES, backend="pyav")
        frames = resize_frames(clip.frames, MIN_PIXELS, MAX_PIXELS)
        for v in kernel_types():
            render_vp_reference(frames, v, *vp_inputs(frames))
        rows.append({"video": path.name, "codec": codec, "nvdec_decodes": codec in GPU_CODECS,
                     "frames": len(clip), "model_frame_hw": list(frames.shape[1:3])})
        if codec not in GPU_CODECS:
            problems.append(f"{path.name}: codec {codec} is not one NVDEC decodes")
    ctx.numbers = {"videos": rows, "vp_types": kernel_types()}
    return ("failed", "; ".join(problems)) if problems else ("passed", None)


def _median_s(fn, sync) -> tuple[float, object]:
    from _common import measure

    t = measure(fn, repeats=REPEATS, warmup=0, sync=sync)
    return t.median, t.value


def check_video(path: Path) -> tuple[dict, list[str]]:
    import time

    import torch

    from visioncoach.data.decode import decode
    from visioncoach.processor import resize_frames
    from visioncoach.vp.render import render_vp, render_vp_reference

    # Always CUDA in the kit; tests run this on CPU with a stand-in decoder (logic only).
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    problems = []
    t0 = time.perf_counter()
    decode(path, nframes=NFRAMES, key_times=KEY_TIMES, backend="dali")
    sync()
    row = {"video": path.name, "dali_first_call_s": time.perf_counter() - t0}
    dali_s, dali = _median_s(lambda: decode(path, nframes=NFRAMES, key_times=KEY_TIMES, backend="dali"), sync)
    pyav_s, pyav = _median_s(lambda: decode(path, nframes=NFRAMES, key_times=KEY_TIMES, backend="pyav"),
                             None)
    n = len(dali)
    diff = (dali.frames.cpu().int() - pyav.frames.int()).abs().float() if dali.frames.shape == pyav.frames.shape else None
    row.update(frames=n, frame_hw=list(dali.frames.shape[1:3]), dali_on_cuda=dali.frames.is_cuda,
               dali_decode_ms=dali_s * 1e3, dali_frames_per_s=n / dali_s,
               pyav_decode_ms=pyav_s * 1e3, pyav_frames_per_s=len(pyav) / pyav_s,
               same_frames_picked=bool(torch.equal(dali.times, pyav.times) and torch.equal(dali.is_key, pyav.is_key)),
               decode_mean_abs_diff=float(diff.mean()) if diff is not None else None,
               decode_max_abs_diff=float(diff.max()) if diff is not None else None)
    if not dali.frames.is_cuda:
        problems.append(f"{path.name}: DALI frames are not on the GPU")
    if not row["same_frames_picked"]:
        problems.append(f"{path.name}: DALI and PyAV picked different frames")
    if diff is None or row["decode_mean_abs_diff"] >= DECODE_MEAN_DIFF_MAX:
        problems.append(f"{path.name}: DALI frames differ from PyAV's (mean {row['decode_mean_abs_diff']})")

    gpu = resize_frames(dali.frames, MIN_PIXELS, MAX_PIXELS)
    cpu = gpu.cpu()
    row["model_frame_hw"] = list(gpu.shape[1:3])
    args_gpu, args_cpu = vp_inputs(gpu), vp_inputs(cpu)
    row["vp"] = []
    for v in kernel_types():
        out = render_vp(gpu, v, *args_gpu, backend="triton")
        ref = render_vp_reference(cpu, v, *args_cpu)
        equal = bool(torch.equal(out.cpu(), ref))
        s, _ = _median_s(lambda v=v: render_vp(gpu, v, *args_gpu, backend="triton"), sync)
        row["vp"].append({"vp_type": v, "gpu_ms": s * 1e3, "gpu_frames_per_s": n / s,
                          "equal_cpu_reference": equal,
                          "max_abs_diff": int((out.cpu().int() - ref.int()).abs().max())})
        if not equal:
            problems.append(f"{path.name}: {v} on the GPU differs from the CPU reference")

    cpu_path = resize_frames(pyav.frames, MIN_PIXELS, MAX_PIXELS)
    gpu_out = render_vp(gpu, "darken", *args_gpu, backend="triton").cpu()
    if cpu_path.shape == gpu_out.shape:
        cpu_out = render_vp_reference(cpu_path, "darken", *vp_inputs(cpu_path))
        d = (gpu_out.int() - cpu_out.int()).abs().float()
        row.update(pipeline_mean_abs_diff=float(d.mean()), pipeline_max_abs_diff=float(d.max()))
    return row, problems


def run(ctx) -> tuple[str, str | None]:
    from visioncoach.data.dali import dali_gpu_available

    if not dali_gpu_available():
        return "failed", "DALI cannot decode on the GPU here (dali_gpu_available() is False)"
    if not videos():
        return "failed", f"no videos in {VIDEOS}"
    ctx.numbers = {"nframes": NFRAMES, "key_times": list(KEY_TIMES), "max_pixels": MAX_PIXELS,
                   "repeats": REPEATS, "videos": []}
    problems = []
    for path in videos():
        try:
            row, bad = check_video(path)
        except Exception as exc:   # noqa: BLE001 - one video failing must not hide the other
            import traceback

            traceback.print_exc()
            row, bad = {"video": path.name, "error": f"{type(exc).__name__}: {exc}"[:300]}, [row_error(path, exc)]
        ctx.numbers["videos"].append(row)
        problems += bad
        ctx.save()
    return ("failed", "; ".join(problems)) if problems else ("passed", None)


def row_error(path: Path, exc: BaseException) -> str:
    return f"{path.name}: {type(exc).__name__}: {exc}"[:300]
