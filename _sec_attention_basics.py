from test_all import ROOT, run_script, assert_user_error  # noqa: F401  (header: dropped at merge)
# ==== section ====
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
        m = ab._init_weights(ab.MultiHeadAttention(32, 4, d_ctx=d_ctx, sdpa=False)).double()
        x = torch.randn(2, 5, 32, dtype=torch.float64)
        ctx = None if d_ctx is None else torch.randn(2, 9, 24, dtype=torch.float64)
        y = m(x, ctx, causal=causal and d_ctx is None)
        m.sdpa = True
        assert torch.allclose(y, m(x, ctx, causal=causal and d_ctx is None), atol=1e-12, rtol=0)


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
    enc = ab._init_weights(ab.TextEncoder(cfg, 20)).eval()
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
    res = ab._init_weights(ab.PerceiverResampler(32, 4, 64, 2, 16, sdpa=True))
    shapes = {res(torch.randn(2, f, 5, 32)).shape for f in (1, 2, 7, 16)}
    assert shapes == {torch.Size([2, 64, 32])}
    with pytest.raises(ab.UserError):
        res(torch.randn(1, 17, 5, 32))  # more frames than time embeddings: a clear error, not an index crash
    # time embeddings make the order of frames matter
    x = torch.randn(1, 3, 5, 32)
    assert not torch.allclose(res(x), res(x.flip(1)))


def test_ab_zero_gate_leaves_lm_unchanged_bit_for_bit():
    torch.manual_seed(0)
    cfg = ab.Config(**ab.PRESETS["tiny"])
    lm = ab._init_weights(ab.Decoder(cfg, 30, 12, xattn=True)).eval()
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
    blk = ab._init_weights(ab.GatedCrossAttention(16, 16, 2, sdpa=False))
    blk.attn_gate.data.fill_(1.0)
    x, media = torch.randn(2, 8, 16), torch.randn(2, 9, 16)
    y = blk(x, media, mask)
    for m in range(3):
        media2 = media.clone()
        media2[:, m * Q:(m + 1) * Q] += 5.0
        changed = ~torch.isclose(blk(x, media2, mask), y).all(-1)  # (B, L)
        assert torch.equal(changed[0], torch.tensor(latest[0]) == m + 1), m


def test_ab_sampling_helpers_and_metric():
    assert ab.subsample(72, 24, 3) == list(range(0, 72, 8))
    assert ab.fixed_clips([0, 8, 16, 24, 32], 2) == [[0, 8], [16, 24], [32, 32]]
    assert ab.sample_indices(16, 4) == [2, 6, 10, 14]
    assert ab.sample_indices(2, 4) == [0, 0, 1, 1]
    with pytest.raises(ab.UserError):
        ab.sample_indices(0, 4)
    assert ab.exact_match(["a red circle moves left", "A blue  square moves up."],
                          ["a red circle moves left", "a blue square moves down"]) == 0.5


def test_ab_tour_runs():
    proc = run_script("attention_basics.py")
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ab.SECTIONS:
        assert f"== {name}" in proc.stdout
    assert "every check passed" in proc.stdout and "tour check failed" not in proc.stdout
    one = run_script("attention_basics.py", "--section", "perceiver")
    assert one.returncode == 0 and "== perceiver" in one.stdout and "== clip" not in one.stdout


def test_ab_train_tiny_runs(tmp_path):
    """--train --preset tiny end to end: real PNG/mp4 files, three checkpoints, eval.json in the house shape,
    heat maps; then --eval and --generate from the checkpoints."""
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
    assert res["train_seconds"] > 0 and set(res["variants"]) == {"unified", "cross"}
    for name in ("attn_unified_text_over_frames", "attn_cross_latents_over_frames", "attn_cross_text_over_frames"):
        assert cv2.imread(str(tmp_path / "out" / f"{name}.png")) is not None
    for name in ("clip", "unified", "cross"):
        assert (tmp_path / "out" / name / "model.safetensors").exists()
    ev = run_script("attention_basics.py", "--eval", *args)
    assert ev.returncode == 0, ev.stderr[-2000:]
    assert json.load(open(tmp_path / "out" / "eval.json"))["test"]["cross"] == res["test"]["cross"]
    gen = run_script("attention_basics.py", "--generate", "--video", clip, "--variant", "unified", *args)
    assert gen.returncode == 0 and gen.stdout.strip(), gen.stderr[-2000:]


def test_ab_checkpoint_round_trip(tmp_path):
    cfg = _ab_tiny(tmp_path)
    tok = ab.Tokenizer.from_texts(["a red circle moves left", "a blue square moves up"])
    for variant in ("unified", "cross"):
        torch.manual_seed(0)
        m = ab._init_weights(ab.Captioner(cfg, len(tok.ids), variant)).eval()
        for blk in getattr(m.decoder, "xattn", None) or []:
            blk.attn_gate.data.fill_(0.3)  # non-zero so the media matters
        ab.save_model(m, tok, cfg, variant, 1.0)
        m2, tok2, cfg2, secs = ab.load_model(cfg.out_dir, variant)
        frames = torch.randint(0, 255, (2, cfg.n_frames, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8)
        ids = torch.tensor([tok.encode("a red circle")[:-1]] * 2)
        with torch.no_grad():
            assert torch.equal(m(m.encode(frames), ids)[0], m2.eval()(m2.encode(frames), ids)[0])
        assert tok2.ids == tok.ids and secs == 1.0
        assert ab.generate(m, frames, cfg, "cpu") == ab.generate(m2, frames, cfg, "cpu")


def test_ab_bad_inputs(tmp_path):
    assert_user_error(run_script("attention_basics.py", "--section", "nope"), "--section nope")
    assert_user_error(run_script("attention_basics.py", "--preset", "huge"), "--preset huge")
    assert_user_error(run_script("attention_basics.py", "--variant", "both"), "--variant both")
    assert_user_error(run_script("attention_basics.py", "--eval", "--out_dir", tmp_path / "none"), "no checkpoint")
    other = tmp_path / "other" / "cross"
    other.mkdir(parents=True)
    (other / "config.json").write_text(json.dumps({"script": "vit_caption"}))
    (other / "model.safetensors").write_bytes(b"x")
    assert_user_error(run_script("attention_basics.py", "--generate", "--video", "x.mp4", "--out_dir",
                                 tmp_path / "other"), "vit_caption")
    # a video that is not a video, and an empty folder of frames
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"not a video")
    with pytest.raises(ab.UserError, match="bad.mp4"):
        ab.load_video(str(bad), 4, 16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ab.UserError, match="no frames"):
        ab.load_video(str(tmp_path / "empty"), 4, 16)
    # malformed annotation lines name the line
    ann = tmp_path / "ann.txt"
    ann.write_text("a.png\ta red circle\njust-a-path\n")
    (tmp_path / "a.png").write_bytes(b"")
    with pytest.raises(ab.UserError, match=r"ann.txt:2"):
        ab.read_annotations(str(ann))
    # a NaN loss stops training with a clear line
    cfg = _ab_tiny(tmp_path)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for g in opt.param_groups:
        g["base_lr"] = 0.1
    with pytest.raises(ab.UserError, match="loss became nan"):
        ab.fit(model, opt, 3, lambda step: model(torch.full((1, 2), float("nan"))).sum(), cfg, "probe")
