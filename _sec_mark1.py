from test_all import ROOT, run_script, assert_user_error  # noqa: F401  (header: dropped at merge)
# ==== section ====
import json
import os
import shutil

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
    # a stand-in for Qwen3's chat template that renders one user turn as hf_spec 2.4 says
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
    x, valid = mk.left_pad_rows(rows, "cpu")
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
    content = "What happens to the red circle?\nA. it appears\nB. it stops"
    ref = ht.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                 enable_thinking=False, tokenize=False)
    assert mk.QwenTokenizer.chat(content) == ref
    assert qt.encode(mk.QwenTokenizer.chat(content)) == ht(ref)["input_ids"]
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
    assert logits.shape == (2, inp.shape[1], len(tok.ids)) and fl.shape == (2, n_frames) and torch.isfinite(loss)


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
    rows = [mk.generate(model, feats[i:i + 1], items[i:i + 1], tok, cfg)[0][0] for i in range(2)]
    assert batch == nocache == rows and len(batch[0]) > 0
    # sampling is reproducible from a seeded generator
    scfg = mk.Config(**{**cfg.__dict__, "temperature": 1.0, "top_k": 5, "top_p": 0.9})
    s1 = mk.generate(model, feats, items, tok, scfg, generator=torch.Generator().manual_seed(3))[0]
    s2 = mk.generate(model, feats, items, tok, scfg, generator=torch.Generator().manual_seed(3))[0]
    assert s1 == s2


def test_mk_filter_logits():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert torch.isinf(mk.filter_logits(logits, 2, 1.0)).tolist() == [[True, False, False, True]]
    p = torch.tensor([[0.6, 0.3, 0.1]]).log()
    assert torch.isinf(mk.filter_logits(p, 0, 0.7)).tolist() == [[False, False, True]]


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
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        _, loss, fl = model(model.encode(clips), q_ids, q_valid, inp, tgt, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    model.eval()
    ids, fl = mk.generate(model, model.encode(clips), items, tok, cfg)
    assert [tok.decode(i).strip() for i in ids] == ["A. it appears", "B. it stops"]
    assert ((fl > 0).float() == labels).all()


def test_mk_grad_accumulation_equals_big_batch(tmp_path):
    cfg = _mk_tiny_cfg(tmp_path)
    model, tok = _mk_model(cfg)
    items = [dict(question=q, choices=["A. it appears", "B. it stops"], answer=a)
             for q, a in (("What happens?", "A. it appears"), ("What happens to the red circle?", "B. it stops"))] * 2
    clips = torch.randint(0, 255, (4, cfg.n_frames, 32, 32, 3), dtype=torch.uint8)
    labels = torch.randint(0, 2, (4, cfg.n_frames)).float()

    def grads(groups):
        model.zero_grad()
        for g in groups:
            q_ids, q_valid, inp, tgt = mk.text_batch([items[i] for i in g], tok)
            _, loss, _ = model(model.encode(clips[g]), q_ids, q_valid, inp, tgt, labels[g])
            (loss * len(g) / 4).backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    # same answer lengths in each half, so the mean over answer tokens splits evenly
    big, acc = grads([[0, 1, 2, 3]]), grads([[0, 1], [2, 3]])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(big, acc))


# ---- data, video loading, metrics


def test_mk_sample_indices():
    assert mk.sample_indices(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert mk.sample_indices(3, 6) == [0, 0, 1, 1, 2, 2]  # short clips repeat
    assert all(0 <= i < 100 for i in mk.sample_indices(100, 16)) and mk.sample_indices(100, 16) == sorted(mk.sample_indices(100, 16))
    with pytest.raises(ValueError):
        mk.sample_indices(0, 4)


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
        cv2.imwrite(str(folder / f"{i:03d}.png"), img)
    clip2, _, _ = mk.load_video(str(folder), 8, 32)
    assert np.abs(clip2.astype(int) - clip.astype(int)).max() <= 1
    lab = mk.frame_labels(ann["support_times"], times, dur, "x")
    assert lab.sum() >= 2 and len(ann["choices"]) == 4 and ann["answer"] in ann["choices"]


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
    assert mk.segment_from_scores([0.1, 0.3, 0.2, 0, 0, 0, 0, 0], times, 2.0, 0.5) == (0.25, 0.5)


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
    save_file(state, str(tmp_path / "cut" / "model.safetensors"))
    with pytest.raises(mk.UserError, match="vision.layernorm.weight"):
        mk.load_checkpoint(str(tmp_path / "cut"))
    (tmp_path / "other").mkdir()
    json.dump({"script": "vit_caption", "config": {}}, open(tmp_path / "other" / "config.json", "w"))
    save_file({"x": torch.zeros(1)}, str(tmp_path / "other" / "model.safetensors"))
    with pytest.raises(mk.UserError, match="vit_caption"):
        mk.load_checkpoint(str(tmp_path / "other"))


def test_mk_exact_resume(mk_trained, tmp_path):
    d, _ = mk_trained
    args = ["--train", "--preset", "tiny", "--data_dir", d / "data", "--out_dir", tmp_path / "r"]
    p1 = run_script("mark1.py", *args, "--stop_after", "3")
    assert p1.returncode == 0, p1.stderr[-2000:]
    p2 = run_script("mark1.py", *args, "--resume")
    assert p2.returncode == 0 and "resumed at step 3" in p2.stdout, p2.stderr[-2000:]
    a, b = load_file(str(d / "out" / "model.safetensors")), load_file(str(tmp_path / "r" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mk_eval_and_predict_cli(mk_trained):
    d, _ = mk_trained
    out = d / "out"
    p = run_script("mark1.py", "--eval", "--out_dir", out, "--data_dir", d / "data")
    assert p.returncode == 0 and "mcq" in p.stdout, p.stderr[-2000:]
    video = d / "data" / json.load(open(d / "data" / "test.json"))[0]["video"]
    p = run_script("mark1.py", "--predict", "--out_dir", out, "--video", video, "--question",
                   "What happens to the red circle?", "--choices", "A. it appears|B. it stops|C. it turns blue|D. it meets the green square")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "answer:" in p.stdout and "support:" in p.stdout
    img = cv2.imread(str(out / "predict.png"))
    assert img is not None and img.shape[1] == 8 * 66


def test_mk_ddp_two_processes_gloo(mk_trained, tmp_path):
    import subprocess
    import sys
    import socket
    d, _ = mk_trained
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           os.path.join(ROOT, "mark1.py"), "--train", "--preset", "tiny", "--max_steps", "2", "--data_dir",
           str(d / "data"), "--out_dir", str(tmp_path / "ddp")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    assert (tmp_path / "ddp" / "eval.json").is_file() and p.stdout.count("step 2/2") == 1


def test_mk_bad_inputs(mk_trained, tmp_path):
    d, _ = mk_trained
    out = d / "out"
    ch = "A. it appears|B. it stops"
    assert_user_error(run_script("mark1.py", "--predict", "--out_dir", out, "--video", tmp_path / "none.mp4",
                                 "--question", "q", "--choices", ch), "none.mp4")
    (tmp_path / "zero.mp4").write_bytes(b"not a video at all")
    assert_user_error(run_script("mark1.py", "--predict", "--out_dir", out, "--video", tmp_path / "zero.mp4",
                                 "--question", "q", "--choices", ch), "zero.mp4", "no frames")
    video = d / "data" / "test" / "00000.mp4"
    assert_user_error(run_script("mark1.py", "--predict", "--out_dir", out, "--video", video, "--question", "q",
                                 "--choices", "it appears|it stops"), "--choices", "A. text")
    assert_user_error(run_script("mark1.py", "--train", "--preset", "nope"), "--preset nope")
    assert_user_error(run_script("mark1.py", "--train", "--preset", "tiny", "--device_map", "vision=cuda:7",
                                 "--out_dir", tmp_path / "o"), "cuda:7", "does not exist")
    assert_user_error(run_script("mark1.py", "--eval", "--out_dir", tmp_path / "empty"), "no checkpoint")
    assert_user_error(run_script("mark1.py", "--train", "--preset", "tiny", "--vision_ckpt", out,
                                 "--out_dir", tmp_path / "o"), "model_type", "vjepa2")
    # user annotation files: support time outside the clip, malformed choices, bad JSON
    ann = [dict(video=str(video), question="q?", choices=["A. x", "B. y"], answer="A. x", support_times=[0.5])] * 2
    ann[1] = {**ann[1], "support_times": [9.5]}
    json.dump(ann, open(tmp_path / "a.json", "w"))
    assert_user_error(run_script("mark1.py", "--train", "--preset", "tiny", "--data", tmp_path / "a.json",
                                 "--out_dir", tmp_path / "o"), "entry 1", "outside the clip")
    ann[0] = {**ann[0], "choices": ["A. x", "C. y"]}
    json.dump(ann, open(tmp_path / "b.json", "w"))
    assert_user_error(run_script("mark1.py", "--train", "--preset", "tiny", "--data", tmp_path / "b.json",
                                 "--out_dir", tmp_path / "o"), "entry 0", "B. text")
    (tmp_path / "c.json").write_text("[{")
    assert_user_error(run_script("mark1.py", "--train", "--preset", "tiny", "--data", tmp_path / "c.json",
                                 "--out_dir", tmp_path / "o"), "not valid JSON")
    assert not (tmp_path / "o" / "model.safetensors").exists()
    assert (out / "model.safetensors").is_file()  # nothing already saved was lost


def test_mk_user_data_training_and_bench(mk_trained, tmp_path):
    d, _ = mk_trained
    anns = json.load(open(d / "data" / "train.json"))[:20]
    for a in anns:
        a["video"] = str(d / "data" / a["video"])
    json.dump(anns, open(tmp_path / "u.json", "w"))
    p = run_script("mark1.py", "--train", "--preset", "tiny", "--data", tmp_path / "u.json", "--out_dir", tmp_path / "o",
                   "--max_steps", "2")
    assert p.returncode == 0, p.stderr[-2000:]
    ev = json.load(open(tmp_path / "o" / "eval.json"))
    assert ev["test"]["n"] == 2 and "novel" not in ev
    p = run_script("mark1.py", "--bench", "--preset", "tiny", "--n_train", "16", "--data_dir", tmp_path / "bd",
                   "--v_width", "32", "--v_layers", "1", "--v_heads", "2", "--crop", "32", "--v_patch", "8")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "epoch 2" in p.stdout and "speedup" in p.stdout


def test_mk_device_map_cpu(tmp_path):
    cfg = _mk_tiny_cfg(tmp_path, device="cpu", device_map="vision=cpu,bridge=cpu,llm=cpu")
    assert mk.parse_device_map(cfg) == dict(vision="cpu", bridge="cpu", llm="cpu")
    with pytest.raises(mk.UserError, match="expected vision=DEV"):
        mk.parse_device_map(_mk_tiny_cfg(tmp_path, device="cpu", device_map="encoder=cpu"))


def test_mk_train_with_frozen_hf_checkpoints_cli(mk_hf, mk_trained, tmp_path):
    d, _ = mk_trained
    p = run_script("mark1.py", "--train", "--preset", "tiny", "--max_steps", "2", "--data_dir", d / "data",
                   "--out_dir", tmp_path / "o", "--vision_ckpt", mk_hf["root"] / "vjepa2", "--llm_ckpt",
                   mk_hf["root"] / "qwen3")
    assert p.returncode == 0, p.stderr[-2000:]
    assert "frozen" in p.stdout and (tmp_path / "o" / "eval.json").is_file()
    saved = load_file(str(tmp_path / "o" / "model.safetensors"))
    assert saved and all(k.startswith("bridge.") for k in saved)  # the towers are reloaded from their folders
    model, tok, cfg = mk.load_checkpoint(str(tmp_path / "o"))
    assert isinstance(tok, mk.QwenTokenizer) and model.frozen == {"vision", "llm"}


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
