from test_all import ROOT, run_script, assert_user_error  # noqa: F401  (header: dropped at merge)
# ==== section ====
import json
import os

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
    """transformers builds the reference; it is written in every key layout of hf_spec §1.2, fp32 and bf16, sharded."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.VideoLlavaConfig(text_config=_VL_TEXT, vision_config=_VL_VISION)
    ref = transformers.VideoLlavaForConditionalGeneration(cfg).eval()
    root = tmp_path_factory.mktemp("vl")
    ref.save_pretrained(root / "t5save")  # transformers 5 layout: towers without `vision_model.`
    _vl_tokenizer(root / "t5save")
    config = json.load(open(root / "t5save" / "config.json"))
    saved = load_file(str(root / "t5save" / "model.safetensors"))
    assert any(k.startswith("image_tower.encoder.") for k in saved)  # the hybrid layout, as hf_spec says
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


def test_vl_tokenizer_matches_hf(tmp_path):
    from transformers import AutoTokenizer
    _vl_tokenizer(tmp_path)
    hf, ours = AutoTokenizer.from_pretrained(str(tmp_path)), vl.SentencePieceBPE(str(tmp_path))
    assert ours.added["<image>"] == 32000 and ours.added["<video>"] == 32001
    for s in ["USER: <video>\nWhich way does the circle move? ASSISTANT:", "hello world", " leading space",
              "<image>hi", "naïve 日本 🙂 done", "two  spaces and\ttabs\n\nlines", "", "ASSISTANT: red</s>",
              "a<video><video>b <image> c", "zzzqqq unseen words"]:
        want = hf(s).input_ids
        assert ours.encode(s) == want, s
        assert ours.decode(want) == hf.decode(want, skip_special_tokens=True), s


def test_vl_placeholder_count_mismatch(vl_ckpt):
    ours = vl.VideoLlava.from_pretrained(vl_ckpt[1]["hub"], dtype=torch.float32)
    ids = torch.tensor([[1, 32000, 32000, 32000, 5]])  # 3 placeholders, an image gives 4 features
    with pytest.raises(vl.UserError, match="3 image placeholder tokens but the images give 4"):
        ours(ids, pixel_values_images=torch.randn(1, 3, 28, 28))
    with pytest.raises(vl.UserError, match="no video was given"):
        ours(torch.tensor([[1, 32001, 5]]))


def test_vl_strict_loading_lists_every_bad_key(vl_ckpt, tmp_path):
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
    proc = run_script("video_llava.py", "--inspect", str(tmp_path / "bad"))  # inspection reports, does not fail
    assert proc.returncode == 0 and "language_model.model.norm.weight" in proc.stdout
    proc = run_script("video_llava.py", "--generate", "--from_pretrained", str(tmp_path / "bad"), "--prompt", "hi")
    assert_user_error(proc, "bad", "missing")


def test_vl_inspect(vl_ckpt):
    proc = run_script("video_llava.py", "--inspect", vl_ckpt[1]["hub_sharded"], "--n_frames", "8")
    assert proc.returncode == 0, proc.stderr
    n = sum(v.numel() for v in vl_ckpt[0].state_dict().values())
    assert f"{n / 1e6:.2f}M parameters" in proc.stdout
    assert "3 file(s)" in proc.stdout and "missing none" in proc.stdout and "8 frames" in proc.stdout


def test_vl_cli_generate_hf_checkpoint_streams_transformers_answer(vl_ckpt, tmp_path):
    """End to end: mp4 -> OpenCV preprocessing -> our tokenizer + expansion -> CLI stream; the same inputs through
    transformers give the same text."""
    ref, dirs = vl_ckpt
    from transformers import AutoTokenizer
    clip = str(tmp_path / "clip.mp4")
    w = cv2.VideoWriter(clip, cv2.VideoWriter_fourcc(*"mp4v"), 8, (64, 48))
    for t in range(10):
        img = np.full((48, 64, 3), 40, np.uint8)
        cv2.circle(img, (8 + 5 * t, 24), 6, (0, 0, 255), -1)
        w.write(img)
    w.release()
    proc = run_script("video_llava.py", "--generate", "--from_pretrained", dirs["t5save"], "--video", clip,
                      "--prompt", "What happens?", "--dtype", "float32", "--max_new_tokens", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours = vl.VideoLlava.from_pretrained(dirs["t5save"], torch.float32)
    tok = vl.SentencePieceBPE(dirs["t5save"])
    ids = torch.tensor([vl.expand_placeholders(tok.encode(vl.prompt_text("What happens?", "video")), ours.cfg, 8)])
    assert (ids == 32001).sum() == 8 * 5
    vids = torch.from_numpy(vl.load_video(clip, 8, 28))[None]
    out = ref.generate(input_ids=ids, pixel_values_videos=vids, max_new_tokens=8, do_sample=False)[0, ids.shape[1]:]
    want = AutoTokenizer.from_pretrained(dirs["t5save"]).decode(out, skip_special_tokens=True)
    assert proc.stdout.strip() == want.strip()


def test_vl_preprocessing():
    assert vl.frame_indices(10, 8) == [0, 1, 2, 3, 5, 6, 7, 8]  # np.arange(0, 10, 1.25).astype(int)
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


def test_vl_video_roundtrip_and_frame_folder(tmp_path):
    path = str(tmp_path / "c.mp4")
    w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 8, (40, 40))
    frames = []
    for t in range(6):
        img = np.full((40, 40, 3), 20 * t, np.uint8)
        frames.append(img)
        w.write(img)
    w.release()
    v = vl.load_video(path, 4, 20)
    assert v.shape == (4, 3, 20, 20)
    grey = v[:, 0].mean((1, 2)) * vl.CLIP_STD[0] + vl.CLIP_MEAN[0]  # back to [0, 1]
    assert np.allclose(grey * 255, [0, 20, 60, 80], atol=4)  # frames 0, 1, 3, 4 = arange(0, 6, 1.5)
    os.makedirs(tmp_path / "frames")
    for i, f in enumerate(frames):
        cv2.imwrite(str(tmp_path / "frames" / f"{i:03d}.png"), f)
    assert np.allclose(vl.load_video(str(tmp_path / "frames"), 4, 20), v, atol=0.1)


def test_vl_sampler_and_metrics():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    assert vl.sample_next(logits, 0.0, 0, 1.0, g).item() == 1
    assert all(vl.sample_next(logits, 1.0, 1, 1.0, g).item() == 1 for _ in range(20))  # top-k 1 = argmax
    assert all(vl.sample_next(logits, 1.0, 0, 0.01, g).item() == 1 for _ in range(20))  # tiny top-p = argmax
    draws = {vl.sample_next(logits, 1.0, 2, 1.0, g).item() for _ in range(200)}
    assert draws == {1, 3}  # top-k 2 keeps exactly the two best
    a = [vl.sample_next(logits, 1.0, 0, 1.0, torch.Generator().manual_seed(5)).item() for _ in range(3)]
    assert len(set(a)) == 1  # a seeded generator reproduces
    assert vl.exact_match(["Red.", "left ", "two"], ["red", "left", "three"]) == pytest.approx(2 / 3)


def test_vl_causal_and_loss_mask():
    cfg = vl.Config(**{**vl.PRESETS["tiny"], "vocab_size": 20, "image_token_index": 18, "video_token_index": 19})
    torch.manual_seed(0)
    m = vl.VideoLlava(cfg)
    m._init_weights()
    ids = torch.randint(0, 18, (2, 10))
    a, _ = m(ids)
    ids2 = ids.clone()
    ids2[:, 6:] = (ids2[:, 6:] + 1) % 18
    b, _ = m(ids2)
    assert torch.allclose(a[:, :6], b[:, :6], atol=1e-6) and not torch.allclose(a[:, 6:], b[:, 6:])
    tgt = torch.full((2, 10), -100)
    tgt[:, 7:] = ids[:, 7:]
    _, loss = m(ids, targets=tgt)
    want = torch.nn.functional.cross_entropy(a[:, 7:].reshape(-1, 20), ids[:, 7:].reshape(-1))
    assert torch.allclose(loss, want, atol=1e-6)


def test_vl_train_tiny_eval_generate_freeze(tmp_path):
    data, out = str(tmp_path / "data"), str(tmp_path / "out")
    proc = run_script("video_llava.py", "--train", "--preset", "tiny", "--data_dir", data, "--out_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
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
    proc = run_script("video_llava.py", "--eval", "--out_dir", out, "--data_dir", data)
    assert proc.returncode == 0, proc.stderr[-2000:]
    clip = os.path.join(data, "test", "clip_00000.mp4")
    proc = run_script("video_llava.py", "--generate", "--out_dir", out, "--video", clip, "--prompt",
                      "Which way does the red circle move?")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # LLaVA stage 1: only the projector moves
    before = load_file(os.path.join(out, "model.safetensors"))
    out2 = str(tmp_path / "out2")
    proc = run_script("video_llava.py", "--train", "--preset", "tiny", "--data_dir", data, "--out_dir", out2,
                      "--from_pretrained", out, "--freeze", "vision,llm", "--max_steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "frozen" in proc.stdout
    after = load_file(os.path.join(out2, "model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same != k.startswith("multi_modal_projector."), k


def test_vl_bad_inputs(vl_ckpt, tmp_path):
    dirs = vl_ckpt[1]
    hub = dirs["hub"]
    gen = lambda *a: run_script("video_llava.py", "--generate", "--dtype", "float32", *a)
    os.makedirs(tmp_path / "empty")
    assert_user_error(gen("--from_pretrained", str(tmp_path / "empty"), "--prompt", "hi"), "no config.json")
    os.makedirs(tmp_path / "noweights")
    json.dump(json.load(open(os.path.join(hub, "config.json"))), open(tmp_path / "noweights" / "config.json", "w"))
    assert_user_error(gen("--from_pretrained", str(tmp_path / "noweights"), "--prompt", "hi"), "no model.safetensors")
    os.makedirs(tmp_path / "qwen")
    json.dump({"model_type": "qwen3"}, open(tmp_path / "qwen" / "config.json", "w"))
    assert_user_error(gen("--from_pretrained", str(tmp_path / "qwen"), "--prompt", "hi"), "qwen3", "another architecture")
    img = str(tmp_path / "x.png")
    cv2.imwrite(img, np.zeros((30, 30, 3), np.uint8))
    # two <image> tags for one image
    assert_user_error(gen("--from_pretrained", dirs["t5save"], "--image", img, "--prompt", "USER: <image><image> hi"),
                      "8 image placeholder tokens but the images give 4")
    # the same checks in-process (each CLI call costs a torch import): the loaders and generate raise UserError
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
    with pytest.raises(vl.UserError, match="context"):  # > 256 positions of the tiny config
        vl.generate(model, torch.ones(1, 250, dtype=torch.long), max_new_tokens=10)
    with pytest.raises(vl.UserError, match="eyes"):
        vl.apply_freeze(model, "eyes")
    # and one of them through the CLI, as a user meets it
    assert_user_error(gen("--from_pretrained", dirs["t5save"], "--video", str(tmp_path / "zero.mp4"), "--prompt", "q"),
                      "zero.mp4")
    assert_user_error(run_script("video_llava.py", "--train", "--preset", "huge"), "huge")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "question": "q", "answer": "a"}\n{"video": "v.mp4"}\n')
    with pytest.raises(vl.UserError, match="bad.jsonl:2"):
        vl.read_annotations(str(bad))


def test_vl_stage1_projector_only_on_hf_checkpoint(vl_ckpt, tmp_path):
    """--freeze vision,llm on top of an HF checkpoint: its own tokenizer, only multi_modal_projector.* changes."""
    src = vl_ckpt[1]["t5save"]
    out = str(tmp_path / "out")
    proc = run_script("video_llava.py", "--train", "--preset", "tiny", "--from_pretrained", src, "--freeze",
                      "vision,llm", "--max_steps", "2", "--data_dir", str(tmp_path / "data"), "--out_dir", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = {vl.canonical_key(k): v for k, v in load_file(os.path.join(src, "model.safetensors")).items()}
    after = load_file(os.path.join(out, "model.safetensors"))
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]) != k.startswith("multi_modal_projector."), k
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    assert json.load(open(os.path.join(out, "eval.json")))["test"]["video"]["n"] > 0
