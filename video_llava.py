"""Video-LLaVA in one file: a LLaMA decoder that reads CLIP features of images and videos, faithful to the Hugging Face
checkpoint `LanguageBind/Video-LLaVA-7B-hf`, plus a tiny Video-LLaVA trained from scratch on a laptop CPU.

    image (N, 3, S, S) -> image_tower (CLIP ViT, the second-to-last layer's output, CLS dropped) -> (N, P, Dv)
    video (B, F, 3, S, S) -> video_tower, run per frame (the same layer, CLS kept)            -> (B*F, P+1, Dv)
      (the 7B has two CLIP towers; a model trained here has one under both names: --share_towers, the default)
      -> multi_modal_projector: Linear -> GELU -> Linear                     -> (N, P, D), (B*F, P+1, D)
      -> written over the <image> / <video> placeholder embeddings, in order, of the prompt        -> (B, L, D)
      -> LLaMA decoder (RMSNorm, rotate_half RoPE, grouped-query attention, SwiGLU) -> lm_head -> (B, L, V)
Shape legend: B batch, N images, F frames, S image side, P patches per frame, L new tokens, T tokens so far (cached +
new), D width, Dv vision width, H heads, K kv heads, E head dim, V vocabulary, T_max the KV cache's length (keys).

Paper: Video-LLaVA, Lin et al. 2023 (https://arxiv.org/abs/2311.10122); LLaVA (https://arxiv.org/abs/2304.08485).
Reference: transformers `VideoLlavaForConditionalGeneration` (the tests compare logits and tokens with it; only they
and `--bench` import it). Modules bear the hub checkpoint's key names, so loading is the identity map plus
`canonical_key`, which folds the two other layouts transformers writes onto it.

Commands (the README lists them all: --resume, --eval, --freeze, torchrun, --inspect, --bench):
    python video_llava.py --train                              # tiny Video-LLaVA from scratch (synthetic world, CPU)
    python video_llava.py --generate --from_pretrained DIR --video x.mp4 --prompt "What moves?" --compile  # or --image
"""

import argparse
import contextlib
import dataclasses
import inspect
import itertools
import json
import math
import os
import random
import re
import shlex
import shutil
import sys
import tempfile
import time
import warnings

# FFmpeg and OpenCV stay quiet (set before cv2 loads): a bad image or video is reported by us, in one line
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")
import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

SCRIPT = "video_llava"
CLIP_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32)

class UserError(Exception):
    """A problem with the user's input: the command line (__main__, below main) prints it as one line, exit status 2."""

def read_json(path):  # path's JSON object as a dict, or None: missing, not UTF-8, not JSON, not an object
    with contextlib.suppress(OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        obj = json.load(open(path, encoding="utf-8"))
        return obj if isinstance(obj, dict) else None

def check_folder(path, flag, marker, ours, why):  # refuse path unless it can be made, and is missing, empty or ours
    if os.path.exists(path) and not (os.path.isdir(path) and (  # ours: its `marker` JSON passes ours()
            set(os.listdir(path)) <= {"model.safetensors.tmp"} or ours(read_json(os.path.join(path, marker)) or {}))):
        raise UserError(f"{flag} {path}: a file, or a folder {why}")  # empty: or the .tmp of a cut-off first save
    up = os.path.abspath(path)  # -> nearest existing entry (a dead link too), where a scratch folder is made/removed
    while not os.path.lexists(up):
        up = os.path.dirname(up)
    try:  # a file in the way, no write access, a read-only or virtual file system
        os.rmdir(tempfile.mkdtemp(dir=up))
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create or write into this folder ({e.strerror})") from None

# Config ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    # data (your JSON lines, or the synthetic world) and output
    data: str = ""  # your training questions, JSON lines (format in the README); "" = the synthetic world
    test_data: str = ""  # your test questions; else --data's held-out entries (also its validation set)
    data_dir: str = "data/video_llava"  # where the synthetic world is written (a folder this script made, or new)
    out_dir: str = "out/video_llava"
    n_train: int = 3000  # synthetic images and as many clips in train (3 questions per image, 1 per clip)
    n_test: int = 200  # images and clips in each of val / test / novel
    n_frames: int = 4  # frames sampled uniformly per video; untyped with a checkpoint: its run's, or the 7B's 8
    # architecture: HF config.json names, vision_config's with a v_ prefix except image_size, patch_size (HF_FIELDS)
    vocab_size: int = 0  # 0 = set from the tokenizer table at --train
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 3
    num_attention_heads: int = 4
    num_key_value_heads: int = 2  # fewer than heads = grouped-query attention (the 7B: 32 of 32, plain multi-head)
    rms_norm_eps: float = 1e-5
    rope_theta: float = 100.0  # LLaMA 10000; at 100 even the slowest RoPE pair turns ~once in 512 positions
    max_position_embeddings: int = 512  # the context: longer prompts are refused
    tie_word_embeddings: bool = False
    v_hidden_size: int = 64  # vision tower width
    v_intermediate_size: int = 256
    v_num_hidden_layers: int = 3  # feature layer -2 reads the output of layer 2 of 3
    v_num_attention_heads: int = 4
    v_layer_norm_eps: float = 1e-5
    image_size: int = 48  # square input side of both CLIP towers
    patch_size: int = 12  # -> (48/12)^2 = 16 patches + CLS per frame
    vision_feature_layer: int = -2  # the tower's hidden state the LLM reads: -2 = its second-to-last layer's output
    vision_feature_select_strategy: str = "default"  # "default" drops CLS for images, "full" keeps it
    image_token_index: int = -1  # -1 = set from the tokenizer table
    video_token_index: int = -1
    bos_token_id: int = 0  # these three go to config.json; generation takes its ids from the tokenizer
    eos_token_id: int = 0
    pad_token_id: int = 0
    # training
    from_pretrained: str = ""  # start from this checkpoint (HF folder or an out_dir of this script)
    freeze: str = ""  # comma list of towers to freeze: "vision", "llm" ("vision,llm" = LLaVA stage 1, projector only)
    batch_size: int = 32  # questions per micro-batch and process
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch_size * grad_accum * world size)
    whiten_patches: bool = True  # with data_init: patch embeddings whitened, patch positions 2-D sin-cos (`whiten`)
    data_init: int = 64  # images and clips of the data-dependent init before step 0 (from scratch only); 0 = off
    share_towers: bool = True  # from scratch: the video tower is the image tower, one set of weights
    max_steps: int = 3500  # enough for the order questions, which are learned last (NOTES.md)
    lr: float = 1e-3  # peak, after warmup; cosine decay to min_lr
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto: bf16 on GPUs of compute capability 8.0+, else float32 (HF --generate: bf16 if native)
    device: str = "auto"  # auto = cuda > mps > cpu
    seed: int = 1337
    log_interval: int = 50
    eval_interval: int = 1000
    stop_after: int = 0  # stop (and save) after this many steps, as if interrupted; --resume continues
    # generation
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 48

CHOICES = dict(dtype=("auto", "float32", "bfloat16", "float16"), vision_feature_select_strategy=("default", "full"))
PRESETS = {"default": {}, "tiny": dict(n_train=48, n_test=6, data_dir="data/video_llava_tiny", hidden_size=32,
    intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, v_hidden_size=16,
    v_intermediate_size=32, v_num_hidden_layers=2, v_num_attention_heads=2, batch_size=8, max_steps=6, warmup=2,
    log_interval=2, eval_interval=4, dtype="float32", max_new_tokens=6, out_dir="out/video_llava_tiny")}  # tiny: tests

# Config field -> (section of an HF config.json, its key there, transformers' default): the map config_from_hf reads and
# hf_config_dict writes. A top-level key may sit in text_config. The vision defaults below are Video-LLaVA's, for a
# missing or null vision_config; a vision_config without a key (even {}) takes CLIP_VISION's.
CLIP_VISION = dict(v_hidden_size=768, v_intermediate_size=3072, v_num_hidden_layers=12, v_num_attention_heads=12,
                   patch_size=32)  # transformers' CLIPVisionConfig
HF_FIELDS = {f: (sec, f.removeprefix("v_") if sec == "vision_config" else f, d) for sec, table in (
    ("text_config", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=None, rms_norm_eps=1e-6, rope_theta=10000.0,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2)),
    ("vision_config", dict(v_hidden_size=1024, v_intermediate_size=4096, v_num_hidden_layers=24,
                           v_num_attention_heads=16, v_layer_norm_eps=1e-5, image_size=224, patch_size=14)),
    ("", dict(tie_word_embeddings=False, vision_feature_layer=-2, vision_feature_select_strategy="default",
              image_token_index=32000, video_token_index=32001, pad_token_id=0))) for f, d in table.items()}

def config_from_hf(hf, path):  # HF config.json -> Config fields (HF_FIELDS); what this model lacks is refused
    if (mt := hf.get("model_type")) != "video_llava":  # a run of another script (its out_dir) has no model_type
        what = f"a run of {hf['script']}.py" if hf.get("script") else "not a model's config"
        raise UserError(f"{path}: model_type is '{mt}', not 'video_llava' (another architecture)" if mt else f"{path}: "
                        f"config.json has no model_type ({what}); give an HF folder or an --out_dir of {SCRIPT}.py")
    t, v = hf.get("text_config") or {}, hf.get("vision_config") or {}
    if not isinstance(t, dict) or not isinstance(v, dict):
        raise UserError(f"{path}: text_config and vision_config must be JSON objects")
    rope = t.get("rope_parameters") or t.get("rope_scaling") or {}  # transformers 5: rope_parameters
    where = {"text_config": t, "vision_config": v, "": hf,  # rope type "default": no scaling
             "rope_scaling": {"type": rope.get("rope_type", rope.get("type", "default"))}}
    # implemented one way only: LLaMA (silu, no biases, plain RoPE), CLIP (quick_gelu), Linear-GELU(erf)-Linear
    for name, ok in {"text_config.model_type": "llama", "text_config.hidden_act": "silu",
                     "text_config.attention_bias": False, "text_config.mlp_bias": False, "rope_scaling.type": "default",
                     "vision_config.model_type": "clip_vision_model", "vision_config.hidden_act": "quick_gelu",
                     "projector_hidden_act": "gelu", "multimodal_projector_bias": True}.items():
        sec, _, k = name.rpartition(".")
        if where[sec].get(k, ok) != ok:
            raise UserError(f"{path}: {name}: {json.dumps(where[sec][k])} is not supported (only {json.dumps(ok)})")
    out = {f: hf.get(k, t.get(k, d)) if not sec else where[sec].get(k, CLIP_VISION.get(f, d)  # top level or text_config
           if sec == "vision_config" and hf.get(sec) is not None else d) for f, (sec, k, d) in HF_FIELDS.items()}
    out.update(num_key_value_heads=out["num_key_value_heads"] or out["num_attention_heads"],  # none: plain MHA
               rope_theta=rope.get("rope_theta", out["rope_theta"]),  # transformers 5 keeps it in rope_parameters
               tie_word_embeddings=bool(out["tie_word_embeddings"]), pad_token_id=out["pad_token_id"] or 0)
    for f, x in out.items():  # null, a string or a list where a number belongs: refused here, not a TypeError later
        want = type(getattr(Config, f))
        if want in (int, float) and not f.endswith("token_id") and type(x) not in {want, int}:
            raise UserError(f"{path}: config.json's {HF_FIELDS[f][1]} is {x!r}; a number is needed")
        if want is int and not f.endswith(("_id", "_index", "_layer")) and x < 1:  # a size or count (0: divides by 0)
            raise UserError(f"{path}: {HF_FIELDS[f][0]}.{HF_FIELDS[f][1]} is {x}; it must be at least 1")
    n, layer = out["v_num_hidden_layers"], out["vision_feature_layer"]
    if not -n - 1 <= layer <= n:  # transformers indexes the tower's n + 1 hidden states with it: an IndexError there
        raise UserError(f"{path}: vision_feature_layer {layer} is not one of the tower's hidden states -{n + 1} .. {n}")
    if t.get("head_dim") not in (None, out["hidden_size"] // out["num_attention_heads"]):
        raise UserError(f"{path}: head_dim != hidden_size / num_attention_heads is not supported")
    return out

def hf_config_dict(cfg):  # Config -> an HF-style config.json: checkpoints trained here load the same way
    hf = {"model_type": "video_llava", "architectures": ["VideoLlavaForConditionalGeneration"],
          "projector_hidden_act": "gelu", "text_config": {"model_type": "llama"},
          "vision_config": {"model_type": "clip_vision_model"}}
    for f, (sec, k, _) in HF_FIELDS.items():
        (hf[sec] if sec else hf)[k] = getattr(cfg, f)
    return hf

# Data: synthetic world, media loaders + CLIP preprocessing, tokenizers, prompt template -------------------------------
COLOURS = {"red": (40, 40, 230), "green": (40, 200, 40), "blue": (230, 90, 30),  # BGR, as OpenCV draws
           "yellow": (30, 220, 230), "purple": (200, 50, 160), "white": (235, 235, 235)}
SHAPES = ["circle", "square", "triangle"]  # what the image questions ask about, with colour and count
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # direction -> unit step (dx, dy), y down
NUMBERS = ["one", "two", "three"]  # answers are words, so every answer is ordinary text
# (colour, shape) pairs never shown in training: each colour loses one shape, each shape is held out twice
NOVEL_PAIRS = {("red", "triangle"), ("green", "circle"), ("blue", "square"),
               ("yellow", "triangle"), ("purple", "circle"), ("white", "square")}
SIDE, CELL, HALF, CLIP_LEN, TRAVEL = 48, 12, 5, 16, 24  # picture side, grid cell, shape half-size, frames, px moved

def draw_shape(img, shape, colour, cx, cy):  # draw a filled shape of half-size HALF centred at (cx, cy), in place
    c = COLOURS[colour]  # circle, triangle anti-aliased (colour bleeds into neighbours); the square: hard 9x9 px edges
    if shape == "circle":
        cv2.circle(img, (cx, cy), HALF, c, -1, cv2.LINE_AA)
    elif shape == "square":
        cv2.rectangle(img, (cx - HALF + 1, cy - HALF + 1), (cx + HALF - 1, cy + HALF - 1), c, -1)
    else:
        pts = np.array([[cx, cy - HALF], [cx - HALF, cy + HALF - 1], [cx + HALF, cy + HALF - 1]], np.int32)
        cv2.fillPoly(img, [pts], c, cv2.LINE_AA)

def sample_pair(rng, split):  # a (colour, shape) pair that fits the split: novel pairs only in `novel`
    while True:
        pair = (rng.choice(list(COLOURS)), rng.choice(SHAPES))
        if (pair in NOVEL_PAIRS) == (split == "novel"):
            return pair

def make_image(rng, split):  # 1-3 copies of one shape in cells of a 4x4 grid -> (BGR image, [(question, answer)])
    (colour, shape), n = sample_pair(rng, split), rng.randint(1, 3)  # n copies: the counting question
    img = np.full((SIDE, SIDE, 3), 60, np.uint8)  # a dark grey background
    for cell in rng.sample(range(16), n):
        cx, cy = (c * CELL + CELL // 2 + rng.randint(-1, 1) for c in (cell % 4, cell // 4))  # cell centre, ±1 px
        draw_shape(img, shape, colour, cx, cy)
    return img, [("What colour are the shapes?", colour), ("What shape are they?", shape),
                 ("How many shapes are there?", NUMBERS[n - 1])]

def make_clip(rng, split, n_frames):  # -> (CLIP_LEN BGR frames, (question, answer)); n_frames: load_video's count
    frames = [np.full((SIDE, SIDE, 3), 60, np.uint8) for _ in range(CLIP_LEN)]  # (CLIP_LEN, SIDE, SIDE, 3)
    if rng.random() < 0.5:  # motion: one shape crosses the picture (its direction), else order (which came first)
        (colour, shape), motion = sample_pair(rng, split), rng.choice(list(MOTIONS))
        dx, dy = MOTIONS[motion]
        lo, hi = HALF + 2, SIDE - HALF - 3  # centre range that keeps the whole shape in the picture
        x0, y0 = (rng.randint(lo + TRAVEL * (d < 0), hi - TRAVEL * (d > 0)) for d in (dx, dy))  # room to travel
        for t, img in enumerate(frames):
            f = t / (CLIP_LEN - 1)  # fraction of the way travelled at frame t
            draw_shape(img, shape, colour, round(x0 + dx * TRAVEL * f), round(y0 + dy * TRAVEL * f))
        return frames, (f"Which way does the {colour} {shape} move?", motion)
    while True:  # two objects of different colours; in `novel`, a is always a held-out pair, b at random
        a, b = sample_pair(rng, split), sample_pair(rng, "train" if rng.random() < 0.5 else split)
        if a[0] != b[0]:  # (sample_pair already keeps held-out pairs to `novel`)
            break
    # slot s = load_video's s-th frame, seen[s]: a first shows in slot s1, b in s2 > s1, slot 0 in neither; each appears
    # at a random clip frame in (seen[s-1], seen[s]], so that no single fixed frame always tells the order
    seen = frame_indices(CLIP_LEN, n_frames)  # the frames load_video samples from a CLIP_LEN-frame clip
    s1 = rng.randint(1, n_frames - 2)
    s2 = rng.randint(s1 + 1, n_frames - 1)
    t1, t2 = (seen[s] - rng.randint(0, seen[s] - seen[s - 1] - 1) for s in (s1, s2))
    for (colour, shape), cell, t0 in zip((a, b), rng.sample(range(16), 2), (t1, t2)):  # two distinct grid cells
        cx, cy = (cell % 4) * CELL + CELL // 2, (cell // 4) * CELL + CELL // 2
        for img in frames[t0:]:  # once it appears, it stays
            draw_shape(img, shape, colour, cx, cy)
    first = rng.random() < 0.5  # ask for the first object, or for the last
    return frames, (f"Which shape appears {'first' if first else 'last'}?", " ".join(a if first else b))

def build_world(cfg):  # write data_dir/<split>/*.png|mp4 and data_dir/<split>.jsonl once (deterministic from --seed)
    if not 3 <= cfg.n_frames <= CLIP_LEN:  # an order question needs an empty first slot, then one slot per object
        raise UserError(f"--n_frames {cfg.n_frames}: the synthetic world samples 3 to {CLIP_LEN} frames of its clips")
    sizes = {"train": cfg.n_train, "val": cfg.n_test, "test": cfg.n_test, "novel": cfg.n_test}
    files = {s: os.path.join(cfg.data_dir, f"{s}.jsonl") for s in sizes}
    stamp = os.path.join(cfg.data_dir, "world.json")  # the manifest: what was written, from which settings
    want = dict(sizes, seed=cfg.seed, n_frames=cfg.n_frames, version=1)
    if read_json(stamp) == want:  # written before with these settings: reuse it
        return files
    # only this script's own world.json (other settings, a build cut short) marks a folder it may write over
    check_folder(cfg.data_dir, "--data_dir", "world.json", lambda m: set(m) == set(want),
                 "this script did not write (no world.json of its own); give a new folder for the synthetic world, "
                 "or your files as --data FILE.jsonl")
    os.makedirs(cfg.data_dir, exist_ok=True)
    json.dump(dict(want, version=0), open(stamp, "w"))  # version 0: a build under way (cut short, it is redone)
    for offset, (split, n) in enumerate(sizes.items()):
        rng, lines = random.Random(cfg.seed * 10 + offset), []  # one stream per split (none depends on another's size)
        os.makedirs(os.path.join(cfg.data_dir, split), exist_ok=True)  # lines: the split's annotation file
        for i in range(n):
            img, qa = make_image(rng, split)
            png, mp4 = f"{split}/img_{i:05d}.png", f"{split}/clip_{i:05d}.mp4"
            cv2.imwrite(os.fsencode(f"{cfg.data_dir}/{png}"), img)  # bytes: any name
            lines += [{"image": png, "question": q, "answer": a} for q, a in qa]
            frames, (q, a) = make_clip(rng, split, cfg.n_frames)
            writer = cv2.VideoWriter(os.fsencode(f"{cfg.data_dir}/{mp4}"), cv2.VideoWriter_fourcc(*"mp4v"), 8,
                                     (SIDE, SIDE))  # 8 fps
            for fr in frames:
                writer.write(fr)
            writer.release()
            lines.append({"video": mp4, "question": q, "answer": a})
        open(files[split], "w").write("".join(json.dumps(x) + "\n" for x in lines))
    atomic(stamp, lambda p: json.dump(want, open(p, "w")))  # complete
    return files

def load_entries(cfg, master=True, scoring=False, world=True):  # -> {split: [entry]} from --data, or the world
    entries = {}  # world=False (--eval --from_pretrained): no synthetic world; --test_data replaces the test split
    if cfg.data:  # scoring (--eval: test and novel only) skips reading --data when --test_data is the test split
        why = "; --eval tests on the entries the run held out of --data, or give --test_data FILE" if scoring else ""
        train = [] if scoring and cfg.test_data else read_annotations(cfg.data, why)  # it may have moved
        draw = [random.Random(os.path.relpath(e["path"], cfg.data) + e["question"]).random() for e in train]  # by path
        cut = max(0.1, min(draw, default=0))  # ~1 in 10 held out, at least one; adding entries can only lower the cut,
        held = [e for e, d in zip(train, draw) if d <= cut]  # so a trained entry never moves into the held-out set
        entries = {"train": [e for e, d in zip(train, draw) if d > cut], "val": held, "test": held}
        if not (entries["train"] or scoring):  # all held out: one entry, say, or one image and question repeated
            raise UserError(f"{cfg.data}: every entry is held out for validation; add other files or questions")
    elif world:
        files = build_world(cfg) if master else None  # rank 0 writes the world; the others wait, then read it
        if dist.is_initialized():
            dist.barrier()
        entries = {s: read_annotations(f) for s, f in (files or build_world(cfg)).items()}
    if cfg.test_data:  # your questions in place of the held-out ones (the token table never sees them)
        entries["test"] = read_annotations(cfg.test_data)
    return {**entries, "train": [], "val": []} if scoring else entries

def read_annotations(path, why=""):  # JSON lines {"image"|"video"|"frames", "question", "answer"} -> [dict]
    try:  # utf-8-sig: a byte-order mark some editors write is skipped
        lines = open(path, encoding="utf-8-sig").read().split("\n")  # not splitlines: JSON strings may hold U+2028
    except (OSError, UnicodeDecodeError) as e:  # why: what needs the file, for the message
        raise UserError(f"{path}: " + ("not UTF-8 text; save it as UTF-8" if isinstance(e, UnicodeDecodeError) else
                                       f"cannot read this annotation file ({e.strerror})" + why))
    out, base = [], os.path.dirname(os.path.abspath(path))  # media paths: relative to the file, made absolute
    for no, line in enumerate(lines, 1):
        if not line.strip():  # blank lines are skipped
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError as err:  # e.g. a Windows path's lone backslash: "Invalid \escape"
            raise UserError(f"{path}:{no}: not valid JSON ({err.msg}, column {err.colno})")
        keys = [k for k in ("image", "video", "frames") if isinstance(e, dict) and k in e]
        qa = [e.get(k) if isinstance(e, dict) else None for k in ("question", "answer")]
        texts = all(isinstance(t, str) and "".join(t.split()).strip(".") for t in qa)  # "." or "\t" would match ""
        if len(keys) != 1 or not (isinstance(e[keys[0]], str) and e[keys[0]] and texts):
            raise UserError(f"{path}:{no}: need exactly one of 'image'/'video'/'frames' (a path) plus 'question' "
                            f"and 'answer', strings with more than spaces and dots")
        kind, rel = "image" if keys == ["image"] else "video", e[keys[0]]  # a folder of frames: a video like any other
        if re.search("<image>|<video>", e["question"] + e["answer"]):  # the template adds the one tag itself
            raise UserError(f"{path}:{no}: the text contains an <image>/<video> tag; the prompt template adds it")
        if not os.path.exists(media := os.path.join(base, rel)):
            raise UserError(f"{path}:{no}: {kind} not found: {media}" + " (use / in paths)" * ("\\" in rel))
        out.append(dict(kind=kind, path=media, question=e["question"], answer=e["answer"], line=f"{path}:{no}"))
    if not out:
        raise UserError(f"{path}: no entries")
    return out

def clip_transform(rgb, size):  # (H, W, 3) uint8 RGB -> (3, size, size) float32, as BaseVideoProcessor._preprocess
    h, w = rgb.shape[:2]  # (VideoLlavaImageProcessor: the same steps in PIL, whose bicubic rounds ±1 on a few pixels)
    # shortest edge -> size, long side int(size*long/short) (image_utils.get_resize_output_image_size)
    nh, nw = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    x = torch.from_numpy(np.ascontiguousarray(rgb)).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8, copied if a ::-1 view
    # bicubic (resample=3) in uint8 as HF does (a float resize differs by several levels), antialiased (PIL's kernel)
    x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True)[0]  # (3, nh, nw) uint8
    top, left = (nh - size) // 2, (nw - size) // 2  # centre crop
    x = x[:, top:top + size, left:left + size].float().numpy() / 255.0  # rescale to [0, 1]
    return (x - CLIP_MEAN[:, None, None]) / CLIP_STD[:, None, None]  # (3, size, size), CLIP mean/std

def cut_off(path):  # PNG with no IEND; JPEG with no FF D9 after its scan (libjpeg pads it grey; data may follow FF D9)
    data, i = open(path, "rb").read(), 2  # i: walk header segments to the scan, FF DA (a thumbnail has its own FF D9)
    while data[:2] == b"\xff\xd8" and i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] != 0xDA:
        i += 1 if data[i + 1] == 0xFF else 2 + int.from_bytes(data[i + 2:i + 4], "big")  # FF FF: a fill byte
    return data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[i:] or data[:4] == b"\x89PNG" and b"IEND" not in data

def load_image(path, size):  # image file -> float32 (3, size, size), CLIP-normalised as the HF processor does
    if os.path.isfile(path) and cut_off(path):  # checked before libjpeg or libpng decodes it (and warns on stderr)
        raise UserError(f"{path}: this image is cut off (no end-of-image marker); re-export or re-copy it")
    try:  # os.fsencode: OpenCV gets the name's bytes (a name that is not UTF-8, from an old zip, crashes it as a str)
        img = cv2.imread(os.fsencode(path), cv2.IMREAD_UNCHANGED) if os.path.isfile(path) else None  # alpha kept
    except cv2.error as e:  # OpenCV raises for an image over its size limit (and returns None for one it cannot read)
        raise UserError(f"{path}: OpenCV cannot decode this image ({e.err}; it reads at most 2^30 pixels)") from None
    if img is not None and (img.ndim != 3 or img.shape[2] != 4 or img.dtype not in (np.uint8, np.uint16)):
        img = cv2.imread(os.fsencode(path))  # no alpha: 8-bit BGR (EXIF-rotated), None for a depth it cannot convert
    if img is None:
        raise UserError(f"{path}: cannot read this image (missing, corrupt, or a format OpenCV cannot make 8-bit)")
    if img.shape[2] == 4:  # transparency (palette too) composited onto white, as transformers' convert_to_rgb does
        img = img if img.dtype == np.uint8 else (img >> 8).astype(np.uint8)  # 16-bit: the high byte, as PIL reads it
        a = img[:, :, 3:].astype(np.int32)  # (H, W, 1) alpha, 0 = transparent; the sum rounds as PIL's
        img = ((img[:, :, :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
    return clip_transform(img[:, :, ::-1], size)  # OpenCV reads BGR: flip to RGB, as CLIP was trained

def frame_indices(n_total, n_frames):  # uniform, as video_utils.default_sample_indices_fn: frame i*total//n
    if n_total <= 0:  # (short clips repeat frames, where transformers refuses; its docs' float arange may pick others)
        raise UserError("video has no frames")
    return [i * n_total // n_frames for i in range(n_frames)]

def load_video(path, n_frames, size):  # a video file OpenCV reads, or a folder of frames -> float32 (F, 3, size, size)
    if os.path.isdir(path):  # frames in natural order: f2 before f10 (digit runs compare as numbers)
        names = sorted((n for n in os.listdir(path) if re.match(r"[^.].*\.(png|jpe?g|bmp|webp|tiff?)$", n, re.I)
                        and os.path.isfile(os.path.join(path, n))),  # not frames: a folder x.png, a hidden ._x.png
                       key=lambda n: [int(t) if t.isdecimal() else t for t in re.split(r"(\d+)", n)])
        if not names:
            raise UserError(f"{path}: folder has no frame images")
        return np.stack([load_image(os.path.join(path, names[i]), size) for i in frame_indices(len(names), n_frames)])
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such video file or folder of frames")
    counter, n = cv2.VideoCapture(os.fsencode(path)), 0  # FFmpeg through OpenCV: any container and codec it reads
    if counter.get(cv2.CAP_PROP_FOURCC) == cv2.VideoWriter_fourcc(*"ansi"):  # FFmpeg plays a text file as a video
        raise UserError(f"{path}: a text file, not a video")
    while counter.grab():  # pass 1 counts the frames (counts in headers lie); grab() skips the BGR conversion
        n += 1
    if n == 0:  # OpenCV could not open the file, or decoded no frame of it
        raise UserError(f"{path}: OpenCV decodes no frame of this video (corrupt, empty, or an unknown format)")
    if n < 0.9 * (listed := int(counter.get(cv2.CAP_PROP_FRAME_COUNT))):  # a cut-off file decodes its first part
        raise UserError(f"{path}: only {n} of the {listed} frames in its header decode (cut off or damaged)")
    want, cap, picked = frame_indices(n, n_frames), cv2.VideoCapture(os.fsencode(path)), {}
    for i in range(want[-1] + 1):  # pass 2 decodes again and transforms only the sampled frames
        if cap.grab() and i in want:
            picked[i] = clip_transform(cap.retrieve()[1][:, :, ::-1], size)  # BGR -> RGB, then (3, S, S)
    if len(picked) < len(set(want)):  # the second decode ended early: the file changed or is damaged
        raise UserError(f"{path}: the video ended early on a second read (corrupt?)")
    return np.stack([picked[i] for i in want])  # (F, 3, S, S)

class Tokenizer:  # both tokenizers: added tokens (<image>, <video>) split out first, encode_text for the rest
    def encode(self, text, add_special_tokens=True):  # False: no BOS before, no EOS after (as transformers')
        tags = "|".join(re.escape(s) for s in sorted(self.added, key=len, reverse=True))  # the longest match wins
        parts = re.split(f"({tags})", text) if self.added else [text]  # odd parts are added tokens such as <image>
        ids = [t for i, part in enumerate(parts) if part
               for t in ([self.added[part]] if i % 2 else self.encode_text(part, first=i == 0))]
        return self.prefix_ids + ids + self.suffix_ids if add_special_tokens else ids  # prefix: BOS, suffix: EOS

class SentencePieceBPE(Tokenizer):  # LLaMA's tokenizer.json as transformers 5 rebuilds it: Metaspace, byte-fallback BPE
    def __init__(self, folder):
        tj = read_json(path := os.path.join(folder, "tokenizer.json")) or {}
        model = tj.get("model") or {}
        if model.get("type") != "BPE":  # LLaMA's is a BPE model
            raise UserError(f"{path}: missing, not JSON, or not a BPE tokenizer (the checkpoint's tokenizer is needed)")
        self.added = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
        self.folder, self.vocab = folder, {**model["vocab"], **self.added}  # the pieces, then the added tokens
        merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
        self.ranks = {m: i for i, m in enumerate(merges)}  # a lower rank merges first
        self.byte_fallback, self.unk = model.get("byte_fallback", False), model.get("unk_token")
        self.inv = {i: s for s, i in self.vocab.items()}  # id -> piece, for decode
        tc = read_json(os.path.join(folder, "tokenizer_config.json")) or {}
        name = lambda t, d: (t.get("content") if isinstance(t, dict) else t) or d  # "<s>" or {"content": "<s>"}, or d
        self.bos_id, self.eos_id, self.pad_id = (self.vocab.get(name(tc.get(f"{k}_token"), d), z) for k, d, z in (
            ("bos", "<s>", None), ("eos", "</s>", None), ("pad", "<pad>", 0)))  # (key, default, id if not in vocab)
        # BOS/EOS around the text: transformers 5 reads them from this template alone (add_bos_token is not read)
        pp = tj.get("post_processor") or {"type": "TemplateProcessing", "single": [{"Sequence": {}}]}  # none: no BOS
        if pp.get("type") != "TemplateProcessing":
            raise UserError(f"{path}: post_processor {pp.get('type')!r} is not supported (only TemplateProcessing)")
        ids = [pp["special_tokens"][p["SpecialToken"]["id"]]["ids"][0] if "SpecialToken" in p else None
               for p in pp["single"]]  # LLaMA's: [<s>, $A]; None: the text ($A)
        self.prefix_ids, self.suffix_ids = ids[:ids.index(None)], ids[ids.index(None) + 1:]
        self.prefix = tc.get("add_prefix_space", True) is not False  # the Metaspace prepend of a leading '▁'
        self.always = tc.get("legacy") is True  # transformers' prepend_scheme "always": after added tokens too
    def encode_text(self, part, first):  # one section between added tokens is one BPE word (split=False)
        part = part.replace(" ", "▁")  # SentencePiece's visible space, then Metaspace's prepend of a leading '▁'
        word = "▁" + part if (first or self.always) and self.prefix and not part.startswith("▁") else part
        # initial symbols: characters in the vocabulary, else their UTF-8 bytes (LLaMA's has every byte as <0xNN>)
        syms = [s for ch in word for s in ([ch] if ch in self.vocab or not self.byte_fallback
                                           else [f"<0x{b:02X}>" for b in ch.encode("utf-8")])]
        while len(syms) > 1:  # merge the best-ranked pair present (the leftmost of equals), until none is known
            rank, i = min((self.ranks.get(pair, math.inf), i) for i, pair in enumerate(zip(syms, syms[1:])))
            if rank == math.inf:
                break
            syms[i:i + 2] = [syms[i] + syms[i + 1]]
        unk = self.vocab.get(self.unk)
        ids = [self.vocab.get(s, unk) for s in syms]  # fuse_unk: an unknown symbol right after an <unk> adds nothing
        if None in ids:  # no byte fallback and no <unk>: another model's tokenizer
            raise UserError(f"{self.folder}: tokenizer.json cannot encode {part!r} (no byte fallback, no unk_token)")
        return [t for k, t in enumerate(ids) if not (k and syms[k] not in self.vocab and ids[k - 1] == unk)]
    def decode(self, ids):  # unknown and special ids skipped, then transformers' decoders: ▁ -> ' ', bytes, strip
        pieces = [p.replace("▁", " ") for i in ids if i not in self.added.values() and (p := self.inv.get(int(i)))]
        def from_bytes(run):  # a run of <0xNN> pieces, one raw byte each: UTF-8 text, or if invalid one '�' a byte
            raw = bytes(int(s[3:5], 16) for s in run)
            return text if (text := raw.decode("utf-8", "replace")).encode() == raw else "\ufffd" * len(raw)
        text = "".join(from_bytes(run) if byte else "".join(run)  # (an answer cut mid-character ends in '�'s)
                       for byte, run in itertools.groupby(pieces, lambda s: bool(re.fullmatch(r"<0x[0-9A-F]{2}>", s))))
        return text[1:] if self.prefix and text.startswith(" ") else text  # Strip: the space Metaspace prepended

class GPT2Table(Tokenizer):  # GPT-2 BPE (tiktoken) over a table of the ids seen in training, then <image>, <video>
    def __init__(self, ids):
        import tiktoken  # only the trained-from-scratch model needs it
        try:  # GPT-2's two files: downloaded once, or read from TIKTOKEN_CACHE_DIR
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline with no cached files: say how to fix it, no traceback
            raise UserError(f"tiktoken could not load the GPT-2 encoding ({type(e).__name__}); offline, point "
                            f"TIKTOKEN_CACHE_DIR at a copy of its cache folder (two hash-named files)") from None
        self.ids = list(ids)  # model id -> GPT-2 id
        self.to_model = {g: i for i, g in enumerate(self.ids)}  # GPT-2 id -> model id
        self.added = {"<image>": len(self.ids), "<video>": len(self.ids) + 1}
        self.bos_id = self.eos_id = self.pad_id = 0  # model id 0 is GPT-2's <|endoftext|>
        self.prefix_ids, self.suffix_ids = [0], []  # BOS before the text, nothing after
    @classmethod
    def from_texts(cls, texts):  # the table: <|endoftext|>, then every GPT-2 id of the texts, in ascending order
        enc = cls([]).enc
        return cls([enc.eot_token] + sorted({t for s in texts for p in re.split("<image>|<video>", s)
                                             for t in enc.encode_ordinary(p)}))
    def __len__(self):
        return len(self.ids) + 2  # the vocabulary size V: the table plus <image> and <video>
    def encode_text(self, part, first):  # GPT-2 ids outside the table (words never trained on) are dropped
        return [self.to_model[t] for t in self.enc.encode_ordinary(part) if t in self.to_model]
    def check_known(self, texts):  # (where, text) pairs: refused if a dropped word would change what trains or is asked
        for where, text in texts:
            if lost := [t for p in re.split("<image>|<video>", text) for t in self.enc.encode_ordinary(p)
                        if t not in self.to_model]:
                raise UserError(f"{where}: {self.enc.decode(lost[:1])!r} (a GPT-2 token: a word and its leading space) "
                                f"in {text!r} is not in the model's token table: never trained on")
    def decode(self, ids):
        return self.enc.decode([self.ids[i] for i in ids if 0 < i < len(self.ids)])  # model ids -> GPT-2 ids -> text

def load_tokenizer(folder):  # a run of this script keeps its GPT-2 table in config.json; an HF folder, tokenizer.json
    meta = read_config(folder)
    try:
        return GPT2Table(meta["gpt2_table"]) if "gpt2_table" in meta else SentencePieceBPE(folder)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:  # a damaged or another model's file
        raise UserError(f"{folder}: its token table or tokenizer.json is damaged ({type(e).__name__}: {e})") from None

def prompt_text(question, kind):  # the template 'USER: <video>\n{question} ASSISTANT:' (<image>, or no tag for text)
    return "USER: " + (f"<{kind}>\n" if kind else "") + f"{question} ASSISTANT:"

def expand_placeholders(ids, cfg, n_frames):
    """ids, one prompt's list of ints -> the same list with each <image> / <video> tag repeated once per visual feature
    (as the HF processor expands the string): the model writes one feature over each, at ordinary RoPE positions."""
    n_patches = (cfg.image_size // cfg.patch_size) ** 2  # P per frame
    copies = {cfg.image_token_index: n_patches + (cfg.vision_feature_select_strategy == "full"),  # P, P+1 with CLS
              cfg.video_token_index: (n_patches + 1) * n_frames}  # (P+1)*F: every frame's CLS kept; text stays one
    return [t for i in ids for t in [i] * copies.get(i, 1)]

# Model: LLaMA primitives -> CLIP tower -> projector -> VideoLlava -----------------------------------------------------
class RMSNorm(nn.Module):
    """LLaMA's norm (Zhang & Sennrich 2019): each vector divided by its root mean square, then a learned gain; no
    mean subtraction, no bias. Computed in float32 whatever the activation dtype."""
    def __init__(self, d, eps):
        super().__init__()
        self.weight, self.eps = nn.Parameter(torch.ones(d)), eps  # gain (D,), starts at 1: the identity
    def forward(self, x):  # (..., D) -> (..., D)
        h = x.float()  # (..., D) in float32
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # x / rms(x), the mean over the last dim D
        return self.weight * h.to(x.dtype)  # cast back, then the gain: transformers' order (bfloat16 bits depend on it)

def rotate_half(x):
    """RoPE's rotation by 90 degrees in the layout LLaMA checkpoints use: the head dim E is cut into two halves
    (x1, x2) -> (-x2, x1), so feature i pairs with feature i + E/2 (not with its neighbour, as in the RoPE paper;
    HF permutes the original q/k weights to match)."""
    return torch.cat((-x[..., x.shape[-1] // 2:], x[..., : x.shape[-1] // 2]), -1)

def padded_positions(attention_mask, offset, width=None):
    """attention_mask (B, T) over the cached and new tokens (1 = real, 0 = left pad), the new ones at offset .. T-1
    (L = T - offset) -> RoPE positions (B, L) and the mask (B, 1, L, width or T), True = attend. A token's position
    is the number of real tokens before it, so a left-padded row gets the positions (and the logits) it would get
    alone; a query sees the real tokens up to itself, and itself (a pad too: no all-masked row, no NaN); key
    columns T .. width-1 (a static cache's unfilled positions) are hidden."""
    T = attention_mask.shape[1]
    pos = (attention_mask.long().cumsum(-1)[:, offset:] - 1).clamp(min=0)  # (B, L), contiguous: no recompile as T grows
    keys = torch.arange(width or T, device=attention_mask.device)  # (width,)
    queries = torch.arange(offset, T, device=attention_mask.device)[:, None]  # (L, 1)
    real = F.pad(attention_mask.bool(), (0, (width or T) - T))[:, None]  # (B, 1 for all L queries, width): False past T
    return pos, ((real & (keys <= queries)) | (keys == queries))[:, None]  # (B, L, width) -> (B, 1 head, L, width)

class KVCache:
    """The static KV cache (as in gpt-fast): keys and values preallocated per layer as (B, K, T_max, E), so no tensor
    grows while decoding; `offset` counts the positions claimed. Each call claims the positions of its L new tokens
    (`claim`), writes their keys and values there and attends over all T_max positions under a mask that hides the
    unfilled ones. A one-token step then has the same shapes every time and no branch on values, so torch.compile
    makes it one graph; it writes through `slots`, a tensor the graph reads anew each step, not a Python int."""
    def __init__(self, cfg, batch, max_len, dtype, device):
        e = cfg.hidden_size // cfg.num_attention_heads
        shape = (batch, cfg.num_key_value_heads, max_len, e)  # (B, K, T_max, E): only the K key/value heads
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]  # keys
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(cfg.num_hidden_layers)]  # values
        self.offset, self.slots = 0, None  # slots: the positions claimed last (claim), where update writes
    def claim(self, attention_mask):
        """Claim the positions offset .. T-1 of the new tokens. attention_mask (B, T) over the cached and the new
        tokens (1 = real, 0 = left pad) -> RoPE positions (B, L), mask (B, 1, L, T_max) (True = attend)."""
        (B, T), T_max = attention_mask.shape, self.k[0].shape[2]  # the cache is (B, K, T_max, E)
        if T > T_max:
            raise ValueError(f"the KV cache is full: {T} positions asked of its {T_max}")
        if B != self.k[0].shape[0] or T <= self.offset:  # the cached tokens, then at least one new one
            raise ValueError(f"after {self.offset} cached positions the attention mask needs batch "
                             f"{self.k[0].shape[0]} and more than {self.offset} columns, got {(B, T)}")
        pos, mask = padded_positions(attention_mask, self.offset, T_max)  # (B, L), (B, 1, L, T_max)
        self.slots, self.offset = torch.arange(self.offset, T, device=self.k[0].device), T  # slots (L,): offset..T-1
        return pos, mask
    def update(self, layer, k, v):  # write this layer's new keys/values (B, K, L, E) at the claimed positions
        self.k[layer].index_copy_(2, self.slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, self.slots, v.to(self.v[layer].dtype))
        return self.k[layer], self.v[layer]  # (B, K, T_max, E): the mask hides the positions not yet written

class LlamaAttention(nn.Module):
    """Causal self-attention with rotary positions (RoPE, Su et al. 2021) and grouped-query attention (GQA, Ainslie
    et al. 2023), after transformers' LlamaAttention. GQA: H query heads share K <= H key/value heads, query head h
    reading kv head h // (H/K): a cache H/K times smaller to store (K = H in the 7B: plain multi-head attention)."""
    def __init__(self, cfg):
        super().__init__()
        self.h, self.kv = cfg.num_attention_heads, cfg.num_key_value_heads
        self.e = cfg.hidden_size // cfg.num_attention_heads  # head dim E
        self.q_proj = nn.Linear(cfg.hidden_size, self.h * self.e, bias=False)  # D -> H*E
        self.k_proj = nn.Linear(cfg.hidden_size, self.kv * self.e, bias=False)  # D -> K*E: fewer heads under GQA
        self.v_proj = nn.Linear(cfg.hidden_size, self.kv * self.e, bias=False)
        self.o_proj = nn.Linear(self.h * self.e, cfg.hidden_size, bias=False)  # H*E -> D
    def forward(self, x, cos, sin, mask, cache=None, layer=0):
        """x (B, L, D); cos, sin (B, 1, L, E) at each token's RoPE position; mask boolean (B, 1, L, T_max) over the
        whole cache, or (B, 1, L, L) without one, True = attend -> (B, L, D)."""
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.h, self.e).transpose(1, 2)  # (B, H, L, E)
        k, v = (p(x).view(B, L, self.kv, self.e).transpose(1, 2) for p in (self.k_proj, self.v_proj))  # (B, K, L, E)
        # RoPE rotates each (i, i + E/2) feature pair of q and k by an angle proportional to the position, so a
        # query-key dot product depends only on their distance; values are not rotated
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, K, T_max, E): the whole cache, these L at their positions
        if self.kv != self.h:  # GQA: each kv head repeated for the H/K query heads that share it -> (B, H, .., E)
            k, v = k.repeat_interleave(self.h // self.kv, 1), v.repeat_interleave(self.h // self.kv, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, L, E)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.h * self.e))  # heads side by side: (B, L, D)

class LlamaMLP(nn.Module):
    """SwiGLU feed-forward (Shazeer 2020): down(silu(gate(x)) * up(x)), the gate choosing per feature how much of up
    passes; three matrices of width intermediate_size instead of two at 4 D, for about the same parameter count."""
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj, self.up_proj = (nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False) for _ in range(2))
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)  # LLaMA has no biases
    def forward(self, x):  # (B, L, D) -> (B, L, D)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

class LlamaDecoderLayer(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)); the residual stream itself is never
    normalised, so its gradient reaches every layer unchanged."""
    def __init__(self, cfg):
        super().__init__()
        self.self_attn, self.mlp = LlamaAttention(cfg), LlamaMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
    def forward(self, x, cos, sin, mask, cache, layer):  # (B, L, D) -> (B, L, D)
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

class CLIPEmbeddings(nn.Module):
    """ViT input (Dosovitskiy et al. 2020; CLIP, Radford et al. 2021): the picture cut into P = (S/p)^2 patches, each
    projected to Dv by one strided convolution, a learned CLS vector put in front, a learned position per slot."""
    def __init__(self, cfg):
        super().__init__()
        d, n = cfg.v_hidden_size, (cfg.image_size // cfg.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.zeros(d))  # CLS: a learned token that attends to every patch
        self.patch_embedding = nn.Conv2d(3, d, cfg.patch_size, cfg.patch_size, bias=False)  # stride = kernel: one patch
        self.position_embedding = nn.Embedding(n + 1, d)  # learned, one per slot: CLS + P patches
    def forward(self, pixels):  # (N, 3, S, S) -> (N, P+1, Dv); N pictures: the images, or a video's B*F frames
        # the conv gives (N, Dv, S/p, S/p): flatten the grid row-major, then transpose to (N, P, Dv); CLS goes in front
        x = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)  # (N, P, Dv)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)  # (N, 1, Dv)
        return torch.cat([cls, x], 1) + self.position_embedding.weight  # (N, P+1, Dv)

class CLIPAttention(nn.Module):
    """Multi-head self-attention over the patches of one picture, every patch seeing every other (no mask, no
    RoPE: positions came in with the embeddings); biases on all four projections, as in CLIP."""
    def __init__(self, cfg):
        super().__init__()
        d, self.h = cfg.v_hidden_size, cfg.v_num_attention_heads  # width Dv, H heads of E = Dv/H
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = (nn.Linear(d, d) for _ in range(4))
    def forward(self, x):  # (N, P+1, Dv) -> (N, P+1, Dv)
        N, P1, Dv = x.shape  # P1 = P+1 tokens: CLS and the patches
        q, k, v = (p(x).view(N, P1, self.h, Dv // self.h).transpose(1, 2)  # each (N, H, P+1, E)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v)  # (N, H, P+1, E): bidirectional, no mask
        return self.out_proj(y.transpose(1, 2).reshape(N, P1, Dv))  # heads side by side: (N, P+1, Dv)

class CLIPMLP(nn.Module):  # two-layer feed-forward with biases, Dv -> v_intermediate_size -> Dv
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.v_hidden_size, cfg.v_intermediate_size)  # Dv -> 4 Dv in CLIP
        self.fc2 = nn.Linear(cfg.v_intermediate_size, cfg.v_hidden_size)
    def forward(self, x):  # (N, P+1, Dv) -> (N, P+1, Dv)
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu, as OpenAI CLIP was trained

class CLIPEncoderLayer(nn.Module):  # pre-norm residual block with LayerNorm (mean, variance and bias), as CLIP's ViT
    def __init__(self, cfg):
        super().__init__()
        self.self_attn, self.mlp = CLIPAttention(cfg), CLIPMLP(cfg)
        self.layer_norm1, self.layer_norm2 = (nn.LayerNorm(cfg.v_hidden_size, cfg.v_layer_norm_eps) for _ in range(2))
    def forward(self, x):  # (N, P+1, Dv) -> (N, P+1, Dv)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))

class CLIPVisionTransformer(nn.Module):
    """CLIP's vision tower, read the LLaVA way: not its final output but the hidden state of one earlier layer
    (vision_feature_layer, -2 = the input of the last layer). LLaVA found the penultimate layer's patch features
    better for a language model than the last layer's, which CLIP's contrastive loss shapes for the CLS summary.
    hidden_states counts like transformers' output_hidden_states: [0] is the embeddings (after pre_layrnorm), [k]
    the output of layer k, so -2 of n layers is the output of layer n-1."""
    def __init__(self, cfg):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)  # (N, 3, S, S) -> (N, P+1, Dv)
        self.pre_layrnorm = nn.LayerNorm(cfg.v_hidden_size, eps=cfg.v_layer_norm_eps)  # sic: the checkpoint's name
        self.encoder = nn.ModuleDict(dict(layers=nn.ModuleList(CLIPEncoderLayer(cfg)
                                                               for _ in range(cfg.v_num_hidden_layers))))
        self.post_layernorm = nn.LayerNorm(cfg.v_hidden_size, eps=cfg.v_layer_norm_eps)  # loaded, never used here
        self.n_run = range(cfg.v_num_hidden_layers + 1)[cfg.vision_feature_layer]  # layers to run: -2 of 0..n -> n-1
    def forward(self, pixels):  # (N, 3, S, S) -> (N, P+1, Dv), the hidden state of the feature layer
        x = self.pre_layrnorm(self.embeddings(pixels))  # (N, P+1, Dv): hidden_states[0]
        for layer in self.encoder.layers[: self.n_run]:  # layers past the feature layer are never computed
            x = layer(x)
        return x

class VideoLlavaMultiModalProjector(nn.Module):
    """CLIP features (Dv) -> the LLM's embedding space (D). LLaVA-1.5 (Liu et al. 2023) found this two-layer MLP
    clearly better than LLaVA's one Linear layer: the GELU lets the map bend CLIP's space, where a Linear is only an
    affine map. One projector serves images and frames, so both land in one space the LLM learns to read."""
    def __init__(self, cfg):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.v_hidden_size, cfg.hidden_size)  # Dv -> D
        self.linear_2 = nn.Linear(cfg.hidden_size, cfg.hidden_size)  # D -> D
    def forward(self, x):  # (.., Dv) -> (.., D), in the projector's dtype (it trains in float32 beside frozen bfloat16)
        return self.linear_2(F.gelu(self.linear_1(x.to(self.linear_1.weight.dtype))))  # exact (erf) GELU, as "gelu"

def sincos_2d(n, dim):
    """Positions of an n x n patch grid (row-major) -> (n*n, dim): dim/4 sin-cos pairs of the column, then dim/4 of
    the row, at frequencies from pi/n per cell down to ~1/100 of that, each feature at zero mean, unit variance."""
    rows, cols = torch.meshgrid(torch.arange(n).double(), torch.arange(n).double(), indexing="ij")
    freqs = (math.pi / n) / 100.0 ** (torch.arange(dim // 4).double() / (dim // 4))  # (dim/4,) geometric
    angles = [c.flatten()[:, None] * freqs for c in (cols, rows)]  # 2 x (n*n, dim/4)
    pe = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], 1)
    pe = (pe - pe.mean(0)) / (pe.std(0).clamp_min(1e-6) if n > 1 else 1.0)  # per feature over the grid (1x1: zero)
    return torch.cat([pe, pe.new_zeros(n * n, dim - pe.shape[1])], 1).float()

@torch.no_grad()
def whiten(emb, pixels, p):
    """CLIPEmbeddings from data: each patch_embedding channel one principal component of the patches at unit
    variance; the patch position embeddings 2-D sin-cos at std 0.3 (the CLS row is left as it was)."""
    patches = F.unfold(pixels.float(), p, stride=p).transpose(1, 2).flatten(0, 1).double()  # (N*P, 3*p*p)
    evals, evecs = torch.linalg.eigh(torch.cov(patches.T))  # principal components, ascending eigenvalues
    w = emb.patch_embedding.weight.view(emb.patch_embedding.out_channels, -1)  # (Dv, 3*p*p), a view: written below
    k = min(w.shape[0], int((evals > 1e-5 * evals[-1]).sum()))  # components with real variance: the rest (a few
    w.zero_()  # pictures leave some near 0) stay 0 rows, as a 1/std gain would blow other pictures up
    w[:k] = (evecs[:, len(evals) - k:].flip(1) / evals[len(evals) - k:].flip(0).sqrt()).T.float()  # largest first
    emb.position_embedding.weight[1:] = sincos_2d(pixels.shape[-1] // p, w.shape[0]) * 0.3

class VideoLlava(nn.Module):
    """The whole model, named as the hub checkpoint. Images and videos have a CLIP tower each (the 7B's are LanguageBind
    encoders, in CLIP's architecture); their features, projected, replace the <image> / <video> placeholder embeddings
    of the prompt, and the LLaMA decoder reads them as it reads words."""
    @staticmethod
    def from_pretrained(path, dtype=None, device="cpu"):  # as transformers: VideoLlava.from_pretrained(folder)
        return load_pretrained(path, getattr(torch, dtype) if isinstance(dtype, str) else dtype, device)  # or a name
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # ModuleDicts (as nanoGPT's `transformer`) only give the checkpoint's key prefixes
        self.language_model = nn.ModuleDict(dict(model=nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(cfg.vocab_size, cfg.hidden_size),  # (V, D)
            layers=nn.ModuleList(LlamaDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers)),
            norm=RMSNorm(cfg.hidden_size, cfg.rms_norm_eps))),  # final norm: the stream's scale grows with depth
            lm_head=nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)))
        if cfg.tie_word_embeddings:  # one matrix for the input embedding and the output head
            self.language_model.lm_head.weight = self.language_model.model.embed_tokens.weight
        self.image_tower, self.video_tower = (nn.ModuleDict(dict(vision_model=CLIPVisionTransformer(cfg)))
                                              for _ in range(2))  # same shape; build_model may share one
        self.multi_modal_projector = VideoLlavaMultiModalProjector(cfg)
        self._rope = {}  # device -> (cos, sin) tables of every position, built on first use (_rope_table)
        self._init_weights()  # a checkpoint's weights then replace these (load_pretrained builds on the meta device)
    def _init_weights(self):
        """GPT-2's init for training from scratch: normal(0.02) weights, zero biases, and the projections that write
        into a residual stream scaled by 1/sqrt(2 * layers), so the stream's variance does not grow with depth (one
        factor for both stacks, from the LLM's depth; the default towers are as deep)."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv2d)):
                nn.init.normal_(m.weight, std=0.02)  # GPT-2's std
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for n, p in self.named_parameters():
            if n.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight", "fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.cfg.num_hidden_layers))  # residual outputs
            if "class_embedding" in n:
                nn.init.normal_(p, std=0.02)
    @torch.no_grad()
    def init_from_data(self, images, videos):
        """Data-dependent init for training from scratch (Salimans & Kingma 2016): at random init every patch token is
        mostly the grey background's vector, so objects hardly stand out after the LLM's RMSNorm. On one fixed batch,
        each tower's pre_layrnorm is set for zero mean, unit variance per feature (after `whiten`), then the projector's
        last layer for zero mean at the text embeddings' std. The forward stays the checkpoint-faithful one."""
        def fold(affine, x, std=1.0):  # rescale a LayerNorm or Linear so its outputs x get zero mean and this std
            x = x.flatten(0, -2).float()  # (tokens, features)
            m, s = x.mean(0), x.std(0) + 1e-6  # (features,) each
            affine.weight.mul_((std / s).view(-1, *[1] * (affine.weight.dim() - 1)))  # (out,), (out, 1) for a Linear
            affine.bias.sub_(m).mul_(std / s)  # b' = (b - m) * std / s: w'x + b' = (wx + b - m) * std / s
        seen = {}  # tower -> its pictures, as (N, 3, S, S) (a shared tower sees both; a medium the data lacks, none)
        for tower, px in ((self.image_tower, images), (self.video_tower, videos)):
            if px is not None:
                seen.setdefault(tower, []).append(px.flatten(0, -4))  # frames as pictures: (N or B*F, 3, S, S)
        for tower, px in seen.items():
            px, emb, ln = torch.cat(px), tower.vision_model.embeddings, tower.vision_model.pre_layrnorm
            if len(px) * (px.shape[-1] // self.cfg.patch_size) ** 2 < 2:  # one vector: its own mean, no std (NaN)
                raise UserError("--data_init: one picture of one patch has no spread to scale by; raise --image_size")
            if self.cfg.whiten_patches:
                whiten(emb, px, self.cfg.patch_size)
            fold(ln, ln(emb(px)))
        feats = torch.cat([encode(px).flatten(0, 1) for encode, px in ((self.image_features, images),
                           (self.video_features, videos)) if px is not None])  # (visual tokens, D), what the LLM reads
        fold(self.multi_modal_projector.linear_2, feats, self.language_model.model.embed_tokens.weight.std().item())
    def image_features(self, pixels):  # (N, 3, S, S) -> (N, P, D) (P+1 with the "full" strategy)
        h = self.image_tower.vision_model(pixels)  # (N, P+1, Dv), CLS first
        if self.cfg.vision_feature_select_strategy == "default":
            h = h[:, 1:]  # drop CLS: LLaVA's images give only their P patch features (N, P, Dv)
        return self.multi_modal_projector(h)
    def video_features(self, videos):  # (B, F, 3, S, S) -> (B*F, P+1, D): each frame alone, CLS kept
        # frames are one batch of B*F separate pictures (no attention across frames): the LLM reads them in order.
        # Unlike images they keep CLS whatever the strategy, as the checkpoint was trained and HF does (7B: 8 x 257)
        return self.multi_modal_projector(self.video_tower.vision_model(videos.flatten(0, 1)))  # via (B*F, P+1, Dv)
    def _place(self, x, input_ids, token, feats, what):
        """Write the features (media, P or P+1, D) over the placeholder embeddings of x (B, L, D): the k-th placeholder
        in reading order (row by row, left to right) gets the k-th feature vector (masked_scatter), so several
        images in one prompt, or rows of a batch, take their media in order."""
        mask = input_ids == token  # (B, L) True at the placeholders
        n, need = int(mask.sum()), feats.shape[0] * feats.shape[1]  # placeholders vs feature vectors
        if n != need:
            raise UserError(f"the prompt has {n} {what} placeholder tokens but the {what}s give {need} features "
                            f"({feats.shape[0]} x {feats.shape[1]}); one <{what}> per {what}, then expand_placeholders")
        return x.masked_scatter(mask[..., None].expand_as(x), feats.to(x.dtype))  # (B, L, D)
    def _rope_table(self, pos, dtype):
        """RoPE angles: pos (B, L) -> cos, sin (B, 1, L, E), the 1 broadcasting over heads. Position p turns feature
        pair (i, i + E/2) by p * theta^(-2i/E): fast turns in the first features, slow ones in the last. pos is per row
        (under left padding each row counts from its own first real token); the angles of every position are tabled
        once per device, in transformers' arithmetic (int64 arange -> float, float32 angles)."""
        if pos.device not in self._rope:
            e = self.cfg.hidden_size // self.cfg.num_attention_heads
            inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, e, 2, device=pos.device).float() / e))  # (E/2,)
            positions = torch.arange(self.cfg.max_position_embeddings, device=pos.device).float()
            freqs = positions[:, None] * inv_freq  # (context, E/2)
            emb = torch.cat((freqs, freqs), -1)  # (context, E): the same angle for features i and i + E/2
            self._rope[pos.device] = emb.cos(), emb.sin()
        cos, sin = self._rope[pos.device]  # each (context, E)
        return cos[pos][:, None].to(dtype), sin[pos][:, None].to(dtype)  # (B, 1, L, E)
    def forward(self, input_ids, attention_mask=None, pixel_values_images=None, pixel_values_videos=None,
                targets=None, cache=None, last_only=False):
        """input_ids (B, L); attention_mask (B, T) over cache + new tokens (1 = real, 0 = left pad) or None;
        targets (B, L) already shifted (-100 = ignored). Returns (logits (B, L or 1, V), None), or with targets
        (logits (n, V) at the n positions that have one, their mean loss)."""
        (B, L), cfg, lm = input_ids.shape, self.cfg, self.language_model.model
        T = (cache.offset if cache is not None else 0) + L  # tokens after this call: the cached ones and these L
        need = cache.k[0].shape[2] if cache is not None else T  # T_max: prompt + answer, rounded up under compile
        if need > cfg.max_position_embeddings:  # the RoPE table ends there
            raise UserError(f"{need} tokens (the prompt and its visual tokens, plus the answer or --max_new_tokens) "
                            f"exceed the context ({cfg.max_position_embeddings}); lower --max_new_tokens or --n_frames")
        if attention_mask is None:  # no padding: every token is real
            attention_mask = torch.ones(B, T, dtype=torch.long, device=input_ids.device)
        if attention_mask.shape != (B, T):  # a mask of another width would broadcast into wrong positions
            raise ValueError(f"attention_mask must be (B, T) = {(B, T)}: the cached tokens, then these L = {L}")
        x = lm.embed_tokens(input_ids)  # (B, L, D)
        # the visual tokens (one per feature since expand_placeholders) get the features in place of their embeddings
        for what, pixels, token, encode in (("image", pixel_values_images, cfg.image_token_index, self.image_features),
                                            ("video", pixel_values_videos, cfg.video_token_index, self.video_features)):
            if pixels is not None:
                x = self._place(x, input_ids, token, encode(pixels), what)
            elif (input_ids == token).any():
                raise UserError(f"the prompt has <{what}> placeholders but no {what} was given")
        # RoPE positions (B, L) counting real tokens only, mask (B, 1, L, T_max) over a whole cache, else (B, 1, L, L)
        pos, mask = cache.claim(attention_mask) if cache is not None else padded_positions(attention_mask, 0)
        scored = None if targets is None else targets != -100  # (B, L): where a loss is taken
        logits = self.llm_forward(x, pos, mask, cache, last_only, scored)
        return logits, None if targets is None else F.cross_entropy(logits.float(), targets[scored])  # logits (n, V)
    def llm_forward(self, x, pos, mask, cache=None, last_only=False, scored=None):  # (B, L, D) -> (B, L|1, V) or (n, V)
        lm = self.language_model.model  # embed_tokens, layers, norm
        cos, sin = self._rope_table(pos, x.dtype)  # (B, 1, L, E) each, at the RoPE positions pos (B, L)
        for i, layer in enumerate(lm.layers):
            x = layer(x, cos, sin, mask, cache, i)
        x = lm.norm(x)  # (B, L, D). The head projects only the positions read: the last one when generating, the n
        # scored ones given targets (n, V), not every placeholder of a video (2056 a row at the 7B's shapes)
        return self.language_model.lm_head(x[:, -1:] if last_only else (x if scored is None else x[scored]))
    def step(self, ids, pos, mask, cache):
        """One new token per row through the KV cache: ids (B, 1) at RoPE positions pos (B, 1), attending where
        mask (B, 1, 1, T_max) is True (cache.claim gives both) -> logits (B, 1, V). The same shapes every call
        and no branch on values: torch.compile makes it one graph (generate(compile=True)); forward would not, as
        it claims from the Python int cache.offset and checks the ids for placeholders."""
        return self.llm_forward(self.language_model.model.embed_tokens(ids), pos, mask, cache)  # embeddings (B, 1, D)

# Checkpoint I/O: HF folders (three key layouts, sharded or not) and this script's own out_dir (same format) -----------
def canonical_key(k):  # a key in any of the three layouts (rules below) -> the hub layout, used here
    for pattern, hub in ((r"^model\.language_model\.", "language_model.model."),  # in memory, transformers 5
                         (r"^lm_head\.", "language_model.lm_head."),  # the hub keeps the head inside language_model
                         (r"^model\.", ""),  # in memory: the towers and the projector
                         # transformers 5, saved and in memory: the towers without their vision_model wrapper
                         (r"^(image|video)_tower\.(?!vision_model\.)", r"\1_tower.vision_model.")):
        k = re.sub(pattern, hub, k)  # in order, each on the last's result: in-memory tower keys take rules 3 and 4
    return k

# Buffers old checkpoints hold and models rebuild (RoPE inv_freq, CLIP position_ids): skipped, as transformers does
LEGACY_KEYS = re.compile(r"rotary_emb\.inv_freq$|(^|\.)position_ids$")

def open_weights(f):  # safe_open, with a corrupt or truncated file as one clear line instead of safetensors' own error
    try:
        return safe_open(f, "pt", device="cpu")
    except SafetensorError as e:  # a bad header, or a file shorter than its header says
        raise UserError(f"{f}: not a readable safetensors file ({e})")

def weight_files(path):  # -> {checkpoint key: file} from model.safetensors[.index.json], legacy buffers dropped
    index, single = os.path.join(path, "model.safetensors.index.json"), os.path.join(path, "model.safetensors")
    if os.path.isfile(index):
        wm = (read_json(index) or {}).get("weight_map")
        if not isinstance(wm, dict) or not all(isinstance(f, str) for f in wm.values()):
            raise UserError(f"{index}: not a safetensors index (no weight_map of tensor -> file name)")
        if missing := sorted(f for f in set(wm.values()) if not os.path.isfile(os.path.join(path, f))):
            raise UserError(f"{index}: shard '{missing[0]}' is missing from {path}")
        return {k: os.path.join(path, f) for k, f in wm.items() if not LEGACY_KEYS.search(k)}
    if os.path.isfile(single):
        return {k: single for k in open_weights(single).keys() if not LEGACY_KEYS.search(k)}  # one file
    raise UserError(f"{path}: no model.safetensors or model.safetensors.index.json (not a checkpoint folder)")

def read_config(path):  # path/config.json as a dict, or a UserError naming what is wrong with the folder
    if not os.path.isfile(cpath := os.path.join(path, "config.json")):
        raise UserError(f"{path}: " + ("no config.json (not a checkpoint folder)" if os.path.isdir(path) else
                                       "no such checkpoint folder"))
    if (hf := read_json(cpath)) is None:
        raise UserError(f"{cpath}: not a config (not JSON, or not a JSON object)")
    return hf

def align_keys(path, base=None):  # -> meta model, files, handles, found {hub key: (its key, file)}, problems (headers)
    hf, files = config_from_hf(read_config(path), path), weight_files(path)
    # a head in the files is used (transformers 5 unties one that differs); tied: the embedding serves as the head
    hf["tie_word_embeddings"] &= "language_model.lm_head.weight" not in map(canonical_key, files)
    with torch.device("meta"):
        model = VideoLlava(Config(**{**dataclasses.asdict(base or Config()), **hf}))
    expected = {k: list(v.shape) for k, v in model.named_parameters()}  # a tied head is the embedding's: not listed
    handles = {f: open_weights(f) for f in set(files.values())}
    held = {f: set(h.keys()) for f, h in handles.items()}  # each file's tensor names, read once from its header
    if wrong := [key for key, f in files.items() if key not in held[f]]:  # an index pointing at the wrong file
        raise UserError(f"{path}: model.safetensors.index.json puts '{wrong[0]}' in "
                        f"{os.path.basename(files[wrong[0]])}, which does not hold it (a damaged or mismatched index)")
    found = {canonical_key(k): (k, f) for k, f in files.items() if canonical_key(k) in expected}
    shapes = {ck: handles[f].get_slice(k).get_shape() for ck, (k, f) in found.items()}  # headers only: nothing read
    problems = {"missing": [k for k in expected if k not in found],
                "unexpected": [k for k in files if canonical_key(k) not in expected],
                "mis-shaped": [f"{found[ck][0]} {shape} (model wants {expected[ck]})"
                               for ck, shape in shapes.items() if shape != expected[ck]]}
    return model, files, handles, found, problems

def load_pretrained(path, dtype=None, device="cpu", base=None):  # HF folder or out_dir -> VideoLlava, keys first
    model, _, handles, found, problems = align_keys(path, base)
    if any(problems.values()):
        raise UserError(f"{path}: checkpoint does not match the config: " + ", ".join(
            f"{what} {len(keys)} {keys[:20]}{' ...' if len(keys) > 20 else ''}" for what, keys in problems.items()))
    # float32 weights beyond the memory (a 7B on a laptop or a 16 GB GPU) stop the run part-way: refused first
    gpu = torch.device(device).type == "cuda"  # its own memory; mps shares the RAM (Windows: no sysconf, unknown)
    memory = (torch.cuda.mem_get_info(device)[1] if gpu else  # total bytes (mem_get_info: free, total); 0: unknown
              os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else 0)
    need = 4 * sum(p.numel() for p in model.parameters())  # bytes in float32 (a tied head is one parameter)
    if dtype == torch.float32 and 0 < memory < need:
        raise UserError(f"{path}: its weights take {need / 2**30:.3g} GiB in float32, more than this " + ("GPU" if gpu
                        else "machine") + f"'s {memory / 2**30:.3g} GiB; give --dtype bfloat16 (half the bytes)")
    for ck, (key, f) in found.items():  # swapped in place: a tied head is the same Parameter; peak memory ~ the weights
        torch.utils.swap_tensors(model.get_parameter(ck), nn.Parameter(handles[f].get_tensor(key).to(device, dtype)))
    return model

def atomic(path, write):  # write(tmp), then rename over path: a reader sees the old file or the new, never half
    write(path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash never leaves a half-written file

def save_checkpoint(model, cfg, tok, opt=None, step=0, seconds=0.0, scaler=None, batch=None):  # model: the raw module
    os.makedirs(cfg.out_dir, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.named_parameters()}  # a tied head is not listed: loading ties it
    if model.video_tower is model.image_tower:  # one tower, listed once: saved under both names, as two tensors
        state.update({k.replace("image_", "video_", 1): v.clone() for k, v in state.items() if k.startswith("image_")})
    atomic(os.path.join(cfg.out_dir, "model.safetensors"), lambda p: save_file(state, p))
    hf_tok = ("tokenizer.json", "tokenizer_config.json") if isinstance(tok, GPT2Table) else ()  # a table replaces them
    for stale in ("model.safetensors.index.json", "eval.json", "train_state.pt", *hf_tok):  # the old weights':
        with contextlib.suppress(FileNotFoundError):  # index: would shadow the new file; eval.json: scored the old
            os.remove(os.path.join(cfg.out_dir, stale))  # train_state.pt: would --resume the new (rewritten below)
    config = dataclasses.asdict(cfg)  # your data files' paths absolute: --eval and --resume find them from anywhere
    config.update({k: os.path.abspath(config[k]) for k in ("data", "test_data", "data_dir") if config[k]})
    meta = {**hf_config_dict(cfg), "script": SCRIPT, "train_config": config, "step": step}
    if isinstance(tok, GPT2Table):
        meta["gpt2_table"] = tok.ids
    elif os.path.abspath(tok.folder) != os.path.abspath(cfg.out_dir):  # an HF checkpoint's tokenizer travels along
        for src in (os.path.join(tok.folder, name) for name in ("tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "chat_template.json", "preprocessor_config.json")):
            if os.path.isfile(src):
                atomic(os.path.join(cfg.out_dir, os.path.basename(src)), lambda p: shutil.copyfile(src, p))
    atomic(os.path.join(cfg.out_dir, "config.json"), lambda p: json.dump(meta, open(p, "w")))
    if opt is not None:
        ts = {"optimizer": opt.state_dict(), "scaler": scaler.state_dict() if scaler else {}, "step": step,
              "rng": torch.get_rng_state(), "seconds": seconds, "batch": batch}  # batch: the global batch
        atomic(os.path.join(cfg.out_dir, "train_state.pt"), lambda p: torch.save(ts, p))

def saved_config(out_dir, overrides, resume=True):  # the Config --train saved in out_dir, typed flags on top
    if (meta := read_json(os.path.join(out_dir, "config.json"))) is None:  # missing, not JSON, or not a JSON object
        raise UserError(f"{out_dir}: nothing to resume or evaluate (no readable config.json); run --train")
    if meta.get("script") != SCRIPT or not isinstance(meta.get("train_config"), dict):
        s, mt = meta.get("script"), meta.get("model_type")  # ours without settings (damaged), another's, none (HF)
        what = "no train_config" if s == SCRIPT else f"the script {s!r}" if s else f"model_type {mt!r}: an HF folder"
        raise UserError(f"{out_dir}: not written by {SCRIPT}.py --train (its config.json has {what}); --resume and "
                        "--eval need the --out_dir of a run" + ("; give it as --from_pretrained" if mt else ""))
    if resume and not os.path.isfile(os.path.join(out_dir, "train_state.pt")):
        raise UserError(f"{out_dir}: no train_state.pt, so there is no optimizer state to resume from; drop --resume "
                        f"to start afresh (or fine-tune it: --from_pretrained {shlex.quote(out_dir)} --out_dir NEW)")
    saved = {k: v for k, v in meta["train_config"].items() if k in Config.__dataclass_fields__}
    kinds = {k: (int, float) if type(d) is float else type(d) for k, d in dataclasses.asdict(Config()).items()}
    if bad := [k for k, v in saved.items() if not isinstance(v, kinds[k]) or v not in CHOICES.get(k, [v])]:  # damaged
        raise UserError(f"{out_dir}/config.json: train_config's {bad[0]} is {saved[bad[0]]!r}; the file is damaged")
    base = Config(**{**saved, "out_dir": out_dir})  # moved or copied: the run lives where it was found
    if not resume:  # --eval: where, on what, how many rows at once, how long an answer may grow; the rest is the run's
        run_keys = ("device", "dtype", "out_dir", "data_dir", "data", "test_data", "max_new_tokens", "batch_size")
        if clash := [f"--{k} {v}" for k, v in overrides.items() if k not in run_keys and v != getattr(base, k)]:
            raise UserError(f"{out_dir}: --eval runs the trained settings; drop {', '.join(clash)}")
        return dataclasses.replace(base, **{k: v for k, v in overrides.items() if k in run_keys})
    # what the weights and the saved AdamW state were built for (architecture, towers, what trains), and their world
    arch = {f: getattr(base, f) for f in (*HF_FIELDS, "share_towers", "freeze", "from_pretrained", "seed", "n_train",
                                          "n_test", "n_frames", "data_init", "whiten_patches")}  # (the init is done)
    if clash := [f"--{k} {overrides[k]} (checkpoint: {v!r})" for k, v in arch.items() if overrides.get(k, v) != v]:
        raise UserError(f"{out_dir}: no resuming with another architecture, trained part or world: {', '.join(clash)}")
    if (done := meta.get("step", 0)) >= overrides.get("max_steps", base.max_steps):  # nothing would train
        raise UserError(f"{out_dir}: trained to step {done} already; give --max_steps above it, or --eval to score it")
    if 0 < overrides.get("stop_after", 0) <= done:  # it would train a step, then stop again past the step asked
        raise UserError(f"{out_dir}: trained to step {done} already; give --stop_after above it, or drop it")
    return dataclasses.replace(base, **{"stop_after": 0, **overrides})

# Training -------------------------------------------------------------------------------------------------------------
def pick_device(name):  # --device auto -> cuda > mps > cpu; cpu, cuda[:i], mps as given, if this machine has it
    here = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if not re.fullmatch(r"auto|(cpu|cuda|mps)(:\d+)?", name) or not here.get(name.split(":")[0], True):
        raise UserError(f"--device {name}: not a device of this PyTorch on this machine; use cpu, cuda, mps or auto")
    return name if name != "auto" else next((d for d, ok in here.items() if ok), "cpu")

def native_bf16(device):  # does the hardware multiply in bfloat16? (elsewhere emulated, far slower than float32)
    if device.startswith("cuda"):
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())

def autocast_dtype(name, device):  # --dtype auto: bfloat16 on a CUDA GPU that multiplies in it, else float32
    # (on a CPU even native bfloat16 trains this small model more slowly: README; HF weights: see run_generate)
    return name if name != "auto" else "bfloat16" if device.startswith("cuda") and native_bf16(device) else "float32"

def weights_dtype(name, device):  # a run's weights: float32, or under bfloat16 autocast the dtype the file stores
    return None if autocast_dtype(name, device) == "bfloat16" else torch.float32  # (a frozen bf16 7B: 14 GB, not 28)

def autocast(dtype, device):  # the autocast context for --dtype (disabled for float32, so the float32 path is plain)
    dtype = autocast_dtype(dtype, device)
    return torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype), enabled=dtype != "float32")

def lr_at(step, cfg):  # linear warmup, then cosine decay to min_lr
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (cfg.lr - cfg.min_lr)

class Examples:
    """Annotation entries with their media decoded once (float32 CLIP-normalised) and their token ids. answered: the
    answers are fed to the model (train, val); else they are only compared with what it generates (test, novel)."""
    def __init__(self, entries, cfg, tok, answered=True):
        texts = [prompt_text(e["question"], e["kind"]) for e in entries]
        if isinstance(tok, GPT2Table):  # a word the table lacks would go unread (test answers are only compared)
            tok.check_known([(e["line"], t + " " + e["answer"] if answered else t) for t, e in zip(texts, entries)])
        self.entries, decoded = entries, {}  # (path, kind) -> pixels: each file decoded once (first entry naming it)
        for e in (e for e in entries if (e["path"], e["kind"]) not in decoded):
            try:  # a file that fails to decode is named with the annotation line that lists it
                decoded[e["path"], e["kind"]] = (load_image(e["path"], cfg.image_size) if e["kind"] == "image" else
                                                 load_video(e["path"], cfg.n_frames, cfg.image_size))
            except UserError as err:
                raise UserError(f"{e['line']}: {err}") from None
        self.media = [torch.from_numpy(decoded[e["path"], e["kind"]]) for e in entries]  # (3, S, S) or (F, 3, S, S)
        self.prompts = [expand_placeholders(tok.encode(t), cfg, cfg.n_frames) for t in texts]
        self.answers = [tok.encode(" " + e["answer"], add_special_tokens=False) + [tok.eos_id] for e in entries]
        for e, p, a in zip(entries, self.prompts, self.answers):  # refused here, at load, not when a batch meets it
            n, what = (len(p) + len(a), "answer") if answered else (len(p) + cfg.max_new_tokens, "--max_new_tokens")
            if n > cfg.max_position_embeddings:  # a test row needs room to answer; a video's frames take room too
                fix = {"video": " or fewer --n_frames"}.get(e["kind"], "") if answered else f" or lower {what}"
                raise UserError(f"{e['line']}: question, {e['kind']} and {what} take {n} tokens, more than the "
                                f"context ({cfg.max_position_embeddings}); shorten it{fix}")
            if len(a) > cfg.max_new_tokens:  # evaluation would cut the generated answers short (test ones too)
                raise UserError(f"{e['line']}: the answer takes {len(a)} tokens (EOS included), more than "
                                f"--max_new_tokens {cfg.max_new_tokens}; raise it")
    def batch(self, idx, device, generating=False):
        """-> dict of model inputs. Training rows: prompt + answer, right-padded, no mask (causal: no token sees
        the pads after it), targets on the answer and its EOS; generation rows: prompts, left-padded, with a mask."""
        rows = [self.prompts[i] + ([] if generating else self.answers[i]) for i in idx]
        L = max(map(len, rows))
        ids, mask, tgt = (torch.full((len(rows), L), fill, dtype=torch.long) for fill in (0, 0, -100))  # (B, L)
        for r, (i, row) in enumerate(zip(idx, rows)):
            s = L - len(row) if generating else 0
            ids[r, s:s + len(row)], mask[r, s:s + len(row)] = torch.tensor(row), 1
            if not generating:  # t predicts t+1; only the answer is learned: the prompt, mostly visual tokens, is input
                tgt[r, len(self.prompts[i]) - 1:len(row) - 1] = torch.tensor(self.answers[i])
        px = {k: [self.media[i] for i in idx if self.entries[i]["kind"] == k] for k in ("image", "video")}
        b = dict(input_ids=ids, attention_mask=mask if generating else None, targets=None if generating else tgt,
                 **{f"pixel_values_{k}s": torch.stack(v) if v else None for k, v in px.items()})
        return {k: v.to(device) for k, v in b.items() if v is not None}  # inputs it lacks are left out

def apply_freeze(model, freeze):  # requires_grad off once; a frozen LLM still backprops to the projector
    towers = {"vision": [model.image_tower, model.video_tower], "llm": [model.language_model]}
    parts = {p.strip() for p in freeze.split(",")} - {""}  # --freeze "": nothing frozen
    if parts - set(towers):
        raise UserError(f"--freeze {freeze}: unknown part(s) {sorted(parts - set(towers))}; use vision, llm or both")
    for m in [m for p in parts for m in towers[p]]:
        m.requires_grad_(False)
    for p in model.parameters():  # what trains becomes float32 (bfloat16 rounds small AdamW updates away)
        if p.requires_grad:  # frozen parts keep their dtype; in place, before the optimizer and DDP see them
            p.data = p.data.float()

def batch_indices(step, n, size, seed):  # a step's global batch from (step, seed) alone: resume and DDP agree on it
    reps = -(-size // n)  # a fresh permutation per epoch, repeated when n < size so that every batch is full
    epoch, k = divmod(step, max(1, n * reps // size))
    perm = torch.randperm(n * reps, generator=torch.Generator().manual_seed(seed + epoch))
    return (perm[k * size:(k + 1) * size] % n).tolist()

def build_model(cfg, entries, resume, say, device):  # -> model, cfg with its architecture, tokenizer, Examples by split
    path = cfg.out_dir if resume else cfg.from_pretrained
    texts = [prompt_text(e["question"], e["kind"]) + " " + e["answer"] for s in ("train", "val") for e in entries[s]]
    if path:
        if cfg.from_pretrained and cfg.share_towers:  # a checkpoint's towers differ (an HF one's always)
            say("--from_pretrained: the checkpoint's two CLIP towers are kept (--share_towers is for a new model)")
            cfg = dataclasses.replace(cfg, share_towers=False)  # what config.json records, and --resume keeps
        model, tok = load_pretrained(path, weights_dtype(cfg.dtype, device), device, base=cfg), load_tokenizer(path)
        cfg = dataclasses.replace(cfg, **{f: getattr(model.cfg, f) for f in HF_FIELDS})
    else:
        tok = GPT2Table.from_texts(texts)  # every token of the training and validation text
        cfg = dataclasses.replace(cfg, vocab_size=len(tok), image_token_index=tok.added["<image>"],
                                  video_token_index=tok.added["<video>"])
        model = VideoLlava(cfg)
    if cfg.share_towers:  # a new model, or its --resume (the two saved copies are equal: one is kept)
        model.video_tower = model.image_tower  # one CLIP tower under two names; saved as both key sets
    data = {s: Examples(e, cfg, tok, answered=s in ("train", "val")) for s, e in entries.items()}
    if not path and cfg.data_init > 0:  # Salimans & Kingma's data-dependent init (VideoLlava.init_from_data)
        g, tr = torch.Generator().manual_seed(cfg.seed), data["train"]
        def pick(kind):  # images, then videos, from one seeded generator: the same draw on every rank
            v = [m for m, e in zip(tr.media, tr.entries) if e["kind"] == kind]
            return torch.stack([v[j] for j in torch.randperm(len(v), generator=g)[:cfg.data_init]]) if v else None
        model.init_from_data(pick("image"), pick("video"))
    say("config:", json.dumps(dataclasses.asdict(cfg)))  # what runs (--eval: the run's, with the typed devices, data)
    return model.to(device), cfg, tok, data

def make_optimizer(params, cfg, device):  # AdamW, decay on matrices only; float16's loss scaler (a no-op otherwise)
    opt = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95))
    return opt, torch.amp.GradScaler(device.split(":")[0], enabled=autocast_dtype(cfg.dtype, device) == "float16")

def load_train_state(out_dir, opt, scaler, say, batch):  # --resume: AdamW moments, loss scale, RNG -> (step, seconds)
    try:  # truncated, not a torch file, a bare tensor (dict()): PyTorch's errors differ; a GPU's moments map to the CPU
        ts = dict(torch.load(os.path.join(out_dir, "train_state.pt"), map_location="cpu", weights_only=True))
    except Exception as e:
        raise UserError(f"{out_dir}/train_state.pt: not a readable training state ({type(e).__name__})")
    try:  # another run's state (other parameters), not a dict, or a file without these keys
        opt.load_state_dict(ts["optimizer"])  # checks how many tensors each group has, not their shapes:
        if any(s["exp_avg"].shape != p.shape for p, s in opt.state.items()):  # another run's moments are refused here
            raise ValueError("AdamW moments of other shapes")
        if ts.get("scaler"):  # float16: the loss scale goes on where it stopped (other dtypes save none)
            scaler.load_state_dict(ts["scaler"])
        torch.set_rng_state(ts["rng"])
        step, seconds = int(ts["step"]), float(ts.get("seconds", 0.0))
        if (b := ts.get("batch") or batch) != batch:  # batch_indices orders the data by it (an old file: not checked)
            raise UserError(f"{out_dir}: trained at global batch {b} (batch_size*grad_accum*processes), not {batch}")
    except (KeyError, ValueError, TypeError, RuntimeError, IndexError, AttributeError) as e:
        raise UserError(f"{out_dir}/train_state.pt: does not fit this run's model ({type(e).__name__})") from None
    say(f"resumed from step {step} of {out_dir}")
    return step, seconds  # the data order and the learning rate are functions of the step

def ddp_setup(cfg):  # -> (ddp, rank, world, device): one process, or one of torchrun's (nccl on CUDA, gloo on CPU)
    device = pick_device(cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False, 0, 1, device
    if "cpu" not in device and (gpus := torch.cuda.device_count()) < int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
        raise UserError(f"torchrun: one CUDA GPU per process, {gpus} here: start fewer or pass --device cpu")
    if device.startswith("cuda"):  # each process its own GPU, cuda:LOCAL_RANK, whichever --device named
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return True, dist.get_rank(), dist.get_world_size(), device

def batch_loss(model, tr, idx, cfg, rank, world, ddp, device, scaler):  # backward of this rank's rows of batch idx
    # -> the global batch's mean over its answer tokens: each pass's mean, weighted by its share of those tokens
    n_tok, total, passes = sum(len(tr.answers[i]) for i in idx), torch.zeros((), device=device), []
    # each micro-batch as two passes, image rows and video rows, each padded to its own longest: same loss, less work
    for micro in range(cfg.grad_accum):
        rows = idx[(micro * world + rank) * cfg.batch_size:(micro * world + rank + 1) * cfg.batch_size]
        by_kind = ([i for i in rows if tr.entries[i]["kind"] == k] for k in ("image", "video"))
        passes += [p for p in by_kind if p]  # a micro-batch without video rows has no video pass
    for j, part in enumerate(passes):
        b = tr.batch(part, device)
        share = (b["targets"] != -100).sum().item() * world / n_tok  # x world: DDP averages the ranks' gradients
        sync = not ddp or j == len(passes) - 1  # DDP all-reduces the gradients only after the last pass
        with (contextlib.nullcontext() if sync else model.no_sync()), autocast(cfg.dtype, device):
            loss = model(**b)[1] * share
        scaler.scale(loss).backward()  # float16: the loss scaled up, so small gradients do not underflow to 0
        total += loss.detach() / world
    if ddp:  # the logged loss is the global batch's, and every rank sees the same NaN and stops together
        dist.all_reduce(total)
    return total.item()

def train(cfg, resume=False):  # under torchrun each process computes its shard; rank 0 alone prints, evaluates, saves
    ddp, rank, world, device = ddp_setup(cfg)
    master, t0, say = rank == 0, time.time(), print if rank == 0 else (lambda *a, **k: None)
    torch.manual_seed(cfg.seed)
    model, cfg, tok, data = build_model(cfg, load_entries(cfg, master), resume, say, device)
    say("data: " + ", ".join(f"{s} {len(data[s].entries)} questions" for s in data) + f" ({time.time() - t0:.1f}s)")
    apply_freeze(model, cfg.freeze)
    params = [p for p in model.parameters() if p.requires_grad]
    n_all, n_train = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in params)
    say(f"parameters: {n_all / 1e6:.2f}M total, {n_train / 1e6:.2f}M trainable, {(n_all - n_train) / 1e6:.2f}M "
        f"frozen; vocab {cfg.vocab_size} ({'compact GPT-2 table' if isinstance(tok, GPT2Table) else 'checkpoint'}); "
        f"{device}, autocast {autocast_dtype(cfg.dtype, device)}"
        + ("; one CLIP tower for images and frames" if model.video_tower is model.image_tower else ""))
    opt, scaler = make_optimizer(params, cfg, device)
    tr, shares = data["train"], cfg.grad_accum * world  # a global batch is grad_accum x world micro-batches
    if (fit := max(1, len(tr.entries) // shares)) < cfg.batch_size:  # else a global batch would repeat questions
        say(f"--batch_size {cfg.batch_size} x {shares} (grad_accum x processes) > {len(tr.entries)} training "
            f"questions: using --batch_size {fit}")  # repeated questions cost work and add nothing to the mean
        cfg = dataclasses.replace(cfg, batch_size=fit)  # saved so: --resume finds the same global batch
    gsize = cfg.batch_size * shares  # gsize: the global batch
    if cfg.warmup > cfg.max_steps:  # a short fine-tune under the default --warmup 100
        say(f"--warmup {cfg.warmup} > --max_steps {cfg.max_steps}: the learning rate peaks at "
            f"{lr_at(cfg.max_steps - 1, cfg):.1e}, not --lr {cfg.lr:.1e}; lower --warmup to reach it")
    step, seconds0 = load_train_state(cfg.out_dir, opt, scaler, say, gsize) if resume else (0, 0.0)
    raw = model  # the bare module, which is saved and evaluated; under torchrun `model` becomes its DDP wrapper
    if ddp:  # unused parameters are normal: a shard without images leaves that tower out; later CLIP layers never run
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None,
                                                    find_unused_parameters=True)
    t_log, log_step = time.time(), step
    while step < cfg.max_steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        model.train()  # (no dropout or batch norm here: train and eval mode compute the same)
        idx = batch_indices(step, len(tr.entries), gsize, cfg.seed)  # the global batch's rows, all ranks
        total = batch_loss(model, tr, idx, cfg, rank, world, ddp, device, scaler)
        if not math.isfinite(total):  # these weights are not saved: out_dir keeps its last save
            raise UserError(f"loss became {total} at step {step}; stopped (try a lower --lr)")
        scaler.unscale_(opt)  # the true gradients are clipped (a no-op unless float16)
        nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        scaler.step(opt)  # float16: skipped when a gradient overflowed, and the scale lowered
        scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1
        dt = (time.time() - t_log) / (step - log_step)  # seconds a step since the last log line, before val and save
        stop = cfg.stop_after and cfg.stop_after <= step < cfg.max_steps  # as if interrupted: save, --resume goes on
        measure = master and (step % cfg.eval_interval == 0 or step == cfg.max_steps)  # val loss, and a checkpoint
        val = eval_loss(raw, data["val"], cfg, device) if measure else None
        if master and (measure or stop):
            save_checkpoint(raw, cfg, tok, opt, step, seconds0 + time.time() - t0, scaler, gsize)
        if master and (step % cfg.log_interval == 0 or step == cfg.max_steps or measure):
            eta = round(dt * (cfg.max_steps - step))
            say(f"step {step}/{cfg.max_steps} | loss {total:.3f} | val {'-' if val is None else f'{val:.3f}'} | "
                f"lr {lr_at(step - 1, cfg):.1e} | {dt * 1000:.0f} ms | {gsize / dt:.0f} samples/s | "
                f"eta {eta // 60}m{eta % 60:02d}s", flush=True)
            t_log, log_step = time.time(), step
        if stop:
            say(f"stopped after step {step} as asked; go on with --train --resume --out_dir {shlex.quote(cfg.out_dir)}")
            break
    train_seconds = seconds0 + time.time() - t0
    if ddp:  # every rank has finished its last step; rank 0 then evaluates alone
        dist.barrier()
        dist.destroy_process_group()
    if master and step >= cfg.max_steps:  # finished, not stopped early: the final evaluation
        before = f"; {seconds0:.0f}s of it before --resume" if seconds0 else ""
        say(f"trained in {train_seconds:.0f}s (data included{before})")
        return evaluate(raw, tok, cfg, device, data, train_seconds)

@torch.no_grad()
def eval_loss(model, ex, cfg, device):  # the mean loss over val's answer tokens: the log's `val` column
    model.eval()
    rows, losses = sorted(range(len(ex.entries)), key=lambda i: ex.entries[i]["kind"]), []  # images, then videos
    with autocast(cfg.dtype, device):  # in batches of --batch_size rows: (mean loss, answer tokens) each
        for b in (ex.batch(rows[s:s + cfg.batch_size], device) for s in range(0, len(rows), cfg.batch_size)):
            losses.append((model(**b)[1].item(), (b["targets"] != -100).sum().item()))
    loss = sum(x * n for x, n in losses) / sum(n for _, n in losses)
    if not math.isfinite(loss):  # the weights diverged within the last steps: they are not saved
        raise UserError(f"validation loss {loss}: stopped; {cfg.out_dir} keeps its last save (try a lower --lr)")
    return loss

# Generation, evaluation, inspection and bench -------------------------------------------------------------------------
def sample_next(logits, temperature, top_k, top_p, generator):  # (B, V) -> (B,): argmax at temperature 0, else sampled
    if temperature <= 0:
        return logits.argmax(-1)
    logits = (logits.float() - logits.amax(-1, keepdim=True).float()) / temperature  # max 0: a tiny T cannot overflow
    if top_k > 0:
        logits = logits.masked_fill(logits < logits.topk(min(top_k, logits.shape[-1])).values[:, -1:], -math.inf)
    if top_p < 1.0:
        sorted_l, order = logits.sort(-1, descending=True)  # the most likely first
        probs = sorted_l.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # drop a token when the tokens ranked above it already hold top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), -math.inf)  # vocabulary order
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]

def generate(model, input_ids, attention_mask=None, pixel_values_images=None, pixel_values_videos=None,
             max_new_tokens=32, temperature=0.0, top_k=0, top_p=1.0, eos_token_id=None, pad_token_id=0,
             generator=None, use_cache=True, on_token=None, compile=False):
    """Batched generation -> (B, <= max_new_tokens) new ids, pad_token_id after a row's EOS until all stop. Prompts
    come left-padded, so every row's last token is in column L-1: logits[:, -1] is each row's next token, and a step
    appends one column to all rows. Media are encoded once (prefill), then a token a step through `model.step`."""
    model.eval()
    if compile and not use_cache:
        raise ValueError("compile=True compiles the one-token step through the KV cache: it needs use_cache=True")
    (B, L), mask = input_ids.shape, attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    dev = input_ids.device.type  # the cache's dtype: autocast's (its matmuls make k, v), else the weights'
    dtype = (torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev)
             else model.language_model.model.embed_tokens.weight.dtype)
    # CPU: weights frozen into the graph as constants; products as inductor's C++ GEMM (the one backend: not timed)
    tuned = (torch._inductor.config.patch(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP")
             if compile and dev == "cpu" else None)
    if tuned is not None:
        torch._inductor.cpp_builder.get_cpp_compiler()  # no C++ compiler: InvalidCxxCompiler now, not after lowering
        version = sum(p._version for p in model.parameters())  # a change in place (an optimizer step) bumps it
        if getattr(model, "_frozen_version", version) != version:  # weights changed since the last compiled call
            torch._dynamo.reset()  # every compiled graph of the process: the frozen constants are stale
        model._frozen_version = version  # a change through `.data` bumps none: then call torch._dynamo.reset()
    # compile only the one-token step: many tiny ops, overhead-bound, run max_new_tokens times; prefill runs once
    step = torch.compile(model.step, fullgraph=True, dynamic=False) if compile else model.step  # a graph per B, T_max
    n, context = L + max_new_tokens, model.cfg.max_position_embeddings
    T_max = max(n, min(64 * math.ceil(n / 64), context)) if compile else n  # 64s: fewer graphs; > context: refused
    with torch.inference_mode(), tuned or contextlib.nullcontext():
        cache = KVCache(model.cfg, B, T_max, dtype, input_ids.device) if use_cache else None
        logits, _ = model(input_ids, mask, pixel_values_images, pixel_values_videos, cache=cache, last_only=True)
        seq, out, done = input_ids, [], torch.zeros(B, dtype=torch.bool, device=input_ids.device)  # done (B,)
        for _ in range(max_new_tokens):
            nxt = torch.where(done, pad_token_id, sample_next(logits[:, -1], temperature, top_k, top_p, generator))
            out.append(nxt)
            if on_token is not None:
                with torch.inference_mode(False):
                    on_token(nxt.clone())  # an ordinary tensor, which the caller may keep
            if eos_token_id is not None:  # without one, every row runs to max_new_tokens
                done = done | (nxt == eos_token_id)
            if bool(done.all()) or len(out) == max_new_tokens:  # no step for a token that is never sampled
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)  # (B, T+1): the new token is real in every row
            if use_cache:
                pos, step_mask = cache.claim(mask)  # (B, 1) RoPE positions, (B, 1, 1, T_max) mask
                try:
                    logits = step(nxt[:, None], pos, step_mask, cache)  # (B, 1, V)
                except torch._dynamo.exc.FailOnRecompileLimitHit:  # a graph per model, batch size and cache length
                    limit = torch._dynamo.config.recompile_limit  # 8 by default
                    warnings.warn(f"generate: torch.compile's limit of {limit} graphs is reached; decoding eagerly")
                    step = model.step  # the rest of this call goes on eagerly
                    logits = step(nxt[:, None], pos, step_mask, cache)
            else:  # the naive path: the whole sequence again, media re-encoded (tests compare it with the cache path)
                seq = torch.cat([seq, nxt[:, None]], 1)  # (B, L + steps)
                logits, _ = model(seq, mask, pixel_values_images, pixel_values_videos, last_only=True)
    return torch.stack(out, 1) if out else input_ids[:, :0].clone()  # outside inference_mode: an ordinary tensor

def exact_match(preds, refs):  # share of predictions equal to their reference (lower-cased, trimmed, no final '.')
    norm = lambda text: " ".join(text.lower().strip().rstrip(".").split())  # single spaces
    return sum(norm(p) == norm(r) for p, r in zip(preds, refs)) / max(1, len(refs))

def evaluate(model, tok, cfg, device, data, train_seconds=None):  # greedy answers' exact match per medium; eval.json
    result = {"train_seconds": train_seconds, "config": dataclasses.asdict(cfg)}  # then test, novel: {medium: scores}
    print(f"{'split':8s} {'medium':7s} {'n':>5s} {'exact':>7s}")
    for split in [s for s in ("test", "novel") if s in data]:  # your data has no novel split
        ex, result[split] = data[split], {}
        for kind in sorted({e["kind"] for e in ex.entries}):  # image, then video (those present): one medium per batch
            rows, preds = [i for i, e in enumerate(ex.entries) if e["kind"] == kind], {}
            for part in (rows[s:s + cfg.batch_size] for s in range(0, len(rows), cfg.batch_size)):  # as in training
                with autocast(cfg.dtype, device):
                    out = generate(model, **ex.batch(part, device, generating=True),
                                   max_new_tokens=cfg.max_new_tokens, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
                preds.update(zip(part, [tok.decode([t for t in r if t != tok.eos_id]).strip() for r in out.tolist()]))
            em = lambda rows: exact_match([preds[i] for i in rows], [ex.entries[i]["answer"] for i in rows])
            qtype = {i: " ".join(ex.entries[i]["question"].split()[:4]) for i in rows}  # e.g. "Which way does the"
            by_q = {q: em([i for i in rows if qtype[i] == q]) for q in sorted(set(qtype.values()))}
            samples = [{"question": ex.entries[i]["question"], "prediction": preds[i],
                        "reference": ex.entries[i]["answer"]} for i in rows[:4]]
            result[split][kind] = {"n": len(rows), "exact_match": em(rows), "by_question": by_q, "samples": samples}
            print(f"{split:8s} {kind:7s} {len(rows):5d} {em(rows):7.3f}   " +
                  ", ".join(f"{q}: {v:.2f}" for q, v in by_q.items()))
    for s in [x for k in ("video", "image") for x in result["test"].get(k, {}).get("samples", [])[:3]]:
        print(f"  Q: {s['question']}  ->  {s['prediction']!r}  (ref {s['reference']!r})")
    atomic(os.path.join(cfg.out_dir, "eval.json"), lambda p: json.dump(result, open(p, "w"), indent=1))
    return result

def inspect_checkpoint(path, overrides, n_tokens):  # parameters per tower, bytes by dtype, key check, a video's memory
    run, n_frames = check_arch(path, overrides, "--inspect")  # overrides: --n_frames at most (parse_args)
    model, files, handles, found, problems = align_keys(path)
    cfg, towers, by_dtype, layouts = model.cfg, {}, {}, set()
    for key, f in files.items():
        sl = handles[f].get_slice(key)  # shape and dtype from the file's header: no tensor is read
        numel, dt, tower = math.prod(sl.get_shape()), sl.get_dtype(), canonical_key(key).split(".")[0]
        size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2}.get(dt, 1)  # bytes per element
        by_dtype[dt], towers[tower] = by_dtype.get(dt, 0) + numel * size, towers.get(tower, 0) + numel
        layouts.add("transformers-5 in memory" if key.startswith(("model.", "lm_head.")) else
                    "hub" if ".vision_model." in key else "transformers-5 save" if "_tower." in key else None)
    if shared := run and run.share_towers:  # one tower saved as both names
        towers.pop("video_tower", None)  # counted once, as the run trained it
    n_bytes, per_tower = sum(by_dtype.values()), [f"{t} {n / 1e6:.2f}M" for t, n in towers.items()]
    print(f"checkpoint {path}: {len(files)} tensors in {len(handles)} file(s), layout {sorted(layouts - {None})}; "
          f"{sum(towers.values()) / 1e6:.2f}M parameters "
          f"({', '.join(per_tower + ['video_tower = image_tower'] * bool(shared))}); " +
          ", ".join(f"{dt} {b / 2**30:.3f} GiB" for dt, b in by_dtype.items()))
    print(f"key alignment: {len(found)} model tensors found, " +
          ", ".join(f"{what} {keys or 'none'}" for what, keys in problems.items()))
    p, e, bf16, f32 = (cfg.image_size // cfg.patch_size) ** 2, cfg.hidden_size // cfg.num_attention_heads, 2, 4
    seq = (p + 1) * n_frames + n_tokens  # positions of the prompt: P+1 per frame (CLS kept for video) + text
    kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * e * seq * bf16  # keys and values of every layer
    vis = n_frames * (p + 1) ** 2 * cfg.v_num_attention_heads * f32  # one CLIP layer over the frames: scores (float32),
    vis += n_frames * (p + 1) * (4 * cfg.v_hidden_size + cfg.v_intermediate_size) * bf16  # input, q, k, v, MLP hidden
    act = seq * (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * bf16  # one decoder layer: 4 D, gate/up/product
    print(f"estimate for one video of {n_frames} frames + {n_tokens} text tokens = {seq} positions: weights "
          f"{n_bytes / 2**30:.2f} GiB (as stored: {', '.join(by_dtype)}); in bfloat16: KV cache {kv / 2**20:.1f} MiB, "
          f"vision activations {vis / 2**20:.1f} MiB, decoder activations per layer {act / 2**20:.1f} MiB")
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        print(f"CUDA: {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB")

def bench(cfg, sizes=None, rounds=3):  # decode tok/s, batch 1, greedy, float32: eager, compiled and transformers
    import timeit
    src, dst = torch.randn(2**26), torch.zeros(2**26)  # 256 MiB each, larger than most caches, pages touched
    llama = lambda d, i, n, h: dict(hidden_size=d, intermediate_size=i, num_hidden_layers=n, num_attention_heads=h,
                                    num_key_value_heads=h)
    for name, size in (sizes or {"~20M": llama(256, 688, 4, 4), "~130M": llama(768, 2048, 12, 12)}).items():
        torch.manual_seed(0)
        mcfg = Config(vocab_size=32064, max_position_embeddings=1024, image_token_index=32000, video_token_index=32001,
                      **size)  # the 7B's vocabulary; the towers keep Config's small defaults (decoding never runs them)
        ours, ids, new = VideoLlava(mcfg).eval(), torch.randint(3, 32000, (1, 16)), cfg.max_new_tokens
        run = {"eager": lambda: generate(ours, ids, max_new_tokens=new)[0],
               "compiled": lambda: generate(ours, ids, max_new_tokens=new, compile=True)[0]}
        with contextlib.suppress(ImportError), tempfile.TemporaryDirectory() as d:  # transformers on the same weights
            import transformers
            save_file(ours.state_dict(), os.path.join(d, "model.safetensors"))
            json.dump(hf_config_dict(mcfg), open(os.path.join(d, "config.json"), "w"))
            ref = transformers.VideoLlavaForConditionalGeneration.from_pretrained(d, dtype=torch.float32).eval()
            run["transformers"] = lambda: ref.generate(input_ids=ids, max_new_tokens=new, min_new_tokens=new,
                                                       do_sample=False)[0, ids.shape[1]:]
        first = {k: f() for k, f in run.items()}  # warm-up (and the compile)
        same, tps, bw = {k: torch.equal(v, first["eager"]) for k, v in first.items()}, dict.fromkeys(run, 0.0), 0.0
        for _ in range(rounds):  # best of rounds, the decoders interleaved, then the copy (best of three)
            for k, f in run.items():
                tps[k] = max(tps[k], new / timeit.timeit(f, number=1))
            copy = min(timeit.repeat(lambda: dst.copy_(src), number=1, repeat=3))  # seconds
            bw = max(bw, 2 * src.nbytes / copy)  # bytes read + written, as STREAM counts
        n_lm = sum(p.numel() for p in ours.language_model.parameters())
        floor = bw / (n_lm * 4)  # tokens/s if a step cost only reading every LLaMA weight once
        print(f"{name}: LLaMA {n_lm / 1e6:.1f}M parameters, {new} new tokens, {torch.get_num_threads()} threads, copy "
              f"bandwidth {bw / 1e9:.1f} GB/s, floor {floor:.1f} tok/s; identical tokens: {all(same.values())}")
        for k, v in tps.items():  # random weights leave near-ties in the logits: summed in another order, one may flip
            ratio = f", {v / tps['transformers']:.2f}x transformers" if "transformers" in tps else ""
            ratio += "" if same[k] else ", not eager's tokens"
            print(f"  {k:12s} {v:7.1f} tok/s = {v / floor:4.0%} of the floor{ratio}")

# Command line ---------------------------------------------------------------------------------------------------------
def parse_args(argv=None):  # argv -> (args, cfg, overrides): the modes, then a flag per Config field over --preset
    p = argparse.ArgumentParser(description="Video-LLaVA: HF checkpoints, a tiny one trained.", allow_abbrev=False)
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # argparse's refusals in one line too, no usage
    for mode, what in (("train", "build the synthetic world (if needed), train, evaluate"),
                       ("resume", "with --train: continue out_dir's run exactly (architecture flags must match)"),
                       ("eval", "score out_dir or --from_pretrained"), ("bench", "decode tokens/s vs transformers"),
                       ("generate", "answer --prompt on --video/--image"), ("compile", "for --generate (slow start)")):
        p.add_argument(f"--{mode}", action="store_true", help=what)
    p.add_argument("--inspect", default="", metavar="DIR", help="report on the checkpoint in DIR")
    for name, what in (("video", "video file or frame folder"), ("image", "image file"), ("prompt", "the question")):
        p.add_argument(f"--{name}", default="", help=f"{what}, for --generate")
    p.add_argument("--n_tokens", type=int, help="text tokens of --inspect's memory estimate (default 64)")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the sizes to start from (default: default)")
    notes = dict(re.findall(r"^    (\w+): (.*)$", inspect.getsource(Config), re.M)) if argv is None else {}  # --help
    for f in dataclasses.fields(Config):  # bools as --flag / --no-flag; None = not typed
        kind = dict(action=argparse.BooleanOptionalAction) if isinstance(f.default, bool) else {"type": type(f.default)}
        p.add_argument(f"--{f.name}", default=None, help=notes.get(f.name), **kind)  # help: its line in Config
    args = p.parse_args(argv)  # argparse exits 2 itself on an unknown flag or preset
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    cfg = Config(**{**PRESETS[args.preset or "default"], **overrides})
    # flags the mode would not use: --generate reads these (and the architecture, checked against the checkpoint's);
    # --train and --eval decode greedily (no sampling flags), --bench builds fixed-size models on the CPU
    sampling = ("temperature", "top_k", "top_p")
    tokens = ("vocab_size", *(f for f in HF_FIELDS if f.endswith(("_token_id", "_token_index"))))  # from a new table
    new, scratch = args.train and not args.resume, args.train and not (args.resume or cfg.from_pretrained)
    dropped = (("data_init", "whiten_patches") if cfg.from_pretrained else tokens) if new else ()  # pretrained: no init
    greedy = [f.name for f in dataclasses.fields(Config) if f.name not in (*sampling, *dropped)]
    reads = {"generate": ("out_dir", "from_pretrained", "device", "dtype", "seed", *sampling, "max_new_tokens",
                          "n_frames", *HF_FIELDS), "inspect": ("n_frames", "n_tokens"), "bench": ("max_new_tokens",),
             "train": greedy, "eval": greedy if not cfg.from_pretrained else ("from_pretrained", "out_dir", "device",
                 "dtype", "data", "test_data", "n_frames", "batch_size", "max_new_tokens", *HF_FIELDS)}
    # (--eval: a run, its flags checked against the run's; or a checkpoint as it comes, on your questions: no world)
    mode = next((m for m in reads if getattr(args, m)), None)  # --train --eval is one run: --train's
    typed = [*overrides, *["n_tokens"] * (args.n_tokens is not None)]  # --n_tokens is not a Config field
    unread = [f"--{k}" for k in typed if mode and k not in reads[mode]]
    v = dataclasses.asdict(cfg)  # every problem with the flags, in order; the first is reported
    problems = [f"--{f} must be at least 1" for f in ("batch_size grad_accum n_frames max_new_tokens hidden_size "
                "patch_size num_attention_heads num_key_value_heads v_hidden_size v_num_attention_heads image_size "
                "max_steps log_interval eval_interval num_hidden_layers v_num_hidden_layers").split() if v[f] < 1]
    problems += [f"--{f} {v[f]} must be a positive number" for f in ("lr", "grad_clip", "rope_theta", "rms_norm_eps",
                                                                     "v_layer_norm_eps") if not 0 < v[f] < math.inf]
    problems += [f"--{f} {v[f]} must be 0 or more" for f in ("min_lr", "weight_decay", "stop_after", "top_k",
                                                              "data_init", "temperature") if not 0 <= v[f] < math.inf]
    problems += [f"--{a} {v[a]} must be a multiple of --{b} {v[b]}" for a, b in (("hidden_size", "num_attention_heads"),
                 ("num_attention_heads", "num_key_value_heads"), ("v_hidden_size", "v_num_attention_heads"),
                 ("image_size", "patch_size")) if v[a] % max(v[b], 1) and scratch]  # (else the saved sizes run)
    problems += [f"--{k} {v[k]}: choose {' or '.join(ok)}" for k, ok in CHOICES.items() if v[k] not in ok]
    modes = sum(map(bool, (args.train or args.eval, args.generate, args.inspect, args.bench)))  # --train evaluates too
    problems += [msg for bad, msg in ((not 0 < cfg.top_p <= 1, f"--top_p {cfg.top_p}: in (0, 1]"),
        (not -2**63 <= cfg.seed < 2**63, f"--seed {cfg.seed}: must fit in 64 bits (-2**63 to 2**63 - 1)"),
        (cfg.temperature == 0 and (cfg.top_k > 0 or cfg.top_p < 1),
         "--top_k and --top_p filter what is sampled: give a --temperature above 0 as well"),
        (scratch and cfg.hidden_size // max(cfg.num_attention_heads, 1) % 2,
         "--hidden_size / --num_attention_heads (the head width) must be even: RoPE rotates feature pairs"),
        (scratch and not -cfg.v_num_hidden_layers - 1 <= cfg.vision_feature_layer <= cfg.v_num_hidden_layers,
         f"--vision_feature_layer {cfg.vision_feature_layer}: the tower has hidden states "
         f"-{cfg.v_num_hidden_layers + 1} .. {cfg.v_num_hidden_layers}"),
        (overrides.get("share_towers") and cfg.from_pretrained,
         "--share_towers is for training from scratch: --from_pretrained keeps the checkpoint's two towers"),
        (args.train and cfg.from_pretrained and os.path.realpath(cfg.out_dir) == os.path.realpath(cfg.from_pretrained),
         f"--out_dir {cfg.out_dir} is the --from_pretrained folder: training would overwrite it"),
        (args.resume and not args.train, "--resume continues a training run: use it with --train"),
        ((args.n_tokens or 0) < 0, f"--n_tokens {args.n_tokens}: --inspect's text tokens, 0 or more"),
        (modes > 1, "one mode per call: --train (which also evaluates), --eval, --generate, --inspect DIR or --bench"),
        (unread, f"{', '.join(unread)}: not read by --{mode}; drop it"),
        (cfg.data and args.train and {"n_train", "n_test", "data_dir"} & set(overrides), "--n_train, --n_test and "
         "--data_dir size and place the synthetic world: --data trains on your file"),
        ("" in overrides.values(), "a flag given '' must name a file or folder, not an empty string"),
        (args.compile and not args.generate, "--compile compiles --generate's decoding step: use it with --generate"),
        (args.generate and cfg.from_pretrained and "out_dir" in overrides, "--generate answers with one model: "
         "--from_pretrained's checkpoint or the --out_dir of a run, not both"),
        (not args.generate and (args.video or args.image or args.prompt), "--video, --image and --prompt are for "
         "--generate (another mode would ignore them)"),
        (args.preset and mode and (args.resume or mode != "train"), f"--preset {args.preset}: --resume, --eval, "
         "--generate and --inspect take the sizes from the checkpoint (--bench has its own); drop --preset"),
    ) if bad]
    if problems:
        raise UserError(problems[0])
    check_out_dir(args, cfg)
    return args, cfg, overrides

def check_out_dir(args, cfg):  # --out_dir, refused before anything is read or written
    base, new = args.eval and not args.train and cfg.from_pretrained, args.train and not args.resume  # base: a score
    if args.train or base or args.eval and os.path.isdir(cfg.out_dir):  # --resume, --eval: into the run's folder
        # base writes eval.json alone: into a new or empty folder, or base's; a new run: a new, empty, or a run's folder
        check_folder(cfg.out_dir, "--out_dir", "config.json", lambda m: set(os.listdir(cfg.out_dir)) <= {"eval.json"}
                     if base else not new or m.get("script") == SCRIPT, ("holding more than an eval.json" if base else
                     "that is not a run of this script (nor a checkpoint's score)") + "; give a new or empty one")

def check_arch(path, overrides, mode):  # a typed architecture flag must agree with path's; -> (run, frames per video)
    arch = config_from_hf(hf := read_config(path), path)  # the checkpoint's architecture, which is what runs
    if clash := [f"--{f} {v} (checkpoint: {arch[f]!r})" for f, v in overrides.items() if f in arch and v != arch[f]]:
        raise UserError(f"{path}: {mode} runs the checkpoint's architecture; drop {', '.join(clash)}")
    run = saved_config(path, {}, resume=False) if hf.get("script") == SCRIPT else None  # a run of this script, or HF
    return run, overrides.get("n_frames", run.n_frames if run else 8)  # typed, else the run's, else the 7B's 8

def run_generate(args, cfg, overrides):  # load a checkpoint (HF folder or out_dir), read the media, stream the answer
    if not args.prompt.strip() or (args.video and args.image):  # a blank prompt is none
        raise UserError("--generate needs --prompt TEXT, and at most one of --video PATH and --image PATH")
    if tag := next((t for t in ("image", "video") if args.prompt.count(f"<{t}>") > bool(getattr(args, t))), None):
        raise UserError(f"--prompt has <{tag}> but no --{tag} was given: give --{tag} PATH, or drop the tag" if not
                        getattr(args, tag) else f"--prompt has <{tag}> more than once for one --{tag}: keep one tag")
    path, device = cfg.from_pretrained or cfg.out_dir, pick_device(cfg.device)
    run, n_frames = check_arch(path, overrides, "--generate")  # run: the Config of a run of this script, or None (HF)
    if run:  # under the run's autocast, its weights loaded as --eval loads them (weights_dtype)
        cfg = dataclasses.replace(cfg, dtype=overrides.get("dtype", run.dtype))
        dtype = weights_dtype(cfg.dtype, device)
    else:  # an HF checkpoint's weights in --dtype: auto = bfloat16 where the hardware multiplies in it
        dtype = getattr(torch, ("bfloat16" if native_bf16(device) else "float32") if cfg.dtype == "auto" else cfg.dtype)
    model, tok = load_pretrained(path, dtype, device).eval(), load_tokenizer(path)
    mcfg, kind = model.cfg, ("video" if args.video else "image" if args.image else "")  # "" = no media tag
    # the medium as a batch of one: an image (1, 3, S, S) or a video (1, F, 3, S, S)
    imgs = torch.from_numpy(load_image(args.image, mcfg.image_size))[None].to(device) if args.image else None
    vids = torch.from_numpy(load_video(args.video, n_frames, mcfg.image_size))[None].to(device) if args.video else None
    text = args.prompt if "<image>" in args.prompt or "<video>" in args.prompt else prompt_text(args.prompt, kind)
    if isinstance(tok, GPT2Table):  # a model trained here knows only its training words ("What" != " What")
        tok.check_known([("--prompt", text)])
    ids = torch.tensor([expand_placeholders(tok.encode(text), mcfg, n_frames)], device=device)
    g, got = torch.Generator(device=device).manual_seed(cfg.seed), []
    answer = lambda: tok.decode([t for t in got if t != tok.eos_id]).lstrip().rstrip("\ufffd")  # trained: " left"
    def stream(tok_id):  # print what each new token adds (decoded whole: a multi-byte char prints once complete)
        before = answer()
        got.append(int(tok_id[0]))
        print(answer()[len(before):], end="", flush=True)
    try:  # an HF folder's weights are already in --dtype; a run of this script runs under its autocast
        with autocast(cfg.dtype if run else "float32", device):
            generate(model, ids, None, imgs, vids, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                     top_k=cfg.top_k, top_p=cfg.top_p, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id,
                     generator=g, on_token=stream, compile=args.compile)
    except (torch._dynamo.exc.BackendCompilerFailed, torch._inductor.exc.InvalidCxxCompiler) as e:  # g++, on a CPU
        if answer():
            print()  # end the streamed line (the first token comes before the first compiled step)
        raise UserError(f"--compile: torch.compile failed ({str(e).splitlines()[0][:200]}); run without --compile")
    print()

def main(argv=None):  # the command line: one mode per call (--train [--resume], --eval, --generate, --inspect, --bench)
    args, cfg, overrides = parse_args(argv)
    if args.train:  # build_model prints the config that runs (with --from_pretrained, the checkpoint's architecture)
        if cfg.from_pretrained and not args.resume:  # a typed size that differs is refused; frames as --generate's
            if cfg.test_data and not cfg.data:  # a forgotten --data: the world's 3000 clips at the checkpoint's sizes
                raise UserError("--from_pretrained with --test_data: give your training questions too, as --data FILE")
            cfg = dataclasses.replace(cfg, n_frames=check_arch(cfg.from_pretrained, overrides, "--from_pretrained")[1])
        train(saved_config(cfg.out_dir, overrides) if args.resume else cfg, resume=args.resume)
    elif args.eval:  # on the test (and novel) questions: a run as trained (as --resume loads it), or a checkpoint
        device, base = pick_device(cfg.device), cfg.from_pretrained  # as it comes, to compare fine-tuning with
        if base:  # your questions, its frames as --train reads them; eval.json into a folder of its own (parse_args)
            if not (cfg.data or cfg.test_data):  # (not the synthetic world: thousands of questions of coloured shapes)
                raise UserError("--eval --from_pretrained scores your questions: give --data FILE or --test_data FILE")
            cfg = dataclasses.replace(cfg, share_towers=False, n_frames=check_arch(base, overrides, "--eval")[1])
            os.makedirs(cfg.out_dir, exist_ok=True)
        cfg = cfg if base else saved_config(cfg.out_dir, {"device": cfg.device, **overrides}, resume=False)
        entries = load_entries(cfg, scoring=True, world=not base)  # base: --data's held-out entries or --test_data
        model, cfg, tok, data = build_model(cfg, entries, not base, say=print, device=device)
        seconds = (read_json(os.path.join(cfg.out_dir, "eval.json")) or {}).get("train_seconds")  # kept
        evaluate(model, tok, cfg, device, data, seconds)
    elif args.generate:
        run_generate(args, cfg, overrides)
    elif args.inspect:
        inspect_checkpoint(args.inspect, overrides, 64 if args.n_tokens is None else args.n_tokens)
    elif args.bench:
        bench(cfg)
    else:
        print("nothing to do: pass --train, --eval, --generate, --inspect DIR or --bench (see --help)")

if __name__ == "__main__":
    if hasattr(sys.stdout, "reconfigure"):  # IDLE's stream has none; pythonw's stdout is None
        sys.stdout.reconfigure(errors="backslashreplace")  # a character the code page lacks (Windows): \U0001f600
    try:
        main()
    except (UserError, OSError, torch._inductor.exc.InvalidCxxCompiler, KeyboardInterrupt) as e:  # bench: no g++
        print(f"error: {str(e) or 'interrupted; --train --resume goes on from the last (whole) save'}", file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 2)
