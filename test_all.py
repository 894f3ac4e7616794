"""The repository's one test file: a section per script, tiny configs, CPU only, no network.

Run it as the README says:  python -m pytest test_all.py -n 2 --dist worksteal   (pytest-xdist: two processes)
Sections (each imports its script as a module; nothing runs on import):
  1. videollama_mini.py   2. vit_caption.py   3. video_llava.py   4. mark1.py   5. attention_basics.py
Tests never assert on wall time; benchmarks print figures instead.
"""
import inspect
import json
import os
import random
import re
import socket
import subprocess
import sys
import types
import warnings
import zlib

import pytest
import torch

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
_shared_cache = os.path.join(ROOT, "..", "shared", "tiktoken_cache")
if "TIKTOKEN_CACHE_DIR" not in os.environ and os.path.isdir(_shared_cache):
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_shared_cache)
# Under `pytest -n N` (pytest-xdist) N processes share the cores: each takes its share of torch's threads, and so do
# the scripts it runs (with more, their threads spin-wait for the cores the others hold)
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    threads = max(1, torch.get_num_threads() // workers)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def run_script(script, *args, cwd=None, timeout=600):
    """Run `python <script> args...` as a user would; returns the CompletedProcess (stdout+stderr text)."""
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd or ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


def run_torchrun(script, *args):
    """`torchrun --nproc_per_node=2 <script> args...` on CPU (gloo), one thread per process, on a free port. Rarely
    (NOTES.md) a rank aborts with "terminate called without an active exception" as its process exits, after the
    work is done: a teardown crash inside PyTorch's C++ distributed code; and another process (the tests run two at
    a time) may take the free port before torchrun binds it. Only such a run is tried once more; the caller then
    checks the return code and every result of the run it gets."""
    for _ in range(2):
        with socket.socket() as sock:  # a free port: other runs may share this machine
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
               os.path.join(ROOT, script), *map(str, args)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
        if proc.returncode == 0 or not re.search("terminate called without an active exception|address already in "
                                                 "use", proc.stderr, re.I):
            return proc
    return proc


def assert_user_error(proc, *needles):
    """A user error: exit status 2, one clear line on stderr, no traceback, and it names the input."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    for n in needles:
        assert n in last, (n, last)


def main_user_error(main, capsys, argv, *needles):
    """main(argv) in-process ends as a user error: exit 2, one line on stderr naming the input, no traceback."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(list(map(str, argv)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err, err[-2000:]
    line = err.strip().splitlines()[-1]
    for n in needles:
        assert n in line, (n, line)


def resume_with_a_save_cut_off(main, monkeypatch, out):
    """--resume out_dir for one step and save, dying in torch.save: the new weights are written and the new
    train_state.pt is not, as when a run is killed mid-save."""
    def killed(obj, path, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises((KeyboardInterrupt, SystemExit)):  # SystemExit(130): a main() that reports it in one line
        main(["--train", "--resume", "--out_dir", out, "--stop_after", "3"])
    monkeypatch.undo()


def save_file_dies_halfway(mod, monkeypatch):
    """mod.save_file writes part of the file, then fails: a full disk, or a kill halfway through the weights."""
    def dies(state, path):
        open(path, "wb").write(b"half a file")
        raise OSError("no space left on device")
    monkeypatch.setattr(mod, "save_file", dies)


def check_cut_off_video(mod, tmp_path, keep=0.5):
    """A 40-frame MJPG .avi loads; cut to `keep` of its bytes (a half, or 0.8: about 30 frames, more than half but
    short of 90%), it still opens and decodes its first part without an error, and mod.load_video refuses it naming
    the frame count."""
    avi = tmp_path / "clip.avi"
    w = cv2.VideoWriter(str(avi), cv2.VideoWriter_fourcc(*"MJPG"), 8, (32, 32))
    for t in range(40):
        w.write(np.random.default_rng(t).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    w.release()
    mod.load_video(str(avi), 4, 16)
    avi.write_bytes(avi.read_bytes()[:int(avi.stat().st_size * keep)])
    with pytest.raises(mod.UserError, match=r"clip\.avi: only \d+ of the 40 frames in its header decode"):
        mod.load_video(str(avi), 4, 16)


def check_val_column(stdout, eval_interval, max_steps):
    """The training log shows the validation loss only on the steps where it was measured, `-` elsewhere."""
    rows = re.findall(r"^step (\d+)/\d+ \| loss \S+ \| val (\S+) \|", stdout, re.M)
    assert len(rows) >= 3, stdout[-2000:]
    for n, v in rows:
        measured = int(n) % eval_interval == 0 or int(n) == max_steps
        assert (v != "-") == measured, (n, v)
        assert v == "-" or float(v) > 0


def check_autocast_auto(mod, monkeypatch):
    """--dtype auto: bfloat16 only where the hardware multiplies in it (a CPU with AVX512-BF16 or AMX, a CUDA GPU of
    compute capability 8+), else float32; an explicit dtype is kept. The CPU's instruction sets and CUDA are faked."""
    assert mod.Config().dtype == "auto"
    for avx512, amx, want in ((True, False, "bfloat16"), (False, True, "bfloat16"), (False, False, "float32")):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert mod.autocast_dtype("auto", "cpu") == want
        assert mod.autocast_dtype("float32", "cpu") == "float32" and mod.autocast_dtype("bfloat16", "cpu") == "bfloat16"
        assert mod.autocast_dtype("auto", "mps") == "float32"
    asked = []
    for major, want in ((7, "float32"), (8, "bfloat16"), (9, "bfloat16")):  # V100/T4 emulate it; Ampere on have it
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, m=major: asked.append(d) or (m, 0))
        assert mod.autocast_dtype("auto", "cuda:1") == want and asked[-1] == "cuda:1"
    for native, want in ((False, torch.float32), (True, torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=native: v)
        with mod.autocast("auto" if mod.__name__ == "video_llava" else mod.Config(dtype="auto"), "cpu"):
            assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == want  # the chosen dtype really runs


def check_float16_scales_the_loss(train, cfg, monkeypatch):
    """--dtype float16 trains through a GradScaler that scales the loss and takes the optimizer step (small float16
    gradients underflow to 0 without one)."""
    made = []

    class Spy(torch.amp.GradScaler):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.calls = set()
            made.append(self)

        def scale(self, outputs):
            self.calls.add("scale")
            return super().scale(outputs)

        def step(self, optimizer, *a, **k):
            self.calls.add("step")
            return super().step(optimizer, *a, **k)

    monkeypatch.setattr(torch.amp, "GradScaler", Spy)
    train(cfg)
    assert made and made[0].is_enabled() and made[0].calls == {"scale", "step"}


def check_log_eta_in_whole_seconds(mod, cfg, draw_name, monkeypatch, capsys):
    """The log's eta is rounded to whole seconds before it is split into minutes and seconds: 59.7 s left reads
    1m00s, not 0m60s. A fake clock: each step draws its batch once (draw_name) and takes 14.925 s; four of the six
    steps are left after step 2. The save after step 2's validation takes 1000 s, which a step's ms leaves out."""
    clock, draw, save = [0.0], getattr(mod, draw_name), mod.save_checkpoint

    def tick(f, seconds):  # f, called after the fake clock moves on by seconds
        def ticked(*a, **k):
            clock[0] += seconds
            return f(*a, **k)
        return ticked

    monkeypatch.setattr(mod, "time", types.SimpleNamespace(time=lambda: clock[0]))  # the script's clock only
    monkeypatch.setattr(mod, draw_name, tick(draw, 14.925))
    monkeypatch.setattr(mod, "save_checkpoint", tick(save, 1000.0))
    mod.train(dataclasses.replace(cfg, max_steps=6, stop_after=2, log_interval=2, eval_interval=2))
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("step 2/6"))
    assert "| 14925 ms |" in line and line.endswith("| eta 1m00s"), line


def check_auto_run_and_saved_dtype(mod, data_dir, out_dir):
    """mark1: a 1-step tiny --train under --dtype auto (the log names the dtype this machine gets), then a checkpoint
    whose config says "bfloat16" loads with bfloat16: a saved choice is kept as it was made."""
    proc = run_script(mod.__name__ + ".py", "--train", "--preset", "tiny", "--max_steps", "1", "--dtype", "auto",
                      "--data_dir", data_dir, "--out_dir", out_dir)
    assert proc.returncode == 0 and f"autocast {mod.autocast_dtype('auto', 'cpu')}" in proc.stdout, proc.stderr[-2000:]
    meta = json.load(open(out_dir / "config.json"))
    json.dump({**meta, "config": {**meta["config"], "dtype": "bfloat16"}}, open(out_dir / "config.json", "w"))
    assert mod.load_checkpoint(str(out_dir))[2].dtype == "bfloat16"


# ====================================================================================================================
# 1. videollama_mini.py
# ====================================================================================================================
import dataclasses
import os
import subprocess
import sys
import json
import math

import cv2
import numpy as np
import pytest
import torch

import videollama_mini as vm


def _vm_cfg(tmp, **kw):
    """The tiny preset, writing under tmp; dropout off unless a test wants it."""
    base = dict(vm.PRESETS["tiny"], data_dir=str(tmp / "data"), out_dir=str(tmp / "out"), dropout=0.0)
    return vm.Config(**{**base, **kw})


def _vm_model(mode="queries", vocab=23, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = vm.Config(**{**vm.PRESETS["tiny"], "dropout": 0.0, "qformer_mode": mode, **kw})
    return vm.VideoLLaMAMini(cfg, vocab).eval(), cfg


def _vm_video(b, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, cfg.n_frames, cfg.img_size, cfg.img_size, 3), generator=g, dtype=torch.uint8)


def _vm_weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("mode", ["queries", "text"])
def test_vm_shapes_for_several_frame_counts(mode):
    for frames in (1, 3, 4, 7):
        model, cfg = _vm_model(mode, n_frames=frames)
        video, idx = _vm_video(2, cfg), torch.randint(0, 23, (2, 5))
        memory = model.encode(video)
        assert memory.shape == ((2, cfg.n_query, cfg.d_model) if mode == "queries" else (2, frames, cfg.d_model))
        logits, loss = model(video, idx, idx)
        assert logits.shape == (2, 5, 23) and torch.isfinite(loss)


@pytest.mark.parametrize("mode", ["queries", "text"])
def test_vm_causal_mask(mode):
    model, cfg = _vm_model(mode)
    video, idx = _vm_video(1, cfg), torch.randint(0, 23, (1, 8))
    changed = idx.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 23
    a, _ = model(video, idx)
    b, _ = model(video, changed)
    assert torch.equal(a[:, :5], b[:, :5])  # earlier positions never see a later token
    assert not torch.allclose(a[:, 5:], b[:, 5:])


def test_vm_motion_reaches_the_memory():
    """Reversing time must change the video's memory: the model can tell left from right."""
    model, cfg = _vm_model()
    video = _vm_video(1, cfg)
    assert not torch.allclose(model.encode(video), model.encode(video.flip(1)))


@pytest.mark.parametrize("mode", ["queries", "text"])
def test_vm_init_from_data_whitens_the_memory_across_clips(mode):
    """After the data-dependent init the memory is zero-mean, unit-std across the clips it was fitted on (per feature
    over clips and frames for "text", per query and feature for "queries"), and the model is still a per-clip function: a clip gives the same memory alone."""
    model, cfg = _vm_model(mode)
    video = _vm_video(64, cfg, seed=9)
    video[:, :, :, :, :] = 60  # a grey background (the synthetic world's) ...
    video[:, :, 4:8, 4:8] = _vm_video(64, cfg, seed=10)[:, :, 4:8, 4:8]  # ... with a small coloured patch per clip
    before = model.encode(video)
    model.init_from_data(video)
    mem = model.encode(video)
    assert before.std(0).mean() < 0.5 * before.std()  # the problem it solves: clips look alike at random init
    dims = (0,) if mode == "queries" else (0, 1)  # per query and feature; per feature over clips and frames
    torch.testing.assert_close(mem.mean(dims), torch.zeros_like(mem.mean(dims)), atol=1e-4, rtol=0)
    torch.testing.assert_close(mem.std(dims).mean(), torch.tensor(1.0), atol=2e-2, rtol=0)
    torch.testing.assert_close(model.encode(video[3:4]), mem[3:4], atol=1e-5, rtol=1e-5)


def test_vm_overfits_one_batch():
    model, cfg = _vm_model(vocab=19)
    model.train()
    video, idx = _vm_video(4, cfg), torch.randint(1, 19, (4, 9))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(150):
        _, loss = model(video, idx[:, :-1], idx[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05, loss.item()


@pytest.mark.parametrize("mode", ["queries", "text"])
def test_vm_cache_equals_no_cache_and_batch_equals_rows(mode):
    model, cfg = _vm_model(mode, seed=3)
    cfg = dataclasses.replace(cfg, max_new_tokens=12)
    video = _vm_video(3, cfg, seed=1)
    cached = vm.generate(model, video, cfg, use_cache=True)
    assert cached == vm.generate(model, video, cfg, use_cache=False)
    assert cached == [vm.generate(model, video[i:i + 1], cfg)[0] for i in range(3)]
    # the cached logits themselves, step by step, equal a full re-run
    memory, cache = model.encode(video), [{} for _ in model.decoder]
    seq = torch.randint(0, 23, (3, 6))
    full = model.decode(seq, memory)
    steps = torch.cat([model.decode(seq[:, t:t + 1], memory, cache, pos=t) for t in range(6)], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


def test_vm_beam_search_batch_equals_rows_and_finds_a_likely_caption():
    """A batch equals its rows; on a 4-token vocabulary and 3 steps, beam search (wide enough to be exhaustive) returns
    the caption that maximises log p / length over every caption brute force enumerates."""
    model, cfg = _vm_model(seed=5)
    cfg = dataclasses.replace(cfg, beam=3, max_new_tokens=8)
    video = _vm_video(3, cfg, seed=2)
    beams = vm.generate(model, video, cfg)
    assert beams == [vm.generate(model, video[i:i + 1], cfg)[0] for i in range(3)]
    small, cfg = _vm_model(vocab=4, seed=7)  # a model whose greedy caption (1 3 2) is not the likeliest (2 2)
    clip = _vm_video(1, cfg, seed=2)

    def score(ids):  # log p(ids, EOS | BOS) / (len(ids) + 1), what a finished hypothesis scores
        seq = torch.tensor([[vm.BOS] + ids + [vm.EOS]])
        with torch.no_grad():
            logp = small.decode(seq[:, :-1], small.encode(clip))[0].double().log_softmax(-1)
        return sum(logp[i, t].item() for i, t in enumerate(seq[0, 1:].tolist())) / len(seq[0, 1:])
    cands = [[]] + [[a] for a in (1, 2, 3)] + [[a, b] for a in (1, 2, 3) for b in (1, 2, 3)]
    assert vm.generate(small, clip, dataclasses.replace(cfg, beam=16, max_new_tokens=3))[0] == max(cands, key=score)


class _VmStub(torch.nn.Module):
    """A decoder whose next-token log-probabilities depend only on the last token: from BOS, A 0.5 / B 0.4 / EOS 0.1;
    after A, A/B/C equally likely (it never ends); after B, EOS 0.9. Greedy says "A A A ...", the most likely
    caption is "B" (0.4 x 0.9 = 0.36)."""
    decoder = [None]  # one layer, for the cache list

    def encode(self, video):
        return torch.zeros(video.shape[0], 1, 1)

    def decode(self, idx, memory, cache=None, pos=0, last_only=False):
        cache[0]["k"] = cache[0]["v"] = torch.zeros(idx.shape[0], 1)  # re-ordered by beam search
        table = torch.tensor([[0.1, 0.5, 0.4, 1e-6], [1e-6, 1 / 3, 1 / 3, 1 / 3], [0.9, 0.05, 0.05, 1e-6],
                              [1e-6, 1 / 3, 1 / 3, 1 / 3]]).log()
        return table[idx[:, -1]][:, None]  # (B, 1, V)


class _VmHistoryStub(torch.nn.Module):
    """A decoder whose next token depends on the whole caption so far, kept (as its "keys") in the cache that beam
    search re-orders. From BOS: A 0.5, B 0.4; after A: C 0.4; after B: C 0.9 (the beams swap rows); after A C: EOS 0.01,
    after B C: EOS 0.9. The likeliest caption is "B C" (0.4 x 0.9 x 0.9)."""
    decoder = [None]

    def encode(self, video):
        return torch.zeros(video.shape[0], 1, 1)

    def decode(self, idx, memory, cache=None, pos=0, last_only=False):
        past = cache[0].get("k", idx[:, :0])
        cache[0]["k"] = cache[0]["v"] = seen = torch.cat([past, idx], 1)  # (rows, 1 + t): BOS and the tokens so far
        table = {1: [0.1, 0.5, 0.4, 1e-6], 2: [0.1, 0.3, 0.2, 0.4], 3: [0.05, 0.025, 0.025, 0.9]}
        rows = [table[1] if len(h) == 1 else table[1 + h[1]] if len(h) == 2 else
                [0.9, 0.05, 0.03, 0.02] if h[1] == 2 else [0.01, 0.33, 0.33, 0.33] for h in seen.tolist()]
        return torch.tensor(rows).log()[:, None]  # (rows, 1, V)


class _VmEndsFirstStub(torch.nn.Module):
    """A decoder that reads one flag per clip: a clip whose pixels are 0 ends at once (EOS at the first step, then A if
    asked again); any other clip says A at every step and never ends."""
    decoder = [None]

    def encode(self, video):
        return video[:, :1, :1, 0, 0].float()  # (B, 1, 1): the clip's flag

    def decode(self, idx, memory, cache=None, pos=0, last_only=False):
        cache[0]["k"] = cache[0]["v"] = torch.zeros(idx.shape[0], 1)  # re-ordered by beam search
        ends = (memory[:, 0, 0] == 0) & (pos == 0)  # (B,)
        logits = torch.tensor([[0.0, 1.0, -1.0, -1.0]]).repeat(idx.shape[0], 1)  # A
        logits[ends] = torch.tensor([1.0, 0.0, -1.0, -1.0])  # EOS
        return logits[:, None]  # (B, 1, V)


def test_vm_a_row_that_ended_stays_ended_in_a_batch():
    """Once a row has emitted EOS it only pads with EOS while the other rows go on, so its caption is what it would be
    alone: the row that ends first returns an empty caption, not the tokens decoded after its end. Beam search gives
    each clip's beams that clip's own video, so a batch of clips that decode differently equals its rows too."""
    video = torch.zeros(2, 4, 8, 8, 3, dtype=torch.uint8)
    video[1] = 1
    cfg = vm.Config(**{**vm.PRESETS["tiny"], "max_new_tokens": 3})
    assert vm.generate(_VmEndsFirstStub(), video, cfg) == [[], [1, 1, 1]]
    assert [vm.generate(_VmEndsFirstStub(), video[i:i + 1], cfg)[0] for i in range(2)] == [[], [1, 1, 1]]
    beam = dataclasses.replace(cfg, beam=2)
    rows = [vm.generate(_VmEndsFirstStub(), video[i:i + 1], beam)[0] for i in range(2)]
    assert rows[0] == [] and rows[1] != [] and vm.generate(_VmEndsFirstStub(), video, beam) == rows


def test_vm_sampling_follows_the_temperature():
    """The first token is drawn from softmax(log p / temperature): at 2, the stub's 0.1 / 0.5 / 0.4 become their
    square roots, normalised (0.19 / 0.43 / 0.38)."""
    cfg = vm.Config(**{**vm.PRESETS["tiny"], "temperature": 2.0, "max_new_tokens": 1})
    rows = vm.generate(_VmStub(), torch.zeros(4000, 4, 8, 8, 3, dtype=torch.uint8), cfg,
                       generator=torch.Generator().manual_seed(0))
    share = torch.bincount(torch.tensor([r[0] if r else vm.EOS for r in rows]), minlength=4)[:3] / 4000.0
    want = torch.tensor([0.1, 0.5, 0.4]).sqrt()
    assert torch.allclose(share, want / want.sum(), atol=0.025), share


def test_vm_beam_search_reorders_the_cache_with_its_beams():
    stub, video = _VmHistoryStub(), torch.zeros(1, 4, 8, 8, 3, dtype=torch.uint8)
    cfg = vm.Config(**{**vm.PRESETS["tiny"], "max_new_tokens": 4, "beam": 2})
    assert vm.generate(stub, video, cfg) == [[2, 3]]


def test_vm_beam_search_is_not_greedy_and_sampling_is_not_greedy():
    stub, video = _VmStub(), torch.zeros(1, 4, 8, 8, 3, dtype=torch.uint8)
    cfg = vm.Config(**{**vm.PRESETS["tiny"], "max_new_tokens": 6})
    assert vm.generate(stub, video, cfg) == [[1] * 6]  # greedy: A A A A A A
    assert vm.generate(stub, video, dataclasses.replace(cfg, beam=2)) == [[2]]  # beam: "B", the likely caption
    # sampling draws the first token with the model's probabilities (greedy would always give A)
    many = vm.generate(stub, video.expand(2000, -1, -1, -1, -1), dataclasses.replace(cfg, temperature=1.0,
                       max_new_tokens=1), generator=torch.Generator().manual_seed(0))
    share = [sum(r[:1] == [k] for r in many) / 2000 for k in (1, 2)]
    assert abs(share[0] - 0.5) < 0.05 and abs(share[1] - 0.4) < 0.05 and sum(r == [] for r in many) > 100, share


def test_vm_label_masking_pad_and_bos_never_count():
    """Targets are the inputs shifted by one: BOS is never a target, pads are -100, and the loss ignores them."""
    inp, tgt = vm.pad_batch([[vm.BOS, 5, 6, vm.EOS], [vm.BOS, 7, vm.EOS]])
    assert inp.tolist() == [[vm.BOS, 5, 6], [vm.BOS, 7, vm.EOS]]
    assert tgt.tolist() == [[5, 6, vm.EOS], [7, vm.EOS, -100]]
    model, cfg = _vm_model("text", vocab=9)
    video = _vm_video(2, cfg)
    _, loss = model(video, inp, tgt)
    logits, _ = model(video, inp)
    keep = tgt != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], tgt[keep])
    torch.testing.assert_close(loss, manual)
    changed = inp.clone()
    changed[1, 2] = 3  # the pad position's input changes nothing that counts
    torch.testing.assert_close(model(video, changed, tgt)[1], loss)


def test_vm_sampler_filters():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0, -1.0]])
    kept = torch.isfinite(vm.filter_logits(logits, top_k=2, top_p=1.0))
    assert kept.tolist() == [[False, True, True, False, False]]
    p = logits.softmax(-1)[0]  # sorted: 0.6364 (id 1), 0.2341 (id 2), 0.0861 (id 0), ...
    kept = torch.isfinite(vm.filter_logits(logits, top_k=0, top_p=0.5))[0]
    assert kept.tolist() == [False, True, False, False, False]  # the top token alone already holds 0.64 > 0.5
    kept = torch.isfinite(vm.filter_logits(logits, top_k=0, top_p=float(p[1] + p[2]) + 1e-3))[0]
    assert kept.tolist() == [True, True, True, False, False]
    kept = torch.isfinite(vm.filter_logits(logits, top_k=0, top_p=0.0))[0]  # an empty nucleus keeps the top token
    assert kept.tolist() == [False, True, False, False, False]
    # seeded sampling is reproducible; temperature sampling with top_k=1 is greedy
    model, cfg = _vm_model(seed=4)
    video = _vm_video(2, cfg)
    hot = dataclasses.replace(cfg, temperature=1.0, max_new_tokens=6)
    a = vm.generate(model, video, hot, generator=torch.Generator().manual_seed(7))
    b = vm.generate(model, video, hot, generator=torch.Generator().manual_seed(7))
    assert a == b
    greedy = vm.generate(model, video, dataclasses.replace(cfg, max_new_tokens=6))
    top1 = vm.generate(model, video, dataclasses.replace(hot, top_k=1), generator=torch.Generator().manual_seed(1))
    assert top1 == greedy


def test_vm_metrics_hand_computed():
    refs = [["a red circle moves left", "a red circle goes left"], ["a blue square moves up"]]
    assert vm.exact_match(["A red circle goes left.", "a blue square moves down"], refs) == 0.5
    # punctuation is dropped before scoring, as COCO's caption evaluation does: "circle," is the word "circle"
    assert vm.exact_match(["A red circle, moves left!"], refs[:1]) == 1.0
    assert vm.bleu4(["a red circle, moves left"], refs[:1]) == pytest.approx(1.0)
    assert vm.bleu4(["a red circle moves left", "a blue square moves up"], refs) == pytest.approx(1.0)
    # hyp "a red circle moves" vs refs above (1 pair): 1-4 gram precisions 4/4, 3/3, 2/2, 1/1; closest ref length 5
    assert vm.bleu4(["a red circle moves"], refs[:1]) == pytest.approx(math.exp(1 - 5 / 4))
    # 2-gram precision 3/4 for "a red circle goes up": a red, red circle, circle goes (not goes up), ...
    h = "a red circle goes up"
    p = [4 / 5, 3 / 4, 2 / 3, 1 / 2]
    assert vm.bleu4([h], refs[:1]) == pytest.approx(math.exp(sum(map(math.log, p)) / 4))
    assert vm.bleu4(["purple"], refs[:1]) == 0.0
    # captions under four words have no 4-grams: the orders they have are scored (it was 0 for an exact corpus)
    assert vm.bleu4(["a red patch", "a blue"], [["a red patch"], ["a blue"]]) == pytest.approx(1.0)
    assert vm.bleu4(["a red"], [["a red patch"]]) == pytest.approx(math.exp(1 - 3 / 2))
    # CIDEr-D: with a single evaluated clip every n-gram has IDF log(1/1) = 0, so the score is 0 whatever the text;
    # with two clips, a caption equal to its only reference scores exactly 10 (cosine 1, no length penalty).
    assert vm.cider_d(["a red circle moves left"], refs[:1]) == 0.0
    two = [["a red circle moves left"], ["a blue square moves up"]]
    assert vm.cider_d(["a red circle moves left", "a blue square moves up"], two) == pytest.approx(10.0)
    assert vm.cider_d(["a red circle moves left", "a red circle moves left"], two) == pytest.approx(5.0)
    # brevity penalty: a 4-word hypothesis between references of 3 and 5 words takes the shorter one (no penalty)
    assert vm.bleu4(["a red circle moves"], [["a red circle", "a red circle moves left"]]) == pytest.approx(1.0)
    # clipping uses the largest count in any one reference, never the sum over references: a caption said twice,
    # against two copies of it, matches each n-gram only as often as one copy holds it
    p = [5 / 10, 4 / 9, 3 / 8, 2 / 7]
    assert vm.bleu4(["a red circle moves left a red circle moves left"], [["a red circle moves left"] * 2]) == \
        pytest.approx(math.exp(sum(map(math.log, p)) / 4))
    # CIDEr-D clips the hypothesis' counts at the reference's: "red red" vs "red circle" (IDF log 2 for every n-gram)
    # has unigram cosine min(2, 1) * 1 / (2 * sqrt(2)), no bigram in common; the second clip is exact (unigram and
    # bigram cosine 1); each clip's sum is averaged over the 4 orders, x10
    got = vm.cider_d(["red red", "blue square"], [["red circle"], ["blue square"]])
    assert got == pytest.approx((10 * (1 / (2 * math.sqrt(2))) / 4 + 10 * 2 / 4) / 2)


def test_vm_tokenizer_round_trip():
    """encode wraps a caption in BOS/EOS (model id 0, <|endoftext|>) over the compact table; decode drops them and
    gives the caption back, so no "<|endoftext|>" text ever reaches a prediction."""
    caps = ["a red circle moves left", "a blue square goes up"]
    tok = vm.Tokenizer.from_captions(caps)
    for c in caps:
        ids = tok.encode(c)
        assert ids[0] == ids[-1] == vm.EOS == vm.BOS and vm.EOS not in ids[1:-1]
        assert tok.decode(ids) == c


def test_vm_training_clips_keep_novel_pairs_out():
    """No training, val or test clip shows a held-out (colour, shape) pair, not even beside a seen one, and every
    novel clip shows at least one: the novel split measures combinations the model never saw."""
    rng = random.Random(0)
    for split in ("train", "val", "test", "novel"):
        for _ in range(200):
            pairs = [(c, s) in vm.NOVEL_PAIRS for c, s, *_ in vm.sample_objects(rng, split)]
            assert any(pairs) == (split == "novel"), (split, pairs)


def test_vm_sample_indices():
    assert vm.sample_indices(16, 4) == [2, 6, 10, 14]
    assert vm.sample_indices(2, 4) == [0, 0, 1, 1]  # short clips repeat frames
    with pytest.raises(vm.UserError):
        vm.sample_indices(0, 4)


def test_vm_frame_encoder_ignores_each_frame_s_mean_colour():
    """Each frame's mean colour is subtracted first: a uniform tint of one frame (another background grey, a
    brighter shot) changes nothing, so the small objects carry the signal."""
    model, cfg = _vm_model()
    x = vm.to_unit(_vm_video(2, cfg))  # (B, F, 3, S, S)
    tint = torch.zeros(2, cfg.n_frames, 3, 1, 1)
    tint[:, 1] = torch.tensor([0.3, -0.2, 0.1]).view(3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.frames(x + tint), model.frames(x), atol=1e-5, rtol=1e-5)


def test_vm_to_unit_keeps_rows_and_columns():
    """uint8 (B, F, S, S, 3) becomes channels-first (B, F, 3, S, S) in [-1, 1] with the pixel at row y, column x still
    at [..., y, x]: a transposed frame would read left/right motion as up/down, and a saved model would see its
    training frames turned on their side."""
    video = torch.zeros(1, 2, 4, 4, 3, dtype=torch.uint8)
    video[0, 1, 1, 3] = torch.tensor([255, 0, 51], dtype=torch.uint8)  # row 1, column 3 of the second frame
    x = vm.to_unit(video)
    assert x.shape == (1, 2, 3, 4, 4)
    torch.testing.assert_close(x[0, 1, :, 1, 3], torch.tensor([1.0, -1.0, 51 / 127.5 - 1]))
    assert (x[0, 1, :, 3, 1] == -1).all() and (x[0, 0] == -1).all()


def test_vm_frame_difference_channels_are_the_change_from_the_previous_frame():
    """The CNN's last three input channels are frame t less frame t-1 (each less its mean colour), zero for the first
    frame: the motion between neighbouring frames, not the drift since the clip began."""
    model, cfg = _vm_model()
    video, seen = _vm_video(2, cfg), []
    model.frames.cnn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    with torch.no_grad():
        model.frames(vm.to_unit(video))
    x = vm.to_unit(video)
    x = x - x.mean((-2, -1), keepdim=True)  # (B, F, 3, S, S)
    diff = seen[0].unflatten(0, (2, cfg.n_frames))[:, :, 3:]  # (B, F, 3, S, S)
    assert (diff[:, 0] == 0).all()
    for t in range(1, cfg.n_frames):
        torch.testing.assert_close(diff[:, t], x[:, t] - x[:, t - 1])


@pytest.mark.parametrize("mode", ["queries", "text"])
def test_vm_frame_order_reaches_the_memory_without_frame_differences(mode):
    """The temporal encoder and the Q-Former are blind to order; the sinusoidal time code per frame is what tells the
    frames apart when there is no frame-difference channel (more than float noise: without it the frames are a set)."""
    model, cfg = _vm_model(mode, frame_diff=False)
    video = _vm_video(1, cfg)
    with torch.no_grad():
        a, b = model.encode(video), model.encode(video.flip(1))
    assert (a - (b if mode == "queries" else b.flip(1))).abs().max() > 1e-2


def test_vm_model_cast_to_another_dtype_generates():
    """A model cast as a whole (.to(torch.bfloat16), .half(), .double()) reads its frames in its own dtype: the uint8
    frames became float32 whatever the weights were, a dtype error in the first convolution."""
    cfg = vm.Config(**vm.PRESETS["tiny"])
    model, video = vm.VideoLLaMAMini(cfg, 12), _vm_video(2, cfg)
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        assert all(len(ids) <= cfg.max_new_tokens for ids in vm.generate(model.to(dtype), video, cfg))


def test_vm_bad_flags_are_refused_by_parse_args(capsys):
    """Each bad value is refused in one line naming the flag, before any data or model is made."""
    for argv, needle in ((["--cnn_width", "4"], "--cnn_width"), (["--n_head", "3", "--d_model", "32"], "--d_model 32"),
                         (["--n_head", "0"], "--n_head"), (["--n_frames", "0"], "--n_frames"),
                         (["--batch_size", "0"], "--batch_size"), (["--temperature", "-1"], "--temperature"),
                         (["--temperature", "1", "--top_p", "0"], "--top_p 0.0: must be in (0, 1]"), (["--top_p", "1.5"], "--top_p"), (["--dtype", "half"], "--dtype"),
                         (["--device", "xyz"], "--device xyz"), (["--device", "cuda:99"], "--device cuda:99"),
                         (["--img_size", "2"], "--img_size 2: must be at least 3")):  # GroupNorm of 1 value: a traceback
        main_user_error(vm.main, capsys, ["--train", "--data_dir", "/nonexistent/vm"] + argv, needle)
    main_user_error(vm.main, capsys, ["--generate"], "--generate and --video PATH")
    # flags that would be ignored: a preset where the checkpoint gives the sizes, a video without the mode that reads it
    for mode in (["--train", "--resume"], ["--eval"], ["--generate", "--video", "a.mp4"]):
        main_user_error(vm.main, capsys, mode + ["--preset", "tiny"], "--preset tiny", "checkpoint", "drop --preset")
    for mode in ([], ["--train"], ["--eval"]):
        main_user_error(vm.main, capsys, mode + ["--video", "a.mp4"], "--generate and --video PATH")
    assert vm.parse_args(["--temperature", "0.8", "--top_p", "0.9", "--d_model", "48", "--n_head", "3"])[1].top_p == 0.9
    assert vm.parse_args(["--train", "--eval", "--preset", "tiny"])[1].d_model < vm.Config().d_model  # one run: --train's
    main_user_error(vm.main, capsys, ["--train", "--eval", "--d_model", "30", "--data_dir", "/nonexistent/vm"], "--d_model 30")  # --train's checks too


def test_vm_bad_numbers_are_refused_by_parse_args(_vm_trained, tmp_path, capsys):
    """Counts, rates and ranges that would crash later (or train backwards) are refused in one line naming the flag;
    the smallest values that work pass, and --max_len 3 (BOS, one token, EOS) trains on one-word captions, evaluates
    and draws."""
    for flag, value in (("max_steps", "0"), ("n_dec_layer", "0"), ("n_qformer_layer", "0"), ("max_len", "1"),
                        ("dropout", "2"), ("lr", "-1"), ("lr", "nan"), ("min_lr", "inf"), ("max_new_tokens", "0"),
                        ("top_k", "-5"), ("stop_after", "-1"), ("warmup", "-1"), ("grad_clip", "-1"),
                        ("weight_decay", "-5"), ("n_temporal_layer", "-2")):
        main_user_error(vm.main, capsys, [f"--{flag}", value], f"--{flag} {value}")
    zero = ["--n_temporal_layer", "0", "--warmup", "0", "--top_k", "0", "--stop_after", "0", "--min_lr", "0",
            "--dropout", "0", "--weight_decay", "0", "--max_len", "2"]
    assert vm.parse_args(zero)[1].max_len == 2
    clip, ann = _vm_trained[0] / "data" / "train" / "00000.mp4", tmp_path / "words.txt"
    ann.write_text(f"{clip}\nred\n\n{clip}\nblue\n")
    vm.train(_vm_cfg(tmp_path, data=str(ann), test_data=str(ann), max_len=3, max_steps=2))
    assert (tmp_path / "out" / "attention.png").is_file()


def test_vm_mp4_round_trip_and_frame_folder(tmp_path):
    path = str(tmp_path / "clip.mp4")
    vm.write_clip(path, [("red", "square", "right", 20, 32)])
    clip = vm.load_video(path, 4, 32)  # (F, S, S, 3) RGB
    assert clip.shape == (4, 32, 32, 3) and clip.dtype == np.uint8
    # the red square (RGB ~ (230, 40, 40)) moves right: its red mass's centre of x grows frame by frame
    red = (clip[..., 0].astype(int) - clip[..., 2].astype(int)) > 100
    xs = [np.nonzero(f)[1].mean() for f in red]
    assert all(b > a for a, b in zip(xs, xs[1:])), xs
    # the same frames as PNG files in a folder give (nearly) the same clip: lossy mp4 aside, exactly the same pipeline
    cap, folder = cv2.VideoCapture(path), tmp_path / "frames"
    folder.mkdir()
    n = 0
    while True:
        ok, img = cap.read()
        if not ok:
            break
        cv2.imwrite(str(folder / f"{n}.png"), img)  # 0.png .. 15.png: read in natural order, 2 before 10
        n += 1
    assert np.array_equal(vm.load_video(str(folder), 4, 32), clip)
    # every image format OpenCV reads counts, in any case: a .webp or .TIFF frame is not skipped
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, ext in enumerate(("png", "webp", "PNG", "TIFF")):
        cv2.imwrite(str(mixed / f"f{i}.{ext}"), np.full((20, 20, 3), 50 * (i + 1), np.uint8))
    assert [int(f.mean()) for f in vm.load_video(str(mixed), 4, 8)] == [50, 100, 150, 200]
    # any resolution: a wide 1280x720 H.264-sized clip is centre-cropped and resized
    wide = str(tmp_path / "wide.mp4")
    w = cv2.VideoWriter(wide, cv2.VideoWriter_fourcc(*"mp4v"), 24, (1280, 720))
    for t in range(5):
        w.write(np.full((720, 1280, 3), 40 * t, np.uint8))
    w.release()
    assert vm.load_video(wide, 8, 32).shape == (8, 32, 32, 3)


def test_vm_frames_are_centre_cropped_to_a_square(tmp_path):
    """A wide or a tall frame keeps its middle square (what a person frames), not its left or top edge: here only the
    middle square is bright, so a frame cropped anywhere else would hold dark pixels."""
    for name, shape, middle in (("wide", (4, 10, 3), np.s_[:, 3:7]), ("tall", (10, 4, 3), np.s_[3:7, :])):
        folder = tmp_path / name
        folder.mkdir()
        img = np.zeros(shape, np.uint8)
        img[middle] = 200
        cv2.imwrite(str(folder / "0.png"), img)
        assert (vm.load_video(str(folder), 1, 4) == 200).all(), name


def test_vm_cut_off_jpeg_frame_and_video_are_refused(tmp_path):
    """A JPEG frame cut short (libjpeg would fill it with grey) and a half-copied MJPG .avi (it decodes its first part
    without an error) are refused naming the file; the intact files, and a JPEG with data after its end marker, load."""
    folder, img = tmp_path / "frames", np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    folder.mkdir()
    for i in range(3):
        cv2.imwrite(str(folder / f"{i}.jpg"), img)
    whole = (folder / "1.jpg").read_bytes()
    (folder / "1.jpg").write_bytes(whole + b"\x00\x00\x00\x18ftypmp42" + bytes(100))  # a motion photo: video after it
    assert vm.load_video(str(folder), 3, 16).shape == (3, 16, 16, 3)
    (folder / "1.jpg").write_bytes(whole[:len(whole) * 6 // 10])
    with pytest.raises(vm.UserError, match=r"1\.jpg: this image is cut off \(no end-of-image marker\)"):
        vm.load_video(str(folder), 3, 16)
    check_cut_off_video(vm, tmp_path)


def test_vm_transparent_frames_are_composited_onto_white(tmp_path):
    """A frame folder of RGBA PNGs (8- and 16-bit): transparent pixels become white, half-transparent ones blend with
    white, as transformers' convert_to_rgb does (OpenCV alone would show the hidden colour, here black)."""
    folder = tmp_path / "rgba"
    folder.mkdir()
    for i, alpha in enumerate((0, 128, 255)):
        bgra = np.zeros((12, 12, 4), np.uint8)
        bgra[..., 2], bgra[..., 3] = 200, alpha  # red under the given alpha
        cv2.imwrite(str(folder / f"{i}.png"), bgra)
    cv2.imwrite(str(folder / "3.png"), np.full((12, 12, 4), 257 * 128, np.uint16))  # 16-bit, mid grey at half alpha
    clip = vm.load_video(str(folder), 4, 12)  # (F, S, S, 3) RGB
    blend = lambda c, a: (c * a + 255 * (255 - a) + 127) // 255  # as the script composites
    want = [(255, 255, 255), (blend(200, 128), blend(0, 128), blend(0, 128)), (200, 0, 0), (blend(128, 128),) * 3]
    assert [tuple(f[0, 0]) for f in clip] == want and all((f == f[0, 0]).all() for f in clip)

def test_vm_annotations_and_bad_files(tmp_path):
    vm.write_clip(str(tmp_path / "a.mp4"), [("red", "square", "right", 20, 32)])
    good = tmp_path / "ann.txt"
    good.write_text("a.mp4\na red square moves right\na red square goes right\n\na.mp4\nsecond entry\n")
    entries = vm.read_annotations(str(good))  # the clip's two entries are one, with three references
    assert [len(c) for _, c in entries] == [3] and entries[0][0].endswith("a.mp4")
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + good.read_bytes())  # a UTF-8 byte-order mark
    assert vm.read_annotations(str(tmp_path / "bom.txt")) == entries
    (tmp_path / "joined.txt").write_bytes(2 * b"\xef\xbb\xbfa.mp4\none\n\n")  # two files with marks, joined by `cat`
    assert vm.read_annotations(str(tmp_path / "joined.txt")) == [(entries[0][0], ["one", "one"])]  # no mark in a path
    cases = {"missing.txt": ("a.mp4\ncaption\n\nnope.mp4\ncaption\n", "missing.txt:4", "nope.mp4"),
             "nocap.txt": ("a.mp4\ncaption\n\n\na.mp4\n", "nocap.txt:5", "no caption"),
             "empty.txt": ("\n\n", "no entries", ""), "latin1.txt": ("a.mp4\ncaf\xe9\n", "latin1.txt", "UTF-8"),
             # a missing blank line: the next entry's video path would be trained as a caption
             "merged.txt": ("a.mp4\ncaption\na.mp4\ncaption\n", "merged.txt:3: 'a.mp4' looks like a video path",
                            "put a blank line between entries"),
             "ext.txt": ("a.mp4\ncaption\n\na.mp4\ncaption\nclips/b.MOV\n", "ext.txt:6", "b.MOV"),
             "folder.txt": ("a.mp4\ncaption\nframes\ncaption\n", "folder.txt:3", "'frames' looks like a video path")}
    (tmp_path / "frames").mkdir()  # a folder of frames is a video too
    cv2.imwrite(str(tmp_path / "frames" / "0.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "cat").mkdir()  # a caption that names a folder of videos (one per class) is only a caption
    shutil.copy(tmp_path / "a.mp4", tmp_path / "cat" / "1.mp4")
    (tmp_path / "classes.txt").write_text("cat/1.mp4\na cat\ncat\n")
    assert vm.read_annotations(str(tmp_path / "classes.txt"))[0][1] == ["a cat", "cat"]
    for name, (text, *needles) in cases.items():
        (tmp_path / name).write_bytes(text.encode("latin-1"))  # latin1.txt: a byte that is not UTF-8
        with pytest.raises(vm.UserError) as e:
            vm.read_annotations(str(tmp_path / name))
        for n in needles:
            assert n in str(e.value), (name, str(e.value))


@pytest.fixture(scope="module")
def _vm_trained(tmp_path_factory):
    """One tiny --train run through the command line, shared by the tests below."""
    tmp = tmp_path_factory.mktemp("vm")
    proc = run_script("videollama_mini.py", "--train", "--preset", "tiny", "--data_dir", tmp / "data",
                      "--out_dir", tmp / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, proc


def test_vm_train_cli_writes_checkpoint_and_eval(_vm_trained):
    tmp, proc = _vm_trained
    assert "step 6/6" in proc.stdout and "exact" in proc.stdout
    check_val_column(proc.stdout, eval_interval=4, max_steps=6)  # the tiny preset logs every 2 steps
    ev = json.load(open(tmp / "out" / "eval.json"))
    for split in ("test", "novel"):
        assert ev[split]["n"] == 12 and 0.0 <= ev[split]["exact_match"] <= 1.0
        assert {"bleu4", "cider", "samples"} <= set(ev[split])
    assert ev["train_seconds"] > 0
    assert cv2.imread(str(tmp / "out" / "attention.png")) is not None
    for f in ("model.safetensors", "config.json", "train_state.pt"):
        assert (tmp / "out" / f).is_file()
    # the split files are in the user format and reload through the same loader
    assert len(vm.read_annotations(str(tmp / "data" / "novel.txt"))) == 12


def test_vm_generate_cli_on_video_and_frame_folder(_vm_trained, tmp_path, capsys):
    tmp, _ = _vm_trained
    clip = tmp / "data" / "test" / "00000.mp4"
    model, tok, cfg = vm.load_checkpoint(str(tmp / "out"))
    want = tok.decode(vm.generate(model, torch.from_numpy(vm.load_video(str(clip), cfg.n_frames, cfg.img_size))[None],
                                  cfg)[0])
    proc = run_script("videollama_mini.py", "--generate", "--video", clip, "--out_dir", tmp / "out")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == want
    printed = json.loads(proc.stdout.split("config: ", 1)[1].splitlines()[0])  # the config that runs: the checkpoint's
    assert printed["d_model"] == cfg.d_model == vm.PRESETS["tiny"]["d_model"] != vm.Config.d_model
    # a folder of frame images works wherever a video does (in-process: one subprocess above proves the command line)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, f in enumerate(vm.load_video(str(clip), 16, 64)):  # every frame of the clip, RGB
        cv2.imwrite(str(folder / f"{i:03d}.png"), f[:, :, ::-1])
    frames = torch.from_numpy(vm.load_video(str(folder), cfg.n_frames, cfg.img_size))[None]
    for extra, want_cfg in (([], cfg), (["--beam", "3"], dataclasses.replace(cfg, beam=3))):
        capsys.readouterr()
        vm.main(["--generate", "--video", str(folder), "--out_dir", str(tmp / "out")] + extra)
        got = capsys.readouterr().out.strip().splitlines()[-1]
        assert got == tok.decode(vm.generate(model, frames, want_cfg)[0])


def test_vm_bad_input_cli(_vm_trained, tmp_path, capsys):
    tmp, _ = _vm_trained
    out, clip = tmp / "out", tmp / "data" / "test" / "00000.mp4"
    gen = ["--generate", "--out_dir", out, "--video"]
    main_user_error(vm.main, capsys, gen + [tmp_path / "nope.mp4"], "nope.mp4")
    (tmp_path / "corrupt.mp4").write_bytes(b"\x00not a video" * 100)
    main_user_error(vm.main, capsys, gen + [tmp_path / "corrupt.mp4"], "corrupt.mp4")
    (tmp_path / "zero.mp4").write_bytes(b"")
    main_user_error(vm.main, capsys, gen + [tmp_path / "zero.mp4"], "zero.mp4")
    (tmp_path / "empty").mkdir()  # a folder of frames in a format the folder reader skips (GIF) names those it reads
    (tmp_path / "empty" / "0.gif").write_bytes(b"GIF89a")
    main_user_error(vm.main, capsys, gen + [tmp_path / "empty"], "no frames", ".png/.jpg/.bmp/.webp/.tif")
    main_user_error(vm.main, capsys, ["--generate", "--video", clip, "--out_dir", tmp_path / "none"], "no checkpoint")
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"script": "vit_caption", "config": {}}))
    (other / "model.safetensors").write_bytes(b"")
    main_user_error(vm.main, capsys, ["--generate", "--video", clip, "--out_dir", other], "vit_caption")
    for mode in (["--eval"], ["--generate", "--video", clip]):  # the checkpoint's sizes run: another size is refused
        main_user_error(vm.main, capsys, mode + ["--out_dir", out, "--d_model", "64"], "keeps the value the run was saved with", "drop --d_model 64")
        main_user_error(vm.main, capsys, mode + ["--out_dir", out, "--lr", "0.5"], "drop --lr 0.5")  # --train's only
    tiny = ["--train", "--preset", "tiny"]  # with --data: no --data_dir (the splits come from the file)
    unbuilt = ["--train", "--resume", "--data_dir", tmp_path / "unbuilt"]  # refused before any data
    main_user_error(vm.main, capsys, unbuilt + ["--out_dir", tmp_path / "fresh"], "nothing to resume")
    bad = tmp_path / "bad.txt"
    bad.write_text(f"{clip}\na caption\n\nmissing.mp4\na caption\n")
    main_user_error(vm.main, capsys, tiny + ["--data", bad, "--out_dir", tmp_path / "o2"], "bad.txt:4", "missing.mp4")
    main_user_error(vm.main, capsys, ["--train", "--preset", "nope"], "nope")
    (tmp_path / "one.txt").write_text(f"{clip}\na caption\n")  # its only entry would be the held-out one
    main_user_error(vm.main, capsys, tiny + ["--data", tmp_path / "one.txt"], "one.txt", "too few", "--test_data")
    # --test_data without --data (typed, or saved with the run) would be ignored for the world's own test split
    lone = ["--test_data", tmp_path / "one.txt", "--data_dir", tmp_path / "d"]
    main_user_error(vm.main, capsys, ["--train", "--preset", "tiny", *lone, "--out_dir", tmp_path / "o3"],
                    "--test_data", "--data FILE")
    main_user_error(vm.main, capsys, ["--eval", "--out_dir", out, *lone], "--test_data", "--data FILE")
    assert not (tmp_path / "d").exists() and not (tmp_path / "o3").exists()
    # fewer training clips than a global batch (one clip): they are repeated to fill it, so no micro-batch is empty
    (tmp_path / "three.txt").write_text(f"{clip}\na caption\n\n" * 3)
    few = ["--data", tmp_path / "three.txt", "--test_data", tmp_path / "three.txt", "--grad_accum", 2]
    vm.main([str(a) for a in tiny + few + ["--out_dir", tmp_path / "o4", "--max_steps", 2]])
    ev = json.load(open(tmp_path / "o4" / "eval.json"))  # its config: what was scored (test file, decoding flags)
    assert ev["test"]["n"] == 1 and ev["config"]["test_data"] == str(tmp_path / "three.txt")  # one clip, listed 3x
    batch = vm.global_batch(0, 3, 8, 1).tolist()
    assert len(batch) == 8 and all(batch.count(i) in (2, 3) for i in range(3))  # every clip two or three times
    # --resume with another architecture or a truncated train_state.pt is refused; the checkpoint is left as it was
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    main_user_error(vm.main, capsys, unbuilt + ["--out_dir", out, "--n_dec_layer", "3"],
                    "drop --n_dec_layer 3 (saved as --n_dec_layer 1)")
    # a boolean flag is named as it is typed, and so is the saved value
    main_user_error(vm.main, capsys, unbuilt + ["--out_dir", out, "--no-frame_diff"], "drop --no-frame_diff (saved as "
                    "--frame_diff)")
    main_user_error(vm.main, capsys, ["--eval", "--out_dir", out, "--compile"], "drop --compile (saved as --no-compile)")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in ("model.safetensors", "config.json", "train_state.pt"):
        (cut / f).write_bytes(before[f][:len(before[f]) // 2] if f == "train_state.pt" else before[f])
    main_user_error(vm.main, capsys, unbuilt + ["--out_dir", cut], "train_state.pt", "damaged")
    moments = dict(torch.load(out / "train_state.pt"), step=2)  # another run's AdamW moments: other shapes, mid-run
    moments["optimizer"]["state"] = {i: {k: v[..., :1] if v.dim() else v for k, v in st.items()}
                                     for i, st in moments["optimizer"]["state"].items()}
    for foreign in ({"step": 2}, {"optimizer": {"state": {}, "param_groups": [{"params": [0]}]}, "step": 2},
                    torch.zeros(3), moments):  # another run's state copied in, or a bare tensor: one line, no traceback
        torch.save(foreign, cut / "train_state.pt")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            main_user_error(vm.main, capsys, unbuilt + ["--out_dir", cut], "train_state.pt: damaged or another run's")
        assert not [w for w in seen if "indexing" in str(w.message)]  # torch's warning on a string index
    assert not (tmp_path / "unbuilt").exists()  # no synthetic world was written for a refused --resume


def test_vm_empty_mp4_prints_one_line_only(_vm_trained, tmp_path):
    """An empty mp4 through the command line: this script's one error line, and no FFmpeg log line before it
    (a subprocess: FFmpeg reads its log level once per process, and writes past Python's sys.stderr)."""
    (tmp_path / "zero.mp4").write_bytes(b"")
    proc = run_script("videollama_mini.py", "--generate", "--video", tmp_path / "zero.mp4", "--out_dir",
                      _vm_trained[0] / "out")
    assert_user_error(proc, "zero.mp4", "cannot open")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_vm_never_writes_over_the_users_files(tmp_path, capsys, monkeypatch):
    """--train writes the synthetic world only into a new or empty folder or one with this script's world.json, and
    checks --out_dir (new, empty, or this script's checkpoint) before any work; anything else, a damaged or foreign
    world.json, or a path that is an ordinary file is refused in one line naming the flag, and nothing is touched."""
    mine, afile = tmp_path / "mine", tmp_path / "notes.txt"
    mine.mkdir()
    (mine / "train.txt").write_text("notes\n")
    (mine / "config.json").write_text('{"my": 1}\n')
    afile.write_text("notes\n")
    before = {f.name: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()}
    tiny = ["--train", "--preset", "tiny", "--data_dir"]
    for data_dir, out_dir, refused in ((mine, mine, "--out_dir"), (tmp_path / "d", mine, "--out_dir"),
                                       (tmp_path / "d", afile, "--out_dir"), (mine, tmp_path / "o", "--data_dir"),
                                       (afile, tmp_path / "o", "--data_dir")):
        path = out_dir if refused == "--out_dir" else data_dir
        main_user_error(vm.main, capsys, tiny + [data_dir, "--out_dir", out_dir], f"{refused} {path}:")
    foreign = dict(train=64, val=8, test=12, novel=12, seed=1337, version=2)  # another script's manifest
    for stamp in ("{damaged", json.dumps(foreign)):
        (mine / "world.json").write_text(stamp)
        main_user_error(vm.main, capsys, tiny + [mine, "--out_dir", tmp_path / "o"], "--data_dir", "did not write")
        (mine / "world.json").unlink()
    assert {f.name: f.read_bytes() for f in tmp_path.rglob("*") if f.is_file()} == before  # no file added or changed
    assert not (tmp_path / "d").exists() and not (tmp_path / "o").exists()  # refused before any data or checkpoint
    # this script's own world is rewritten when its sizes change, also when a build was cut short
    cfg = _vm_cfg(tmp_path, n_train=2, n_val=1, n_test=1, n_novel=1)
    vm.build_world(cfg)
    write_clip = vm.write_clip
    monkeypatch.setattr(vm, "write_clip", lambda p, objs: 1 / 0 if p.endswith("00001.mp4") else write_clip(p, objs))
    with pytest.raises(ZeroDivisionError):  # cut short after one clip
        vm.build_world(dataclasses.replace(cfg, n_train=3))
    monkeypatch.setattr(vm, "write_clip", write_clip)
    vm.build_world(dataclasses.replace(cfg, n_train=3))
    assert len(vm.read_annotations(str(tmp_path / "data" / "train.txt"))) == 3


def test_vm_resume_keeps_the_checkpoint_architecture(_vm_trained, tmp_path):
    """--resume with more steps and an architecture flag equal to the checkpoint's: training goes on and the saved
    config.json still describes the saved weights."""
    tmp, _ = _vm_trained
    out = tmp_path / "out"
    out.mkdir()
    for f in ("model.safetensors", "config.json", "train_state.pt"):
        (out / f).write_bytes((tmp / "out" / f).read_bytes())
    vm.main(["--train", "--resume", "--n_frames", "4", "--max_steps", "8", "--data_dir",
             str(tmp / "data"), "--out_dir", str(out), "--eval_interval", "8"])
    model, _, cfg = vm.load_checkpoint(str(out))
    assert cfg.max_steps == 8 and cfg.n_dec_layer == vm.PRESETS["tiny"]["n_dec_layer"]



def test_vm_resume_with_no_steps_left_is_refused(_vm_trained, tmp_path, capsys):
    """--resume of a run already at --max_steps (the saved one, or a typed one at or below the saved step) would train
    nothing and evaluate, and with a --stop_after at or below it one step past it before stopping again: refused
    before any data is built, naming the step and the fix; nothing in the folder changes."""
    tmp, _ = _vm_trained
    out, unbuilt = tmp_path / "out", tmp_path / "unbuilt"
    out.mkdir()
    for f in ("model.safetensors", "config.json", "train_state.pt", "eval.json", "attention.png"):
        (out / f).write_bytes((tmp / "out" / f).read_bytes())
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    for steps in ([], ["--max_steps", "6"], ["--max_steps", "4"]):  # the shared run ended at step 6 of 6
        main_user_error(vm.main, capsys, ["--train", "--resume", "--out_dir", out, "--data_dir", unbuilt, *steps],
                        f"{out}: at step 6 already; pass a larger --max_steps, or --eval to score it as it is")
    for stop in ("6", "5"):  # as if cut at step 6 of 8: the same command again, with --resume
        main_user_error(vm.main, capsys, ["--train", "--resume", "--out_dir", out, "--data_dir", unbuilt, "--max_steps",
                                          "8", "--stop_after", stop],
                        f"{out}: at step 6 already; pass a larger --stop_after than {stop} or drop it")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before and not unbuilt.exists()


def test_vm_resume_refuses_words_outside_the_saved_token_table(_vm_trained, tmp_path, capsys):
    """--resume with --data whose captions hold a word the checkpoint's token table lacks (encode would drop it, the
    caption would train as something else) is refused naming the whole word and the folder; nothing is written."""
    tmp, _ = _vm_trained
    out = tmp_path / "out"
    out.mkdir()
    for f in ("model.safetensors", "config.json", "train_state.pt"):
        (out / f).write_bytes((tmp / "out" / f).read_bytes())
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    (tmp_path / "a.mp4").write_bytes((tmp / "data" / "train" / "00000.mp4").read_bytes())
    ann = tmp_path / "new.txt"
    ann.write_text("a.mp4\na red circle moves left\n\na.mp4\na red xylophone moves left\n")
    argv = ["--train", "--resume", "--out_dir", out, "--data", ann, "--test_data", ann, "--max_steps", "8"]
    main_user_error(vm.main, capsys, argv, "new.txt: 'x", "(in 'a red xylophone moves left'): the checkpoint",
                    f"in {out} has no token for it")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before

def test_vm_resume_continues_the_saved_run(_vm_trained, tmp_path, monkeypatch, capsys):
    """`--train --resume --out_dir DIR` and nothing else continues the interrupted run as it was configured (its data,
    sizes, steps, dtype; --stop_after only for the command that typed it) and ends at the uninterrupted run's
    weights: those of the shared tiny run, which typed the same flags without --stop_after. Its train_seconds is the
    whole run's: the seconds train_state.pt saved (here set to 1000) and the resumed part's."""
    tmp, _ = _vm_trained
    out = tmp_path / "r"
    vm.main(["--train", "--preset", "tiny", "--data_dir", str(tmp / "data"), "--out_dir", str(out),
             "--stop_after", "3"])
    state = torch.load(out / "train_state.pt", weights_only=True)
    assert 0 < state["seconds"] < 1000  # the stopped part's time, data included
    torch.save(dict(state, seconds=1000.0), out / "train_state.pt")  # as if the first part had taken 1000 s
    monkeypatch.chdir(tmp_path)  # from another folder, where the default data_dir does not exist

    def saved_world_only(cfg, build=vm.build_world):  # fails at once instead of writing the default world
        assert cfg.data_dir == str(tmp / "data") and cfg.n_train == 64, (cfg.data_dir, cfg.n_train)
        return build(cfg)
    monkeypatch.setattr(vm, "build_world", saved_world_only)
    vm.main(["--train", "--resume", "--out_dir", str(out)])
    resumed, _, cfg = vm.load_checkpoint(str(out))
    full, _, want = vm.load_checkpoint(str(tmp / "out"))
    assert dataclasses.asdict(cfg) == {**dataclasses.asdict(want), "out_dir": str(out)}  # stop_after 0, dtype float32
    assert torch.equal(_vm_weights(resumed), _vm_weights(full))
    assert "; 1000s of it before --resume)" in capsys.readouterr().out
    assert 1000 < json.load(open(out / "eval.json"))["train_seconds"] < 1100


def test_vm_save_cut_off_before_train_state_refuses_resume(capsys, _vm_trained, tmp_path, monkeypatch):
    """A save stopped after the new weights but before the new train_state.pt: --resume refuses (the older state would
    go on from its step with the newer weights)."""
    tmp, _ = _vm_trained
    out = str(tmp_path / "r")
    vm.main(["--train", "--preset", "tiny", "--data_dir", str(tmp / "data"), "--out_dir", out, "--stop_after", "2"])
    assert f"stopped after step 2 as asked; go on with --train --resume --out_dir {out}\n" in capsys.readouterr().out
    resume_with_a_save_cut_off(vm.main, monkeypatch, out)
    main_user_error(vm.main, capsys, ["--train", "--resume", "--out_dir", out], "nothing to resume (no train_state.pt)")


def test_vm_a_new_run_removes_the_old_runs_scores_and_picture(_vm_trained, tmp_path):
    """A new --train into a folder that holds an older run: its first save removes the old weights' eval.json,
    attention.png and train_state.pt, so a run stopped before its evaluation leaves no scores or picture of weights
    it replaced."""
    tmp, _ = _vm_trained
    out = tmp_path / "out"
    out.mkdir()
    for f in ("model.safetensors", "config.json", "train_state.pt", "eval.json", "attention.png"):
        (out / f).write_bytes((tmp / "out" / f).read_bytes())
    vm.main(["--train", "--preset", "tiny", "--data_dir", str(tmp / "data"), "--out_dir", str(out), "--stop_after", "2"])
    assert sorted(f.name for f in out.iterdir()) == ["config.json", "model.safetensors", "train_state.pt"]
    assert torch.load(out / "train_state.pt", weights_only=True)["step"] == 2  # the new run's state


def test_vm_original_preset_sizes():
    """--preset original: the write-up's text-query design over the full GPT-2 vocabulary, without dropout or weight
    decay; it gives no layer, width, head or frame counts, so those are the defaults."""
    _, cfg, _ = vm.parse_args(["--preset", "original"])
    default = vm.Config()
    assert (cfg.qformer_mode, cfg.compact_vocab, cfg.dropout, cfg.weight_decay) == ("text", False, 0.0, 0.0)
    sizes = ("n_frames", "img_size", "d_model", "n_head", "cnn_width", "grid", "n_temporal_layer", "n_dec_layer",
             "max_len", "batch_size", "max_steps", "lr")
    assert all(getattr(cfg, k) == getattr(default, k) for k in sizes)
    tok = vm.Tokenizer.from_captions(["a red circle moves left"], cfg.compact_vocab)
    model = vm.VideoLLaMAMini(cfg, len(tok.ids))
    assert len(tok.ids) == 50257 and tok.ids[0] == 50256  # every GPT-2 id, <|endoftext|> first
    assert model.tok.weight.shape == model.head.weight.shape == (50257, 128)
    assert not hasattr(model, "qformer") and len(model.temporal) == len(model.decoder) == 2


def test_vm_weight_decay_only_on_linear_and_conv_matrices():
    model, cfg = _vm_model("queries")
    decay, rest = vm.decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and rest["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)] for p in decay["params"]}
    want = {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}
    assert got == {n + ".weight" for n in want}
    for n in ("qformer.query", "qformer.scale", "qformer.shift", "tok.weight", "frames.cnn.1.weight", "ln_f.weight",
              "head.weight"):
        assert (n in got) == (n == "head.weight"), n  # 2-D and 3-D tensors that are not layer matrices stay out
    assert len(decay["params"]) + len(rest["params"]) == len(list(model.parameters()))


def test_vm_training_clips_the_gradient_norm(_vm_trained, tmp_path, monkeypatch):
    """Every step clips the global gradient norm at --grad_clip, before the optimizer steps: the gradients the
    optimizer sees have at most that norm."""
    tmp, _ = _vm_trained
    norms, step = [], torch.optim.AdamW.step

    def spy(self, *a, **k):  # the norm of the gradients each optimizer step applies
        norms.append(torch.cat([p.grad.flatten() for g in self.param_groups for p in g["params"]]).norm().item())
        return step(self, *a, **k)
    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    vm.train(_vm_cfg(tmp, out_dir=str(tmp_path / "out"), max_steps=2, grad_clip=1e-3))
    assert len(norms) == 2 and all(n <= 1e-3 * (1 + 1e-4) for n in norms), norms


def test_vm_nan_loss_stops_and_keeps_checkpoint(_vm_trained, tmp_path, capsys, monkeypatch):
    """A NaN loss stops training with one line, and a save cut short while it writes model.safetensors (a crash,
    Ctrl-C): either way the checkpoint already saved is left whole."""
    tmp, _ = _vm_trained
    out = tmp_path / "out"
    out.mkdir()
    for f in ("model.safetensors", "config.json", "train_state.pt"):
        (out / f).write_bytes((tmp / "out" / f).read_bytes())
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    main_user_error(vm.main, capsys, ["--train", "--preset", "tiny", "--data_dir", tmp / "data", "--out_dir", out, "--lr", "1e30",
                            "--warmup", "1"], "loss became")  # an absurd learning rate blows the weights up at once
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # nothing saved was touched
    model, tok, cfg = vm.load_checkpoint(str(out))
    cfg = dataclasses.replace(cfg, out_dir=str(out))  # the saved config names the folder it was trained into

    def half_then_crash(state, path):
        open(path, "wb").write(before["model.safetensors"][:1000])
        raise KeyboardInterrupt
    monkeypatch.setattr(vm, "save_file", half_then_crash)
    with pytest.raises(KeyboardInterrupt):
        vm.save_checkpoint(model, tok, cfg, torch.optim.AdamW(model.parameters()), 1, torch.amp.GradScaler("cpu"))
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.suffix != ".tmp"} == before


# The README's "bring your own data" example, exactly: a video path line (relative to the file), caption lines.
VM_USER_DATA_EXAMPLE = "clips/cat.mp4\na cat jumps onto the sofa\na grey cat leaps onto a couch\n"


def test_vm_user_data_trains(tmp_path, _vm_trained, monkeypatch):
    """The README's example lines, as 11 entries of 11 copies of a real clip, train the tiny preset (in-process);
    --data typed relative to the working folder is saved absolute, so --eval works from any other folder."""
    tmp, _ = _vm_trained
    (tmp_path / "clips").mkdir()
    for i in range(11):  # eleven clips (one listed twice would be one entry, all its captions its references)
        (tmp_path / "clips" / f"cat{i}.mp4").write_bytes((tmp / "data" / "train" / "00000.mp4").read_bytes())
    ann = tmp_path / "mine.txt"
    ann.write_text("\n".join(VM_USER_DATA_EXAMPLE.replace("cat.mp4", f"cat{i}.mp4") for i in range(11)))
    monkeypatch.chdir(tmp_path)
    vm.main(["--train", "--preset", "tiny", "--data", "mine.txt", "--out_dir", str(tmp_path / "o")])
    ev = json.load(open(tmp_path / "o" / "eval.json"))
    assert ev["test"]["n"] == 2 and "novel" not in ev  # cat0 and cat3 held out; no novel split for user data
    assert ev["test"]["samples"][0]["references"] == VM_USER_DATA_EXAMPLE.splitlines()[1:]
    assert vm.load_checkpoint(str(tmp_path / "o"))[2].data == str(ann)
    monkeypatch.chdir(tmp_path / "clips")
    vm.main(["--eval", "--out_dir", str(tmp_path / "o")])
    again = json.load(open(tmp_path / "o" / "eval.json"))
    assert again["test"]["n"] == 2 and again["train_seconds"] == ev["train_seconds"] > 0  # kept from training


def test_vm_eval_decodes_only_the_clips_it_scores(tmp_path, _vm_trained, monkeypatch, capsys):
    """--eval decodes the world's test and novel clips, or the entries held out of --data, never the training ones;
    with --test_data it does not open --data, so a run whose training file was moved away still evaluates a new
    file, and without --test_data the missing file is named with the reason --eval needs it."""
    tmp, _ = _vm_trained
    seen, load = [], vm.load_video
    monkeypatch.setattr(vm, "load_video", lambda path, *a: seen.append(os.path.basename(path)) or load(path, *a))
    (world := tmp_path / "world").mkdir()
    for f in ("model.safetensors", "config.json"):  # a copy: the shared run's eval.json stays as it is
        (world / f).write_bytes((tmp / "out" / f).read_bytes())
    vm.main(["--eval", "--out_dir", str(world)])
    assert sorted(seen) == sorted(p.name for s in ("test", "novel") for p in (tmp / "data" / s).glob("*.mp4"))
    (tmp_path / "clips").mkdir()
    for i in range(11):
        (tmp_path / "clips" / f"cat{i}.mp4").write_bytes((tmp / "data" / "train" / "00000.mp4").read_bytes())
    ann, out = tmp_path / "mine.txt", tmp_path / "o"
    ann.write_text("\n".join(VM_USER_DATA_EXAMPLE.replace("cat.mp4", f"cat{i}.mp4") for i in range(11)))
    vm.main(["--train", "--preset", "tiny", "--data", str(ann), "--out_dir", str(out)])
    seen.clear()
    vm.main(["--eval", "--out_dir", str(out)])
    assert seen == ["cat0.mp4", "cat3.mp4"]  # the two held out: their paths draw under 0.1
    ann.rename(tmp_path / "moved.txt")
    main_user_error(vm.main, capsys, ["--eval", "--out_dir", out], "mine.txt: annotation file not found",
                    "--eval scores the entries held out of it, or pass --test_data FILE")
    (tmp_path / "new.txt").write_text(VM_USER_DATA_EXAMPLE.replace("cat.mp4", "cat5.mp4"))
    seen.clear()
    vm.main(["--eval", "--out_dir", str(out), "--test_data", str(tmp_path / "new.txt")])
    ev = json.load(open(out / "eval.json"))
    assert seen == ["cat5.mp4"] and ev["test"]["n"] == 1 and ev["test"]["samples"][0]["video"].endswith("cat5.mp4")
    # a run trained on all of --data and tested on --test_data: --eval --data alone (its held-out tenth would be
    # training entries) is refused, not left unread while the saved test file is scored
    vm.main(["--train", "--preset", "tiny", "--data", str(tmp_path / "moved.txt"), "--test_data",
             str(tmp_path / "new.txt"), "--out_dir", str(tmp_path / "o2"), "--max_steps", "2"])
    before, seen[:] = (tmp_path / "o2" / "eval.json").read_bytes(), []
    main_user_error(vm.main, capsys, ["--eval", "--out_dir", tmp_path / "o2", "--data", tmp_path / "moved.txt"],
                    f"--data: --eval scores the run's --test_data {tmp_path / 'new.txt'}; give --test_data FILE")
    assert seen == [] and (tmp_path / "o2" / "eval.json").read_bytes() == before


def test_vm_a_windows_path_in_the_annotation_file_is_named_with_the_fix(tmp_path):
    """An annotation file written on Windows (clips\\cat.mp4) and read elsewhere: the path it looked for is shown, with
    the fix."""
    (tmp_path / "a.txt").write_text("clips\\cat.mp4\na cat\n", encoding="utf-8")
    with pytest.raises(vm.UserError, match=re.escape(f"a.txt:1: video not found: {os.path.realpath(tmp_path)}/clips\\cat.mp4 (use / in paths)")):
        vm.read_annotations(str(tmp_path / "a.txt"))


def test_vm_a_clip_listed_twice_is_one_entry(tmp_path):
    """The same clip in two entries (spelled two ways) is one entry with every caption as a reference, so it is never
    both trained on and held out for testing."""
    (tmp_path / "clips").mkdir()
    cv2.imwrite(str(tmp_path / "clips" / "f0.png"), np.zeros((8, 8, 3), np.uint8))  # a folder of frames: a video
    (tmp_path / "a.txt").write_text("clips\na cat\n\n./clips/../clips\na grey cat\nthe cat\n", encoding="utf-8")
    want = [(os.path.realpath(tmp_path / "clips"), ["a cat", "a grey cat", "the cat"])]
    assert vm.read_annotations(str(tmp_path / "a.txt")) == want


def _held_out_by_path(tmp_path, ann, ext, text, split):
    """Shared check for the four scripts that hold out part of --data: text(names, caption) is the annotation file
    `ann` of one entry per name, about the media file name + ext (made here, empty; ext "": none), and split(folder)
    -> (trained names, held-out names). The held-out entries are fixed by each file's path, so reordering the file,
    editing answers or adding entries never moves a trained entry into the held-out set, and one file name in many
    folders is many entries."""
    def write(folder, names, caption):
        for n in names if ext else []:
            (folder / f"{n}{ext}").parent.mkdir(parents=True, exist_ok=True)
            (folder / f"{n}{ext}").touch()
        folder.mkdir(exist_ok=True)
        (folder / ann).write_text(text(names, caption))
    names = [f"clip{i:02}" for i in range(40)]
    write(tmp_path / "a", names, "a cat")
    train, test = split(tmp_path / "a")
    assert sorted(train + test) == names and 2 <= len(test) <= 8 and not set(train) & set(test)
    write(tmp_path / "b", names[::-1] + ["new0", "new1", "new2"], "a grey cat")  # reordered, answers edited, 3 added
    train2, test2 = split(tmp_path / "b")
    assert set(test) <= set(test2) and not set(train) & set(test2) and set(train) <= set(train2)
    write(tmp_path / "c", ["x", "y"], "a cat")  # two entries: one is held out all the same
    assert sorted(map(len, split(tmp_path / "c"))) == [1, 1]
    write(tmp_path / "d", [f"{i:02}/clip" for i in range(40)], "a cat")  # one file name in 40 folders: 40 entries
    assert 2 <= len(split(tmp_path / "d")[1]) <= 8


def test_vm_the_held_out_clips_are_chosen_by_path(tmp_path, monkeypatch):
    """Without --test_data, --data's held-out clips are those whose paths draw at most 0.1 (at least one): not
    every 10th line, which an edit to the file would shift onto clips the run trained on."""
    monkeypatch.setattr(vm, "load_video", lambda *a: np.zeros((1, 1, 1, 3), np.uint8))  # no decoding: names only

    def split(folder):
        data = vm.prepare_data(_vm_cfg(folder, data=str(folder / "a.txt")), 0, keep=("train", "test"))
        return [[os.path.basename(v)[:-4] for v, _ in data[s][0]] for s in ("train", "test")]
    text = lambda names, caption: "".join(f"{n}.mp4\n{caption}\n\n" for n in names)  # entries, a blank line apart
    _held_out_by_path(tmp_path, "a.txt", ".mp4", text, split)


def test_vm_caption_longer_than_max_len_is_refused(_vm_trained, tmp_path, capsys):
    """A training caption longer than --max_len would have no position for its end, and one longer than
    --max_new_tokens would be cut by evaluation's generation (a wrong exact match): both refused with its token count."""
    (tmp_path / "a.mp4").write_bytes((_vm_trained[0] / "data" / "train" / "00000.mp4").read_bytes())
    ann = tmp_path / "long.txt"
    ann.write_text("a.mp4\na red circle moves left\n\na.mp4\na red circle moves left and a blue square moves up\n")
    argv = ["--train", "--preset", "tiny", "--data", ann, "--test_data", ann, "--out_dir", tmp_path / "o"]
    main_user_error(vm.main, capsys, argv + ["--max_len", "8"], "a training caption is 13 tokens long",
                    "--max_len 8 must be at least 13")
    main_user_error(vm.main, capsys, argv + ["--max_new_tokens", "11"], "a training caption is 13 tokens long",
                    "--max_new_tokens 11 must be at least 12")
    # the validation loss reads a held-out clip's first caption: a long one is refused too, though a shorter
    # reference would let the clip be scored
    (tmp_path / "short.txt").write_text("a.mp4\na red circle moves left\n")
    (tmp_path / "val.txt").write_text("a.mp4\na red circle moves left and a blue square moves up\na red circle\n")
    main_user_error(vm.main, capsys, ["--train", "--preset", "tiny", "--data", tmp_path / "short.txt", "--test_data",
                                      tmp_path / "val.txt", "--out_dir", tmp_path / "o", "--max_len", "8"],
                    "a val caption is 13 tokens long", "--max_len 8 must be at least 13")
    assert not (tmp_path / "o").exists()

def test_vm_grad_accumulation_and_exact_resume(tmp_path):
    """batch 8 == 2 x 4 accumulated (same weights up to float noise); stop + resume == uninterrupted, bit for bit,
    also from a train_state.pt saved without its seconds (an older save: they count as 0)."""
    cfg = _vm_cfg(tmp_path, max_steps=4, eval_interval=100)
    one, _ = vm.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "a")))
    two, _ = vm.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "b"), batch_size=4, grad_accum=2))
    torch.testing.assert_close(_vm_weights(one), _vm_weights(two), atol=2e-5, rtol=1e-4)
    drop = dataclasses.replace(cfg, dropout=0.2)  # dropout makes the RNG state part of what must be restored
    full, _ = vm.train(dataclasses.replace(drop, out_dir=str(tmp_path / "c")))
    vm.train(dataclasses.replace(drop, out_dir=str(tmp_path / "d"), stop_after=2))
    state = torch.load(tmp_path / "d" / "train_state.pt", weights_only=True)
    torch.save({k: v for k, v in state.items() if k != "seconds"}, tmp_path / "d" / "train_state.pt")  # an older save
    resumed, _ = vm.train(dataclasses.replace(drop, out_dir=str(tmp_path / "d")), resume=True)
    assert torch.equal(_vm_weights(full), _vm_weights(resumed))
    assert json.load(open(tmp_path / "d" / "eval.json"))["train_seconds"] < 100  # this part's time alone
    # and the checkpoint on disk reloads to the same model
    loaded, _, _ = vm.load_checkpoint(str(tmp_path / "d"))
    assert torch.equal(_vm_weights(loaded), _vm_weights(resumed))


def test_vm_ddp_two_processes_match_one(tmp_path, capsys):
    """torchrun with 2 gloo processes of batch 4 follows the same curve as one process of batch 8, and logs the
    same training loss (the whole global batch's, not rank 0's share)."""
    cfg = _vm_cfg(tmp_path, max_steps=3, eval_interval=100)
    single, _ = vm.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "one")))
    logged = lambda out: [float(x) for x in re.findall(r"^step \d+/3 \| loss (\S+)", out, re.M)]
    want = logged(capsys.readouterr().out)
    proc = run_torchrun("videollama_mini.py", "--train", "--preset", "tiny", "--max_steps", "3", "--eval_interval",
                        "100", "--dropout", "0", "--batch_size", "4", "--data_dir", cfg.data_dir, "--out_dir",
                        tmp_path / "ddp", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("step 3/3") == 1  # rank 0 alone prints
    assert len(want) == 2 and logged(proc.stdout) == pytest.approx(want, abs=2e-3)
    ddp, _, _ = vm.load_checkpoint(str(tmp_path / "ddp"))
    torch.testing.assert_close(_vm_weights(ddp), _vm_weights(single), atol=2e-5, rtol=1e-4)
    with pytest.raises(SystemExit):  # one process would halve the global batch, which orders the data
        vm.main(["--train", "--resume", "--out_dir", str(tmp_path / "ddp"), "--max_steps", "4"])
    assert "trained at global batch 8 (batch_size*grad_accum*processes), not 4" in capsys.readouterr().err
    vm.main(["--train", "--resume", "--out_dir", str(tmp_path / "ddp"), "--max_steps", "4", "--grad_accum", "2"])
    assert "step 4/4" in capsys.readouterr().out  # the same global batch in one process: resumed


def test_vm_autocast_auto(_vm_trained, tmp_path, monkeypatch, capsys):
    """A 1-step tiny --train under --dtype auto names the dtype this machine gets (in-process); then the rules."""
    vm.main(["--train", "--preset", "tiny", "--max_steps", "1", "--dtype", "auto", "--data_dir",
             str(_vm_trained[0] / "data"), "--out_dir", str(tmp_path / "auto")])
    assert f"autocast {vm.autocast_dtype('auto', 'cpu')}" in capsys.readouterr().out
    check_autocast_auto(vm, monkeypatch)


def test_vm_damaged_config_json(_vm_trained, tmp_path, capsys):
    """config.json that holds no object or no "config", or a token table the weights were not trained with (their
    shapes differ), is refused in one line, and so is a model.safetensors cut short (a copy that stopped halfway); a
    key this version lacks is ignored and an explicit --dtype bfloat16 saved in it is kept."""
    out = _vm_trained[0] / "out"
    meta = json.load(open(out / "config.json"))
    later = {**meta, "config": {**meta["config"], "dtype": "bfloat16", "a_later_field": 1}}
    other_vocab = {**meta, "vocab": meta["vocab"] + [999]}  # another run's token table: the weights' shapes differ
    for name, meta, needle in (("list", [], "not a JSON object"), ("noconf", {"script": vm.SCRIPT}, "damaged"),
                               ("vocab", other_vocab, "model.safetensors: keys do not match the model"),
                               ("later", later, None)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes())
        (tmp_path / name / "config.json").write_text(json.dumps(meta))
        if needle:
            main_user_error(vm.main, capsys, ["--eval", "--out_dir", tmp_path / name], needle,
                            "'mis-shaped': ['head.weight', 'tok.weight']" if name == "vocab" else "config.json")
    assert vm.load_checkpoint(str(tmp_path / "later"))[2].dtype == "bfloat16"
    cut = _copy_run(out, tmp_path / "cut")
    (cut / "model.safetensors").write_bytes((out / "model.safetensors").read_bytes()[:1000])
    main_user_error(vm.main, capsys, ["--eval", "--out_dir", cut], f"{cut / 'model.safetensors'}: not a readable "
                    "safetensors file (")


def test_vm_bench_times_the_plain_decode_loop(monkeypatch, capsys):
    """--bench times 20 decode steps per caption with and without the cache, whatever beam its config holds (a typed
    --beam is refused): a beam search would use the cache either way and stop at its own time."""
    seen, plain = [], vm.generate
    monkeypatch.setattr(vm, "generate", lambda model, video, cfg, *a, **k: seen.append(cfg.beam) or plain(
        model, video, cfg, *a, **k))
    vm.bench(vm.Config(**{**vm.PRESETS["tiny"], "beam": 3}))
    assert seen == [1] * 6 and "cache off" in capsys.readouterr().out
    vm.main(["--bench", "--preset", "tiny", "--max_len", "16"])  # a context under 20 tokens: 15 (it was a traceback)
    assert "(batch 8, 15 tokens each" in capsys.readouterr().out


def test_vm_eval_writes_into_the_folder_it_loaded(_vm_trained, tmp_path, monkeypatch, capsys):
    """A checkpoint copied to the default out_dir and evaluated there (no --out_dir typed) writes eval.json beside it,
    not into the folder its config.json was saved from."""
    out = _vm_trained[0] / "out"
    before = (out / "eval.json").read_bytes()
    moved = tmp_path / "out" / "videollama_mini"
    moved.mkdir(parents=True)
    for f in ("model.safetensors", "config.json"):
        (moved / f).write_bytes((out / f).read_bytes())
    monkeypatch.chdir(tmp_path)
    assert vm.load_checkpoint("out/videollama_mini")[2].out_dir == "out/videollama_mini"
    vm.main(["--eval"])
    assert (moved / "eval.json").is_file() and (out / "eval.json").read_bytes() == before


# ====================================================================================================================
# 2. vit_caption.py
# ====================================================================================================================
import dataclasses
import json
import math
import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch

import vit_caption as vc


@pytest.fixture
def _vc_one_thread():
    """These tiny models run fastest on one thread; on a shared 2-core machine two threads can spin-wait against
    another process and run 100x slower. Restored afterwards, so other sections keep their setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


_vc_1t = pytest.mark.usefixtures("_vc_one_thread")

def _vc_cfg(tmp, **kw):
    """The tiny preset, writing under tmp."""
    base = dict(vc.PRESETS["tiny"], data_dir=str(tmp / "data"), out_dir=str(tmp / "out"))
    return vc.Config(**{**base, **kw})


def _vc_model(pool="patches", vocab=23, seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    cfg = vc.Config(**{**vc.PRESETS["tiny"], "pool": pool, **kw})
    return vc.ViTCaptioner(cfg, vocab).to(dtype).eval(), cfg


def _vc_images(b, cfg, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, cfg.img_size, cfg.img_size, 3), generator=g, dtype=torch.uint8)


def _vc_weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _vc_trained_checkpoint(tmp):
    """Train the tiny preset in-process (a few seconds) and return its config."""
    cfg = _vc_cfg(tmp)
    vc.train(cfg)
    return cfg


def test_vc_whitening_from_few_images_keeps_new_images_in_range(tmp_path):
    """16 images give fewer patches than pixels per patch, so some principal components have ~0 variance: their 1/std
    gain made other images' patch features ~300x larger than the training ones. Only components with real variance
    are kept; a default-sized init batch keeps all 128 (its smallest is ~5e-4 of the largest), as before."""
    cfg = vc.Config(data_dir=str(tmp_path / "d"), n_train=40, n_val=4, n_test=4, n_novel=4)
    images = vc.prepare_data(cfg, 0)["train"][1]
    model = vc.ViTCaptioner(cfg, 50)
    model.init_from_data(images[:16])
    std = lambda x: model.vit.patch_embed(vc.pixels(x)).std().item()
    assert 0.3 < std(images[:16]) < 2 and std(images[16:]) < 3, (std(images[:16]), std(images[16:]))


@_vc_1t
@pytest.mark.parametrize("pool", ["cls", "mean", "patches"])
def test_vc_shapes(pool):
    for size, patch in ((16, 8), (32, 8), (24, 4)):
        model, cfg = _vc_model(pool, img_size=size, patch=patch)
        images, idx = _vc_images(2, cfg), torch.randint(0, 23, (2, 5))
        prefix = model.encode(images)
        n = 1 if pool != "patches" else (size // patch) ** 2
        assert prefix.shape == (2, n, cfg.d_model) and model.n_prefix == n
        logits, loss = model(images, idx, idx)
        assert logits.shape == (2, 5, 23) and torch.isfinite(loss)


@_vc_1t
@pytest.mark.parametrize("pool", ["cls", "patches"])
def test_vc_causal_mask(pool):
    model, cfg = _vc_model(pool)
    images, idx = _vc_images(1, cfg), torch.randint(0, 23, (1, 8))
    changed = idx.clone()
    changed[0, 5:] = (changed[0, 5:] + 1) % 23
    a, _ = model(images, idx)
    b, _ = model(images, changed)
    assert torch.equal(a[:, :5], b[:, :5])  # earlier positions never see a later token
    assert not torch.allclose(a[:, 5:], b[:, 5:])
    other, _ = model(_vc_images(1, cfg, seed=1), idx)  # ...but every text position sees the image
    assert not torch.allclose(a[:, 0], other[:, 0])


@_vc_1t
def test_vc_patch_init_whitens_the_patches():
    """init_from_data: on the images it was fitted to, the patch embedding's outputs have zero mean and covariance
    patch_scale^2 * I (decorrelated), which also checks that the conv reads a patch in unfold's order; the position
    embeddings are 2-D sin-cos at the features' std, patch_scale."""
    model, cfg = _vc_model(patch_scale=0.5)
    images = _vc_images(64, cfg)
    model.init_from_data(images)
    x = vc.pixels(images)
    feats = model.vit.patch_embed(x).flatten(2).transpose(1, 2).flatten(0, 1).double()  # (B*P, E)
    assert feats.mean(0).abs().max() < 1e-4
    assert torch.allclose(torch.cov(feats.T), 0.25 * torch.eye(cfg.vit_dim, dtype=torch.float64), atol=1e-3)
    # positions: the first half of the features depends on the column only, the second on the row only
    n, q = cfg.img_size // cfg.patch, cfg.vit_dim // 4
    grid = model.vit.pos_embed[0].view(n, n, -1)
    assert torch.equal(grid[:, :, :2 * q], grid[:1, :, :2 * q].expand(n, -1, -1))
    assert torch.equal(grid[:, :, 2 * q:4 * q], grid[:, :1, 2 * q:4 * q].expand(-1, n, -1))
    assert not torch.equal(grid[0, 0], grid[0, 1]) and not torch.equal(grid[0, 0], grid[1, 0])
    torch.testing.assert_close(model.vit.pos_embed[0].std(0), torch.full((cfg.vit_dim,), 0.5))
    # with a CLS token (slot 0) the sin-cos vectors fill the patches' slots 1..P and the CLS slot keeps its own
    model, _ = _vc_model("cls")
    cls_slot = model.vit.pos_embed[0, 0].clone()
    model.init_from_data(images)
    assert torch.equal(model.vit.pos_embed[0, 0], cls_slot)
    torch.testing.assert_close(model.vit.pos_embed[0, 1:], vc.sincos_2d(n, cfg.vit_dim))
    with warnings.catch_warnings():  # a width under 4 has no sin-cos pair: zeros, without torch's std() warning
        warnings.simplefilter("error")
        assert vc.sincos_2d(4, 3).shape == (16, 3) and not vc.sincos_2d(4, 3).any()


@_vc_1t
def test_vc_patch_init_of_big_patches_solves_the_small_gram_matrix(monkeypatch):
    """Fewer patches than numbers in one (big patches): init_from_data solves the n x n Gram matrix of the n patches,
    never the (3 p^2)^2 covariance (minutes at --patch 48, out of memory at 500), and gets the covariance's components
    (up to sign) and biases: 6 images of 4 patches of 3*8*8 = 192 numbers -> a 24 x 24 matrix."""
    model, cfg = _vc_model(vit_dim=16)
    images = _vc_images(6, cfg)
    eigh, shapes = torch.linalg.eigh, []
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: shapes.append(tuple(a.shape)) or eigh(a))
    model.init_from_data(images)
    assert shapes == [(24, 24)]
    x = torch.nn.functional.unfold(vc.pixels(images), 8, stride=8).transpose(1, 2).flatten(0, 1).double()  # (24, 192)
    evals, evecs = eigh(torch.cov(x.T))  # the covariance's components, ascending
    want = (evecs[:, -16:].flip(1) / evals[-16:].flip(0).sqrt()).T  # (16, 192): the 16 largest, each over its std
    got = model.vit.patch_embed.weight.flatten(1).double()
    sign = (got * want).sum(1).sign()[:, None]  # an eigenvector's sign is arbitrary
    torch.testing.assert_close(got * sign, want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(model.vit.patch_embed.bias.double() * sign[:, 0], -(want @ x.mean(0)), rtol=1e-4,
                               atol=1e-6)


@_vc_1t
def test_vc_rope_rotate_half_matches_complex_rotation():
    """rotate_half RoPE == rotating each (i, i + hd/2) pair by angle pos * theta^(-2i/hd), in float64."""
    hd, T = 8, 5
    cos, sin = vc.rope_tables(T, hd, 10000.0)
    x = torch.randn(1, 1, T, hd, dtype=torch.float64)
    got = vc.apply_rope(x, cos.double(), sin.double())
    inv = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv  # (T, hd/2)
    z = torch.complex(x[..., : hd // 2], x[..., hd // 2:]) * torch.polar(torch.ones_like(ang), ang)
    assert torch.allclose(got, torch.cat([z.real, z.imag], -1), atol=1e-6)


@_vc_1t
def test_vc_rmsnorm_and_swiglu_by_hand():
    norm = vc.RMSNorm(4)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.allclose(norm(x), x / math.sqrt((1 + 4 + 9 + 16) / 4 + 1e-6))
    _, cfg = _vc_model()
    mlp = vc.SwiGLU(cfg.d_model, cfg.mlp_dim)
    x = torch.randn(3, cfg.d_model)
    ref = mlp.down_proj.weight @ (torch.nn.functional.silu(mlp.gate_proj.weight @ x.T) * (mlp.up_proj.weight @ x.T))
    assert torch.allclose(mlp(x), ref.T, atol=1e-6)


@_vc_1t
def test_vc_blocks_add_to_the_residual_stream():
    """A block adds its attention and MLP outputs to the stream it reads (pre-norm): with the MLP's down_proj at zero
    a block is x + attn(norm(x)); with o_proj at zero too it passes x through unchanged, in both towers."""
    model, cfg = _vc_model(dtype=torch.float64)
    rope = model.rope_cos[:5].double(), model.rope_sin[:5].double()
    for block, r in ((model.layers[0], rope), (model.vit.layers[0], None)):  # decoder (RoPE), ViT (no RoPE)
        x = torch.randn(2, 5, block.input_layernorm.weight.shape[0], dtype=torch.float64)
        for proj in (block.mlp.down_proj, block.self_attn.o_proj):
            with torch.no_grad():
                for t in (proj.weight, proj.bias):
                    if t is not None:
                        t.zero_()
            want = x + block.self_attn(block.input_layernorm(x), r) if proj is block.mlp.down_proj else x
            torch.testing.assert_close(block(x, r), want, atol=1e-12, rtol=0)


@_vc_1t
def test_vc_overfit_one_batch():
    torch.manual_seed(0)
    cfg = vc.Config(**{**vc.PRESETS["tiny"], "d_model": 64, "mlp_dim": 128})
    model = vc.ViTCaptioner(cfg, 12)
    images = _vc_images(4, cfg)
    seqs = [[0, 1 + i, 5 + i, 9, 0] for i in range(4)]  # each image its own caption
    inp, tgt = vc.pad_batch(seqs)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        _, loss = model(images, inp, tgt)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    out = vc.generate(model, images, cfg)
    assert out == [s[1:-1] for s in seqs]


@_vc_1t
@pytest.mark.parametrize("pool", ["cls", "patches"])
def test_vc_cache_equals_no_cache(pool):
    model, cfg = _vc_model(pool, dtype=torch.float64)
    images = _vc_images(3, cfg)
    # logits: a step through the cache == the full forward at that position, to float64 precision
    x = torch.cat([vc.prefill_input(model, images), model.embed_tokens(torch.randint(0, 23, (3, 6)))], 1)
    full = model.decode(x)
    cache = [{} for _ in model.layers]
    parts = [model.decode(x[:, :4], cache, pos=0)]
    for t in range(4, x.shape[1]):
        parts.append(model.decode(x[:, t:t + 1], cache, pos=t))
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-10)
    # generation: greedy with the cache == greedy re-running the whole sequence
    cfg = dataclasses.replace(cfg, max_new_tokens=10)
    assert vc.generate(model, images, cfg, use_cache=True) == vc.generate(model, images, cfg, use_cache=False)


@_vc_1t
def test_vc_generate_cached_logits_equal_the_full_rerun(monkeypatch):
    """Every step of generate: the logits through the KV cache (the new token at its own position) equal those of the
    whole sequence run again, to float64 precision, not only the argmax."""
    model, cfg = _vc_model(dtype=torch.float64)
    cfg, images, seen = dataclasses.replace(cfg, max_new_tokens=6), _vc_images(2, cfg), []
    plain = vc.next_logits
    monkeypatch.setattr(vc, "next_logits", lambda *a, **k: seen.append(plain(*a, **k)) or seen[-1])
    out = [vc.generate(model, images, cfg, use_cache=c, stop_at_eos=False) for c in (True, False)]
    assert out[0] == out[1] and len(seen) == 12
    assert all(torch.allclose(a, b, atol=1e-10) for a, b in zip(seen[:6], seen[6:]))


@_vc_1t
def test_vc_generation_stops_at_the_context():
    """A --max_new_tokens beyond the context writes at most max_len - 1 tokens (BOS takes a position) instead of running
    past it; the decoder takes the whole context and refuses one position more in one line."""
    model, cfg = _vc_model(max_len=6, max_new_tokens=23)
    assert all(len(r) <= 5 for r in vc.generate(model, _vc_images(2, cfg), cfg, stop_at_eos=False))
    n = model.n_prefix + cfg.max_len  # the context: the visual prefix and max_len
    model.decode(torch.zeros(1, n, cfg.d_model))
    with pytest.raises(vc.UserError, match=f"sequence of {n + 1} positions exceeds the context {n}"):
        model.decode(torch.zeros(1, n + 1, cfg.d_model))


@_vc_1t
def test_vc_sampling_follows_the_temperature(monkeypatch):
    """generate samples its first token from softmax(logits / temperature) (4000 rows, one fixed set of logits)."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    monkeypatch.setattr(vc, "prefill_input", lambda model, images: torch.zeros(len(images), 1, 1))
    monkeypatch.setattr(vc, "next_logits", lambda model, x, cache=None, pos=0: logits.expand(len(x), -1))
    stub = types.SimpleNamespace(eval=lambda: None, n_prefix=1, layers=[None])
    cfg = vc.Config(**{**vc.PRESETS["tiny"], "temperature": 2.0, "max_new_tokens": 1})
    rows = vc.generate(stub, torch.zeros(4000, 1), cfg, generator=torch.Generator().manual_seed(0))
    share = torch.bincount(torch.tensor([r[0] if r else 0 for r in rows]), minlength=4) / 4000.0
    assert torch.allclose(share, (logits[0] / 2.0).softmax(-1), atol=0.025), share


def test_vc_a_finished_row_writes_nothing_more(monkeypatch):
    """In a batch, a row that wrote EOS only pads with EOS while the other rows go on: its caption ends there. The
    greedy picks are scripted: row 0 ends at once, row 1 writes 2 and 3, then ends."""
    picks = iter([[0, 2], [3, 3], [3, 0]])  # the argmax of rows 0 and 1 at each step
    monkeypatch.setattr(vc, "prefill_input", lambda model, images: torch.zeros(len(images), 1, 1))
    monkeypatch.setattr(vc, "next_logits", lambda model, x, cache=None, pos=0:
                        torch.nn.functional.one_hot(torch.tensor(next(picks)), 5).float())
    stub = types.SimpleNamespace(eval=lambda: None, n_prefix=1, layers=[None],
                                 embed_tokens=lambda ids: torch.zeros(*ids.shape, 1))
    cfg = vc.Config(**{**vc.PRESETS["tiny"], "max_new_tokens": 5})
    assert vc.generate(stub, torch.zeros(2, 1), cfg) == [[], [2, 3]]


def test_vc_letterbox_pads_both_ends_equally(tmp_path):
    """A wide image is padded equally above and below (its edge rows repeated): a 32 x 8 strip whose top row is white
    fills a 32 x 32 square with 12 rows of padding, then the strip, then 12 more."""
    strip = np.zeros((8, 32, 3), np.uint8)
    strip[0] = 255
    cv2.imwrite(str(tmp_path / "wide.png"), strip)
    img = vc.load_image(str(tmp_path / "wide.png"), 32)
    assert img.shape == (32, 32, 3) and (img.min((1, 2)) == 255).sum() == 13 and (img[13:] == 0).all()


@_vc_1t
def test_vc_batch_equals_rows():
    model, cfg = _vc_model(dtype=torch.float64)
    images = _vc_images(4, cfg)
    cfg = dataclasses.replace(cfg, max_new_tokens=8)
    batch = vc.generate(model, images, cfg)
    assert batch == [vc.generate(model, images[i:i + 1], cfg)[0] for i in range(4)]
    beam = dataclasses.replace(cfg, beam=3)
    assert vc.generate(model, images, beam) == [vc.generate(model, images[i:i + 1], beam)[0] for i in range(4)]


def _vc_logprob(model, image, ids):
    """Sum of log-probabilities of ids followed by EOS (the beam search's score before length normalisation)."""
    x = torch.cat([vc.prefill_input(model, image[None]), model.embed_tokens(torch.tensor([ids], dtype=torch.long))], 1)
    logp = model.lm_head(model.decode(x))[0, model.n_prefix:].double().log_softmax(-1)
    return sum(logp[i, t].item() for i, t in enumerate(ids + [0]))


@_vc_1t
def test_vc_beam_search_finds_best_of_brute_force():
    """On a 4-token vocabulary and 3 steps, beam search (wide enough to be exhaustive) must return the sequence that
    maximises log p / length over every sequence brute force enumerates."""
    model, cfg = _vc_model(vocab=4, dtype=torch.float64, max_len=4)
    image = _vc_images(1, cfg)[0]
    cfg = dataclasses.replace(cfg, beam=16, max_new_tokens=3)
    got = vc.generate(model, image[None], cfg)[0]
    cands = [[]] + [[a] for a in (1, 2, 3)] + [[a, b] for a in (1, 2, 3) for b in (1, 2, 3)]
    best = max(cands, key=lambda s: _vc_logprob(model, image, s) / (len(s) + 1))
    assert got == best


@_vc_1t
def test_vc_sampler_properties():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    assert torch.isfinite(vc.filter_logits(logits, 2, 1.0)).sum() == 2
    p = logits.softmax(-1)[0]  # top_p keeps the smallest prefix whose mass reaches p
    assert torch.isfinite(vc.filter_logits(logits, 0, float(p[0]) - 1e-3)).sum() == 1
    assert torch.isfinite(vc.filter_logits(logits, 0, float(p[0] + p[1]) + 1e-3)).sum() == 3
    assert torch.isfinite(vc.filter_logits(logits[:, [2, 0, 1]], 0, 0.0)).tolist() == [[False, True, False]]
    model, cfg = _vc_model()
    images = _vc_images(3, cfg)
    hot = dataclasses.replace(cfg, temperature=1.5, top_k=5, max_new_tokens=8)
    a = vc.generate(model, images, hot, generator=torch.Generator().manual_seed(1))
    b = vc.generate(model, images, hot, generator=torch.Generator().manual_seed(1))
    c = vc.generate(model, images, hot, generator=torch.Generator().manual_seed(2))
    assert a == b and a != c  # seeded: reproducible, and --seed matters
    # top_k=1 sampling is greedy whatever the temperature
    assert vc.generate(model, images, dataclasses.replace(hot, top_k=1), generator=torch.Generator()) == \
        vc.generate(model, images, dataclasses.replace(cfg, max_new_tokens=8))
    # sampled token frequencies follow softmax(logits / T)
    g = torch.Generator().manual_seed(0)
    probs = vc.filter_logits(logits / 2.0, 0, 1.0).softmax(-1)
    draws = torch.multinomial(probs.expand(20000, -1), 1, generator=g)[:, 0]
    assert torch.allclose(torch.bincount(draws, minlength=5) / 20000.0, probs[0], atol=0.015)


def test_vc_tokenizer_wraps_captions_in_eos():
    """A caption encodes to [BOS, its GPT-2 tokens, EOS], <|endoftext|> (GPT-2 id 50256) being model id 0 at both ends:
    the EOS target is what teaches the model to stop. Decoding drops it again."""
    tok = vc.Tokenizer.from_captions(["a red patch", "a blue patch"])
    ids = tok.encode("a red patch")
    assert tok.ids[0] == 50256 and ids[0] == ids[-1] == 0 and len(ids) == 5
    assert [tok.ids[i] for i in ids[1:-1]] == [64, 2266, 8529]  # GPT-2's "a", " red", " patch"
    assert tok.decode(ids) == "a red patch"


def test_vc_caption_lengths_at_the_limits_are_accepted():
    """"a red patch" is 5 tokens with BOS and EOS: it fits --max_len 5 exactly and needs 4 new tokens (EOS included);
    one less of either is refused, naming the flag and the length needed."""
    tok = vc.Tokenizer.from_captions(["a red patch"])
    data, cfg = {"train": ([("a.png", ["a red patch"])], None)}, vc.Config(max_len=5, max_new_tokens=4)
    vc.check_lengths(tok, data, cfg, ("train",), grow=True)  # exactly at both limits: accepted
    with pytest.raises(vc.UserError, match="--max_len 4 must be at least 5"):
        vc.check_lengths(tok, data, dataclasses.replace(cfg, max_len=4), ("train",), grow=True)
    with pytest.raises(vc.UserError, match="--max_new_tokens 3 must be at least 4"):
        vc.check_lengths(tok, data, dataclasses.replace(cfg, max_new_tokens=3), ("train",), grow=True)


@_vc_1t
def test_vc_metrics_hand_computed():
    assert vc.exact_match(["A red circle.", "a blue square"], [["a red circle"], ["a red square"]]) == 0.5
    assert vc.exact_match(["a red, round circle!"], [["A red round circle"]]) == 1.0  # punctuation dropped
    assert vc.cider_d(["a b c d", "w, x y z"], [["a b c d"], ["w x y z"]]) == pytest.approx(10.0)
    assert vc.bleu4(["a b c d e"], [["a b c d e"]]) == pytest.approx(1.0)
    # precisions 4/5, 3/4, 2/3, 1/2 and no brevity penalty
    assert vc.bleu4(["a b c d e"], [["a b c d f"]]) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # hypothesis 4 words, closest reference 6: brevity penalty exp(1 - 6/4)
    assert vc.bleu4(["a b c d"], [["a b c d e f", "q"]]) == pytest.approx(math.exp(1 - 6 / 4))
    assert vc.bleu4(["x y z"], [["a b c d"]]) == 0.0 and vc.bleu4(["a b z"], [["a b c"]]) == 0.0  # no 3-gram matches
    assert vc.bleu4(["a b c"], [["a b c"]]) == pytest.approx(1.0)  # no 4-grams to score: orders 1-3
    # clipped: an n-gram counts at most as often as the one reference holding it most, not the references' sum
    twice = pytest.approx((4 / 8 * 3 / 7 * 2 / 6 * 1 / 5) ** 0.25)
    assert vc.bleu4(["a b c d a b c d"], [["a b c d", "a b c d"]]) == twice
    # references of 5 and 3 words are equally close to 4: the shorter one counts, so no brevity penalty
    assert vc.bleu4(["a b c d"], [["a b c d e", "a b c"]]) == pytest.approx(1.0)
    # CIDEr-D: two images, x y vs reference x y z; every n-gram of image 1 has idf log 2; image 2's two references
    # (equal once normalised) are averaged
    got = vc.cider_d(["x y", "p q"], [["x y z"], ["p q", "P q."]])
    first = (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * 10 * math.exp(-1 / 72)
    second = (1 + 1) / 4 * 10  # unigrams and the bigram match exactly; no 3/4-grams
    assert got == pytest.approx((first + second) / 2)
    # hypothesis counts are clipped to the reference's: "x x" against "x y" matches one x, cosine 1 / (2 sqrt 2)
    assert vc.cider_d(["x x", "p q"], [["x y"], ["p q"]]) == pytest.approx((10 / 4 / (2 * math.sqrt(2)) + second) / 2)


@_vc_1t
def test_vc_grad_accumulation_equals_big_batch(tmp_path):
    a, _ = vc.train(_vc_cfg(tmp_path / "a", batch_size=8, grad_accum=1, max_steps=3))
    b, _ = vc.train(_vc_cfg(tmp_path / "b", batch_size=4, grad_accum=2, max_steps=3))
    assert torch.allclose(_vc_weights(a), _vc_weights(b), atol=1e-5)


@_vc_1t
def test_vc_train_step_clips_the_global_gradient_norm():
    """train_step clips the gradient to --grad_clip (one global norm) before the optimizer steps: with plain SGD at
    lr 1 the weights move by exactly the clipped gradient, whose norm is grad_clip."""
    model, cfg = _vc_model(dtype=torch.float64, grad_clip=1e-3, batch_size=2)
    inp, tgt = vc.pad_batch([[0, 1, 2, 0], [0, 3, 0]])
    opt, before = torch.optim.SGD(model.parameters(), lr=1.0), _vc_weights(model)
    vc.train_step(model, opt, torch.amp.GradScaler("cpu", enabled=False), (_vc_images(2, cfg), inp, tgt), cfg, "cpu",
                  0, 1)
    assert (_vc_weights(model) - before).norm().item() == pytest.approx(1e-3, rel=1e-4)


@_vc_1t
def test_vc_weight_decay_on_matrices_only(tmp_path):
    """AdamW decays the weight matrices (projections, patch and token embeddings, lm_head) and nothing else: the norm
    gains, the biases, the ViT's position table and its CLS token are added or multiplied in as they are, undecayed."""
    cfg = _vc_cfg(tmp_path, pool="cls", patch_init="random")
    model, _, opt, _, _ = vc.init_training(cfg, [("a.png", ["a red patch"])], _vc_images(2, cfg), None, "cpu")
    name = {id(p): n for n, p in model.named_parameters()}
    (decay, decayed), (zero, kept) = ((g["weight_decay"], {name[id(p)] for p in g["params"]}) for g in opt.param_groups)
    assert (decay, zero) == (cfg.weight_decay, 0.0) and decayed | kept == set(name.values())
    assert kept == {n for n in name.values() if "norm" in n or n.endswith("bias")} | {"vit.pos_embed", "vit.cls_token"}
    assert "embed_tokens.weight" in decayed and "vit.patch_embed.weight" in decayed


@_vc_1t
def test_vc_training_steps_follow_the_schedule(tmp_path, monkeypatch):
    """Step s of a run trains at lr_at(s): warmup 2 and 4 steps give 1e-3 (the first step already moves), the peak
    2e-3, the peak again where the cosine starts, then halfway from it to min_lr."""
    real, seen = vc.train_step, []
    monkeypatch.setattr(vc, "train_step", lambda model, opt, *a: seen.append(opt.param_groups[0]["lr"]) or
                        real(model, opt, *a))
    vc.train(_vc_cfg(tmp_path, max_steps=4, warmup=2, lr=2e-3, min_lr=1e-4, n_test=2, n_novel=2))
    assert seen == pytest.approx([1e-3, 2e-3, 2e-3, 1e-4 + 0.5 * 1.9e-3])


@_vc_1t
def test_vc_save_cut_off_before_train_state_refuses_resume(capsys, tmp_path, monkeypatch):
    """A save stopped after the new weights but before the new train_state.pt: --resume refuses (the older state would
    go on from its step with the newer weights)."""
    cut = str(tmp_path / "cut")
    vc.train(_vc_cfg(tmp_path, out_dir=cut, stop_after=2))
    resume_with_a_save_cut_off(vc.main, monkeypatch, cut)
    main_user_error(vc.main, capsys, ["--train", "--resume", "--out_dir", cut], "nothing to resume (no train_state.pt)")


@_vc_1t
def test_vc_resume_refuses_a_damaged_or_foreign_train_state(capsys, tmp_path):
    """A train_state.pt that is a bare tensor, a dict without "step" or "optimizer", or another run's (other widths or
    vocabulary: AdamW's own load checks only the group sizes) was a traceback (with a torch warning first, or after the
    data was built); now one line naming the file, before any data, and nothing in out_dir changes."""
    cut, other, data = tmp_path / "cut", tmp_path / "other", tmp_path / "data"
    vc.train(_vc_cfg(tmp_path, out_dir=str(cut), stop_after=2))
    vc.train(_vc_cfg(tmp_path, out_dir=str(other), stop_after=1, compact_vocab=False, d_model=16, n_head=2))
    good, path = torch.load(cut / "train_state.pt"), cut / "train_state.pt"
    os.rename(data, tmp_path / "moved")  # a refusal before any data does not build the world again
    for bad in (torch.zeros(3), {"x": 1}, {k: v for k, v in good.items() if k != "step"},
                {k: v for k, v in good.items() if k != "optimizer"}, torch.load(other / "train_state.pt")):
        torch.save(bad, path)
        before = {f.name: f.read_bytes() for f in cut.iterdir()}
        with warnings.catch_warnings(record=True) as caught:  # no torch warning before the line either
            warnings.simplefilter("always")
            main_user_error(vc.main, capsys, ["--train", "--resume", "--out_dir", cut], f"{path}: damaged or "
                            "another run's", "train again without --resume")
        assert not [w for w in caught if issubclass(w.category, UserWarning)], [str(w.message) for w in caught]
        assert {f.name: f.read_bytes() for f in cut.iterdir()} == before and not data.exists()


@_vc_1t
def test_vc_checkpoint_keys_must_match_exactly(tmp_path):
    """Weights with a key missing, an extra key or a tensor of another shape are refused in one line naming the key,
    never loaded in part."""
    model, cfg = _vc_model()
    vc.save_checkpoint(model, vc.Tokenizer(range(23)), dataclasses.replace(cfg, out_dir=str(tmp_path)),
                       torch.optim.AdamW(model.parameters()), 0, torch.amp.GradScaler("cpu", enabled=False))
    path = str(tmp_path / "model.safetensors")
    good = vc.load_file(path)
    for state, needle in (({**good, "extra.weight": torch.zeros(1)}, "unexpected ['extra.weight']"),
                          ({k: v for k, v in good.items() if k != "norm.weight"}, "missing ['norm.weight']"),
                          ({**good, "norm.weight": torch.zeros(5)}, "mis-shaped ['norm.weight']")):
        vc.save_file(state, path)
        with pytest.raises(vc.UserError, match=re.escape(needle)):
            vc.load_checkpoint(str(tmp_path))


def test_vc_checkpoint_round_trip_and_exact_resume(tmp_path, capsys):
    """--resume takes the architecture and the rest of the run from the checkpoint (no --preset needed), refuses a
    typed flag that asks for another architecture by name, and refuses before it reads or builds any data."""
    full, _ = vc.train(_vc_cfg(tmp_path, out_dir=str(tmp_path / "full"), vit_dropout=0.2, dropout=0.1))
    cut, nodata = tmp_path / "cut", tmp_path / "nodata"
    vc.train(_vc_cfg(tmp_path, out_dir=str(cut), vit_dropout=0.2, dropout=0.1, stop_after=3))
    main_user_error(vc.main, capsys, ["--train", "--resume", "--out_dir", cut, "--data_dir", nodata, "--d_model", 64,
                                      "--pool", "patches"], "--d_model 64 (saved as --d_model 32)")
    for argv, named in ((["--train", "--resume", "--no-compact_vocab"], "drop --no-compact_vocab (saved as "
                         "--compact_vocab)"), (["--eval", "--compile"], "drop --compile (saved as --no-compile)")):
        # booleans named as typed, the saved value too
        main_user_error(vc.main, capsys, [*argv, "--out_dir", cut, "--data_dir", nodata], named)
    os.makedirs(tmp_path / "bad")
    for name in ("config.json", "model.safetensors"):
        (tmp_path / "bad" / name).write_bytes((cut / name).read_bytes())
    (tmp_path / "bad" / "train_state.pt").write_bytes((cut / "train_state.pt").read_bytes()[:300])  # truncated
    main_user_error(vc.main, capsys, ["--train", "--resume", "--out_dir", tmp_path / "bad", "--data_dir", nodata],
                    "train_state.pt", "without --resume")
    before = {f.name: f.read_bytes() for f in cut.iterdir()}
    for stop in (3, 2):  # cut at step 3: the same --stop_after again would train one step past it and stop there
        main_user_error(vc.main, capsys, ["--train", "--resume", "--out_dir", cut, "--data_dir", nodata, "--stop_after",
                                          stop], "cut: saved at step 3: pass a --stop_after above it, or drop it")
    assert {f.name: f.read_bytes() for f in cut.iterdir()} == before
    assert not nodata.exists()  # all refused before the synthetic world was built
    capsys.readouterr()
    ts = torch.load(cut / "train_state.pt")  # the time trained so far is saved; --resume adds this part's to it
    assert 0 < ts["seconds"] < 600
    torch.save({**ts, "seconds": ts["seconds"] + 1000}, cut / "train_state.pt")  # as if it had taken 1000s longer
    vc.main(["--train", "--resume", "--out_dir", str(cut), "--max_steps", "6"])  # the README's command, no --preset
    out = capsys.readouterr().out
    assert '"n_train": 64' in out  # the config printed is the run's, not the default preset's
    assert re.search(r"^trained 6 steps in 1\d\d\ds \(data included; 1\d\d\ds of it before --resume\)$", out, re.M)
    assert json.load(open(cut / "eval.json"))["train_seconds"] >= ts["seconds"] + 1000  # the whole run's
    resumed, rtok, rcfg = vc.load_checkpoint(str(cut))
    assert torch.equal(_vc_weights(full), _vc_weights(resumed))  # dropout RNG and optimizer state restored
    state = {k: v for k, v in torch.load(cut / "train_state.pt").items() if k != "seconds"}  # a state without it
    with torch.random.fork_rng(devices=[]):  # (init_training sets the saved RNG state)
        assert vc.init_training(rcfg, [], None, (resumed, rtok, state), "cpu")[4] == (6, 0.0)  # resumes; counts 0
    loaded, tok, lcfg = vc.load_checkpoint(str(tmp_path / "full"))
    assert torch.equal(_vc_weights(loaded), _vc_weights(full)) and lcfg.vit_dim == vc.PRESETS["tiny"]["vit_dim"]
    ev = json.load(open(tmp_path / "full" / "eval.json"))
    assert set(ev) == {"test", "novel", "train_seconds", "config"} and ev["test"]["n"] == 12
    assert 0 <= ev["test"]["exact_match"] <= 1 and ev["test"]["samples"]
    assert cv2.imread(str(tmp_path / "full" / "attention.png")) is not None
    # a run at or past its --max_steps has nothing to train (it would only evaluate again): refused, nothing written
    before = {f.name: f.read_bytes() for f in (tmp_path / "full").iterdir()}
    for more in ([], ["--max_steps", 4]):
        main_user_error(vc.main, capsys, ["--train", "--resume", "--out_dir", tmp_path / "full", "--data_dir", nodata,
                                          *more], "full: saved at step 6: pass a --max_steps above it, or --eval")
    assert {f.name: f.read_bytes() for f in (tmp_path / "full").iterdir()} == before and not nodata.exists()


@_vc_1t
def test_vc_world_splits_and_captions(tmp_path):
    cfg = _vc_cfg(tmp_path, n_train=60, n_test=30, n_novel=30)
    files = vc.build_world(cfg)
    pairs = lambda cap: {(w[i + 1], w[i + 2]) for w in [cap.split()] for i in range(len(w) - 2)  # noqa: E731
                         if w[i] in vc.SIZES}
    train, test = vc.read_captions(files["train"]), vc.read_captions(files["test"])
    novel = vc.read_captions(files["novel"])
    assert all(not (pairs(c) & vc.NOVEL_PAIRS) for _, cs in train + test for c in cs)  # test: only pairs seen
    assert all(pairs(cs[0]) & vc.NOVEL_PAIRS for _, cs in novel)
    assert {len(cs) for _, cs in train} == {1, 2}  # one object: one caption; two: both points of view
    seen = {cv2.imread(path).tobytes() for path, _ in train}  # test images are new draws, not training ones again
    assert not any(cv2.imread(path).tobytes() in seen for path, _ in test)
    # the pixels agree with both captions: in "A above B" A's colour sits higher, in "A to the left of B" further left
    for path, cs in train:
        for w in (c.split() for c in cs):
            rel = next((r for r in ("above", "below", "left", "right") if r in w), None)
            if rel and w[2] != w[-2]:
                img = cv2.imread(path)
                at = [np.nonzero((np.abs(img.astype(int) - vc.COLOURS[c]).sum(-1) < 30).any(
                    1 if rel in ("above", "below") else 0))[0].mean() for c in (w[2], w[-2])]  # mean row or column
                assert (at[0] < at[1]) == (rel in ("above", "left")), (path, cs)


@_vc_1t
def test_vc_image_loader_any_size(tmp_path):
    img = np.zeros((37, 100, 3), np.uint8)
    img[:, :, 2] = 255  # BGR red
    cv2.imwrite(str(tmp_path / "wide.jpg"), img)
    out = vc.load_image(str(tmp_path / "wide.jpg"), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and out[8, 8, 0] > 200 and out[8, 8, 2] < 50  # RGB
    cv2.imwrite(str(tmp_path / "grey.png"), np.full((5, 7), 128, np.uint8))
    assert vc.load_image(str(tmp_path / "grey.png"), 16).shape == (16, 16, 3)
    # a 1 x 60000 strip is shrunk before it is padded (padded first: a 60000 x 60000 square, 10.8 GB): a process
    # limited to 4 GB of address space reads it
    cv2.imwrite(str(tmp_path / "strip.png"), np.full((1, 60000, 3), 200, np.uint8))
    code = (f"import resource; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30)); import vit_caption as vc; "
            f"print(vc.load_image({str(tmp_path / 'strip.png')!r}, 16)[8, 8].tolist())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split() == ["[200,", "200,", "200]"], proc.stderr[-2000:]


@_vc_1t
def test_vc_max_train_and_small_sets(tmp_path):
    data = vc.prepare_data(_vc_cfg(tmp_path, max_train=16), 0)
    assert len(data["train"][0]) == 16 and data["train"][1].shape[0] == 16
    idx = vc.global_batch(0, 5, 12, 0)  # a batch larger than the set: every image, repeated
    assert len(idx) == 12 and set(idx.tolist()) == set(range(5))


@pytest.mark.parametrize("m", [vm, vc], ids=["vm", "vc"])
def test_vm_vc_learning_rate_schedule_and_epochs_by_hand(m):
    """Linear warmup (the first step already moves), then a cosine from lr to min_lr; each epoch is a fresh
    permutation of the clips (images), each once per epoch."""
    cfg = m.Config(**{**m.PRESETS["tiny"], "lr": 1.0, "min_lr": 0.1, "warmup": 4, "max_steps": 24})
    lrs = [m.lr_at(step, cfg) for step in range(25)]
    assert lrs[:5] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0]) and lrs[14] == pytest.approx(0.55)
    assert lrs[24] == pytest.approx(0.1) == m.lr_at(99, cfg)
    epochs = [torch.cat([m.global_batch(e * 3 + k, 12, 4, 0) for k in range(3)]).tolist() for e in range(3)]
    assert all(sorted(e) == list(range(12)) for e in epochs) and len({tuple(e) for e in epochs}) == 3


@_vc_1t
def test_vc_pixels_and_mean_pool_by_hand():
    """Pixels 0..255 map to [-1, 1]; pool "mean" is the mean of the patch tokens that pool "patches" returns."""
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    assert vc.pixels(x).flatten().tolist() == pytest.approx([-1.0, -0.6, 1.0])
    mean, cfg = _vc_model("mean")
    patches = vc.ViT(dataclasses.replace(cfg, pool="patches")).eval()
    patches.load_state_dict(mean.vit.state_dict())
    x = vc.pixels(_vc_images(2, cfg))
    with torch.no_grad():
        torch.testing.assert_close(mean.vit(x), patches(x).mean(1, keepdim=True))


@_vc_1t
@pytest.mark.parametrize("pool", ["cls", "mean", "patches"])
def test_vc_vit_tokens_and_pools_by_hand(pool):
    """With no ViT blocks the tower is patch embedding + positions + the final LayerNorm, written out here: each patch
    (row by row, in unfold's order) times the conv's weight, plus its position vector, normalised. Pool "cls" reads
    the CLS token's own slot (the same vector for every image), "mean" the mean of the patch tokens."""
    model, cfg = _vc_model(pool, vit_layers=0)
    vit, x = model.vit, vc.pixels(_vc_images(2, cfg))
    cols = torch.nn.functional.unfold(x, cfg.patch, stride=cfg.patch).transpose(1, 2)  # (B, P, 3*p*p)
    pos = vit.pos_embed[0]  # (1+P, E) with a CLS token, else (P, E)
    norm = lambda t: torch.nn.functional.layer_norm(t, (cfg.vit_dim,))  # noqa: E731
    tokens = norm(cols @ vit.patch_embed.weight.flatten(1).T + vit.patch_embed.bias + pos[-cols.shape[1]:])
    if pool == "cls":
        want = norm(vit.cls_token[0] + pos[:1]).expand(2, 1, -1)
    else:
        want = tokens.mean(1, keepdim=True) if pool == "mean" else tokens
    with torch.no_grad():
        torch.testing.assert_close(vit(x), want, atol=1e-5, rtol=1e-5)


@_vc_1t
def test_vc_original_preset_sizes():
    cfg = vc.Config(**vc.PRESETS["original"])
    with torch.device("meta"):
        model = vc.ViTCaptioner(cfg, 50257)
    parts = model.part_counts()
    E, D, M = 512, 128, 11008
    block = 4 * E * E + 4 * E + 2 * E * 2048 + 2048 + E + 4 * E  # q/k/v/o_proj, MLP, two LayerNorms
    assert parts["vit"] == 3 * 16 * 16 * E + E + E + 37 * E + 16 * block + 2 * E
    assert parts["projection"] == E * D + D
    assert parts["decoder layers"] == 8 * (4 * D * D + 3 * D * M + 2 * D) + D
    assert parts["embedding"] == parts["lm_head"] == 50257 * D


@_vc_1t
def test_vc_bench_runs_with_a_context_shorter_than_its_16_tokens(capsys):
    """--bench fed 16 text tokens whatever --max_len allowed (it was a refusal for a context --train accepts)."""
    vc.main(["--bench", "--preset", "tiny", "--max_len", "14"])
    out = capsys.readouterr().out
    assert "train  (float32)" in out and "(batch 8, 13 tokens each" in out


def test_vc_train_eval_generate_cli(tmp_path, capsys, monkeypatch):
    """--train through a subprocess (the real command line); --eval, --generate and their bad inputs in-process."""
    out, data = str(tmp_path / "out"), str(tmp_path / "data")
    p = run_script("vit_caption.py", "--train", "--preset", "tiny", "--data_dir", data, "--out_dir", out)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "exact" in p.stdout and os.path.isfile(os.path.join(out, "eval.json"))
    check_val_column(p.stdout, eval_interval=4, max_steps=6)  # the tiny preset logs every 2 steps
    capsys.readouterr()
    trained = json.load(open(os.path.join(out, "eval.json")))["train_seconds"]
    decoded, load_image = [], vc.load_image  # --eval decodes what it scores, test and novel: no training image
    monkeypatch.setattr(vc, "load_image", lambda p, size: decoded.append(os.path.dirname(p)) or load_image(p, size))
    vc.main(["--eval", "--data_dir", data, "--out_dir", out])
    assert "novel" in capsys.readouterr().out
    assert sorted(decoded) == [os.path.join(data, s) for s in ["novel"] * 12 + ["test"] * 12]
    monkeypatch.undo()
    assert json.load(open(os.path.join(out, "eval.json")))["train_seconds"] == trained > 0  # --eval keeps it
    for argv in (["--eval"], ["--train", "--resume"], ["--generate", "--image", "a.png"]):  # sizes: the checkpoint's
        main_user_error(vc.main, capsys, argv + ["--preset", "tiny", "--out_dir", out], "--preset tiny", "drop --preset")
    assert vc.parse_args(["--train", "--eval", "--preset", "tiny"])[1].d_model < vc.Config().d_model  # --train's sizes
    for argv in (["--eval", "--image", "a.png"], ["--generate"]):  # --image without --generate, or the other way round
        main_user_error(vc.main, capsys, argv, "--generate and --image PATH")
    for argv in (["--eval"], ["--generate", "--image", "a.png"]):  # training flags would be ignored: refused
        main_user_error(vc.main, capsys, argv + ["--out_dir", out, "--lr", "0.5"],
                        "drop --lr 0.5 (saved as --lr 0.002)")
    main_user_error(vc.main, capsys, ["--generate", "--image", "a.png", "--out_dir", out, "--data", "my data.txt"],
                    "my data.txt' (saved as --data '')")  # quoted as a shell needs: a space, nothing
    img = np.random.default_rng(0).integers(0, 255, (300, 131, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "odd.jpg"), img)
    drawn, draw = [], vc.attention_png
    monkeypatch.setattr(vc, "attention_png", lambda *a, **k: drawn.append(draw(*a, **k)))  # the picture's caption
    vc.main(["--generate", "--image", str(tmp_path / "odd.jpg"), "--out_dir", out, "--temperature", "0.8",
             "--top_p", "0.9"])
    assert cv2.imread(os.path.join(out, "caption_odd.png")) is not None
    lines = capsys.readouterr().out.splitlines()
    printed = json.loads(lines[0].split("config: ", 1)[1])  # the config that runs
    assert printed["d_model"] == vc.PRESETS["tiny"]["d_model"] != vc.Config.d_model and printed["temperature"] == 0.8
    # the caption printed is the one sampled with those flags from a generator seeded by --seed: reproducible
    model, tok, cfg = vc.load_checkpoint(out, {"temperature": 0.8, "top_p": 0.9})
    image = torch.from_numpy(vc.load_image(str(tmp_path / "odd.jpg"), cfg.img_size))[None]
    ids = vc.generate(model, image, cfg, generator=torch.Generator().manual_seed(cfg.seed))
    assert lines[1] == tok.decode(ids[0]) == drawn[0]  # the picture shows the printed caption
    long = "\u00e9" * 125  # 250 bytes + .png: a name the file system takes; caption_<it>.png, 262 bytes, it refuses
    cv2.imwrite(os.fsencode(str(tmp_path / f"{long}.png")), img)  # its picture's name keeps the first 60 characters
    vc.main(["--generate", "--image", str(tmp_path / f"{long}.png"), "--out_dir", out])
    assert os.path.isfile(os.path.join(out, f"caption_{long[:60]}.png"))
    # bad inputs: one line, exit status 2, nothing saved lost
    before = open(os.path.join(out, "model.safetensors"), "rb").read()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    for args, needle in ((["--image", tmp_path / "missing.png"], "missing.png"),
                         (["--image", tmp_path / "empty.png"], "empty"),
                         (["--image", tmp_path / "junk.png"], "junk.png"),
                         ([], "--image")):
        main_user_error(vc.main, capsys, ["--generate", "--out_dir", out, *args], needle)
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == before
    # a new run into this folder: its first save removes the old run's scores and attention picture with its state
    capsys.readouterr()
    vc.main(["--train", "--preset", "tiny", "--data_dir", data, "--out_dir", out, "--stop_after", "1"])
    assert f"stopped after step 1 as asked; go on with --train --resume --out_dir {out}\n" in capsys.readouterr().out
    assert not any(os.path.exists(os.path.join(out, n)) for n in ("eval.json", "attention.png"))
    assert torch.load(os.path.join(out, "train_state.pt"))["step"] == 1


def test_vc_cut_off_transparent_and_folder_images(tmp_path):
    """A JPEG cut short (libjpeg would fill it with grey) is refused, one with data after its end marker (a motion
    photo) loads; transparent pixels (8- and 16-bit) are composited onto white; a folder is named as a folder."""
    img = np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "a.jpg"), img)
    whole = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(whole + b"\x00\x00\x00\x18ftypmp42" + bytes(100))
    assert vc.load_image(str(tmp_path / "a.jpg"), 24).shape == (24, 24, 3)
    (tmp_path / "a.jpg").write_bytes(whole[:len(whole) * 6 // 10])
    with pytest.raises(vc.UserError, match=r"a\.jpg: this image is cut off"):
        vc.load_image(str(tmp_path / "a.jpg"), 24)
    blend = lambda c, a: (c * a + 255 * (255 - a) + 127) // 255  # onto white, rounded as PIL
    for alpha in (0, 128, 255):
        bgra = np.zeros((8, 8, 4), np.uint8)
        bgra[..., 2], bgra[..., 3] = 200, alpha  # red under alpha
        cv2.imwrite(str(tmp_path / "t.png"), bgra)
        assert tuple(vc.load_image(str(tmp_path / "t.png"), 8)[0, 0]) == (blend(200, alpha), blend(0, alpha),
                                                                           blend(0, alpha))
    cv2.imwrite(str(tmp_path / "t16.png"), np.full((8, 8, 4), 257 * 128, np.uint16))  # 16-bit grey at half alpha
    assert tuple(vc.load_image(str(tmp_path / "t16.png"), 8)[0, 0]) == (blend(128, 128),) * 3
    with pytest.raises(vc.UserError, match="a folder, not an image"):
        vc.load_image(str(tmp_path), 8)


@_vc_1t
def test_vc_long_captions_and_unknown_words_on_resume(tmp_path, capsys):
    """A training caption longer than --max_len (no position for its end) is refused with its token count; --resume on
    captions with a word the saved token table lacks (encode would drop it) is refused naming it, nothing written."""
    for i, bgr in enumerate(((0, 0, 255), (255, 0, 0))):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.full((16, 16, 3), bgr, np.uint8))
    (tmp_path / "caps.txt").write_text("0.png | a red patch\n1.png | a blue patch\n")
    (tmp_path / "long.txt").write_text("0.png | a red patch\n1.png | a blue patch on a grey field by the left side\n")
    (tmp_path / "new.txt").write_text("0.png | a red patch\n1.png | a blue xylophone\n")
    run = lambda ann, *more: ["--train", "--data", tmp_path / ann, "--test_data", tmp_path / ann, "--out_dir",
                              tmp_path / "o", *more]
    main_user_error(vc.main, capsys, run("long.txt", "--preset", "tiny", "--max_len", "8"),
                    "a training caption is 13 tokens long", "--max_len 8 must be at least 13")
    main_user_error(vc.main, capsys, run("long.txt", "--preset", "tiny", "--max_new_tokens", "11"),
                    "a training caption is 13 tokens long", "--max_new_tokens 11 must be at least 12")
    vc.main(list(map(str, run("caps.txt", "--preset", "tiny", "--max_steps", "2", "--stop_after", "1"))))
    before = {f.name: f.read_bytes() for f in (tmp_path / "o").iterdir()}
    main_user_error(vc.main, capsys, run("new.txt", "--resume"), "new.txt: 'x", "(in 'a blue xylophone')",
                    "has no token for it")
    # a caption past the saved --max_len on --resume: the run cannot grow, so the fix is the caption, not the flag
    (tmp_path / "longer.txt").write_text("0.png | a red patch\n1.png | a" + " blue patch" * 13 + "\n")
    main_user_error(vc.main, capsys, run("longer.txt", "--resume"), "a training caption is 29 tokens long",
                    "more than the model writes (24)", f"edit {tmp_path / 'longer.txt'}")
    assert {f.name: f.read_bytes() for f in (tmp_path / "o").iterdir()} == before


@_vc_1t
def test_vc_bad_inputs(tmp_path, capsys):
    (tmp_path / "a.png").write_bytes(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    (tmp_path / "missing.txt").write_text("a.png | a small red circle\n\nb.png | a large blue square\n")
    (tmp_path / "malformed.txt").write_text("# comment\na.png | a small red circle\na.png a caption without bar\n")
    (tmp_path / "empty_cap.txt").write_text("a.png |   \n")
    (tmp_path / "latin1.txt").write_bytes("a.png | caf\xe9\n".encode("latin-1"))
    for name, needles in (("missing.txt", ["missing.txt:3", "b.png"]), ("malformed.txt", ["malformed.txt:3"]),
                          ("empty_cap.txt", ["empty_cap.txt:1", "caption"]), ("nope.txt", ["nope.txt"]),
                          ("latin1.txt", ["latin1.txt", "UTF-8"])):
        main_user_error(vc.main, capsys, ["--train", "--preset", "tiny", "--data", tmp_path / name, "--out_dir", tmp_path / "o"],
                       *needles)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"script": "videollama_mini", "config": {}}))
    (other / "model.safetensors").write_bytes(b"x")
    main_user_error(vc.main, capsys, ["--eval", "--out_dir", other], "videollama_mini")
    (other / "config.json").write_text("{not json")
    main_user_error(vc.main, capsys, ["--eval", "--out_dir", other], "config.json")
    main_user_error(vc.main, capsys, ["--eval", "--out_dir", tmp_path / "none"], "no checkpoint")
    main_user_error(vc.main, capsys, ["--train", "--resume", "--out_dir", tmp_path / "none", "--data_dir",
                                      tmp_path / "d"], "resume")
    assert not (tmp_path / "d").exists()  # refused before the synthetic world was built
    # --test_data without --data would be ignored for the world's own test split: refused, before the world is built
    lone = ["--test_data", tmp_path / "missing.txt", "--data_dir", tmp_path / "d", "--out_dir", tmp_path / "o"]
    main_user_error(vc.main, capsys, ["--train", "--preset", "tiny", *lone], "--test_data", "--data FILE")
    assert not (tmp_path / "d").exists() and not (tmp_path / "o").exists()
    (other / "config.json").write_text(json.dumps({"script": "vit_caption"}))
    main_user_error(vc.main, capsys, ["--eval", "--out_dir", other], "config.json", "'config'")
    cuda = () if torch.cuda.is_available() else (("--bench", "--device", "cuda"),)  # a device this machine lacks
    for argv in (("--top_p", 0), ("--top_p", 1.5), ("--temperature", -1), ("--batch_size", 0),
                 ("--bench", "--n_head", 3),  # sizes are checked where they build a model (--generate: the saved ones)
                 ("--bench", "--d_model", 30, "--n_head", 2),  # heads of 15: RoPE turns pairs
                 ("--bench", "--device", "xyz")) + cuda:
        mode = [] if "--bench" in argv else ["--generate", "--image", "x.png"]  # one mode per call
        main_user_error(vc.main, capsys, [*mode, *argv], " ".join(map(str, argv[-2:])))
    main_user_error(vc.main, capsys, ["--bench", "--vit_dim", 30, "--vit_heads", 4], "--vit_dim a multiple of")
    main_user_error(vc.main, capsys, ["--train", "--preset", "huge"], "--preset: invalid choice: 'huge'")
    main_user_error(vc.main, capsys, ["--train", "--patch_init", "zeros"], "--patch_init zeros")
    main_user_error(vc.main, capsys, ["--train", "--eval", "--img_size", "50", "--data_dir", tmp_path / "d"], "--img_size 50")
    main_user_error(vc.main, capsys, ["--train", "--preset", "tiny", "--patch", "5"], "--patch 5")
    # a top-k / top-p filter with greedy decoding, a temperature with beam search: ignored by the search, so refused
    for argv in (("--top_k", 5), ("--top_p", 0.9), ("--beam", 3, "--temperature", 0.5)):
        main_user_error(vc.main, capsys, ["--train", "--preset", "tiny", "--data_dir", tmp_path / "d", "--out_dir",
                                          tmp_path / "o", *argv], " ".join(map(str, argv[-2:])))
    assert not (tmp_path / "d").exists()


@_vc_1t
def test_vc_an_image_it_cannot_write_empty_captions_a_lone_image_cut_weights_and_a_diverging_loss_are_one_line(
        _vc_tiny_run, tmp_path, capsys):
    """Each is one line, exit status 2, naming what is wrong: a world build that cannot write an image (a folder holds
    its name), a captions file with no entries (comments and blank lines only), a captions file of one image (none
    left to train on once the test image is held out), a model.safetensors cut short, and a learning rate so large
    that the loss is no longer finite."""
    o = tmp_path / "o"
    tiny = ["--train", "--preset", "tiny", "--out_dir", o]
    w = tmp_path / "w"  # a build of the world cut short (world.json version 0), a folder where its first image goes
    (w / "train" / "00000.png").mkdir(parents=True)
    (w / "world.json").write_text(json.dumps({"train": 1, "val": 1, "test": 1, "novel": 1, "seed": 0, "version": 0}))
    main_user_error(vc.main, capsys, tiny + ["--data_dir", w], f"{w / 'train' / '00000.png'}: cannot write (is "
                    f"{w / 'train'} writable?)")
    (tmp_path / "empty.txt").write_text("# image path | caption\n\n")
    main_user_error(vc.main, capsys, tiny + ["--data", tmp_path / "empty.txt"], f"{tmp_path / 'empty.txt'}: no entries")
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "one.txt").write_text("a.png | a small red circle\na.png | a red circle\n")  # one image, two captions
    main_user_error(vc.main, capsys, tiny + ["--data", tmp_path / "one.txt"],
                    f"{tmp_path / 'one.txt'}: too few images to hold out a test set")
    assert not o.exists()
    run = _copy_run(_vc_tiny_run / "out", tmp_path / "run")
    (run / "model.safetensors").write_bytes((_vc_tiny_run / "out" / "model.safetensors").read_bytes()[:1000])
    main_user_error(vc.main, capsys, ["--eval", "--out_dir", run], f"{run / 'model.safetensors'}: cannot read weights")
    main_user_error(vc.main, capsys, tiny + ["--data_dir", _vc_tiny_run / "data", "--lr", "1e30", "--warmup", "1"],
                    "loss became", "try a lower --lr")
    assert not (o / "model.safetensors").exists()


def test_vc_user_folders_and_flag_ranges(tmp_path, capsys):
    """--train writes neither into a folder of the user's (as out_dir or data_dir) nor over a file, and checks every
    count, rate and range before any work; a relative --data is saved absolute, so --eval works from anywhere."""
    mine, afile = tmp_path / "mine", tmp_path / "afile"
    mine.mkdir()
    (mine / "train.txt").write_text("notes")
    (mine / "config.json").write_text('{"my": 1}')
    afile.write_text("x")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}
    tiny = ["--train", "--preset", "tiny", "--data_dir", tmp_path / "d"]
    main_user_error(vc.main, capsys, [*tiny, "--out_dir", mine], "--out_dir", "did not write")
    main_user_error(vc.main, capsys, [*tiny, "--out_dir", afile], "--out_dir", "a file")
    main_user_error(vc.main, capsys, ["--train", "--preset", "tiny", "--data_dir", mine, "--out_dir", tmp_path / "o"],
                    "--data_dir", "world.json")
    main_user_error(vc.main, capsys, ["--train", "--preset", "tiny", "--data_dir", afile, "--out_dir", tmp_path / "o"],
                    "--data_dir", "a file")
    for flag, value in (("--max_steps", 0), ("--n_layer", 0), ("--beam", 0), ("--max_new_tokens", 0), ("--lr", -1),
                        ("--lr", "nan"), ("--grad_clip", -1), ("--dropout", 2), ("--max_len", 1), ("--top_k", -5),
                        ("--stop_after", -1), ("--weight_decay", -5), ("--max_train", -3), ("--img_size", -16)):
        main_user_error(vc.main, capsys, [*tiny, "--out_dir", tmp_path / "o", flag, value], flag)
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before and afile.read_text() == "x"
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()
    args, cfg, _ = vc.parse_args(["--data", "caps.txt", "--test_data", "t.txt"])
    assert cfg.data == os.path.abspath("caps.txt") and cfg.test_data == os.path.abspath("t.txt")


def _build_world_cut_short(mod, cfg, monkeypatch):
    """mod.build_world interrupted at its fourth image, then run again to the end -> what the second run returns."""
    real, calls = mod.write_image, []

    def cut_short(*a):  # the fourth image is never written: as if interrupted
        calls.append(1)
        if len(calls) > 3:
            raise KeyboardInterrupt
        real(*a)
    monkeypatch.setattr(mod, "write_image", cut_short)
    with pytest.raises(KeyboardInterrupt):
        mod.build_world(cfg)
    monkeypatch.setattr(mod, "write_image", real)
    return mod.build_world(cfg)


def test_vc_ab_world_of_an_older_version_is_rewritten(tmp_path):
    """A world.json of this script with another version (an older release of it) marks its own folder: rewritten."""
    for mod, name in ((vc, "vc"), (ab, "ab")):
        cfg = mod.Config(**{**mod.PRESETS["tiny"], "data_dir": str(tmp_path / name)})
        mod.build_world(cfg)
        stamp = tmp_path / name / "world.json"
        json.dump({**json.load(open(stamp)), "version": 1}, open(stamp, "w"))
        mod.build_world(cfg)
        assert json.load(open(stamp))["version"] not in (0, 1)


def test_vc_world_only_in_its_own_folder(tmp_path, capsys, monkeypatch):
    """The synthetic world is written only into a folder whose world.json is this script's: one of the user's, of
    another script or a damaged one is refused and left as it was; a build cut short is this script's and is written
    again. --out_dir holding another script's checkpoint is refused before any work."""
    tiny = ["--train", "--preset", "tiny", "--out_dir", tmp_path / "o"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.txt").write_text("notes")
    for text in ('{"my": 1}', "{not json", json.dumps({"img": [1, 1], "vid": [1, 1, 1], "seed": 1337, "version": 3})):
        (mine / "world.json").write_text(text)
        main_user_error(vc.main, capsys, [*tiny, "--data_dir", mine], "--data_dir", "world.json")
        assert (mine / "world.json").read_text() == text and (mine / "train.txt").read_text() == "notes"
        assert sorted(p.name for p in mine.iterdir()) == ["train.txt", "world.json"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"script": "videollama_mini", "config": {}}))
    main_user_error(vc.main, capsys, ["--train", "--preset", "tiny", "--data_dir", tmp_path / "d", "--out_dir", other],
                    "--out_dir", "did not write")
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()
    cfg = vc.Config(**{**vc.PRESETS["tiny"], "data_dir": str(tmp_path / "w")})
    files = _build_world_cut_short(vc, cfg, monkeypatch)
    assert json.load(open(tmp_path / "w" / "world.json"))["version"] == 2
    assert len(vc.read_captions(files["train"])) == cfg.n_train


def test_vc_flag_ranges_nan_and_zero(tmp_path, capsys):
    """A NaN passes no range; split sizes, a RoPE base and the patch scale of 0 are refused; all in one line naming
    the flag, before any work."""
    tiny = ["--train", "--preset", "tiny", "--data_dir", tmp_path / "d", "--out_dir", tmp_path / "o"]
    for flag, value in (("--weight_decay", "nan"), ("--min_lr", "nan"), ("--temperature", "nan"), ("--lr", "inf"),
                        ("--patch_scale", "nan"), ("--rope_theta", 0), ("--n_train", 0), ("--n_val", 0),
                        ("--n_novel", 0), ("--vit_layers", -1)):
        main_user_error(vc.main, capsys, [*tiny, flag, value], flag)
    # one patch per image (a 1 x 1 grid) has no positions to normalise: refused, not a NaN loss blamed on --lr
    main_user_error(vc.main, capsys, [*tiny, "--patch", 16], "--img_size 16", "--patch 16")
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_vc_undecodable_image_is_one_line(tmp_path):
    """OpenCV's own log stays quiet: an image it cannot decode gives our one line on stderr and nothing else (a new
    process, without the OPENCV_* settings this test process inherited from the imported scripts)."""
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 32 + b"\0\0\0\0IEND\xaeB`\x82")  # no IHDR chunk
    (tmp_path / "caps.txt").write_text("bad.png | a small red circle\n")
    cmd = [sys.executable, "vit_caption.py", "--train", "--preset", "tiny", "--data", tmp_path / "caps.txt",
           "--test_data", tmp_path / "caps.txt", "--out_dir", tmp_path / "o"]
    proc = subprocess.run(list(map(str, cmd)), cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'bad.png'}: OpenCV cannot decode this image (empty, corrupt or unknown format)"], proc.stderr


@_vc_1t
@pytest.mark.parametrize("pool", ["cls", "mean", "patches"])
def test_vc_attention_png_every_pool(pool, tmp_path):
    """The picture shows the caption it is given (--beam's, a sampled one), else generate()'s greedy caption, one row
    per token, for every pool. Its rows come from one teacher-forced call: the maps the cached greedy steps record."""
    model, cfg = _vc_model(pool, max_new_tokens=6)
    tok = vc.Tokenizer.from_captions(["a small red circle above a large blue square"])
    model, image = vc.ViTCaptioner(cfg, len(tok.ids)), _vc_images(1, cfg)[0]
    caption = vc.attention_png(model, image, tok, cfg, "cpu", str(tmp_path / "a.png"))
    assert caption == tok.decode(greedy := vc.generate(model, image[None], cfg)[0]) and greedy
    assert cv2.imread(str(tmp_path / "a.png")) is not None
    assert all(m.weights is None for m in model.modules() if isinstance(m, vc.Attention))  # recording switched off
    other = [i for i in range(1, len(tok.ids)) if i not in greedy][:3]  # a caption that is not the greedy one
    assert vc.attention_png(model, image, tok, cfg, "cpu", str(tmp_path / "b.png"), ids=other) == tok.decode(other)
    if pool == "patches":
        N, maps = model.n_prefix, lambda: model.layers[-1].self_attn.weights
        model.record_attention(True)
        vc.generate(model, image[None], cfg)  # cached call j (the prefill is call 0) wrote token j from its last query
        cached = torch.stack([c[0, -1, :N] for c in maps()[:len(greedy)]])
        model.record_attention(True)  # empty lists again
        model(image[None], torch.tensor([[0] + greedy]))  # position N + j wrote token j
        assert torch.allclose(maps()[0][0, N:N + len(greedy), :N], cached, atol=1e-6)
        model.record_attention(False)


@_vc_1t
def test_vc_label_masking():
    """Padding targets are -100 and count nowhere: the loss is the mean over the real tokens only, a pad input never
    changes an earlier logit, and the image positions get no logits at all."""
    model, cfg = _vc_model(dtype=torch.float64)
    seqs = [[0, 3, 4, 5, 6, 0], [0, 7, 8, 0]]  # BOS ... EOS, two lengths
    inp, tgt = vc.pad_batch(seqs)
    assert inp.shape == tgt.shape == (2, 5) and tgt[1].tolist() == [7, 8, 0, -100, -100]
    images = _vc_images(2, cfg)
    logits, loss = model(images, inp, tgt)
    assert logits.shape == (2, 5, 23)  # text positions only: the N prefix positions predict nothing
    real = [(i, t) for i in range(2) for t in range(5) if tgt[i, t] >= 0]
    by_hand = -sum(logits[i, t].log_softmax(-1)[tgt[i, t]] for i, t in real) / len(real)
    assert torch.allclose(loss, by_hand.float(), atol=1e-6)  # the loss itself is taken in float32
    inp2 = inp.clone()
    inp2[1, 3:] = 9  # other tokens in the padded positions
    assert torch.allclose(model(images, inp2, tgt)[1], loss)


@_vc_1t
def test_vc_dropout_only_in_training():
    """Dropout (attention weights, residual branches, the ViT) acts in training only: in eval mode a model at dropout
    0.5 gives exactly the logits of the same weights at dropout 0, so evaluation and captions are deterministic."""
    model, cfg = _vc_model(dropout=0.5, vit_dropout=0.5)
    plain = vc.ViTCaptioner(dataclasses.replace(cfg, dropout=0.0, vit_dropout=0.0), 23).eval()
    plain.load_state_dict(model.state_dict())
    images, idx = _vc_images(2, cfg), torch.randint(0, 23, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(images, idx)[0], plain(images, idx)[0])
        assert not torch.equal(model.train()(images, idx)[0], plain(images, idx)[0])  # ...and it does act there


VC_USER_DATA_EXAMPLE = """\
images/red.png | a red patch
images/red.png | the red patch
images/blue.png | a blue patch
"""


@_vc_1t
def test_vc_readme_user_data_example_trains(tmp_path):
    """The README's three lines, verbatim beside two images, train the tiny preset (blue.png, the lower draw, held out)."""
    (tmp_path / "images").mkdir()
    for name, bgr in (("red", (0, 0, 255)), ("blue", (255, 0, 0))):
        img = np.full((30, 40, 3), 40, np.uint8)
        img[5:15, 5:15] = bgr
        cv2.imwrite(str(tmp_path / "images" / f"{name}.png"), img)
    (tmp_path / "caps.txt").write_text(VC_USER_DATA_EXAMPLE)
    vc.train(_vc_cfg(tmp_path, data=str(tmp_path / "caps.txt"), max_steps=2))
    ev = json.load(open(tmp_path / "out" / "eval.json"))
    assert ev["test"]["n"] == 1 and "novel" not in ev


@_vc_1t
def test_vc_user_data_training(tmp_path):
    """A folder of images + captions file, several captions per image, trains and evaluates in-process."""
    for i, (colour, bgr) in enumerate((("red", (0, 0, 255)), ("blue", (255, 0, 0)), ("green", (0, 255, 0)))):
        for j in range(4):
            img = np.full((20 + 3 * j, 30, 3), 40, np.uint8)
            img[5:15, 5:15] = bgr
            cv2.imwrite(str(tmp_path / f"{colour}{j}.png"), img)
    lines = [f"{c}{j}.png | a {c} patch\n{c}{j}.png | the {c} patch" for c in ("red", "blue", "green") for j in range(4)]
    (tmp_path / "caps.txt").write_text("\ufeff" + "\n".join(lines) + "\n", encoding="utf-8")  # a BOM, as Notepad writes
    cfg = _vc_cfg(tmp_path, data=str(tmp_path / "caps.txt"), max_steps=4)
    data = vc.prepare_data(cfg, 0)
    assert len(data["train"][0]) == 10 and len(data["test"][0]) == 2 and len(data["train"][0][0][1]) == 2
    names = {s: [os.path.basename(p) for p, _ in data[s][0]] for s in ("train", "test")}
    assert names["test"] == ["green2.png", "green3.png"] and not set(names["train"]) & set(names["test"])  # under 0.1
    vc.train(cfg)
    ev = json.load(open(tmp_path / "out" / "eval.json"))  # its config: what was scored (data file, decoding flags)
    assert ev["test"]["n"] == 2 and ev["config"]["data"] == str(tmp_path / "caps.txt") and ev["config"]["beam"] == 1


@_vc_1t
def test_vc_eval_of_a_run_whose_training_file_moved(tmp_path, capsys, monkeypatch):
    """--eval --test_data scores the new file without opening the run's --data (moved or deleted since); without
    --test_data (or with --max_train) it scores images of --data, and says so when that file is gone. Only the images
    it scores are decoded."""
    for i, (colour, bgr) in enumerate((("red", (0, 0, 255)), ("blue", (255, 0, 0)), ("green", (0, 255, 0)))):
        for j in range(4):
            img = np.full((20, 30, 3), 40, np.uint8)
            img[5:15, 5:15] = bgr
            cv2.imwrite(str(tmp_path / f"{colour}{j}.png"), img)
    (tmp_path / "caps.txt").write_text("".join(f"{c}{j}.png | a {c} patch\n" for c in ("red", "blue", "green")
                                               for j in range(4)))
    (tmp_path / "new.txt").write_text("blue3.png | a blue patch\nred1.png | a red patch\n")
    out, new = tmp_path / "out", ["--test_data", str(tmp_path / "new.txt")]
    vc.main(["--train", "--preset", "tiny", "--data", str(tmp_path / "caps.txt"), "--out_dir", str(out), "--max_steps",
             "2"])
    (tmp_path / "caps.txt").rename(tmp_path / "moved.txt")
    decoded, load_image = [], vc.load_image
    monkeypatch.setattr(vc, "load_image", lambda p, size: decoded.append(os.path.basename(p)) or load_image(p, size))
    vc.main(["--eval", "--out_dir", str(out), *new])
    assert json.load(open(out / "eval.json"))["test"]["n"] == 2 and decoded == ["blue3.png", "red1.png"]
    main_user_error(vc.main, capsys, ["--eval", "--out_dir", out], "caps.txt: cannot read this captions file",
                    "; --eval scores images from it, or pass --test_data FILE")
    main_user_error(vc.main, capsys, ["--eval", "--out_dir", out, *new, "--max_train", 3], "caps.txt: cannot read",
                    "; --eval scores images from it, or pass --test_data FILE --max_train 0")
    (tmp_path / "moved.txt").rename(tmp_path / "caps.txt")
    decoded.clear()  # --max_train 3: its first 3 training images are scored (and decoded) too, nothing else
    vc.main(["--eval", "--out_dir", str(out), *new, "--max_train", "3"])
    assert json.load(open(out / "eval.json"))["train"]["n"] == 3 and len(decoded) == 5
    # a run trained on all of --data and tested on --test_data: --eval --data alone (its held-out tenth would be
    # training images) is refused, not left unread while the saved test file is scored
    vc.main(["--train", "--preset", "tiny", "--data", str(tmp_path / "caps.txt"), *new, "--out_dir",
             str(tmp_path / "o2"), "--max_steps", "2"])
    decoded.clear()
    main_user_error(vc.main, capsys, ["--eval", "--out_dir", tmp_path / "o2", "--data", tmp_path / "caps.txt"],
                    f"--data: --eval scores the run's --test_data {tmp_path / 'new.txt'}; give --test_data FILE")
    assert decoded == []


def test_vc_a_windows_path_in_the_captions_file_is_named_with_the_fix(tmp_path):
    (tmp_path / "caps.txt").write_text("images\\red.png | a red patch\n", encoding="utf-8")
    with pytest.raises(vc.UserError, match=re.escape("caps.txt:1: no image file 'images\\red.png' (paths are "
                                                     "relative to the captions file, with /)")):
        vc.read_captions(str(tmp_path / "caps.txt"))


def test_vc_a_doubled_bar_in_the_captions_file_is_refused(tmp_path):
    """'red.png || a red patch' would train on the caption '| a red patch': refused, naming the line."""
    cv2.imwrite(str(tmp_path / "red.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "caps.txt").write_text("red.png | a red patch\nred.png || the red patch\n", encoding="utf-8")
    want = ("caps.txt:2: expected 'image path | caption', one bar between, both non-empty; found 'red.png || the red "
            "patch'")
    with pytest.raises(vc.UserError, match=re.escape(want)):
        vc.read_captions(str(tmp_path / "caps.txt"))
    (tmp_path / "caps.txt").write_text("red.png | a patch | red\n", encoding="utf-8")  # a bar inside: the caption's
    assert vc.read_captions(str(tmp_path / "caps.txt"))[0][1] == ["a patch | red"]


def test_vc_captions_file_merges_one_image_spelled_two_ways(tmp_path):
    """'imgs/a.png' and './imgs/../imgs/a.png' are one image, one entry: never both trained on and held out."""
    (tmp_path / "imgs").mkdir()
    cv2.imwrite(str(tmp_path / "imgs" / "a.png"), np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "two.txt").write_text("imgs/a.png | one\n./imgs/../imgs/a.png | two\n", encoding="utf-8")
    want = [(os.path.realpath(tmp_path / "imgs" / "a.png"), ["one", "two"])]
    assert vc.read_captions(str(tmp_path / "two.txt")) == want
    (tmp_path / "imgs" / "sub").mkdir()  # a link into imgs/sub: link/.. is imgs, as the file system resolves it
    (tmp_path / "link").symlink_to(tmp_path / "imgs" / "sub")
    (tmp_path / "three.txt").write_text("link/../a.png | one\n", encoding="utf-8")
    assert vc.read_captions(str(tmp_path / "three.txt")) == [(want[0][0], ["one"])]
    bom = lambda text: b"\xef\xbb\xbf" + text.encode()  # two files saved with a byte-order mark, joined by `cat`
    (tmp_path / "joined.txt").write_bytes(bom("imgs/a.png | one\n") + bom("imgs/a.png | two\n"))
    assert vc.read_captions(str(tmp_path / "joined.txt")) == want  # the second mark is not part of the path


def test_vc_the_held_out_images_are_chosen_by_path(tmp_path, monkeypatch):
    """Without --test_data, --data's held-out images are those whose paths draw at most 0.1 (at least one), so
    adding or reordering lines or editing captions never moves an image the run trained on into the test split."""
    monkeypatch.setattr(vc, "load_image", lambda *a: np.zeros((1, 1, 3), np.uint8))  # no decoding: names only

    def split(folder):
        data = vc.prepare_data(_vc_cfg(folder, data=str(folder / "a.txt")), 0)
        return [[os.path.basename(p)[:-4] for p, _ in data[s][0]] for s in ("train", "test")]
    text = lambda names, caption: "".join(f"{n}.png | {caption}\n" for n in names)
    _held_out_by_path(tmp_path, "a.txt", ".png", text, split)


@_vc_1t
def test_vc_ddp_two_processes_match_one(tmp_path, capsys):
    """2-process gloo DDP (batch 4 per rank) ends at the same weights, and logs the same losses, as one process with
    batch 8."""
    common = ["--preset", "tiny", "--data_dir", str(tmp_path / "data"), "--max_steps", "3"]
    p = run_torchrun("vit_caption.py", "--train", *common, "--batch_size", "4", "--out_dir", tmp_path / "ddp")
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("step 2/3") == 1  # rank 0 alone prints
    capsys.readouterr()
    single, _ = vc.train(_vc_cfg(tmp_path, out_dir=str(tmp_path / "one"), max_steps=3, batch_size=8))
    ddp, _, _ = vc.load_checkpoint(str(tmp_path / "ddp"))
    assert torch.allclose(_vc_weights(ddp), _vc_weights(single), atol=1e-5)
    losses = [[float(x) for x in re.findall(r"^step \d+/3 \| loss (\S+)", out, re.M)] for out in
              (p.stdout, capsys.readouterr().out)]
    assert len(losses[0]) == 2 and losses[0] == pytest.approx(losses[1], abs=2e-3)
    with pytest.raises(SystemExit):  # one process would halve the global batch, which orders the data
        vc.main(["--train", "--resume", "--out_dir", str(tmp_path / "ddp"), "--max_steps", "4"])
    assert "trained at global batch 8 (batch_size*grad_accum*processes), not 4" in capsys.readouterr().err


# ====================================================================================================================
# 3. video_llava.py
# ====================================================================================================================
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import video_llava as vl

# a tiny random Video-LLaVA: vocab keeps the real placeholder ids (32000 <image>, 32001 <video>); 28 px / patch 14
# -> 4 patches, so 4 tokens per image and 5 per frame; GQA (4 heads, 2 kv heads) so the repeat path is checked too
_VL_TEXT = dict(model_type="llama", vocab_size=32064, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
_VL_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                  patch_size=14)


def _vl_tokenizer(folder):
    """A toy SentencePiece-style BPE (Metaspace, byte fallback) trained offline with `tokenizers`, wrapped as the
    transformers LlamaTokenizer the hub uses, with <image>/<video>/<pad> at 32000..32002 as in the real file."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaTokenizer
    corpus = ["USER: What colour are the shapes? ASSISTANT: red", "Which way does the circle move? left right",
              "the quick brown fox jumps over the lazy dog", "hello world, hello there!  two  spaces\nnew line"] * 20
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    m = json.loads(t.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for s, _ in sorted(m["vocab"].items(), key=lambda x: x[1]):
        vocab.setdefault(s, len(vocab))
    for i in range(len(vocab), 32000):  # filler up to the real placeholder ids
        vocab[f"<extra_{i}>"] = i
    merges = [tuple(x) if isinstance(x, list) else tuple(x.split(" ")) for x in m["merges"]]
    tok = LlamaTokenizer(vocab=vocab, merges=merges, add_bos_token=True)
    tok.add_special_tokens({"additional_special_tokens": ["<image>", "<video>"]})
    tok.add_special_tokens({"pad_token": "<pad>"})
    tok.save_pretrained(folder)
    return tok


def _vl_write(folder, state, config, shards=1):
    """state dict -> folder in the safetensors layout given by its keys; shards > 1 writes an index."""
    os.makedirs(folder, exist_ok=True)
    json.dump(config, open(os.path.join(folder, "config.json"), "w"))
    keys = sorted(state)
    if shards == 1:
        save_file({k: state[k].contiguous() for k in keys}, os.path.join(folder, "model.safetensors"))
        return folder
    wm = {}
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[s::shards]
        save_file({k: state[k].contiguous() for k in part}, os.path.join(folder, name))
        wm.update({k: name for k in part})
    json.dump({"metadata": {}, "weight_map": wm}, open(os.path.join(folder, "model.safetensors.index.json"), "w"))
    return folder


@pytest.fixture(scope="module")
def vl_ckpt(tmp_path_factory):
    """transformers builds the reference; it is written in every key layout (hub, transformers-5 save, in-memory),
    fp32 and bf16, sharded."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.VideoLlavaConfig(text_config=_VL_TEXT, vision_config=_VL_VISION)
    ref = transformers.VideoLlavaForConditionalGeneration(cfg).eval()
    root = tmp_path_factory.mktemp("vl")
    ref.save_pretrained(root / "t5save")  # transformers 5 layout: towers without `vision_model.`
    _vl_tokenizer(root / "t5save")
    config = json.load(open(root / "t5save" / "config.json"))
    saved = load_file(str(root / "t5save" / "model.safetensors"))
    assert any(k.startswith("image_tower.encoder.") for k in saved)  # the transformers-5 save layout
    hub = {vl.canonical_key(k): v for k, v in saved.items()}
    assert any(k.startswith("image_tower.vision_model.encoder.") for k in hub)
    memory = {k: v.detach() for k, v in ref.state_dict().items()}
    assert any(k.startswith("model.language_model.") for k in memory)
    dirs = {"t5save": str(root / "t5save"),
            "hub": _vl_write(str(root / "hub"), hub, config),
            "memory": _vl_write(str(root / "memory"), memory, config),
            "hub_sharded": _vl_write(str(root / "hub_sharded"), hub, config, shards=3),
            "memory_sharded_bf16": _vl_write(str(root / "bf16"), {k: v.bfloat16() for k, v in memory.items()},
                                             config, shards=2)}
    return ref, dirs


def _vl_inputs(seed=0):
    """A left-padded mixed batch: row 0 text only, row 1 one image, row 2 two images + a 3-frame video."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(3, 31999, (9,), generator=g).tolist(),
            [1, 5] + [32000] * 4 + torch.randint(3, 31999, (6,), generator=g).tolist(),
            [1] + [32000] * 4 + [7] + [32001] * 15 + [9] + [32000] * 4 + [11, 12]]
    L = max(map(len, rows))
    ids = torch.zeros(3, L, dtype=torch.long)
    mask = torch.zeros(3, L, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, L - len(r):], mask[i, L - len(r):] = torch.tensor(r), 1
    imgs = torch.randn(3, 3, 28, 28, generator=g)
    vids = torch.randn(1, 3, 3, 28, 28, generator=g)
    return ids, mask, imgs, vids


def test_vl_rmsnorm_is_llamas_formula():
    """RMSNorm gives LLaMA's formula bit for bit in float32, and keeps HF's order in bfloat16: normalise in float32,
    cast, then scale."""
    norm = vl.RMSNorm(16, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 16)
    formula = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(norm(x), formula)
    norm_bf = vl.RMSNorm(16, 1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm_bf.weight.copy_(norm.weight)
    xb = x.bfloat16()
    h = xb.float()
    want = norm_bf.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    assert norm_bf(xb).dtype == torch.bfloat16 and torch.equal(norm_bf(xb), want)


@pytest.mark.parametrize("layout", ["t5save", "hub", "memory", "hub_sharded", "memory_sharded_bf16"])
def test_vl_logit_parity_every_layout(vl_ckpt, layout):
    ref, dirs = vl_ckpt
    ours = vl.VideoLlava.from_pretrained(dirs[layout], dtype=torch.float32).eval()
    if "bf16" in layout:  # same rounding on the reference side
        ref = type(ref)(ref.config).eval()
        ref.load_state_dict({k: v.bfloat16().float() for k, v in vl_ckpt[0].state_dict().items()})
    ids, mask, imgs, vids = _vl_inputs()
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, pixel_values_images=imgs, pixel_values_videos=vids).logits
        got, _ = ours(ids, mask, imgs, vids)
        assert ((want - got).abs() * mask[..., None]).max() < 1e-4
        # no padding, no mask: text only, image only, video only
        for a, b in ((ids[:1, :], {}), (ids[1:2, 1:], {"pixel_values_images": imgs[:1]}),):
            w = ref(input_ids=a, **b).logits
            o, _ = ours(a, **b)
            assert (w - o).abs().max() < 1e-4
        v_ids = torch.tensor([[1, 4] + [32001] * 15 + [8, 9]])
        w = ref(input_ids=v_ids, pixel_values_videos=vids).logits
        o, _ = ours(v_ids, pixel_values_videos=vids)
        assert (w - o).abs().max() < 1e-4


def test_vl_greedy_matches_transformers_generate(vl_ckpt):
    ref, dirs = vl_ckpt
    ours = vl.VideoLlava.from_pretrained(dirs["hub"], dtype=torch.float32).eval()
    ids, mask, imgs, vids = _vl_inputs(1)
    want = ref.generate(input_ids=ids, attention_mask=mask, pixel_values_images=imgs, pixel_values_videos=vids,
                        max_new_tokens=12, do_sample=False)[:, ids.shape[1]:]
    got = vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=12)
    assert torch.equal(want, got)
    # the cache changes nothing; a batch equals its rows run one by one
    assert torch.equal(got, vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=12, use_cache=False))
    row1 = vl.generate(ours, ids[1:2, mask[1].argmax():], None, imgs[:1], None, max_new_tokens=12)
    assert torch.equal(row1[0], got[1])



def test_vl_a_batch_equals_its_rows(vl_ckpt):
    """Every row of a left-padded mixed batch (text only; one image; two images and a video), run alone and unpadded,
    gives the logits it gets in the batch at its real positions, and the same greedy tokens."""
    ours = vl.VideoLlava.from_pretrained(vl_ckpt[1]["hub"], dtype=torch.float32).eval()
    ids, mask, imgs, vids = _vl_inputs(2)
    media = [(None, None), (imgs[:1], None), (imgs[1:], vids)]  # the placeholders take the images in reading order
    with torch.no_grad():
        logits, _ = ours(ids, mask, imgs, vids)
        tokens = vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=8)
        for r, (img, vid) in enumerate(media):
            start = int(mask[r].argmax())  # the row's first real token
            alone, _ = ours(ids[r:r + 1, start:], None, img, vid)
            assert (alone[0] - logits[r, start:]).abs().max() < 1e-4, r
            assert torch.equal(vl.generate(ours, ids[r:r + 1, start:], None, img, vid, max_new_tokens=8)[0], tokens[r])


def test_vl_video_matches_transformers_at_several_frame_counts(vl_ckpt):
    """One <video> tag expanded for 1, 2, 5 and 8 frames (5 tokens a frame here: 4 patches + CLS): the logits and
    greedy tokens are transformers'."""
    ref, dirs = vl_ckpt
    ours = vl.VideoLlava.from_pretrained(dirs["hub"], dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(3)
    for n_frames in (1, 2, 5, 8):
        ids = torch.tensor([vl.expand_placeholders([1, 4, 32001, 8, 9, 10], ours.cfg, n_frames)])
        assert int((ids == 32001).sum()) == 5 * n_frames
        vids = torch.randn(1, n_frames, 3, 28, 28, generator=g)
        with torch.no_grad():
            want = ref(input_ids=ids, pixel_values_videos=vids).logits
            got, _ = ours(ids, pixel_values_videos=vids)
        assert (want - got).abs().max() < 1e-4, n_frames
        want = ref.generate(input_ids=ids, pixel_values_videos=vids, max_new_tokens=6, do_sample=False)
        assert torch.equal(want[:, ids.shape[1]:], vl.generate(ours, ids, None, None, vids, max_new_tokens=6))


def test_vl_matches_transformers_off_the_defaults(tmp_path):
    """transformers initialises every norm to gain 1 and bias 0, so a norm read in the wrong place agrees with it; and
    its default eps, rope_theta and feature strategy are the ones a config usually leaves out. Here the norms are
    random, the eps and rope_theta (which transformers 5 writes only into rope_parameters) are other values, images
    keep their CLS ("full"), and two rows each carry a video: the logits are transformers'. The projector and a CLIP
    MLP, fed inputs large enough for the GELU variants to differ, give transformers' outputs."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.VideoLlavaConfig(
        text_config=dict(_VL_TEXT, vocab_size=320, rms_norm_eps=1e-3, rope_theta=500.0),
        vision_config=dict(_VL_VISION, layer_norm_eps=1e-2), image_token_index=300, video_token_index=301,
        vision_feature_select_strategy="full")
    ref = transformers.VideoLlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name or "layrnorm" in name:  # gains around 1, biases around 0, all different
                p.copy_(torch.rand_like(p) + 0.5 if name.endswith("weight") else torch.randn_like(p) * 0.3)
    ref.save_pretrained(tmp_path)
    ours = vl.VideoLlava.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert ours.cfg.rope_theta == 500.0 and ours.cfg.rms_norm_eps == 1e-3
    ids = torch.tensor([vl.expand_placeholders([1, 5, 300, 7, 301, 9, 10], ours.cfg, 2),
                        [0] + vl.expand_placeholders([1, 6, 7, 8, 9, 11, 12, 301, 13, 14], ours.cfg, 2)])
    assert (ids == 300).sum() == 4 + 1 and (ids == 301).sum() == 2 * 2 * 5  # an image keeps CLS: P + 1 tokens
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[0], [1]])).long()  # row 1 left-padded by one
    g = torch.Generator().manual_seed(1)
    imgs, vids = torch.randn(1, 3, 28, 28, generator=g), torch.randn(2, 2, 3, 28, 28, generator=g)
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=mask, pixel_values_images=imgs, pixel_values_videos=vids).logits
        got, _ = ours(ids, mask, imgs, vids)
        assert ((want - got).abs() * mask[..., None]).max() < 1e-4
        theirs = {vl.canonical_key(n + ".w")[:-2]: m for n, m in ref.named_modules()}  # our module names
        x = torch.randn(64, 32, generator=g) * 3
        for name in ("multi_modal_projector", "image_tower.vision_model.encoder.layers.0.mlp"):
            torch.testing.assert_close(ours.get_submodule(name)(x), theirs[name](x), rtol=1e-5, atol=1e-6)


def test_vl_overfits_one_batch(tmp_path):
    """The tiny model learns one batch by heart: two pictures asked the same question and two clips asked the same
    question, with different answers, so only the pixels (through the tower, the projector and the placeholders)
    tell them apart; afterwards greedy generation gives all four answers."""
    def canvas():
        return np.full((vl.SIDE, vl.SIDE, 3), 60, np.uint8)
    lines = []
    for name, colour in (("a", "red"), ("b", "blue")):
        img = canvas()
        vl.draw_shape(img, "square", colour, 24, 24)
        cv2.imwrite(str(tmp_path / f"{name}.png"), img)
        lines.append({"image": f"{name}.png", "question": "What colour is the square?", "answer": colour})
    for name, dx in (("left", -1), ("right", 1)):  # a green circle crossing the picture, 16 px in 16 frames
        writer = cv2.VideoWriter(str(tmp_path / f"{name}.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 8, (vl.SIDE, vl.SIDE))
        for t in range(vl.CLIP_LEN):
            frame = canvas()
            vl.draw_shape(frame, "circle", "green", 24 + round(dx * 16 * (t / (vl.CLIP_LEN - 1) - 0.5)), 24)
            writer.write(frame)
        writer.release()
        lines.append({"video": f"{name}.mp4", "question": "Which way does it move?", "answer": name})
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    entries = vl.read_annotations(str(tmp_path / "qa.jsonl"))
    torch.manual_seed(0)
    cfg = vl.Config(**{**vl.PRESETS["tiny"], "out_dir": str(tmp_path / "o")})
    model, cfg, tok, data = vl.build_model(cfg, {"train": entries, "val": entries}, False, lambda *a: None, "cpu")
    opt, scaler = vl.make_optimizer(list(model.parameters()), cfg, "cpu")  # the default lr, 1e-3
    for _ in range(300):
        loss = vl.batch_loss(model, data["train"], [0, 1, 2, 3], cfg, 0, 1, False, "cpu", scaler)
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert loss < 0.02, loss  # a coin toss between each pair's answers: 0.35
    out = vl.generate(model, **data["val"].batch([0, 1, 2, 3], "cpu", generating=True), max_new_tokens=4,
                      eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    assert [tok.decode([t for t in r if t != tok.eos_id]).strip() for r in out.tolist()] == [
        "red", "blue", "left", "right"]

def _vl_one_layer(vl_ckpt, dtype=torch.float32):
    """The test checkpoint's model with its first decoder layer only, for the compiled-step tests: torch.compile
    unrolls the layer loop (one layer runs every line of the step), and a graph with one layer builds in less time.
    That each layer writes its own cache slots is checked with two layers by the eager cache tests and, compiled, by
    the --generate --compile test below (batch 1, against transformers' answer)."""
    full = vl.VideoLlava.from_pretrained(vl_ckpt[1]["hub"], dtype=dtype)
    model = vl.VideoLlava(dataclasses.replace(full.cfg, num_hidden_layers=1)).to(dtype)
    unused = model.load_state_dict(full.state_dict(), strict=False)
    assert not unused.missing_keys and {k.split(".")[3] for k in unused.unexpected_keys} == {"1"}  # layer 1 only
    return model.eval()


def test_vl_compiled_step_matches_eager(vl_ckpt):
    """A one-token step writes its key/value at cache.slots and attends over the whole cache under a mask, so its
    shapes never change and torch.compile makes it one graph (fullgraph): the compiled step gives the logits of the
    eager step and of the whole sequence without a cache, and generate(compile=True) the same tokens, on a batched,
    left-padded prompt with an image and a video (GQA 4/2). Past torch's limit of graphs per function a call goes on
    with the eager step (same tokens) and warns. On a CPU the graph holds the weights as constants (inductor's
    freezing): a weight changed in place after a compiled call (more training) is noticed by its version counter, and
    the next compiled call builds anew. (Batch 1 compiled, two layers: the --generate --compile test below.)"""
    ours = _vl_one_layer(vl_ckpt)
    ids, mask, imgs, vids = _vl_inputs(1)
    with torch.inference_mode():  # as generate decodes: its compiled step's guards hold below
        eager = vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=10)
        assert torch.equal(eager, vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=10, compile=True))
        # a row that stops early (its 4th token as EOS) is padded the same way by both
        eos = int(eager[0, 3])
        stop = vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=10, eos_token_id=eos, pad_token_id=7)
        assert (stop[0, 4:] == 7).all() and stop.shape[1] > 4
        assert torch.equal(stop, vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=10, eos_token_id=eos,
                                             pad_token_id=7, compile=True))
        with pytest.raises(ValueError, match="use_cache"):
            vl.generate(ours, ids, mask, imgs, vids, compile=True, use_cache=False)
        B, L = ids.shape
        T_max = -(-(L + 10) // 64) * 64  # generate's cache length above: its compiled graph is reused
        cache = vl.KVCache(ours.cfg, B, T_max, torch.float32, "cpu")
        logits, _ = ours(ids, mask, imgs, vids, cache=cache, last_only=True)
        nxt, mask2 = logits.argmax(-1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos, smask = cache.claim(mask2)
        assert cache.offset == L + 1 and cache.slots.tolist() == [L] and smask.shape == (B, 1, 1, T_max)
        step = ours.step(nxt, pos, smask, cache)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled = torch.compile(ours.step, fullgraph=True, dynamic=False)(nxt, pos, smask, cache)  # the same slot
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # generate's graph, frozen weights
        whole, _ = ours(torch.cat([ids, nxt], 1), mask2, imgs, vids)
        assert (step - compiled).abs().max() < 1e-5 and (step - whole[:, -1:]).abs().max() < 1e-4
        # forward() on one token with a cache takes the same fixed-shape path
        cache.offset -= 1
        again, _ = ours(nxt, mask2, cache=cache)
        assert cache.offset == L + 1 and (again - step).abs().max() < 1e-6
        with pytest.raises(ValueError, match=f"more than {L + 1} columns"):  # the mask must cover the cache too
            cache.claim(mask2[:, -1:])
        # a one-token prompt, one row all padding: that row attends to itself (no NaN), the other is unchanged
        cache = vl.KVCache(ours.cfg, 2, 4, torch.float32, "cpu")
        one, _ = ours(ids[:2, -1:], torch.tensor([[1], [0]]), cache=cache)
        assert torch.isfinite(one).all() and (one[:1] - ours(ids[:1, -1:])[0]).abs().max() < 1e-5
        cache.offset = 4  # every position written: a further step is refused with its own reason
        with pytest.raises(ValueError, match="KV cache is full"):
            cache.claim(torch.ones(2, 5, dtype=torch.long))
    with torch.no_grad():  # a cache length in the same 64-long bucket needs no new graph
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        again = vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=12, compile=True)
        assert torch.equal(again[:, :10], eager) and torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
        txt = torch.randint(3, 31999, (1, 7), generator=torch.Generator().manual_seed(3))
        want = vl.generate(ours, txt, max_new_tokens=60)
        with torch._dynamo.config.patch(recompile_limit=1):  # the step has one graph already
            with pytest.warns(UserWarning, match="limit of 1 graphs"):
                got = vl.generate(ours, txt, max_new_tokens=60, compile=True)  # batch 1, a 128-long cache
        assert torch.equal(got, want)
        first = vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=8, compile=True)  # the first graph again
        ours.language_model.lm_head.weight.mul_(-1.0)  # other logits, other tokens
        want = vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=8)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert not torch.equal(want, first)
        assert torch.equal(vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=8, compile=True), want)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # built anew, not run eagerly


def test_vl_compiled_step_bfloat16(vl_ckpt):
    """A bfloat16 model (an HF folder's default dtype) compiled at batch 1: the step's logits stay within bfloat16's
    rounding of the eager step's (a near tie may still pick another token)."""
    ours = _vl_one_layer(vl_ckpt, torch.bfloat16)
    ids, mask, imgs, vids = _vl_inputs(2)
    ids, mask, imgs, vids = ids[2:], mask[2:], imgs[1:].bfloat16(), vids.bfloat16()
    with torch.inference_mode():  # as generate decodes
        assert vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=4, compile=True).shape == (1, 4)
        cache = vl.KVCache(ours.cfg, 1, 64, torch.bfloat16, "cpu")  # generate's cache length: its graph is reused
        logits, _ = ours(ids, mask, imgs, vids, cache=cache, last_only=True)
        nxt, mask2 = logits.argmax(-1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos, smask = cache.claim(mask2)
        step = ours.step(nxt, pos, smask, cache).float()
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        compiled = torch.compile(ours.step, fullgraph=True, dynamic=False)(nxt, pos, smask, cache)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs  # generate's graph, frozen weights
        assert compiled.dtype == torch.bfloat16 and (step - compiled.float()).abs().max() < 0.02 * step.abs().max()


def test_vl_generate_in_inference_mode_leaves_ordinary_tensors(vl_ckpt):
    """generate decodes under torch.inference_mode (no autograd bookkeeping), but what it hands back and what it
    leaves behind are ordinary tensors: the ids can be changed in place and fed back, the parameters still train,
    and a backward pass after it (through the RoPE table it built) gives the gradient it gave before."""
    ours = vl.VideoLlava.from_pretrained(vl_ckpt[1]["hub"], dtype=torch.float32)
    fresh = vl.VideoLlava.from_pretrained(vl_ckpt[1]["hub"], dtype=torch.float32)
    ids, mask, imgs, vids = _vl_inputs(4)
    targets = torch.where((mask == 1) & (ids < 32000), ids, -100)

    def grad(model):
        model.train()
        model.zero_grad()
        model(ids, mask, imgs, vids, targets=targets)[1].backward()
        return model.language_model.model.layers[0].self_attn.q_proj.weight.grad.clone()

    streamed = []
    new = vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=3,
                      on_token=streamed.append)  # its first call: builds the RoPE table
    assert not new.is_inference() and not any(p.is_inference() for p in ours.parameters())
    assert torch.equal(torch.stack(streamed, 1), new) and not any(t.is_inference() for t in streamed)
    new[0, 0] = 5  # in place: an error on an inference tensor
    streamed[0].add_(1)
    torch.testing.assert_close(grad(ours), grad(fresh), rtol=1e-5, atol=1e-6)
    ours.eval(), fresh.eval()
    longer, longer_mask = torch.cat([ids, new], 1), torch.cat([mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        got, want = ours(longer, longer_mask, imgs, vids)[0], fresh(longer, longer_mask, imgs, vids)[0]
        assert (got - want).abs().max() < 1e-5
    with torch.inference_mode():  # a caller's own inference mode: the parameters stay ordinary tensors
        vl.generate(fresh, ids, mask, imgs, vids, max_new_tokens=2)
    assert not any(p.is_inference() for p in fresh.parameters())


@pytest.mark.parametrize("template", ["kept", "absent", "null"])
def test_vl_tokenizer_matches_hf(tmp_path, template):
    """Token ids and decoded text equal transformers' for text, added tokens, bytes and blanks. BOS (and EOS) come
    from tokenizer.json's TemplateProcessing alone, as transformers 5 reads them: without one there is none, whatever
    tokenizer_config.json's add_bos_token says; another kind of post_processor is refused in one line."""
    from transformers import AutoTokenizer
    _vl_tokenizer(tmp_path)
    tj, tc = (json.load(open(tmp_path / f)) for f in ("tokenizer.json", "tokenizer_config.json"))
    if template != "kept":  # no template, and add_bos_token true: transformers 5 adds no BOS all the same
        del tj["post_processor"]
        json.dump({**tj, "post_processor": None} if template == "null" else tj, open(tmp_path / "tokenizer.json", "w"))
        json.dump({**tc, "add_bos_token": True}, open(tmp_path / "tokenizer_config.json", "w"))
    hf, ours = AutoTokenizer.from_pretrained(str(tmp_path)), vl.SentencePieceBPE(str(tmp_path))
    assert ours.added["<image>"] == 32000 and ours.added["<video>"] == 32001
    assert ours.prefix_ids == ([1] if template == "kept" else [])
    for s in ["USER: <video>\nWhich way does the circle move? ASSISTANT:", "hello world", " leading space",
              "<image>hi", "naïve 日本 🙂 done", "two  spaces and\ttabs\n\nlines", "", "ASSISTANT: red</s>",
              "a<video><video>b <image> c", "zzzqqq unseen words"]:
        want = hf(s).input_ids
        assert ours.encode(s) == want, s
        for cut in range(len(want) + 1):  # every prefix: an answer cut mid-character gives HF's '\ufffd' per byte
            assert ours.decode(want[:cut]) == hf.decode(want[:cut], skip_special_tokens=True), (s, cut)
            odd = want[:cut] + [32010] + want[cut:]  # an id past the tokenizer (the 7B's head has 32064 rows): skipped
            assert ours.decode(odd) == hf.decode(odd, skip_special_tokens=True), (s, cut)
    json.dump({**tj, "post_processor": {"type": "BertProcessing", "sep": ["</s>", 2], "cls": ["<s>", 1]}},
              open(tmp_path / "tokenizer.json", "w"))
    with pytest.raises(vl.UserError, match="post_processor 'BertProcessing' is not supported"):
        vl.SentencePieceBPE(str(tmp_path))


def test_vl_placeholder_count_mismatch(vl_ckpt):
    ours = vl.VideoLlava.from_pretrained(vl_ckpt[1]["hub"], dtype=torch.float32)
    ids = torch.tensor([[1, 32000, 32000, 32000, 5]])  # 3 placeholders, an image gives 4 features
    with pytest.raises(vl.UserError, match="3 image placeholder tokens but the images give 4"):
        ours(ids, pixel_values_images=torch.randn(1, 3, 28, 28))
    with pytest.raises(vl.UserError, match="no video was given"):
        ours(torch.tensor([[1, 32001, 5]]))
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, T\) = \(1, 3\)"):  # would broadcast
        ours(torch.tensor([[1, 2, 5]]), torch.ones(1, 1))


def test_vl_strict_loading_lists_every_bad_key(vl_ckpt, tmp_path, capsys):
    dirs = vl_ckpt[1]
    config = json.load(open(os.path.join(dirs["hub"], "config.json")))
    state = load_file(os.path.join(dirs["hub"], "model.safetensors"))
    del state["multi_modal_projector.linear_1.bias"], state["language_model.model.norm.weight"]
    state["image_tower.vision_model.extra.weight"] = torch.zeros(2)
    state["language_model.lm_head.weight"] = torch.zeros(10, 64)
    _vl_write(str(tmp_path / "bad"), state, config)
    with pytest.raises(vl.UserError) as e:
        vl.VideoLlava.from_pretrained(str(tmp_path / "bad"))
    msg = str(e.value)
    for needle in ("multi_modal_projector.linear_1.bias", "language_model.model.norm.weight",
                   "image_tower.vision_model.extra.weight", "language_model.lm_head.weight [10, 64]"):
        assert needle in msg
    capsys.readouterr()
    vl.main(["--inspect", str(tmp_path / "bad")])  # inspection reports, does not fail
    assert "language_model.model.norm.weight" in capsys.readouterr().out
    with pytest.raises(vl.UserError, match="bad: checkpoint does not match the config: missing 2"):
        vl.main(["--generate", "--from_pretrained", str(tmp_path / "bad"), "--prompt", "hi"])


def test_vl_a_stage_one_model_runs_as_saved_its_projector_in_float32():
    """A run with frozen bfloat16 towers and LLM trains its projector in float32 and is saved so (from_pretrained with
    dtype None keeps each tensor's dtype): the bfloat16 features met the float32 projector, a dtype error outside the
    command line's autocast. The projector reads them in its own dtype."""
    cfg = vl.Config(**{**vl.PRESETS["tiny"], "vocab_size": 12, "image_token_index": 10, "video_token_index": 11})
    model = vl.VideoLlava(cfg).to(torch.bfloat16)
    model.multi_modal_projector.float()
    ids = torch.tensor([vl.expand_placeholders([1, 10, 5], cfg, 1)])
    out = vl.generate(model, ids, pixel_values_images=torch.randn(1, 3, cfg.image_size, cfg.image_size),
                      max_new_tokens=3)
    assert out.shape == (1, 3)


def test_vl_whitening_from_few_pictures_keeps_others_in_range():
    """A few pictures give fewer patches than pixels per patch: components of ~0 variance got a 1/std gain that blew
    other pictures' patch features up; only components with real variance are kept."""
    rng = random.Random(0)
    px = torch.stack([torch.from_numpy(vl.clip_transform(vl.make_image(rng, "train")[0][:, :, ::-1], 48))
                      for _ in range(24)])  # (24, 3, 48, 48) synthetic pictures, CLIP-normalised
    emb = vl.VideoLlava(vl.Config(vocab_size=10)).image_tower.vision_model.embeddings
    vl.whiten(emb, px[:2], 12)  # 32 patches of 432 values
    std = lambda x: emb.patch_embedding(x).std().item()
    assert 0.1 < std(px[:2]) < 2 and std(px[2:]) < 3, (std(px[:2]), std(px[2:]))  # it was ~7000


def test_vl_inspect(vl_ckpt, capsys):
    vl.main(["--inspect", vl_ckpt[1]["hub_sharded"], "--n_frames", "8"])
    out = capsys.readouterr().out
    n = sum(v.numel() for v in vl_ckpt[0].state_dict().values())
    assert f"{n / 1e6:.2f}M parameters" in out
    assert "3 file(s)" in out and "layout ['hub']" in out and "missing none" in out and "8 frames" in out


def test_vl_cli_generate_hf_checkpoint_streams_transformers_answer(vl_ckpt, tmp_path, monkeypatch, capsys):
    """End to end: mp4 -> preprocessing -> our tokenizer + expansion -> --generate's stream (eager, then --compile);
    the same inputs through transformers give the same text."""
    ref, dirs = vl_ckpt
    from transformers import AutoTokenizer
    clip = str(tmp_path / "clip.mp4")
    w = cv2.VideoWriter(clip, cv2.VideoWriter_fourcc(*"mp4v"), 8, (64, 48))
    for t in range(10):
        img = np.full((48, 64, 3), 40, np.uint8)
        cv2.circle(img, (8 + 5 * t, 24), 6, (0, 0, 255), -1)
        w.write(img)
    w.release()
    argv = ["--generate", "--from_pretrained", dirs["t5save"], "--video", clip, "--prompt", "What happens?",
            "--dtype", "float32", "--max_new_tokens", "8"]
    capsys.readouterr()
    vl.main(argv)
    eager = capsys.readouterr().out
    ours = vl.VideoLlava.from_pretrained(dirs["t5save"], torch.float32)
    tok = vl.SentencePieceBPE(dirs["t5save"])
    ids = torch.tensor([vl.expand_placeholders(tok.encode(vl.prompt_text("What happens?", "video")), ours.cfg, 8)])
    assert (ids == 32001).sum() == 8 * 5
    vids = torch.from_numpy(vl.load_video(clip, 8, 28))[None]
    out = ref.generate(input_ids=ids, pixel_values_videos=vids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    want = AutoTokenizer.from_pretrained(dirs["t5save"]).decode(out, skip_special_tokens=True)
    assert eager.strip() == want.strip()
    seen, compile_ = [], torch.compile  # inductor's settings while the compiled step runs (and compiles)
    conf = torch._inductor.config
    def spy(fn, **kw):
        step = compile_(fn, **kw)
        return lambda *a: seen.append((conf.freezing, conf.max_autotune, conf.max_autotune_gemm_backends)) or step(*a)
    monkeypatch.setattr(torch, "compile", spy)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    vl.main(argv + ["--compile"])
    out, err = capsys.readouterr()
    assert out.strip() == want.strip() and seen and set(seen) == {(True, True, "CPP")}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs + 1  # compiled, not decoded eagerly
    assert "AUTOTUNE" not in err  # one kernel per product: nothing is timed, no tables of timings on stderr
    # on a CPU torch.compile needs a C++ compiler: without one, --compile ends in a UserError (one line from the command
    # line) before the prompt is read, not after the whole graph is lowered
    with torch._inductor.config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        with pytest.raises(vl.UserError, match=r"^--compile: torch.compile failed \(No working C\+\+ compiler"):
            vl.main(argv + ["--compile"])
    assert capsys.readouterr().out == ""  # no token streamed
    with pytest.raises(vl.UserError, match="use it with --generate"):  # --compile means nothing elsewhere
        vl.parse_args(["--bench", "--compile"])



def test_vl_generate_samples_by_its_seed(vl_ckpt, capsys):
    """--generate --temperature 1: the same --seed gives the same answer, another --seed another one."""
    argv = ["--generate", "--from_pretrained", vl_ckpt[1]["t5save"], "--prompt", "What happens?", "--dtype",
            "float32", "--temperature", "1", "--max_new_tokens", "6"]
    answers = []
    for seed in (1, 1, 2):
        vl.main(argv + ["--seed", str(seed)])
        answers.append(capsys.readouterr().out)
    assert answers[0] == answers[1] != answers[2] and answers[0].strip()

def test_vl_generate_hf_dtype_follows_dtype_auto(vl_ckpt, tmp_path, monkeypatch, capsys):
    """--generate on an HF folder loads its weights in the dtype --dtype auto picks (faked CPU instruction sets),
    or in the one asked for."""
    cv2.imwrite(str(tmp_path / "a.png"), _vl_textured(40, 60, 2))
    got, load = [], vl.load_pretrained
    monkeypatch.setattr(vl, "load_pretrained",
                        lambda path, dtype, device: got.append(dtype) or load(path, dtype, device))
    argv = ["--generate", "--from_pretrained", vl_ckpt[1]["t5save"], "--image", str(tmp_path / "a.png"),
            "--prompt", "What?", "--max_new_tokens", "1", "--device", "cpu"]
    for native, extra, want in ((False, [], torch.float32), (True, [], torch.bfloat16),
                                (False, ["--dtype", "bfloat16"], torch.bfloat16)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=native: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        vl.main(argv + extra)
        assert got[-1] == want
    capsys.readouterr()


def test_vl_float32_weights_past_the_memory_are_refused_before_loading(vl_ckpt, monkeypatch, capsys):
    """Weights whose float32 copy exceeds the machine's memory (a 7B on a laptop without native bfloat16, where --dtype
    auto is float32) are refused in one line that gives both sizes and the fix, before a tensor is read, instead of
    the system killing the run part-way; the same on "cpu:0" and on Apple's GPU (mps), which shares that memory, and
    against a CUDA GPU's own memory. In bfloat16 they load."""
    monkeypatch.setattr(os, "sysconf", lambda name: {"SC_PAGE_SIZE": 4096, "SC_PHYS_PAGES": 2560}[name])  # 10 MiB
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    path, reads, opened = vl_ckpt[1]["memory_sharded_bf16"], [], vl.safe_open

    class Counting:  # a safetensors file that counts the tensors read from it
        def __init__(self, *a, **k):
            self.f = opened(*a, **k)
        def __getattr__(self, name):
            return getattr(self.f, name)
        def get_tensor(self, key):
            reads.append(key)
            return self.f.get_tensor(key)
    monkeypatch.setattr(vl, "safe_open", Counting)
    with pytest.raises(vl.UserError) as refused:
        vl.main(["--generate", "--from_pretrained", path, "--prompt", "What?", "--max_new_tokens", "1", "--device",
                 "cpu"])
    for device in ("cpu:0", torch.device("cpu"), "mps"):
        with pytest.raises(vl.UserError, match="GiB in float32"):
            vl.load_pretrained(path, torch.float32, device)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (2**20, 2**21))  # free, total: a 2 MiB GPU
    with pytest.raises(vl.UserError, match="more than this GPU's 0.00195 GiB; give --dtype bfloat16"):
        vl.load_pretrained(path, torch.float32, "cuda:0")
    assert capsys.readouterr().out == "" and reads == []  # refused before a tensor was read
    model = vl.load_pretrained(path, torch.bfloat16)  # half the bytes: they load
    assert model.language_model.lm_head.weight.dtype == torch.bfloat16 and len(reads) == len(model.state_dict())
    n = sum(p.numel() for p in model.parameters())
    assert str(refused.value) == (f"{path}: its weights take {4 * n / 2**30:.3g} GiB in float32, more than this "
                                  f"machine's 0.00977 GiB; give --dtype bfloat16 (half the bytes)")


def test_vl_generate_checks_architecture_flags_against_the_checkpoint(vl_ckpt, tmp_path, capsys):
    """--generate runs the checkpoint's architecture: a typed flag that agrees with its config.json runs (--image_size
    28 with its patch 14, not the preset's 12), one that differs is refused in one line, not ignored."""
    cv2.imwrite(str(tmp_path / "a.png"), _vl_textured(40, 60, 2))
    argv = ["--generate", "--from_pretrained", vl_ckpt[1]["t5save"], "--image", str(tmp_path / "a.png"),
            "--prompt", "What?", "--max_new_tokens", "1", "--device", "cpu", "--dtype", "float32"]
    vl.main(argv + ["--image_size", "28", "--vision_feature_layer", "-2"])
    for flags, want in ((["--image_size", "42"], "--image_size 42 (checkpoint: 28)"),
                        (["--hidden_size", "32", "--v_num_hidden_layers", "3"], "drop --hidden_size 32 (checkpoint: 64)")):
        with pytest.raises(vl.UserError, match=re.escape(want)):
            vl.main(argv + flags)
    with pytest.raises(vl.UserError, match=re.escape("--from_pretrained runs the checkpoint's architecture; drop "
                                                     "--hidden_size 32 (checkpoint: 64)")):  # it trained the 64 one
        vl.main(["--train", "--from_pretrained", vl_ckpt[1]["t5save"], "--hidden_size", "32", "--out_dir",
                 str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()
    capsys.readouterr()


def test_vl_generate_refuses_two_models(vl_ckpt, vl_tiny_run, tmp_path, capsys):
    """--generate answers with one model: --out_dir's run, or --from_pretrained's checkpoint. Given both (a --train
    command turned into --generate), --out_dir would go unread and the base checkpoint answer: refused in one line."""
    argv = ["--generate", "--from_pretrained", vl_ckpt[1]["t5save"], "--prompt", "What?", "--max_new_tokens", "1"]
    with pytest.raises(vl.UserError, match="^--generate answers with one model: --from_pretrained's checkpoint"):
        vl.main(argv + ["--out_dir", vl_tiny_run[0].out_dir])
    vl.main(argv)  # either one alone answers
    png = os.path.join(vl_tiny_run[0].data_dir, "train", "img_00000.png")
    vl.main(["--generate", "--out_dir", vl_tiny_run[0].out_dir, "--image", png, "--prompt", "What shape are they?"])
    capsys.readouterr()


def test_vl_prompt_tag_without_its_medium_names_the_flags(vl_tiny_run):
    """A --prompt whose own <image>/<video> tag has no medium of that kind (the other one given, or none) is refused
    in the command line's terms, naming the tag and the flag, not in the model's (placeholders without pixels)."""
    run, data = vl_tiny_run[0].out_dir, vl_tiny_run[0].data_dir
    png, mp4 = (os.path.join(data, "train", f) for f in ("img_00000.png", "clip_00000.mp4"))
    for tag, given in (("video", ["--image", png]), ("image", ["--video", mp4]), ("video", [])):
        with pytest.raises(vl.UserError, match=f"^--prompt has <{tag}> but no --{tag} was given: give --{tag} PATH"):
            vl.main(["--generate", "--out_dir", run, "--prompt", f"<{tag}>\nWhat shape are they?", *given])


def test_vl_prompt_tag_twice_for_one_medium_names_the_flag(vl_tiny_run):
    """A --prompt with its <image>/<video> tag twice for the one medium given is refused in the command line's
    terms (keep one tag), not as a count of placeholder tokens against features."""
    run, data = vl_tiny_run[0].out_dir, vl_tiny_run[0].data_dir
    for tag, path in (("image", "img_00000.png"), ("video", "clip_00000.mp4")):
        with pytest.raises(vl.UserError, match=f"^--prompt has <{tag}> more than once for one --{tag}: keep one tag$"):
            vl.main(["--generate", "--out_dir", run, "--prompt", f"<{tag}><{tag}>\nWhat shape are they?",
                     f"--{tag}", os.path.join(data, "train", path)])


def test_vl_prompt_past_the_context_names_max_new_tokens(vl_ckpt):
    """A text-only prompt whose --max_new_tokens runs past the context (256 here) is told to lower --max_new_tokens:
    fewer --n_frames alone cannot help when there is no video."""
    with pytest.raises(vl.UserError, match=r"^\d+ tokens .* exceed the context \(256\); lower --max_new_tokens"):
        vl.main(["--generate", "--from_pretrained", vl_ckpt[1]["t5save"], "--prompt", "What?",
                 "--max_new_tokens", "300"])


def test_vl_unknown_whitespace_in_a_prompt_is_shown(vl_tiny_run):
    """A prompt pasted with a Windows line end: the carriage return the token table lacks is named as '\\r', not as
    an empty '' (or a raw \\r that moves the terminal's cursor)."""
    png = os.path.join(vl_tiny_run[0].data_dir, "train", "img_00000.png")
    with pytest.raises(vl.UserError, match=r"^--prompt: '\\r' \(a GPT-2 token: .*\) in 'USER: <image>\\nWhat shape are they\?\\r ASSISTANT:' is "):
        vl.main(["--generate", "--out_dir", vl_tiny_run[0].out_dir, "--image", png,
                 "--prompt", "What shape are they?\r"])


def test_vl_preprocessing():
    assert vl.frame_indices(10, 8) == [0, 1, 2, 3, 5, 6, 7, 8]  # i*10//8
    assert vl.frame_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]  # short clips repeat frames
    with pytest.raises(vl.UserError):
        vl.frame_indices(0, 8)
    rgb = np.zeros((30, 50, 3), np.uint8)
    rgb[:, :, 0], rgb[:, 10:, 1] = 255, 128  # a left strip (x < 10) lies outside the centre crop
    x = vl.clip_transform(rgb, 20)  # shortest edge 30 -> 20, long side int(20*50/30) = 33, crop left (33-20)//2 = 6
    assert x.shape == (3, 20, 20)
    assert np.allclose(x[0], (1.0 - vl.CLIP_MEAN[0]) / vl.CLIP_STD[0], atol=1e-5)
    assert np.allclose(x[1, :, 3:], (128 / 255 - vl.CLIP_MEAN[1]) / vl.CLIP_STD[1], atol=1e-5)
    cfg = vl.Config(image_size=28, patch_size=14, image_token_index=7, video_token_index=8)
    assert vl.expand_placeholders([1, 7, 2, 8, 3], cfg, 3) == [1] + [7] * 4 + [2] + [8] * 15 + [3]
    assert vl.prompt_text("Why?", "video") == "USER: <video>\nWhy? ASSISTANT:"
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD  # the statistics CLIP was trained with
    assert np.allclose(vl.CLIP_MEAN, OPENAI_CLIP_MEAN, rtol=0, atol=1e-7)
    assert np.allclose(vl.CLIP_STD, OPENAI_CLIP_STD, rtol=0, atol=1e-7)


def test_vl_video_roundtrip_and_frame_folder(tmp_path, monkeypatch):
    path = str(tmp_path / "c.mp4")
    w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 8, (40, 40))
    frames = []
    for t in range(6):
        img = np.full((40, 40, 3), 20 * t, np.uint8)
        frames.append(img)
        w.write(img)
    w.release()
    calls = []
    transform = vl.clip_transform
    monkeypatch.setattr(vl, "clip_transform", lambda *a: calls.append(1) or transform(*a))
    v = vl.load_video(path, 4, 20)
    assert v.shape == (4, 3, 20, 20) and len(calls) == 4  # only the 4 sampled frames of 6 are transformed
    grey = v[:, 0].mean((1, 2)) * vl.CLIP_STD[0] + vl.CLIP_MEAN[0]  # back to [0, 1]
    assert np.allclose(grey * 255, [0, 20, 60, 80], atol=4)  # frames 0, 1, 3, 4 = i*6//4
    os.makedirs(tmp_path / "frames")
    for i, f in enumerate(frames):
        cv2.imwrite(str(tmp_path / "frames" / f"f{2 * i}.png"), f)  # f0 .. f10: f10 is last, not second
    assert np.allclose(vl.load_video(str(tmp_path / "frames"), 4, 20), v, atol=0.1)
    opened, real = [], cv2.VideoCapture

    class Shrinking:  # the second opening of the file decodes only 2 of its 6 frames
        def __init__(self, p):
            self.cap, self.left = real(p), 6 if not opened else 2
            opened.append(p)
            self.isOpened, self.retrieve, self.get = self.cap.isOpened, self.cap.retrieve, self.cap.get

        def grab(self):
            self.left -= 1
            return self.left >= 0 and self.cap.grab()
    monkeypatch.setattr(vl.cv2, "VideoCapture", Shrinking)
    with pytest.raises(vl.UserError, match="ended early"):
        vl.load_video(path, 4, 20)


def _vl_hf_image_processor(tmp_path):
    """The image processor transformers picks for a Video-LLaVA folder, built from a preprocessor_config.json like
    the hub's (shortest edge 224, crop 224, bicubic = resample 3, CLIP mean/std); no download."""
    from transformers import AutoImageProcessor
    folder = tmp_path / "proc"
    os.makedirs(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "VideoLlavaImageProcessor", "do_resize": True, "size": {"shortest_edge": 224},
        "resample": 3, "do_center_crop": True, "crop_size": 224, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "do_convert_rgb": True, "image_mean": vl.CLIP_MEAN.tolist(),
        "image_std": vl.CLIP_STD.tolist()}))
    proc = AutoImageProcessor.from_pretrained(str(folder))
    assert type(proc).__name__ == "VideoLlavaImageProcessor"
    return proc


def _vl_pixels(x):
    """Normalised (..., 3, S, S) -> the [0, 255] pixel scale, where the tolerance is stated."""
    x = np.asarray(x, np.float64)
    return (x * vl.CLIP_STD[:, None, None] + vl.CLIP_MEAN[:, None, None]) * 255


def _vl_clip_writer(path):
    """-> an OpenCV writer of a 320x240 clip at 24 fps and its codec: H.264 where OpenCV's FFmpeg has it, else mp4v."""
    for fourcc in ("avc1", "mp4v"):
        w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), 24, (320, 240))
        if w.isOpened():
            return w, fourcc


def _vl_textured(h, w, seed):
    """A natural-looking uint8 RGB picture: sinusoid texture, sharp-edged rectangles, noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = np.stack([128 + 60 * np.sin(x / (7 + 5 * c) + y / (11 + 3 * c)) + 40 * np.cos(x * y / 3000 + c)
                    for c in range(3)], -1)
    for _ in range(12):
        y0, x0 = rng.integers(0, h - 20), rng.integers(0, w - 20)
        img[y0:y0 + rng.integers(10, h // 3), x0:x0 + rng.integers(10, w // 3)] = rng.integers(0, 256, 3)
    return np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)


def test_vl_pixels_match_transformers_image_processor(tmp_path):
    """A 1000x700 image with texture and edges: our loader's pixels against VideoLlavaImageProcessor's (PIL)."""
    proc = _vl_hf_image_processor(tmp_path)
    rgb = _vl_textured(700, 1000, 0)
    cv2.imwrite(str(tmp_path / "big.png"), rgb[:, :, ::-1])
    want = proc(images=[rgb], return_tensors="np", return_legacy_image_output=False)["pixel_values"][0]  # (3, 224, 224)
    ours = vl.load_image(str(tmp_path / "big.png"), 224)
    assert ours.shape == want.shape == (3, 224, 224)
    diff = np.abs(_vl_pixels(ours) - _vl_pixels(want)).max()
    print(f"image: max pixel difference {diff:.3f}/255")
    assert diff <= 2
    from PIL import Image  # transparency (alpha channel, palette) is composited onto white, as convert_to_rgb does
    # 224 rows: no resize, so the composite itself is compared (exactly)
    small, alpha = rgb[:224, :300], np.random.default_rng(1).integers(0, 256, (224, 300, 1), dtype=np.uint8)
    for name, im in (("rgba", Image.fromarray(np.concatenate([small, alpha], -1), "RGBA")),
                     ("palette", Image.fromarray(small).quantize(64))):
        im.save(tmp_path / f"{name}.png", **({"transparency": 3} if name == "palette" else {}))
        want = proc(images=[Image.open(tmp_path / f"{name}.png")], return_tensors="np",
                    return_legacy_image_output=False)["pixel_values"][0]
        assert np.abs(_vl_pixels(vl.load_image(str(tmp_path / f"{name}.png"), 224)) - _vl_pixels(want)).max() < 0.01
    bgra16 = np.concatenate([small[:, :, ::-1], alpha], -1).astype(np.uint16) * 257  # the RGBA picture in 16 bits
    cv2.imwrite(str(tmp_path / "rgba16.png"), bgra16)
    assert np.array_equal(vl.load_image(str(tmp_path / "rgba16.png"), 224), vl.load_image(str(tmp_path / "rgba.png"), 224))


def test_vl_video_pixels_and_frames_match_transformers(tmp_path):
    """A 320x240 clip written by OpenCV (H.264 where OpenCV's FFmpeg can write it, else MPEG-4 Part 2), decoded,
    sampled and preprocessed by VideoLlavaVideoProcessor. It needs torchvision; where that cannot be built (no CPU
    torchvision wheel for this torch) the frames are sampled with transformers' default_sample_indices_fn and
    preprocessed one by one by the image processor (the video processor runs the same antialiased bicubic as our
    loader, on the same uint8 frames)."""
    from transformers.video_utils import VideoMetadata, default_sample_indices_fn
    for total, n in [(10, 8), (16, 8), (37, 8), (100, 8), (9, 4), (30, 7), (8, 8), (122, 14)]:
        want = default_sample_indices_fn(VideoMetadata(total_num_frames=total, fps=24.0), num_frames=n)
        assert vl.frame_indices(total, n) == want.tolist()
    # integer arithmetic: the docs' float np.arange(0, 122, 122/14) gives frame 60 where transformers takes 61
    assert vl.frame_indices(122, 14)[7] == 61
    path = str(tmp_path / "clip.mp4")
    w, fourcc = _vl_clip_writer(path)
    base = _vl_textured(240, 400, 1)
    for t in range(20):  # the texture pans right 4 pixels a frame
        w.write(np.ascontiguousarray(base[:, 4 * t:4 * t + 320, ::-1]))
    w.release()
    cap, frames = cv2.VideoCapture(path), []
    while (got := cap.read())[0]:
        frames.append(got[1][:, :, ::-1])  # RGB (240, 320, 3)
    assert len(frames) == 20
    meta = VideoMetadata(total_num_frames=20, fps=24.0)
    try:
        from transformers import VideoLlavaVideoProcessor
        proc, ref = VideoLlavaVideoProcessor(), "VideoLlavaVideoProcessor"  # the hub's settings are its defaults
        want = proc(videos=[np.stack(frames)], do_sample_frames=True, num_frames=8, video_metadata=[meta],
                    return_tensors="np")["pixel_values_videos"][0]
    except ImportError:
        idx, proc = default_sample_indices_fn(meta, num_frames=8), _vl_hf_image_processor(tmp_path)
        want = proc(images=[frames[i] for i in idx], return_tensors="np",
                    return_legacy_image_output=False)["pixel_values"]
        ref = "default_sample_indices_fn + VideoLlavaImageProcessor"
    ours = vl.load_video(path, 8, 224)  # (8, 3, 224, 224)
    diff = np.abs(_vl_pixels(ours) - _vl_pixels(want)).max()
    print(f"video ({fourcc}) against {ref}: max pixel difference {diff:.3f}/255")
    assert ours.shape == want.shape and diff <= 2


@pytest.fixture(scope="module")
def vl_released(tmp_path_factory):
    """Video-LLaVA at the released checkpoint's shapes with tiny widths: CLIP towers at 224 px, patch 14 (256 patches
    + CLS), feature layer -2; a LLaMA decoder with the 7B's 4096-token context, room for 8 frames (2056 tokens);
    saved as the hub ships it: bfloat16, sharded, the hub key layout (`language_model.model.*`,
    `language_model.lm_head`, towers with `vision_model.`), a LLaMA tokenizer.json."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(10)  # greedy top-2 margins of 7+ bfloat16 steps on both test media
    cfg = transformers.VideoLlavaConfig(
        text_config=dict(_VL_TEXT, max_position_embeddings=4096, num_key_value_heads=4),
        vision_config=dict(_VL_VISION, num_hidden_layers=2, image_size=224))
    folder = tmp_path_factory.mktemp("vl_released")
    model = transformers.VideoLlavaForConditionalGeneration(cfg)
    model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="200KB")
    index = json.load(open(folder / "model.safetensors.index.json"))
    for name in set(index["weight_map"].values()):  # transformers 5 saves towers without `vision_model.`: hub names
        save_file({vl.canonical_key(k): v for k, v in load_file(str(folder / name)).items()}, str(folder / name),
                  metadata={"format": "pt"})
    index["weight_map"] = {vl.canonical_key(k): f for k, f in index["weight_map"].items()}
    json.dump(index, open(folder / "model.safetensors.index.json", "w"))
    _vl_tokenizer(folder)
    assert len(index["weight_map"]) > 1 and len(set(index["weight_map"].values())) > 3
    assert "image_tower.vision_model.embeddings.position_embedding.weight" in index["weight_map"]
    ref = transformers.VideoLlavaForConditionalGeneration.from_pretrained(str(folder), dtype=torch.bfloat16).eval()
    assert ref.model.image_tower.embeddings.position_embedding.weight.shape[0] == 257
    return ref, str(folder)


@pytest.mark.parametrize("medium", ["image", "video"])
def test_vl_released_shapes_pixels_to_tokens_match_transformers(vl_released, medium, tmp_path, monkeypatch, capsys):
    """From a file to greedy tokens at the released shapes, in bfloat16: a 640x427 textured image (256 <image> tokens)
    or a 320x240 OpenCV clip of a moving circle (8 frames, 2056 <video> tokens). Ours: --generate on the folder (our
    loader, tokenizer.json, expansion, cached decode), and the model's forward. Reference: transformers'
    VideoLlavaProcessor (its PIL image processor and its string expansion, then LlamaTokenizer) and model. Its
    video processor needs torchvision, which cannot be installed here: the clip's pixels are ours (their parity
    with transformers' resampling is test_vl_video_pixels_and_frames_match_transformers), its expansion and tokens
    are still the processor's. Logits: both sides round every activation to bfloat16 (8 significant bits); the same
    pixels give the same logits, but the two loaders' pixels differ by up to 2/255 (1/255 here), about one bfloat16
    step of a normalised pixel, so a logit may move by a rounding step or two: the bound is 2 bfloat16 steps at the
    largest logit (2 * 2^-7 * 2^floor(log2 max|logit|)). Greedy tokens are compared where transformers' top-2 margin
    exceeds twice that bound (checked: a bfloat16 near-tie would test the rounding, not the model; the weights drawn
    by manual_seed(10) give margins of 7+ steps)."""
    from transformers import AutoTokenizer, VideoLlavaProcessor
    ref, folder = vl_released
    question = "Which way does the circle move?"
    tok = AutoTokenizer.from_pretrained(folder)
    monkeypatch.setattr(VideoLlavaProcessor, "check_argument_for_proper_class", lambda *a: None)  # no video class
    proc = VideoLlavaProcessor(image_processor=_vl_hf_image_processor(tmp_path), video_processor=None, tokenizer=tok)
    text = f"USER: <{medium}>\n{question} ASSISTANT:"
    if medium == "image":
        path = str(tmp_path / "photo.png")
        rgb = _vl_textured(427, 640, 3)
        cv2.circle(rgb, (400, 200), 80, (230, 30, 30), -1)
        cv2.imwrite(path, rgb[:, :, ::-1])
        inputs = proc(text=[text], images=[rgb], return_legacy_image_output=False)
        ours_pix = {"pixel_values_images": torch.from_numpy(vl.load_image(path, 224))[None]}
    else:
        path = str(tmp_path / "clip.mp4")
        w, _ = _vl_clip_writer(path)
        base = _vl_textured(240, 320, 4)
        for t in range(20):  # a red circle crosses a textured background, left to right
            img = base.copy()
            cv2.circle(img, (30 + 13 * t, 120), 40, (230, 30, 30), -1)
            w.write(np.ascontiguousarray(img[:, :, ::-1]))
        w.release()
        vids = torch.from_numpy(vl.load_video(path, 8, 224))[None]  # (1, 8, 3, 224, 224)
        expanded = text.replace("<video>", proc.replace_video_token({"pixel_values_videos": vids}, 0))
        inputs = dict(tok([expanded], return_tensors="pt"), pixel_values_videos=vids)
        ours_pix = {"pixel_values_videos": vids}
    want_ids = inputs["input_ids"]
    ours = vl.VideoLlava.from_pretrained(folder, torch.bfloat16).eval()
    ids = torch.tensor([vl.expand_placeholders(vl.load_tokenizer(folder).encode(vl.prompt_text(question, medium)),
                                               ours.cfg, 8)])
    assert ids.tolist() == want_ids.tolist()
    assert (ids >= 32000).sum() == (256 if medium == "image" else 2056)
    with torch.no_grad():
        want = ref(**inputs).logits[0].float()  # (L, V)
        got = ours(ids, **ours_pix)[0][0].float()
    top = want.abs().max().item()
    tol = 2 * torch.finfo(torch.bfloat16).eps * 2 ** math.floor(math.log2(top))  # eps: the step between 1 and 2
    diff = (got - want).abs().max().item()
    assert diff <= tol
    out = ref.generate(**inputs, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    top2 = torch.stack(out.scores)[:, 0].float().topk(2).values  # (steps, 2)
    margin = (top2[:, 0] - top2[:, 1]).min().item()
    assert margin > 2 * tol  # no logit moving by the bound can swap the top two
    capsys.readouterr()
    vl.main(["--generate", "--from_pretrained", folder, f"--{medium}", path, "--prompt", question,
             "--dtype", "bfloat16", "--max_new_tokens", "3", "--device", "cpu"])
    answer = capsys.readouterr().out.strip()
    assert answer == tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip()
    print(f"{medium}: {ids.shape[1]} tokens, max |logit| {top:.3f}, max |diff| {diff:.5f} (bound {tol:.5f}), greedy "
          f"{out.sequences[0, ids.shape[1]:].tolist()} = {answer!r}, smallest top-2 margin {margin:.5f}")


def test_vl_sampler_and_metrics():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert vl.sample_next(logits, 0.0, 0, 1.0, g).item() == 1
    assert all(vl.sample_next(logits, 1.0, 1, 1.0, g).item() == 1 for _ in range(20))  # top-k 1 = argmax
    assert all(vl.sample_next(logits, 1.0, 0, 0.01, g).item() == 1 for _ in range(20))  # tiny top-p = argmax
    draws = {vl.sample_next(logits, 1.0, 2, 1.0, g).item() for _ in range(200)}
    assert draws == {1, 3}  # top-k 2 keeps exactly the two best
    many = logits.expand(20000, -1)  # 20000 draws in one call
    a, b, c = (vl.sample_next(many, 1.0, 0, 1.0, torch.Generator().manual_seed(s)) for s in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)  # a seeded generator reproduces, and its seed matters
    freq = lambda ids: torch.bincount(ids, minlength=4) / 20000.0  # noqa: E731
    assert torch.allclose(freq(vl.sample_next(many, 2.0, 0, 1.0, g)), (logits[0] / 2).softmax(-1), atol=0.015)
    # top-p keeps the smallest prefix whose mass reaches p: 0.64 (id 1) + 0.24 (id 3) >= 0.8, in their ratio
    kept = freq(vl.sample_next(many, 1.0, 0, 0.8, g))
    assert kept[0] == kept[2] == 0 and abs(kept[1] - 0.644 / 0.881) < 0.015
    # a prefix whose mass equals p exactly is enough (as transformers' TopPLogitsWarper): one of two equal tokens
    halves = torch.tensor([[0.0, 0.0, -math.inf]])  # probabilities 0.5, 0.5, 0 exactly
    assert len({vl.sample_next(halves, 1.0, 0, 0.5, g).item() for _ in range(50)}) == 1
    assert vl.exact_match(["Red.", "left ", "two"], ["red", "left", "three"]) == pytest.approx(2 / 3)



def test_vl_training_arithmetic_by_hand_and_a_video_cut_short(tmp_path):
    """The learning rate (linear warmup to lr, cosine down to min_lr), every epoch a new order of all the rows, weight
    decay on matrices only, the val column as the mean of its batches' losses (64 rows each), all by hand; and a video
    whose last fifth does not decode refused (not trained on its first frames without a word)."""
    cfg = dataclasses.replace(vl.Config(), lr=1.0, min_lr=0.1, warmup=4, max_steps=14, dtype="float32")
    assert [vl.lr_at(s, cfg) for s in (0, 3, 4, 9, 14, 20)] == pytest.approx([0.25, 1.0, 1.0, 0.55, 0.1, 0.1])
    epochs = [sum((vl.batch_indices(s, 10, 5, 0) for s in (2 * e, 2 * e + 1)), []) for e in range(2)]  # 2 batches each
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(10)) and epochs[0] != epochs[1]
    params = [torch.zeros(2, 2, requires_grad=True), torch.zeros(2, requires_grad=True)]  # a matrix, a gain
    groups = vl.make_optimizer(params, cfg, "cpu")[0].param_groups
    assert [(g["params"], g["weight_decay"]) for g in groups] == [([params[0]], cfg.weight_decay), ([params[1]], 0.0)]

    class TokenMean(torch.nn.Module):  # row i has 1 + i % 4 answer tokens, each of loss i: a pass's token mean
        def forward(self, c, targets):
            return None, (c[:, None] * (targets != -100)).sum() / (targets != -100).sum()
    seen = []  # the rows of each batch
    rows = types.SimpleNamespace(entries=[{"kind": "video" if i % 3 else "image"} for i in range(70)],
                                 batch=lambda idx, device: seen.append(idx) or dict(c=torch.tensor(idx).float(), targets=
                                 torch.tensor([[0] * (1 + i % 4) + [-100] * (3 - i % 4) for i in idx])))
    want = sum(i * (1 + i % 4) for i in range(70)) / sum(1 + i % 4 for i in range(70))  # val: the mean over tokens
    for size in (1, 7, 64):  # whatever --batch_size, with images first
        seen.clear()
        assert vl.eval_loss(TokenMean(), rows, dataclasses.replace(cfg, batch_size=size), "cpu") == pytest.approx(want)
        assert max(map(len, seen)) == size and sum(seen, []) == sorted(range(70), key=lambda i: i % 3 > 0)
    check_cut_off_video(vl, tmp_path, keep=0.8)


def test_vl_batch_loss_ranks_average_to_the_global_batch():
    """Each DDP rank's loss counts `world` times, since DDP averages the ranks' gradients: two ranks' halves of a
    batch (computed here one after the other, no processes), averaged, give the one-process gradient and loss. A
    stub model: row i has a_i = i+1 answer tokens, each of loss w * (i+1), so the token mean is (1+4+9+16)/10 = 3."""
    w = torch.ones((), requires_grad=True)

    def model(targets, c):  # the pass's mean over its answer tokens
        return None, (w * c[:, None] * (targets != -100)).sum() / (targets != -100).sum()
    rows = types.SimpleNamespace(answers=[[0] * (i + 1) for i in range(4)],
                                 entries=[{"kind": k} for k in ("image", "video", "video", "image")])
    rows.batch = lambda part, device: dict(c=torch.tensor([i + 1.0 for i in part]), targets=torch.tensor(
        [[0] * (i + 1) + [-100] * (3 - i) for i in part]))  # (n, 4): row i's a_i answer tokens, then ignored
    scaler = types.SimpleNamespace(scale=lambda loss: loss)
    cfg = dataclasses.replace(vl.Config(), grad_accum=1, dtype="float32")
    grads, totals = [], []
    for world, size in ((1, 4), (2, 2)):
        for rank in range(world):
            totals.append(vl.batch_loss(model, rows, [0, 1, 2, 3], dataclasses.replace(cfg, batch_size=size),
                                        rank, world, False, "cpu", scaler))
        grads.append(w.grad.item() / world)  # DDP: the mean of the ranks' summed gradients
        w.grad = None
    assert grads == pytest.approx([3.0, 3.0]) and totals == pytest.approx([3.0, 0.5, 2.5])  # rank totals sum to 3


def test_vl_a_row_that_ended_stays_ended(vl_ckpt):
    """Batched greedy decoding with an EOS: the row that produces it gets pad ids after it until the batch stops (a
    row that started again would add words after its answer), the other rows go on as without an EOS."""
    ours = vl.VideoLlava.from_pretrained(vl_ckpt[1]["hub"], dtype=torch.float32).eval()
    ids, mask, imgs, vids = _vl_inputs(1)
    free = vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=6)
    eos = int(free[0, 0])  # row 0 ends at once; rows 1 and 2 never produce this id
    assert eos not in free[1:].flatten().tolist()
    for use_cache in (True, False):
        out = vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0,
                          use_cache=use_cache)
        assert out[0].tolist() == [eos, 0, 0, 0, 0, 0] and torch.equal(out[1:], free[1:])

def test_vl_generate_zero_new_tokens_and_a_dtype_by_name(vl_ckpt):
    """The Python API as transformers': a dtype may be given by name, and max_new_tokens=0 returns no new ids."""
    ours = vl.VideoLlava.from_pretrained(vl_ckpt[1]["hub"], dtype="bfloat16").eval()
    assert ours.language_model.lm_head.weight.dtype == torch.bfloat16
    ids, mask, imgs, vids = _vl_inputs(1)
    assert vl.generate(ours, ids, mask, imgs, vids, max_new_tokens=0).shape == (3, 0)

def test_vl_world_video_questions_need_several_frames():
    """Every clip question needs more than one sampled frame: an order clip shows two (colour, shape) pairs, neither
    in the first sampled frame, both in the last, the first one alone in some frame between, and the answer names the
    right pair; the sampled frame where each appears varies, so no fixed frame tells the order. A motion clip's shape
    really moves the way the answer says. Novel pairs occur in `novel` clips (at least one per clip) and nowhere else."""
    def where(colour, img):  # (row, col) of the pixels drawn in exactly this colour
        return np.argwhere((np.abs(img.astype(int) - vl.COLOURS[colour]).sum(-1) == 0))

    def drawn(shape, colour, cx, cy):  # that shape alone at that centre, as make_clip draws it
        img = np.full((vl.SIDE, vl.SIDE, 3), 60, np.uint8)
        vl.draw_shape(img, shape, colour, cx, cy)
        return where(colour, img)

    idx = vl.frame_indices(vl.CLIP_LEN, 4)
    kinds, slots = set(), {0: set(), 1: set()}
    for split in ("train", "novel"):
        rng = random.Random(3)
        for _ in range(60):
            frames, (q, a) = vl.make_clip(rng, split, 4)
            shown = [frames[i] for i in idx]
            if q.startswith("Which way"):
                colour, (dx, dy) = q.split()[4], vl.MOTIONS[a]
                ys, xs = zip(*[where(colour, f).mean(0) for f in shown])
                assert (xs[-1] - xs[0]) * dx + (ys[-1] - ys[0]) * dy > 15  # moved along the answer's direction
                assert abs((xs[-1] - xs[0]) * dy) + abs((ys[-1] - ys[0]) * dx) < 3  # and not across it
                assert (tuple(q.split()[4:6]) in vl.NOVEL_PAIRS) == (split == "novel")
                kinds.add("direction")
                continue
            assert q in ("Which shape appears first?", "Which shape appears last?")
            last = shown[-1]
            pairs = []
            for colour in vl.COLOURS:
                pix = where(colour, last)
                if len(pix) == 0:
                    continue
                cy, cx = (np.floor(pix.mean(0) / vl.CELL) * vl.CELL + vl.CELL // 2).astype(int)  # its cell's centre
                shape = [sh for sh in vl.SHAPES if np.array_equal(drawn(sh, colour, cx, cy), pix)]  # covers exactly these
                assert len(shape) == 1
                present = [len(where(colour, f)) > 0 for f in shown]
                pairs.append((present.index(True), (colour, shape[0]), present))
            assert len(pairs) == 2  # two shapes of two colours, both in the last frame
            (t1, first, p1), (t2, second, p2) = sorted(pairs)
            assert 0 < t1 < t2 and all(p1[t1:]) and all(p2[t2:])  # none at first, the first alone at t1, both stay
            assert " ".join(first if q.endswith("first?") else second) == a
            assert bool({first, second} & vl.NOVEL_PAIRS) == (split == "novel")
            slots[0].add(t1)
            slots[1].add(t2)
            kinds.add(q.split()[-1])
    assert kinds == {"direction", "first?", "last?"}
    assert slots[0] == {1, 2} and slots[1] == {2, 3}  # which sampled frame shows each shape first varies


def test_vl_world_order_clips_at_every_frame_count():
    """At every --n_frames the synthetic world accepts (3..CLIP_LEN), an order clip's sampled frames show nothing
    first, then one object alone, then both: the order is always visible in what the model is given."""
    for n in range(3, vl.CLIP_LEN + 1):
        rng, idx, checked = random.Random(n), vl.frame_indices(vl.CLIP_LEN, n), 0
        while checked < 25:
            frames, (q, _) = vl.make_clip(rng, "train", n)
            if q.startswith("Which way"):
                continue
            drawn = [int((frames[i] != 60).any(-1).sum()) for i in idx]  # pixels off the background, per sample
            assert drawn[0] == 0 and 0 < min(d for d in drawn if d) < drawn[-1], (n, drawn)
            checked += 1


def test_vl_world_manifest(tmp_path):
    """A folder whose build was cut short is one this script wrote: the world is written again; an unreadable
    world.json, or another script's beside the user's files, marks no folder of ours: one line, nothing touched."""
    cfg = vl.Config(**{**vl.PRESETS["tiny"], "n_train": 2, "n_test": 1, "data_dir": str(tmp_path)})
    files = vl.build_world(cfg)
    assert json.load(open(tmp_path / "world.json"))["train"] == 2 and len(vl.read_annotations(files["train"])) == 8
    first = lambda s: ((tmp_path / s / "img_00000.png").read_bytes(),  # noqa: E731  # the picture, its questions
                       [(e["question"], e["answer"]) for e in vl.read_annotations(files[s])[:4]])
    assert first("train") != first("val") != first("test") != first("train")  # each split its own random stream
    json.dump({**json.load(open(tmp_path / "world.json")), "version": 0}, open(tmp_path / "world.json", "w"))
    vl.build_world(cfg)  # a build cut short (the placeholder manifest): done again
    assert json.load(open(tmp_path / "world.json"))["version"] == 1
    other = tmp_path / "other"
    other.mkdir()
    (other / "world.json").write_text('{"img": [1, 1], "vid": [1, 1, 1], "seed": 1, "version": 3}')
    (other / "train.jsonl").write_text("mine")
    with pytest.raises(vl.UserError, match="did not write"):
        vl.build_world(dataclasses.replace(cfg, data_dir=str(other)))
    (other / "world.json").write_text("{not json")
    with pytest.raises(vl.UserError, match="did not write"):
        vl.build_world(dataclasses.replace(cfg, data_dir=str(other)))
    assert (other / "train.jsonl").read_text() == "mine" and (other / "world.json").read_text() == "{not json"
    assert vl.parse_args(["--min_lr", "0"])[1].min_lr == 0  # a decay to zero is allowed
    with pytest.raises(vl.UserError, match=r"--top_p 0.0: in \(0, 1\]"):  # (at temperature 0 another line fires)
        vl.parse_args(["--top_p", "0", "--temperature", "1"])


def test_vl_causal_and_loss_mask():
    cfg = vl.Config(**{**vl.PRESETS["tiny"], "vocab_size": 20, "image_token_index": 18, "video_token_index": 19})
    torch.manual_seed(0)
    m = vl.VideoLlava(cfg)
    ids = torch.randint(0, 18, (2, 10))
    a, _ = m(ids)
    ids2 = ids.clone()
    ids2[:, 6:] = (ids2[:, 6:] + 1) % 18
    b, _ = m(ids2)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6) and not torch.allclose(a[:, 6:], b[:, 6:])
    tgt = torch.full((2, 10), -100)
    tgt[:, 7:] = ids[:, 7:]
    scored, loss = m(ids, targets=tgt)  # the head projects the scored positions only: (n, V), row by row
    want = torch.nn.functional.cross_entropy(a[:, 7:].reshape(-1, 20), ids[:, 7:].reshape(-1))
    assert torch.allclose(loss, want, atol=1e-6) and torch.allclose(scored, a[:, 7:].reshape(-1, 20), atol=1e-6)


def test_vl_padded_positions_by_hand():
    """RoPE positions count the real tokens before each token, from 0 as in transformers (a left pad sits at 0); a
    query sees the real tokens up to itself, and itself (the pad too); a static cache's unfilled column is hidden."""
    pos, mask = vl.padded_positions(torch.tensor([[0, 1, 1], [1, 1, 1]]), 0, width=4)
    assert pos.tolist() == [[0, 0, 1], [0, 1, 2]]
    assert mask[:, 0].int().tolist() == [[[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0]],
                                         [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0]]]
    assert vl.padded_positions(torch.tensor([[0, 1, 1], [1, 1, 1]]), 2)[0].tolist() == [[1], [2]]  # after a cache



def test_vl_batches_by_hand():
    """Examples.batch on two rows of known ids: training rows are prompt + answer, right-padded, each position's
    target the next token on the answer (its EOS included) and -100 elsewhere; generation rows are the prompts alone,
    left-padded, with the attention mask marking the real tokens."""
    ex = object.__new__(vl.Examples)
    ex.prompts, ex.answers = [[1, 2, 3], [4, 5]], [[7, 8, 9], [6, 9]]  # 9 plays the EOS
    ex.entries, ex.media = [{"kind": "image"}] * 2, [torch.zeros(3, 4, 4)] * 2
    b = ex.batch([0, 1], "cpu")
    assert b["input_ids"].tolist() == [[1, 2, 3, 7, 8, 9], [4, 5, 6, 9, 0, 0]]
    assert b["targets"].tolist() == [[-100, -100, 7, 8, 9, -100], [-100, 6, 9, -100, -100, -100]]
    assert "attention_mask" not in b and b["pixel_values_images"].shape == (2, 3, 4, 4)
    g = ex.batch([0, 1], "cpu", generating=True)
    assert g["input_ids"].tolist() == [[1, 2, 3], [0, 4, 5]] and g["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]


def test_vl_init_scales_the_residual_outputs():
    """GPT-2's init: weights at std 0.02, except the projections that write into a residual stream (attention and MLP
    outputs, in the LLM and the CLIP towers), at 0.02 / sqrt(2 * layers) so the stream's variance does not grow with
    depth: 0.02 / sqrt(6) for the default 3 layers."""
    torch.manual_seed(0)
    m = vl.VideoLlava(vl.Config(vocab_size=10))
    layer, clip = m.language_model.model.layers[0], m.image_tower.vision_model.encoder.layers[0]
    for w in (layer.self_attn.o_proj.weight, layer.mlp.down_proj.weight, clip.self_attn.out_proj.weight,
              clip.mlp.fc2.weight):
        assert w.std().item() == pytest.approx(0.02 / math.sqrt(6), rel=0.05)
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_vl_whiten_patches_init():
    """--whiten_patches: each tower's patch_embedding outputs on the init batch are decorrelated at unit variance
    (the conv reads a patch in unfold's order), the patch positions are 2-D sin-cos at std 0.3 (column features
    constant down a column), the CLS position row is untouched, and the visual tokens are still centred."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(vl.Config(), **vl.PRESETS["tiny"], vocab_size=40, image_token_index=38,
                              video_token_index=39, whiten_patches=True)
    m = vl.VideoLlava(cfg)
    cls_pos = m.video_tower.vision_model.embeddings.position_embedding.weight[0].clone()
    imgs, vids = torch.randn(16, 3, 48, 48), torch.randn(5, cfg.n_frames, 3, 48, 48)
    with torch.no_grad():
        m.init_from_data(imgs, vids)
        for tower, pix in ((m.image_tower, imgs), (m.video_tower, vids.flatten(0, 1))):
            emb = tower.vision_model.embeddings
            h = emb.patch_embedding(pix).flatten(2).transpose(1, 2).flatten(0, 1).double()
            assert torch.allclose(torch.cov(h.T), torch.eye(h.shape[1], dtype=torch.float64), atol=1e-3)
            pos = emb.position_embedding.weight[1:].view(4, 4, -1)
            q = cfg.v_hidden_size // 4
            assert torch.equal(pos[:, :, :2 * q], pos[:1, :, :2 * q].expand(4, -1, -1))
            torch.testing.assert_close(pos.flatten(0, 1).std(0), torch.full((cfg.v_hidden_size,), 0.3))
        assert torch.equal(m.video_tower.vision_model.embeddings.position_embedding.weight[0], cls_pos)
        f = torch.cat([m.image_features(imgs).flatten(0, 1), m.video_features(vids).flatten(0, 1)])
        assert f.mean(0).abs().max() < 1e-3 * m.language_model.model.embed_tokens.weight.std().item()


def test_vl_init_from_data_centres_the_visual_tokens():
    """The data-dependent init changes initial weights only: afterwards the fixed batch's visual tokens have zero mean
    and the text embeddings' std per feature (they were mostly one shared vector), and each medium still goes through
    the same faithful forward."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(vl.Config(), **vl.PRESETS["tiny"], vocab_size=40, image_token_index=38,
                              video_token_index=39)
    m = vl.VideoLlava(cfg)
    imgs, vids = torch.randn(6, 3, 48, 48), torch.randn(5, cfg.n_frames, 3, 48, 48)
    imgs[:, :, :24] = vids[:, :, :, :24] = 0.3  # a shared background: the tokens of that half coincide
    with torch.no_grad():
        m.init_from_data(imgs, vids)
        f = torch.cat([m.image_features(imgs).flatten(0, 1), m.video_features(vids).flatten(0, 1)])
        std = m.language_model.model.embed_tokens.weight.std()
        assert f.mean(0).abs().max() < 1e-3 * std.item()
        assert torch.allclose(f.std(0), std.expand(f.shape[1]), rtol=1e-3)
        for tower, pix in ((m.image_tower, imgs), (m.video_tower, vids.flatten(0, 1))):
            vm = tower.vision_model
            h = vm.pre_layrnorm(vm.embeddings(pix)).flatten(0, 1)
            assert h.mean(0).abs().max() < 1e-4 and (h.std(0) - 1).abs().max() < 1e-3
    # data with clips only: the image tower keeps its initial weights, the video tokens are still centred
    m2 = vl.VideoLlava(cfg)
    before = m2.image_tower.vision_model.pre_layrnorm.weight.clone()
    with torch.no_grad():
        m2.init_from_data(None, vids)
        assert torch.equal(m2.image_tower.vision_model.pre_layrnorm.weight, before)
        assert m2.video_features(vids).flatten(0, 1).mean(0).abs().max() < 1e-3 * std.item()


def test_vl_init_from_data_refuses_a_single_patch():
    """One init picture of one patch (--image_size = --patch_size) has no spread to scale by: refused by flag, where
    it would leave NaN weights; two such pictures are enough and give finite weights."""
    cfg = dataclasses.replace(vl.Config(), **vl.PRESETS["tiny"], vocab_size=40, image_token_index=38,
                              video_token_index=39, image_size=12, patch_size=12)
    with pytest.raises(vl.UserError, match="--data_init: one picture of one patch .* --image_size"), torch.no_grad():
        vl.VideoLlava(cfg).init_from_data(torch.randn(1, 3, 12, 12), None)
    m = vl.VideoLlava(cfg)
    with torch.no_grad():
        m.init_from_data(torch.randn(2, 3, 12, 12), None)
    assert all(p.isfinite().all() for p in m.parameters())

def test_vl_train_tiny_eval_generate_freeze(tmp_path, capsys, monkeypatch):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    proc = run_script("video_llava.py", "--train", "--preset", "tiny", "--data_dir", data, "--out_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_val_column(proc.stdout, eval_interval=4, max_steps=6)  # the tiny preset logs every 2 steps
    ev = json.load(open(os.path.join(out, "eval.json")))
    for split in ("test", "novel"):
        for kind in ("image", "video"):
            assert 0.0 <= ev[split][kind]["exact_match"] <= 1.0 and ev[split][kind]["n"] > 0
    assert ev["train_seconds"] > 0
    lines = [json.loads(x) for x in open(os.path.join(data, "train.jsonl"))]
    assert {("image" in x) for x in lines} == {True, False}
    assert os.path.isfile(os.path.join(data, lines[0].get("image", lines[0].get("video"))))
    # the trained folder loads with the same strict loader as an HF checkpoint
    m = vl.VideoLlava.from_pretrained(out)
    assert m.cfg.vocab_size == len(vl.load_tokenizer(out))
    os.remove(os.path.join(out, "eval.json"))
    vl.main(["--eval", "--out_dir", out, "--data_dir", data])  # in-process from here (a torch import per CLI call)
    assert json.load(open(os.path.join(out, "eval.json")))["test"]["video"]["n"] > 0
    clip = os.path.join(data, "test", "clip_00000.mp4")
    argv = ["--generate", "--out_dir", out, "--video", clip, "--prompt", "Which way does the red circle move?"]
    vl.main(argv)
    tok, streamed = vl.load_tokenizer(out), []  # answers train as " left"; --generate prints "left"
    def answers_left(*a, on_token, **k):  # a model that has learnt: " left", then EOS
        streamed.extend(tok.encode(" left", add_special_tokens=False))
        for t in [*streamed, tok.eos_id]:
            on_token(torch.tensor([t]))
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(vl, "generate", answers_left)
        vl.main(argv)
    assert streamed and capsys.readouterr().out == "left\n"
    # LLaVA stage 1: only the projector moves
    before = load_file(os.path.join(out, "model.safetensors"))
    out2 = str(tmp_path / "out2")
    capsys.readouterr()
    vl.main(["--train", "--preset", "tiny", "--data_dir", data, "--out_dir", out2, "--from_pretrained", out, "--freeze",
             "vision,llm", "--max_steps", "3"])
    assert "frozen" in capsys.readouterr().out
    after = load_file(os.path.join(out2, "model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same != k.startswith("multi_modal_projector."), k


VL_USER_DATA_EXAMPLE = (
    '{"image": "photos/shapes.png", "question": "How many shapes are there?", "answer": "two"}\n'
    '{"video": "clips/ball.mp4", "question": "Which way does the red circle move?", "answer": "left"}\n'
    '{"frames": "frames/", "question": "Which shape appears first?", "answer": "blue square"}\n')


def test_vl_user_data_trains_and_no_user_file_is_overwritten(vl_tiny_run, tmp_path, capsys):
    """The README's three JSON lines (an image, an mp4, a folder of frames) train the tiny preset, in batches of the
    two training questions, not of --batch_size 8 (each twice or more); --data_dir pointed at a folder of the user's
    files is refused and the files are left as they were."""
    src = vl_tiny_run[0].data_dir
    for folder in ("photos", "clips", "frames"):
        (tmp_path / folder).mkdir()
    shutil.copy(os.path.join(src, "train", "img_00000.png"), tmp_path / "photos" / "shapes.png")
    shutil.copy(os.path.join(src, "train", "clip_00000.mp4"), tmp_path / "clips" / "ball.mp4")
    for i in range(4):
        cv2.imwrite(str(tmp_path / "frames" / f"{i:02d}.png"), np.full((40, 56, 3), 60 * i, np.uint8))
    (tmp_path / "mine.jsonl").write_text(VL_USER_DATA_EXAMPLE)
    assert [e["kind"] for e in vl.read_annotations(str(tmp_path / "mine.jsonl"))] == ["image", "video", "video"]
    vl.main(["--train", "--preset", "tiny", "--max_steps", "2", "--data", str(tmp_path / "mine.jsonl"),
             "--out_dir", str(tmp_path / "o")])
    ev = json.load(open(tmp_path / "o" / "eval.json"))
    assert "novel" not in ev and ev["test"]["video"]["n"] == 1  # the frames draw under 0.1: held out; no novel split
    assert "--batch_size 8 x 1 (grad_accum x processes) > 2 training questions: using --batch_size 2" in \
        capsys.readouterr().out and json.load(open(tmp_path / "o" / "config.json"))["train_config"]["batch_size"] == 2
    vl.main(["--eval", "--out_dir", str(tmp_path / "o")])  # --eval finds the same files through the saved config
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "o" not in p.parts}
    with pytest.raises(vl.UserError, match="did not write"):
        vl.main(["--train", "--preset", "tiny", "--data_dir", str(tmp_path), "--out_dir", str(tmp_path / "o2")])
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and "o" not in p.parts} == before
    os.remove(tmp_path / "mine.jsonl")  # its held-out entries are the run's test split: --eval says where else to look
    with pytest.raises(vl.UserError, match=r"mine.jsonl: cannot read this annotation file \(No such file or directory\); "
                                           r"--eval tests on the entries the run held out of --data, or give --test_data FILE$"):
        vl.main(["--eval", "--out_dir", str(tmp_path / "o")])


def test_vl_the_held_out_questions_are_chosen_by_path_and_question(tmp_path):
    """Without --test_data, --data's validation and test entries are those whose path and question draw at most 0.1
    (at least one), so adding or reordering entries or editing answers never moves a trained entry into them."""
    def text(names, answer):
        return "".join(json.dumps({"image": f"{n}.png", "question": "What colour?", "answer": answer}) + "\n"
                       for n in names)

    def split(folder):
        entries = vl.load_entries(vl.Config(**{**vl.PRESETS["tiny"], "data": str(folder / "a.jsonl")}))
        assert entries["val"] == entries["test"]
        return [[os.path.basename(e["path"])[:-4] for e in entries[s]] for s in ("train", "test")]
    _held_out_by_path(tmp_path, "a.jsonl", ".png", text, split)


def test_vl_test_data_stays_out_of_the_token_table_and_validation(vl_tiny_run, tmp_path, capsys):
    """--test_data is the test split and nothing else: the token table is built from --data's text and the validation
    loss from --data's held-out entries (a tenth), so no test question or answer reaches training; --eval of the
    test file does not read --data at all."""
    shutil.copy(os.path.join(vl_tiny_run[0].data_dir, "train", "img_00000.png"), tmp_path / "a.png")
    line = lambda answer, i=0: json.dumps({"image": "a.png", "question": f"What colour are the shapes {i}?",
                                           "answer": answer})
    (tmp_path / "mine.jsonl").write_text("".join(line("red", i) + "\n" for i in range(10)))  # one draws under 0.1
    (tmp_path / "test.jsonl").write_text((line("magenta") + "\n") * 3)
    capsys.readouterr()
    vl.main(["--train", "--preset", "tiny", "--max_steps", "2", "--data", str(tmp_path / "mine.jsonl"),
             "--test_data", str(tmp_path / "test.jsonl"), "--out_dir", str(tmp_path / "o")])
    assert "data: train 9 questions, val 1 questions, test 3 questions" in capsys.readouterr().out
    tok = vl.load_tokenizer(str(tmp_path / "o"))
    assert not set(tok.enc.encode_ordinary(" magenta")) <= set(tok.ids)
    # --eval of the test file does not read the training file, which may have moved (or stayed on another machine)
    os.rename(tmp_path / "mine.jsonl", tmp_path / "moved.jsonl")
    os.remove(tmp_path / "o" / "eval.json")
    vl.main(["--eval", "--out_dir", str(tmp_path / "o"), "--test_data", str(tmp_path / "test.jsonl")])
    ev = json.load(open(tmp_path / "o" / "eval.json"))  # its config: what was scored
    assert ev["test"]["image"]["n"] == 3 and ev["config"]["test_data"] == str(tmp_path / "test.jsonl")
    os.rename(tmp_path / "moved.jsonl", tmp_path / "mine.jsonl")
    # a test question with a word the training text lacks cannot be read: refused, naming its line, before any run
    (tmp_path / "test.jsonl").write_text(line("red") + "\n" + line("red").replace("shapes", "zebras") + "\n")
    with pytest.raises(vl.UserError, match=r"test.jsonl:2: ' ze.*' \(a GPT-2 token: .*model's token table: never"):
        vl.main(["--train", "--preset", "tiny", "--data", str(tmp_path / "mine.jsonl"), "--test_data",
                 str(tmp_path / "test.jsonl"), "--out_dir", str(tmp_path / "o2")])
    assert not (tmp_path / "o2").exists()


@pytest.fixture(scope="module")
def vl_tiny_run(tmp_path_factory):
    """One in-process tiny run (batch 8, 3 steps, float32) that the accumulation and DDP tests compare against; its
    data_dir holds the tiny synthetic world, reused by the resume tests."""
    root = tmp_path_factory.mktemp("vl_tiny")
    cfg = vl.Config(**{**vl.PRESETS["tiny"], "data_dir": str(root / "data"), "out_dir": str(root / "b8"),
                       "max_steps": 3, "eval_interval": 100})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as _vc_one_thread: tiny models, a shared machine
    try:
        vl.train(cfg)
    finally:
        torch.set_num_threads(threads)
    return cfg, load_file(os.path.join(cfg.out_dir, "model.safetensors"))


@_vc_1t
def test_vl_shared_towers(vl_tiny_run):
    """share_towers (the default from scratch): one CLIP tower trained on images and frames. The checkpoint still holds
    both key sets, equal, and loads as two towers; at init the shared patch embedding whitens images and frames
    together."""
    cfg, w = vl_tiny_run
    tower = [k for k in w if k.startswith("image_tower.")]
    assert tower and all(torch.equal(w[k], w["video_tower." + k[len("image_tower."):]]) for k in tower)
    m = vl.VideoLlava.from_pretrained(cfg.out_dir)
    assert m.image_tower is not m.video_tower
    torch.manual_seed(0)
    mcfg = dataclasses.replace(cfg, vocab_size=40, image_token_index=38, video_token_index=39)
    shared = vl.VideoLlava(mcfg)
    shared.video_tower = shared.image_tower  # one tower under two names, as build_model shares it
    assert shared.video_tower is shared.image_tower
    assert sum(p.numel() for p in shared.parameters()) < sum(p.numel() for p in m.parameters())
    imgs, vids = torch.randn(16, 3, 48, 48) * 2, torch.randn(5, cfg.n_frames, 3, 48, 48)  # different statistics
    with torch.no_grad():
        shared.init_from_data(imgs, vids)
        pix = torch.cat([imgs, vids.flatten(0, 1)])
        h = shared.image_tower.vision_model.embeddings.patch_embedding(pix).flatten(2).transpose(1, 2).flatten(0, 1)
        assert torch.allclose(torch.cov(h.double().T), torch.eye(h.shape[1], dtype=torch.float64), atol=1e-3)


def test_vl_inspect_counts_a_shared_tower_once(vl_tiny_run, capsys):
    """A run with one shared tower saves it under both names; --inspect counts its parameters once, and estimates
    memory for the run's frame count (an HF folder's: 8) unless --n_frames is typed."""
    cfg, w = vl_tiny_run
    capsys.readouterr()
    vl.main(["--inspect", cfg.out_dir])
    n = sum(v.numel() for k, v in w.items() if not k.startswith("video_tower."))
    out = capsys.readouterr().out
    assert f"{n / 1e6:.2f}M parameters" in out and "video_tower = image_tower" in out, out
    assert f"one video of {cfg.n_frames} frames" in out and cfg.n_frames != 8
    vl.main(["--inspect", cfg.out_dir, "--n_frames", "2"])
    assert "one video of 2 frames" in capsys.readouterr().out


def test_vl_inspect_refuses_a_damaged_train_config(vl_tiny_run, tmp_path):
    """A run's config.json whose train_config is damaged: --inspect names the file, as --eval does, no traceback."""
    damaged = shutil.copytree(vl_tiny_run[0].out_dir, tmp_path / "damaged")
    meta = json.load(open(damaged / "config.json"))
    for bad in ([1], {**meta["train_config"], "n_frames": "4"}):
        json.dump({**meta, "train_config": bad}, open(damaged / "config.json", "w"))
        with pytest.raises(vl.UserError, match="config.json"):
            vl.main(["--inspect", str(damaged)])


@_vc_1t
def test_vl_two_towers_train_apart_and_resume(vl_tiny_run, tmp_path, capsys):
    """--no-share_towers: two towers, each changed by its own gradients (a shared tower would change both names by
    the same step); --resume keeps two towers and ends bit for bit where the uninterrupted run ends. Resuming with a
    --share_towers / --no-share_towers other than the run's is refused before anything is touched."""
    shared = vl_tiny_run[0]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    common = ["--train", "--preset", "tiny", "--max_steps", "4", "--data_dir", shared.data_dir, "--no-share_towers"]
    vl.main(common + ["--out_dir", full])
    assert "one CLIP tower" not in capsys.readouterr().out
    vl.main(common + ["--out_dir", cut, "--stop_after", "2"])
    mid = load_file(os.path.join(cut, "model.safetensors"))
    with pytest.raises(vl.UserError, match=r"--share_towers True \(checkpoint: False\)"):
        vl.main(["--train", "--resume", "--out_dir", cut, "--share_towers"])
    before = open(os.path.join(shared.out_dir, "model.safetensors"), "rb").read()
    with pytest.raises(vl.UserError, match=r"--share_towers False \(checkpoint: True\)"):
        vl.main(["--train", "--resume", "--out_dir", shared.out_dir, "--no-share_towers"])
    assert open(os.path.join(shared.out_dir, "model.safetensors"), "rb").read() == before
    vl.main(["--train", "--resume", "--out_dir", cut])
    a, b = load_file(os.path.join(full, "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = {k: a[k] - mid[k] for k in a if k.startswith(("image_tower.", "video_tower."))}
    pairs = [(k, "video_tower." + k[len("image_tower."):]) for k in steps if k.startswith("image_tower.")]
    moved = [(i, v) for i, v in pairs if steps[i].abs().max() > 0 and steps[v].abs().max() > 0]
    differ = [i for i, v in moved if not torch.allclose(steps[i], steps[v])]  # shared: none would differ
    assert moved and len(differ) > len(moved) // 2  # (Adam's early steps are about +-lr: a small tensor can tie)
    # --from_pretrained on a shared-tower out_dir: two towers (equal at the start) that train apart, recorded as such,
    # so --resume keeps them; typing --share_towers with it is refused. Trained under --dtype auto.
    ft = str(tmp_path / "ft")
    common = ["--train", "--preset", "tiny", "--max_steps", "2", "--data_dir", shared.data_dir, "--out_dir", ft,
              "--from_pretrained", shared.out_dir]
    with pytest.raises(vl.UserError, match="--share_towers is for training from scratch"):
        vl.main(common + ["--share_towers"])
    capsys.readouterr()
    vl.main(common + ["--dtype", "auto"])
    out = capsys.readouterr().out
    assert "two CLIP towers are kept" in out and f"autocast {vl.autocast_dtype('auto', 'cpu')}" in out
    assert json.load(open(os.path.join(ft, "config.json")))["train_config"]["share_towers"] is False
    w = load_file(os.path.join(ft, "model.safetensors"))
    assert not all(torch.equal(w[i], w[v]) for i, v in pairs)
    with pytest.raises(vl.UserError, match=r"--share_towers True \(checkpoint: False\)"):
        vl.main(["--train", "--resume", "--out_dir", ft, "--share_towers"])


@_vc_1t
def test_vl_tied_head(vl_tiny_run, tmp_path):
    """tie_word_embeddings: one matrix for the embedding and the head from construction; the checkpoint leaves
    lm_head out (as an HF one does), loads tied, and --resume continues with the same parameters."""
    out = str(tmp_path / "tied")
    vl.main(["--train", "--preset", "tiny", "--max_steps", "3", "--data_dir", vl_tiny_run[0].data_dir, "--out_dir",
             out, "--tie_word_embeddings", "--stop_after", "2"])
    assert "language_model.lm_head.weight" not in load_file(os.path.join(out, "model.safetensors"))
    vl.main(["--train", "--resume", "--out_dir", out])
    m = vl.VideoLlava.from_pretrained(out)
    assert m.language_model.lm_head.weight is m.language_model.model.embed_tokens.weight
    # a file that also holds a head of its own: that head is used, untied, as transformers loads it (one equal to
    # the embedding gives the same logits either way)
    extra = str(tmp_path / "extra")
    shutil.copytree(out, extra)
    w = load_file(os.path.join(extra, "model.safetensors"))
    ids, emb = torch.tensor([[1, 2, 3]]), w["language_model.model.embed_tokens.weight"]
    for head, same in ((emb.clone(), True), (torch.randn_like(emb), False)):
        save_file({**w, "language_model.lm_head.weight": head}, os.path.join(extra, "model.safetensors"))
        m2 = vl.VideoLlava.from_pretrained(extra)
        assert torch.equal(m2.language_model.lm_head.weight, head) and not m2.cfg.tie_word_embeddings
        assert torch.equal(m2(ids)[0], m(ids)[0]) == same


@_vc_1t
def test_vl_grad_accumulation_equals_big_batch(vl_tiny_run, tmp_path):
    """batch 4 x grad_accum 2 = batch 8 (the loss is a mean over the global batch's answer tokens, whose rows split
    unevenly between micro-batches): the same weights after 3 steps, up to float noise."""
    cfg, big = vl_tiny_run
    vl.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "acc"), batch_size=4, grad_accum=2))
    acc = load_file(str(tmp_path / "acc" / "model.safetensors"))
    assert acc.keys() == big.keys()
    for k in big:
        torch.testing.assert_close(acc[k], big[k], atol=1e-5, rtol=1e-4, msg=k)


@_vc_1t
def test_vl_train_clips_the_gradient(vl_tiny_run, tmp_path, monkeypatch):
    """AdamW steps with gradients of global norm --grad_clip when they are longer (1e-3: far below the tiny run's), and
    at the learning rate of the step it takes: step 0 of a 2-step warmup at half the peak --lr."""
    cfg, _ = vl_tiny_run
    norms, lrs, make = [], [], vl.make_optimizer

    def spy(params, cfg, device):  # the real optimizer, which notes the gradients' norm and its lr before each step
        opt, scaler = make(params, cfg, device)
        opt.register_step_pre_hook(lambda o, args, kwargs: norms.append(torch.stack(
            [p.grad.norm() for g in o.param_groups for p in g["params"] if p.grad is not None]).norm().item()))
        opt.register_step_pre_hook(lambda o, args, kwargs: lrs.append({g["lr"] for g in o.param_groups}))
        return opt, scaler
    monkeypatch.setattr(vl, "make_optimizer", spy)
    assert cfg.warmup == 2
    vl.train(dataclasses.replace(cfg, out_dir=str(tmp_path / "clip"), grad_clip=1e-3, max_steps=2, stop_after=1))
    assert norms == pytest.approx([1e-3], rel=1e-3) and lrs == [{cfg.lr / 2}]


@_vc_1t
def test_vl_exact_resume(vl_tiny_run, tmp_path, capsys, monkeypatch):
    """--stop_after 3, then --resume (config, token table, optimizer, step and RNG from out_dir) ends bit for bit
    where an uninterrupted 6-step run ends."""
    data = vl_tiny_run[0].data_dir
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    common = ["--train", "--preset", "tiny", "--max_steps", "6", "--data_dir", data]
    vl.main(common + ["--out_dir", full])
    vl.main(common + ["--out_dir", cut, "--stop_after", "3"])
    assert torch.load(os.path.join(cut, "train_state.pt"), weights_only=True)["step"] == 3
    assert not os.path.exists(os.path.join(cut, "eval.json"))  # interrupted: no final evaluation yet
    capsys.readouterr()
    moved = str(tmp_path / "out" / "video_llava")  # a run moved to the default --out_dir resumes and evaluates there
    os.renames(cut, moved)
    monkeypatch.chdir(tmp_path)
    vl.main(["--train", "--resume"])  # everything else comes from out/video_llava/config.json
    out = capsys.readouterr().out
    assert "resumed from step 3" in out and "step 4/6" in out and "step 2/6" not in out
    vl.main(["--eval"])
    assert not os.path.exists(cut)  # nothing written where the run used to be
    cut = moved
    a, b = load_file(os.path.join(full, "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = json.load(open(os.path.join(full, "config.json"))), json.load(open(os.path.join(cut, "config.json")))
    assert ca["gpt2_table"] == cb["gpt2_table"] and cb["train_config"]["stop_after"] == 0
    assert os.path.isfile(os.path.join(cut, "eval.json"))



def test_vl_a_save_writes_whole_files_and_drops_the_old_score(vl_tiny_run, tmp_path, monkeypatch):
    """Into a finished run: --resume with another --seed (another data order) is refused; a save that dies while
    writing the weights leaves the old file whole (a temporary file, then a rename); a save that completes removes
    eval.json, which scored the old weights (and train_state.pt, as no optimizer is given here), and an HF tokenizer,
    which a GPT-2 table replaces."""
    out = tmp_path / "run"
    shutil.copytree(vl_tiny_run[0].out_dir, out)
    assert (out / "eval.json").is_file() and (out / "train_state.pt").is_file()
    by_q = json.load(open(out / "eval.json"))["test"]["image"]["by_question"]  # a question's first four words
    assert set(by_q) == {"What colour are the", "What shape are they?", "How many shapes are"}
    with pytest.raises(vl.UserError, match="no resuming with another .*--seed"):
        vl.main(["--train", "--resume", "--out_dir", str(out), "--seed", str(vl_tiny_run[0].seed + 1)])
    cfg, model, tok = vl.saved_config(str(out), {}, False), vl.load_pretrained(str(out)), vl.load_tokenizer(str(out))
    before = (out / "model.safetensors").read_bytes()
    save_file_dies_halfway(vl, monkeypatch)
    with pytest.raises(OSError):
        vl.save_checkpoint(model, cfg, tok)
    assert (out / "model.safetensors").read_bytes() == before
    monkeypatch.undo()
    (out / "tokenizer.json").write_text("{}")  # left by a fine-tuned run that was in this folder before
    vl.save_checkpoint(model, cfg, tok)
    assert not any((out / n).exists() for n in ("eval.json", "train_state.pt", "tokenizer.json"))


def test_vl_generate_reads_the_frames_the_run_trained_on(vl_tiny_run, monkeypatch, capsys):
    """--generate with a run of this script samples the run's --n_frames of a video (4 here), not the 8 that the
    released checkpoints were trained on."""
    cfg = vl_tiny_run[0]
    clip = next(e for e in vl.read_annotations(os.path.join(cfg.data_dir, "val.jsonl")) if e["kind"] == "video")
    got, load = [], vl.load_video
    monkeypatch.setattr(vl, "load_video", lambda path, n, size: got.append(n) or load(path, n, size))
    vl.main(["--generate", "--out_dir", cfg.out_dir, "--video", clip["path"], "--prompt", clip["question"]])
    assert got == [cfg.n_frames] == [4]


def test_vl_finetune_reads_the_frames_the_checkpoint_was_trained_on(vl_ckpt, vl_tiny_run, tmp_path, monkeypatch):
    """--train --from_pretrained samples a video's frames as --generate does: a typed --n_frames, else the
    checkpoint's (an HF folder: the 8 the released checkpoints were trained on; a run of this script: its own), not
    the from-scratch default 4 that the model never saw."""
    run = str(tmp_path / "run")  # the tiny run, as if it had trained on 6 frames
    shutil.copytree(vl_tiny_run[0].out_dir, run)
    meta = json.load(open(os.path.join(run, "config.json")))
    meta["train_config"]["n_frames"] = 6
    json.dump(meta, open(os.path.join(run, "config.json"), "w"))
    got = []  # the n_frames each fine-tune would train with (and print, and save for --resume)
    monkeypatch.setattr(vl, "train", lambda cfg, resume: got.append(cfg.n_frames))
    hf = vl_ckpt[1]["t5save"]
    for src, typed in ((hf, []), (hf, ["--n_frames", "5"]), (run, [])):
        vl.main(["--train", "--from_pretrained", src, "--freeze", "vision,llm", "--out_dir", str(tmp_path / "o"),
                 *typed])
    assert got == [8, 5, 6]

def test_vl_save_cut_off_before_train_state_refuses_resume(vl_tiny_run, tmp_path, monkeypatch, capsys):
    """A save stopped after the new weights but before the new train_state.pt: --resume refuses (the older state would
    go on from its step with the newer weights), in one line that says how to go on. The flags both messages print
    paste into a shell as they are: a folder with a space in its name comes quoted."""
    cut, data = str(tmp_path / "my run"), vl_tiny_run[0].data_dir
    vl.main(["--train", "--preset", "tiny", "--max_steps", "6", "--data_dir", data, "--out_dir", cut,
             "--stop_after", "2"])
    assert shlex.split(capsys.readouterr().out.split("go on with ")[-1]) == ["--train", "--resume", "--out_dir", cut]
    resume_with_a_save_cut_off(vl.main, monkeypatch, cut)
    with pytest.raises(vl.UserError, match="no train_state.pt, so there is no optimizer state to resume from") as e:
        vl.main(["--train", "--resume", "--out_dir", cut])
    hint = shlex.split(str(e.value).split("(or fine-tune it: ")[-1].rstrip(")"))
    assert hint == ["--from_pretrained", cut, "--out_dir", "NEW"]
    new = str(tmp_path / "new")  # the way it names works: fine-tuning the saved weights into another folder
    vl.main(["--train", "--preset", "tiny", "--max_steps", "2", "--data_dir", data, *hint[:-1], new])
    assert os.path.isfile(os.path.join(new, "eval.json"))


def test_vl_ddp_two_processes_gloo(vl_tiny_run, tmp_path):
    """torchrun, 2 gloo processes of batch 4: finishes, rank 0 alone prints and writes eval.json, and the weights are
    those of one process with batch 8 (each rank computed a distinct half of every global batch)."""
    cfg, single = vl_tiny_run
    out = tmp_path / "ddp"
    proc = run_torchrun("video_llava.py", "--train", "--preset", "tiny", "--batch_size", "4", "--max_steps", "3",
                        "--eval_interval", "100", "--device", "cpu", "--data_dir", cfg.data_dir, "--out_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("step 3/3") == 1 and proc.stdout.count("config:") == 1  # rank 0 alone prints
    assert json.load(open(out / "eval.json"))["test"]["video"]["n"] > 0
    ddp = load_file(str(out / "model.safetensors"))  # the unwrapped module's keys (no `module.` prefix)
    assert ddp.keys() == single.keys()
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], atol=1e-5, rtol=1e-4, msg=k)
    with pytest.raises(vl.UserError, match=r"trained at global batch 8 \(batch_size\*grad_accum\*processes\), not 4"):
        vl.main(["--train", "--resume", "--out_dir", str(out), "--max_steps", "4"])  # one process: half the batch
    ts = torch.load(out / "train_state.pt", weights_only=True)
    del ts["batch"]  # a train_state.pt from before the global batch was saved: resumed as it is
    torch.save(ts, out / "train_state.pt")
    vl.main(["--train", "--resume", "--out_dir", str(out), "--max_steps", "4"])
    assert json.load(open(out / "config.json"))["train_config"]["max_steps"] == 4


def test_vl_resume_refuses_foreign_folders(vl_tiny_run, tmp_path):
    """--resume needs an out_dir this script's --train wrote, with train_state.pt: else one line, exit status 2."""
    other = tmp_path / "other"
    os.makedirs(other)
    json.dump({"script": "vit_caption", "train_config": {}}, open(other / "config.json", "w"))
    assert_user_error(run_script("video_llava.py", "--train", "--resume", "--out_dir", other),
                      str(other), "not written by video_llava.py --train", "vit_caption")
    # the other cases in-process (each CLI call costs a torch import)
    os.makedirs(tmp_path / "empty")
    with pytest.raises(vl.UserError, match="nothing to resume"):
        vl.main(["--train", "--resume", "--out_dir", str(tmp_path / "empty")])
    hf = tmp_path / "hf"
    os.makedirs(hf)
    json.dump({"model_type": "video_llava"}, open(hf / "config.json", "w"))  # an HF folder: no run to continue
    for mode in (["--train", "--resume"], ["--eval"]):
        with pytest.raises(vl.UserError, match=r"not written by video_llava.py --train \(its config.json has model_type "
                           r"'video_llava': an HF folder\); .*; give it as --from_pretrained$"):
            vl.main([*mode, "--out_dir", str(hf)])
    json.dump({"model_type": "video_llava", "script": "video_llava"}, open(hf / "config.json", "w"))  # no settings
    with pytest.raises(vl.UserError, match=r"has no train_config\); --resume and --eval need"):
        vl.main(["--generate", "--out_dir", str(hf), "--prompt", "Hi"])
    done = tmp_path / "no_state"
    shutil.copytree(vl_tiny_run[0].out_dir, done)
    os.remove(done / "train_state.pt")
    with pytest.raises(vl.UserError, match="no train_state.pt"):
        vl.main(["--train", "--resume", "--out_dir", str(done)])
    # a run's folder whose config.json is gone or damaged is named as such, not as another model's
    no_config = tmp_path / "no_config"
    shutil.copytree(vl_tiny_run[0].out_dir, no_config)
    os.remove(no_config / "config.json")
    with pytest.raises(vl.UserError, match=r"nothing to resume or evaluate \(no readable config.json\)"):
        vl.main(["--train", "--resume", "--out_dir", str(no_config)])
    open(no_config / "config.json", "w").write("{not json")
    with pytest.raises(vl.UserError, match=r"no readable config.json"):
        vl.main(["--eval", "--out_dir", str(no_config)])
    with pytest.raises(vl.UserError, match="another architecture"):
        vl.main(["--train", "--resume", "--out_dir", vl_tiny_run[0].out_dir, "--hidden_size", "64"])
    # what trains is part of what AdamW's saved state fits: another --freeze or --from_pretrained is refused too
    for flags in (["--freeze", "vision"], ["--from_pretrained", str(done)]):
        with pytest.raises(vl.UserError, match=f"trained part or world: {flags[0]}"):
            vl.main(["--train", "--resume", "--out_dir", vl_tiny_run[0].out_dir, *flags])
    with pytest.raises(vl.UserError, match="with --train"):
        vl.main(["--eval", "--resume", "--out_dir", vl_tiny_run[0].out_dir])


def test_vl_resume_with_nothing_left_to_train_is_refused(vl_tiny_run, tmp_path):
    """--resume of a run already at --max_steps (3 here), or past a lower one, would train nothing, and with a
    --stop_after at or below the saved step would train one step past it and stop again: refused in one line naming
    the saved step and the fixes, before any data is built; nothing in the folder changes."""
    run, world = tmp_path / "run", tmp_path / "world"
    shutil.copytree(vl_tiny_run[0].out_dir, run)
    before = {f.name: f.read_bytes() for f in run.iterdir()}
    for flags in ([], ["--max_steps", "2"]):
        with pytest.raises(vl.UserError, match="trained to step 3 already; give --max_steps above it, or --eval"):
            vl.main(["--train", "--resume", "--out_dir", str(run), "--data_dir", str(world), *flags])
    for stop in ("3", "2"):  # as if the run had been cut at step 3 of 6: the same command again, with --resume
        with pytest.raises(vl.UserError, match=re.escape(f"{run}: trained to step 3 already; give --stop_after above "
                                                         "it, or drop it")):
            vl.main(["--train", "--resume", "--out_dir", str(run), "--data_dir", str(world), "--max_steps", "6",
                     "--stop_after", stop])
    assert {f.name: f.read_bytes() for f in run.iterdir()} == before and not world.exists()  # nor a world built

def test_vl_unknown_words_and_cut_off_media(vl_tiny_run, tmp_path, capsys):
    """A word the trained model's token table lacks (encode would drop it): refused in --generate's prompt and in the
    training text of --resume. A JPEG cut short and an MJPG .avi cut in half (both decode part of themselves without
    an error) are refused."""
    out = tmp_path / "run"
    shutil.copytree(vl_tiny_run[0].out_dir, out)
    png = os.path.join(vl_tiny_run[0].data_dir, "train", "img_00000.png")
    with pytest.raises(vl.UserError, match=r"^--prompt: ' x.*' \(a GPT-2 token: .*\) in 'USER: <image>\\nWhat colour are the xylophones\? "
                                           r"ASSISTANT:' is not in the model's token table") as e:  # the newline shown as \n
        vl.main(["--generate", "--out_dir", str(out), "--image", png, "--prompt", "What colour are the xylophones?"])
    assert "\n" not in str(e.value)  # one line on stderr
    with pytest.raises(vl.UserError, match="^--prompt: ' What' .* is not in the model's token table: never trained on"):
        vl.main(["--generate", "--out_dir", str(out), "--prompt", "What colour are the shapes?"])  # no image: " What"
    for prompt in ("", "   "):  # none, or a blank one
        with pytest.raises(vl.UserError, match="--generate needs --prompt TEXT"):
            vl.main(["--generate", "--out_dir", str(out), "--image", png, "--prompt", prompt])
    with pytest.raises(vl.UserError, match="--video, --image and --prompt are for --generate"):  # not ignored
        vl.main(["--eval", "--out_dir", str(out), "--image", png])
    for mode in (["--eval"], ["--train", "--resume"], ["--generate", "--prompt", "What colour?"]):  # not ignored
        with pytest.raises(vl.UserError, match="--preset tiny: --resume, --eval, --generate and --inspect take"):
            vl.main(mode + ["--out_dir", str(out), "--preset", "tiny"])
    with pytest.raises(vl.UserError, match="--preset tiny: --resume, --eval, --generate and --inspect take"):
        vl.main(["--inspect", str(out), "--preset", "tiny"])
    for name in "abc":  # three images: c.png's entry is held out for validation, a.png's and b.png's train
        cv2.imwrite(str(tmp_path / f"{name}.png"), np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "q.jsonl").write_text("".join(f'{{"image": "{name}.png", "question": "What colour is the xylophone?", '
                                              f'"answer": "red"}}\n' for name in "abc"))
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    with pytest.raises(vl.UserError, match=r"q.jsonl:1: ' is' .* is not in the model's token table"):
        vl.main(["--train", "--resume", "--out_dir", str(out), "--data", str(tmp_path / "q.jsonl"), "--max_steps", "6"])
    with pytest.raises(vl.UserError, match="q.jsonl:1: .* not in the model's token table"):  # fine-tuning on new words
        vl.main(["--train", "--from_pretrained", str(out), "--data", str(tmp_path / "q.jsonl"), "--out_dir",
                 str(tmp_path / "ft")])
    known = '{"image": "a.png", "question": "What colour are the shapes?", "answer": "red"}\n'
    cv2.imwrite(str(tmp_path / "z.png"), np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "v.jsonl").write_text('{"image": "z.png", "question": "What colour is the xylophone?", "answer": "red"}'
                                      "\n" + known * 3)  # the z.png line draws lowest: it is the validation entry
    v_cfg = vl.Config(**{**vl.PRESETS["tiny"], "data": str(tmp_path / "v.jsonl")})
    assert [e["question"] for e in vl.load_entries(v_cfg)["val"]] == ["What colour is the xylophone?"]
    with pytest.raises(vl.UserError, match="v.jsonl:1: .*xylophone.* token table"):  # a held-out question is checked too
        vl.main(["--train", "--from_pretrained", str(out), "--data", str(tmp_path / "v.jsonl"), "--out_dir",
                 str(tmp_path / "ft")])
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before and not (tmp_path / "ft").exists()
    cv2.imwrite(str(tmp_path / "a.jpg"), np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    whole = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(whole[:len(whole) * 6 // 10])
    with pytest.raises(vl.UserError, match="this image is cut off"):
        vl.load_image(str(tmp_path / "a.jpg"), 16)
    check_cut_off_video(vl, tmp_path)


def test_vl_out_dir_flags_test_data_and_shards(vl_tiny_run, vl_ckpt, tmp_path, capsys):
    """--train never writes into a folder of the user's or over a file; counts, rates and the device are checked
    before any work; --test_data alone replaces the world's test split, and one file may be an image entry and a
    video entry; --eval keeps the run's train_seconds; a shard index that names the wrong file is one line."""
    cfg = vl_tiny_run[0]
    mine, afile = tmp_path / "mine", tmp_path / "afile"
    mine.mkdir()
    (mine / "config.json").write_text('{"my": 1}')
    afile.write_text("x")
    before = {p.name: p.read_bytes() for p in mine.iterdir()}

    def refused(match, *argv):
        with pytest.raises(vl.UserError, match=match):
            vl.main(["--train", "--preset", "tiny", "--data_dir", cfg.data_dir, "--out_dir", str(tmp_path / "o"), *argv])

    refused("a folder that is not a run of this script", "--out_dir", str(mine))
    refused("a file", "--out_dir", str(afile))
    cut = tmp_path / "cut"  # all a first save killed mid-write leaves: the run may start again there
    cut.mkdir()
    (cut / "model.safetensors.tmp").write_bytes(b"half")
    vl.check_folder(str(cut), "--out_dir", "config.json", lambda m: m.get("script") == vl.SCRIPT, "")
    (cut / "notes.txt").write_text("mine")  # anything more is the user's: refused, as before
    with pytest.raises(vl.UserError, match="--out_dir"):
        vl.check_folder(str(cut), "--out_dir", "config.json", lambda m: m.get("script") == vl.SCRIPT, "")
    refused("a file", "--data_dir", str(afile))
    for flag, value in (("--max_steps", "0"), ("--eval_interval", "0"), ("--lr", "-1"), ("--lr", "nan"),
                        ("--grad_clip", "-1"), ("--weight_decay", "-5"), ("--rope_theta", "0"), ("--rms_norm_eps", "-1"),
                        ("--v_layer_norm_eps", "nan")):  # the last three trained to a NaN loss blamed on --lr
        refused(flag, flag, value)
    if not torch.cuda.is_available():
        refused("--device cuda", "--device", "cuda")
    assert {p.name: p.read_bytes() for p in mine.iterdir()} == before and afile.read_text() == "x"
    assert not (tmp_path / "o").exists()
    run, png = tmp_path / "run", os.path.join(cfg.data_dir, "test", "img_00000.png")
    shutil.copytree(cfg.out_dir, run)
    seconds = json.load(open(run / "eval.json"))["train_seconds"]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({kind: png, "question": "What shape are they?",
                                                          "answer": "circle"}) + "\n" for kind in ("image", "video")))
    vl.main(["--eval", "--out_dir", str(run), "--test_data", str(tmp_path / "t.jsonl")])
    ev = json.load(open(run / "eval.json"))
    assert ev["test"]["image"]["n"] == ev["test"]["video"]["n"] == 1 and ev["train_seconds"] == seconds is not None
    capsys.readouterr()
    vl.main(["--eval", "--out_dir", str(run), "--test_data", str(tmp_path / "t.jsonl"), "--max_new_tokens", "9",
             "--batch_size", "1"])  # how many rows at once: a machine's choice, as --device
    assert '"max_new_tokens": 9' in capsys.readouterr().out  # --eval may give answers more room, and does
    (tmp_path / "x.jsonl").write_text(json.dumps({"image": png, "question": "What is the xylophone?", "answer": "red"}))
    with pytest.raises(vl.UserError, match="x.jsonl:1: ' is' .* is not in the model's token table"):
        vl.main(["--eval", "--out_dir", str(run), "--test_data", str(tmp_path / "x.jsonl")])
    for flags in (["--hidden_size", "64"], ["--n_frames", "8"], ["--lr", "0.5"]):  # these it would not use: refused
        with pytest.raises(vl.UserError, match=f"--eval runs the trained settings; drop {flags[0]} {flags[1]}"):
            vl.main(["--eval", "--out_dir", str(run), *flags])
    shutil.copy(png, tmp_path / "p.png")  # relative paths: the held-out draws do not depend on the fixture's folder
    for answer, match in (("  ", "more than spaces and dots"), (".", "more than spaces and dots"),
                          ("\t", "more than spaces"), ("\u00a0. \n", "more than spaces"),  # a spreadsheet's
                          ("a b c d e f", "the answer takes 7 tokens .EOS included., more than --max_new_tokens 6")):
        (tmp_path / "a.jsonl").write_text("".join(json.dumps({"image": "p.png", "question": q, "answer": answer})
                                                  + "\n" for q in ("What?", "Which?")))  # one trains, one is held out
        with pytest.raises(vl.UserError, match=match):  # an empty answer scored as right; one cut by generation
            vl.main(["--train", "--preset", "tiny", "--data", str(tmp_path / "a.jsonl"), "--test_data",
                     str(tmp_path / "t.jsonl"), "--out_dir", str(tmp_path / "o2")])
    with pytest.raises(vl.UserError, match=r"mine: cannot read this annotation file \(Is a directory\)$"):
        vl.main(["--train", "--preset", "tiny", "--data", str(mine), "--out_dir", str(tmp_path / "o2")])  # a folder
    ck = tmp_path / "sh"
    shutil.copytree(vl_ckpt[1]["hub_sharded"], ck)
    index = json.load(open(ck / "model.safetensors.index.json"))
    key, shard = next(iter(index["weight_map"].items()))
    index["weight_map"][key] = next(f for f in sorted(set(index["weight_map"].values())) if f != shard)
    json.dump(index, open(ck / "model.safetensors.index.json", "w"))
    with pytest.raises(vl.UserError, match="does not hold it"):
        vl.load_pretrained(str(ck))


def test_vl_bad_inputs(vl_ckpt, tmp_path, monkeypatch):
    """Each bad input is a UserError naming it, checked in-process through main() (a torch import per CLI call is
    costly); one of them through the command line as well: exit status 2, one line."""
    dirs = vl_ckpt[1]
    hub = dirs["hub"]

    def gen(*argv, match):
        with pytest.raises(vl.UserError, match=match):
            vl.main(["--generate", "--dtype", "float32", *argv])

    os.makedirs(tmp_path / "empty")
    gen("--from_pretrained", str(tmp_path / "empty"), "--prompt", "hi", match="no config.json")
    os.makedirs(tmp_path / "noweights")
    json.dump(json.load(open(os.path.join(hub, "config.json"))), open(tmp_path / "noweights" / "config.json", "w"))
    gen("--from_pretrained", str(tmp_path / "noweights"), "--prompt", "hi", match="no model.safetensors")
    os.makedirs(tmp_path / "qwen")
    json.dump({"model_type": "qwen3"}, open(tmp_path / "qwen" / "config.json", "w"))
    gen("--from_pretrained", str(tmp_path / "qwen"), "--prompt", "hi", match="'qwen3'.*another architecture")
    img = str(tmp_path / "x.png")
    cv2.imwrite(img, np.zeros((30, 30, 3), np.uint8))
    for flag in ("--out_dir", "--data_dir"):  # a folder under a file: refused before any world or step
        with pytest.raises(vl.UserError, match=f"{flag} .*x.png/run: cannot create or write into this folder"):
            vl.main(["--train", "--preset", "tiny", "--data_dir", str(tmp_path / "w"), "--out_dir",
                     str(tmp_path / "o"), flag, img + "/run"])
    assert not os.path.exists(tmp_path / "w" / "train.jsonl")
    with pytest.raises(vl.UserError, match="nope.mp4"):
        vl.load_video(str(tmp_path / "nope.mp4"), 8, 28)
    open(tmp_path / "corrupt.mp4", "wb").write(b"not a video at all" * 10)
    with pytest.raises(vl.UserError, match="corrupt.mp4"):
        vl.load_video(str(tmp_path / "corrupt.mp4"), 8, 28)
    w = cv2.VideoWriter(str(tmp_path / "zero.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 8, (32, 32))
    w.release()
    with pytest.raises(vl.UserError, match="zero.mp4"):
        vl.load_video(str(tmp_path / "zero.mp4"), 8, 28)
    model = vl.VideoLlava.from_pretrained(dirs["t5save"])
    with pytest.raises(vl.UserError, match="context .*--n_frames"):  # > 256 positions of the tiny config
        vl.generate(model, torch.ones(1, 250, dtype=torch.long), max_new_tokens=10)
    model(torch.ones(1, 256, dtype=torch.long))  # the whole context fits; one token more has no RoPE position
    with pytest.raises(vl.UserError, match=r"^257 tokens .* exceed the context \(256\)"):
        model(torch.ones(1, 257, dtype=torch.long))
    with pytest.raises(vl.UserError, match="eyes"):
        vl.apply_freeze(model, "eyes")
    vl.apply_freeze(model, "vision, llm")  # spaces after the comma are fine
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("multi_modal_projector"))
    with pytest.raises(SystemExit) as e:  # argparse's own one-line refusal (choices), exit status 2
        vl.main(["--train", "--preset", "huge"])
    assert e.value.code == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "question": "q", "answer": "a"}\n{"video": "v.mp4"}\n')
    with pytest.raises(vl.UserError, match="bad.jsonl:2"):
        vl.read_annotations(str(bad))
    # a Windows path: one backslash is no JSON escape (the reason is named), two name a file that is not here
    for text, why in ((r'{"video": "clips\cat.mp4"}', r"bad.jsonl:1: not valid JSON (Invalid \escape, column 17)"),
                      (r'{"video": "clips\\cat.mp4", "question": "q", "answer": "a"}',
                       rf"bad.jsonl:1: video not found: {tmp_path}/clips\cat.mp4 (use / in paths)")):
        bad.write_text(text + "\n")
        with pytest.raises(vl.UserError, match=re.escape(why)):
            vl.read_annotations(str(bad))
    # a float TIFF OpenCV reads only unchanged (through the command line too, as a user meets it), and a device name
    # PyTorch does not know: one line each
    tiff, t5 = str(tmp_path / "float.tiff"), dirs["t5save"]
    cv2.imwrite(tiff, np.zeros((8, 8, 3), np.float32))
    gen("--from_pretrained", t5, "--image", tiff, "--prompt", "hi", match="float.tiff: cannot read")
    monkeypatch.delenv("OPENCV_LOG_LEVEL", raising=False)  # a sibling script sets it when the tests import it
    proc = run_script("video_llava.py", "--generate", "--from_pretrained", t5, "--image", tiff, "--prompt", "hi")
    assert_user_error(proc, "float.tiff")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # OpenCV's own warning is not printed
    gen("--from_pretrained", t5, "--prompt", "hi", "--device", "gpu", match="--device gpu: not a device")


@_vc_1t
def test_vl_user_data_relative_paths_and_overlong_entries(tmp_path, monkeypatch):
    """--data and --test_data given relative are saved absolute, so --eval runs from any working folder; an entry
    longer than the context is refused before training."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    cv2.imwrite(str(tmp_path / "a" / "x.png"), _vl_textured(40, 60, 0))
    line = '{"image": "x.png", "question": "%s", "answer": "red"}\n'
    (tmp_path / "a" / "qa.jsonl").write_text(line % "What colour?" + line % "Which colour?")
    monkeypatch.chdir(tmp_path / "a")
    tiny = ["--train", "--preset", "tiny", "--max_steps", "2"]
    vl.main(tiny + ["--data", "qa.jsonl", "--test_data", "qa.jsonl", "--out_dir", "out"])
    monkeypatch.chdir(tmp_path / "b")
    vl.main(["--eval", "--out_dir", str(tmp_path / "a" / "out")])
    assert os.listdir(tmp_path / "b") == []
    # an entry longer than the context is refused before training, naming its line; nothing is written
    (tmp_path / "a" / "long.jsonl").write_text(line % "What colour?" + line % ("why " * 600))
    monkeypatch.chdir(tmp_path / "a")
    with pytest.raises(vl.UserError, match=r"long.jsonl:2: .* more than the context \(512\); shorten it$"):
        vl.main(tiny + ["--data", "long.jsonl", "--out_dir", "long"])  # an image's question: only shortening helps
    assert not os.path.exists("long")
    # a test answer longer than --max_new_tokens can never be generated (it was scored a miss without a word): refused;
    # a --max_new_tokens long enough for it but past the context is refused too
    (tmp_path / "a" / "long_answer.jsonl").write_text(line.replace('"red"', '"%s"') % ("What colour?", "red " * 600))
    cfg, tok, entries = vl.Config(**vl.PRESETS["tiny"]), vl.load_tokenizer("out"), vl.read_annotations("long_answer.jsonl")
    with pytest.raises(vl.UserError, match="long_answer.jsonl:1: the answer takes 602 tokens"):
        vl.Examples(entries, cfg, tok, answered=False)
    with pytest.raises(vl.UserError, match="long_answer.jsonl:1: .* --max_new_tokens take .* or lower --max_new_tok"):
        vl.Examples(entries, dataclasses.replace(cfg, max_new_tokens=600), tok, answered=False)
    # a listed file that exists but does not decode is named with the line that lists it (the first, if several do)
    (tmp_path / "a" / "bad.mp4").write_bytes(bytes(64))
    video = line.replace("image", "video").replace("x.png", "bad.mp4") % "What colour?"
    (tmp_path / "a" / "bad.jsonl").write_text(line % "What colour?" + video * 2)
    with pytest.raises(vl.UserError, match=r"bad.jsonl:2: .*bad.mp4: OpenCV decodes no frame of this video"):
        vl.Examples(vl.read_annotations("bad.jsonl"), cfg, tok, answered=False)


def test_vl_flags_a_mode_ignores_and_a_partial_vision_config(tmp_path):
    """--train/--eval decode greedily and --bench builds fixed CPU models: sampling flags there, or sizes and devices on
    --bench, were accepted and ignored. A vision_config without a key takes CLIPVisionConfig's default, as in
    transformers (Video-LLaVA's 1024-wide tower is the default only when vision_config is absent)."""
    for argv, needle in ((["--train", "--temperature", "0.5"], "--temperature: not read by --train"),
                         (["--eval", "--top_p", "0.5", "--temperature", "1"], "not read by --eval"),
                         (["--bench", "--device", "cpu", "--hidden_size", "8"], "--hidden_size, --device: not read by "
                          "--bench")):
        with pytest.raises(vl.UserError, match=needle):
            vl.parse_args(argv)
    vl.parse_args(["--bench", "--max_new_tokens", "8"])
    from transformers import VideoLlavaConfig
    for vision in ({"model_type": "clip_vision_model"}, {}, None, "absent"):  # {}: CLIP's sizes; null, absent: 7B's
        hf = {"model_type": "video_llava", "text_config": {"model_type": "llama"}, **({"vision_config": vision} if
              vision != "absent" else {})}
        ref, ours = VideoLlavaConfig(**hf).vision_config, vl.config_from_hf(hf, "x")
        assert (ours["v_hidden_size"], ours["v_num_hidden_layers"], ours["patch_size"], ours["v_intermediate_size"]) \
            == (ref.hidden_size, ref.num_hidden_layers, ref.patch_size, ref.intermediate_size)


def test_vl_a_checkpoints_own_size_typed_is_not_checked_against_the_preset(vl_ckpt, tmp_path):
    """With --from_pretrained the checkpoint's sizes run: a typed size equal to its own was checked against the
    preset's defaults and refused (--image_size 28 'must be a multiple of --patch_size 12'; the checkpoint's is 14)."""
    (tmp_path / "d.jsonl").write_text('{"image": "a.png", "question": "q?", "answer": "a"}\n')
    for mode in (["--train", "--data"], ["--eval", "--test_data"]):
        vl.parse_args([*mode, str(tmp_path / "d.jsonl"), "--from_pretrained", vl_ckpt[1]["hub"], "--image_size", "28",
                       "--out_dir", str(tmp_path / mode[0][2:])])
    with pytest.raises(vl.UserError, match="--image_size 28 must be a multiple of --patch_size 12"):
        vl.parse_args(["--train", "--image_size", "28", "--out_dir", str(tmp_path / "new")])  # from scratch: refused


def test_vl_user_mistakes_are_one_line(vl_ckpt, vl_tiny_run, tmp_path, monkeypatch):
    """Flags that cannot build a model, annotation files the loader cannot use, a truncated train_state.pt, and
    training into the checkpoint folder itself: each a UserError naming it, before anything is written."""
    def refused(match, *argv):
        with pytest.raises(vl.UserError, match=match):
            vl.main(["--train", "--preset", "tiny", *argv])
    for flags, match in ((["--num_key_value_heads", "4"], "multiple of --num_key_value_heads 4"),
                         (["--num_attention_heads", "4", "--num_key_value_heads", "3"], "multiple of"),
                         (["--hidden_size", "30"], "must be even"), (["--vision_feature_layer", "3"], "-3 .. 2"),
                         (["--vision_feature_select_strategy", "fulll"], "default or full"),
                         (["--n_frames", "0"], "--n_frames must be"), (["--max_new_tokens", "0"], "--max_new"),
                         (["--n_frames", "2", "--data_dir", str(tmp_path / "w")], "samples 3 to 16 frames")):
        refused(match, *flags)
    ck = str(tmp_path / "ck")
    shutil.copytree(vl_ckpt[1]["hub_sharded"], ck)
    refused("is the --from_pretrained folder", "--from_pretrained", ck, "--out_dir", ck + "/.")
    # a save into a folder with an index (an HF sharded checkpoint) removes it: the new weights are the ones loaded
    model, tok = vl.load_pretrained(ck), vl.SentencePieceBPE(vl_ckpt[1]["t5save"])
    vl.save_checkpoint(model, dataclasses.replace(model.cfg, out_dir=ck, vocab_size=32064), tok)
    assert not os.path.exists(os.path.join(ck, "model.safetensors.index.json"))
    img = tmp_path / "x.png"
    cv2.imwrite(str(img), np.zeros((8, 8, 3), np.uint8))
    for name, text, match in (("one", '{"image": "x.png", "question": "q", "answer": "a"}\n', "every entry is held out"),
                              ("num", '{"image": 5, "question": "q", "answer": "a"}\n', "num.jsonl:1: need"),
                              ("tag", '{"image": "x.png", "question": "<video> q", "answer": "a"}\n', "tag.jsonl:1:"),
                              ("latin", b'{"image": "x.png", "question": "caf\xe9", "answer": "a"}\n', "not UTF-8")):
        (tmp_path / f"{name}.jsonl").write_bytes(text if isinstance(text, bytes) else text.encode())
        refused(match, "--data", str(tmp_path / f"{name}.jsonl"))
    (tmp_path / "bom.jsonl").write_text('\ufeff{"image": "x.png", "question": "q", "answer": "a"}\n', "utf-8")
    assert vl.read_annotations(str(tmp_path / "bom.jsonl"))[0]["question"] == "q"
    cut = tmp_path / "cut"
    shutil.copytree(vl_tiny_run[0].out_dir, cut)
    (cut / "train_state.pt").write_bytes((cut / "train_state.pt").read_bytes()[:500])
    with pytest.raises(vl.UserError, match="train_state.pt: not a readable training state"):
        vl.main(["--train", "--resume", "--out_dir", str(cut), "--data_dir", vl_tiny_run[0].data_dir,
                 "--max_steps", "6"])  # the run is at step 3 of 3: a later --max_steps goes on
    # --generate from a run of this script runs under --dtype's autocast (its weights stay float32)
    seen = []
    monkeypatch.setattr(vl, "autocast_dtype", lambda name, device: seen.append(name) or "float32")
    png = os.path.join(vl_tiny_run[0].data_dir, "train", "img_00000.png")
    vl.main(["--generate", "--out_dir", vl_tiny_run[0].out_dir, "--image", png, "--prompt", "What shape?", "--dtype",
             "bfloat16", "--max_new_tokens", "1"])
    assert set(seen) == {"bfloat16"}


def test_vl_damaged_files_odd_text_and_dropped_flags(vl_tiny_run, vl_ckpt, tmp_path):
    """A damaged run (config types, token table, training state) or tokenizer is one line; a JSON string may hold
    U+2028; a 1x1 patch grid gets finite positions; legacy=True tokenizers prepend after added tokens as transformers
    does; flags a from-scratch or fine-tuning run would drop are refused."""
    from transformers import AutoTokenizer
    run = tmp_path / "run"
    shutil.copytree(vl_tiny_run[0].out_dir, run)
    meta = json.load(open(run / "config.json"))
    for key, value, match in (("n_frames", "4", "n_frames is '4'; the file is damaged"),
                              ("gpt2_table", None, "damaged")):
        where = meta["train_config"] if key == "n_frames" else meta
        where[key], old = value, where[key]
        json.dump(meta, open(run / "config.json", "w"))
        with pytest.raises(vl.UserError, match=match):
            vl.main(["--eval", "--out_dir", str(run)])
        where[key] = old
    json.dump(meta, open(run / "config.json", "w"))
    torch.save({"step": 3}, run / "train_state.pt")
    resume = ["--train", "--resume", "--out_dir", str(run), "--data_dir", vl_tiny_run[0].data_dir, "--max_steps", "6"]
    with pytest.raises(vl.UserError, match="train_state.pt: does not fit"):
        vl.main(resume)
    (tmp_path / "a.png").write_bytes(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    line = json.dumps({"image": "a.png", "question": "Which?\u2028Say it.", "answer": "a"}, ensure_ascii=False)
    (tmp_path / "u.jsonl").write_text(line + "\n", "utf-8")
    assert vl.read_annotations(str(tmp_path / "u.jsonl"))[0]["question"] == "Which?\u2028Say it."
    assert torch.isfinite(vl.sincos_2d(1, 16)).all() and torch.equal(vl.sincos_2d(3, 16), vl.sincos_2d(3, 16))
    _vl_tokenizer(tmp_path / "tk")
    tc = json.load(open(tmp_path / "tk" / "tokenizer_config.json"))
    json.dump({**tc, "legacy": True}, open(tmp_path / "tk" / "tokenizer_config.json", "w"))
    hf, ours = AutoTokenizer.from_pretrained(str(tmp_path / "tk")), vl.SentencePieceBPE(str(tmp_path / "tk"))
    for text in ("USER: <video>\nWhat moves? ASSISTANT:", "a<image>b <video> c"):
        assert ours.encode(text) == hf(text).input_ids, text
    tj = json.load(open(tmp_path / "tk" / "tokenizer.json"))
    tj["model"].update(byte_fallback=False, unk_token=None)
    json.dump(tj, open(tmp_path / "tk" / "tokenizer.json", "w"))
    with pytest.raises(vl.UserError, match="cannot encode"):
        vl.SentencePieceBPE(str(tmp_path / "tk")).encode("naïve")
    moments = torch.load(os.path.join(vl_tiny_run[0].out_dir, "train_state.pt"))  # another run's moments: other shapes
    moments["optimizer"]["state"] = {i: {k: v[..., :1] if v.dim() else v for k, v in st.items()}
                                     for i, st in moments["optimizer"]["state"].items()}
    for state, why in ((torch.zeros(3), "not a readable training state"),  # not a dict: refused before torch warns
                       ({"optimizer": {}, "rng": torch.get_rng_state()}, "does not fit"),  # no step
                       (moments, r"does not fit this run's model \(ValueError\)")):
        torch.save(state, run / "train_state.pt")
        with pytest.raises(vl.UserError, match=f"train_state.pt: {why}"), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            vl.main(resume)
        assert not [w for w in seen if "indexing" in str(w.message)]  # torch's warning on a string index
    meta["train_config"]["dtype"] = "xyz"  # a damaged saved dtype: one line in every mode
    json.dump(meta, open(run / "config.json", "w"))
    png = os.path.join(vl_tiny_run[0].data_dir, "train", "img_00000.png")
    for argv in (["--eval"], ["--generate", "--image", png, "--prompt", "What shape?"]):
        with pytest.raises(vl.UserError, match="dtype is 'xyz'"):
            vl.main(argv + ["--out_dir", str(run)])
    own = json.load(open(os.path.join(vl_tiny_run[0].out_dir, "config.json")))["train_config"]
    vl.main(["--preset", "tiny"])  # no mode: "nothing to do", not a --preset refusal
    with pytest.raises(vl.UserError, match="--data_init 1 \\(checkpoint: "):  # the init is done: --resume keeps it
        vl.main(["--train", "--resume", "--out_dir", vl_tiny_run[0].out_dir, "--data_init", "1"])
    cut = ["--data_dir", vl_tiny_run[0].data_dir, "--max_new_tokens", "1"]  # --eval compares the run's own values
    with pytest.raises(vl.UserError, match="drop --vocab_size 7"):
        vl.main(["--eval", "--out_dir", vl_tiny_run[0].out_dir, "--vocab_size", "7", *cut])
    tiny = ["--train", "--preset", "tiny", "--data_dir", vl_tiny_run[0].data_dir, "--out_dir", str(tmp_path / "o")]
    for flags, match in ((["--vocab_size", "1000"], "--vocab_size: not read by --train"),
                         (["--eos_token_id", "5"], "--eos_token_id: not read by --train"),
                         (["--from_pretrained", vl_ckpt[1]["hub"], "--data_init", "9"], "--data_init: not read by")):
        with pytest.raises(vl.UserError, match=match):
            vl.main(tiny + flags)
    assert not (tmp_path / "o").exists()


def test_vl_two_modes_in_one_call_are_refused(tmp_path):
    """--eval --generate ran the evaluation and dropped the question without a word (likewise --train --bench,
    --generate --inspect): two modes are refused; --train --eval stays one run (training ends with the evaluation)."""
    o = str(tmp_path / "o")
    for argv in (["--eval", "--generate", "--prompt", "hi"], ["--train", "--bench"], ["--train", "--generate"],
                 ["--generate", "--prompt", "hi", "--inspect", o], ["--eval", "--bench"]):
        with pytest.raises(vl.UserError, match="one mode per call"):
            vl.parse_args([*argv, "--out_dir", o])
    assert vl.parse_args(["--train", "--eval", "--out_dir", o])[0].train
    with pytest.raises(vl.UserError, match="--top_k and --top_p filter what is sampled"):  # greedy would ignore them
        vl.parse_args(["--generate", "--prompt", "hi", "--top_k", "5", "--out_dir", o])


def test_vl_tied_config_with_a_stored_head_uses_that_head(vl_ckpt, tmp_path):
    """tie_word_embeddings true while the files store their own, different lm_head: transformers loads that head (and
    unties), and so does load_pretrained, so the logits agree; without a stored head the embedding is the head."""
    transformers = pytest.importorskip("transformers")
    tied = tmp_path / "tied"
    shutil.copytree(vl_ckpt[1]["hub"], tied)
    conf = json.load(open(tied / "config.json"))
    json.dump({**conf, "tie_word_embeddings": True, "text_config": {**conf["text_config"], "tie_word_embeddings": True}},
              open(tied / "config.json", "w"))
    ours = vl.load_pretrained(str(tied)).eval()
    ref = transformers.VideoLlavaForConditionalGeneration.from_pretrained(str(tied), dtype=torch.float32).eval()
    lm = ours.language_model
    assert not ours.cfg.tie_word_embeddings and not torch.equal(lm.lm_head.weight, lm.model.embed_tokens.weight)
    ids = torch.randint(3, 31999, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids)[0], ref(input_ids=ids).logits)
    state = load_file(str(tied / "model.safetensors"))
    save_file({k: v for k, v in state.items() if k != "language_model.lm_head.weight"}, str(tied / "model.safetensors"))
    headless = vl.load_pretrained(str(tied))  # no stored head: tied, the embedding table serves as the head
    assert headless.language_model.lm_head.weight is headless.language_model.model.embed_tokens.weight


def test_vl_hf_config_of_the_wrong_shape_is_one_line(vl_ckpt, tmp_path):
    """A config.json whose text_config is not an object or whose sizes are null or strings, and a shard index whose
    files are not names: each one UserError line naming it (these were AttributeError / TypeError tracebacks)."""
    hub = vl_ckpt[1]["hub"]
    config = json.load(open(os.path.join(hub, "config.json")))
    for name, change, want in [("list", {"text_config": [1]}, "text_config and vision_config must be JSON objects"),
                               ("null", {"text_config": {**config["text_config"], "num_hidden_layers": None}},
                                "num_hidden_layers is None; a number is needed"),
                               ("str", {"vision_config": {**config["vision_config"], "hidden_size": "32"}},
                                "hidden_size is '32'; a number is needed")]:
        bad = str(tmp_path / name)
        shutil.copytree(hub, bad)
        json.dump({**config, **change}, open(os.path.join(bad, "config.json"), "w"))
        for call in (lambda: vl.load_pretrained(bad), lambda: vl.main(["--inspect", bad])):
            with pytest.raises(vl.UserError, match=re.escape(want)):
                call()
    shard = str(tmp_path / "shard")
    shutil.copytree(hub, shard)
    keys = list(load_file(os.path.join(shard, "model.safetensors")))
    json.dump({"weight_map": {k: ["model.safetensors"] for k in keys}},
              open(os.path.join(shard, "model.safetensors.index.json"), "w"))
    with pytest.raises(vl.UserError, match="not a safetensors index"):
        vl.load_pretrained(shard)


def test_vl_hf_config_settings_this_model_lacks_are_named(vl_ckpt, tmp_path):
    """A config.json setting that the modules here do not implement is one line naming it (a bias was a list of
    unexpected keys, no heads a ZeroDivisionError, a feature layer past the tower ran); so is a folder of another
    script, whose config.json has no model_type."""
    config = json.load(open(os.path.join(vl_ckpt[1]["hub"], "config.json")))
    text = config["text_config"]  # the towers have 3 layers: hidden states -4 .. 3
    for i, (change, want) in enumerate([
            ({"text_config": {**text, "attention_bias": True}}, "text_config.attention_bias: true is not supported"),
            ({"text_config": {**text, "mlp_bias": True}}, "text_config.mlp_bias: true is not supported"),
            ({"multimodal_projector_bias": False}, "multimodal_projector_bias: false is not supported"),
            ({"text_config": {**text, "num_attention_heads": 0}}, "text_config.num_attention_heads is 0; it must be"),
            ({"vision_feature_layer": 4}, "vision_feature_layer 4 is not one of the tower's hidden states -4 .. 3"),
            ({"vision_feature_layer": -5}, "vision_feature_layer -5 is not one"),
            ({"model_type": None, "script": "videollama_mini"}, "no model_type (a run of videollama_mini.py)")]):
        os.makedirs(tmp_path / str(i))
        json.dump({**config, **change}, open(tmp_path / str(i) / "config.json", "w"))
        with pytest.raises(vl.UserError, match=re.escape(want)):
            vl.main(["--generate", "--from_pretrained", str(tmp_path / str(i)), "--prompt", "hi"])


def test_vl_an_odd_head_dim_a_foreign_tokenizer_an_empty_annotation_file_and_a_diverging_loss_are_one_line(
        vl_ckpt, vl_tiny_run, tmp_path):
    """Each is one UserError line naming what is wrong: a config.json whose text_config.head_dim is not hidden_size /
    num_attention_heads, an HF folder whose tokenizer.json is not a BPE model (a WordPiece one, as BERT's), a --data
    file with blank lines only, and a learning rate so large that the loss is no longer finite."""
    hub = vl_ckpt[1]["hub"]
    config = json.load(open(os.path.join(hub, "config.json")))
    text = config["text_config"]
    (tmp_path / "head").mkdir()
    json.dump({**config, "text_config": {**text, "head_dim": text["hidden_size"] // text["num_attention_heads"] + 2}},
              open(tmp_path / "head" / "config.json", "w"))
    wp = tmp_path / "wordpiece"
    wp.mkdir()
    shutil.copy(os.path.join(hub, "config.json"), wp / "config.json")
    os.symlink(os.path.join(hub, "model.safetensors"), wp / "model.safetensors")
    json.dump({"model": {"type": "WordPiece", "vocab": {"[UNK]": 0}}}, open(wp / "tokenizer.json", "w"))
    for folder, want in ((tmp_path / "head", f"{tmp_path / 'head'}: head_dim != hidden_size / num_attention_heads is "
                          "not supported"), (wp, f"{wp / 'tokenizer.json'}: missing, not JSON, or not a BPE tokenizer")):
        with pytest.raises(vl.UserError, match=re.escape(want)) as e:
            vl.main(["--generate", "--from_pretrained", str(folder), "--prompt", "hi"])
        assert "\n" not in str(e.value)
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    tiny = ["--train", "--preset", "tiny", "--out_dir", str(tmp_path / "o")]
    with pytest.raises(vl.UserError, match=f"^{re.escape(str(tmp_path / 'blank.jsonl'))}: no entries$"):
        vl.main(tiny + ["--data", str(tmp_path / "blank.jsonl")])
    with pytest.raises(vl.UserError, match=r"^loss became (nan|inf) at step \d+; stopped \(try a lower --lr\)$"):
        vl.main(tiny + ["--data_dir", vl_tiny_run[0].data_dir, "--lr", "1e30", "--warmup", "1"])
    assert not (tmp_path / "o" / "model.safetensors").exists()


def test_vl_loader_bad_checkpoints_and_legacy_buffers(vl_ckpt, tmp_path):
    """A corrupt safetensors file, a shard the index names but the folder lacks, a corrupt config.json and a
    projector other than gelu are each one clear line (exit 2); RoPE inv_freq and position_ids buffers that older
    checkpoints saved are skipped, as transformers skips them."""
    dirs = vl_ckpt[1]
    state = load_file(os.path.join(dirs["hub"], "model.safetensors"))
    config = json.load(open(os.path.join(dirs["hub"], "config.json")))
    bad = _vl_write(str(tmp_path / "bad"), state, config)
    data = open(os.path.join(bad, "model.safetensors"), "rb").read()
    open(os.path.join(bad, "model.safetensors"), "wb").write(data[: len(data) // 2])  # truncated download
    with pytest.raises(vl.UserError, match="model.safetensors: not a readable safetensors file"):
        vl.main(["--generate", "--from_pretrained", bad, "--prompt", "hi"])
    sharded = _vl_write(str(tmp_path / "sharded"), state, config, shards=3)
    os.remove(os.path.join(sharded, "model-00002-of-00003.safetensors"))
    with pytest.raises(vl.UserError, match="shard 'model-00002-of-00003.safetensors' is missing"):
        vl.load_pretrained(sharded)
    for text in ("{not json", b"\xff\xfe\x00", "[1, 2]"):
        cfg_path = os.path.join(bad, "config.json")
        open(cfg_path, "wb").write(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(vl.UserError, match="config.json: not"):
            vl.load_pretrained(bad)
    relu = _vl_write(str(tmp_path / "relu"), state, {**config, "projector_hidden_act": "relu"})
    with pytest.raises(vl.UserError, match='projector_hidden_act: "relu" is not supported'):
        vl.load_pretrained(relu)
    legacy = {**state, "language_model.model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(4),
              "image_tower.vision_model.embeddings.position_ids": torch.arange(5)[None]}
    ref = vl.load_pretrained(dirs["hub"]).state_dict()
    for shards in (1, 2):
        got = vl.load_pretrained(_vl_write(str(tmp_path / f"legacy{shards}"), legacy, config, shards)).state_dict()
        assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)


def test_vl_stage1_projector_only_on_hf_checkpoint(vl_ckpt, vl_tiny_run, tmp_path, capsys, monkeypatch):
    """--freeze vision,llm on top of an HF checkpoint: its own tokenizer, only multi_modal_projector.* changes; the
    config printed is the one that runs, with the checkpoint's sizes, not the preset's. The processor's files travel
    with the tokenizer's, so the run's folder opens in transformers as the checkpoint's did. --eval --from_pretrained
    scores the checkpoint as it comes, as --generate answers, into a folder of its own; a warmup longer than the run
    is named."""
    src, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    shutil.copytree(vl_ckpt[1]["t5save"], src)
    for name in ("preprocessor_config.json", "chat_template.json"):
        open(os.path.join(src, name), "w").write(json.dumps({"from": "the checkpoint", "name": name}))
    vl.main(["--train", "--preset", "tiny", "--from_pretrained", src, "--freeze", "vision,llm", "--max_steps", "2",
             "--warmup", "3", "--max_new_tokens", "24", "--data_dir", vl_tiny_run[0].data_dir, "--out_dir", out])
    said = capsys.readouterr().out  # (max_new_tokens 24: the toy BPE spells words in bytes)
    assert "--warmup 3 > --max_steps 2: the learning rate peaks at 6.7e-04, not --lr 1.0e-03" in said
    printed = json.loads(said.split("config: ", 1)[1].splitlines()[0])
    hf = json.load(open(os.path.join(src, "config.json")))
    assert printed["vocab_size"] == hf["text_config"]["vocab_size"] != vl.Config(**vl.PRESETS["tiny"]).vocab_size
    assert printed["hidden_size"] == hf["text_config"]["hidden_size"] and printed["share_towers"] is False
    assert printed["n_frames"] == 8  # an HF folder's videos: the 8 frames the released checkpoints were trained on
    before = {vl.canonical_key(k): v for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    after = load_file(os.path.join(out, "model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]) != k.startswith("multi_modal_projector."), k
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "chat_template.json"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(src, name), "rb").read(), name
    tuned = json.load(open(os.path.join(out, "eval.json")))
    assert tuned["test"]["video"]["n"] > 0
    # the checkpoint as it comes, scored on your test questions: its eval.json alone, in a folder of its own
    world = vl_tiny_run[0].data_dir
    test = [json.loads(l) for l in open(os.path.join(world, "test.jsonl"))]
    test = [e for e in test if "image" in e][:4] + [e for e in test if "video" in e][:3]  # a batch of each, or rows
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({**e, "image" if "image" in e else "video":
                                                          os.path.join(world, e.get("image") or e["video"])}) + "\n"
                                              for e in test))
    base = ["--eval", "--from_pretrained", src, "--max_new_tokens", "24"]
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # where a synthetic world would be written (data/video_llava)
    with pytest.raises(vl.UserError, match="scores your questions: give --data FILE or --test_data FILE"):
        vl.main([*base, "--out_dir", str(tmp_path / "base")])  # not thousands of the synthetic world's
    base += ["--test_data", str(tmp_path / "t.jsonl")]
    scores = []
    for batch in ("32", "1"):  # the second call finds only the first's eval.json there; batched = row by row
        vl.main([*base, "--out_dir", str(tmp_path / "base"), "--batch_size", batch])
        scores.append(json.load(open(tmp_path / "base" / "eval.json")))
        assert scores[-1].pop("config")["batch_size"] == int(batch)  # eval.json records the config it scored
    assert scores[0] == scores[1] and scores[0].keys() == {"train_seconds", "test"}
    assert [scores[0]["test"][k]["n"] for k in ("image", "video")] == [4, 3]
    capsys.readouterr()
    vl.main(["--generate", "--from_pretrained", src, "--dtype", "float32", "--max_new_tokens", "24", "--prompt",
             test[0]["question"], "--image", os.path.join(world, test[0]["image"])])
    assert capsys.readouterr().out.strip() == scores[0]["test"]["image"]["samples"][0]["prediction"]
    with pytest.raises(vl.UserError, match="holding more than an eval.json"):  # the fine-tuned run keeps its score
        vl.main([*base, "--out_dir", out])
    for flag, value in (("--lr", "0.1"), ("--data_dir", "w")):  # training, or the synthetic world it never reads
        with pytest.raises(vl.UserError, match=f"{flag}: not read by --eval"):
            vl.main([*base, "--out_dir", str(tmp_path / "b"), flag, value])
    assert json.load(open(os.path.join(out, "eval.json"))) == tuned and not os.path.exists(tmp_path / "b")
    assert os.listdir(tmp_path / "cwd") == []  # your test file alone: no synthetic world written, or scored
    for mode in (["--train"], ["--train", "--eval"]):  # a new run keeps the checkpoint's score too
        with pytest.raises(vl.UserError, match=r"not a run of this script \(nor a checkpoint's score\)"):
            vl.parse_args([*mode, "--from_pretrained", src, "--out_dir", str(tmp_path / "base")])
    with pytest.raises(vl.UserError, match="--test_data: give your training questions too, as --data FILE"):
        vl.main(["--train", "--from_pretrained", src, "--test_data", str(tmp_path / "t.jsonl"), "--out_dir",
                 str(tmp_path / "ft")])  # a forgotten --data would fine-tune on the synthetic world


def test_vl_stage1_on_a_bfloat16_checkpoint_keeps_the_frozen_towers_bfloat16(vl_ckpt, vl_tiny_run, tmp_path,
                                                                            monkeypatch):
    """--dtype bfloat16 stage 1 on a bfloat16 checkpoint: the frozen towers stay bfloat16 in memory and in the saved
    file (half of float32's bytes), the projector trains in float32; --resume and --eval read the mixed file back."""
    src, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    shutil.copytree(vl_ckpt[1]["memory_sharded_bf16"], src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(vl_ckpt[1]["t5save"], name), src)
    common = ["--preset", "tiny", "--freeze", "vision,llm", "--dtype", "bfloat16", "--max_steps", "2",
              "--max_new_tokens", "24", "--data_dir", vl_tiny_run[0].data_dir, "--out_dir", out]
    vl.main(["--train", "--from_pretrained", src, "--stop_after", "1", *common])
    vl.main(["--train", "--resume", *common[2:]])  # the preset comes from the checkpoint
    assert json.load(open(os.path.join(out, "config.json")))["train_config"]["n_frames"] == 8  # the HF folder's, kept
    ref, after = vl.load_pretrained(src).state_dict(), load_file(os.path.join(out, "model.safetensors"))
    for k, v in after.items():
        if k.startswith("multi_modal_projector."):
            assert v.dtype == torch.float32 and not torch.equal(v, ref[k].float()), k  # trained
        else:
            assert v.dtype == torch.bfloat16 and torch.equal(v, ref[k]), k  # frozen, as loaded
    vl.main(["--eval", "--out_dir", out])
    assert json.load(open(os.path.join(out, "eval.json")))["test"]["image"]["n"] > 0
    # --generate runs the run as --eval does: its trained projector stays float32 (an HF folder's would follow --dtype)
    loaded, load = [], vl.load_pretrained
    monkeypatch.setattr(vl, "load_pretrained", lambda *a, **k: loaded.append(load(*a, **k)) or loaded[-1])
    png = os.path.join(vl_tiny_run[0].data_dir, "train", "img_00000.png")
    vl.main(["--generate", "--out_dir", out, "--image", png, "--prompt", "What shape?", "--max_new_tokens", "1"])
    proj = loaded[0].multi_modal_projector.linear_1.weight
    assert proj.dtype == torch.float32 and loaded[0].image_tower.vision_model.pre_layrnorm.weight.dtype == torch.bfloat16


def test_vl_bench_prints_what_it_measured(capsys):
    """--bench on a tiny LLaMA: the eager step, the compiled step and transformers give identical tokens, and each
    has a speed and a share of the floor (weight bytes / copy bandwidth)."""
    tiny = {"tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2)}
    vl.bench(vl.Config(max_new_tokens=8), sizes=tiny, rounds=1)
    out = capsys.readouterr().out
    head = next(l for l in out.splitlines() if l.startswith("tiny: LLaMA"))
    assert "identical tokens: True" in head and "8 new tokens" in head and float(head.split("floor ")[1].split()[0]) > 0
    for k in ("eager", "compiled", "transformers"):
        line = next(l for l in out.splitlines() if l.strip().startswith(k + " "))
        assert float(line.split()[1]) > 0 and "of the floor" in line and "x transformers" in line and "not eager's" not in line


def test_vl_bench_without_a_cxx_compiler_is_one_line(tmp_path):
    """--bench times the compiled step too, which on a CPU needs a C++ compiler (inductor reads CXX). Without one the
    command ended in inductor's traceback after the eager warm-up; now it is one line naming it, exit status 2."""
    cmd = [sys.executable, os.path.join(ROOT, "video_llava.py"), "--bench", "--max_new_tokens", "2"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "CXX": str(tmp_path / "no-such-g++")})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1].startswith("error: No working C++ compiler found")


@pytest.mark.parametrize("script", ["vm", "vc"])
def test_vm_vc_float16_trains_with_a_gradient_scaler(script, tmp_path, monkeypatch):
    """The captioners' float16 loss scaling runs on the training device (a CUDA-only scaler turns itself off on a CPU)."""
    cfg = (_vm_cfg if script == "vm" else _vc_cfg)(tmp_path, dtype="float16", max_steps=2)
    check_float16_scales_the_loss((vm if script == "vm" else vc).train, cfg, monkeypatch)


@pytest.mark.parametrize("script", ["vm", "vc"])
def test_vm_vc_log_eta_in_whole_seconds(script, tmp_path, monkeypatch, capsys):
    cfg = (_vm_cfg if script == "vm" else _vc_cfg)(tmp_path)
    check_log_eta_in_whole_seconds(vm if script == "vm" else vc, cfg, "global_batch", monkeypatch, capsys)


def test_vl_log_eta_in_whole_seconds(vl_tiny_run, tmp_path, monkeypatch, capsys):
    cfg = dataclasses.replace(vl_tiny_run[0], out_dir=str(tmp_path / "o"))
    check_log_eta_in_whole_seconds(vl, cfg, "batch_indices", monkeypatch, capsys)


def test_vl_float16_trains_with_a_gradient_scaler(vl_tiny_run, tmp_path, monkeypatch):
    cfg = dataclasses.replace(vl_tiny_run[0], dtype="float16", max_steps=2, out_dir=str(tmp_path / "o"))
    check_float16_scales_the_loss(vl.train, cfg, monkeypatch)


def test_vl_autocast_auto(monkeypatch):
    """video_llava's --dtype auto: training and evaluation in float32 on every CPU (faked instruction sets), bfloat16
    on a CUDA GPU of compute capability 8+; native_bf16 (an HF folder's weights) follows the hardware."""
    assert vl.Config().dtype == "auto"
    for avx512, amx, native in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v)
        assert vl.native_bf16("cpu") == native and vl.autocast_dtype("auto", "cpu") == "float32"
        with vl.autocast("auto", "cpu"):
            assert torch.mm(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32  # autocast really off
    assert vl.autocast_dtype("bfloat16", "cpu") == "bfloat16" and vl.autocast_dtype("auto", "mps") == "float32"
    for major, want in ((7, "float32"), (8, "bfloat16")):  # V100/T4 emulate it
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None, m=major: (m, 0))
        assert vl.autocast_dtype("auto", "cuda:1") == want and vl.native_bf16("cuda:1") == (major >= 8)


# ====================================================================================================================
# 4. mark1.py
# ====================================================================================================================
import json
import os
import shutil
import socket
import struct
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mark1 as mk


def _mk_tiny_cfg(tmp_path, **kw):
    return mk.Config(**{**mk.PRESETS["tiny"], "data_dir": str(tmp_path / "data"), "out_dir": str(tmp_path / "out"), **kw})


@pytest.fixture(scope="module")
def mk_hf(tmp_path_factory):
    """Tiny random V-JEPA 2 and Qwen3 checkpoints (tied and untied) + a toy Qwen3 tokenizer, built offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen3Config, Qwen3ForCausalLM, VJEPA2Config, VJEPA2Model
    root = tmp_path_factory.mktemp("mk_hf")
    torch.manual_seed(0)
    vc = VJEPA2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, crop_size=32, patch_size=16,
                      tubelet_size=2, frames_per_clip=4, pred_hidden_size=64, pred_num_hidden_layers=1,
                      pred_num_attention_heads=2)  # head dim 64: RoPE split 20/20/20 + 4 pass-through
    hv = VJEPA2Model(vc).eval()
    hv.save_pretrained(root / "vjepa2")
    out = {"root": root, "vjepa2": hv}
    for name, tie in (("qwen3", True), ("qwen3_untied", False)):
        qc = Qwen3Config(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=tie,
                         rope_theta=1e6, eos_token_id=151645)
        hq = Qwen3ForCausalLM(qc).eval()
        hq.save_pretrained(root / name)
        out[name] = hq
    # a toy byte-level BPE with Qwen3's pre-tokenizer, padded so that the special tokens keep their real ids
    tk = Tokenizer(models.BPE())
    tk.normalizer = normalizers.NFC()
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(mk.QWEN_PAT), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    texts = ["What happens to the red circle? A. it appears B. it stops C. it turns blue D. it meets the green square",
             "Hello world's 12345 test!!\n\n  foo", "héllo wörld café naïve 東京 I'LL"] * 50
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, show_progress=False,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    j = json.loads(tk.to_str())
    vocab = j["model"]["vocab"]
    for i in range(len(vocab), 151643):
        vocab[f"<dummy_{i}>"] = i  # unreachable fillers: no merge forms them
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(151646, 151667)] \
        + ["<think>", "</think>"]
    j["added_tokens"] = [dict(id=151643 + i, content=s, single_word=False, lstrip=False, rstrip=False, normalized=False,
                              special=not s.endswith("think>")) for i, s in enumerate(specials)]
    # a stand-in for Qwen3's chat template: one user turn, generation prompt, thinking off
    tmpl = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
            "enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
    for name in ("qwen3", "qwen3_untied"):
        json.dump(j, open(root / name / "tokenizer.json", "w"))
        json.dump({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "bos_token": None, "unk_token": None}, open(root / name / "tokenizer_config.json", "w"))
        open(root / name / "chat_template.jinja", "w").write(tmpl)
    return out


# ---- faithfulness against transformers


@pytest.mark.parametrize("n_frames", [1, 3, 4])
def test_mk_vjepa2_features_match_transformers(mk_hf, n_frames):
    enc = mk.load_vjepa2(str(mk_hf["root"] / "vjepa2"))
    assert not any(p.is_meta for p in enc.parameters())
    x = torch.randn(2, n_frames, 3, 32, 32)
    with torch.no_grad():
        ref = mk_hf["vjepa2"].get_vision_features(x)
        ours = enc(x)
    assert ours.shape == ref.shape == (2, max(1, n_frames // 2) * 4, 128)
    assert (ours - ref).abs().max() < 1e-4


def test_mk_vjepa2_rope_split_and_partner():
    att = mk.VJEPA2Attention(128, 2, grid=2)
    assert att.sub == 20  # head dim 64 -> 20/20/20 + 4 unrotated
    x = torch.randn(1, 2, 8, 64)
    y = att.rope(x)
    assert torch.equal(y[..., 60:], x[..., 60:])  # pass-through dims
    assert torch.equal(y[:, :, 0, :20], x[:, :, 0, :20])  # time position 0: no rotation of the time block
    # hand check of one element pair: position t=1 at dims (0, 1) uses frequencies omega_0 and omega_1 (tiled)
    om = 1.0 / 10000 ** (torch.arange(10).float() / 10)
    i = 4  # token 4 -> t=1, h=0, w=0
    x0, x1 = x[0, 0, i, 0], x[0, 0, i, 1]
    assert torch.allclose(y[0, 0, i, 0], x0 * torch.cos(om[0]) - x1 * torch.sin(om[0]), atol=1e-6)
    assert torch.allclose(y[0, 0, i, 1], x1 * torch.cos(om[1]) + x0 * torch.sin(om[1]), atol=1e-6)


def test_mk_vjepa2_residual_stream_is_contiguous(mk_hf):
    """The patch embedding's (B, P, Dv) is a transposed view of the conv output; `x + attention(...)` keeps its first
    operand's layout, so left as a view the whole stream stays transposed and every LayerNorm and Linear copies it.
    Every block and norm must see a contiguous input."""
    enc, seen = mk.load_vjepa2(str(mk_hf["root"] / "vjepa2")), []
    for m in enc.modules():
        if isinstance(m, (mk.VJEPA2Layer, torch.nn.LayerNorm)):
            m.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        enc(torch.randn(1, 4, 3, 32, 32))
    assert len(seen) == 2 * 2 + 2 + 1 and all(seen)  # 2 layers, each with 2 norms, and the final norm


def test_mk_vjepa2_classifier_prefix_and_predictor_ignored(mk_hf, tmp_path, capsys):
    src = mk_hf["root"] / "vjepa2"
    dst = tmp_path / "cls"
    dst.mkdir()
    state = load_file(str(src / "model.safetensors"))
    state = {("vjepa2." + k): v for k, v in state.items()}
    state["classifier.weight"] = torch.zeros(3, 128)
    save_file(state, str(dst / "model.safetensors"))
    shutil.copy(src / "config.json", dst / "config.json")
    enc = mk.load_vjepa2(str(dst))
    assert "ignoring" in capsys.readouterr().out
    x = torch.randn(1, 4, 3, 32, 32)
    with torch.no_grad():
        assert (enc(x) - mk_hf["vjepa2"].get_vision_features(x)).abs().max() < 1e-4


@pytest.mark.parametrize("name", ["qwen3", "qwen3_untied"])
def test_mk_qwen3_logits_match_transformers(mk_hf, name):
    lm = mk.load_qwen3(str(mk_hf["root"] / name))
    assert lm.tie == (name == "qwen3")
    ids = torch.randint(0, 151936, (2, 11))
    with torch.no_grad():
        ref = mk_hf[name](ids).logits
        ours = lm(lm.model.embed_tokens(ids))
    assert (ours - ref).abs().max() < 1e-4


def test_mk_qwen3_tied_config_with_its_own_lm_head(mk_hf, tmp_path):
    """A config that says tie_word_embeddings but a file that also holds its own lm_head.weight: transformers keeps
    the file's head (untied), so the loaded LLM must use that head too, not the embedding table."""
    from transformers import Qwen3ForCausalLM
    shutil.copytree(mk_hf["root"] / "qwen3", tmp_path / "q")
    state = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert json.load(open(tmp_path / "q" / "config.json"))["tie_word_embeddings"] and "lm_head.weight" not in state
    state["lm_head.weight"] = torch.randn_like(state["model.embed_tokens.weight"])
    save_file(state, str(tmp_path / "q" / "model.safetensors"), metadata={"format": "pt"})
    lm, hq = mk.load_qwen3(str(tmp_path / "q")), Qwen3ForCausalLM.from_pretrained(str(tmp_path / "q")).eval()
    assert not lm.tie and torch.equal(lm.lm_head.weight, state["lm_head.weight"])
    ids = torch.randint(0, 151936, (1, 7))
    with torch.no_grad():
        assert (lm(lm.model.embed_tokens(ids)) - hq(ids).logits).abs().max() < 1e-4


def test_mk_qwen3_greedy_generation_matches_transformers(mk_hf):
    lm, hq = mk.load_qwen3(str(mk_hf["root"] / "qwen3")), mk_hf["qwen3"]
    torch.manual_seed(1)
    prompts = [torch.randint(0, 151936, (n,)).tolist() for n in (5, 9)]
    ours = [mk.llm_generate(lm, lm.model.embed_tokens, lm.model.embed_tokens(torch.tensor(p))[None],
                            torch.ones(1, len(p), dtype=torch.bool), 151645, 12)[0] for p in prompts]
    for p, o in zip(prompts, ours):
        ref = hq.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=151645,
                          pad_token_id=151643)[0, len(p):].tolist()
        ref = [t for t in ref if t != 151645]
        assert o == ref[:len(o)] and len(o) == len(ref)
    # batch (left-padded) == rows, cache == no cache
    rows = [lm.model.embed_tokens(torch.tensor(p)) for p in prompts]
    x, valid = mk.pad_left(rows)
    with torch.no_grad():
        batch = mk.llm_generate(lm, lm.model.embed_tokens, x, valid, 151645, 12)
        nocache = mk.llm_generate(lm, lm.model.embed_tokens, x, valid, 151645, 12, use_cache=False)
    assert batch == ours == nocache


def test_mk_qwen3_tokenizer_and_chat_template_match_hf(mk_hf):
    from transformers import AutoTokenizer
    path = str(mk_hf["root"] / "qwen3")
    ht, qt = AutoTokenizer.from_pretrained(path), mk.QwenTokenizer(os.path.join(path, "tokenizer.json"))
    for s in ["Hello world's 12345 test!!\n\n  foo", "cafe\u0301 東京 naïve  \t x\r\n", "I'LL we'RE <|im_end|>x",
              "What happens to the red circle?\nA. it appears\nB. it stops"]:
        assert qt.encode(s) == ht(s)["input_ids"], s
        assert qt.decode(qt.encode(s)) == ht.decode(ht(s)["input_ids"]).replace("<|im_end|>", "")
        assert qt.decode(qt.encode(s) + [151762]) == qt.decode(qt.encode(s))  # an embedding row past the tokenizer
        ids = qt.encode(s)
        for cut in range(len(ids) + 1):  # every prefix: an answer cut mid-character decodes as HF's does
            assert qt.decode(ids[:cut]) == ht.decode(ids[:cut]).replace("<|im_end|>", ""), (s, cut)
    content = "What happens to the red circle?\nA. it appears\nB. it stops"
    ref = ht.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                 enable_thinking=False, tokenize=False)
    assert mk.QwenTokenizer.chat.format(content) == ref
    assert qt.encode(mk.QwenTokenizer.chat.format(content)) == ht(ref)["input_ids"]
    assert qt.eos == 151645


def test_mk_hf_loader_errors(mk_hf, tmp_path):
    src = mk_hf["root"] / "qwen3"
    with pytest.raises(mk.UserError, match="model_type 'qwen3', expected 'vjepa2'"):
        mk.load_vjepa2(str(src))
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(src / "config.json", bad / "config.json")
    state = load_file(str(src / "model.safetensors"))
    state.pop("model.norm.weight")
    state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(5, 64)
    state["model.extra.weight"] = torch.zeros(2)
    save_file(state, str(bad / "model.safetensors"))
    with pytest.raises(mk.UserError) as e:
        mk.load_qwen3(str(bad))
    msg = str(e.value)
    assert "model.norm.weight" in msg and "model.extra.weight" in msg and "up_proj" in msg


def test_mk_tower_folders_named_by_what_is_wrong(mk_hf, tmp_path):
    """A missing folder is named as missing (not as a missing tokenizer.json), another model's folder as --llm_ckpt by
    its model_type (before its tokenizer is read), V-JEPA 2 without q/k/v biases by that setting; a video cut in half
    (it decodes its first part without an error) is refused."""
    train = ["--train", "--preset", "tiny", "--out_dir", str(tmp_path / "o"), "--llm_ckpt"]
    with pytest.raises(mk.UserError, match="nowhere: no such folder"):
        mk.main(train + [str(tmp_path / "nowhere")])
    other = tmp_path / "vl"
    other.mkdir()
    json.dump({"model_type": "video_llava"}, open(other / "config.json", "w"))
    with pytest.raises(mk.UserError, match="model_type 'video_llava', expected 'qwen3'"):
        mk.main(train + [str(other)])
    assert not (tmp_path / "o").exists()
    nobias = tmp_path / "nobias"
    shutil.copytree(mk_hf["root"] / "vjepa2", nobias)
    json.dump({**json.load(open(nobias / "config.json")), "qkv_bias": False}, open(nobias / "config.json", "w"))
    with pytest.raises(mk.UserError, match="qkv_bias False; only gelu with q/k/v biases"):
        mk.load_vjepa2(str(nobias))
    check_cut_off_video(mk, tmp_path)


def test_mk_moved_tower_folder_names_the_flag_that_finds_it(mk_hf, tmp_path):
    """A run's V-JEPA 2 folder moved before --eval: the one line names --vision_ckpt, and passing it there works."""
    shutil.copytree(mk_hf["root"] / "vjepa2", tmp_path / "v")
    mk.main(["--train", "--preset", "tiny", "--vision_ckpt", str(tmp_path / "v"), "--max_steps", "2", "--data_dir",
             str(tmp_path / "data"), "--out_dir", str(tmp_path / "o")])
    os.rename(tmp_path / "v", tmp_path / "v2")
    with pytest.raises(mk.UserError, match="v: no such folder; pass --vision_ckpt DIR"):
        mk.main(["--eval", "--out_dir", str(tmp_path / "o")])
    mk.main(["--eval", "--out_dir", str(tmp_path / "o"), "--vision_ckpt", str(tmp_path / "v2")])

def test_mk_frozen_towers_with_checkpoints(mk_hf, tmp_path):
    cfg = _mk_tiny_cfg(tmp_path, vision_ckpt=str(mk_hf["root"] / "vjepa2"), llm_ckpt=str(mk_hf["root"] / "qwen3"),
                       n_frames=4)
    tok = mk.make_tokenizer(cfg)
    model = mk.build_model(cfg, tok).train()
    assert model.frozen == {"vision", "llm"} and not model.vision.training and not model.llm.training
    assert all(not p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.bridge.parameters())
    cache = mk.FeatureCache(model, True)
    clips = torch.randint(0, 255, (3, 4, 32, 32, 3), dtype=torch.uint8)
    f1 = cache("x", torch.tensor([0, 2]), clips)
    assert len(cache.store) == 2 and not f1.requires_grad
    assert torch.equal(cache("x", torch.tensor([2, 0]), clips), f1.flip(0))
    item = dict(question="What happens to the red circle?", choices=["A. it stops", "B. it appears"], answer="B. it appears")
    q_ids, q_valid, inp, tgt = mk.text_batch([item], tok)
    assert inp[0, :len(tok.prompt(item["question"], item["choices"]))].tolist()[:2] == [151644, tok.encode("user")[0]]
    _, loss, fl = model(f1[:1], q_ids, q_valid, inp, tgt, torch.zeros(1, 4))
    loss.backward()
    assert fl.shape == (1, 4) and model.bridge.queries.grad is not None
    assert model.llm.model.embed_tokens.weight.grad is None


# ---- the tiny model: shapes, masks, cache, batching, training invariants


def _mk_model(cfg, n_vocab_texts=("What happens to the red circle?\nA. it appears\nB. it stops\nAnswer: A. it appears",)):
    tok = mk.GPT2Tokenizer.build(list(n_vocab_texts), True)
    return mk.build_model(cfg, tok), tok


@pytest.mark.parametrize("n_frames", [2, 4, 8])
def test_mk_shapes_for_several_frame_counts(tmp_path, n_frames):
    cfg = _mk_tiny_cfg(tmp_path, n_frames=n_frames)
    model, tok = _mk_model(cfg)
    clips = torch.randint(0, 255, (2, n_frames, 32, 32, 3), dtype=torch.uint8)
    feats = model.encode(clips)
    assert feats.shape == (2, n_frames // 2 * 16, cfg.v_width)  # T tubelets x 4x4 patches
    item = dict(question="What happens to the red circle?", choices=["A. it appears", "B. it stops"], answer="A. it appears")
    q_ids, q_valid, inp, tgt = mk.text_batch([item, item], tok)
    logits, loss, fl = model(feats, q_ids, q_valid, inp, tgt, torch.zeros(2, n_frames))
    assert logits.shape == ((tgt != -100).sum(), len(tok.ids)) and fl.shape == (2, n_frames) and torch.isfinite(loss)
    full, _, _ = model(feats, q_ids, q_valid, inp)  # (B, L, V) everywhere; the loss reads the answer positions only
    assert full.shape == (2, inp.shape[1], len(tok.ids))
    ce = torch.nn.functional.cross_entropy(full.flatten(0, 1), tgt.flatten(), ignore_index=-100)
    assert torch.allclose(ce, torch.tensor(model.parts[0]), atol=1e-5)


def test_mk_frame_loss_reads_only_clips_with_support_times(tmp_path):
    """A clip without support_times (labels all 0) adds nothing to the frame loss; it used to be trained as 'no frame
    supports the answer', pushing every frame's score down. A labelled clip's loss is as it was."""
    cfg = _mk_tiny_cfg(tmp_path)
    model, tok = _mk_model(cfg)
    feats = model.encode(torch.randint(0, 255, (2, cfg.n_frames, 32, 32, 3), dtype=torch.uint8))
    item = dict(question="What happens to the red circle?", choices=["A. it appears", "B. it stops"], answer="A. it appears")
    batch = mk.text_batch([item, item], tok)
    one = torch.zeros(2, cfg.n_frames)
    one[0, 3] = 1  # clip 0 is localised, clip 1 gives no support_times
    _, loss, fl = model(feats, *batch, one)
    both = model.parts[1]
    assert loss.item() == pytest.approx(model.parts[0] + cfg.lam * both)  # the total: CE + lam * BCE (lam 2)
    pw = torch.tensor(cfg.pos_weight)
    want = F.binary_cross_entropy_with_logits(fl[:1].float(), one[:1], pos_weight=pw, reduction="sum") / (2 * cfg.n_frames)
    assert abs(both - want.item()) < 1e-6
    model(feats, *batch, torch.zeros(2, cfg.n_frames))
    assert model.parts[1] == 0.0


def test_mk_label_masking_only_answer_tokens(tmp_path):
    tok = mk.GPT2Tokenizer.build(["What happens?\nA. x\nB. y\nAnswer: B. y"], True)
    item = dict(question="What happens?", choices=["A. x", "B. y"], answer="B. y")
    _, _, inp, tgt = mk.text_batch([item], tok)
    p, a = tok.prompt(item["question"], item["choices"]), tok.target(item["answer"])
    assert (tgt[0] != -100).sum() == len(a) and tgt[0, len(p) - 1:len(p) - 1 + len(a)].tolist() == a
    assert tok.decode(a) == " B. y" and a[-1] == tok.eos


def test_mk_causal_mask(tmp_path):
    model, tok = _mk_model(_mk_tiny_cfg(tmp_path))
    x = torch.randn(1, 10, 32)
    y = x.clone()
    y[0, 7] += 1.0
    with torch.no_grad():
        a, b = model.llm(x), model.llm(y)
    assert torch.allclose(a[0, :7], b[0, :7], atol=1e-6) and not torch.allclose(a[0, 7:], b[0, 7:])


def test_mk_padded_queries_attend_to_themselves(tmp_path, monkeypatch):
    """Under left padding a pad query has no real key at or before it; it attends to itself, so no row of the LLM's
    attention mask is all False (some attention kernels return NaN for such a row, and later layers spread it)."""
    model, _ = _mk_model(_mk_tiny_cfg(tmp_path))
    masks, sdpa = [], torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, attn_mask=None, **kw: masks.append(attn_mask) or sdpa(q, k, v, attn_mask, **kw))
    valid = torch.tensor([[False, False, True, True, True], [True] * 5])  # row 0 left-padded by two
    with torch.no_grad():
        model.llm(torch.randn(2, 5, 32), valid=valid)
    assert len(masks) == len(model.llm.model.layers) and all(m.any(-1).all() for m in masks)
    assert not masks[0][0, 0, 0, 1:].any()  # the first pad query sees only itself


def test_mk_llm_cache_without_padding_matches_the_full_forward(tmp_path):
    """The LLM's cache used without a padding mask (6 positions, then 2, then one at a time): each new query sees
    every cached key and the new keys up to and including itself, so the logits equal one forward over the whole."""
    model, _ = _mk_model(_mk_tiny_cfg(tmp_path))
    x = torch.randn(1, 10, 32)
    cache = [dict() for _ in model.llm.model.layers]
    with torch.no_grad():
        full = model.llm(x)
        parts = [model.llm(x[:, :6], cache=cache), model.llm(x[:, 6:8], cache=cache)]
        parts += [model.llm(x[:, i:i + 1], cache=cache) for i in (8, 9)]
    assert cache[0]["k"].shape[2] == 10 and torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_mk_generate_cache_and_batch_equivalence(tmp_path):
    cfg = _mk_tiny_cfg(tmp_path, max_new_tokens=6)
    model, tok = _mk_model(cfg)
    model.eval()
    clips = torch.randint(0, 255, (2, cfg.n_frames, 32, 32, 3), dtype=torch.uint8)
    items = [dict(question="What happens to the red circle?", choices=["A. it appears", "B. it stops"]),
             dict(question="What happens?", choices=["A. it stops", "B. it appears", "C. it appears"])]
    feats = model.encode(clips)
    batch, fl = mk.generate(model, feats, items, tok, cfg)
    nocache, _ = mk.generate(model, feats, items, tok, cfg, use_cache=False)
    rows, row_fl = zip(*[mk.generate(model, feats[i:i + 1], items[i:i + 1], tok, cfg) for i in range(2)])
    assert batch == nocache == [r[0] for r in rows] and len(batch[0]) > 0
    # the questions differ in length: the padded one's frame logits are its own, as if alone
    assert torch.allclose(torch.cat(row_fl), fl, atol=1e-5)
    # sampling is reproducible from a seeded generator
    scfg = mk.Config(**{**cfg.__dict__, "temperature": 1.0, "top_k": 5, "top_p": 0.9})
    s1 = mk.generate(model, feats, items, tok, scfg, generator=torch.Generator().manual_seed(3))[0]
    s2 = mk.generate(model, feats, items, tok, scfg, generator=torch.Generator().manual_seed(3))[0]
    assert s1 == s2
    draws = [mk.generate(model, feats, items, tok, scfg, generator=torch.Generator().manual_seed(k))[0]
             for k in range(4)]
    assert any(d != batch for d in draws)  # and it is not greedy decoding


def test_mk_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(mk.filter_logits(logits, 2, 1.0)).tolist() == [[True, False, False, True]]
    p = torch.tensor([[0.6, 0.3, 0.1]]).log()
    assert torch.isinf(mk.filter_logits(p, 0, 0.7)).tolist() == [[False, False, True]]
    # a prefix whose mass equals top_p exactly is enough (as transformers' TopPLogitsWarper)
    assert torch.isinf(mk.filter_logits(torch.tensor([[0.0, 0.0]]), 0, 0.5)).sum() == 1


def test_mk_overfit_one_batch(tmp_path):
    cfg = _mk_tiny_cfg(tmp_path, l_width=64, l_head_dim=32)
    texts = ["What happens to the red circle?\nA. it appears\nB. it stops\nAnswer: A. it appears B. it stops"]
    model, tok = _mk_model(cfg, texts)
    items = [dict(question="What happens to the red circle?", choices=["A. it appears", "B. it stops"], answer=a)
             for a in ("A. it appears", "B. it stops")]
    torch.manual_seed(0)
    clips = torch.randint(0, 255, (2, cfg.n_frames, 32, 32, 3), dtype=torch.uint8)
    labels = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1, 1, 0]], dtype=torch.float)
    q_ids, q_valid, inp, tgt = mk.text_batch(items, tok)
    model.init_from_data(clips, q_ids, q_valid)  # as training starts: from the plain init, or at a higher lr, some
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)  # seeds stall at a 50/50 first answer token
    for _ in range(200):
        _, loss, fl = model(model.encode(clips), q_ids, q_valid, inp, tgt, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    ids, fl = mk.generate(model, model.encode(clips), items, tok, cfg)
    assert [tok.decode(i).strip() for i in ids] == ["A. it appears", "B. it stops"]
    assert ((fl > 0).float() == labels).all()


@pytest.mark.parametrize("head", ["keys", "linear"])
def test_mk_frame_heads(tmp_path, head):
    """Both frame heads give one finite logit per sampled frame: the default "keys" (the queries score one key per
    frame, made from the video tokens) and the Mark-1 project's "linear" (a fixed Linear(D, F) on each query)."""
    cfg = _mk_tiny_cfg(tmp_path, frame_head=head)
    model, tok = _mk_model(cfg)
    items = [dict(question="What happens?", choices=["A. it appears", "B. it stops"], answer="A. it appears")] * 2
    q_ids, q_valid, inp, tgt = mk.text_batch(items, tok)
    torch.manual_seed(0)
    clips = torch.randint(0, 255, (2, cfg.n_frames, 32, 32, 3), dtype=torch.uint8)
    _, loss, fl = model(model.encode(clips), q_ids, q_valid, inp, tgt, torch.zeros(2, cfg.n_frames))
    assert fl.shape == (2, cfg.n_frames) and torch.isfinite(loss)
    clips[:, :2] = 0  # another first tubelet: the frame logits read the video, they are not a fixed prior
    fl2 = model(model.encode(clips), q_ids, q_valid, inp, tgt, torch.zeros(2, cfg.n_frames))[2]
    assert (fl2 - fl).abs().max() > 1e-4
    with pytest.raises(mk.UserError, match="--frame_head"):
        mk.parse_args(["--train", "--frame_head", "conv"])
    if head == "keys":
        assert not hasattr(model.bridge, "frame_out") and model.bridge.frame_key.out_features == 2 * cfg.l_width
    else:
        assert not hasattr(model.bridge, "frame_key")


def test_mk_keys_frame_head_by_hand(tmp_path):
    """The "keys" frame head against a plain loop: each tubelet's tokens averaged over space, minus the clip's mean of
    those, make `per` frame keys; a frame's logit is the best temporal query's dot product with its key over sqrt(D),
    plus the frame's bias. So a vector added to every video token (a clip's background or lighting) moves no score."""
    cfg = _mk_tiny_cfg(tmp_path)  # 8 frames, tubelets of 2: 4 tubelets of 4x4 tokens, 2 keys each
    b = _mk_model(cfg)[0].bridge
    torch.manual_seed(0)
    with torch.no_grad():
        b.frame_bias.normal_()
        v, t = torch.randn(2, 4 * 16, cfg.l_width), torch.randn(2, cfg.n_temporal_query, cfg.l_width)
        got = b.frame_logits(v, t)
        want = torch.zeros(2, cfg.n_frames)
        for i in range(2):
            c = torch.stack([v[i, 16 * k:16 * (k + 1)].mean(0) for k in range(4)])  # (T, D) per tubelet
            keys = b.frame_key(c - c.mean(0)).reshape(8, cfg.l_width)  # frame f: tubelet f // 2, its frame f % 2
            for f in range(cfg.n_frames):
                want[i, f] = max(float(q @ keys[f]) for q in t[i]) / cfg.l_width ** 0.5 + b.frame_bias[f]
        assert torch.allclose(got, want, atol=1e-5)
        assert torch.allclose(b.frame_logits(v + torch.randn(cfg.l_width), t), got, atol=1e-5)


def test_mk_init_from_data_and_centring(tmp_path):
    """The data-dependent init folds one batch's statistics into initial weights: afterwards the bridge's video tokens
    are zero-mean / unit-variance per feature across clips and tokens, and each query row has zero mean across clips.
    A batch of one clip leaves the per-query fold alone (no spread to measure) instead of making NaN."""
    cfg = _mk_tiny_cfg(tmp_path)
    model, tok = _mk_model(cfg)
    assert model.centre and model.scratch_vision
    items = [dict(question="What happens to the red circle?", choices=["A. it appears", "B. it stops"],
                  answer="A. it appears")] * 6
    q_ids, q_valid, _, _ = mk.text_batch(items, tok)
    torch.manual_seed(0)
    clips = torch.full((6, cfg.n_frames, 32, 32, 3), 128, dtype=torch.uint8)
    clips[:, :, 8:20, 8:20] = torch.randint(0, 255, (6, cfg.n_frames, 1, 1, 3), dtype=torch.uint8)  # one object
    model.init_from_data(clips, q_ids, q_valid)
    b = model.bridge
    with torch.no_grad():
        v = b.video_tokens(model.encode(clips)).flatten(0, 1)  # (B*P, D)
        assert v.mean(0).abs().max() < 1e-3 and (v.std(0, correction=0) - 1).abs().max() < 0.05
        q = b.read(b.video_tokens(model.encode(clips)), model.embed(q_ids), q_valid) * b.q_scale + b.q_shift
        assert q.mean(0).abs().max() < 1e-3
    one, _ = _mk_model(cfg)
    one.init_from_data(clips[:1], q_ids[:1], q_valid[:1])
    assert all(torch.isfinite(p).all() for p in one.parameters())


def test_mk_checkpoint_encoder_is_not_centred(mk_hf, tmp_path):
    """Centring and the encoder fold are for the from-scratch encoder only: a loaded V-JEPA 2 sees HF's input."""
    cfg = _mk_tiny_cfg(tmp_path, vision_ckpt=str(mk_hf["root"] / "vjepa2"))
    model, _ = _mk_model(cfg)
    assert not model.centre and not model.scratch_vision
    clips = torch.randint(0, 255, (2, cfg.n_frames, 32, 32, 3), dtype=torch.uint8)
    with torch.no_grad():
        ref = mk_hf["vjepa2"].get_vision_features(mk.normalize(clips))
    assert (model.encode(clips) - ref).abs().max() < 1e-4


@pytest.mark.parametrize("n_frames,t,want", [(8, 2, list(range(8))), (5, 2, [0, 1, 2, 3, 3]),
                                             (9, 2, list(range(8)) + [7]), (3, 2, [0, 1, 1]),
                                             (8, 3, [0, 1, 2, 3, 4, 5, 5, 5]), (1, 2, [0])])
def test_mk_frame_to_key_map(tmp_path, n_frames, t, want):
    """Frame f reads key f (tubelet f // t, its frame f % t); a leftover frame the Conv3d dropped reads the last (the
    keys per tubelet are the tubelet's length: 8 frames of tubelets of 3 gave 4 keys each, frame 3 in tubelet 0)."""
    model, _ = _mk_model(_mk_tiny_cfg(tmp_path, n_frames=n_frames, v_tubelet=t))
    assert model.bridge.frame_to_key.tolist() == want
    assert model.bridge.frame_key.out_features == min(t, n_frames) * model.bridge.proj.out_features


def test_mk_grad_accumulation_equals_big_batch(tmp_path):
    cfg = _mk_tiny_cfg(tmp_path)
    model, tok = _mk_model(cfg, ["What happens to the red circle?\nA. it appears\nB. it stops the red circle"])
    items = [dict(question=q, choices=["A. it appears", "B. it stops the red circle"], answer=a) for q, a in
             (("What happens?", "A. it appears"), ("What happens to the red circle?", "B. it stops the red circle"))] * 2
    clips = torch.randint(0, 255, (4, cfg.n_frames, 32, 32, 3), dtype=torch.uint8)
    labels = torch.randint(0, 2, (4, cfg.n_frames)).float()

    def grads(groups):
        model.zero_grad()
        n_tok = sum(len(tok.target(it["answer"])) for it in items)  # answer tokens of the whole batch
        for g in groups:
            q_ids, q_valid, inp, tgt = mk.text_batch([items[i] for i in g], tok)
            _, loss, _ = model(model.encode(clips[g]), q_ids, q_valid, inp, tgt, labels[g], n_tok, 4)
            loss.backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    # uneven parts with answers of different lengths: the whole batch's counts keep the sum exact
    assert len(tok.target(items[0]["answer"])) != len(tok.target(items[1]["answer"]))
    big, acc = grads([[0, 1, 2, 3]]), grads([[0], [1, 2, 3]])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(big, acc))


# ---- data, video loading, metrics


def test_mk_sample_indices():
    assert mk.sample_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert mk.sample_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # short clips repeat
    times = np.array(mk.sample_indices(5, 8)) / 8  # [0, 0, 1, 2, 2, 3, 4, 4] / 8: every copy of frame 2 is support
    assert mk.frame_labels([0.25], times, 5 / 8, "x").tolist() == [0, 0, 0, 1, 1, 0, 0, 0]
    assert all(0 <= i < 100 for i in mk.sample_indices(100, 16)) and mk.sample_indices(100, 16) == sorted(mk.sample_indices(100, 16))


def test_mk_mp4_round_trip_and_frame_folder(tmp_path):
    rng = __import__("random").Random(0)
    frames, ann = mk.sample_event(rng, "train")
    path = str(tmp_path / "c.mp4")
    mk.write_clip(path, frames)
    clip, times, dur = mk.load_video(path, 8, 32)
    assert clip.shape == (8, 32, 32, 3) and clip.dtype == np.uint8 and dur == pytest.approx(2.0)
    assert times.tolist() == [i / 8 for i in mk.sample_indices(16, 8)]
    assert abs(clip.astype(float).mean() - 128) < 30  # grey background survived the codec
    folder = tmp_path / "frames"
    folder.mkdir()
    cap = cv2.VideoCapture(path)
    for i in range(16):
        ok, img = cap.read()
        cv2.imwrite(str(folder / f"{i}.png"), img)  # 0.png .. 15.png: read in natural order, 2 before 10
    clip2, _, _ = mk.load_video(str(folder), 8, 32)
    assert np.abs(clip2.astype(int) - clip.astype(int)).max() <= 1
    lab = mk.frame_labels(ann["support_times"], times, dur, "x")
    assert lab.sum() >= 2 and len(ann["choices"]) == 4 and ann["answer"] in ann["choices"]


def test_mk_span_of_a_clip_with_fewer_frames_than_n_frames():
    """A short clip repeats its frames to fill --n_frames: a supported frame spans its own time, not 1/F of the clip."""
    times = np.array([0, 0, 0, 0, 1, 1, 1, 1]) / 8  # 2 frames at 8 fps, sampled as 8
    assert mk.segment_from_scores([0.9] * 4 + [0.1] * 4, times, 0.25, 0.5) == (0.0, 0.125)
    assert mk.segment_from_scores([0.1] * 4 + [0.9] * 4, times, 0.25, 0.5) == (0.125, 0.25)
    assert mk.segment_from_scores([0.9] * 8, np.zeros(8), 0.125, 0.5) == (0.0, 0.125)  # a 1-frame clip: all of it


def test_mk_cut_off_jpeg_in_a_frame_folder_is_refused(tmp_path):
    """A frame folder of JPEGs loads; with one JPEG cut short (libjpeg would fill it with grey, silently) the folder is
    refused naming that file; data after a JPEG's end marker (a motion photo) is fine."""
    rng = np.random.default_rng(0)
    for i in range(4):
        cv2.imwrite(str(tmp_path / f"{i}.jpg"), rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
    whole = (tmp_path / "2.jpg").read_bytes()
    (tmp_path / "2.jpg").write_bytes(whole + b"\x00\x00\x00\x18ftypmp42" + bytes(64))
    assert mk.load_video(str(tmp_path), 4, 32)[0].shape == (4, 32, 32, 3)
    (tmp_path / "2.jpg").write_bytes(whole[:len(whole) * 6 // 10])
    assert cv2.imread(str(tmp_path / "2.jpg")) is not None  # OpenCV reads it without a word
    with pytest.raises(mk.UserError, match=r"2\.jpg: this image is cut off"):
        mk.load_video(str(tmp_path), 4, 32)


def test_mk_long_video_keeps_only_sampled_frames(tmp_path, monkeypatch):
    """A 300-frame clip: only the 8 sampled frames are resized and kept, with the pixels a whole decode gives."""
    path, r = str(tmp_path / "long.mp4"), np.random.default_rng(0)
    w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 30, (96, 64))
    for i in range(300):
        w.write(np.full((64, 96, 3), i % 256, np.uint8) + r.integers(0, 20, (64, 96, 3), dtype=np.uint8))
    w.release()
    cap, every = cv2.VideoCapture(path), []
    while cap.grab():
        every.append(cap.retrieve()[1])  # the whole clip decoded, BGR
    idx = mk.sample_indices(len(every), 8)
    want = np.stack([mk.preprocess(every[i], 32)[:, :, ::-1] for i in idx])
    seen = []
    real = mk.preprocess
    monkeypatch.setattr(mk, "preprocess", lambda img, crop: seen.append(1) or real(img, crop))
    clip, times, dur = mk.load_video(path, 8, 32)
    assert len(seen) == 8 and np.array_equal(clip, want)  # a loader that kept every frame resizes 300
    assert dur == pytest.approx(10.0) and times.tolist() == pytest.approx([i / 30 for i in idx])
    folder = tmp_path / "frames"  # a frame folder reads only its sampled images; a corrupt one is one clear line
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / f"f{i}.png"), every[i])
    (folder / "f9.png").write_bytes(b"not a png")  # f9 sorts after f3 in natural order: the last frame
    with pytest.raises(mk.UserError, match=r"f9\.png: OpenCV cannot decode this image"):  # named by its file
        mk.load_video(str(folder), 5, 32)
    assert mk.load_video(str(folder), 2, 32)[0].shape == (2, 32, 32, 3)  # frames 1 and 3 sampled: f9 never read


def test_mk_variable_frame_rate_video_times(tmp_path):
    """A phone records at a variable frame rate: a frame's time is its time stamp, not its index / fps. An mp4 whose
    first 20 frames last 1/60 s and next 20 last 1/20 s (OpenCV writes it at 30 fps; its time-to-sample table, stts,
    then gets two entries of the same total). A support time labels the frame shown at that moment."""
    path = str(tmp_path / "vfr.mp4")
    w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 30, (64, 48))
    for i in range(40):
        w.write(np.full((48, 64, 3), 6 * i, np.uint8))
    w.release()
    data, parents, i = bytearray(open(path, "rb").read()), [], 0
    while data[i + 4:i + 8] != b"stts":  # down moov/trak/mdia/minf/stbl (after the frames) to the stts box
        size, kind = struct.unpack(">I4s", data[i:i + 8])
        if kind in (b"moov", b"trak", b"mdia", b"minf", b"stbl"):
            parents, i = parents + [i], i + 8  # into the box
        else:
            i += size  # past it
    count, delta = struct.unpack(">II", data[i + 16:i + 24])  # one entry: 40 frames of 1/30 s
    assert (count, data[i + 12:i + 16]) == (40, struct.pack(">I", 1))
    body = struct.pack(">6I", 0, 2, 20, delta // 2, 20, delta * 3 // 2)  # 8 bytes longer: so are its parents
    data[i:i + 24] = struct.pack(">I4s", 8 + len(body), b"stts") + body
    for p in parents:
        data[p:p + 4] = struct.pack(">I", struct.unpack(">I", data[p:p + 4])[0] + 8)
    open(path, "wb").write(data)
    clip, times, dur = mk.load_video(path, 8, 32)  # frames 2, 7, 12, ..., 37
    real = [f / 60 if f < 20 else 1 / 3 + (f - 20) / 20 for f in range(2, 40, 5)]
    assert times == pytest.approx(real) and dur == pytest.approx(40 / 30)  # index / fps: 2/30, 7/30, ...
    assert clip[:, 0, 0, 0].tolist() == pytest.approx([6 * f for f in range(2, 40, 5)], abs=5)  # those frames
    assert mk.frame_labels([0.9], times, dur, "e").tolist() == [0, 0, 0, 0, 0, 0, 1, 0]  # 0.93 s, not frame 5 at 0.9


def _mk_textured(h, w, seed):
    """A natural-looking RGB frame: smooth colour fields, fine grain, filled boxes and ring edges."""
    r = np.random.default_rng(seed)
    img = cv2.resize(r.uniform(0, 255, (h // 16, w // 16, 3)).astype(np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
    img += r.normal(0, 25, (h, w, 3)).astype(np.float32)
    for _ in range(12):
        c, x, y = tuple(int(v) for v in r.integers(0, 256, 3)), int(r.integers(0, w)), int(r.integers(0, h))
        cv2.rectangle(img, (x, y), (x + int(r.integers(10, 80)), y + int(r.integers(10, 60))), c, -1)
        cv2.circle(img, (int(r.integers(0, w)), int(r.integers(0, h))), int(r.integers(5, 40)), c, 2)
    return np.clip(img, 0, 255).astype(np.uint8)


def test_mk_pixels_match_transformers_video_processor(tmp_path):
    """A 320x240 textured clip written by OpenCV, decoded by our loader, against transformers' V-JEPA 2 video
    processor before normalisation. VJEPA2VideoProcessor needs torchvision; where it cannot be built (no CPU
    torchvision wheel for this torch) the reference is the same steps through transformers' own functions: its
    shortest-edge size rule, its PIL-backend bilinear resize (which antialiased torchvision matches) and centre crop."""
    from transformers.image_transforms import center_crop, get_resize_output_image_size, resize
    from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
    from transformers.image_utils import ChannelDimension, PILImageResampling
    assert mk.MEAN.tolist() == pytest.approx(IMAGENET_DEFAULT_MEAN)
    assert mk.STD.tolist() == pytest.approx(IMAGENET_DEFAULT_STD)
    path = str(tmp_path / "clip.mp4")
    w, base = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 8, (320, 240)), _mk_textured(240, 400, 1)
    for t in range(6):  # the texture pans right 4 pixels a frame
        w.write(np.ascontiguousarray(base[:, 4 * t:4 * t + 320]))
    w.release()
    cap, frames = cv2.VideoCapture(path), []
    while (got := cap.read())[0]:
        frames.append(np.ascontiguousarray(got[1][:, :, ::-1]))  # RGB (240, 320, 3)
    assert len(frames) == 6
    for crop in (32, 256):
        ours = mk.load_video(path, 6, crop)[0].astype(np.float64)  # (6, crop, crop, 3), every frame
        try:
            from transformers import VJEPA2VideoProcessor
            proc = VJEPA2VideoProcessor(crop_size=crop)  # a placeholder that raises without torchvision
            x = proc(videos=[np.stack(frames)], return_tensors="pt")["pixel_values_videos"][0]  # (6, 3, crop, crop)
            want, ref = (x.permute(0, 2, 3, 1) * mk.STD * 255 + mk.MEAN * 255).numpy(), "VJEPA2VideoProcessor"
        except ImportError:
            size = get_resize_output_image_size(frames[0], int(crop * 256 / 224), default_to_square=False,
                                                input_data_format=ChannelDimension.LAST)
            want, ref = np.stack([center_crop(resize(f, size, resample=PILImageResampling.BILINEAR,
                                                     input_data_format=ChannelDimension.LAST), (crop, crop),
                                              input_data_format=ChannelDimension.LAST) for f in frames]), "PIL steps"
        diff = np.abs(ours - want).max()
        print(f"crop {crop} against {ref}: max pixel difference {diff:.3f}/255")
        assert ours.shape == want.shape and diff <= 2


def test_mk_centre_crop_of_an_odd_margin_truncates():
    """A margin of odd width (39 - 32 = 7 columns) leaves 3 on the left and 4 on the right, as transformers' center_crop
    does (torchvision rounds the other way); the frame needs no resize (its short side is already 32 * 256 / 224)."""
    from transformers.image_transforms import center_crop
    from transformers.image_utils import ChannelDimension
    img = np.zeros((36, 39, 3), np.uint8)
    img[:, :, 0], img[:, :, 1] = np.arange(39)[None, :], np.arange(36)[:, None]  # column and row index in each pixel
    ours = mk.preprocess(img, 32)
    assert ours[0, 0, :2].tolist() == [3, 2]  # left 3 (of 7), top 2 (of 4)
    assert np.array_equal(ours, center_crop(img, (32, 32), input_data_format=ChannelDimension.LAST))


def test_mk_frame_strip_colours_the_frames_above_the_threshold(tmp_path):
    # --predict's strip marks the frames its printed support span counts: those above --threshold, not above 0.5
    clip, path = np.full((3, 8, 8, 3), 128, np.uint8), str(tmp_path / "strip.png")
    mk.frame_strip(clip, [0.6, 0.95, 0.3], path, "A. x", 0.9)
    img = cv2.imread(path)
    bars = [tuple(img[64 + 33, i * 66 + 32]) for i in range(3)]  # the bottom row of each frame's saliency bar
    assert bars == [(150, 150, 150), (60, 180, 60), (150, 150, 150)]  # grey, green (0.95 > 0.9), grey

def test_mk_world_splits_hold_out_combinations():
    rng = __import__("random").Random(1)
    train = [mk.sample_event(rng, "train")[1] for _ in range(200)]
    novel = [mk.sample_event(rng, "novel")[1] for _ in range(50)]
    assert not any((a["colour"], a["event"]) in mk.HELD_OUT for a in train)
    assert all((a["colour"], a["event"]) in mk.HELD_OUT for a in novel)
    assert {a["answer"][0] for a in train} == set("ABCD") and {a["event"] for a in train} == set(mk.EVENTS)


def test_mk_metrics_hand_computed():
    assert mk.extract_option("C. it stops") == "C" and mk.extract_option("C.") == "C"
    assert mk.extract_option("it stops") is None and mk.extract_option("CC. x") is None and mk.extract_option("C it") is None
    assert mk.mcq_accuracy(["A. x", "B. y", "the answer is C", "D."], ["A. x", "C. z", "C. z", "D. w"]) == 0.5
    # frames: tp=3, fp=1, fn=1 -> F1 = 6/8
    assert mk.frame_f1([[1, 1, 0, 0], [0, 1, 1, 0]], [[1, 1, 0, 0], [0, 0, 1, 1]]) == 0.75
    assert mk.temporal_iou((0, 2), (1, 3)) == pytest.approx(1 / 3) and mk.temporal_iou((0, 1), (2, 3)) == 0
    g = mk.grounding_metrics([(0, 2), (0, 1), (5, 6)], [(1, 3), (0, 1), (0, 1)])  # IoUs 1/3, 1, 0
    assert g["r1_iou0.3"] == pytest.approx(2 / 3) and g["r1_iou0.5"] == pytest.approx(1 / 3)
    assert g["r1_iou0.7"] == pytest.approx(1 / 3) and g["miou"] == pytest.approx(4 / 9)
    times = np.arange(8) / 4  # 8 frames over 2 s
    assert mk.segment_from_scores([0, 0.9, 0.2, 0.8, 0.9, 0.7, 0, 0], times, 2.0, 0.5) == (0.75, 1.5)
    assert mk.segment_from_scores([0.9, 0.9, 0, 0.6, 0.7, 0, 0, 0], times, 2.0, 0.5) == (0.0, 0.5)  # a tie: the first
    assert mk.segment_from_scores([0.1, 0.3, 0.2, 0, 0, 0, 0, 0], times, 2.0, 0.5) == (0.25, 0.5)



def test_mk_metrics_at_their_edges_schedule_and_batch_order(tmp_path):
    """Frame F1 with more misses than false alarms (tp 1, fp 0, fn 2 -> 2/4); an IoU exactly at a threshold counts
    (R@1 is IoU >= t); a support time at the clip's very end labels its last frame; the learning rate by hand;
    every epoch a new order of all the clips; weight decay on matrices only; a score at the threshold is not in the
    span; a video whose last fifth does not decode refused."""
    assert mk.frame_f1([[1, 0, 0, 0]], [[1, 1, 1, 0]]) == 0.5
    g = mk.grounding_metrics([(0, 1), (0, 1)], [(0, 2), (0, 1)])  # IoUs 0.5 and 1
    assert g["r1_iou0.5"] == 1.0 and g["r1_iou0.7"] == 0.5
    assert mk.frame_labels([2.0], np.arange(8) / 4, 2.0, "x").tolist() == [0] * 7 + [1]
    cfg = dataclasses.replace(mk.Config(), lr=1.0, min_lr=0.1, warmup_frac=0.2, max_steps=20)  # 4 warmup steps
    assert [mk.lr_at(s, cfg) for s in (0, 3, 4, 12, 20)] == pytest.approx([0.25, 1.0, 1.0, 0.55, 0.1])
    epochs = [torch.cat([mk.global_batch(s, 10, 5, 0) for s in (2 * e, 2 * e + 1)]).tolist() for e in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(10)) and epochs[0] != epochs[1]
    # decay on a Linear's weight alone: not its bias, an embedding table, or a 2-D gain such as the per-query scale
    model = torch.nn.ModuleDict(dict(lin=torch.nn.Linear(2, 2), emb=torch.nn.Embedding(3, 2)))
    model.gain, model.devices = torch.nn.Parameter(torch.ones(3, 2)), {"llm": "cpu"}
    groups = mk.make_optimizer(model, cfg)[0]
    assert [({id(p) for p in g["params"]}, g["weight_decay"]) for g in groups.param_groups] == [
        ({id(model.lin.weight)}, cfg.weight_decay), ({id(model.lin.bias), id(model.emb.weight), id(model.gain)}, 0.0)]
    times = np.arange(4) / 4  # a score at the threshold is not above it: the span is frames 1-2 alone
    assert mk.segment_from_scores([0.5, 0.9, 0.9, 0.5], times, 1.0, 0.5) == (0.25, 0.75)
    check_cut_off_video(mk, tmp_path, keep=0.8)


def test_mk_sampling_temperature_and_the_val_loss_weighting():
    """Sampling at temperature 2 draws from softmax(logits / 2) (a stub LLM with fixed logits, 20000 rows at once);
    the val column weights each batch's mean loss by its clips (a stub model whose loss is the mean clip index)."""
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0])
    llm = lambda x, pos, valid, last_only: logits.expand(x.shape[0], 1, 4)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    embed = lambda ids: torch.zeros(*ids.shape, 2)  # noqa: E731  # (B, 1) -> (B, 1, D)
    x, valid = torch.zeros(20000, 1, 2), torch.ones(20000, 1, dtype=torch.bool)  # 20000 one-token prompts
    ids = mk.llm_generate(llm, embed, x, valid, 99, 1, temperature=2.0, use_cache=False, generator=g)  # EOS 99: none
    freq = torch.bincount(torch.tensor(ids)[:, 0], minlength=4) / 20000.0
    assert torch.allclose(freq, (logits / 2).softmax(-1), atol=0.015)

    class ClipIndex(torch.nn.Module):  # the loss of a batch: the mean of its clip indices
        devices = {"llm": "cpu"}
        def forward(self, feats, *text_and_labels):
            return None, feats.mean(), None
    item = dict(question="What happens?", choices=["A. x", "B. y"], answer="A. x")
    cfg = dataclasses.replace(mk.Config(), batch_size=2, dtype="float32")
    split = ([item] * 5, dict(clips=torch.zeros(5), labels=torch.zeros(5, 2)))
    cache = lambda s, idx, clips: idx.float()  # noqa: E731
    assert mk.val_loss(ClipIndex(), mk.GPT2Tokenizer(), cfg, split, cache) == pytest.approx(2.0)  # (0.5*2+2.5*2+4)/5



def test_mk_feature_cache_only_for_a_frozen_encoder():
    """--feature_cache keeps a frozen encoder's features (computed once); a trainable encoder's are computed anew each
    time, with their graph (cached ones would be stale after a step and give the encoder no gradient)."""
    w, clips, idx = torch.ones(1, requires_grad=True), torch.ones(2, 3), torch.tensor([0, 1])
    encode = lambda c: c * w  # noqa: E731  # a one-weight "encoder"
    trainable = mk.FeatureCache(types.SimpleNamespace(frozen=set(), encode=encode), True)
    frozen = mk.FeatureCache(types.SimpleNamespace(frozen={"vision"}, encode=encode), True)
    assert trainable("train", idx, clips).requires_grad and frozen("train", idx, clips).tolist() == [[1.0] * 3] * 2
    with torch.no_grad():
        w += 1  # an optimizer step
    assert trainable("train", idx, clips).tolist() == [[2.0] * 3] * 2  # the new weights
    assert frozen("train", idx, clips).tolist() == [[1.0] * 3] * 2  # the cached features
    assert frozen("val", idx, clips * 3).tolist() == [[6.0] * 3] * 2  # val clip i is not train clip i (w is 2)


def test_mk_a_row_that_ended_stays_ended_and_positions_go_on_by_one():
    """Batched decoding: a row that produced EOS keeps it (its answer ends there) while the others go on, and each
    new token sits one position after the row's last, with and without the cache (a stub LLM that notes the last
    positions: row 0 says EOS first, then 5; row 1 says 5)."""
    def llm(x, pos, valid, cache=None, last_only=True):  # (B, L, D) -> (B, 1, V)
        seen.append(pos[:, -1].tolist())
        first = (pos[:, -1:, None] == 0) & torch.tensor([True, False])[:, None, None]  # row 0's first step
        return torch.where(first, torch.eye(8)[7], torch.eye(8)[5])
    llm.model = types.SimpleNamespace(layers=[])  # no layers: an empty cache
    embed = lambda ids: torch.zeros(*ids.shape, 2)  # noqa: E731  # (B, 1) -> (B, 1, D)
    x, valid = torch.zeros(2, 2, 2), torch.tensor([[False, True], [True, True]])  # prompts of 1 and 2 tokens
    for use_cache in (True, False):
        seen = []
        assert mk.llm_generate(llm, embed, x, valid, 7, 3, use_cache=use_cache) == [[], [5, 5, 5]]
        assert seen == [[0, 1], [1, 2], [2, 3]]  # the prompt's last positions, then each new token's


def test_mk_a_frame_scored_at_the_threshold_is_not_predicted(tmp_path, monkeypatch):
    """A frame scored exactly at the threshold (logit 0, sigmoid 0.5) is not predicted, as in the span: frame F1 0,
    not 2/3 (a stub generate: frame logits 0 for a clip whose first frame is the support)."""
    tok, item = mk.GPT2Tokenizer(), dict(question="When?", choices=["A. x", "B. y"], answer="A. x", support_times=[0])
    monkeypatch.setattr(mk, "generate", lambda model, feats, items, tok, cfg: ([[]] * len(items), torch.zeros(1, 2)))
    ds = dict(clips=torch.zeros(1), labels=torch.tensor([[1.0, 0.0]]), times=[np.array([0.0, 0.5])], durations=[1.0])
    cfg = dataclasses.replace(mk.Config(), out_dir=str(tmp_path), dtype="float32", threshold=0.5)
    model = types.SimpleNamespace(eval=lambda: None, devices={"llm": "cpu"})
    res = mk.evaluate(model, tok, cfg, {"test": ([item], ds)}, 1.0, cache=lambda s, idx, clips: None)
    assert res["test"]["frame_f1"] == 0.0


def test_mk_an_answer_ending_in_a_space_is_matched_by_itself(tmp_path, monkeypatch):
    """Generated answers are decoded and trimmed, so a reference answer ending in a space ("A. yes ", which the choices
    allow) is trimmed too: generated exactly, it scored exact match 0 beside an MCQ accuracy of 1."""
    tok, item = mk.GPT2Tokenizer(), dict(question="Dark?", choices=["A. yes ", "B. no"], answer="A. yes ", support_times=[])
    monkeypatch.setattr(mk, "generate", lambda model, feats, items, t, cfg: (
        [tok.target(i["answer"])[:-1] for i in items], torch.zeros(len(items), 2)))  # the answer's tokens, no EOS
    ds = dict(clips=torch.zeros(1), labels=torch.zeros(1, 2), times=[np.array([0.0, 0.5])], durations=[1.0])
    cfg = dataclasses.replace(mk.Config(), out_dir=str(tmp_path), dtype="float32")
    model = types.SimpleNamespace(eval=lambda: None, devices={"llm": "cpu"})
    res = mk.evaluate(model, tok, cfg, {"test": ([item], ds)}, 1.0, cache=lambda s, idx, clips: None)
    assert res["test"]["exact_match"] == res["test"]["mcq_accuracy"] == 1.0


def test_mk_user_data_holds_its_test_rows_out_of_training(mk_trained, tmp_path, monkeypatch):
    """--data without --test_data: the entries whose video path and question draw at most 0.1 (at least one) are the
    test split, and none of those trains, however the file is later edited; the synthetic world's splits are not
    copies of one another."""
    d, _ = mk_trained
    (tmp_path / "world").symlink_to(d / "data")  # relative paths: the draws do not depend on where d is
    items = [{**it, "question": f"q{i}?", "video": "world/" + it["video"]}
             for i, it in enumerate(json.load(open(d / "data" / "train.json"))[:11])]
    (tmp_path / "mine.json").write_text(json.dumps(items))
    data = mk.prepare_data(_mk_tiny_cfg(tmp_path, data=str(tmp_path / "mine.json")), splits=("train", "test"))
    train, test = ({e["question"] for e in data[s][0]} for s in ("train", "test"))
    assert test == {"q4?", "q8?"} and len(train) == 9 and not train & test
    monkeypatch.setattr(mk, "load_split", lambda *a: None)  # no decoding: names only
    video = str(tmp_path / items[0]["video"])  # one video, a question per name: an entry is its path and question
    text = lambda names, _: json.dumps([{**items[0], "video": video, "question": n} for n in names])

    def split(folder):
        data = mk.prepare_data(_mk_tiny_cfg(folder, data=str(folder / "a.json")), splits=("train", "test"))
        return [[e["question"] for e in data[s][0]] for s in ("train", "test")]
    _held_out_by_path(tmp_path, "a.json", "", text, split)
    first = [json.load(open(d / "data" / f"{s}.json"))[0] for s in ("train", "val", "test")]  # the synthetic world:
    first = [{k: v for k, v in e.items() if k != "video"} for e in first]  # each split its own random stream
    assert first[0] != first[1] != first[2] != first[0]

def test_mk_a_save_writes_whole_files_and_drops_the_old_score(mk_trained, tmp_path, monkeypatch):
    """Into a finished run: a save that dies while writing the weights leaves the old file whole (a temporary file,
    then a rename); a save that completes removes eval.json, which scored the old weights (an extended run stopped
    by --stop_after has no new score yet)."""
    out = tmp_path / "run"
    shutil.copytree(mk_trained[0] / "out", out)
    assert (out / "eval.json").is_file()
    model, tok, cfg = mk.load_checkpoint(str(out))
    opt, _, scaler = mk.make_optimizer(model, cfg)
    before = (out / "model.safetensors").read_bytes()
    save_file_dies_halfway(mk, monkeypatch)
    with pytest.raises(OSError):
        mk.save_checkpoint(model, tok, cfg, opt, 9, scaler)
    assert (out / "model.safetensors").read_bytes() == before and (out / "eval.json").is_file()
    monkeypatch.undo()
    mk.save_checkpoint(model, tok, cfg, opt, 9, scaler)
    assert not (out / "eval.json").exists() and torch.load(out / "train_state.pt")["step"] == 9

# ---- command line: train, resume, eval, predict, bench, DDP, bad input


@pytest.fixture(scope="module")
def mk_trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("mk_run")
    proc = run_script("mark1.py", "--train", "--preset", "tiny", "--data_dir", d / "data", "--out_dir", d / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d, proc


def test_mk_train_tiny_writes_checkpoint_and_eval(mk_trained):
    d, proc = mk_trained
    for f in ("model.safetensors", "config.json", "train_state.pt", "eval.json"):
        assert (d / "out" / f).is_file()
    ev = json.load(open(d / "out" / "eval.json"))
    for split in ("test", "novel"):
        for k in ("n", "mcq_accuracy", "frame_f1", "miou", "r1_iou0.3", "r1_iou0.5", "r1_iou0.7", "samples"):
            assert k in ev[split]
        assert 0 <= ev[split]["mcq_accuracy"] <= 1 and ev[split]["n"] == 12
    assert "train_seconds" in ev and "step 6/6" in proc.stdout
    check_val_column(proc.stdout, eval_interval=4, max_steps=6)  # the tiny preset logs every 2 steps
    anns = json.load(open(d / "data" / "train.json"))
    assert len(anns) == 48 and os.path.isfile(d / "data" / anns[0]["video"])


def test_mk_checkpoint_round_trip(mk_trained, tmp_path):
    d, _ = mk_trained
    model, tok, cfg = mk.load_checkpoint(str(d / "out"))
    state = load_file(str(d / "out" / "model.safetensors"))
    for k, v in state.items():
        assert torch.equal(model.state_dict()[k], v)
    assert model.llm.lm_head.weight is model.llm.model.embed_tokens.weight
    shutil.copytree(d / "out", tmp_path / "cut")
    state.pop("vision.layernorm.weight")
    state["bridge.frame_bias"] = torch.zeros(4)  # shapes are checked before anything loads, not only key names
    save_file(state, str(tmp_path / "cut" / "model.safetensors"))
    with pytest.raises(mk.UserError, match=r"missing \['vision.layernorm.weight'\].*bridge.frame_bias \[4\] \(model \[8\]"):
        mk.load_checkpoint(str(tmp_path / "cut"))
    (tmp_path / "other").mkdir()
    json.dump({"script": "vit_caption", "config": {}}, open(tmp_path / "other" / "config.json", "w"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other" / "model.safetensors"))
    with pytest.raises(mk.UserError, match="vit_caption"):
        mk.load_checkpoint(str(tmp_path / "other"))


def test_mk_printed_config_is_the_one_that_runs(mk_trained, tmp_path, capsys):
    """--eval, --predict and --resume run the saved config: that one is printed, not the preset's defaults; --train
    (which wins over --eval) prints its own once."""
    d, _ = mk_trained
    for argv in (["--eval", "--out_dir", d / "out"], ["--train", "--eval", "--preset", "tiny", "--max_steps", "2",
                                                      "--out_dir", tmp_path / "t"]):
        mk.main([str(a) for a in argv + ["--data_dir", d / "data"]])
        printed = [json.loads(l[8:]) for l in capsys.readouterr().out.splitlines() if l.startswith("config: ")]
        assert len(printed) == 1 and printed[0]["n_frames"] == 8 and printed[0]["max_steps"] in (6, 2)


def test_mk_train_clips_the_gradient(mk_trained, tmp_path, monkeypatch):
    """AdamW steps with gradients of global norm --grad_clip when they are longer (1e-3: far below the tiny run's)."""
    norms, make = [], mk.make_optimizer

    def spy(model, cfg):  # the real optimizer, which notes the gradients' norm before each step
        opt, params, scaler = make(model, cfg)
        opt.register_step_pre_hook(lambda o, args, kwargs: norms.append(torch.stack(
            [p.grad.norm() for g in o.param_groups for p in g["params"] if p.grad is not None]).norm().item()))
        return opt, params, scaler
    monkeypatch.setattr(mk, "make_optimizer", spy)
    mk.train(_mk_tiny_cfg(tmp_path, data_dir=str(mk_trained[0] / "data"), grad_clip=1e-3, stop_after=1))
    assert norms == pytest.approx([1e-3], rel=1e-3)


def test_mk_exact_resume(mk_trained, tmp_path, capsys):
    """3 steps, stop, resume for 3 more (in-process, from the files alone) == the fixture's 6 steps in one process;
    eval.json's train_seconds counts the time saved before the resume too."""
    d, _ = mk_trained
    args = ["--train", "--preset", "tiny", "--data_dir", d / "data", "--out_dir", tmp_path / "r"]
    mk.main([str(a) for a in args] + ["--stop_after", "3"])
    hint = capsys.readouterr().out.split("stopped after step 3 as asked; go on with ", 1)[1].splitlines()[0]
    resume = shlex.split(hint)  # the command it prints, as typed: the sizes and the data are the checkpoint's
    assert resume == ["--train", "--resume", "--out_dir", str(tmp_path / "r")]
    ts = torch.load(tmp_path / "r" / "train_state.pt", weights_only=True)  # the time so far: --resume adds to it
    assert 0 < ts["seconds"] < 600
    torch.save({**ts, "seconds": ts["seconds"] + 1000}, tmp_path / "r" / "train_state.pt")  # as if 1000 s longer
    mk.main(resume)
    assert "resumed at step 3" in capsys.readouterr().out
    assert json.load(open(tmp_path / "r" / "eval.json"))["train_seconds"] >= ts["seconds"] + 1000  # the whole run's
    with pytest.raises(mk.UserError, match="l_width=32; --resume cannot change it"):  # the saved architecture wins
        mk.main(resume + ["--l_width", "64"])
    with pytest.raises(mk.UserError, match="--preset tiny: --resume, --eval and --predict take the sizes"):
        mk.main(resume + ["--preset", "tiny"])
    a, b = load_file(str(d / "out" / "model.safetensors")), load_file(str(tmp_path / "r" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mk_resume_with_no_steps_left_is_refused(mk_trained, tmp_path):
    """--resume of a run already at --max_steps (the saved one, or a typed one at or below the saved step) would train
    nothing and evaluate, and a --stop_after at or below it nothing at all: refused before any data is built, naming
    the step and the fix; nothing in the folder changes."""
    out, unbuilt = tmp_path / "out", tmp_path / "unbuilt"
    shutil.copytree(mk_trained[0] / "out", out)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    for steps in ([], ["--max_steps", "6"], ["--max_steps", "4"]):  # the shared run ended at step 6 of 6
        with pytest.raises(mk.UserError, match=re.escape(f"{out}: at step 6 already; pass a larger --max_steps")):
            mk.main(["--train", "--resume", "--out_dir", str(out), "--data_dir", str(unbuilt), *steps])
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before and not unbuilt.exists()
    cut = tmp_path / "cut"  # stopped at step 3: the same command again with --resume would stop where it stands
    mk.main([str(a) for a in ("--train", "--preset", "tiny", "--data_dir", mk_trained[0] / "data", "--out_dir", cut,
                              "--stop_after", 3)])
    before = {f.name: f.read_bytes() for f in cut.iterdir()}
    for stop in ("3", "2"):
        with pytest.raises(mk.UserError, match=re.escape(f"{cut}: at step 3 already; pass a larger --stop_after than "
                                                         f"{stop} or drop it")):
            mk.main(["--train", "--resume", "--out_dir", str(cut), "--stop_after", stop])
    assert {f.name: f.read_bytes() for f in cut.iterdir()} == before


def test_mk_save_cut_off_before_train_state_refuses_resume(mk_trained, tmp_path, monkeypatch):
    """A save stopped after the new weights but before the new train_state.pt: --resume refuses (the older state would
    go on from its step with the newer weights), in one line."""
    d, r = mk_trained[0], str(tmp_path / "r")
    mk.main(["--train", "--preset", "tiny", "--data_dir", str(d / "data"), "--out_dir", r, "--stop_after", "2"])
    resume_with_a_save_cut_off(mk.main, monkeypatch, r)
    with pytest.raises(mk.UserError, match="train_state.pt: nothing to resume"):
        mk.main(["--train", "--resume", "--out_dir", r])


def test_mk_eval_and_predict_cli(mk_trained, tmp_path, capsys, monkeypatch):
    d, _ = mk_trained
    out = d / "out"
    graphs, generate = [], mk.generate  # the features generate reads: computed without a graph (no_grad) each time
    monkeypatch.setattr(mk, "generate", lambda model, feats, *a: graphs.append(feats.requires_grad) or generate(
        model, feats, *a))
    mk.main(["--eval", "--out_dir", str(out), "--data_dir", str(d / "data")])
    assert "mcq" in capsys.readouterr().out
    # --test_data without --data replaces the world's test split; --eval decodes only test and novel
    anns = json.load(open(d / "data" / "test.json"))[:3]
    json.dump([{**a, "video": str(d / "data" / a["video"])} for a in anns], open(tmp_path / "t.json", "w"))
    shutil.copytree(out, tmp_path / "o")
    decoded, load_split = [], mk.load_split
    monkeypatch.setattr(mk, "load_split", lambda e, cfg: decoded.append(len(e)) or load_split(e, cfg))
    mk.main(["--eval", "--out_dir", str(tmp_path / "o"), "--data_dir", str(d / "data"), "--test_data", str(tmp_path / "t.json")])
    ev = json.load(open(tmp_path / "o" / "eval.json"))
    assert ev["test"]["n"] == ev["test"]["n_localised"] == 3 and ev["novel"]["n"] == 12 and sorted(decoded) == [3, 12]
    assert ev["config"]["test_data"] == str(tmp_path / "t.json")  # eval.json records what it scored
    assert ev["train_seconds"] == json.load(open(out / "eval.json"))["train_seconds"] > 0  # --eval keeps training's
    # support_times is optional: a clip without it has nothing to localise against, so it counts in no frame metric
    json.dump([{k: v for k, v in a.items() if k != "support_times"} for a in json.load(open(tmp_path / "t.json"))],
              open(tmp_path / "t.json", "w"))
    mk.main(["--eval", "--out_dir", str(tmp_path / "o"), "--test_data", str(tmp_path / "t.json")])
    ev = json.load(open(tmp_path / "o" / "eval.json"))["test"]
    assert ev["n"] == 3 and ev["n_localised"] == 0 and ev["frame_f1"] is ev["miou"] is ev["r1_iou0.3"] is None
    assert "frame_f1 n/a | miou n/a | r1_iou0.3 n/a" in capsys.readouterr().out  # not measured: not a 0.000 score
    bgra = np.zeros((8, 8, 4), np.uint8)
    bgra[..., 2], bgra[..., 3] = 200, 0  # red, fully transparent: composited onto white, as the other scripts do
    cv2.imwrite(str(tmp_path / "t.png"), bgra)
    assert (mk.read_frame(str(tmp_path / "t.png")) == 255).all()
    video = d / "data" / json.load(open(d / "data" / "test.json"))[0]["video"]
    question = "What happens to the red circle?"
    choices = "A. it appears|B. it stops|C. it turns blue|D. it meets the green square"
    mk.main(["--predict", "--out_dir", str(out), "--video", str(video), "--question", question, "--choices", choices])
    assert len(graphs) > 2 and not any(graphs), graphs  # --eval's batches of test and novel, then --predict's clip
    stdout = capsys.readouterr().out
    # the printed answer and frame saliencies are those of the saved model on this clip and question
    model, tok, cfg = mk.load_checkpoint(str(out))
    clip = torch.from_numpy(mk.load_video(str(video), cfg.n_frames, cfg.crop)[0])[None]
    ids, fl = mk.generate(model.eval(), model.encode(clip), [dict(question=question, choices=choices.split("|"))],
                          tok, cfg)
    answer = tok.decode(ids[0]).strip()  # the tiny model's is no choice: it is marked so
    assert f"answer: {answer}" + " (not a choice)" * (answer not in choices.split("|")) + "\n" in stdout
    for said, shown in ((" A. it appears", "A. it appears\n"), (" E. none", "E. none (not a choice)\n")):
        with monkeypatch.context() as m:  # a model that answers one of the choices, then one that answers none
            m.setattr(mk.GPT2Tokenizer, "decode", lambda self, ids: said)
            mk.main(["--predict", "--out_dir", str(out), "--video", str(video), "--question", question, "--choices",
                     choices])
        assert f"answer: {shown}" in capsys.readouterr().out
    assert f"saliency per frame: {' '.join(f'{s:.2f}' for s in torch.sigmoid(fl.float())[0].tolist())}\n" in stdout
    img = cv2.imread(str(out / "predict.png"))
    assert img is not None and img.shape[1] == 8 * 66


def test_mk_ddp_two_processes_match_one(mk_trained, tmp_path, capsys):
    """torchrun with 2 gloo processes of 2 micro-batches of 16 follows one process of batch 48, the whole training set:
    the global batch (48 < 2 x 2 x 16) leaves rank 1's last micro-batch empty, and answers differ in length. The
    logged gradient norms match too: AdamW and clipping would hide a gradient off by a constant factor."""
    d, _ = mk_trained
    cfg = _mk_tiny_cfg(tmp_path, data_dir=str(d / "data"), out_dir=str(tmp_path / "one"), batch_size=48, max_steps=3,
                       log_interval=1)
    mk.train(cfg)
    norms = lambda out: [float(l.split("grad norm ")[1].split()[0]) for l in out.splitlines() if l.startswith("step ")]
    single = norms(capsys.readouterr().out)
    p = run_torchrun("mark1.py", "--train", "--preset", "tiny", "--max_steps", "3", "--batch_size", "16",
                     "--grad_accum", "2", "--log_interval", "1", "--data_dir", d / "data", "--out_dir",
                     tmp_path / "ddp", "--device", "cpu")
    assert p.returncode == 0, p.stderr[-3000:]
    assert "DistributedDataParallel: 2 processes (gloo), 64 clips per step" in p.stdout  # the real wrapper's name
    assert p.stdout.count("step 3/3") == 1 and (tmp_path / "ddp" / "eval.json").is_file()  # rank 0 alone
    one, ddp = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("one", "ddp"))
    assert one.keys() == ddp.keys() and not any(k.startswith("module.") for k in ddp)
    for k in one:  # float noise only (Adam magnifies it where a gradient is near zero)
        torch.testing.assert_close(ddp[k], one[k], atol=2e-5, rtol=1e-4, msg=k)
    assert len(single) == 3 and norms(p.stdout) == pytest.approx(single, rel=1e-3)
    with pytest.raises(mk.UserError, match=r"trained at global batch 64 \(batch_size\*grad_accum\*processes\), not 32"):
        mk.main(["--train", "--resume", "--out_dir", str(tmp_path / "ddp"), "--max_steps", "4"])  # one process: half


def _mk_user_error(argv, *needles):
    """Bad input through main(argv) in-process: a UserError whose one line names every needle."""
    with pytest.raises(mk.UserError) as e:
        mk.main([str(a) for a in argv])
    assert "\n" not in str(e.value) and all(n in str(e.value) for n in needles), str(e.value)


def test_mk_bad_inputs(mk_trained, tmp_path, monkeypatch, capsys):
    d, _ = mk_trained
    out = d / "out"
    ch = "A. it appears|B. it stops"
    # once through the command line: exit status 2, one line on stderr (OpenCV's own log silenced), no traceback
    monkeypatch.delenv("OPENCV_LOG_LEVEL", raising=False)  # as a user's shell has it (the other scripts set it here)
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "f0.png").write_bytes(b"\x89PNG\r\n\x1a\nxxxx\0\0\0\0IEND\xaeB`\x82")  # no IHDR chunk
    proc = run_script("mark1.py", "--predict", "--out_dir", out, "--video", tmp_path / "frames", "--question", "q",
                      "--choices", ch)
    assert_user_error(proc, "f0.png: OpenCV cannot decode this image")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    w = cv2.VideoWriter(str(tmp_path / "zero.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 8, (48, 48))
    w.release()  # a real mp4 container that holds zero frames
    (tmp_path / "junk.mp4").write_bytes(b"not a video at all")
    for name in ("zero.mp4", "junk.mp4"):
        _mk_user_error(["--predict", "--out_dir", out, "--video", tmp_path / name, "--question", "q", "--choices", ch],
                       name, "no frames")
    video = d / "data" / "test" / "00000.mp4"
    _mk_user_error(["--predict", "--out_dir", out, "--video", video, "--question", "q", "--choices",
                    "it appears|it stops"], "--choices", "A. text")
    _mk_user_error(["--predict", "--out_dir", out, "--video", video, "--question", "  ", "--choices", ch],
                   "--predict needs", "--question TEXT")  # a blank question too
    ask = ["--video", video, "--question", "q", "--choices", ch]
    for mode, media in (("--eval", []), ("--predict", ask)):  # an architecture flag is refused; a decoding flag is not
        _mk_user_error([mode, "--out_dir", out, "--n_frames", "4", "--top_k", "3", *media], "n_frames=8", f"{mode} cannot")
    _mk_user_error(["--eval", "--out_dir", out, *ask], "--video: only --predict reads it")  # not ignored
    if not torch.cuda.is_available():  # a device this machine lacks: one line in every mode (it was a traceback)
        for mode, media in (("--eval", []), ("--predict", ask)):
            _mk_user_error([mode, "--out_dir", out, "--device", "cuda", *media], "device 'cuda' does not exist here")
        shutil.copytree(out, moved := tmp_path / "moved")  # a run trained with a --device_map of two GPUs
        meta = json.load(open(moved / "config.json"))
        json.dump({**meta, "config": {**meta["config"], "device_map": "vision=cuda:0,llm=cuda:1"}},
                  open(moved / "config.json", "w"))
        _mk_user_error(["--predict", "--out_dir", moved, *ask], "vision: device 'cuda:0'", "--device_map '' puts every")
        mk.main(["--predict", "--out_dir", str(moved), "--device_map", "", *map(str, ask)])  # '': all on --device
        assert "answer: " in capsys.readouterr().out
    assert not mk.PRESETS["bench"]["data_dir"].startswith(mk.Config.data_dir + "/")  # a bench world inside the
    # default one made that folder one the default --train refuses to write into (no world.json of its own)
    with pytest.raises(SystemExit) as e:  # argparse refuses an unknown preset itself (its one line on stderr), exit 2
        mk.main(["--train", "--preset", "nope"])
    assert e.value.code == 2 and "--preset: invalid choice: 'nope'" in capsys.readouterr().err.strip().splitlines()[-1]
    o = tmp_path / "o"
    _mk_user_error(["--train", "--preset", "tiny", "--device_map", "vision=cuda:7", "--out_dir", o], "cuda:7",
                   "does not exist")
    _mk_user_error(["--eval", "--out_dir", tmp_path / "empty"], "no checkpoint")
    (tmp_path / "empty").mkdir()  # a frame folder without images: the message names the extensions read
    _mk_user_error(["--predict", "--out_dir", out, "--video", tmp_path / "empty", "--question", "q", "--choices", ch],
                   "no frames", ".png/.jpg/.jpeg/.bmp")
    (tmp_path / "bad").mkdir()
    shutil.copy(out / "config.json", tmp_path / "bad" / "config.json")
    (tmp_path / "bad" / "model.safetensors").write_bytes(b"\x10\x00garbage")
    _mk_user_error(["--eval", "--out_dir", tmp_path / "bad"], "model.safetensors", "unreadable")
    _mk_user_error(["--train", "--preset", "tiny", "--vision_ckpt", out, "--out_dir", o], "model_type", "vjepa2")
    # user annotation files: support time outside the clip, malformed choices, bad JSON
    ann = [dict(video=str(video), question="q?", choices=["A. x", "B. y"], answer="A. x", support_times=[0.5])] * 2
    ann[1] = {**ann[1], "question": "r?", "support_times": [9.5]}  # another question: not held out with entry 1
    json.dump(ann, open(tmp_path / "a.json", "w"))
    _mk_user_error(["--train", "--preset", "tiny", "--data", tmp_path / "a.json", "--out_dir", o], "entry 2",
                   "outside the clip")
    ann[0] = {**ann[0], "choices": ["A. x", "C. y"]}
    json.dump(ann, open(tmp_path / "b.json", "w"))
    _mk_user_error(["--train", "--preset", "tiny", "--data", tmp_path / "b.json", "--out_dir", o], "entry 1", "B. text")
    for bad in ({"video": 5}, {"question": 12}, {"question": "  "}):  # not a string, or blank (--predict's rule too)
        json.dump([{**ann[1], **bad}], open(tmp_path / "d.json", "w"))
        _mk_user_error(["--train", "--preset", "tiny", "--data", tmp_path / "d.json", "--out_dir", o], "entry 1", "(text)")
    (tmp_path / "c.json").write_text("[{")
    _mk_user_error(["--train", "--preset", "tiny", "--data", tmp_path / "c.json", "--out_dir", o], "not valid JSON")
    # a video in an annotation file that is missing, not a video or a folder without frames: named by its entry too
    good, v = dict(video=str(video), question="q?", choices=["A. x", "B. y"], answer="A. x"), tmp_path / "v.json"
    for bad, why in (("nope.mp4", "video not found"), ("junk.mp4", "no frames (an empty"), ("empty", "no frames (an "
                     "empty"), ("clips\\nope.mp4", "video not found (use / in paths)")):  # relative to the file
        json.dump([good, {**good, "video": bad}], open(v, "w"))  # --train: entry 2 trains, entry 1 is held out
        for argv in (["--train", "--preset", "tiny", "--data", v, "--out_dir", o], ["--eval", "--out_dir", out,
                                                                                   "--test_data", v]):
            _mk_user_error(argv, f"{v} entry 2: {tmp_path / bad}: {why}")
    with pytest.raises(mk.UserError, match=rf"^{re.escape(str(tmp_path / 'nope.mp4'))}: video not found$"):  # no hint
        mk.main([str(a) for a in ("--predict", "--out_dir", out, "--video", tmp_path / "nope.mp4", "--question",
                                  "q", "--choices", ch)])  # no annotation file: no entry to name
    assert not (o / "model.safetensors").exists()
    assert (out / "model.safetensors").is_file()  # nothing already saved was lost


def test_mk_user_files_never_overwritten_and_more_bad_inputs(mk_trained, mk_hf, tmp_path):
    """--out_dir on a checkpoint folder it reads and --data_dir on a folder of the user's are refused with nothing
    touched; counts below 1, a damaged training state or config.json, odd annotation values, a misspelt support_times
    (read as none, every clip would go without frame labels): one line each."""
    d, _ = mk_trained
    vj = mk_hf["root"] / "vjepa2"
    before = {f.name: f.read_bytes() for f in vj.iterdir()}
    _mk_user_error(["--train", "--preset", "tiny", "--vision_ckpt", vj, "--out_dir", vj, "--data_dir", d / "data"],
                   "--out_dir", "did not write")
    mine = tmp_path / "mine"  # the user's own files, where the synthetic world or a checkpoint would be written
    mine.mkdir()
    (mine / "train.json").write_text("[]")
    _mk_user_error(["--train", "--preset", "tiny", "--data_dir", mine, "--out_dir", tmp_path / "o"], "world.json")
    _mk_user_error(["--train", "--preset", "tiny", "--data_dir", d / "data", "--out_dir", mine], "did not write")
    _mk_user_error(["--train", "--preset", "tiny", "--data_dir", mine / "train.json", "--out_dir", tmp_path / "o"],
                   "a file")
    assert {f.name: f.read_bytes() for f in vj.iterdir()} == before and os.listdir(mine) == ["train.json"]
    (cut := tmp_path / "cut").mkdir()  # all a first save killed mid-write leaves: the run may start again there
    (cut / "model.safetensors.tmp").write_bytes(b"half")
    assert mk.writable(str(cut), "config.json", lambda m: m["script"] == mk.SCRIPT)
    (cut / "notes.txt").write_text("mine")  # anything more is the user's: refused, as before
    assert not mk.writable(str(cut), "config.json", lambda m: m["script"] == mk.SCRIPT)
    for flag in ("--max_steps", "--batch_size", "--max_new_tokens", "--n_frames"):
        _mk_user_error(["--train", "--preset", "tiny", flag, "0"], flag, "at least 1")
    run = tmp_path / "run"
    shutil.copytree(d / "out", run)
    (run / "train_state.pt").write_bytes(b"PK\x03\x04 truncated")
    _mk_user_error(["--train", "--resume", "--out_dir", run, "--data_dir", d / "data"], "train_state.pt",
                   "not a readable training state")
    (run / "config.json").write_text("[1, 2]")  # valid JSON, not a checkpoint's config
    _mk_user_error(["--eval", "--out_dir", run], "config.json: not a non-empty JSON object")
    video = str(d / "data" / "test" / "00000.mp4")
    entry = dict(video=video, question="q?", choices=["A. x", "B. y"], answer="A. x")
    for bad, needle in (({"support_times": [True]}, "support_times"), ({"video": ""}, "(text)"),
                        ({"choices": [f"{chr(65 + k)}. o{k}" for k in range(27)]}, "2 to 26"),
                        ({"choices": ["A. x"]}, "2 to 26"),  # one choice: nothing to choose between
                        ({"support_time": [0.5]}, "key 'support_time' is not read; give the supporting seconds as "
                         "support_times"), ({"Suport-Times": [0.5]}, "'Suport-Times' is not read")):  # not silent
        json.dump([{**entry, **bad}] * 2, open(tmp_path / "e.json", "w"))
        _mk_user_error(["--train", "--preset", "tiny", "--data", tmp_path / "e.json", "--out_dir", tmp_path / "o"],
                       "entry 1", needle)
    assert mk.mcq_accuracy(["K. o10", "Z. o25"], ["K. o10", "Y. o24"]) == 0.5  # letters past J are read too
    cut = tmp_path / "cut"  # a build cut short: its placeholder world.json marks the folder as this script's
    (cut / "train").mkdir(parents=True)
    (cut / "world.json").write_text(json.dumps(dict(train=1, val=1, test=1, novel=1, version=0)))
    small = _mk_tiny_cfg(tmp_path, data_dir=str(cut), n_train=2, n_val=1, n_test=1, n_novel=1)
    mk.build_world(small)
    assert json.load(open(cut / "world.json"))["version"] == 2 and len(json.load(open(cut / "train.json"))) == 2
    (mine / "world.json").write_text('{"train": 2, "seed": 1, "version": 2}')  # another script's manifest
    with pytest.raises(mk.UserError, match="did not write"):
        mk.build_world(dataclasses.replace(small, data_dir=str(mine)))
    assert json.load(open(mine / "world.json"))["seed"] == 1 and (mine / "train.json").read_text() == "[]"


def test_mk_unreadable_frames_wrong_answers_lone_entries_a_foreign_tokenizer_and_a_diverging_loss_are_one_line(
        mk_trained, mk_hf, tmp_path):
    """Each of these stops --train with one UserError line naming what is wrong: a frame folder whose sampled frame
    OpenCV reads only unchanged (a float TIFF), named by its entry; an answer that is none of its entry's choices; a
    --data file of one entry (none left to train on once the test entry is held out); a --llm_ckpt folder whose
    tokenizer.json is not a byte-level BPE; a learning rate so large that the loss is no longer finite; and --predict
    with a blank question."""
    d, _ = mk_trained
    video, o = str(d / "data" / "test" / "00000.mp4"), tmp_path / "o"
    train = ["--train", "--preset", "tiny", "--out_dir", o, "--data"]
    entries = [dict(video=video, question=f"q{i}?", choices=["A. x", "B. y"], answer="A. x") for i in range(3)]
    ann = tmp_path / "ann.json"
    (tmp_path / "frames").mkdir()  # frame 0 a 32-bit float TIFF: OpenCV reads it unchanged only, not as 8-bit BGR
    cv2.imwrite(str(tmp_path / "frames" / "f0.tiff"), np.zeros((40, 40, 3), np.float32))
    cv2.imwrite(str(tmp_path / "frames" / "f1.png"), np.zeros((40, 40, 3), np.uint8))
    for bad, needle in (({"video": "frames"}, f"entry 2: {tmp_path / 'frames'}: frame 0 could not be read"),
                        ({"answer": "C. z"}, "entry 2: answer 'C. z' is not one of the choices")):
        json.dump([entries[0], {**entries[1], **bad}], open(ann, "w"))
        _mk_user_error(train + [ann], needle)
    json.dump(entries[:1], open(ann, "w"))
    _mk_user_error(train + [ann], f"{ann}: too few entries to hold out a test set")
    json.dump(entries, open(ann, "w"))
    qwen = tmp_path / "qwen"  # the tiny Qwen3 folder, its tokenizer.json another kind (WordPiece, as BERT's)
    qwen.mkdir()
    shutil.copy(mk_hf["root"] / "qwen3" / "config.json", qwen / "config.json")
    os.symlink(mk_hf["root"] / "qwen3" / "model.safetensors", qwen / "model.safetensors")
    json.dump({"model": {"type": "WordPiece", "vocab": {}}}, open(qwen / "tokenizer.json", "w"))
    _mk_user_error(train + [ann, "--llm_ckpt", qwen], f"{qwen / 'tokenizer.json'}: not a byte-level BPE tokenizer")
    _mk_user_error(train + [ann, "--lr", "1e30", "--warmup_frac", "0"], "loss became", "lower --lr")
    assert not (o / "model.safetensors").exists()
    _mk_user_error(["--predict", "--video", video, "--question", " ", "--choices", "A. x|B. y", "--out_dir", d / "out"],
                   "--predict needs --video PATH --question TEXT --choices")  # a blank question is none


def test_mk_bad_numbers_and_head_counts_are_one_line(tmp_path):
    """A negative, NaN or infinite rate, ratio or RoPE base (a traceback, or a NaN loss blamed on --lr), a negative
    --stop_after (which would train and save nothing), no temporal query, a head count that does not split its width,
    an empty split (it wrote the world, then blamed the annotation file) or answers longer than --max_new_tokens
    (evaluation cut them): refused by name, nothing saved."""
    o = tmp_path / "o"
    for flag, value, needle in (("--lr", "nan", "above 0"), ("--lr", "0", "above 0"), ("--lr", "inf", "above 0"),
                                ("--warmup_frac", "nan", "0 or more"), ("--stop_after", "-1", "0 or more"),
                                ("--grad_clip", "0", "above 0"), ("--warmup_frac", "inf", "0 or more and finite"),
                                ("--v_mlp_ratio", "-1", "above 0"), ("--v_mlp_ratio", "nan", "above 0"),
                                ("--rope_theta", "0", "above 0"), ("--lam", "inf", "finite"),
                                ("--n_temporal_query", "0", "at least 1"), ("--bridge_heads", "3", "must divide"),
                                ("--v_heads", "5", "must divide"), ("--l_kv_heads", "3", "must divide"),
                                ("--n_val", "0", "at least 1"), ("--n_novel", "0", "at least 1"),
                                ("--max_new_tokens", "3", "must be at least")):  # an answer is ~8 tokens
        _mk_user_error(["--train", "--preset", "tiny", "--out_dir", o, flag, value, "--data_dir", tmp_path / "d"], flag,
                       needle)
    assert not o.exists()


def test_mk_bad_sampling_flags_are_one_line(tmp_path):
    """--predict / --eval decoding flags out of range (a negative --top_p made every token impossible and sampling
    crashed; a negative or NaN temperature or a NaN threshold ran silently; a threshold of 1 or more, which no sigmoid
    passes, gave frame F1 0 without a word) are refused by name before loading."""
    for flag, value, needle in (("--top_p", "-0.5", "above 0"), ("--top_p", "0", "above 0"), ("--top_k", "-1",
                                "0 or more"), ("--temperature", "-1", "0 or more"), ("--temperature", "nan",
                                "0 or more"), ("--threshold", "nan", "[0, 1)"), ("--threshold", "1", "[0, 1)"),
                                ("--threshold", "-0.1", "[0, 1)")):
        _mk_user_error(["--predict", "--out_dir", tmp_path / "none", "--video", "v.mp4", "--question", "q?",
                        "--choices", "A. x|B. y", "--temperature", "0.7", flag, value], flag, needle)
    _mk_user_error(["--predict", "--out_dir", tmp_path / "none", "--video", "v.mp4", "--question", "q?", "--choices",
                    "A. x, B. y"], "--choices 'A. x, B. y' (split at |): needs 2 to 26 choices")  # commas: one choice

def test_mk_clip_shorter_than_a_tubelet(tmp_path):
    """F < tubelet: the encoder repeats the clip tubelet times (as transformers does), so F tubelets reach the bridge."""
    for n_frames, tubelet in ((1, 2), (2, 3), (3, 4)):
        model, tok = _mk_model(_mk_tiny_cfg(tmp_path, n_frames=n_frames, v_tubelet=tubelet))
        feats = model.encode(torch.randint(0, 255, (2, n_frames, 32, 32, 3), dtype=torch.uint8))
        assert feats.shape[1] == n_frames * 16  # F tubelets x 4x4 patches
        item = dict(question="What happens?", choices=["A. it appears", "B. it stops"], answer="A. it appears")
        _, loss, fl = model(feats, *mk.text_batch([item, item], tok), torch.zeros(2, n_frames))
        assert fl.shape == (2, n_frames) and torch.isfinite(loss)


MK_USER_DATA_EXAMPLE = """\
[{"video": "clips/0001.mp4", "question": "What happens to the red circle?", "answer": "B. it stops",
  "choices": ["A. it appears", "B. it stops", "C. it turns blue", "D. it meets the green square"],
  "support_times": [0.25, 0.375, 0.5]}]
"""


def test_mk_readme_user_data_example_trains(mk_trained, tmp_path):
    """The README's example file, verbatim beside a real clip, trains the tiny preset and is evaluated."""
    d, _ = mk_trained
    (tmp_path / "clips").mkdir()
    video = json.load(open(d / "data" / "train.json"))[0]["video"]
    shutil.copy(d / "data" / video, tmp_path / "clips" / "0001.mp4")
    (tmp_path / "mine.json").write_text(MK_USER_DATA_EXAMPLE)
    mk.main([str(a) for a in ("--train", "--preset", "tiny", "--data", tmp_path / "mine.json", "--test_data",
                              tmp_path / "mine.json", "--out_dir", tmp_path / "o", "--max_steps", "2")])
    ev = json.load(open(tmp_path / "o" / "eval.json"))
    assert ev["test"]["n"] == 1 and ev["test"]["samples"][0]["answer"] == "B. it stops"


def test_mk_annotation_file_with_bom_and_crlf(mk_trained, tmp_path):
    """A UTF-8 byte-order mark and Windows line endings (as Notepad writes) are read like a plain file."""
    d, _ = mk_trained
    (tmp_path / "clips").mkdir()
    shutil.copy(d / "data" / "train" / "00000.mp4", tmp_path / "clips" / "0001.mp4")
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + MK_USER_DATA_EXAMPLE.replace("\n", "\r\n").encode())
    (e,) = mk.read_annotations(str(tmp_path / "bom.json"))
    assert e["answer"] == "B. it stops" and os.path.isfile(e["video"])


def test_mk_special_token_text_in_user_text(mk_trained, capsys):
    """"<|endoftext|>" typed in a question or an annotation is plain text to the GPT-2 tokenizer, not a refused special."""
    d, _ = mk_trained
    tok = mk.GPT2Tokenizer.build(["a <|endoftext|> b"], compact=True)
    assert tok.eos not in tok.encode("a <|endoftext|> b") and tok.unk not in tok.encode("a <|endoftext|> b")
    mk.main(["--predict", "--out_dir", str(d / "out"), "--video", str(d / "data" / "test" / "00000.mp4"),
             "--question", "What <|endoftext|> happens?", "--choices", "A. it appears|B. it stops"])
    assert "answer:" in capsys.readouterr().out


def test_mk_user_data_training_and_bench(mk_trained, tmp_path, capsys):
    d, _ = mk_trained
    anns = json.load(open(d / "data" / "train.json"))[:20]
    (tmp_path / "world").symlink_to(d / "data")  # relative paths: the draws do not depend on where d is
    for a in anns:
        a["video"] = "world/" + a["video"]
    json.dump(anns, open(tmp_path / "u.json", "w"))
    mk.main([str(a) for a in ("--train", "--preset", "tiny", "--data", tmp_path / "u.json", "--out_dir",
                              tmp_path / "o", "--max_steps", "2")])
    ev = json.load(open(tmp_path / "o" / "eval.json"))
    assert ev["test"]["n"] == 3 and "novel" not in ev  # three of the 20 draw at most 0.1
    mk.main([str(a) for a in ("--bench", "--preset", "tiny", "--n_train", "16", "--data_dir", tmp_path / "bd",
                              "--v_width", "32", "--v_layers", "1", "--v_heads", "2", "--crop", "32",
                              "--v_patch", "8")])
    out = capsys.readouterr().out
    assert "epoch 2" in out and "speedup" in out


def test_mk_eval_with_test_data_needs_no_training_file(mk_trained, tmp_path):
    """A run trained on --data, its file moved away: --eval --test_data reads the test file alone and scores it;
    without --test_data the test entries are the held-out ones of --data, and the refusal says so."""
    d, _ = mk_trained
    anns = [{**a, "video": str(d / "data" / a["video"])} for a in json.load(open(d / "data" / "train.json"))[:11]]
    json.dump(anns, open(tmp_path / "u.json", "w"))
    json.dump(anns[:3], open(tmp_path / "t.json", "w"))
    mk.main([str(a) for a in ("--train", "--preset", "tiny", "--data", tmp_path / "u.json", "--out_dir",
                              tmp_path / "o", "--max_steps", "1")])
    (tmp_path / "u.json").rename(tmp_path / "moved.json")
    (tmp_path / "o" / "eval.json").unlink()
    mk.main([str(a) for a in ("--eval", "--out_dir", tmp_path / "o", "--test_data", tmp_path / "t.json")])
    assert json.load(open(tmp_path / "o" / "eval.json"))["test"]["n"] == 3
    _mk_user_error(["--eval", "--out_dir", tmp_path / "o"], f"{tmp_path / 'u.json'}: cannot read it",
                   "--eval takes its held-out test entries from this --data file", "--test_data FILE")


def test_mk_device_map_cpu(tmp_path):
    cfg = _mk_tiny_cfg(tmp_path, device="cpu", device_map="vision=cpu,bridge=cpu,llm=cpu")
    assert mk.parse_device_map(cfg) == dict(vision="cpu", bridge="cpu", llm="cpu")
    with pytest.raises(mk.UserError, match="expected vision=DEV"):
        mk.parse_device_map(_mk_tiny_cfg(tmp_path, device="cpu", device_map="encoder=cpu"))


def test_mk_train_with_frozen_hf_checkpoints_cli(mk_hf, mk_trained, tmp_path, capsys, monkeypatch):
    d, _ = mk_trained
    monkeypatch.chdir(mk_hf["root"])  # tower folders given relative to the working directory
    mk.main([str(a) for a in ("--train", "--preset", "tiny", "--max_steps", "2", "--data_dir", d / "data",
                              "--out_dir", tmp_path / "o", "--vision_ckpt", "vjepa2", "--llm_ckpt", "qwen3",
                              "--max_new_tokens", 24)])  # the test tokenizer spells an answer in 21 tokens
    out = capsys.readouterr().out
    assert "frozen" in out and (tmp_path / "o" / "eval.json").is_file()
    printed = json.loads(out.split("config: ", 1)[1].split("\n", 1)[0])  # the towers' own sizes, not the preset's
    assert {k: printed[k] for k in ("v_width", "v_layers", "l_width", "l_inter", "rope_theta", "freeze_llm")} == dict(
        v_width=128, v_layers=2, l_width=64, l_inter=128, rope_theta=1e6, freeze_llm=True)
    with pytest.raises(mk.UserError, match=r"--v_width 64: .*vjepa2 sets it to 128 \(a loaded tower: its own sizes, frozen\)"):
        mk.main([str(a) for a in ("--train", "--preset", "tiny", "--data_dir", d / "data", "--out_dir", tmp_path / "o2",
                                  "--vision_ckpt", "vjepa2", "--llm_ckpt", "qwen3", "--v_width", "64")])
    with pytest.raises(mk.UserError, match=r"--freeze_vision False: .*vjepa2 sets it to True \(a loaded tower"):
        mk.main([str(a) for a in ("--train", "--preset", "tiny", "--data_dir", d / "data", "--out_dir", tmp_path / "o2",
                                  "--vision_ckpt", "vjepa2", "--no-freeze_vision")])
    saved = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert saved and all(k.startswith("bridge.") for k in saved)  # the towers are reloaded from their folders
    monkeypatch.chdir(tmp_path)  # saved as absolute paths: found from another directory
    model, tok, cfg = mk.load_checkpoint(str(tmp_path / "o"))
    assert isinstance(tok, mk.QwenTokenizer) and model.frozen == {"vision", "llm"}
    meta = json.load(open(tmp_path / "o" / "config.json"))  # a tower folder that has moved since training
    json.dump({**meta, "config": {**meta["config"], "llm_ckpt": str(tmp_path / "gone")}}, open(tmp_path / "o" / "config.json", "w"))
    mk.main([str(a) for a in ("--predict", "--out_dir", tmp_path / "o", "--video", d / "data" / "test" / "00000.mp4",
                              "--question", "q", "--choices", "A. x|B. y", "--llm_ckpt", mk_hf["root"] / "qwen3")])
    assert "answer:" in capsys.readouterr().out
    with pytest.raises(mk.UserError, match="tie_embeddings False, but the run in .* was trained with True"):
        mk.main([str(a) for a in ("--eval", "--out_dir", tmp_path / "o", "--llm_ckpt", mk_hf["root"] / "qwen3_untied")])
    other = tmp_path / "qwen3_other"  # the same sizes, other weights (as a chat model and its base model)
    shutil.copytree(mk_hf["root"] / "qwen3", other)
    state = load_file(str(other / "model.safetensors"))
    save_file({k: v + 0.01 if k.endswith("q_proj.weight") else v for k, v in state.items()}, str(other / "model.safetensors"))
    with pytest.raises(mk.UserError, match="qwen3_other: not the weights the run in .* trained with"):
        mk.main([str(a) for a in ("--eval", "--out_dir", tmp_path / "o", "--llm_ckpt", other)])


@pytest.fixture(scope="module")
def mk_hf_bf16(mk_hf):
    """The tiny towers saved in bfloat16 (as the released files are), the encoder with crop_size 48 (not --crop 32)."""
    import copy
    from transformers import VJEPA2Config, VJEPA2Model
    root = mk_hf["root"]
    torch.manual_seed(0)
    vc = VJEPA2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, crop_size=48, patch_size=16,
                      tubelet_size=2, frames_per_clip=4, pred_hidden_size=64, pred_num_hidden_layers=1,
                      pred_num_attention_heads=2)
    VJEPA2Model(vc).to(torch.bfloat16).save_pretrained(root / "vjepa2_bf16")
    shutil.copytree(root / "qwen3", root / "qwen3_bf16")
    copy.deepcopy(mk_hf["qwen3"]).to(torch.bfloat16).save_pretrained(root / "qwen3_bf16")
    assert load_file(str(root / "qwen3_bf16" / "model.safetensors"))["model.norm.weight"].dtype == torch.bfloat16
    return root


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mk_bfloat16_checkpoints_train_and_predict(mk_hf_bf16, mk_trained, tmp_path, capsys, dtype):
    """The real-checkpoint user path: bfloat16 files, a crop size from the encoder's config, --train then --predict;
    a --predict under float16 autocast too (the towers then load in float32: float16 cannot mix with bfloat16)."""
    d, _ = mk_trained
    out, root = tmp_path / "o", mk_hf_bf16
    towers = ["--vision_ckpt", str(root / "vjepa2_bf16"), "--llm_ckpt", str(root / "qwen3_bf16")]
    mk.main(["--train", "--preset", "tiny", "--max_steps", "2", "--data_dir", str(d / "data"), "--out_dir", str(out),
             "--dtype", dtype, "--max_new_tokens", "24", *towers])  # the test tokenizer's answers: 21 tokens
    model, tok, cfg = mk.load_checkpoint(str(out), {"dtype": dtype})
    assert cfg.crop == 48 and model.bridge.grid == 3  # from crop_size 48 / patch 16, not the preset's crop 32
    tower = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    assert model.vision.layernorm.weight.dtype == tower and model.llm.lm_head.weight.dtype == tower
    assert model.bridge.proj.weight.dtype == torch.float32
    for run_dtype in (dtype, "float16"):
        mk.main(["--predict", "--out_dir", str(out), "--video", str(d / "data" / "test" / "00000.mp4"), "--question",
                 "What happens to the red circle?", "--choices", "A. it appears|B. it stops", "--dtype", run_dtype])
        assert "answer:" in capsys.readouterr().out
    with pytest.raises(mk.UserError, match="--crop 32: .* sets it to 48"):  # a conflicting flag, one line
        mk.main(["--train", "--preset", "tiny", "--crop", "32", "--out_dir", str(tmp_path / "x"), *towers])


def test_mk_float16_checkpoints_load_in_float32_under_bfloat16(mk_hf, mk_trained, tmp_path):
    """float16 weights cannot mix with bfloat16 autocast: float16 tower files load in float32 (exactly) and train."""
    import copy
    d, _ = mk_trained
    for name in ("vjepa2", "qwen3"):
        shutil.copytree(mk_hf["root"] / name, tmp_path / name)  # the tokenizer files too
        copy.deepcopy(mk_hf[name]).to(torch.float16).save_pretrained(tmp_path / name)
    mk.main(["--train", "--preset", "tiny", "--max_steps", "2", "--data_dir", str(d / "data"), "--out_dir",
             str(tmp_path / "o"), "--dtype", "bfloat16", "--max_new_tokens", "24", "--vision_ckpt",
             str(tmp_path / "vjepa2"), "--llm_ckpt", str(tmp_path / "qwen3")])
    model = mk.load_checkpoint(str(tmp_path / "o"), {"dtype": "bfloat16"})[0]
    assert model.vision.layernorm.weight.dtype == model.llm.lm_head.weight.dtype == torch.float32
    assert torch.equal(model.llm.model.norm.weight, mk_hf["qwen3"].model.norm.weight.half().float())


@pytest.fixture(scope="module")
def mk_hf_released(mk_hf):
    """Tiny-width towers at the released files' shapes and format: V-JEPA 2 ViT-g/16's crop 256, patch 16, tubelet 2,
    64 frames per clip, head dim 64 (RoPE 20/20/20 + 4), MLP ratio 48/11; Qwen3-0.6B's explicit head dim 128 (not
    width / heads), 2:1 GQA, theta 1e6, eps 1e-6, tied 151936-row embedding. bfloat16, sharded, the hub key layout."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, VJEPA2Config, VJEPA2Model
    root = mk_hf["root"] / "released"
    torch.manual_seed(0)
    vc = VJEPA2Config(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=48 / 11, crop_size=256,
                      patch_size=16, tubelet_size=2, frames_per_clip=64, pred_hidden_size=32, pred_num_hidden_layers=1,
                      pred_num_attention_heads=1)
    def trained_look(m):  # norm gains off 1 and biases off 0, as trained weights have: their order and dtype count
        with torch.no_grad():
            for p in m.parameters():
                p.add_(0.3 * torch.randn_like(p)) if p.dim() == 1 else None
        return m.to(torch.bfloat16)
    hv = VJEPA2Model(vc)
    with torch.no_grad():  # sharp attention, as trained weights have: at init scale (std 0.02) it is near uniform and
        for blk in hv.encoder.layer:  # a token's RoPE position would barely change the features
            blk.attention.query.weight.mul_(8)
            blk.attention.key.weight.mul_(8)
    trained_look(hv).save_pretrained(root / "vjepa2", max_shard_size="200KB")
    torch.manual_seed(2)  # weights whose greedy steps all have a comfortable top-2 margin (asserted)
    qc = Qwen3Config(vocab_size=151936, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=128, tie_word_embeddings=True,
                     rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=40960, bos_token_id=151643,
                     eos_token_id=151645)
    trained_look(Qwen3ForCausalLM(qc)).save_pretrained(root / "qwen3", max_shard_size="200KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):  # the toy Qwen3 tokenizer
        shutil.copy(mk_hf["root"] / "qwen3" / name, root / "qwen3" / name)
    assert all(len(list((root / name).glob("model-*-of-*.safetensors"))) > 1 for name in ("vjepa2", "qwen3"))
    keys = {n: json.load(open(root / n / "model.safetensors.index.json"))["weight_map"] for n in ("vjepa2", "qwen3")}
    assert "encoder.layer.1.attention.query.weight" in keys["vjepa2"] and "lm_head.weight" not in keys["qwen3"]
    return root


def test_mk_released_shapes_pixels_to_tokens_match_transformers(mk_hf_released, tmp_path, capsys):
    """From an mp4 to answer tokens at the released shapes, in bfloat16, against transformers on the same folders.
    Ours: load_video (decode, sample 16 frames, V-JEPA 2 resize/crop), Mark1.encode (normalise, encoder), the bridge,
    QwenTokenizer's chat prompt, generate(); and the --predict CLI on a checkpoint of that model. Reference: VJEPA2Model
    .get_vision_features fed OUR normalised pixels (VJEPA2VideoProcessor needs torchvision; our uint8 frames are checked
    against transformers' PIL-step emulation of it instead, as in test_mk_pixels_match_transformers_video_processor),
    the same bridge on its features, Qwen3's tokenizer + chat template, Qwen3ForCausalLM's forward and generate().
    Tolerance: both sides run in bfloat16 (8 significant bits), so they may differ only by the order of sums inside
    kernels: at most a quarter of the gap between transformers' own bfloat16 and float32 outputs (the whole rounding
    budget: ~0.04 on features, ~0.008 on logits). Precision semantics the released numbers depend on break it: RoPE
    angles built in float32, not the activation dtype (0.05 on features); Qwen3's angles rounded before cos() (0.017 on
    logits); RMSNorm's gain applied before the cast back (0.012); the h and w RoPE axes swapped (0.23). Tokens must be
    identical; random tied weights repeat their first token, so each step's top-2 margin must exceed 4x that logit
    budget: no near-tie decides the check."""
    import dataclasses
    from transformers import AutoTokenizer, Qwen3ForCausalLM, VJEPA2Model
    from transformers.image_transforms import center_crop, get_resize_output_image_size, resize
    from transformers.image_utils import ChannelDimension, PILImageResampling
    root, path = mk_hf_released, str(tmp_path / "clip.mp4")
    base, n_written = _mk_textured(240, 480, 7), 24  # a 320x240 mp4v clip: texture panning 6 px/frame + a moving disc
    w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 8, (320, 240))
    for t in range(n_written):
        f = np.ascontiguousarray(base[:, 6 * t:6 * t + 320])
        cv2.circle(f, (20 + 12 * t, 60 + 5 * t), 25, (0, 0, 255), -1)
        w.write(f)
    w.release()
    cfg = _mk_tiny_cfg(tmp_path, n_frames=16, dtype="bfloat16", max_new_tokens=9, vision_ckpt=str(root / "vjepa2"),
                       llm_ckpt=str(root / "qwen3"))
    for _, got in mk.tower_fields(cfg):
        cfg = dataclasses.replace(cfg, **got)
    assert (cfg.crop, cfg.v_patch, cfg.v_tubelet, cfg.l_head_dim, cfg.tie_embeddings) == (256, 16, 2, 128, True)
    tok = mk.make_tokenizer(cfg)
    model = mk.build_model(cfg, tok).eval()
    opt, _, scaler = mk.make_optimizer(model, cfg)
    mk.save_checkpoint(model, tok, cfg, opt, 0, scaler)  # an untrained bridge: --predict reads it
    # pixels: our decoded, resized, cropped frames against transformers' own resize and centre crop (PIL steps)
    clip = mk.load_video(path, 16, 256)[0]  # (16, 256, 256, 3) uint8 RGB
    cap, frames = cv2.VideoCapture(path), []
    while (got := cap.read())[0]:
        frames.append(np.ascontiguousarray(got[1][:, :, ::-1]))
    size = get_resize_output_image_size(frames[0], int(256 * 256 / 224), default_to_square=False,
                                        input_data_format=ChannelDimension.LAST)  # shortest edge 292
    want = np.stack([center_crop(resize(frames[i], size, resample=PILImageResampling.BILINEAR,
                                        input_data_format=ChannelDimension.LAST), (256, 256),
                                 input_data_format=ChannelDimension.LAST) for i in mk.sample_indices(n_written, 16)])
    assert clip.shape == want.shape and np.abs(clip.astype(int) - want).max() <= 2
    # encoder features: the script's normalise + encoder (bfloat16 autocast, as --predict) vs VJEPA2Model in bfloat16
    hv = VJEPA2Model.from_pretrained(str(root / "vjepa2"), dtype=torch.bfloat16).eval()
    hq = Qwen3ForCausalLM.from_pretrained(str(root / "qwen3"), dtype=torch.bfloat16).eval()
    assert hv.config.frames_per_clip == 64 and hv.encoder.layer[0].mlp.fc1.out_features == int(128 * 48 / 11)
    x = torch.from_numpy(clip)[None]
    with torch.no_grad(), mk.autocast(cfg, "cpu"):
        feats = model.encode(x)  # (1, 8 * 16 * 16, 128)
    with torch.no_grad():
        ref_feats = hv.get_vision_features(mk.normalize(x).to(torch.bfloat16))
        hv32 = VJEPA2Model.from_pretrained(str(root / "vjepa2"), dtype=torch.float32).eval()
        ref32 = hv32.get_vision_features(mk.normalize(x))  # the bfloat16 weights, computed in float32
    assert feats.shape == ref_feats.shape == (1, 2048, 128) and feats.dtype == torch.bfloat16
    fdiff, fnoise = (feats.float() - ref_feats.float()).abs().max(), (ref32 - ref_feats.float()).abs().max()
    # prompt: our tokenizer and chat template against transformers' tokenizer on the same folder
    q, choices = "What happens to the red disc?", ["A. it appears", "B. it stops", "C. it turns blue", "D. it moves"]
    ht = AutoTokenizer.from_pretrained(str(root / "qwen3"))
    text = ht.apply_chat_template([{"role": "user", "content": q + "\n" + "\n".join(choices) + tok.ask}],
                                  add_generation_prompt=True, enable_thinking=False, tokenize=False)
    ids = tok.prompt(q, choices)
    assert ids == ht(text)["input_ids"] and tok.eos == ht.convert_tokens_to_ids("<|im_end|>") == 151645
    # the LLM: our generate() from our features vs Qwen3ForCausalLM.generate from the reference features
    items = [dict(question=q, choices=choices)]
    with torch.no_grad(), mk.autocast(cfg, "cpu"):
        ours, _ = mk.generate(model, feats, items, tok, cfg)
        q_ids, q_valid = mk.text_batch(items, tok, with_answer=False)[:2]
        prefix = model.fuse(ref_feats, q_ids, q_valid)[0]  # (1, N, 64) bfloat16: the bridge has no reference
        mine = model.llm(torch.cat((model.fuse(feats, q_ids, q_valid)[0], model.embed(torch.tensor(ids))[None]), 1))
        text_only = model.llm(model.embed(torch.tensor([ids])))  # the prompt alone: ids in, not embeddings
    emb = torch.cat((prefix, hq.get_input_embeddings()(torch.tensor([ids]))), 1)
    with torch.no_grad():
        ref_logits, ref_text = hq(inputs_embeds=emb).logits.float(), hq(torch.tensor([ids])).logits.float()
        ref = hq.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                          max_new_tokens=9, do_sample=False, eos_token_id=151645, pad_token_id=151643)[0].tolist()
        steps = hq(inputs_embeds=torch.cat((emb, hq.get_input_embeddings()(torch.tensor([ref[:-1]]))), 1)).logits
        ref32 = Qwen3ForCausalLM.from_pretrained(str(root / "qwen3"), dtype=torch.float32)(inputs_embeds=emb.float())
    ldiff = max((mine.float() - ref_logits).abs().max(), (text_only.float() - ref_text).abs().max())
    lnoise = (ref32.logits - ref_logits).abs().max()
    top2 = steps[0, -len(ref):].float().topk(2).values
    margin = (top2[:, 0] - top2[:, 1]).min()
    with capsys.disabled():  # shown with -s
        print(f"max differences: features {fdiff:.4f} (bfloat16 vs float32 in transformers: {fnoise:.4f}), logits "
              f"{ldiff:.4f} ({lnoise:.4f}); smallest top-2 margin {margin:.4f}")
    assert fdiff <= fnoise / 4 and ldiff <= lnoise / 4 and margin > 4 * lnoise
    assert ours == [[t for t in ref if t != 151645]] and len(ref) == 9  # (random tied weights: the token repeats)
    mk.main(["--predict", "--out_dir", cfg.out_dir, "--video", path, "--question", q, "--choices", "|".join(choices),
             "--max_new_tokens", "9"])
    answer = ht.decode(ref, skip_special_tokens=True).strip()
    mark = " (not a choice)" * (answer not in choices)  # random weights answer no choice
    assert answer == tok.decode(ref).strip() and f"answer: {answer}{mark}\n" in capsys.readouterr().out


def test_mk_unsupported_and_corrupt_checkpoints(mk_hf, tmp_path):
    """Every Qwen3 setting the script does not implement is refused by name; damaged files are one-line errors."""
    src = mk_hf["root"] / "qwen3"
    conf = json.load(open(src / "config.json"))
    for name, change in [("rope_scaling", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}),
                         ("rope_type", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}}),
                         ("use_sliding_window", {"use_sliding_window": True}), ("hidden_act", {"hidden_act": "gelu"})]:
        bad = tmp_path / name
        shutil.copytree(src, bad)
        json.dump({**conf, **change}, open(bad / "config.json", "w"))
        with pytest.raises(mk.UserError, match=name):
            mk.load_qwen3(str(bad))
    minimal = tmp_path / "minimal"  # missing keys take transformers' defaults (head_dim 128, untied, theta 1e4)
    shutil.copytree(src, minimal)
    json.dump({k: conf[k] for k in ("model_type", "vocab_size", "hidden_size", "intermediate_size",
                                    "num_hidden_layers", "num_attention_heads")}, open(minimal / "config.json", "w"))
    with pytest.raises(mk.UserError, match="mis-shaped"):  # head_dim 128 does not fit the 32-wide q/k norms
        mk.load_qwen3(str(minimal))
    (minimal / "config.json").write_text("{not json")
    with pytest.raises(mk.UserError, match="not valid JSON"):
        mk.load_qwen3(str(minimal))
    shutil.copy(src / "config.json", minimal / "config.json")
    (minimal / "model.safetensors").write_bytes(b"\x10\x00garbage")
    with pytest.raises(mk.UserError, match="unreadable safetensors"):
        mk.load_qwen3(str(minimal))
    cfg = _mk_tiny_cfg(tmp_path, llm_ckpt=str(src), bridge_heads=3, bert_heads=4)  # Qwen3's width: 64
    with pytest.raises(mk.UserError, match=r"--bridge_heads 3: must divide the LLM's width 64"):
        mk.build_model(cfg, mk.make_tokenizer(cfg))


def test_mk_qwen3_sharded_checkpoint(mk_hf, tmp_path):
    src = mk_hf["root"] / "qwen3"
    state = load_file(str(src / "model.safetensors"))
    keys = sorted(state)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, ks in shards.items():
        save_file({k: state[k] for k in ks}, str(tmp_path / name))
    json.dump({"weight_map": {k: n for n, ks in shards.items() for k in ks}}, open(tmp_path / "model.safetensors.index.json", "w"))
    shutil.copy(src / "config.json", tmp_path / "config.json")
    lm = mk.load_qwen3(str(tmp_path))
    ids = torch.randint(0, 151936, (1, 7))
    with torch.no_grad():
        assert (lm(lm.model.embed_tokens(ids)) - mk_hf["qwen3"](ids).logits).abs().max() < 1e-4


def test_mk_json_files_of_the_wrong_shape_are_one_line(mk_hf, tmp_path):
    """A config.json, shard index or tokenizer.json holding valid JSON of the wrong shape (a list, no weight_map) and
    an annotation file that is an object: each one UserError line naming the file (a run's config.json: above)."""
    root = mk_hf["root"]
    for name, src, text, load in [("config.json", "vjepa2", "[1, 2]", mk.load_vjepa2),
                                  ("config.json", "qwen3", '[["model_type", "qwen3"]]', mk.load_qwen3),
                                  ("model.safetensors.index.json", "qwen3", "[1]", mk.load_qwen3),
                                  ("model.safetensors.index.json", "qwen3", '{"metadata": {}}', mk.load_qwen3),
                                  ("tokenizer.json", "qwen3", "[]", lambda d: mk.QwenTokenizer(f"{d}/tokenizer.json"))]:
        bad = tmp_path / f"{src}_{name}_{len(text)}"
        shutil.copytree(root / src, bad)
        (bad / name).write_text(text)
        with pytest.raises(mk.UserError, match=f"{name}: (not a non-empty JSON object|no weight_map)"):
            load(str(bad))
    (tmp_path / "obj.json").write_text('{"video": "a.mp4"}')
    _mk_user_error(["--train", "--preset", "tiny", "--data", tmp_path / "obj.json", "--out_dir", tmp_path / "o"],
                   "obj.json: not a non-empty JSON list")


def test_mk_hf_config_values_of_the_wrong_type_are_one_line(mk_hf, tmp_path):
    """A size or rate that is null or a string in an HF config.json is one UserError line naming it; a null
    num_key_value_heads means one kv head per head, as transformers reads it (here: a GQA file, so mis-shaped)."""
    for src, key, value, want in [("qwen3", "num_hidden_layers", None, "sets num_hidden_layers to None"),
                                  ("qwen3", "hidden_size", "64", "sets hidden_size to '64'"),
                                  ("qwen3", "rms_norm_eps", -1.0, "sets rms_norm_eps to -1.0"),
                                  ("vjepa2", "crop_size", None, "sets crop_size to None"),
                                  ("qwen3", "num_key_value_heads", None, "mis-shaped")]:
        bad = tmp_path / f"{src}_{key}"
        shutil.copytree(mk_hf["root"] / src, bad)
        conf = json.load(open(bad / "config.json"))
        json.dump({**conf, key: value}, open(bad / "config.json", "w"))
        with pytest.raises(mk.UserError, match=re.escape(want)):
            (mk.load_qwen3 if src == "qwen3" else mk.load_vjepa2)(str(bad))


def test_mk_one_mode_per_call(tmp_path):
    """Two modes in one call would drop one without a word; --resume alone would do nothing: one line each."""
    for argv, want in [(["--predict", "--eval"], "one mode per call"), (["--train", "--bench"], "one mode per call"),
                       (["--resume"], "--resume continues a training run")]:
        _mk_user_error(argv + ["--out_dir", tmp_path / "o", "--data_dir", tmp_path / "d"], want)
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_mk_architecture_sizes_are_checked(tmp_path):
    """A zero size (a ZeroDivisionError, or a 0-layer LLM trained without a word), an odd RoPE head width and a patch
    larger than the crop are one line each, before any data."""
    for argv, want in [(["--v_patch", 0], "--v_patch 0: must be at least 1"), (["--l_layers", 0], "--l_layers 0"),
                       (["--v_width", 0], "--v_width 0"), (["--l_head_dim", 15], "--l_head_dim 15: must be even"),
                       (["--v_patch", 64], "--v_patch 64: must be at most --crop 32"),
                       (["--temporal_blocks", -1], "--temporal_blocks -1: must be 0 or more")]:  # 0: none, -1: refused
        _mk_user_error(["--train", "--preset", "tiny", *argv, "--out_dir", tmp_path / "o", "--data_dir", tmp_path / "d"],
                       want)
    assert not (tmp_path / "d").exists()


def test_mk_autocast_auto(mk_trained, tmp_path, monkeypatch):
    check_auto_run_and_saved_dtype(mk, mk_trained[0] / "data", tmp_path / "auto")
    check_autocast_auto(mk, monkeypatch)


def test_mk_float16_trains_with_a_gradient_scaler(mk_trained, tmp_path, monkeypatch):
    cfg = _mk_tiny_cfg(tmp_path, data_dir=str(mk_trained[0] / "data"), dtype="float16", max_steps=2)
    check_float16_scales_the_loss(mk.train, cfg, monkeypatch)


def test_mk_resume_eval_predict_write_into_the_folder_they_loaded(mk_trained, tmp_path, capsys, monkeypatch):
    """A checkpoint folder moved elsewhere: --eval, --predict and --resume write into it, not into the folder its
    config.json names (gone here: it was a traceback); a frame strip that cannot be written is one line, after the
    answer. A run's --data file moved: --resume takes its new path (it was refused, and the old path unreadable)."""
    d, _ = mk_trained
    first, moved = tmp_path / "first", tmp_path / "moved"
    mk.main([str(a) for a in ("--train", "--preset", "tiny", "--max_steps", 2, "--data_dir", d / "data", "--out_dir",
                              first)])
    shutil.move(first, moved)
    (moved / "eval.json").unlink()
    mk.main(["--eval", "--out_dir", str(moved)])
    assert (moved / "eval.json").is_file() and not first.exists()
    ask = ["--video", str(d / "data" / "test" / "00000.mp4"), "--question", "q?", "--choices", "A. x|B. y"]
    mk.main(["--predict", "--out_dir", str(moved), *ask])
    assert f"frame strip: {moved}/predict.png" in capsys.readouterr().out and (moved / "predict.png").is_file()
    mk.main(["--train", "--resume", "--out_dir", str(moved), "--max_steps", "3"])
    assert torch.load(moved / "train_state.pt")["step"] == 3 and not first.exists()
    assert json.load(open(moved / "config.json"))["config"]["out_dir"] == str(moved)
    (moved / "predict.png").unlink()
    (moved / "predict.png").mkdir()  # cv2.imwrite returns False there, it raises nothing
    _mk_user_error(["--predict", "--out_dir", moved, *ask], "predict.png", "could not be written")
    assert "answer: " in capsys.readouterr().out  # printed before the strip failed
    shutil.copytree(d / "data", tmp_path / "ud")  # a run on the user's file, which then moves: --resume is told where
    mk.main([str(a) for a in ("--train", "--preset", "tiny", "--max_steps", 3, "--stop_after", 2, "--data",
                              tmp_path / "ud" / "train.json", "--out_dir", tmp_path / "ud_run")])
    shutil.move(tmp_path / "ud", tmp_path / "ud2")
    mk.main([str(a) for a in ("--train", "--resume", "--out_dir", tmp_path / "ud_run", "--data",
                              tmp_path / "ud2" / "train.json")])
    assert torch.load(tmp_path / "ud_run" / "train_state.pt")["step"] == 3


def test_mk_out_dir_that_cannot_be_made_is_refused_before_any_work(tmp_path):
    """--out_dir under a file, or in /proc: one line before the world is built or a step runs (it was a traceback at
    the first save)."""
    (tmp_path / "afile").write_text("mine")
    for out in (tmp_path / "afile" / "sub", "/proc/mk_out"):
        _mk_user_error(["--train", "--preset", "tiny", "--out_dir", out, "--data_dir", tmp_path / "d"], f"--out_dir {out}",
                       "no folder can be made")
    assert not (tmp_path / "d").exists() and (tmp_path / "afile").read_text() == "mine"
    _mk_user_error(["--train", "--preset", "tiny", "--out_dir", tmp_path / "o", "--data_dir", tmp_path / "afile" / "w"],
                   "--data_dir", "no folder can be made")  # the world's folder likewise


def test_mk_damaged_checkpoint_is_one_line(mk_trained, tmp_path):
    """A config.json without its vocab, with values of the wrong type, sizes that do not divide or choices that do not
    exist, gets the checks the flags get; a train_state.pt of another run or without its keys: one line each."""
    d, _ = mk_trained
    run = tmp_path / "run"
    shutil.copytree(d / "out", run)
    meta = json.load(open(d / "out" / "config.json"))
    for change, needle in [({"vocab": None}, "vocab: missing"), ({"towers": []}, "towers []"), ({"vocab": []}, "vocab"),
                           ({"towers": {"vision": "abc"}}, "of its HF towers"),  # a run without HF towers
                           ({"n_frames": "16"}, "--n_frames '16': must be of type int"),
                           ({"l_width": None}, "--l_width None"), ({"lr": True}, "--lr True"),
                           ({"v_heads": 5}, "--v_heads 5: must divide --v_width 32"),
                           ({"frame_head": "bogus"}, "--frame_head bogus: choose one of"),
                           ({"dtype": "float64"}, "--dtype float64: choose one of")]:
        top = {k: v for k, v in change.items() if k in ("vocab", "towers")}
        conf = {**meta["config"], **{k: v for k, v in change.items() if k not in top}}
        json.dump({k: v for k, v in {**meta, "config": conf, **top}.items() if v is not None or k != "vocab"},
                  open(run / "config.json", "w"))
        _mk_user_error(["--eval", "--out_dir", run], "config.json", needle)
    shutil.copy(d / "out" / "config.json", run / "config.json")
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])  # another run's optimizer: other parameters
    moments = torch.load(d / "out" / "train_state.pt")  # another run's moments: as many tensors, other shapes
    moments["optimizer"]["state"] = {i: {k: v[..., :1] if v.dim() else v for k, v in st.items()}
                                     for i, st in moments["optimizer"]["state"].items()}
    for state in (dict(optimizer=opt.state_dict(), scaler={}, step=3, rng=torch.get_rng_state()), {"step": 3},
                  torch.zeros(3), {**moments, "step": 3}):  # a bare tensor: refused before torch warns of indexing it
        torch.save(state, run / "train_state.pt")
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            _mk_user_error(["--train", "--resume", "--out_dir", run], "train_state.pt", "not a readable training state")
        assert not [w for w in seen if "indexing" in str(w.message)]
    assert (run / "model.safetensors").read_bytes() == (d / "out" / "model.safetensors").read_bytes()


def test_mk_hf_config_heads_that_do_not_divide_and_float_sizes(mk_hf, tmp_path):
    """An HF config.json whose heads do not split the width, or with a float where a count belongs: one line naming
    the key (it was a traceback, or a mis-shaped list that did not say why)."""
    for src, change, want in [("vjepa2", {"num_attention_heads": 3}, "num_attention_heads 3 does not divide its "
                               "hidden_size 128"), ("qwen3", {"num_key_value_heads": 3}, "num_key_value_heads 3 does "
                               "not divide its num_attention_heads 4"), ("vjepa2", {"hidden_size": 96.0},
                               "sets hidden_size to 96.0, not a positive whole number"),
                              ("qwen3", {"num_hidden_layers": 2.0}, "sets num_hidden_layers to 2.0"),
                              ("qwen3", {"rope_theta": None, "rope_parameters": {"rope_type": "default",
                               "rope_theta": "1e6"}}, "not an object with a positive rope_theta")]:
        bad = tmp_path / f"{src}_{next(iter(change))}"
        shutil.copytree(mk_hf["root"] / src, bad)
        json.dump({**json.load(open(bad / "config.json")), **change}, open(bad / "config.json", "w"))
        with pytest.raises(mk.UserError, match=re.escape(want)):
            (mk.load_qwen3 if src == "qwen3" else mk.load_vjepa2)(str(bad))
    small = tmp_path / "small_crop"  # a crop smaller than the tower's patch: one line before any work
    shutil.copytree(mk_hf["root"] / "vjepa2", small)
    json.dump({**json.load(open(small / "config.json")), "crop_size": 8, "patch_size": 16}, open(small / "config.json", "w"))
    _mk_user_error(["--train", "--preset", "tiny", "--vision_ckpt", small, "--out_dir", tmp_path / "o", "--data_dir",
                    tmp_path / "d"], "small_crop: with its config.json's sizes, --v_patch 16: must be at most --crop 8")


def test_mk_test_answers_longer_than_max_new_tokens_are_refused(mk_trained, tmp_path):
    """Exact match would score a test answer cut at --max_new_tokens 0: train's test split, --test_data and --eval
    (which may lower --max_new_tokens) refuse it before any step, naming the file and entry, as training answers are;
    --resume with new data takes the --max_new_tokens that its refusal asks for."""
    d, _ = mk_trained
    long = "A. it " + "turns and turns " * 6
    json.dump([dict(video=str(d / "data" / "test" / "00000.mp4"), question="q?", choices=[long, "B. y"], answer=long)],
              open(tmp_path / "long.json", "w"))
    _mk_user_error(["--train", "--preset", "tiny", "--data_dir", d / "data", "--test_data", tmp_path / "long.json",
                    "--out_dir", tmp_path / "o"], "long.json entry 1: the answer is", "--max_new_tokens 16 must be")
    assert not (tmp_path / "o").exists()
    _mk_user_error(["--eval", "--out_dir", d / "out", "--test_data", tmp_path / "long.json"], "entry 1: the answer is")
    _mk_user_error(["--eval", "--out_dir", d / "out", "--max_new_tokens", 4], "answer is", "--max_new_tokens 4 must")
    r = tmp_path / "r"  # --resume may take new --data or --test_data: the --max_new_tokens it asks for is taken too
    mk.main([str(a) for a in ("--train", "--preset", "tiny", "--data_dir", d / "data", "--out_dir", r, "--stop_after", 5)])
    resume = ["--train", "--resume", "--out_dir", r, "--test_data", tmp_path / "long.json"]
    _mk_user_error(resume, "long.json entry 1: the answer is", "--max_new_tokens 16 must be at least")
    mk.main([str(a) for a in resume + ["--max_new_tokens", 40]])
    assert json.load(open(r / "config.json"))["config"]["max_new_tokens"] == 40
    assert json.load(open(r / "eval.json"))["test"]["n"] == 1


def test_mk_predict_refuses_a_choice_longer_than_max_new_tokens(mk_trained):
    """--predict decodes --max_new_tokens, as --eval does: a choice longer than that (EOS included) could only be
    answered cut off, so it is refused as --eval refuses such an answer, naming --choices, before any video is read."""
    d, _ = mk_trained
    long = "B. it meets the green square and then the blue one"
    model, tok, cfg = mk.load_checkpoint(str(d / "out"))
    n = len(tok.target(long))
    argv = ["--predict", "--out_dir", d / "out", "--video", d / "none.mp4", "--question", "q", "--choices",
            f"A. x|{long}"]
    _mk_user_error(argv + ["--max_new_tokens", n - 1], f"a --choices answer is {n} tokens long",
                   f"--max_new_tokens {n - 1} must be at least {n}")
    _mk_user_error(argv + ["--max_new_tokens", n], "none.mp4: video not found")  # long enough: on to the video


def test_mk_flags_a_mode_would_ignore_are_refused(mk_trained, mk_hf, tmp_path):
    """A flag the mode overrides or never reads is refused in one line, not silently dropped; a value equal to what
    runs passes."""
    d, _ = mk_trained
    ask = ["--video", d / "data" / "test" / "00000.mp4", "--question", "q?", "--choices", "A. x|B. y"]
    anns = json.load(open(d / "data" / "train.json"))[:20]
    json.dump([{**a, "video": str(d / "data" / a["video"])} for a in anns], open(tmp_path / "u.json", "w"))
    bench = ["--bench", "--preset", "tiny", "--data_dir", tmp_path / "bd"]
    for argv, want in [(bench + ["--out_dir", tmp_path / "b"], "--out_dir: --bench does not use it"),
                       (bench + ["--grad_accum", 2], "--grad_accum 2: --bench always runs with grad_accum=1"),
                       (bench + ["--no-freeze_vision"], "--freeze_vision False: --bench always runs"),
                       (bench + ["--no-feature_cache"], "--feature_cache False"),
                       (["--predict", "--out_dir", d / "out", *ask, "--data_dir", tmp_path], "--predict cannot change"),
                       (["--predict", "--out_dir", d / "out", *ask, "--max_steps", 9], "--predict cannot change it"),
                       (["--eval", "--out_dir", d / "out", "--max_steps", 9], "--max_steps 9: the run in"),
                       (["--eval", "--out_dir", d / "out", "--log_interval", 1], "--eval cannot change it"),
                       (["--train", "--preset", "tiny", "--data", tmp_path / "u.json", "--n_train", 5,
                         "--out_dir", tmp_path / "o"], "--n_train: the synthetic world's, unused with --data"),
                       (["--train", "--preset", "tiny", "--data", tmp_path / "u.json", "--data_dir", tmp_path / "w",
                         "--out_dir", tmp_path / "o"], "--data_dir: the synthetic world's"),
                       (bench[:3] + ["--data", tmp_path / "u.json", "--n_train", 5], "--n_train: the synthetic world's"),
                       (["--train", "--preset", "tiny", "--llm_ckpt", mk_hf["root"] / "qwen3", "--no-compact_vocab",
                         "--out_dir", tmp_path / "o", "--data_dir", d / "data"], "--no-compact_vocab: with --llm_ckpt")]:
        _mk_user_error(argv, want)
    assert not (tmp_path / "o").exists() and not (tmp_path / "bd").exists()
    mk.parse_args(["--bench", "--grad_accum", "1", "--freeze_vision", "--feature_cache"])  # what runs anyway
    saved = json.load(open(d / "out" / "config.json"))["config"]  # the run's own value passes, in every mode
    mk.load_checkpoint(str(d / "out"), {"max_steps": saved["max_steps"], "data_dir": saved["data_dir"]}, "--predict")


def test_mk_original_preset_has_the_mark1_bridge():
    """The Mark-1 project's bridge: one cross-attention of its 32 + 5 queries over the video, 8 heads, one BERT layer
    (width 1024, 16 heads, 4096 inner): 31.24M parameters with its towers' widths (video 1408, LLM 1024)."""
    cfg = mk.Config(**mk.PRESETS["original"])
    assert cfg.bridge_layers == 1 and (cfg.n_visual_query, cfg.n_temporal_query, cfg.bridge_heads) == (32, 5, 8)
    with torch.device("meta"):
        bridge = mk.Bridge(cfg, 1408, 1024, cfg.v_tubelet, cfg.crop // 16)
    assert len(bridge.xattn) == 1 and sum(p.numel() for p in bridge.parameters()) == 31_240_208
    # its learning rate 5e-5 warms up, then decays along the cosine to 0, as the project's scheduler does
    lrs = [mk.lr_at(s, cfg) for s in range(cfg.max_steps + 1)]
    peak = lrs.index(max(lrs))
    assert max(lrs) == pytest.approx(5e-5) and lrs[-1] == 0.0 and all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))


# ====================================================================================================================
# 5. attention_basics.py
# ====================================================================================================================
import json
import math
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attention_basics as ab


def _ab_tiny(tmp_path, **kw):
    return ab.Config(**{**ab.PRESETS["tiny"], "data_dir": str(tmp_path / "data"), "out_dir": str(tmp_path / "out"),
                        **kw})


def _ab_main(capsys, *argv):
    """attention_basics.main(argv) in-process -> (exit status, stdout, last line of stderr)."""
    try:
        ab.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out, (err.strip().splitlines() or [""])[-1]


def _ab_user_error(capsys, needle, *argv):
    """A user error through main(): exit status 2, one line on stderr that names the input, no traceback."""
    code, _, last = _ab_main(capsys, *argv)
    assert code == 2 and needle in last and last.startswith("error: "), (code, last)


@pytest.mark.parametrize("causal", [False, True])
def test_ab_manual_attention_equals_sdpa_float64(causal):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 7, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, 4, 7, 16, generator=g, dtype=torch.float64) for _ in range(2))
    out, w = ab.attention(q, k, v, causal=causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    assert torch.allclose(w.sum(-1), torch.ones_like(w.sum(-1)), atol=1e-12)
    # a random boolean mask (every row keeps at least one key), against SDPA with the same mask
    keep = torch.rand(3, 1, 7, 7, generator=g) > 0.4
    keep[..., 0] = True
    assert torch.allclose(ab.attention(q, k, v, keep)[0], F.scaled_dot_product_attention(q, k, v, attn_mask=keep),
                          atol=1e-12, rtol=0)
    # the module: written path == SDPA path, self- and cross-attention
    for d_ctx in (None, 24):
        m = ab.MultiHeadAttention(32, 4, d_ctx=d_ctx, sdpa=False).double()
        x = torch.randn(2, 5, 32, dtype=torch.float64)
        ctx = None if d_ctx is None else torch.randn(2, 9, 24, dtype=torch.float64)
        y = m(x, ctx, causal=causal and d_ctx is None)
        m.sdpa = True
        assert torch.allclose(y, m(x, ctx, causal=causal and d_ctx is None), atol=1e-12, rtol=0)


def test_ab_blocks_follow_their_formulas():
    """A pre-norm block is x + attn(ln1(x)), then + mlp(ln2(x)), each branch behind its own norm; a gated block is
    x + tanh(a) * xattn(ln(x), media) (zero for tokens with no media yet), then + tanh(b) * ff(ln_ff(x)), each gate on
    its own branch. Written out here with F.layer_norm and torch.tanh on the blocks' own weights."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(5)
    ln = lambda m, t: F.layer_norm(t, t.shape[-1:], m.weight, m.bias)  # noqa: E731
    blk = ab.Block(16, 2, causal=True, sdpa=False).double()
    gated = ab.GatedCrossAttention(16, 16, 2, sdpa=False).double()
    for m in (blk.ln1, blk.ln2, gated.ln, gated.ln_ff):  # norms that differ from each other and from the identity
        m.weight.data = 1 + torch.randn(16, generator=g, dtype=torch.float64)
        m.bias.data = torch.randn(16, generator=g, dtype=torch.float64)
    x = torch.randn(2, 5, 16, generator=g, dtype=torch.float64)
    with torch.no_grad():
        h = x + blk.attn(ln(blk.ln1, x), causal=True)
        assert torch.allclose(blk(x), h + blk.mlp.proj(F.gelu(blk.mlp.fc(ln(blk.ln2, h)))), atol=1e-12)
        gated.attn_gate.data.fill_(0.8), gated.ff_gate.data.fill_(-0.5)
        media = torch.randn(2, 6, 16, generator=g, dtype=torch.float64)
        loc = torch.zeros(2, 5, dtype=torch.bool)
        loc[0, 2], loc[1, 0] = True, True  # row 0: tokens 0, 1 come before any media
        mask = ab.media_attention_mask(loc, 6)
        read = gated.attn(ln(gated.ln, x), media, mask=mask) * mask.any(-1, keepdim=True)
        h = x + math.tanh(0.8) * read
        want = h + math.tanh(-0.5) * gated.ff(ln(gated.ln_ff, h))
        assert torch.allclose(gated(x, media, mask), want, atol=1e-12)


def test_ab_padding_mask_never_leaks():
    """Padded keys get weight exactly 0 and changing their keys/values (even to huge numbers) changes nothing,
    neither in the written attention nor in a text encoder that pools at the EOS position."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    keep = (torch.arange(6)[None] < torch.tensor([6, 3])[:, None])[:, None, None, :]  # (B, 1, 1, N)
    out, w = ab.attention(q, k, v, keep)
    assert (w[1, ..., 3:] == 0).all()
    k2, v2 = k.clone(), v.clone()
    k2[1, :, 3:], v2[1, :, 3:] = 1e8, -1e8
    out2 = ab.attention(q, k2, v2, keep)[0]
    assert torch.equal(out2[1], out[1]) and torch.isfinite(out2).all()
    # float32 and bfloat16 too: the finite minimum of each dtype
    for dt in (torch.float32, torch.bfloat16):
        o = ab.attention(q.to(dt), k2.to(dt), v2.to(dt), keep)[0]
        assert torch.isfinite(o).all()
        assert torch.allclose(o[1].double(), out[1], atol=0.05)
    # a fully masked row is finite, not NaN
    assert torch.isfinite(ab.attention(q, k, v, torch.zeros(2, 1, 1, 6, dtype=torch.bool))[0]).all()
    # padding after EOS never changes the CLIP text embedding
    cfg = ab.Config(**ab.PRESETS["tiny"])
    enc = ab.TextEncoder(cfg, 20).eval()
    ids = torch.tensor([[0, 5, 6, 0, 0, 0], [0, 7, 8, 9, 4, 0]])
    lengths = torch.tensor([4, 6])
    a = enc(ids, lengths)
    ids2 = ids.clone()
    ids2[0, 4:] = torch.tensor([11, 12])
    assert torch.equal(enc(ids2, lengths)[0], a[0])


def test_ab_patchify_round_trip():
    for S, p in ((32, 8), (16, 4), (12, 3)):
        img = torch.randn(2, 3, S, S)
        patches = ab.patchify(img, p)
        assert patches.shape == (2, (S // p) ** 2, 3 * p * p)
        assert torch.equal(ab.unpatchify(patches, p), img)
        # patch (row 1, col 0) is the square img[:, :, p:2p, 0:p], channels first
        assert torch.equal(patches[:, S // p], img[:, :, p:2 * p, :p].reshape(2, -1))


def test_ab_vit_token_zero_is_cls_and_clip_reads_it():
    """Token 0 of the ViT is the learned CLS token (it carries no patch), tokens 1.. are the patches in order; CLIP's
    image embedding, the one zero-shot classification uses, is the normalised projection of that CLS token. With no
    blocks the tokens can be written out by hand."""
    cfg = ab.Config(**{**ab.PRESETS["tiny"], "n_vit_layer": 0})
    torch.manual_seed(0)
    clip = ab.CLIP(cfg, 20).eval()
    vit = clip.vision
    img = torch.randn(2, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(0))
    ln = lambda t: F.layer_norm(t, t.shape[-1:], vit.ln.weight, vit.ln.bias)  # noqa: E731
    with torch.no_grad():
        tokens = vit(img)
        cls = ln(vit.cls[0, 0] + vit.pos[0, 0])  # (D,): the same for every image
        assert torch.allclose(tokens[:, 0], cls.expand(2, -1), atol=1e-6)
        patches = ln(ab.patchify(img, cfg.patch) @ vit.embed.weight.t() + vit.embed.bias + vit.pos[0, 1:])
        assert torch.allclose(tokens[:, 1:], patches, atol=1e-5)
        assert torch.allclose(clip.encode_image(img), F.normalize(clip.img_proj(cls), dim=-1).expand(2, -1), atol=1e-6)


def test_ab_infonce_hand_computed():
    # 2 pairs, embeddings already unit length: cosines [[1, 0.6], [0.8, 0.6]]... built from explicit vectors
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    txt = torch.tensor([[0.8, 0.6], [0.0, 1.0]])
    scale = 2.0
    s = [[scale * sum(a * b for a, b in zip(i, t)) for t in txt.tolist()] for i in img.tolist()]  # logits by hand
    i2t = [-math.log(math.exp(s[r][r]) / (math.exp(s[r][0]) + math.exp(s[r][1]))) for r in range(2)]
    t2i = [-math.log(math.exp(s[c][c]) / (math.exp(s[0][c]) + math.exp(s[1][c]))) for c in range(2)]
    hand = (sum(i2t) / 2 + sum(t2i) / 2) / 2
    got = ab.clip_loss(img * 3.0, txt * 0.5, torch.tensor(math.log(scale)))  # norms do not matter
    assert abs(got.item() - hand) < 1e-6
    # duplicate-aware targets with no duplicates == the plain loss
    assert torch.allclose(ab.clip_loss(img, txt, torch.tensor(math.log(scale)), torch.eye(2, dtype=torch.bool)), got)
    # the temperature is learnable: a gradient reaches logit_scale
    ls = torch.tensor(0.0, requires_grad=True)
    ab.clip_loss(img, txt, ls).backward()
    assert ls.grad is not None and ls.grad != 0


def test_ab_resampler_size_independent_of_frames():
    torch.manual_seed(0)
    res = ab.PerceiverResampler(32, 4, 64, 2, 16, sdpa=True)
    shapes = {res(torch.randn(2, f, 5, 32)).shape for f in (1, 2, 7, 16)}
    assert shapes == {torch.Size([2, 64, 32])}
    with pytest.raises(ab.UserError):
        res(torch.randn(1, 17, 5, 32))  # more frames than time embeddings: a clear error, not an index crash
    # time embeddings make the order of frames matter (more than float noise: without them it is a set)
    x = torch.randn(1, 3, 5, 32)
    assert (res(x) - res(x.flip(1))).abs().max() > 1e-2


def test_ab_resampler_layer_by_hand():
    """One resampler layer written out: time embeddings added per frame, latents attend to [frame tokens; latents]
    (keys F*P+Q wide: the latents also read each other), with a residual around the attention and the MLP, then the
    final norm."""
    torch.manual_seed(0)
    res = ab.PerceiverResampler(16, 2, 4, 1, 8, sdpa=False).double()
    g = torch.Generator().manual_seed(1)
    res.time.data = torch.randn(8, 1, 16, generator=g, dtype=torch.float64)
    x = torch.randn(2, 3, 5, 16, generator=g, dtype=torch.float64)  # (B, F, P, D)
    layer = res.layers[0]
    with torch.no_grad():
        frames = (x + res.time[:3]).reshape(2, 15, 16)  # (B, F*P, D)
        lat = res.latents.expand(2, -1, -1)  # (B, Q, D)
        q = layer.ln_q(lat)
        lat = lat + layer.attn(q, torch.cat([layer.ln_x(frames), q], 1))
        lat = lat + layer.ff(layer.ln_ff(lat))
        ab.set_record(res, True)
        assert torch.allclose(res(x), res.ln(lat), atol=1e-12)
    w = layer.attn.weights  # (B, Q, F*P+Q), averaged over heads
    assert w.shape == (2, 4, 15 + 4) and (w[..., 15:] > 0).all()


def test_ab_zero_gate_leaves_lm_unchanged_bit_for_bit():
    torch.manual_seed(0)
    cfg = ab.Config(**ab.PRESETS["tiny"])
    lm = ab.Decoder(cfg, 30, 12, xattn=True).eval()
    ids = torch.randint(0, 30, (3, 9))
    media = torch.randn(3, 16, cfg.d_model) * 100
    loc = torch.zeros(3, 9, dtype=torch.bool)
    loc[:, 0], loc[:, 4] = True, True
    mask = ab.media_attention_mask(loc, 8)
    with torch.no_grad():
        plain, _ = lm(ids)
        gated, _ = lm(ids, media=media, media_mask=mask)
    assert torch.equal(plain, gated)
    # a plain LM with the same weights (built without the gated layers) gives the same logits too
    plain_lm = ab.Decoder(cfg, 30, 12, xattn=False).eval()
    plain_lm.load_state_dict({k: v for k, v in lm.state_dict().items() if not k.startswith("xattn.")})
    with torch.no_grad():
        assert torch.equal(plain_lm(ids)[0], plain)
    # and the gates do matter once opened
    lm.xattn[0].attn_gate.data.fill_(0.5)
    with torch.no_grad():
        assert not torch.allclose(lm(ids, media=media, media_mask=mask)[0], plain)


def test_ab_media_mask_latest_media_only():
    Q = 3
    loc = torch.tensor([[0, 1, 0, 0, 1, 0, 1, 0], [1, 0, 0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    mask = ab.media_attention_mask(loc, Q)  # (B, L, M*Q) with M = 3
    assert mask.shape == (2, 8, 9)
    latest = [[0, 1, 1, 1, 2, 2, 3, 3], [1] * 8]  # hand-written: the latest media at or before each token
    for b in range(2):
        for i in range(8):
            want = torch.zeros(9, dtype=torch.bool)
            if latest[b][i]:
                want[(latest[b][i] - 1) * Q:latest[b][i] * Q] = True
            assert torch.equal(mask[b, i], want), (b, i)
    # inside a gated block: a token's output depends on its latest media only, and not at all before the first
    torch.manual_seed(0)
    blk = ab.GatedCrossAttention(16, 16, 2, sdpa=False)
    blk.attn_gate.data.fill_(1.0)
    x, media = torch.randn(2, 8, 16), torch.randn(2, 9, 16)
    y = blk(x, media, mask)
    for m in range(3):
        media2 = media.clone()
        media2[:, m * Q:(m + 1) * Q] += 5.0
        changed = ~torch.isclose(blk(x, media2, mask), y).all(-1)  # (B, L)
        assert torch.equal(changed[0], torch.tensor(latest[0]) == m + 1), m


def test_ab_sampling_helpers_and_metric(tmp_path):
    assert ab.subsample(72, 24, 3) == list(range(0, 72, 8))
    assert ab.fixed_clips([0, 8, 16, 24, 32], 2) == [[0, 8], [16, 24], [32, 32]]
    assert ab.sample_indices(16, 4) == [2, 6, 10, 14]
    assert ab.sample_indices(2, 4) == [0, 0, 1, 1]
    with pytest.raises(ab.UserError, match="video has no frames"):  # a clip of none is refused before sampling
        ab.load_video(str(tmp_path), 4, 32)
    assert ab.exact_match(["a red circle moves left", "A blue  square moves up."],
                          ["a red circle moves left", "a blue square moves down"]) == 0.5


def test_ab_pixels_colours_and_centre_crop(tmp_path):
    """Pixels are normalised as (x / 255 - MEAN) / STD and moved channels first; images and video frames come out
    RGB (OpenCV decodes BGR) and a wide picture is cropped to its centre square, not its left one."""
    x = torch.tensor([[[[0, 255, 51]]]], dtype=torch.uint8)  # (1, 1, 1, 3): one pixel
    assert torch.allclose(ab.to_pixels(x).flatten(), torch.tensor([-1.8, 2.2, -1.0]), atol=1e-6)
    assert ab.to_pixels(torch.zeros(2, 4, 6, 6, 3, dtype=torch.uint8)).shape == (2, 4, 3, 6, 6)
    wide = np.zeros((32, 96, 3), np.uint8)  # BGR: blue | red | green thirds
    wide[:, :32], wide[:, 32:64], wide[:, 64:] = (255, 0, 0), (0, 0, 255), (0, 255, 0)
    cv2.imwrite(str(tmp_path / "wide.png"), wide)
    assert (ab.load_image(str(tmp_path / "wide.png"), 16) == np.array([255, 0, 0], np.uint8)).all()  # red, in RGB
    w = cv2.VideoWriter(str(tmp_path / "wide.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 8, (96, 32))
    for _ in range(4):
        w.write(wide)
    w.release()
    frames = ab.load_video(str(tmp_path / "wide.mp4"), 2, 16).astype(int)  # (F, S, S, 3), lossy MPEG-4
    centre = frames[:, 4:12, 4:12].reshape(-1, 3).mean(0)
    assert centre[0] > 200 and centre[1] < 60 and centre[2] < 60, centre


def test_ab_world_splits_and_motion_direction(tmp_path):
    """The novel split draws only the held-out (colour, shape) pairs and every other split none of them; a clip
    captioned 'moves right' (or 'down') shows its object going right (or down) from the first frame to the last."""
    rng = random.Random(0)
    for split in ("train", "test", "novel"):
        pairs = {ab.pick_pair(rng, split) for _ in range(300)}
        assert pairs == ab.NOVEL_PAIRS if split == "novel" else pairs == set(ab.CLASSES) - ab.NOVEL_PAIRS
    for motion, axis, sign in (("right", 1, 1), ("left", 1, -1), ("down", 0, 1)):
        path = str(tmp_path / f"{motion}.mp4")
        ab.write_clip(path, random.Random(1), "white", "square", motion)
        first, last = ab.load_video(path, 2, ab.RENDER).astype(int).sum(-1)  # (S, S) brightness of 2 frames
        centre = [np.argwhere(f > 600)[:, axis].mean() for f in (first, last)]  # the white square's centre
        assert sign * (centre[1] - centre[0]) > ab.TRAVEL * 0.4, (motion, centre)


def test_ab_tour_runs(capsys):
    code, out, _ = _ab_main(capsys)
    assert code == 0
    for name in ab.SECTIONS:
        assert f"== {name}" in out
    assert "every check passed" in out and "tour check failed" not in out
    # every section starts from --seed: a section alone prints what it prints in the whole tour (timings aside)
    clip = re.search(r"== clip.*?\n\n", out, re.S).group()
    assert "loss at init" in clip and _ab_main(capsys, "--section", "clip")[1].startswith(clip)
    code, out, _ = _ab_main(capsys, "--section", "perceiver")
    assert code == 0 and "== perceiver" in out and "== clip" not in out
    code, out, _ = _ab_main(capsys, "--section", "patchify", "--img_size", 16, "--patch", 16)  # a single patch
    assert code == 0 and "patch 0 is the top row's last" in out
    code, out, _ = _ab_main(capsys, "--section", "perceiver", "--max_frames", 2)  # shows 24 frames; --n_frames unread
    assert code == 0 and "every check passed" in out
    # the order check runs in float64: with 3 or 6 layers float32 rounding alone exceeded its tolerance (seed 1337)
    for layers in (3, 6):
        assert _ab_main(capsys, "--section", "perceiver", "--n_perceiver_layer", layers)[0] == 0


def test_ab_tour_shapes_use_only_the_legends_letters(capsys):
    """Every letter in a shape the tour prints, such as (B, H, L, d) or (B, (S/p)^2, 3*p*p), is in the module
    docstring's shape legend, which a reader keeps open beside the printed tour."""
    legend = ab.__doc__.split("Shape legend:")[1].split("\n\n")[0]
    code, out, _ = _ab_main(capsys)
    shapes = re.findall(r"\((B[^()]*(?:\([^()]*\)[^()]*)*)\)", out)  # every shape starts with the batch, B
    letters = {sym for shape in shapes for sym in re.findall(r"[A-Za-z]+'?", shape)}
    assert code == 0 and {"B", "H", "d", "S", "p", "Dm", "P'"} <= letters, letters
    assert not [sym for sym in letters if not re.search(rf"(?<![\w']){re.escape(sym)}(?![\w'])", legend)], legend


def test_ab_train_tiny_runs(tmp_path, capsys):
    """--train --preset tiny end to end as a user runs it (a subprocess): real PNG/mp4 files, three checkpoints,
    eval.json in the house shape, heat maps; then --eval and --generate from the checkpoints (in-process)."""
    args = ["--preset", "tiny", "--data_dir", tmp_path / "data", "--out_dir", tmp_path / "out"]
    proc = run_script("attention_basics.py", "--train", *args)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "EM test" in proc.stdout
    clip = tmp_path / "data" / "videos" / "test" / "00000.mp4"
    assert cv2.VideoCapture(str(clip)).read()[0]
    assert cv2.imread(str(tmp_path / "data" / "images" / "train" / "00000.png")) is not None
    res = json.load(open(tmp_path / "out" / "eval.json"))
    assert 0 <= res["test"]["clip"]["zero_shot_accuracy"] <= 1 and res["test"]["clip"]["n"] == 12
    for split in ("test", "novel"):
        for v in ("unified", "cross"):
            assert 0 <= res[split][v]["exact_match"] <= 1 and res[split][v]["n"] == 8
    assert set(res) == {"test", "novel", "train_seconds", "config"} and res["train_seconds"] > 0
    assert all(res["test"][v]["params"] > 0 and res["test"][v]["train_seconds"] > 0
               for v in ("clip", "unified", "cross"))
    assert all(0 < res["test"][v]["params_wiring"] < res["test"][v]["params"] for v in ("unified", "cross"))
    for name in ("attn_unified_text_over_frames", "attn_cross_latents_over_frames", "attn_cross_text_over_frames"):
        assert cv2.imread(str(tmp_path / "out" / f"{name}.png")) is not None
    for name in ("clip", "unified", "cross"):
        assert (tmp_path / "out" / name / "model.safetensors").exists()
    assert _ab_main(capsys, "--eval", *args)[0] == 0
    again = json.load(open(tmp_path / "out" / "eval.json"))["test"]["cross"]
    assert again.pop("gen_tokens_per_s") > 0 and res["test"]["cross"].pop("gen_tokens_per_s") > 0
    assert again == res["test"]["cross"]  # same weights, same clips: the same captions and metrics
    code, out, _ = _ab_main(capsys, "--generate", "--video", clip, "--variant", "unified", *args)
    model, tok, cfg, _ = ab.load_model(_ab_tiny(tmp_path), "unified")
    frames = torch.from_numpy(ab.load_video(str(clip), cfg.n_frames, cfg.img_size))[None]
    want = tok.decode(ab.generate(model, frames, cfg, "cpu")[0])
    assert code == 0 and out.splitlines()[-1] == want != "" and out.splitlines()[-2].startswith("config: ")


def test_ab_eval_and_generate_print_the_config_that_runs(tmp_path, capsys):
    """--eval and --generate print the config that runs, the checkpoint's (not the preset's defaults)."""
    out_dir = tmp_path / "out"
    assert _ab_main(capsys, "--train", "--preset", "tiny", "--data_dir", tmp_path / "data", "--out_dir", out_dir)[0] == 0
    for argv in (["--eval"], ["--generate", "--video", tmp_path / "data" / "videos" / "test" / "00000.mp4"]):
        code, out, _ = _ab_main(capsys, *argv, "--data_dir", tmp_path / "data", "--out_dir", out_dir)
        printed = json.loads(out.split("config: ", 1)[1].splitlines()[0])
        assert code == 0 and printed["d_model"] == ab.PRESETS["tiny"]["d_model"] != ab.Config.d_model
    assert json.load(open(out_dir / "eval.json"))["config"] == printed  # eval.json records the config it scored


def test_ab_checkpoint_round_trip(tmp_path):
    cfg = _ab_tiny(tmp_path)
    tok = ab.Tokenizer.from_texts(["a red circle moves left", "a blue square moves up"])
    for variant in ("unified", "cross"):
        torch.manual_seed(0)
        m = ab.Captioner(cfg, len(tok.ids), variant).eval()
        for blk in getattr(m.decoder, "xattn", None) or []:
            blk.attn_gate.data.fill_(0.3)  # non-zero so the media matters
        ab.save_model(m, tok, cfg, variant, 1.0)
        m2, tok2, cfg2, secs = ab.load_model(cfg, variant)
        frames = torch.randint(0, 255, (2, cfg.n_frames, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8)
        ids = torch.tensor([tok.encode("a red circle")[:-1]] * 2)
        with torch.no_grad():
            assert torch.equal(m(m.encode(frames), ids)[0], m2.eval()(m2.encode(frames), ids)[0])
        assert tok2.ids == tok.ids and secs == 1.0
        assert ab.generate(m, frames, cfg, "cpu") == ab.generate(m2, frames, cfg, "cpu")
    saved = json.load(open(os.path.join(cfg.out_dir, "cross", "config.json")))["config"]
    assert not set(saved) & set(ab.RUN_FIELDS), "how to run (paths, device, mode) is not saved as if it were the model"


def test_ab_every_module_initialises_itself():
    """Built alone or inside a model, each module comes out with the explicit init and no call after construction:
    biases 0 (PyTorch's default would be uniform, non-zero), LayerNorms the identity, weights at std 0.02, the
    resampler's queries/keys at std 0.3, gates closed."""
    cfg = ab.Config(**ab.PRESETS["tiny"])
    d = cfg.d_model
    built = [ab.MultiHeadAttention(d, 2, d_ctx=24), ab.MLP(d), ab.Block(d, 2), ab.ViT(cfg), ab.TextEncoder(cfg, 30),
             ab.CLIP(cfg, 30), ab.PerceiverResampler(d, 2, 8, 2, 8), ab.GatedCrossAttention(d, d, 2),
             ab.Decoder(cfg, 30, 12, xattn=True), ab.Captioner(cfg, 30, "unified"), ab.Captioner(cfg, 30, "cross")]
    for module in built:
        sharp = {id(w) for m in module.modules() if isinstance(m, ab.PerceiverResampler)
                 for layer in m.layers for w in (layer.attn.q.weight, layer.attn.kv.weight)}
        for m in module.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                assert torch.equal(m.bias, torch.zeros_like(m.bias)), type(module).__name__
            if isinstance(m, torch.nn.LayerNorm):
                assert torch.equal(m.weight, torch.ones_like(m.weight)), type(module).__name__
            if isinstance(m, torch.nn.Linear) and m.weight.numel() >= 256:
                std = m.weight.std().item()
                assert (0.2 < std < 0.4) if id(m.weight) in sharp else (0.01 < std < 0.03), (type(module).__name__, std)
            if isinstance(m, ab.GatedCrossAttention):
                assert m.attn_gate.item() == 0 and m.ff_gate.item() == 0
    # an init pass reads the global random stream without advancing it, so the passes of nested parts leave the
    # outermost pass the very numbers a single pass after construction would draw
    model, state = built[-1], torch.get_rng_state()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.init_weights()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("variant", ["unified", "cross"])
def test_ab_caption_logits_are_causal_over_the_text(variant):
    """The logits at text position i read tokens 0..i: changing token 3 leaves positions 0..2 exactly as they were
    and changes position 3 (the prediction of token 4 must see token 3; with the unified prefix, the logits are read
    after the visual positions, never at them)."""
    cfg = ab.Config(**ab.PRESETS["tiny"])
    torch.manual_seed(0)
    m = ab.Captioner(cfg, 12, variant).eval()
    for blk in getattr(m.decoder, "xattn", None) or []:
        blk.attn_gate.data.fill_(0.5)
    frames = torch.randint(0, 255, (1, cfg.n_frames, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[0, 4, 5, 6, 7, 8]])
    ids2 = ids.clone()
    ids2[0, 3] = 9
    with torch.no_grad():
        visual = m.encode(frames)
        a, b = m(visual, ids)[0], m(visual, ids2)[0]  # (1, L, V)
    assert a.shape == (1, 6, 12)
    assert torch.allclose(a[:, :3], b[:, :3], atol=1e-6, rtol=0) and not torch.allclose(a[:, 3], b[:, 3])


@pytest.mark.parametrize("variant", ["unified", "cross"])
def test_ab_overfit_one_batch_and_batch_equals_rows(variant):
    """Each wiring memorises 4 captions of 4 clips (two share all but the last word, so the decoder must read the
    video), then captions and logits of the batch equal those of its rows run one by one."""
    cfg = ab.Config(**ab.PRESETS["tiny"])
    caps = ["a red circle moves left", "a red circle moves right", "a blue square moves up",
            "a green triangle moves down"]
    tok = ab.Tokenizer.from_texts(caps)
    inp, tgt = ab.caption_batch(tok, caps, cfg)
    torch.manual_seed(0)
    m = ab.Captioner(cfg, len(tok.ids), variant)
    frames = torch.randint(0, 255, (4, cfg.n_frames, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    gates = [p for n, p in m.named_parameters() if n.endswith("_gate")]
    rest = [p for n, p in m.named_parameters() if not n.endswith("_gate")]
    opt = torch.optim.AdamW([dict(params=rest, lr=3e-3), dict(params=gates, lr=5e-2)], weight_decay=0.0)
    for _ in range(80):
        loss = m(m.encode(frames), inp, tgt)[1]
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.2
    m.eval()
    batch = ab.generate(m, frames, cfg, "cpu")
    assert batch == [tok.encode(c)[1:-1] for c in caps]  # every caption exactly: the video was read
    assert batch == [ab.generate(m, frames[i:i + 1], cfg, "cpu")[0] for i in range(4)]
    with torch.no_grad():
        logits = m(m.encode(frames), inp)[0]
        for i in range(4):
            assert torch.allclose(m(m.encode(frames[i:i + 1]), inp[i:i + 1])[0], logits[i:i + 1], atol=1e-5)


def test_ab_corrupt_checkpoints_are_one_line(tmp_path):
    """A truncated model.safetensors, a config.json that is not an object, with unknown keys or with values no flag
    could give: a UserError naming the file, never a traceback from deep inside the loader."""
    cfg = _ab_tiny(tmp_path)
    tok = ab.Tokenizer.from_texts(["a red circle moves left"])
    ab.save_model(ab.Captioner(cfg, len(tok.ids), "cross"), tok, cfg, "cross", 1.0)
    d = os.path.join(cfg.out_dir, "cross")
    cpath, wpath = os.path.join(d, "config.json"), os.path.join(d, "model.safetensors")
    good_c, good_w = open(cpath).read(), open(wpath, "rb").read()
    open(wpath, "wb").write(good_w[: len(good_w) // 2])
    with pytest.raises(ab.UserError, match="model.safetensors: not a readable safetensors"):
        ab.load_model(cfg, "cross")
    open(wpath, "wb").write(good_w)
    for text, needle in [("[1, 2]", "not a checkpoint config"),
                         (good_c.replace('"config": {', '"config": 3, "x": {'), "not a checkpoint config"),
                         (good_c.replace('"d_model"', '"d_modle"'), "unknown config keys \\['d_modle'\\]"),
                         ("{nope", "not valid JSON")]:
        open(cpath, "w").write(text)
        with pytest.raises(ab.UserError, match=needle):
            ab.load_model(cfg, "cross")
    meta = json.loads(good_c)  # hand-edited values: each was a traceback (a TypeError, a reshape at the first step)
    for key, value, needle in (("d_model", "32", "--d_model '32': must be of type int"),
                               ("data_dir", 5, "--data_dir 5: must be of type str"), ("steps", -1, "--steps must be"),
                               ("n_head", 5, "--d_model 32 is not a multiple of --n_head 5"),
                               ("lr", 0, "--lr must be a number > 0 \\(0.0\\)")):  # JSON's 0 in a float field
        open(cpath, "w").write(json.dumps({**meta, "config": {**meta["config"], key: value}}))
        with pytest.raises(ab.UserError, match=f"config.json: {needle}.*the checkpoint is damaged"):
            ab.load_model(cfg, "cross")
    open(cpath, "w").write(json.dumps({**meta, "config": {**meta["config"], "weight_decay": 0}}))  # JSON's 0: valid
    ab.load_model(cfg, "cross")
    open(cpath, "w").write(good_c)
    ab.load_model(cfg, "cross")  # restored: loads again
    # a token table one entry short of the saved embedding (a hand-edited config.json): mis-shaped, one line
    open(cpath, "w").write(json.dumps({**meta, "vocab": meta["vocab"][:-1]}))
    with pytest.raises(ab.UserError, match=r"does not fit \(missing \[\], unexpected \[\], mis-shaped \['decoder.tok"):
        ab.load_model(cfg, "cross")
    for vocab in ("x" * len(meta["vocab"]), ["a"] * len(meta["vocab"]), [99999] * len(meta["vocab"]), None):
        open(cpath, "w").write(json.dumps({**meta, "vocab": vocab}))  # each was a traceback at the first decode
        with pytest.raises(ab.UserError, match="'vocab' is not a list of GPT-2 ids"):
            ab.load_model(cfg, "cross")
    open(cpath, "w").write(good_c)
    clip = {k: v.contiguous() for k, v in ab.CLIP(cfg, len(tok.ids)).state_dict().items()}
    save_file(clip, wpath)  # another model's weights, without the decoder's embedding: it was a KeyError
    with pytest.raises(ab.UserError, match="does not fit"):
        ab.load_model(cfg, "cross")


def test_ab_eval_refuses_checkpoints_of_different_runs(tmp_path):
    """--eval scores the three checkpoints together on the clip run's world: a captioner copied in from a run with
    other settings or another token table is refused in one line (other clip lengths were a traceback)."""
    cfg, other = _ab_tiny(tmp_path), _ab_tiny(tmp_path, n_frames=2)
    tok, tok2 = ab.Tokenizer.from_texts(["a red circle moves left"]), ab.Tokenizer.from_texts(["a blue square"])
    ab.save_model(ab.CLIP(cfg, len(tok.ids)), tok, cfg, "clip", 1.0)
    for variant in ("unified", "cross"):
        ab.save_model(ab.Captioner(cfg, len(tok.ids), variant), tok, cfg, variant, 1.0)
    for cfg_b, tok_b, needle in ((other, tok, "clip and unified were"), (cfg, tok2, "clip and unified were")):
        ab.save_model(ab.Captioner(cfg_b, len(tok_b.ids), "unified"), tok_b, cfg_b, "unified", 1.0)
        with pytest.raises(ab.UserError, match=f"{needle} saved by different --train runs"):
            ab.evaluate_saved(cfg, {})


def test_ab_bad_inputs(tmp_path, capsys):
    _ab_user_error(capsys, "--section nope", "--section", "nope")
    _ab_user_error(capsys, "--preset: invalid choice: 'huge'", "--preset", "huge")
    _ab_user_error(capsys, "--variant both", "--variant", "both")
    _ab_user_error(capsys, "no checkpoint", "--eval", "--out_dir", tmp_path / "none")
    _ab_user_error(capsys, "--generate needs --video", "--generate")
    _ab_user_error(capsys, "--patch must be at least 1", "--train", "--patch", "0")  # before any division by it
    _ab_user_error(capsys, "--n_head must be at least 1", "--train", "--n_head", "0")
    for device in ("xyz",) + (() if torch.cuda.is_available() else ("cuda",)):  # unknown, or not on this machine
        _ab_user_error(capsys, f"--device {device}", "--train", "--device", device, "--data_dir", tmp_path / "d")
    assert not (tmp_path / "d").exists()  # refused before any data was built
    other = tmp_path / "other" / "cross"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"script": "vit_caption", "model": "cross", "config": {}}))
    (other / "model.safetensors").write_bytes(b"x")
    _ab_user_error(capsys, "vit_caption", "--generate", "--video", "x.mp4", "--out_dir", tmp_path / "other")
    # a video that is not a video, and an empty folder of frames
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ab.UserError, match="bad.mp4"):
        ab.load_video(str(bad), 4, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ab.UserError, match="no frames"):
        ab.load_video(str(tmp_path / "empty"), 4, 16)
    # a video cut in half and a JPEG cut short decode part of themselves without an error: refused
    check_cut_off_video(ab, tmp_path)
    cv2.imwrite(str(tmp_path / "a.jpg"), np.random.default_rng(0).integers(0, 255, (24, 24, 3), dtype=np.uint8))
    assert ab.load_image(str(tmp_path / "a.jpg"), 16).shape == (16, 16, 3)
    whole = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "a.jpg").write_bytes(whole[:len(whole) * 6 // 10])
    with pytest.raises(ab.UserError, match="this image is cut off"):
        ab.load_image(str(tmp_path / "a.jpg"), 16)
    # malformed annotation lines name the line
    ann = tmp_path / "ann.txt"
    ann.write_text("a.png\ta red circle\njust-a-path\n")
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ab.UserError, match=r"ann.txt:2"):
        ab.read_annotations(str(ann))
    ann.write_text("clips/b.png\ta blue square\n")  # a missing file: the path looked for, in the file's folder
    with pytest.raises(ab.UserError, match=re.escape(f"ann.txt:1: file not found: {tmp_path / 'clips' / 'b.png'}")):
        ab.read_annotations(str(ann))
    # a NaN loss stops training with a clear line
    cfg = _ab_tiny(tmp_path)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for g in opt.param_groups:
        g["base_lr"] = 0.1
    with pytest.raises(ab.UserError, match="loss became nan"):
        ab.fit(model, opt, 3, lambda step: model(torch.full((1, 2), float("nan"))).sum(), cfg, "probe")


def test_ab_a_world_missing_or_emptied_annotation_file_and_a_missing_video_are_one_line(tmp_path, capsys):
    """A world whose images_train.txt was deleted, or emptied to blank lines (skipped, leaving no entries), after it
    was built, and --generate on a video path that is neither a file nor a folder: each is one line naming the file,
    exit status 2."""
    sizes = dict(n_img_train=1, n_img_test=1, n_train=1, n_test=1, n_novel=1)  # a world of a few files: built fast
    cfg = _ab_tiny(tmp_path, **sizes)
    ab.build_world(cfg)
    ann = tmp_path / "data" / "images_train.txt"
    tiny = ["--train", "--preset", "tiny", "--data_dir", cfg.data_dir, "--out_dir", cfg.out_dir,
            *(a for k, v in sizes.items() for a in (f"--{k}", v))]
    ann.unlink()
    _ab_user_error(capsys, f"error: {ann}: annotation file not found", *tiny)
    ann.write_text("\n  \n\n")
    _ab_user_error(capsys, f"error: {ann}: no entries (expected 'path<TAB>caption' lines)", *tiny)
    assert not os.path.exists(cfg.out_dir)
    tok = ab.Tokenizer.from_texts(["a red circle moves left"])
    ab.save_model(ab.Captioner(cfg, len(tok.ids), "cross"), tok, cfg, "cross", 1.0)
    _ab_user_error(capsys, f"error: {tmp_path / 'nope.mp4'}: no such video file or folder of frames", "--generate",
                   "--video", tmp_path / "nope.mp4", "--out_dir", cfg.out_dir)


def test_ab_bfloat16_autocast_trains(tmp_path, capsys):
    """--dtype bfloat16 runs the products under CPU autocast in bfloat16 (the weights stay float32) and trains all
    three models to an eval.json, as float32 does."""
    sizes = dict(n_img_train=4, n_img_test=2, n_train=4, n_test=2, n_novel=2)  # a world of a few files: built fast
    cfg = _ab_tiny(tmp_path, dtype="bfloat16", **sizes)
    with ab.autocast(cfg, "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    ab.main([str(a) for a in ["--train", "--preset", "tiny", "--dtype", "bfloat16", "--data_dir", cfg.data_dir,
                              "--out_dir", cfg.out_dir, *(a for k, v in sizes.items() for a in (f"--{k}", v))]])
    assert set(json.load(open(os.path.join(cfg.out_dir, "eval.json")))["test"]) == {"clip", "unified", "cross"}
    weights = load_file(os.path.join(cfg.out_dir, "cross", "model.safetensors"))
    assert all(w.dtype == torch.float32 for w in weights.values())


def test_ab_annotation_lines_need_exactly_a_path_and_a_caption(tmp_path):
    """A line with a third TAB field or an empty caption is refused naming its line, not read half-way."""
    (tmp_path / "a.png").write_bytes(b"")
    for line in ("a.png\ta red circle\textra", "a.png\t  "):
        (tmp_path / "ann.txt").write_text(f"a.png\ta red circle\n{line}\n")
        with pytest.raises(ab.UserError, match=r"ann.txt:2: expected 'path<TAB>caption'"):
            ab.read_annotations(str(tmp_path / "ann.txt"))


def test_ab_tokenizer_round_trip_leaves_out_bos_and_eos():
    """encode wraps a caption in <|endoftext|> (BOS, EOS); decode gives back the plain text, without them."""
    tok = ab.Tokenizer.from_texts(["a red circle moves left"])
    ids = tok.encode("a red circle")
    assert ids[0] == ids[-1] == ab.EOT and len(ids) == 5
    assert tok.decode(ids) == "a red circle" and tok.decode(ids + [ab.EOT, ab.EOT]) == "a red circle"


def test_ab_models_cast_to_another_dtype_read_pixels_in_it():
    """A CLIP or captioner cast as a whole (.to(torch.bfloat16), .double()) reads its pixels in its own dtype: the
    normalised pixels were float32 whatever the weights were, a dtype error in the patch embedding."""
    cfg = ab.Config(**ab.PRESETS["tiny"])
    frames = torch.randint(0, 255, (2, cfg.n_frames, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8)
    for dtype in (torch.bfloat16, torch.float64):
        assert ab.CLIP(cfg, 20).to(dtype).encode_image(ab.to_pixels(frames[:, 0])).dtype == dtype
        for variant in ("unified", "cross"):
            assert len(ab.generate(ab.Captioner(cfg, 20, variant).to(dtype), frames, cfg, "cpu")) == 2


def test_ab_generate_runs_to_max_len_and_stops_each_row_at_eos():
    """Greedy decoding makes at most max_len - 1 tokens after BOS (a caption of max_len tokens, BOS/EOS included,
    fills the decoder's positions); a row that emits EOS stops there while the others go on."""
    cfg = ab.Config(**ab.PRESETS["tiny"])

    class Stub(torch.nn.Module):  # row 0 never says EOS; row 1 says token 3, then EOS from its third step on
        def encode(self, frames):
            return frames.float()

        def forward(self, visual, ids):
            logits = torch.zeros(ids.size(0), ids.size(1), 5)
            logits[0, :, 2] = 1.0
            logits[1, :, 3 if ids.size(1) < 3 else ab.EOT] = 1.0
            return logits, None

    out = ab.generate(Stub(), torch.zeros(2, 1), cfg, "cpu")
    assert out == [[2] * (cfg.max_len - 1), [3, 3]]


def test_ab_optimizer_groups_and_the_gate_rate(tmp_path, monkeypatch):
    """Weight decay goes on matrices only (not on biases, norms or gates); the captioner trains the CLIP encoder at
    vision_lr, the Flamingo gates at gate_lr and everything else at lr."""
    cfg = _ab_tiny(tmp_path, weight_decay=0.3)
    m = ab.GatedCrossAttention(8, 8, 2)
    opt = ab.make_optimizer([(m.parameters(), 0.1)], cfg)
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    for name, p in m.named_parameters():
        assert decay[id(p)] == (0.3 if name.endswith(".weight") and p.dim() == 2 else 0.0), name
    seen = {}
    monkeypatch.setattr(ab, "fit", lambda model, opt, *a: seen.update(model=model, opt=opt) or 0.0)
    clips = torch.zeros(2, cfg.n_frames, cfg.img_size, cfg.img_size, 3, dtype=torch.uint8)
    tok = ab.Tokenizer.from_texts(["a red circle moves left"])
    data = {"videos": {"train": (["a red circle moves left"] * 2, clips)}}
    vision = ab.ViT(cfg).state_dict()
    ab.train_captioner(cfg, "cross", vision, data, tok, "cpu")
    rate = {id(p): g["lr"] for g in seen["opt"].param_groups for p in g["params"]}
    for name, p in seen["model"].named_parameters():
        want = cfg.vision_lr if name.startswith("vision.") else cfg.gate_lr if name.endswith("_gate") else cfg.lr
        assert rate[id(p)] == want, name


def test_ab_user_folders_and_flag_ranges(tmp_path, capsys):
    """--train writes neither into a folder of the user's (as out_dir or data_dir) nor over a file, and refuses counts
    and rates out of range before any work."""
    mine, afile = tmp_path / "mine", tmp_path / "afile"
    mine.mkdir()
    (mine / "eval.json").write_text('{"my": 1}')
    afile.write_text("x")
    tiny = ["--train", "--preset", "tiny", "--data_dir", tmp_path / "d"]
    _ab_user_error(capsys, "did not write", *tiny, "--out_dir", mine)
    _ab_user_error(capsys, "did not write", *tiny, "--eval", "--out_dir", mine)  # --train --eval trains: refused too
    _ab_user_error(capsys, "a file", *tiny, "--out_dir", afile)
    _ab_user_error(capsys, "world.json", "--train", "--preset", "tiny", "--data_dir", mine, "--out_dir", tmp_path / "o")
    _ab_user_error(capsys, "a file", "--train", "--preset", "tiny", "--data_dir", afile, "--out_dir", tmp_path / "o")
    for where in ("--out_dir", "--data_dir"):  # under a file: no folder can be made there, refused before any work
        _ab_user_error(capsys, "no folder can be made", *tiny, "--out_dir", tmp_path / "o", where, afile / "sub")
    for flag, value in (("--n_dec_layer", 0), ("--max_frames", 0), ("--n_latents", 0), ("--lr", -1), ("--lr", "nan"),
                        ("--max_len", 1), ("--weight_decay", -1), ("--d_model", 2)):
        _ab_user_error(capsys, flag, *tiny, "--out_dir", tmp_path / "o", flag, value)
    _ab_user_error(capsys, "--img_size 16 is not a multiple of --patch 5", "--section", "patchify", "--img_size", 16,
                   "--patch", 5)
    _ab_user_error(capsys, "--n_frames 5: at most --max_frames 4", *tiny, "--out_dir", tmp_path / "o", "--n_frames", 5,
                   "--max_frames", 4)
    sizes = ["--n_frames", "4", "--max_frames", "4", "--out_dir", str(tmp_path / "o")]
    assert ab.parse_args(["--train", *sizes])[1].n_frames == 4  # as many time embeddings as it has: accepted
    assert (mine / "eval.json").read_text() == '{"my": 1}' and afile.read_text() == "x"
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def test_ab_world_only_in_its_own_folder(tmp_path, capsys, monkeypatch):
    """The synthetic world goes only into a folder whose world.json is this script's: the user's, another script's or
    a damaged one is refused and left as it was; a build cut short is written again. A NaN rate, a resampler without
    layers, an empty split and more frames than time embeddings are refused in one line before any work."""
    tiny = ["--train", "--preset", "tiny", "--out_dir", tmp_path / "o"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("notes")
    vc_world = {"train": 1, "val": 1, "test": 1, "novel": 1, "seed": 1337, "version": 2}
    for text in ('{"my": 1}', "{not json", json.dumps(vc_world)):
        (mine / "world.json").write_text(text)
        _ab_user_error(capsys, "world.json", *tiny, "--data_dir", mine)
        assert (mine / "world.json").read_text() == text and (mine / "notes.txt").read_text() == "notes"
        assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "world.json"]
    for flags in (["--weight_decay", "nan"], ["--gate_lr", "inf"], ["--n_perceiver_layer", 0], ["--n_img_train", 0],
                  ["--n_frames", 5, "--max_frames", 4]):
        _ab_user_error(capsys, flags[0], *tiny, "--data_dir", tmp_path / "d", *flags)
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()
    cfg = ab.Config(**{**ab.PRESETS["tiny"], "data_dir": str(tmp_path / "w")})
    _build_world_cut_short(ab, cfg, monkeypatch)
    assert json.load(open(tmp_path / "w" / "world.json"))["version"] == 3
    assert len(ab.read_annotations(str(tmp_path / "w" / "images_train.txt"))) == cfg.n_img_train


def test_ab_unreadable_files_are_one_line(tmp_path):
    """OpenCV and its FFmpeg stay quiet: a video or a frame image they cannot read gives our one line on stderr and
    nothing else (a new process, without the OPENCV_* settings this process took over from the imported scripts)."""
    (tmp_path / "bad.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"x" * 48)  # an mp4 header, no moov atom
    (tmp_path / "frames").mkdir()
    (tmp_path / "frames" / "f0.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 32 + b"\0\0\0\0IEND\xaeB`\x82")  # no IHDR
    code = ("import sys, attention_basics as ab\nfor p in sys.argv[1:]:\n    try:\n        ab.load_video(p, 3, 16)\n"
            "    except ab.UserError as e:\n        print(f'error: {e}', file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "bad.mp4"), str(tmp_path / "frames")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")})
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2 and "bad.mp4" in lines[0] and "f0.png" in lines[1], proc.stderr
    assert all(line.startswith("error: ") for line in lines), proc.stderr


def test_ab_frame_folder_in_natural_order(tmp_path):
    """Frames f0 .. f10 of a folder are read in time order (f2 before f10), not in string order."""
    for i in range(11):
        cv2.imwrite(str(tmp_path / f"f{i}.png"), np.full((20, 20, 3), 20 * i, np.uint8))
    assert [int(f.mean()) for f in ab.load_video(str(tmp_path), 11, 16)] == [20 * i for i in range(11)]
    # every image format OpenCV reads counts, in any case: none of the frames is skipped
    for i, ext in ((3, "webp"), (5, "TIFF"), (7, "tif"), (9, "JPEG")):
        os.remove(tmp_path / f"f{i}.png")
        cv2.imwrite(str(tmp_path / f"f{i}.{ext}"), np.full((20, 20, 3), 20 * i, np.uint8))
    got = [int(f.mean()) for f in ab.load_video(str(tmp_path), 11, 16)]
    assert np.allclose(got, [20 * i for i in range(11)], atol=2), got  # JPEG/WebP: lossy by a level or so


def test_ab_caption_speed_counts_an_eos_only_where_one_was_made(monkeypatch):
    """caption_all's tokens/s: a caption that stopped at EOS made len + 1 tokens; one that ran to max_len made
    max_len - 1 (BOS is given, not generated) and no EOS."""
    cfg = ab.Config(**ab.PRESETS["tiny"])
    rows = [[5, 6], [7] * (cfg.max_len - 1)]  # the first stopped at EOS, the second ran to max_len
    monkeypatch.setattr(ab, "generate", lambda *a: rows)
    clock = iter([0.0, 1.0])
    monkeypatch.setattr(ab.time, "time", lambda: next(clock))
    tok = types.SimpleNamespace(decode=lambda ids: " ".join(map(str, ids)))
    _, tps = ab.caption_all(None, tok, torch.zeros(2, 1), cfg, "cpu")
    assert tps == 3 + cfg.max_len - 1


def test_ab_infonce_both_directions_and_the_temperature_cap():
    """An asymmetric case: image->text and text->image cross-entropies differ, the loss is their mean; captions shared
    by several images spread the target evenly over them; a temperature above CLIP's cap of 100 scores as 100."""
    img = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    txt = torch.tensor([[0.28, 0.96], [1.0, 0.0], [0.8, 0.6]])
    s = (10 * img @ txt.t()).tolist()  # logits at scale 10: cosines [[.28, 1, .8], [.936, .6, .96], [.96, 0, .6]]
    i2t = [math.log(sum(math.exp(x) for x in s[r])) - s[r][r] for r in range(3)]
    t2i = [math.log(sum(math.exp(s[r][c]) for r in range(3))) - s[c][c] for c in range(3)]
    assert abs(sum(i2t) - sum(t2i)) > 0.05  # the two directions really differ here
    got = ab.clip_loss(img, txt, torch.tensor(math.log(10.0)))
    assert abs(got.item() - (sum(i2t) + sum(t2i)) / 6) < 1e-6
    # a batch where images 0 and 1 share a caption: each of them has two positives, a target of 1/2 on each
    same = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    t = [[1 / 2, 1 / 2, 0], [1 / 2, 1 / 2, 0], [0, 0, 1]]  # rows sum to 1 (and so do the columns)
    soft = lambda rows: sum(-t[r][c] * (rows[r][c] - math.log(sum(math.exp(x) for x in rows[r])))  # noqa: E731
                            for r in range(3) for c in range(3)) / 3
    hand = (soft(s) + soft([list(col) for col in zip(*s)])) / 2
    assert abs(ab.clip_loss(img, txt, torch.tensor(math.log(10.0)), same).item() - hand) < 1e-6
    capped = ab.clip_loss(img, txt, torch.tensor(math.log(100.0)))
    assert torch.allclose(ab.clip_loss(img, txt, torch.tensor(math.log(1000.0))), capped)


def test_ab_text_embedding_is_read_at_the_eos_token():
    """The sentence embedding is the feature at the last real position (EOS): under the causal mask it is the only
    position that has read every token, so changing the EOS position's token changes it."""
    enc = ab.TextEncoder(ab.Config(**ab.PRESETS["tiny"]), 20).eval()
    ids, lengths = torch.tensor([[0, 5, 6, 0, 0, 0]]), torch.tensor([4])
    ids2 = ids.clone()
    ids2[0, 3] = 9
    with torch.no_grad():
        assert not torch.allclose(enc(ids2, lengths), enc(ids, lengths))


def test_ab_caption_targets_stop_at_eos():
    """Targets are the inputs shifted by one; positions after each row's EOS are -100 (the pad is no target)."""
    cfg = ab.Config(**ab.PRESETS["tiny"])
    tok = ab.Tokenizer.from_texts(["a red circle", "a dot"])
    inp, tgt = ab.caption_batch(tok, ["a red circle", "a dot"], cfg)
    a, b = tok.encode("a red circle"), tok.encode("a dot")  # [EOT, a, red, circle, EOT], [EOT, a, dot, EOT]
    assert inp.tolist() == [a[:-1], b + [ab.EOT] * (len(a) - len(b) - 1)]
    assert tgt.tolist() == [a[1:], b[1:] + [-100] * (len(a) - len(b))]


def test_ab_learning_rate_schedule_by_hand():
    """Linear warmup over `warmup` steps (the first step already moves), then a cosine to a tenth of the base rate."""
    cfg = ab.Config(**{**ab.PRESETS["tiny"], "warmup": 4})
    lrs = [ab.lr_at(step, 24, 1.0, cfg) for step in range(24)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert lrs[4] == pytest.approx(1.0) and lrs[14] == pytest.approx(0.55) and lrs[23] > 0.1
    assert ab.lr_at(24, 24, 1.0, cfg) == pytest.approx(0.1) == ab.lr_at(99, 24, 1.0, cfg)


def test_ab_fit_clips_the_gradient_norm_to_one():
    """fit clips the global gradient norm at 1.0: the last step's gradients (left in .grad) show it; each step's rate
    is the schedule's at that step, from each group's base rate."""
    cfg = ab.Config(**ab.PRESETS["tiny"])
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4)
    opt = ab.make_optimizer([(model.parameters(), 1e-3)], cfg)
    ab.fit(model, opt, 2, lambda step: (1e3 * model(torch.ones(2, 4))).pow(2).sum(), cfg, "huge")
    assert torch.cat([p.grad.flatten() for p in model.parameters()]).norm() == pytest.approx(1.0, rel=1e-4)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([ab.lr_at(1, 2, 1e-3, cfg)] * 2)  # from base_lr


def test_ab_a_nan_loss_names_its_step_and_the_rates_to_lower(tmp_path):
    """A NaN loss names the step as the log lines number it (from 1) and the rates of the model that diverged: the
    captioners also train at --vision_lr (cross: and --gate_lr); --dtype float32 is offered only where not in use."""
    model = torch.nn.Linear(2, 2)
    batch = lambda step: model(torch.full((1, 2), float("nan") if step == 1 else 1.0)).sum()  # the second step fails
    for name, dtype, fix in (("clip", "float32", "--lr"), ("unified", "float32", "--lr, --vision_lr"),
                             ("cross", "bfloat16", "--lr, --vision_lr, --gate_lr, or train with --dtype float32")):
        cfg = _ab_tiny(tmp_path, dtype=dtype)
        with pytest.raises(ab.UserError, match=f"^{name}: loss became nan at step 2; lower {re.escape(fix)}$"):
            ab.fit(model, ab.make_optimizer([(model.parameters(), 1e-3)], cfg), 3, batch, cfg, name)


def test_ab_log_lines_show_the_lr_flags_rate(tmp_path, capsys):
    """A captioner's log line shows --lr's scheduled rate under "lr", not the first optimizer group's (the CLIP
    encoder's, at --vision_lr)."""
    cfg = _ab_tiny(tmp_path, steps=3, log_interval=1)
    clips = torch.zeros(2, cfg.n_frames, cfg.img_size, cfg.img_size, 3, dtype=torch.uint8)
    tok = ab.Tokenizer.from_texts(["a red circle moves left"])
    data = {"videos": {"train": (["a red circle moves left"] * 2, clips)}}
    ab.train_captioner(cfg, "unified", ab.ViT(cfg).state_dict(), data, tok, "cpu")
    shown = [float(x) for x in re.findall(r"\| lr (\S+) \|", capsys.readouterr().out)]
    assert shown == pytest.approx([ab.lr_at(step, 3, cfg.lr, cfg) for step in range(3)], rel=1e-2), shown


def test_ab_zero_shot_accuracy_and_exact_match_by_hand():
    """Zero-shot accuracy is the share of images whose most similar prompt is their caption (a stub CLIP picks prompts
    0, 1, 2, 5 for four images captioned with prompts 0, 1, 2, 3: 3 of 4); exact match ignores case, spacing and a
    final full stop."""
    prompts = [f"a {c} {s}" for c, s in ab.CLASSES]
    picks = torch.eye(len(prompts))[[0, 1, 2, 5]]  # (4, 18): image i is most similar to prompt picks[i]
    stub = types.SimpleNamespace(encode_text=lambda ids, lengths: torch.eye(len(prompts)),
                                 encode_image=lambda x: picks[:len(x)])
    cfg = ab.Config(**ab.PRESETS["tiny"])
    imgs = torch.zeros(4, cfg.img_size, cfg.img_size, 3, dtype=torch.uint8)
    res = ab.zero_shot(stub, ab.Tokenizer.from_texts(prompts), cfg, imgs, prompts[:4], "cpu")
    assert res["n"] == 4 and res["zero_shot_accuracy"] == 0.75 and res["samples"][0] == {"pred": prompts[0],
                                                                                          "ref": prompts[0]}
    assert ab.exact_match(["A red  circle moves left.", "a dot"], ["a red circle moves left", "a dot."]) == 1.0


def test_ab_learning_rates_must_be_above_zero(capsys):
    for flag in ab.RATES:  # a rate of 0 would train nothing, silently
        _ab_user_error(capsys, f"--{flag} must be a number > 0", f"--{flag}", 0)


def test_ab_a_failed_save_keeps_the_earlier_checkpoint(tmp_path, monkeypatch):
    """A save that dies half-way (disk full, Ctrl-C) leaves the earlier checkpoint's files as they were."""
    cfg = _ab_tiny(tmp_path)
    tok = ab.Tokenizer.from_texts(["a red circle"])
    model = ab.CLIP(cfg, len(tok.ids))
    ab.save_model(model, tok, cfg, "clip", 1.0)
    before = {f.name: f.read_bytes() for f in (tmp_path / "out" / "clip").iterdir()}
    save_file_dies_halfway(ab, monkeypatch)
    with pytest.raises(OSError):
        ab.save_model(model, tok, cfg, "clip", 2.0)
    assert {f.name: f.read_bytes() for f in (tmp_path / "out" / "clip").iterdir() if f.suffix != ".tmp"} == before


def test_ab_frame_tokens_see_their_own_and_the_previous_frame():
    """The unified prefix: frame f's tokens depend on frames f-1 and f only (the motion difference looks back; frame 0
    has none), and each frame's time embedding reaches them."""
    cfg = ab.Config(**{**ab.PRESETS["tiny"], "n_frames": 3})
    torch.manual_seed(0)
    m = ab.Captioner(cfg, 10, "unified").eval()
    frames = torch.randint(0, 255, (1, 3, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8)
    later = frames.clone()
    later[:, 2] = 255 - later[:, 2]  # only the last frame changes
    with torch.no_grad():
        a, b = m.encode(frames).view(1, 3, -1, cfg.d_model), m.encode(later).view(1, 3, -1, cfg.d_model)
        assert torch.equal(a[:, :2], b[:, :2]) and not torch.allclose(a[:, 2], b[:, 2])
        m.time.data[1] += 1.0
        c = m.encode(frames).view(1, 3, -1, cfg.d_model)
    assert torch.equal(c[:, 0], a[:, 0]) and not torch.allclose(c[:, 1], a[:, 1])


# ====================================================================================================================
# 6. README.md: it cannot drift from the code
# ====================================================================================================================
import importlib
import io
import runpy
import shlex
import signal

SCRIPTS = ("videollama_mini", "vit_caption", "video_llava", "mark1", "attention_basics")


def readme_commands():
    """Every `python <script>.py ...` (or `torchrun ... <script>.py ...`) line in the README's fenced code blocks, as
    (script, argv, writes): `writes` lists the paths of a trailing `# writes PATH PATH ...` comment."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    found = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", readme, re.M | re.S):
        for line in block.replace("\\\n", " ").splitlines():
            code, _, comment = line.partition(" #")
            writes = comment.split()[1:] if comment.strip().startswith("writes") else []
            for part in code.split("&&"):
                if not re.match(r"\s*(python3?|torchrun)\s", part):
                    continue  # printed output, pip, bash ...
                words = shlex.split(part)
                names = [os.path.basename(w)[:-3] for w in words if w.endswith(".py")]
                if names and names[0] in SCRIPTS and words[0] in ("python", "python3", "torchrun"):
                    at = next(i for i, w in enumerate(words) if w.endswith(".py"))
                    found.append((names[0], words[at + 1:], writes))
    return found


def test_readme_commands_parse():
    """The script's own parser accepts each README command (nothing runs: parse_args has no side effects)."""
    cmds = readme_commands()
    assert {s for s, _, _ in cmds} == set(SCRIPTS), "the README shows a command for every script"
    for script, argv, _ in cmds:
        mod = importlib.import_module(script)
        try:
            mod.parse_args(argv)
        except SystemExit as e:  # argparse rejects unknown flags and bad values this way
            raise AssertionError(f"README: python {script}.py {' '.join(argv)} does not parse") from e


def test_readme_written_files(tmp_path):
    """Each file the README says a command writes is written when that command runs with the tiny preset (the
    README's paths under the default out_dir/data_dir are looked for under temporary ones)."""
    runs = [(s, a, w) for s, a, w in readme_commands() if w]
    assert runs, "the README names the files at least one command writes"
    for i, (script, argv, writes) in enumerate(runs):
        cfg = importlib.import_module(script).parse_args(argv)[1]
        out, data = tmp_path / f"out{i}", tmp_path / f"data{i}"
        proc = run_script(script + ".py", *argv, "--preset", "tiny", "--out_dir", out, "--data_dir", data)
        assert proc.returncode == 0, proc.stderr[-2000:]
        for path in writes:
            local = path.replace(cfg.out_dir.rstrip("/"), str(out), 1).replace(cfg.data_dir.rstrip("/"), str(data), 1)
            assert os.path.exists(local), f"README: `python {script}.py {' '.join(argv)}` should write {path}"


def test_readme_user_data_examples():
    """Each bring-your-own-data example in the README is exactly the lines a test trains the tiny preset on."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    examples = {k: v for k, v in globals().items() if k.endswith("_USER_DATA_EXAMPLE")}
    assert examples, "the tests keep each README user-data example in a <PREFIX>_USER_DATA_EXAMPLE constant"
    for name, lines in examples.items():
        assert lines.strip() in readme, f"README does not show {name} verbatim"



def test_gpt2_tokenizers_read_special_token_text_as_text():
    """'<|endoftext|>' typed in a caption, a question or an answer is text like any other (tiktoken would refuse it as
    a special token): every GPT-2 tokenizer encodes it without error and decodes it back."""
    text = "a red <|endoftext|> circle"
    for tok in (vm.Tokenizer.from_captions([text]), vc.Tokenizer.from_captions([text]),
                ab.Tokenizer.from_texts([text]), vl.GPT2Table.from_texts([text])):
        assert tok.decode(tok.encode(text)).strip() == text, type(tok).__module__


def test_vl_and_mk_frame_folders_read_every_image_format(tmp_path):
    """A folder of frames in any format OpenCV reads, in any case: no frame is skipped."""
    for i, ext in enumerate(("png", "webp", "PNG", "TIFF")):
        cv2.imwrite(str(tmp_path / f"f{i}.{ext}"), np.full((20, 20, 3), 50 * (i + 1), np.uint8))
    assert [int(f.mean()) for f in mk.load_video(str(tmp_path), 4, 16)[0]] == [50, 100, 150, 200]
    means = [float(f.mean()) for f in vl.load_video(str(tmp_path), 4, 16)]  # CLIP-normalised: brighter, higher
    assert means == sorted(means) and len(set(means)) == 4


@pytest.mark.parametrize("mod", [ab, vc, vm, vl, mk], ids=lambda m: m.__name__)
def test_tiny_preset_keeps_a_world_of_its_own(mod):
    """`--preset tiny` (the README's toy runs) writes its synthetic world to a folder of its own, so it never rebuilds
    the default run's world in data/<script> at toy size."""
    tiny, default = mod.Config(**mod.PRESETS["tiny"]), mod.Config()
    assert tiny.data_dir.endswith("_tiny") and tiny.data_dir != default.data_dir


@pytest.mark.parametrize("mod", [ab, vc, vm, vl, mk], ids=lambda m: m.__name__)
@pytest.mark.parametrize("where", ["link", "link/sub"])
def test_an_out_dir_behind_a_broken_link_is_refused_before_any_work(mod, where, tmp_path):
    """An --out_dir that is, or lies under, a symbolic link to nothing (a drive not mounted) looked like a folder that
    could be made: the run built its world and trained, then failed at its first save. Now refused at once."""
    os.symlink(tmp_path / "unmounted", tmp_path / "link")
    try:
        mod.main(["--train", "--preset", "tiny", "--data_dir", str(tmp_path / "d"), "--out_dir", str(tmp_path / where)])
        code = 0
    except SystemExit as e:  # the scripts whose main() prints the line and exits
        code = e.code
    except mod.UserError:  # the scripts whose command line does that around main()
        code = 2
    assert code == 2 and os.listdir(tmp_path) == ["link"]  # no world built, nothing written


@pytest.mark.parametrize("mod", [ab, vc, vm, vl, mk], ids=lambda m: m.__name__)
def test_a_world_written_into_a_folder_whose_name_is_not_utf8(mod, tmp_path):
    """OpenCV's writers were given the name as a str: a folder whose name is not UTF-8 (from an old zip) crashed the
    process with a segmentation fault, no message. They get the name's bytes now, as its readers do."""
    d = os.fsdecode(os.fsencode(str(tmp_path)) + b"/w\xe9")  # the byte 0xE9 alone: Latin-1's e-acute
    mod.build_world(mod.Config(**{**mod.PRESETS["tiny"], "data_dir": d}))
    media = [os.path.join(r, n) for r, _, ns in os.walk(d) for n in ns if n.endswith((".png", ".mp4"))]
    assert media and all(os.path.getsize(m) > 0 for m in media)


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_during_training_is_one_line(script, tmp_path):
    """Ctrl-C (SIGINT) in the middle of a training run: one line on stderr and exit status 130, not a traceback."""
    steps = ["--clip_steps" if script == "attention_basics" else "--max_steps", "100000"]  # still training when hit
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, f"{script}.py"), "--train", "--preset", "tiny", *steps,
                             "--data_dir", str(tmp_path / "d"), "--out_dir", str(tmp_path / "o")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    for line in proc.stdout:  # the first log line of a training step: the run is inside its loop
        if "step " in line:
            break
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=120)[1].strip().splitlines()
    assert proc.returncode == 130 and len(err) == 1 and err[0].startswith("error: interrupted; "), err[-3:]


@pytest.mark.parametrize("mod", [vm, vc, vl], ids=lambda m: m.__name__)
def test_resume_keeps_the_run_s_world(mod, tmp_path, capsys):
    """--resume with another --seed or split size rebuilt the synthetic world over the run's and trained on, so the
    run no longer ended as an uninterrupted one would: refused in one line, world and checkpoint left as they were."""
    world, out = tmp_path / "d", tmp_path / "o"
    mod.main(["--train", "--preset", "tiny", "--max_steps", "4", "--stop_after", "2", "--data_dir", str(world),
              "--out_dir", str(out)])
    before = {p: p.read_bytes() for p in [*world.rglob("*"), *out.rglob("*")] if p.is_file()}
    for flag, value in (("--seed", "5"), ("--n_train", "30")):
        argv = ["--train", "--resume", "--out_dir", out, flag, value]
        if mod is vl:  # its main() raises; the command line prints the line and exits 2
            with pytest.raises(vl.UserError, match=f"{flag} {value}"):
                vl.main(list(map(str, argv)))
        else:
            main_user_error(mod.main, capsys, argv, f"{flag} {value}", "world")
    assert {p: p.read_bytes() for p in [*world.rglob("*"), *out.rglob("*")] if p.is_file()} == before


@pytest.mark.parametrize("mod", [vm, vl, mk, ab], ids=lambda m: m.__name__)
def test_frame_folders_skip_subfolders_and_hidden_files(mod, tmp_path):
    """A subfolder called x.png inside a folder of frames is not a frame: it was opened as a file (a traceback). Nor is
    a hidden file: macOS writes ._x.png beside x.png on a FAT or exFAT drive (its metadata, not an image)."""
    (tmp_path / "x.png").mkdir()
    (tmp_path / "._f0.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        ")  # AppleDouble header
    with pytest.raises(mod.UserError, match="no frame"):  # nothing else there: the folder has no frames
        mod.load_video(str(tmp_path), 4, 16)
    cv2.imwrite(str(tmp_path / "f0.png"), np.full((20, 20, 3), 90, np.uint8))
    assert len(mod.load_video(str(tmp_path), 4, 16)[0 if mod is mk else slice(None)]) == 4  # the one frame, 4 times


@pytest.mark.parametrize("mod", [vm, vl, mk, ab], ids=lambda m: m.__name__)
def test_frame_folders_with_digit_like_symbols_in_names(mod, tmp_path):
    """Natural order splits names at decimal digits; a superscript or circled digit ("²", "①") is text, not a number
    (int("²") raised a ValueError: a traceback)."""
    for i, name in enumerate(["f10.png", "f2.png", "①.png", "²1.png"]):
        cv2.imwrite(str(tmp_path / name), np.full((16, 16, 3), 20 + 60 * i, np.uint8))  # brighter for each later name
    clip = mod.load_video(str(tmp_path), 4, 16)
    means = [float(np.asarray(f, dtype=np.float64).mean()) for f in (clip[0] if mod is mk else clip)]
    names = np.argsort(np.argsort(means)).tolist()  # each loaded frame's place in the list of names above
    assert names == [1, 0, 3, 2]  # f2, f10, then "²1" and "①" (text, in code point order)

@pytest.mark.parametrize("mod", [vm, vc, vl, mk], ids=lambda m: m.__name__)
def test_trainers_a_new_run_drops_the_eval_json_of_the_weights_it_replaces(mod, tmp_path):
    """eval.json scores the weights beside it: a new --train into a finished run's folder removes it with its first
    checkpoint, so a run stopped early leaves no score of other weights (it used to keep the old run's)."""
    out = tmp_path / "run"
    run = ["--train", "--preset", "tiny", "--max_steps", "4", "--data_dir", str(tmp_path / "d"), "--out_dir", str(out)]
    mod.main(run)
    assert json.load(open(out / "eval.json"))["test"]
    mod.main(run + ["--stop_after", "2"])
    assert not (out / "eval.json").exists() and (out / "model.safetensors").exists()
    mod.main(["--train", "--resume", "--out_dir", str(out)])  # finished: scored again
    assert json.load(open(out / "eval.json"))["test"]


@pytest.mark.parametrize("mod", [vm, vc, vl, mk], ids=lambda m: m.__name__)
def test_float16_resume_keeps_the_loss_scale(mod, tmp_path, capsys):
    """float16: stop after 2 steps and --resume == 4 uninterrupted steps, bit for bit, loss scaler included: its scale
    (lowered where a gradient overflowed, that step skipped) and its count of good steps (it doubles the scale after
    2000) go on where they stopped; a scaler started afresh would skip the overflowing steps again."""
    run = ["--train", "--preset", "tiny", "--dtype", "float16", "--max_steps", "4", "--data_dir", str(tmp_path / "d")]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    mod.main(run + ["--out_dir", full])
    mod.main(run + ["--out_dir", cut, "--stop_after", "2"])
    mod.main(["--train", "--resume", "--out_dir", cut])  # the saved run's settings: preset, dtype, steps, data
    state = lambda d: torch.load(os.path.join(d, "train_state.pt"), weights_only=True)
    assert state(full)["step"] == state(cut)["step"] == 4
    assert state(full)["scaler"] == state(cut)["scaler"] and state(full)["scaler"]["_growth_tracker"] > 0
    a, b = load_file(os.path.join(full, "model.safetensors")), load_file(os.path.join(cut, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("mod", [vm, vc, vl, mk], ids=lambda m: m.__name__)
def test_a_training_state_saved_on_a_gpu_resumes_on_a_cpu(mod, tmp_path, monkeypatch):
    """train_state.pt written on a CUDA machine tags its AdamW moments with that device; a plain torch.load of it
    fails where there is none (it was refused as damaged). --resume maps them to the CPU. (Here every tensor is
    tagged cuda:0.)"""
    out = str(tmp_path / "out")
    mod.main(["--train", "--preset", "tiny", "--max_steps", "4", "--stop_after", "2", "--data_dir", str(tmp_path / "d"),
              "--out_dir", out])
    path = os.path.join(out, "train_state.pt")
    state = torch.load(path, weights_only=True)
    with monkeypatch.context() as m:  # torch.save names each tensor's device with location_tag: cuda:0 on a GPU
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(state, path)
    if not torch.cuda.is_available():  # the file as a GPU run leaves it, on a machine without one
        with pytest.raises(RuntimeError, match="CUDA device"):
            torch.load(path, weights_only=True)
    mod.main(["--train", "--resume", "--out_dir", out])
    assert torch.load(path, weights_only=True)["step"] == 4


@pytest.mark.parametrize("mod", [vm, vc, vl, mk], ids=lambda m: m.__name__)
def test_torchrun_gives_each_process_its_own_gpu_or_refuses(mod, monkeypatch):
    """torchrun --nproc_per_node 2 on a machine with one CUDA GPU (the second process would ask for a GPU that is not
    there), or on a Mac, whose GPU (mps) gloo cannot reduce over: one line, before a process group is made. On a CPU
    (--device auto, cpu, or cpu:0 where the script takes it) the processes go on with gloo; with two GPUs each process
    of videollama_mini, vit_caption and video_llava takes its own. (The torchrun tests run on the CPU.)"""
    setup, made = getattr(mod, "setup_distributed", None) or mod.ddp_setup, []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: made.append(backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    for k, v in dict(WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", RANK="1", LOCAL_RANK="1").items():
        monkeypatch.setenv(k, v)

    def machine(gpus, mps):  # what torch sees: CUDA GPUs, an Apple GPU
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    for gpus, mps in ((1, False), (0, True)):  # one GPU; a Mac
        machine(gpus, mps)
        with pytest.raises(mod.UserError, match=f"torchrun: one CUDA GPU per process, {gpus} here: start fewer or pass --device cpu"):
            setup(mod.Config())
    assert made == []
    machine(0, False)
    cpus = ["auto", "cpu"] + ["cpu:0"] * (mod in (vl, mk))
    for device in cpus:
        setup(mod.Config(device=device))
    assert made == ["gloo"] * len(cpus)
    if mod is not mk:  # two GPUs: the process of local rank 1 takes cuda:1, even where --device names cuda:0
        machine(2, False)
        assert setup(mod.Config(device="cuda:0"))[-1] == "cuda:1" and made[-1] == "nccl"


@pytest.mark.parametrize("mod", [vm, vc], ids=["vm", "vc"])
def test_captioners_refuse_decoding_flags_the_search_ignores(mod, tmp_path, capsys):
    """--beam above 1 with sampling flags, or --top_k / --top_p without a temperature, would decode otherwise than
    asked: one line, exit 2, for typed flags and for a beam width saved in the checkpoint's config."""
    where = ["--data_dir", tmp_path / "d", "--out_dir", tmp_path / "out"]
    for flags, needle in ((["--beam", 3, "--temperature", 0.8], "got --beam 3, --temperature 0.8"),
                          (["--top_k", 5], "--temperature 0.0, --top_k 5"), (["--top_p", 0.9], "--top_p 0.9")):
        main_user_error(mod.main, capsys, ["--train", "--preset", "tiny", *flags, *where], needle)
    assert not (tmp_path / "d").exists()  # refused before any data
    mod.main(list(map(str, ["--train", "--preset", "tiny", "--max_steps", 1, "--beam", 2, *where])))
    media = sorted((tmp_path / "d" / "test").iterdir())[0]
    generate = ["--generate", "--video" if mod is vm else "--image", media, "--out_dir", tmp_path / "out"]
    main_user_error(mod.main, capsys, generate + ["--temperature", 0.5], "got --beam 2, --temperature 0.5")
    meta = json.load(open(tmp_path / "out" / "config.json"))
    meta["config"].update(beam=1, temperature=0.7)  # a run trained to sample: --top_k alone now applies to it
    json.dump(meta, open(tmp_path / "out" / "config.json", "w"))
    mod.main(list(map(str, generate + ["--top_k", 3])))


@pytest.mark.parametrize("mod", [vm, vc], ids=["vm", "vc"])
def test_captioners_eval_scores_the_run_s_own_world(mod, tmp_path, capsys):
    """--eval with another --seed or split size used to rebuild the synthetic world over the run's and score other
    clips: refused in one line, the world left as it was; the run's own values are accepted."""
    world, out = tmp_path / "d", tmp_path / "o"
    mod.main(["--train", "--preset", "tiny", "--max_steps", "2", "--data_dir", str(world), "--out_dir", str(out)])
    stamp = (world / "world.json").read_text()
    for flag, value in (("--seed", 5), ("--n_test", 3), ("--n_train", 10)):
        main_user_error(mod.main, capsys, ["--eval", "--out_dir", out, flag, value], "world", f"drop {flag} {value}")
    assert (world / "world.json").read_text() == stamp
    mod.main(["--eval", "--out_dir", str(out), "--seed", "1337"])  # the run's seed: nothing changes
    assert (world / "world.json").read_text() == stamp


@pytest.mark.parametrize("mod", [vm, vc], ids=["vm", "vc"])
def test_captioners_one_mode_per_call(mod, tmp_path, capsys):
    """Two modes in one call would drop one without a word, and --resume without --train would do nothing: one line,
    exit 2, before anything is read or written."""
    media = ["--video" if mod is vm else "--image", tmp_path / "x"]
    for argv, needle in ((["--eval", "--generate", *media], "one mode per call"), (["--train", "--bench"], "one mode"),
                         (["--resume"], "--resume")):
        main_user_error(mod.main, capsys, argv + ["--out_dir", tmp_path / "o", "--data_dir", tmp_path / "d"], needle)
    assert not (tmp_path / "o").exists() and not (tmp_path / "d").exists()


def _main_refuses(mod, capsys, argv, needle):
    """main(argv) refuses in one line: vm, vc and ab exit 2 themselves; vl's and mk's main() raise the UserError that
    their `__main__` block prints before exiting 2."""
    if mod in (vl, mk):
        with pytest.raises(mod.UserError, match=re.escape(needle)):
            mod.main(list(map(str, argv)))
    else:
        main_user_error(mod.main, capsys, argv, needle)


@pytest.mark.parametrize("mod", [vm, vc, vl, mk, ab], ids=["vm", "vc", "vl", "mk", "ab"])
def test_all_scripts_offline_without_gpt2_files_say_how_to_fix(mod, tmp_path, capsys, monkeypatch):
    """Offline with no cached GPT-2 files, tiktoken raises a network error deep inside requests: every script's
    --train ends in one line that names TIKTOKEN_CACHE_DIR, exit 2, instead of a traceback."""
    import tiktoken

    def offline(name):
        raise ConnectionError(f"cannot download {name}'s files")
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    where = ["--out_dir", tmp_path / "out", "--data_dir", tmp_path / "d"]
    _main_refuses(mod, capsys, ["--train", "--preset", "tiny", *where],
                  "(ConnectionError); offline, point TIKTOKEN_CACHE_DIR at")
    assert not (tmp_path / "out" / "model.safetensors").exists()



@pytest.mark.parametrize("mod", [vm, vc], ids=["vm", "vc"])
def test_trainers_compile_without_a_cxx_compiler_is_one_line_before_any_work(mod, tmp_path, capsys):
    """--compile on a CPU: inductor writes the kernels in C++. Without a working compiler the first training step
    ended in inductor's traceback; now one line names the fix, before the world is written or anything is trained."""
    argv = ["--train", "--preset", "tiny", "--compile", "--out_dir", tmp_path / "o", "--data_dir", tmp_path / "d"]
    with torch._inductor.config.patch({"cpp.cxx": (None, str(tmp_path / "no-such-g++"))}):
        main_user_error(mod.main, capsys, argv, "--compile: No working C++ compiler", "--no-compile")
    assert not (tmp_path / "d").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("mod", [vm, vc, vl, mk, ab], ids=["vm", "vc", "vl", "mk", "ab"])
def test_all_scripts_refuse_an_empty_path(mod, tmp_path, capsys, monkeypatch):
    """`--out_dir "$OUT"` with OUT unset is the current folder: attention_basics wrote its checkpoints over the files
    there, the others trained and then crashed on saving. `--data "$DATA"` trained on the synthetic world instead of
    your file. Refused in one line; the folder's own file is untouched."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "eval.json").write_text('{"mine": 1}')
    flags = [["--out_dir", ""]] + [[k, "", "--out_dir", tmp_path / "o"] for k in ("--data_dir", "--data", "--test_data")
                                   if mod is not ab or k == "--data_dir"]  # attention_basics reads no user data
    for f in flags:
        _main_refuses(mod, capsys, ["--train", "--preset", "tiny", *f], "not an empty string")
    if mod is not ab:  # --eval would score the synthetic world's test split
        _main_refuses(mod, capsys, ["--eval", "--out_dir", tmp_path / "o", "--test_data", ""], "not an empty string")
    assert [p.name for p in tmp_path.iterdir()] == ["eval.json"]
    assert (tmp_path / "eval.json").read_text() == '{"mine": 1}'


@pytest.mark.parametrize("mod", [vm, vc, vl, mk, ab], ids=["vm", "vc", "vl", "mk", "ab"])
def test_all_scripts_tiny_preset_writes_beside_the_default_run(mod, tmp_path, monkeypatch):
    """`--train --preset tiny` without --out_dir wrote its world into a folder of its own but its run over the default
    run's folder: a run of minutes was replaced by one of seconds. Both now go to folders ending in _tiny."""
    monkeypatch.chdir(tmp_path)
    cfg, default = mod.parse_args(["--train", "--preset", "tiny"])[1], mod.Config()
    assert cfg.out_dir.endswith("_tiny") and cfg.data_dir.endswith("_tiny")
    assert {cfg.out_dir, cfg.data_dir}.isdisjoint({default.out_dir, default.data_dir})
    assert list(tmp_path.iterdir()) == []  # nothing is written before the run starts


@pytest.mark.parametrize("mod", [vm, vl, mk, ab], ids=["vm", "vl", "mk", "ab"])
def test_video_scripts_refuse_a_text_file_as_a_video(mod, tmp_path):
    """FFmpeg's tty demuxer plays a .txt file as a video of its characters (OpenCV opens it, frames decode): an
    annotation file given as --video is refused in one line, not captioned."""
    txt = tmp_path / "my_videos.txt"
    txt.write_text("clips/a.mp4\na red circle moves left\n\n" * 30)
    assert cv2.VideoCapture(str(txt)).isOpened()  # what made this a real case
    with pytest.raises(mod.UserError, match=r"my_videos\.txt: .*(text file|or text)"):
        mod.load_video(str(txt), 4, 16)


@pytest.mark.parametrize("mod", [vm, vc, vl, mk, ab], ids=["vm", "vc", "vl", "mk", "ab"])
def test_all_scripts_eval_from_another_folder_reads_the_run_s_world(mod, tmp_path, monkeypatch):
    """The synthetic world's folder is saved absolute: --eval run from another working folder reads the world the run
    was trained on and writes no new one there (a relative data_dir used to be rebuilt in the current folder)."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    steps = [] if mod is ab else ["--max_steps", "2"]  # attention_basics' tiny preset is already a few steps
    mod.main(["--train", "--preset", "tiny", *steps, "--data_dir", "world", "--out_dir", "run"])
    world = sorted(p.name for p in (tmp_path / "a" / "world").rglob("*"))
    monkeypatch.chdir(tmp_path / "b")
    mod.main(["--eval", "--out_dir", str(tmp_path / "a" / "run")])
    assert list((tmp_path / "b").iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "a" / "world").rglob("*")) == world


@pytest.mark.parametrize("ext", ["jpg", "png"])
@pytest.mark.parametrize("mod", [vm, vc, vl, mk, ab], ids=["vm", "vc", "vl", "mk", "ab"])
def test_all_scripts_refuse_a_cut_off_image_before_its_decoder_warns(mod, ext, tmp_path, capfd):
    """A cut-off JPEG or PNG (a half-copied file) is refused before OpenCV decodes it, so libjpeg's 'Premature end of
    JPEG file' or libpng's 'Read Error' never reaches stderr: the script's one line is the only one (capfd reads the C
    library's writes too)."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / f"{i}.{ext}"), np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8))
    whole = (folder / f"1.{ext}").read_bytes()
    (folder / f"1.{ext}").write_bytes(whole[:len(whole) * 6 // 10])
    capfd.readouterr()
    with pytest.raises(mod.UserError, match=rf"1\.{ext}: this image is cut off"):
        mod.load_image(str(folder / f"1.{ext}"), 16) if mod is vc else mod.load_video(str(folder), 4, 16)
    assert capfd.readouterr().err == ""


def test_all_scripts_read_media_whose_names_are_not_utf8(tmp_path):
    """A file name that is not UTF-8 (an old zip's Latin-1 'caf\\xe9.png') reaches Python as a str holding a surrogate,
    and OpenCV given that str crashed the process (a segmentation fault, no message). The loaders hand OpenCV the
    name's bytes: each such image, frame folder and video reads as its copy under an ASCII name. In a child process, so
    that a crash fails this test alone."""
    rng, d = np.random.default_rng(0), os.fsencode(tmp_path)
    os.mkdir(os.path.join(d, b"ref"))
    os.mkdir(os.path.join(d, b"odd"))
    w = cv2.VideoWriter(str(tmp_path / "ref.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 8, (40, 40))
    for i in range(6):
        img = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
        cv2.imwrite(str(tmp_path / "ref" / f"{i}.png"), img)
        shutil.copy(os.path.join(d, b"ref", b"%d.png" % i), os.path.join(d, b"odd", b"caf\xe9%d.png" % i))
        w.write(img)
    w.release()
    shutil.copy(os.path.join(d, b"ref.mp4"), os.path.join(d, b"caf\xe9.mp4"))
    child = f"""if True:
        import os, numpy as np, videollama_mini as vm, vit_caption as vc, video_llava as vl, mark1 as mk
        import attention_basics as ab
        d = {str(tmp_path)!r}
        odd = lambda *name: os.fsdecode(os.path.join(os.fsencode(d), *name))  # the str Python makes of such a name
        first = lambda x: x[0] if isinstance(x, tuple) else x  # mark1's load_video also gives times and duration
        for mod in (vm, vl, mk, ab):
            for a, b in ((odd(b"caf\\xe9.mp4"), d + "/ref.mp4"), (odd(b"odd"), d + "/ref")):
                assert np.array_equal(first(mod.load_video(a, 3, 16)), first(mod.load_video(b, 3, 16))), (mod, a)
        for read in (vm.read_frame, mk.read_frame, lambda p: vc.load_image(p, 16), lambda p: vl.load_image(p, 16),
                     lambda p: ab.load_image(p, 16)):
            assert np.array_equal(read(odd(b"odd", b"caf\\xe92.png")), read(d + "/ref/2.png"))
        print("read")"""
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "read", (proc.returncode, proc.stderr[-2000:])


@pytest.mark.parametrize("mod", [vm, vc, vl, mk, ab], ids=["vm", "vc", "vl", "mk", "ab"])
def test_all_scripts_refuse_an_image_over_opencvs_pixel_limit(mod, tmp_path):
    """OpenCV returns None for an image it cannot read but raises for one over 2^30 pixels: a 40000 x 40000 PNG
    (only its header: 100 bytes) is refused in one line naming the file, as a frame of a folder or an image."""
    def chunk(kind, data):  # a PNG chunk: length, type, data, CRC of type + data
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
    header = (40000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])  # width, height, 8-bit RGB
    folder = tmp_path / "frames"
    folder.mkdir()
    cv2.imwrite(str(folder / "0.png"), np.zeros((8, 8, 3), np.uint8))
    (folder / "1.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0"))
                                   + chunk(b"IEND", b""))
    with pytest.raises(cv2.error):
        cv2.imread(str(folder / "1.png"))
    with pytest.raises(mod.UserError, match=r"1\.png: OpenCV cannot decode this image \(.*at most 2\^30 pixels"):
        mod.load_image(str(folder / "1.png"), 16) if mod is vc else mod.load_video(str(folder), 2, 16)
    if mod in (vl, ab):  # these read single images too
        with pytest.raises(mod.UserError, match=r"1\.png: OpenCV cannot decode"):
            mod.load_image(str(folder / "1.png"), 16)


def test_ab_transparent_frames_long_captions_and_a_failed_run(tmp_path, capsys):
    """Transparent frame pixels are composited onto white (as the other loaders and transformers do); a training
    caption longer than --max_len is refused (pad_batch would cut it); a run that fails (a NaN loss) saves none of its
    three models, so the previous run's checkpoints stay whole; --eval refuses a --data_dir other than the run's
    (it used to rebuild a world there, over whatever world was in it), and any other setting of the run."""
    bgra = np.zeros((8, 8, 4), np.uint8)
    bgra[..., 2], bgra[..., 3] = 200, 0  # red, fully transparent
    cv2.imwrite(str(tmp_path / "t.png"), bgra)
    assert (ab.load_image(str(tmp_path / "t.png"), 8) == 255).all()  # white, not black
    tiny = ["--train", "--preset", "tiny", "--data_dir", tmp_path / "d", "--out_dir", tmp_path / "o"]
    _ab_user_error(capsys, "--max_len 4: a training caption is", *tiny, "--max_len", "4")
    assert not (tmp_path / "o").exists()
    assert _ab_main(capsys, *tiny)[0] == 0
    before = {p: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    _ab_user_error(capsys, "loss became nan", *tiny, "--vision_lr", "1e30", "--seed", "7")
    assert {p: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()} == before
    _ab_user_error(capsys, "and world; drop --data_dir", "--eval", "--out_dir", tmp_path / "o", "--data_dir",
                   tmp_path / "elsewhere")
    # --eval and --generate run the saved settings: a size or seed typed beside them was silently replaced (and
    # --max_frames was checked against the preset's --n_frames, not the run's); --video needs --generate
    clip = tmp_path / "clip.mp4"
    shutil.copy(next((tmp_path / "d").rglob("*.mp4")), clip)
    for mode, flags in ((["--eval"], ["--n_test", "3", "--seed", "5"]), (["--eval"], ["--img_size", "32"]),
                        (["--generate", "--video", clip], ["--max_frames", "2"]), (["--eval"], ["--no-sdpa"])):
        _ab_user_error(capsys, f"drop {' '.join(flags[:2])}", *mode, "--out_dir", tmp_path / "o", *flags)
    _ab_user_error(capsys, "--video is for --generate", "--video", clip, "--section", "attention")


def test_ab_generate_beside_another_mode_is_refused(capsys, tmp_path):
    """--eval or --train ran and the --generate beside it was dropped in silence (no caption printed): refused."""
    for mode in ("--eval", "--train"):
        _ab_user_error(capsys, "--video is for --generate, on its own", mode, "--generate", "--video", "clip.mp4",
                       "--out_dir", tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_ab_section_and_variant_outside_their_mode_are_refused(capsys, tmp_path):
    """--section picks a tour section and --variant the --generate model; beside --train / --eval (or the tour, for
    --variant) they were ignored without a word. Refused before any work, nothing written."""
    o, clip = tmp_path / "o", tmp_path / "clip.mp4"
    for argv in (["--eval"], ["--generate", "--video", clip], ["--train"]):
        _ab_user_error(capsys, "--section is for the tour", *argv, "--section", "clip", "--out_dir", o, "--steps", 1)
    for argv in (["--eval"], ["--train"], []):
        _ab_user_error(capsys, "--variant picks --generate's model", *argv, "--variant", "unified", "--out_dir", o)
    assert not o.exists()


def test_ab_tour_refuses_the_flags_it_does_not_read(capsys, tmp_path):
    """The tour (no mode) reads the model's sizes, --seed, --threads and --section; a training or data flag typed
    beside it was ignored without a word. Refused by name, before any section runs; what it reads still runs."""
    for argv in (["--lr", 0.1], ["--section", "clip", "--steps", 1], ["--n_frames", 2], ["--out_dir", tmp_path / "o"],
                 ["--device", "cpu"], ["--no-motion"]):
        code, out, last = _ab_main(capsys, *argv)
        flag = next(a for a in argv if str(a).startswith("--") and a != "--section").replace("no-", "")
        want = f"error: {flag} is for a mode (--train, --eval, --generate); the tour does not read it"
        assert code == 2 and last == want and out == "", last
    code, out, _ = _ab_main(capsys, "--section", "patchify", "--seed", 3, "--d_model", 16, "--threads", 1, "--no-sdpa")
    assert code == 0 and "every check passed" in out
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mod", [vm, vc, vl, mk, ab], ids=["vm", "vc", "vl", "mk", "ab"])
def test_all_scripts_argparse_refusals_are_one_line_and_prefixes_are_not_flags(mod, tmp_path, capsys):
    """A value of the wrong type, an unknown flag, and a prefix of a flag (argparse would have read `--data` as
    `--data_dir` where only that exists) are refused like every other bad input: one line, exit 2, no usage block."""
    for argv, needle in ((["--batch_size", "1.5"], "argument --batch_size: invalid int value: '1.5'"),
                         (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
                         (["--out", tmp_path / "o"], "unrecognized arguments: --out")):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            mod.main(list(map(str, ["--train", *argv])))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ") and needle in err, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mod", [vm, vc, vl, mk, ab], ids=["vm", "vc", "vl", "mk", "ab"])
def test_all_scripts_build_their_parser_as_python_3_14_does(mod, tmp_path, monkeypatch):
    """Python 3.14's BooleanOptionalAction takes no type, choices or metavar: passing one is a TypeError before any
    flag is read, so the script cannot start. Each parser is built here with an action of 3.14's signature, and its
    first boolean flag still reads --no-<flag> as False."""
    import argparse

    class BooleanOptionalAction314(argparse.BooleanOptionalAction):
        def __init__(self, option_strings, dest, default=None, required=False, help=None):
            super().__init__(option_strings, dest, default=default, required=required, help=help)
    monkeypatch.setattr(argparse, "BooleanOptionalAction", BooleanOptionalAction314)
    flag = next(f.name for f in dataclasses.fields(mod.Config) if isinstance(f.default, bool))
    args = mod.parse_args(["--train", f"--no-{flag}", "--out_dir", str(tmp_path / "o")])[0]
    assert getattr(args, flag) is False and not (tmp_path / "o").exists()


@pytest.mark.parametrize("mod", [vm, vc, vl, mk], ids=["vm", "vc", "vl", "mk"])
def test_all_trainers_never_save_weights_that_diverged(mod, tmp_path, capsys):
    """At a huge learning rate the weights leave float range within a step while that step's loss (computed before
    the update) is still finite: the checkpoint saved at that step used to replace the last good one. Now the run stops
    in one line and out_dir keeps the good run's files byte for byte."""
    where = ["--data_dir", tmp_path / "d", "--out_dir", tmp_path / "o"]
    mod.main(list(map(str, ["--train", "--preset", "tiny", "--max_steps", "2", *where])))
    before = {p: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()}
    _main_refuses(mod, capsys, ["--train", "--preset", "tiny", "--lr", "1e30", "--grad_clip", "1e30",
                                "--eval_interval", "1", *where], "(try a lower --lr)")
    assert {p: p.read_bytes() for p in (tmp_path / "o").rglob("*") if p.is_file()} == before


def test_vc_captions_naming_a_folder_and_vl_inspect_negative_tokens(tmp_path, capsys):
    """A captions line whose path is a folder is named as no image file (it read 'not found'); --inspect's memory
    estimate refuses a negative --n_tokens (it printed negative positions and mebibytes)."""
    (tmp_path / "images").mkdir()
    (tmp_path / "caps.txt").write_text("images | a red circle\n")
    with pytest.raises(vc.UserError, match=r"caps\.txt:1: no image file 'images'"):
        vc.read_captions(str(tmp_path / "caps.txt"))
    for path, why in ((tmp_path / "images", "Is a directory"), (tmp_path / "nope.txt", "No such file")):
        with pytest.raises(vc.UserError, match=f"cannot read this captions file \\({why}"):  # a folder is no file
            vc.read_captions(str(path))
    with pytest.raises(vl.UserError, match="--n_tokens -500: --inspect's text tokens, 0 or more"):
        vl.main(["--inspect", str(tmp_path), "--n_tokens", "-500"])


def test_vl_flags_the_mode_would_not_use_are_refused(tmp_path):
    """--generate reads the decoding, device and checkpoint flags (and the architecture, checked against the
    checkpoint), --inspect only --n_frames and --n_tokens, --eval of --from_pretrained's checkpoint the data, device
    and decoding flags (no training flags); --data makes the synthetic world's sizes and folder moot: any other
    flag used to be accepted and ignored. Each is one line, before anything is read or written."""
    (tmp_path / "q.jsonl").write_text("")
    for argv, needle in ((["--generate", "--prompt", "hi", "--lr", "5", "--batch_size", "3"], "--batch_size, --lr: "
                          "not read by --generate"), (["--inspect", str(tmp_path), "--max_steps", "4"],
                          "--max_steps: not read by --inspect"), (["--bench", "--n_tokens", "5"],
                          "--n_tokens: not read by --bench"),
                         (["--eval", "--from_pretrained", str(tmp_path), "--max_steps", "4"], "--max_steps: not read by --eval"),
                         (["--train", "--data", str(tmp_path / "q.jsonl"), "--n_train", "5"], "--data trains on your")):
        with pytest.raises(vl.UserError, match=re.escape(needle)):
            vl.main(argv + ["--out_dir", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


def _copy_run(src, dst):
    """A copy of a run's checkpoint (config.json, model.safetensors) in dst, so a test's --eval writes only there."""
    dst.mkdir()
    for f in ("config.json", "model.safetensors"):
        (dst / f).write_bytes((src / f).read_bytes())
    return dst


@pytest.fixture(scope="module")
def _vc_tiny_run(tmp_path_factory):
    """One tiny vit_caption --train in-process (one thread, a few seconds), shared by the tests below."""
    tmp, before = tmp_path_factory.mktemp("vc_run"), torch.get_num_threads()
    torch.set_num_threads(1)
    vc.main(["--train", "--preset", "tiny", "--data_dir", str(tmp / "data"), "--out_dir", str(tmp / "out")])
    torch.set_num_threads(before)
    return tmp


@pytest.mark.parametrize("mod", [vm, vc], ids=["vm", "vc"])
def test_vm_vc_a_folder_that_cannot_be_made_is_refused_before_any_work(mod, _vm_trained, _vc_tiny_run, tmp_path,
                                                                       capsys):
    """--out_dir or --data_dir under a file (or in /proc) passed the folder check and crashed later with a traceback
    (--out_dir only at the first checkpoint, after training steps); --eval of a run whose saved data_dir cannot be
    made rebuilt the world there and crashed: one line each, exit 2, nothing written."""
    afile = tmp_path / "afile"
    afile.write_text("notes\n")
    tiny = ["--train", "--preset", "tiny", "--data_dir", tmp_path / "w", "--out_dir", tmp_path / "o"]
    for flag, path in (("--out_dir", afile / "run"), ("--data_dir", afile / "run"), ("--out_dir", "/proc/x/run")):
        main_user_error(mod.main, capsys, tiny + [flag, path], f"{flag} {path}: cannot create or write into this folder")
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()
    run = _copy_run((_vm_trained[0] if mod is vm else _vc_tiny_run) / "out", tmp_path / "run")
    meta = json.load(open(run / "config.json"))
    meta["config"]["data_dir"] = str(afile / "world")  # saved absolute: this folder cannot be made
    (run / "config.json").write_text(json.dumps(meta))
    main_user_error(mod.main, capsys, ["--eval", "--out_dir", run], f"--data_dir {afile / 'world'}: cannot create")
    assert sorted(os.listdir(run)) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize("mod", [vm, vc], ids=["vm", "vc"])
def test_vm_vc_eval_with_sampling_repeats_from_the_run_s_seed(mod, _vm_trained, _vc_tiny_run, tmp_path, capsys):
    """--eval --temperature 1.0 sampled from the global random state, never seeded: each run scored differently.
    It now samples from a generator seeded with the run's --seed, as --generate does."""
    run = _copy_run((_vm_trained[0] if mod is vm else _vc_tiny_run) / "out", tmp_path / "run")
    scores = []
    for _ in range(2):
        mod.main(["--eval", "--out_dir", str(run), "--temperature", "1.0"])
        scores.append({k: v for k, v in json.load(open(run / "eval.json")).items() if k != "train_seconds"})
    assert scores[0] == scores[1]
    capsys.readouterr()


def test_vm_flags_that_would_be_ignored_are_refused(_vm_trained, tmp_path, capsys):
    """--n_query / --n_qformer_layer size the learned-query Q-Former, built only with --qformer_mode queries; under
    --data the splits come from the file, so the world's sizes and --data_dir would be ignored: one line each."""
    tiny = ["--train", "--preset", "tiny", "--data_dir", tmp_path / "d", "--out_dir", tmp_path / "o"]
    for flag in ("--n_query", "--n_qformer_layer"):
        main_user_error(vm.main, capsys, tiny + [flag, 3], flag, "--qformer_mode queries")
    assert vm.parse_args(["--qformer_mode", "queries", "--n_query", "3"])[1].n_query == 3
    # --bench times a new model of the typed sizes on random clips: a flag it does not read is named as typed
    bench = ["--bench", "--preset", "tiny"]
    main_user_error(vm.main, capsys, bench + ["--lr", "0.5", "--no-compile", "--out_dir", tmp_path / "o", "--beam", 3],
                    f"--out_dir {tmp_path / 'o'}, --lr 0.5, --no-compile, --beam 3: not read by --bench", "drop it")
    for flag, value in (("--seed", 3), ("--data_dir", tmp_path / "d"), ("--max_new_tokens", 5), ("--n_query", 3)):
        main_user_error(vm.main, capsys, bench + [flag, value], f"{flag} {value}: not read by --bench")
    reads = ["--qformer_mode", "queries", "--n_query", "3", "--no-frame_diff", "--dropout", "0", "--batch_size", "2",
             "--temperature", "0.5", "--top_k", "3", "--top_p", "0.9", "--dtype", "float32", "--device", "cpu"]
    assert vm.parse_args(bench + reads)[1].n_query == 3  # what --bench builds and times
    main_user_error(vm.main, capsys, bench + ["--top_p", "0.9"], "sampling is --temperature above 0", "--top_p 0.9")
    ann = tmp_path / "mine.txt"
    ann.write_text(f"{_vm_trained[0] / 'data' / 'train' / '00000.mp4'}\na red circle moves left\n")
    data = ["--train", "--preset", "tiny", "--data", ann, "--test_data", ann, "--out_dir", tmp_path / "o"]
    for flag, value in (("--n_train", 5), ("--n_novel", 5), ("--data_dir", tmp_path / "d")):
        main_user_error(vm.main, capsys, data + [flag, value], flag, "--data", "mine.txt")
    assert not (tmp_path / "d").exists() and not (tmp_path / "o").exists()


def test_vc_flags_that_would_be_ignored_are_refused(tmp_path, capsys):
    """--patch_scale scales the whitened patch features, never made with --patch_init random; under --data the splits
    come from the file, so the world's sizes and --data_dir would be ignored: one line each, nothing written."""
    tiny = ["--train", "--preset", "tiny", "--data_dir", tmp_path / "d", "--out_dir", tmp_path / "o"]
    main_user_error(vc.main, capsys, tiny + ["--patch_init", "random", "--patch_scale", 2], "--patch_scale",
                    "--patch_init pca")
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((16, 16, 3), np.uint8))
    (tmp_path / "mine.txt").write_text("a.png | a black square\n")
    data = ["--train", "--preset", "tiny", "--data", tmp_path / "mine.txt", "--test_data", tmp_path / "mine.txt",
            "--out_dir", tmp_path / "o"]
    for flag, value in (("--n_train", 5), ("--n_test", 5), ("--data_dir", tmp_path / "d")):
        main_user_error(vc.main, capsys, data + [flag, value], flag, "--data", "mine.txt")
    # --bench times a new model of the typed sizes on random images, decoding greedily: a flag it does not read is
    # named as typed (sampling flags too: it would time greedy decoding whatever they say)
    bench = ["--bench", "--preset", "tiny"]
    main_user_error(vc.main, capsys, bench + ["--lr", 0.5, "--no-compile", "--out_dir", tmp_path / "o", "--top_k", 3],
                    f"--out_dir {tmp_path / 'o'}, --lr 0.5, --no-compile, --top_k 3: not read by --bench", "drop it")
    for flag, value in (("--temperature", 0.7), ("--beam", 3), ("--seed", 3), ("--patch_init", "random")):
        main_user_error(vc.main, capsys, bench + [flag, value], f"{flag} {value}: not read by --bench")
    reads = ["--img_size", 32, "--patch", 8, "--pool", "mean", "--max_len", 20, "--no-compact_vocab", "--dropout", 0.1,
             "--vit_dropout", 0.1, "--batch_size", 2, "--grad_clip", 0.5, "--dtype", "float32", "--device", "cpu"]
    assert vc.parse_args(bench + list(map(str, reads)))[1].img_size == 32  # what --bench builds and times
    assert not (tmp_path / "d").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("mod", [vm, vc], ids=["vm", "vc"])
def test_vm_vc_eval_and_test_data_refuse_captions_that_would_be_cut(mod, _vm_trained, _vc_tiny_run, tmp_path,
                                                                    capsys):
    """--eval with a --max_new_tokens below the test captions cut every caption and scored ~0; a --test_data caption
    longer than --max_len was accepted. Both refused by the check training captions get, before any work."""
    run = _copy_run((_vm_trained[0] if mod is vm else _vc_tiny_run) / "out", tmp_path / "run")
    main_user_error(mod.main, capsys, ["--eval", "--out_dir", run, "--max_new_tokens", 5], "caption is",
                    "tokens long", "--max_new_tokens 5 must be at least")
    assert sorted(os.listdir(run)) == ["config.json", "model.safetensors"]
    if mod is vm:
        (tmp_path / "a.mp4").write_bytes((_vm_trained[0] / "data" / "train" / "00000.mp4").read_bytes())
        short, long = "a.mp4\na red circle moves left\n", "a.mp4\na red circle moves left and a blue square moves up\n"
    else:
        cv2.imwrite(str(tmp_path / "a.png"), np.zeros((16, 16, 3), np.uint8))
        short, long = "a.png | a red patch\n", "a.png | a blue patch on a grey field by the left side\n"
    (tmp_path / "short.txt").write_text(short)
    (tmp_path / "long.txt").write_text(long)
    argv = ["--train", "--preset", "tiny", "--data", tmp_path / "short.txt", "--test_data", tmp_path / "long.txt",
            "--out_dir", tmp_path / "o", "--max_len", 10]
    main_user_error(mod.main, capsys, argv, "caption is 13 tokens long", "--max_len 10 must be at least 13")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("mod", [vm, vc], ids=["vm", "vc"])
def test_vm_vc_eval_checks_only_what_it_scores_and_generate_keeps_the_data(mod, _vm_trained, _vc_tiny_run, tmp_path,
                                                                           capsys):
    """--eval checks the splits it scores, each image or clip by its shortest reference (a longer alternative only
    lowers BLEU), and names a split it scores; --generate refuses the run's data flags it would ignore; another
    script's checkpoint is named as such."""
    tmp = _vm_trained[0] if mod is vm else _vc_tiny_run
    run = _copy_run(tmp / "out", tmp_path / "run")
    main_user_error(mod.main, capsys, ["--eval", "--out_dir", run, "--max_new_tokens", 5], "a test caption is")
    if mod is vm:
        media, name, short = tmp / "data" / "test" / "00000.mp4", "a.mp4", "a red circle moves left"
        (tmp_path / name).write_bytes(media.read_bytes())
        ann = f"{name}\n{short}\n" + "a red circle moves left " * 8 + "\n"
    else:
        media, name, short = tmp / "data" / "test" / "00000.png", "a.png", "a small red circle"
        (tmp_path / name).write_bytes(media.read_bytes())
        ann = f"{name} | {short}\n{name} | " + "a small red circle " * 8 + "\n"
    (tmp_path / "two.txt").write_text(ann)  # one picture, a short and a too-long reference
    meta = json.load(open(run / "config.json"))
    (tmp_path / "d.txt").write_text("\n".join(ann.splitlines()[:2 if mod is vm else 1]) + "\n")
    meta["config"]["data"] = str(tmp_path / "d.txt")  # as if trained on a file: --test_data is allowed
    json.dump(meta, open(run / "config.json", "w"))
    mod.main(["--eval", "--out_dir", str(run), "--test_data", str(tmp_path / "two.txt")])
    assert json.load(open(run / "eval.json"))["test"]["n"] == 1
    gen = ["--generate", "--out_dir", run, "--video" if mod is vm else "--image", media]
    main_user_error(mod.main, capsys, gen + ["--data_dir", tmp_path / "elsewhere"], "drop --data_dir")
    other = _copy_run((_vc_tiny_run if mod is vm else _vm_trained[0]) / "out", tmp_path / "other")
    main_user_error(mod.main, capsys, ["--eval", "--out_dir", other], "vit_caption" if mod is vm else "videollama")
    if mod is vc:  # the patch init ran when the run began: --resume keeps it (refused before anything is written)
        main_user_error(vc.main, capsys, ["--train", "--resume", "--out_dir", tmp / "out", "--patch_scale", "3"],
                        "drop --patch_scale 3.0 (saved as --patch_scale 1.0)")


@pytest.mark.parametrize("mod", [vm, vc], ids=["vm", "vc"])
def test_vm_vc_eval_and_generate_refuse_a_typed_size_against_the_checkpoint(mod, _vm_trained, _vc_tiny_run,
                                                                            tmp_path, capsys):
    """On --eval / --generate the checkpoint's sizes run: a typed size was cross-checked against the preset's
    defaults (--img_size 32 'must be a multiple of --patch 12' for a run with patch 8; --d_model 30 against the
    default --n_head 4), a misleading line; now load_checkpoint's refusal names the flag and the saved value."""
    out = (_vm_trained[0] if mod is vm else _vc_tiny_run) / "out"
    if mod is vm:
        media, flag = ["--video", _vm_trained[0] / "data" / "test" / "00000.mp4"], ["--d_model", "30"]
    else:
        cv2.imwrite(str(tmp_path / "x.png"), np.zeros((16, 16, 3), np.uint8))
        media, flag = ["--image", tmp_path / "x.png"], ["--img_size", "32"]
    for mode in (["--eval"], ["--generate", *media]):
        main_user_error(mod.main, capsys, mode + ["--out_dir", out, *flag], f"drop {' '.join(flag)} (")


@pytest.mark.parametrize("mod", [vm, vc], ids=["vm", "vc"])
def test_vm_vc_a_world_flag_beside_data_is_named_alone(mod, tmp_path, capsys):
    """--data gives the splits, so a typed flag of the synthetic world is refused, the first one named (the message
    listed them all and said "drop them", one flag or several); nothing is written."""
    for extra, named in ((["--n_test", "3", "--data_dir", tmp_path / "d"], "--data_dir"), (["--n_train", "5"], "--n_train")):
        main_user_error(mod.main, capsys, ["--train", "--data", tmp_path / "mine.txt", "--out_dir", tmp_path / "o",
                                           *extra], f"error: {named}: the synthetic world's, unused with --data", "drop it")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("mod", [vm, vc], ids=["vm", "vc"])
def test_vm_vc_a_saved_config_value_of_the_wrong_type_is_refused(mod, _vm_trained, _vc_tiny_run, tmp_path, capsys):
    """A hand-edited or damaged config.json whose 'config' holds a value of another JSON type ("d_model": "32", null,
    true where an int belongs, "x" for a float) ended --eval and --train --resume in a TypeError deep in torch or in a
    comparison. Now one line naming the file, the field and the value, exit 2, nothing in the run changed; an int
    where a float belongs is still a number of the right kind."""
    src = (_vm_trained[0] if mod is vm else _vc_tiny_run) / "out"
    run = _copy_run(src, tmp_path / "run")
    (run / "train_state.pt").write_bytes((src / "train_state.pt").read_bytes())
    good = json.load(open(run / "config.json"))
    size = "n_frames" if mod is vm else "patch"
    for key, value, shown in (("d_model", "32", "'32'"), (size, None, "None"), ("max_new_tokens", "5", "'5'"),
                              ("max_len", True, "True"), ("lr", "x", "'x'"), ("dropout", [0.1], "[0.1]"),
                              ("compact_vocab", 1, "1"), ("qformer_mode" if mod is vm else "pool", 3, "3")):
        (run / "config.json").write_text(json.dumps({**good, "config": {**good["config"], key: value}}))
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        for argv in (["--eval"], ["--train", "--resume"]) if key in ("d_model", size, "lr") else (["--eval"],):
            main_user_error(mod.main, capsys, argv + ["--out_dir", run], f"{run / 'config.json'}: {key} {shown}: must "
                            "be of type", "restore it, or retrain")
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    (run / "config.json").write_text(json.dumps({**good, "config": {**good["config"], "lr": 1}}))  # JSON's 1 for 1.0
    assert mod.load_checkpoint(str(run))[2].lr == 1


@pytest.mark.parametrize("mod", [vm, vc], ids=["vm", "vc"])
def test_vm_vc_a_saved_config_value_no_flag_could_give_is_refused(mod, _vm_trained, _vc_tiny_run, tmp_path, capsys):
    """A hand-edited config.json value of the right type that no flag could give (--n_head 0, --dtype float8, a
    dropout of 2, ...) ended --eval and --generate in a traceback (or, --temperature -1, sampled the least likely
    tokens). The saved config now meets the checks the flags meet: one line naming the file and the flag, exit 2."""
    run = _copy_run((_vm_trained[0] if mod is vm else _vc_tiny_run) / "out", tmp_path / "run")
    good = json.load(open(run / "config.json"))
    for key, value in (("n_head", 0), ("dtype", "float8"), ("dropout", 2.0), ("seed", 10**30), ("max_len", -5),
                       ("temperature", -1.0)):
        (run / "config.json").write_text(json.dumps({**good, "config": {**good["config"], key: value}}))
        before = {p.name: p.read_bytes() for p in run.iterdir()}
        main_user_error(mod.main, capsys, ["--eval", "--out_dir", run], f"{run / 'config.json'}: --{key}", "retrain")
        assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    zeros = {"temperature": 0, "dropout": 0, "weight_decay": 0, "min_lr": 0}  # JSON's 0 where a float belongs: valid
    (run / "config.json").write_text(json.dumps({**good, "config": {**good["config"], **zeros}}))
    assert mod.load_checkpoint(str(run))[2].temperature == 0


@pytest.mark.parametrize("name", ["vm", "vc", "vl", "mk", "ab"])
def test_a_run_folder_nothing_can_be_written_into_is_refused_before_any_work(name, _vm_trained, _vc_tiny_run,
                                                                             vl_tiny_run, mk_trained, tmp_path,
                                                                             capsys, monkeypatch):
    """--eval (and --resume, --predict) write into the run's folder. One that cannot be written into (read-only, no
    permission: made here by refusing every folder made in it, as the scripts' probe makes one) gave a traceback
    at the first write, after the evaluation or the training steps; now one line before any work, nothing touched."""
    src = {"vm": _vm_trained[0] / "out", "vc": _vc_tiny_run / "out", "vl": vl_tiny_run[0].out_dir,
           "mk": mk_trained[0] / "out"}.get(name)
    run = tmp_path / "run"
    if src:
        shutil.copytree(src, run)
    else:  # attention_basics refuses it while reading the flags: a run's marker is enough
        (run / "clip").mkdir(parents=True)
        (run / "clip" / "config.json").write_text(json.dumps({"script": "attention_basics"}))
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    mkdir = os.mkdir

    def read_only(path, *a, **k):  # tempfile.mkdtemp makes its folder with os.mkdir too
        if os.path.dirname(os.path.abspath(path)) == str(run):
            raise PermissionError(13, "Permission denied", str(path))
        return mkdir(path, *a, **k)
    monkeypatch.setattr(os, "mkdir", read_only)
    mod = {"vm": vm, "vc": vc, "vl": vl, "mk": mk, "ab": ab}[name]
    modes = [["--eval"]] + [["--train", "--resume"]] * (name != "ab")
    modes += [["--predict", "--video", "x.mp4", "--question", "Why?", "--choices", "A. a|B. b"]] * (name == "mk")
    for mode in modes:
        capsys.readouterr()
        try:  # vm, vc and ab print the line and exit 2 inside main; vl and mk raise it (their __main__ prints it)
            mod.main([*mode, "--out_dir", str(run)])
            err = "no error"
        except SystemExit as e:
            err = capsys.readouterr().err if e.code == 2 else f"exit status {e.code}"
        except mod.UserError as e:
            err = f"error: {e}\n"
        assert err.count("\n") == 1 and str(run) in err and ("written" in err or "write into" in err), err
        assert "step " not in capsys.readouterr().out  # no training step ran
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("name", ["vm", "vc", "vl", "mk", "ab"])
def test_an_image_the_user_may_not_read_is_one_line(name, _vm_trained, _vc_tiny_run, vl_tiny_run, mk_trained,
                                                    tmp_path, capsys, monkeypatch):
    """A frame or picture the user has no permission to read (made here by refusing Python's open on it: the tests
    run as root) is one line from the command line that names it, exit 2, not a PermissionError traceback."""
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(4):
        cv2.imwrite(str(folder / f"{i}.png"), np.full((40, 40, 3), 60 * i, np.uint8))
    locked, opener = str(folder / "1.png"), open
    run = {"vm": _vm_trained[0] / "out", "vc": _vc_tiny_run / "out", "vl": vl_tiny_run[0].out_dir,
           "mk": mk_trained[0] / "out", "ab": tmp_path / "out"}[name]
    if name == "ab":  # an untrained captioner is enough to reach the frames
        cfg = _ab_tiny(tmp_path)
        tok = ab.Tokenizer.from_texts(["a red circle"])
        ab.save_model(ab.Captioner(cfg, len(tok.ids), "unified"), tok, cfg, "unified", 1.0)
    argv = {"vm": ["--generate", "--video", folder], "vc": ["--generate", "--image", locked],
            "vl": ["--generate", "--image", locked, "--prompt", "What shape?"],
            "mk": ["--predict", "--video", folder, "--question", "Why?", "--choices", "A. a|B. b"],
            "ab": ["--generate", "--video", folder, "--variant", "unified"]}[name]

    def no_read(path, *a, **k):
        if os.fspath(path) == locked:
            raise PermissionError(13, "Permission denied", locked)
        return opener(path, *a, **k)
    mod = {"vm": vm, "vc": vc, "vl": vl, "mk": mk, "ab": ab}[name]
    monkeypatch.setattr(sys, "argv", [mod.__file__, *map(str, argv), "--out_dir", str(run)])
    monkeypatch.setattr("builtins.open", no_read)
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        runpy.run_path(mod.__file__, run_name="__main__")  # the script as the command line runs it
    assert e.value.code == 2 and capsys.readouterr().err == f"error: [Errno 13] Permission denied: '{locked}'\n"


@pytest.mark.parametrize("name", ["vm", "vc", "vl", "mk", "ab"])
def test_a_console_without_a_character_prints_an_escape_not_a_traceback(name, _vm_trained, _vc_tiny_run, vl_ckpt,
                                                                         mk_trained, tmp_path, monkeypatch):
    """Windows before Python 3.15 writes a redirected stdout in the code page (cp1252 here), which lacks most of
    Unicode: a folder named with an emoji, printed by the command line, ended the run in a UnicodeEncodeError. Now
    the character is written as its escape and the run goes on."""
    folder = tmp_path / "run\U0001f642"
    if name != "ab":  # a trained run's folder or a checkpoint, renamed
        shutil.copytree({"vm": _vm_trained[0] / "out", "vc": _vc_tiny_run / "out", "vl": vl_ckpt[1]["t5save"],
                         "mk": mk_trained[0] / "out"}[name], folder)
    argv = {"vm": ["--eval", "--out_dir", folder], "vc": ["--eval", "--out_dir", folder],
            "vl": ["--inspect", folder],  # it names the checkpoint
            "mk": ["--predict", "--video", mk_trained[0] / "data" / "test" / "00000.mp4", "--question", "What happens?",
                   "--choices", "A. it appears|B. it stops", "--out_dir", folder],  # it names the frame strip
            "ab": ["--train", "--preset", "tiny", "--out_dir", folder, "--data_dir", tmp_path / "data"]}[name]
    mod = {"vm": vm, "vc": vc, "vl": vl, "mk": mk, "ab": ab}[name]
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="cp1252")  # errors="strict", as Python opens it
    monkeypatch.setattr(sys, "argv", [mod.__file__, *map(str, argv)])
    monkeypatch.setattr(sys, "stdout", stdout)
    runpy.run_path(mod.__file__, run_name="__main__")
    stdout.flush()
    assert str(folder).replace("\U0001f642", "\\U0001f642").encode() in stdout.buffer.getvalue()


@pytest.mark.parametrize("mod", [vm, vc, vl, mk, ab], ids=["vm", "vc", "vl", "mk", "ab"])
def test_seed_outside_64_bits_is_refused_in_one_line(mod, tmp_path):
    """torch seeds a generator from 64 bits: --seed 2**64 ended in manual_seed's traceback. Each script now refuses a
    seed outside -2**63 .. 2**63 - 1 before any work (one step over either end), and takes both ends."""
    argv = ["--train", "--out_dir", str(tmp_path / "o"), "--data_dir", str(tmp_path / "d")]
    for seed in (2**63, -2**63 - 1, 2**64):
        with pytest.raises(mod.UserError, match=rf"^--seed {seed}: must fit in 64 bits"):
            mod.parse_args(argv + ["--seed", str(seed)])
    for seed in (2**63 - 1, -2**63):
        assert mod.parse_args(argv + ["--seed", str(seed)])[1].seed == seed
    assert not os.listdir(tmp_path)  # nothing written


@pytest.mark.parametrize("mod", [vm, vc, vl, mk, ab], ids=["vm", "vc", "vl", "mk", "ab"])
def test_help_shows_each_flags_line_of_config(mod, capsys, monkeypatch):
    """--help listed every Config flag with neither its meaning nor its default; on the command line each now shows
    its field's line of Config (type, default and comment)."""
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: one line per flag
    monkeypatch.setattr(sys, "argv", [mod.__file__, "--help"])
    with pytest.raises(SystemExit) as e:
        mod.parse_args()
    text, n = " ".join(capsys.readouterr().out.split()), 0
    for name, line in re.findall(r"^    (\w+): (.*)$", inspect.getsource(mod.Config), re.M):
        n += 1
        assert f"--{name} " in text and " ".join(line.split()) in text, (name, line)
    assert e.value.code == 0 and n == len(dataclasses.fields(mod.Config))


@pytest.mark.parametrize("mod", [vm, vc, vl, mk, ab], ids=["vm", "vc", "vl", "mk", "ab"])
def test_the_command_line_runs_where_stdout_cannot_be_reconfigured(mod, monkeypatch):
    """IDLE's stdout (run with F5, as __main__) has no reconfigure and pythonw's is None: the command line still runs
    (here --help, which argparse prints and ends with status 0)."""
    for stdout in (io.StringIO(), None):
        monkeypatch.setattr(sys, "argv", [mod.__file__, "--help"])
        monkeypatch.setattr(sys, "stdout", stdout)
        with pytest.raises(SystemExit) as e:
            runpy.run_path(mod.__file__, run_name="__main__")
        assert e.value.code == 0


@pytest.mark.parametrize("name", ["vm", "vc", "ab"])
def test_a_picture_that_cannot_be_written_is_one_line_not_reported_written(name, _vm_trained, _vc_tiny_run, tmp_path,
                                                                           capsys):
    """cv2.imwrite returns False where it cannot write (here a folder holds the picture's name) and raises nothing:
    the attention pictures were reported written. Now one line naming the picture, exit 2."""
    if name == "ab":
        (tmp_path / "heat.png").mkdir()
        with pytest.raises(ab.UserError, match="heat.png: could not be written"):
            ab.heat_png(str(tmp_path / "heat.png"), np.ones((2, 3)), np.zeros((3, 16, 16, 3), np.uint8), ["a", "b"],
                        "title", "rows")
        return
    run = shutil.copytree((_vm_trained[0] if name == "vm" else _vc_tiny_run) / "out", tmp_path / "run")
    if name == "vm":  # --eval draws attention.png
        argv, picture = ["--eval"], run / "attention.png"
    else:  # --generate draws caption_<image>.png
        image = shutil.copy(_vc_tiny_run / "data" / "test" / "00000.png", tmp_path / "x.png")
        argv, picture = ["--generate", "--image", image], run / "caption_x.png"
    picture.unlink(missing_ok=True)  # (the run's own)
    picture.mkdir()
    main_user_error(vm.main if name == "vm" else vc.main, capsys, argv + ["--out_dir", run], f"{picture}: could not be "
                    "written")


def test_vm_a_frame_opencv_cannot_read_gives_one_line_on_stderr(_vm_trained, tmp_path):
    """A frame OpenCV cannot decode (a BMP cut short) printed OpenCV's own error blocks before the script's line.
    The other subprocess tests miss it: importing a script that quiets OpenCV puts the setting in os.environ."""
    (tmp_path / "frames").mkdir()
    cv2.imwrite(str(tmp_path / "frames" / "f1.bmp"), np.zeros((16, 16, 3), np.uint8))
    bmp = (tmp_path / "frames" / "f1.bmp").read_bytes()
    (tmp_path / "frames" / "f1.bmp").write_bytes(bmp[:len(bmp) // 2])
    env = {k: v for k, v in os.environ.items() if not k.startswith("OPENCV_")}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "videollama_mini.py"), "--generate", "--video",
                           str(tmp_path / "frames"), "--out_dir", str(_vm_trained[0] / "out")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "f1.bmp" in proc.stderr, proc.stderr


@pytest.mark.parametrize("name", ["vm", "vc", "vl", "mk"])
def test_a_tiny_temperature_samples_what_greedy_decoding_picks(name, _vm_trained, _vc_tiny_run, mk_trained,
                                                                tmp_path, capsys):
    """logits / 1e-40 overflowed to inf, and torch.multinomial failed on the NaN probabilities (a traceback). The
    logits less their maximum cannot overflow: a tiny temperature now samples the tokens greedy decoding picks."""
    if name == "vm":
        run, media = _vm_trained[0] / "out", next((_vm_trained[0] / "data" / "test").glob("*.mp4"))
        argv, main = ["--generate", "--video", media], vm.main
    elif name == "vc":
        run, main = _vc_tiny_run / "out", vc.main
        argv = ["--generate", "--image", shutil.copy(_vc_tiny_run / "data" / "test" / "00000.png", tmp_path / "x.png")]
    elif name == "vl":  # (the tiny run answers at once with EOS: its sampler is called directly)
        logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(0)) * 10
        for top_k, top_p in ((0, 1.0), (5, 0.9)):
            assert torch.equal(vl.sample_next(logits, 1e-40, top_k, top_p, None), logits.argmax(-1))
        return
    else:
        run, main = mk_trained[0] / "out", mk.main
        argv = ["--predict", "--video", mk_trained[0] / "data" / "test" / "00000.mp4", "--question",
                "What happens to the red circle?", "--choices", "A. it appears|B. it stops"]
    run = shutil.copytree(run, tmp_path / "run")  # --generate and --predict may draw into the run's folder
    said = []
    for t in ("0", "1e-40"):
        capsys.readouterr()
        main([str(a) for a in argv] + ["--out_dir", str(run), "--temperature", t])
        lines = capsys.readouterr().out.strip().splitlines()  # the caption last; mark1 prints its answer's line
        said.append(next(line for line in lines if "answer:" in line) if name == "mk" else lines[-1])
    assert said[0] == said[1] and said[0], said
