from test_all import ROOT, run_script, assert_user_error  # noqa: F401  (header: dropped at merge)
# ==== section ====
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
    mlp = vc.MLP(cfg)
    x = torch.randn(3, cfg.d_model)
    ref = mlp.down_proj.weight @ (torch.nn.functional.silu(mlp.gate_proj.weight @ x.T) * (mlp.up_proj.weight @ x.T))
    assert torch.allclose(mlp(x), ref.T, atol=1e-6)


@_vc_1t
def test_vc_overfit_one_batch():
    torch.manual_seed(0)
    cfg = vc.Config(**{**vc.PRESETS["tiny"], "d_model": 64, "mlp_dim": 128})
    model = vc.ViTCaptioner(cfg, 12)
    images = _vc_images(4, cfg)
    seqs = [[0, 1 + i, 5 + i, 9, 0] for i in range(4)]  # each image its own caption
    inp, tgt = vc.pad_batch(seqs, cfg.max_len)
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
    # training forward (last layer queries only the text positions) == the full decode at the text positions
    idx = torch.randint(0, 23, (3, 6))
    x = torch.cat([model.encode(images), model.embed_tokens(idx)], 1)
    assert torch.allclose(model(images, idx)[0], model.decode(x)[:, model.n_prefix:], atol=1e-10)
    # generation: greedy with the cache == greedy re-running the whole sequence
    cfg = dataclasses.replace(cfg, max_new_tokens=10)
    assert vc.generate(model, images, cfg, use_cache=True) == vc.generate(model, images, cfg, use_cache=False)


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
    logp = model.decode(x)[0, model.n_prefix:].double().log_softmax(-1)
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
    model, cfg = _vc_model()
    images = _vc_images(3, cfg)
    hot = dataclasses.replace(cfg, temperature=1.5, top_k=5, max_new_tokens=8)
    a = vc.generate(model, images, hot, generator=torch.Generator().manual_seed(1))
    b = vc.generate(model, images, hot, generator=torch.Generator().manual_seed(1))
    c = vc.generate(model, images, hot, generator=torch.Generator().manual_seed(2))
    assert a == b and a != c  # seeded: reproducible, and the seed matters
    # top_k=1 sampling is greedy whatever the temperature
    assert vc.generate(model, images, dataclasses.replace(hot, top_k=1), generator=torch.Generator()) == \
        vc.generate(model, images, dataclasses.replace(cfg, max_new_tokens=8))
    # sampled token frequencies follow softmax(logits / T)
    g = torch.Generator().manual_seed(0)
    probs = vc.filter_logits(logits / 2.0, 0, 1.0).softmax(-1)
    draws = torch.multinomial(probs.expand(20000, -1), 1, generator=g)[:, 0]
    assert torch.allclose(torch.bincount(draws, minlength=5) / 20000.0, probs[0], atol=0.015)


@_vc_1t
def test_vc_metrics_hand_computed():
    assert vc.exact_match(["A red circle.", "a blue square"], [["a red circle"], ["a red square"]]) == 0.5
    assert vc.bleu4(["a b c d e"], [["a b c d e"]]) == pytest.approx(1.0)
    # precisions 4/5, 3/4, 2/3, 1/2 and no brevity penalty
    assert vc.bleu4(["a b c d e"], [["a b c d f"]]) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # hypothesis 4 words, closest reference 6: brevity penalty exp(1 - 6/4)
    assert vc.bleu4(["a b c d"], [["a b c d e f", "q"]]) == pytest.approx(math.exp(1 - 6 / 4))
    assert vc.bleu4(["x y z"], [["a b c d"]]) == 0.0
    # CIDEr-D: two images, x y vs reference x y z; every n-gram of image 1 has idf log 2
    got = vc.cider_d(["x y", "p q"], [["x y z"], ["p q"]])
    first = (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * 10 * math.exp(-1 / 72)
    second = (1 + 1) / 4 * 10  # unigrams and the bigram match exactly; no 3/4-grams
    assert got == pytest.approx((first + second) / 2)


@_vc_1t
def test_vc_grad_accumulation_equals_big_batch(tmp_path):
    a, _ = vc.train(_vc_cfg(tmp_path / "a", batch_size=8, grad_accum=1, max_steps=3))
    b, _ = vc.train(_vc_cfg(tmp_path / "b", batch_size=4, grad_accum=2, max_steps=3))
    assert torch.allclose(_vc_weights(a), _vc_weights(b), atol=1e-5)


@_vc_1t
def test_vc_checkpoint_round_trip_and_exact_resume(tmp_path):
    full, _ = vc.train(_vc_cfg(tmp_path, out_dir=str(tmp_path / "full"), vit_dropout=0.2, dropout=0.1))
    cfg = _vc_cfg(tmp_path, out_dir=str(tmp_path / "cut"), vit_dropout=0.2, dropout=0.1, stop_after=3)
    vc.train(cfg)
    resumed, _ = vc.train(dataclasses.replace(cfg, stop_after=0), resume=True)
    assert torch.equal(_vc_weights(full), _vc_weights(resumed))  # dropout RNG and optimizer state restored
    loaded, tok, lcfg = vc.load_checkpoint(str(tmp_path / "full"))
    assert torch.equal(_vc_weights(loaded), _vc_weights(full)) and lcfg.vit_dim == cfg.vit_dim
    ev = json.load(open(tmp_path / "full" / "eval.json"))
    assert set(ev) == {"test", "novel", "train_seconds"} and ev["test"]["n"] == 12
    assert 0 <= ev["test"]["exact_match"] <= 1 and ev["test"]["samples"]
    assert cv2.imread(str(tmp_path / "full" / "attention.png")) is not None


@_vc_1t
def test_vc_world_splits_and_captions(tmp_path):
    cfg = _vc_cfg(tmp_path, n_train=60, n_novel=30)
    files = vc.build_world(cfg)
    pairs = lambda cap: {(w[i + 1], w[i + 2]) for w in [cap.split()] for i in range(len(w) - 2)  # noqa: E731
                         if w[i] in vc.SIZES}
    train = vc.read_captions(files["train"])
    novel = vc.read_captions(files["novel"])
    assert all(not (pairs(c) & vc.NOVEL_PAIRS) for _, cs in train for c in cs)
    assert all(pairs(cs[0]) & vc.NOVEL_PAIRS for _, cs in novel)
    assert {len(cs) for _, cs in train} == {1, 2}  # one object: one caption; two: both points of view
    # the pixels agree with the caption: in "A above B" A's colour sits higher in the image
    for path, cs in train:
        w = cs[0].split()
        if "above" in w:
            img = cv2.imread(path)
            rows = [np.nonzero((np.abs(img.astype(int) - vc.COLOURS[c]).sum(-1) < 30).any(1))[0].mean()
                    for c in (w[2], w[-2])]
            if w[2] != w[-2]:
                assert rows[0] < rows[1], (path, cs[0])


@_vc_1t
def test_vc_image_loader_any_size(tmp_path):
    img = np.zeros((37, 100, 3), np.uint8)
    img[:, :, 2] = 255  # BGR red
    cv2.imwrite(str(tmp_path / "wide.jpg"), img)
    out = vc.load_image(str(tmp_path / "wide.jpg"), 16)
    assert out.shape == (16, 16, 3) and out.dtype == np.uint8 and out[8, 8, 0] > 200 and out[8, 8, 2] < 50  # RGB
    cv2.imwrite(str(tmp_path / "grey.png"), np.full((5, 7), 128, np.uint8))
    assert vc.load_image(str(tmp_path / "grey.png"), 16).shape == (16, 16, 3)


@_vc_1t
def test_vc_max_train_and_small_sets(tmp_path):
    data = vc.prepare_data(_vc_cfg(tmp_path, max_train=16), 0)
    assert len(data["train"][0]) == 16 and data["train"][1].shape[0] == 16
    idx = vc.global_batch(0, 5, 12, 0)  # a batch larger than the set: every image, repeated
    assert len(idx) == 12 and set(idx.tolist()) == set(range(5))


@_vc_1t
def test_vc_seed_preset_sizes():
    cfg = vc.Config(**vc.PRESETS["seed"])
    with torch.device("meta"):
        model = vc.ViTCaptioner(cfg, 50257)
    parts = model.part_counts()
    E, D, M = 512, 128, 11008
    block = 4 * E * E + 4 * E + 2 * E * 2048 + 2048 + E + 4 * E  # qkv+proj, MLP, two LayerNorms
    assert parts["vit"] == 3 * 16 * 16 * E + E + E + 37 * E + 16 * block + 2 * E
    assert parts["projection"] == E * D + D
    assert parts["decoder layers"] == 8 * (4 * D * D + 3 * D * M + 2 * D) + D
    assert parts["embedding"] == parts["lm_head"] == 50257 * D


def test_vc_train_eval_generate_cli(tmp_path):
    out, data = str(tmp_path / "out"), str(tmp_path / "data")
    p = run_script("vit_caption.py", "--train", "--preset", "tiny", "--data_dir", data, "--out_dir", out)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "exact" in p.stdout and os.path.isfile(os.path.join(out, "eval.json"))
    p = run_script("vit_caption.py", "--eval", "--preset", "tiny", "--data_dir", data, "--out_dir", out)
    assert p.returncode == 0 and "novel" in p.stdout, p.stderr[-2000:]
    img = np.random.default_rng(0).integers(0, 255, (300, 131, 3), dtype=np.uint8)
    cv2.imwrite(str(tmp_path / "odd.jpg"), img)
    p = run_script("vit_caption.py", "--generate", "--image", tmp_path / "odd.jpg", "--out_dir", out,
                   "--temperature", "0.8", "--top_p", "0.9")
    assert p.returncode == 0, p.stderr[-2000:]
    assert cv2.imread(os.path.join(out, "caption_odd.png")) is not None
    # bad inputs: one line, exit status 2, nothing saved lost
    before = open(os.path.join(out, "model.safetensors"), "rb").read()
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.png").write_bytes(b"not a png at all")
    for args, needle in ((["--image", tmp_path / "missing.png"], "missing.png"),
                         (["--image", tmp_path / "empty.png"], "empty"),
                         (["--image", tmp_path / "junk.png"], "junk.png"),
                         ([], "--image")):
        assert_user_error(run_script("vit_caption.py", "--generate", "--out_dir", out, *args), needle)
    assert open(os.path.join(out, "model.safetensors"), "rb").read() == before


def test_vc_bad_inputs(tmp_path):
    (tmp_path / "a.png").write_bytes(cv2.imencode(".png", np.zeros((8, 8, 3), np.uint8))[1].tobytes())
    (tmp_path / "missing.txt").write_text("a.png | a small red circle\n\nb.png | a large blue square\n")
    (tmp_path / "malformed.txt").write_text("# comment\na.png | a small red circle\na.png a caption without bar\n")
    (tmp_path / "empty_cap.txt").write_text("a.png |   \n")
    for name, needles in (("missing.txt", ["missing.txt:3", "b.png"]), ("malformed.txt", ["malformed.txt:3"]),
                          ("empty_cap.txt", ["empty_cap.txt:1", "caption"]), ("nope.txt", ["nope.txt"])):
        p = run_script("vit_caption.py", "--train", "--preset", "tiny", "--data", tmp_path / name,
                       "--out_dir", tmp_path / "o")
        assert_user_error(p, *needles)
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"script": "videollama_mini", "config": {}}))
    (other / "model.safetensors").write_bytes(b"x")
    assert_user_error(run_script("vit_caption.py", "--eval", "--out_dir", other), "videollama_mini")
    assert_user_error(run_script("vit_caption.py", "--train", "--preset", "huge"), "--preset huge")


@_vc_1t
def test_vc_user_data_training(tmp_path):
    """A folder of images + captions file, several captions per image, trains and evaluates in-process."""
    for i, (colour, bgr) in enumerate((("red", (0, 0, 255)), ("blue", (255, 0, 0)), ("green", (0, 255, 0)))):
        for j in range(4):
            img = np.full((20 + 3 * j, 30, 3), 40, np.uint8)
            img[5:15, 5:15] = bgr
            cv2.imwrite(str(tmp_path / f"{colour}{j}.png"), img)
    lines = [f"{c}{j}.png | a {c} patch\n{c}{j}.png | the {c} patch" for c in ("red", "blue", "green") for j in range(4)]
    (tmp_path / "caps.txt").write_text("\n".join(lines) + "\n")
    cfg = _vc_cfg(tmp_path, data=str(tmp_path / "caps.txt"), max_steps=4)
    data = vc.prepare_data(cfg, 0)
    assert len(data["train"][0]) == 10 and len(data["test"][0]) == 2 and len(data["train"][0][0][1]) == 2
    vc.train(cfg)
    assert json.load(open(tmp_path / "out" / "eval.json"))["test"]["n"] == 2


@_vc_1t
def test_vc_ddp_two_processes_match_one(tmp_path):
    """2-process gloo DDP (batch 4 per rank) ends at the same weights as one process with batch 8."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    common = ["--preset", "tiny", "--data_dir", str(tmp_path / "data"), "--max_steps", "3"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537",
           os.path.join(ROOT, "vit_caption.py"), "--train", *common, "--batch_size", "4", "--out_dir",
           str(tmp_path / "ddp")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("step 2/3") == 1  # rank 0 alone prints
    single, _ = vc.train(_vc_cfg(tmp_path, out_dir=str(tmp_path / "one"), max_steps=3, batch_size=8))
    ddp, _, _ = vc.load_checkpoint(str(tmp_path / "ddp"))
    assert torch.allclose(_vc_weights(ddp), _vc_weights(single), atol=1e-5)
