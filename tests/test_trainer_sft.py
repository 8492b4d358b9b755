"""SFT stage: fused-LM-head loss equals the plain one, training reduces it, checkpoints are
atomic and resuming continues exactly, non-finite steps are skipped then stop the run."""

import json

import pytest
import torch

from visioncoach.config import DataConfig, load_config
from visioncoach.data.stgr import load_stgr
from visioncoach.data.synthetic import generate
from visioncoach.models.tiny import build_tiny_model
from visioncoach.trainer import checkpoint as ckpt_mod
from visioncoach.trainer import harness
from visioncoach.trainer import sft as sft_mod
from visioncoach.trainer.sft import SFTRunner, build_sft_example, target_logprobs
from visioncoach.utils.dist import DistInfo
from shared_data import VIDEOS  # noqa: E402


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return load_stgr(generate(tmp_path_factory.mktemp("syn"), n=6, seed=5), sft=True)


def _cfg(**over):
    args = [f"--{k}={v}" for k, v in {"data.num_workers": 0, "data.nframes": 2, "optim.sft_steps": 4,
                                       "log.checkpoint_every": 2, "optim.sft_lr": 1e-3, **over}.items()]
    return load_config(args)


def _runner(cfg, dataset, tokenizer, out_dir, seed=0, processor=None, model=None):
    torch.manual_seed(seed)
    model = build_tiny_model(seed=seed) if model is None else model
    info = DistInfo(0, 1, 0, torch.device("cpu"), None)
    return SFTRunner(cfg, info, model, tokenizer, dataset, out_dir, processor=processor)


def test_fused_target_logprobs_equal_plain_logits(dataset, tokenizer):
    from visioncoach.data.loader import ClipDataset

    model = build_tiny_model(seed=1)
    sample = ClipDataset(dataset, nframes=2)[0]
    ex = build_sft_example(sample, tokenizer, DataConfig(min_pixels=3136, max_pixels=12544),
                           torch.device("cpu"))
    ours = target_logprobs(model, ex)                                             # [1, Tt]
    logits = model(**ex.tensors).logits.float()                                   # [1, L, V]
    ref = torch.log_softmax(logits[:, ex.target_start - 1:-1], -1).gather(
        -1, ex.tensors["input_ids"][:, ex.target_start:, None])[..., 0]
    assert ours.shape == ref.shape and ours.shape[1] > 10
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-5)
    # The target is the reference reasoning followed by <|im_end|>.
    tail = tokenizer.decode(ex.tensors["input_ids"][0, ex.target_start:])
    assert tail.startswith("<think>") and tail.endswith("</answer><|im_end|>")


def test_sft_reduces_loss_and_writes_metrics(dataset, tokenizer, tmp_path):
    r = _runner(_cfg(**{"optim.sft_steps": 6}), dataset, tokenizer, tmp_path)
    hist = r.run()
    assert [m["step"] for m in hist] == list(range(1, 7))
    assert hist[-1]["loss"] < hist[0]["loss"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 6 and {"tokens_per_s", "time_forward_s", "time_backward_optim_s", "peak_mem_gb", "lr", "grad_norm"} <= set(lines[0])
    assert ckpt_mod.latest_checkpoint(tmp_path / "checkpoints" / "sft").name == "step-00000006"
    # Saved at 2, 4, 6; log.keep_checkpoints = 2 keeps the newest two.
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "sft").iterdir()) == [
        "latest", "step-00000004", "step-00000006"]


def test_resume_continues_exactly(dataset, tokenizer, tmp_path):
    straight = _runner(_cfg(), dataset, tokenizer, tmp_path / "a")
    straight.run()
    first = _runner(_cfg(**{"optim.sft_steps": 4}), dataset, tokenizer, tmp_path / "b")
    first.steps = 2  # "killed" after step 2 (its checkpoint is written at step 2)
    first.run()
    resumed = _runner(_cfg(), dataset, tokenizer, tmp_path / "b", seed=123)  # other init: must be overwritten
    resumed.maybe_resume("auto")
    assert resumed.step == 2
    resumed.run()
    for (name, a), (_, b) in zip(straight.model.named_parameters(), resumed.model.named_parameters()):
        assert torch.equal(a, b), name
    # The saved model loads with transformers.
    from transformers import Qwen2_5_VLForConditionalGeneration

    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        ckpt_mod.latest_checkpoint(tmp_path / "b" / "checkpoints" / "sft") / "model")
    assert torch.equal(m.lm_head.weight, resumed.model.lm_head.weight)


def test_crash_mid_save_keeps_previous_checkpoint(dataset, tokenizer, tmp_path, monkeypatch):
    r = _runner(_cfg(), dataset, tokenizer, tmp_path)
    r.steps = 2
    r.run()
    good = ckpt_mod.latest_checkpoint(tmp_path / "checkpoints" / "sft")
    real_save = torch.save

    def crash(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.torch, "save", crash)
    r.steps = 4
    with pytest.raises(OSError, match="disk full"):
        r.run()
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    assert ckpt_mod.latest_checkpoint(tmp_path / "checkpoints" / "sft") == good
    assert sorted(p.name for p in (tmp_path / "checkpoints" / "sft").iterdir()) == ["latest", good.name]


def test_non_finite_steps_are_skipped_then_stop(dataset, tokenizer, tmp_path, monkeypatch):
    r = _runner(_cfg(**{"optim.max_nonfinite_steps": 2, "log.checkpoint_every": 100}), dataset,
                tokenizer, tmp_path)
    before = [p.detach().clone() for p in r.model.parameters()]
    monkeypatch.setattr(sft_mod, "sft_loss", lambda model, ex: (
        sum(p.sum() for p in model.parameters()) * float("nan"), 1))
    with pytest.raises(harness.NonFiniteError, match="optim.max_nonfinite_steps"):
        r.run()
    assert all(torch.equal(a, b) for a, b in zip(before, r.model.parameters()))
    assert not (tmp_path / "checkpoints" / "sft").exists()  # never a NaN checkpoint




def test_checkpoint_is_a_model_folder_that_infer_takes(dataset, tokenizer, processor, tmp_path, capsys):
    """The checkpoint's model folder is a complete from_pretrained folder (weights, generation
    config, the training processor's pixel bounds, the tokenizer with its chat template), and
    infer takes the run, stage, step or model folder, printing what it resolved."""
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

    from visioncoach.infer import main as infer_main

    run = tmp_path / "run"
    r = _runner(_cfg(**{"optim.sft_steps": 4}), dataset, tokenizer, run, processor=processor)
    r.run()
    stage = run / "checkpoints" / "sft"
    step = stage / "step-00000004"
    folder = step / "model"
    m = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    assert torch.equal(m.lm_head.weight, r.model.lm_head.weight)
    assert (m.generation_config.eos_token_id, m.generation_config.pad_token_id) == (151645, 151643)
    p = AutoProcessor.from_pretrained(folder, local_files_only=True)
    for sub in (p.image_processor, p.video_processor):
        assert (sub.size.shortest_edge, sub.size.longest_edge) == (3136, 12544)   # the training bounds
    assert p.tokenizer("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert p.tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|image_pad|>", "<|video_pad|>"]) == [
        151652, 151655, 151656]
    chat = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What is held?"}]}]
    assert p.tokenizer.chat_template == tokenizer.chat_template
    assert p.apply_chat_template(chat, add_generation_prompt=True) == processor.apply_chat_template(
        chat, add_generation_prompt=True)

    args = ["--video", str(VIDEOS / "cup.mp4"), "--question", "What is held?", "--out", str(tmp_path / "infer"),
            "--nframes", "2", "--max-pixels", "3136", "--max-new-tokens", "4", "--device", "cpu"]
    older = stage / "step-00000002"
    for path, said in [(run, f"run folder {run} (stage sft) -> stage folder {stage} (latest step-00000004)"),
                       (stage, f"stage folder {stage} (latest step-00000004)"),
                       (older, "checkpoint step-00000002"), (folder, "")]:
        assert infer_main(["--model", str(path)] + args) == 0
        [line] = [x for x in capsys.readouterr().out.splitlines() if x.startswith("model: ")]
        target = older / "model" if path == older else folder
        assert line.startswith(f"model: {said}") and line.endswith(f"model folder {target}"), line
    assert (tmp_path / "infer" / "cup_grounding.png").is_file()


# ---- loss.sft_answer_weight: the answer block's tokens weigh more in the SFT mean ----

def test_answer_token_weights_mark_exactly_the_answer_tokens(tokenizer):
    from visioncoach.trainer.sft import answer_token_weights

    text = ("<think><obj>circle</obj><box>[1, 2, 30, 40]</box>at<t>0.9</t>s</think>\n"
            "<answer>B. the blue one</answer><|im_end|>")
    ids, w = answer_token_weights(tokenizer, text, 7.5)
    assert ids == tokenizer(text, add_special_tokens=False).input_ids   # the same tokens
    heavy = [i for i, x in zip(ids, w) if x == 7.5]
    assert set(w) == {1.0, 7.5} and len(w) == len(ids)
    # The weighted tokens are one contiguous run that spells the answer and nothing past it.
    first = w.index(7.5)
    assert w[first:first + len(heavy)] == [7.5] * len(heavy)
    # Qwen's BPE joins ">B" into one token: it overlaps the answer, so it is weighted.
    assert tokenizer.decode(heavy) == ">B. the blue one"
    # No answer block (or an unclosed one): every token weighs 1.
    for t in ("<think>x</think>", "<think>x</think><answer>B"):
        assert set(answer_token_weights(tokenizer, t, 7.5)[1]) == {1.0}


def test_answer_weight_needs_a_fast_tokenizer():
    from visioncoach.trainer.sft import answer_token_weights

    class Slow:
        def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")  # transformers' words

    with pytest.raises(ValueError, match="loss.sft_answer_weight=3.0 needs a fast tokenizer"):
        answer_token_weights(Slow(), "<answer>A</answer>", 3.0)


@pytest.mark.parametrize("bad", ["0", "-1", "nan", "inf"])
def test_answer_weight_config_is_checked(bad):
    from visioncoach.config import ConfigError

    with pytest.raises(ConfigError, match="loss.sft_answer_weight"):
        load_config([f"--loss.sft_answer_weight={bad}"])


def test_weighted_sft_loss_is_the_weighted_token_mean(dataset, tokenizer):
    from visioncoach.data.loader import ClipDataset
    from visioncoach.trainer.sft import sft_loss

    model = build_tiny_model(seed=2)
    data_cfg = DataConfig(min_pixels=3136, max_pixels=12544)
    samples = [ClipDataset(dataset, nframes=2)[i] for i in (0, 3)]
    plain = [build_sft_example(s, tokenizer, data_cfg, torch.device("cpu")) for s in samples]
    heavy = [build_sft_example(s, tokenizer, data_cfg, torch.device("cpu"), 4.0) for s in samples]
    loss_plain, n_plain = sft_loss(model, plain)
    loss_heavy, n_heavy = sft_loss(model, heavy)
    nll, w = [], []
    for p, h in zip(plain, heavy):
        assert torch.equal(p.tensors["input_ids"], h.tensors["input_ids"])  # weights only
        nll.append(-target_logprobs(model, p)[0].double())
        w.append(h.weights[0].double())
        assert h.weight_sum == pytest.approx(float(h.weights.sum()))
        assert 1 <= int((h.weights == 4.0).sum()) < h.weights.numel() // 2
    nll, w = torch.cat(nll), torch.cat(w)
    assert n_plain == n_heavy == nll.numel()
    torch.testing.assert_close(loss_plain.double(), nll.mean(), rtol=1e-6, atol=0)
    torch.testing.assert_close(loss_heavy.double(), (w * nll).sum() / w.sum(), rtol=1e-6, atol=0)
    assert not torch.allclose(loss_heavy, loss_plain)
    # The gradient is the weighted one too (the weights are not detached away).
    loss_heavy.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())


def test_sft_runner_uses_the_configured_answer_weight(dataset, tokenizer, tmp_path, monkeypatch):
    seen = []
    real = sft_mod.build_sft_example

    def spy(sample, tok, data_cfg, device, answer_weight=1.0):
        seen.append(answer_weight)
        return real(sample, tok, data_cfg, device, answer_weight)

    monkeypatch.setattr(sft_mod, "build_sft_example", spy)
    r = _runner(_cfg(**{"optim.sft_steps": 1, "loss.sft_answer_weight": 5}), dataset, tokenizer, tmp_path)
    hist = r.run()
    assert seen and set(seen) == {5.0} and hist[-1]["loss"] is not None
