"""Mark 1: a video multiple-choice answerer that also points at the frames supporting its answer, in one file.

    video (B, F, 3, S, S)
      -> V-JEPA 2 encoder (Conv3d tubelets 2x8x8, 2x16x16 released; pre-LN, 3D RoPE, final LayerNorm) (B, T*G*G, Dv)
      -> bridge: Linear Dv->D + learned time/space embeddings, N visual + M temporal queries cross-attend (B, N+M, D)
                 one BERT-style layer (post-LN, GELU) over [queries; question token embeddings]          (B, N+M+Lq, D)
                 visual queries -> LLM prefix                                                           (B, N, D)
                 temporal queries -> residual MLP head -> dot product with one key per frame, made from
                   each tubelet's space-pooled video tokens minus the clip's mean; max over M          (B, F)
      -> Qwen3 LLM over [prefix; prompt tokens] -> the answer "C. ..."                                  (B, L, V)

Upstream: V-JEPA 2 (https://arxiv.org/abs/2506.09985), Qwen3 (https://arxiv.org/abs/2505.09388), BLIP-2's learned
queries (https://arxiv.org/abs/2301.12597); the design follows the Mark-1 project (github.com/CogHyn/mark-1). Both
towers load the HF checkpoints (facebook/vjepa2-*, Qwen/Qwen3-*) and match transformers to float precision (tests).

With checkpoints (--vision_ckpt DIR --llm_ckpt DIR) both towers are frozen and only the bridge trains (encoder features
cached once per clip; Qwen3's own tokenizer.json, as a tiktoken.Encoding, and chat template). Without them (the default:
nothing pretrained is reachable offline) a tiny V-JEPA 2 encoder and a tiny Qwen3 train from scratch with the bridge,
on GPT-2 tokens (tiktoken) over a compact table of the ids in the training text.

The built-in world: 48x48 mp4 clips, 16 frames at 8 fps, two coloured shapes; inside a time window one event happens to
the named shape: it appears, turns another colour, stops, or meets the other shape. Question "What happens to the red
circle?", four options "A. it appears" ... "D. it meets the blue square", answer "C. it stops", support = the event's
frames. Split `novel` holds (colour, event) pairs that never occur in training.

Shapes: B batch, F frames, S crop side, T = F/2 tubelets, G patch grid side, P = T*G*G video tokens, N visual queries,
M temporal queries, Lq question / L text tokens, D LLM / Dv video width, H heads, K kv heads, E head dim, V vocabulary.

Commands (also: --eval, --resume, --preset original):
    python mark1.py --train                                  # data + training + evaluation on a laptop CPU
    python mark1.py --predict --video clip.mp4 --question "What happens to the red circle?" \\
        --choices "A. it appears|B. it stops|C. it turns blue|D. it meets the green square"
    python mark1.py --bench                                  # feature cache: epoch 2 vs epoch 1 with a frozen encoder
    python mark1.py --train --vision_ckpt vjepa2/ --llm_ckpt qwen3/ --data my.json   # frozen towers, bridge only
    python mark1.py --train --device_map vision=cuda:0,bridge=cuda:0,llm=cuda:1     # split over two GPUs
    torchrun --nproc_per_node=2 mark1.py --train             # DDP (gloo on CPU, nccl on CUDA)
"""

import argparse
import contextlib
import dataclasses
import hashlib
import inspect
import json
import math
import os
import random
import re
import shlex
import sys
import tempfile
import time
import unicodedata
from collections import OrderedDict

os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # FFmpeg stays quiet: a bad video is reported by us, in one line
os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")  # and OpenCV (an image it cannot read), before cv2 loads
import cv2
import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file

SCRIPT = "mark1"

class UserError(Exception):
    """A problem with the user's input: the __main__ block prints it as one line and exits with status 2."""

def read_json(path, fix, kind=dict):  # the non-empty dict (or list) in path; else one UserError line ending in `fix`
    try:  # utf-8-sig: a byte-order mark some editors write is skipped
        obj = json.load(open(path, encoding="utf-8-sig"))
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror}); {fix}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); {fix}")
    if isinstance(obj, kind) and obj:
        return obj
    raise UserError(f"{path}: not a non-empty JSON {'object' if kind is dict else 'list'}; {fix}")

def writable(path, marker, ours):  # may this script write into path? missing, empty, or `marker` passes ours()
    parent = os.path.abspath(path)  # can a folder be made there? a temporary one in the nearest existing entry
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # a file on the way, /proc; a damaged marker
        os.rmdir(tempfile.mkdtemp(dir=parent))  # fails on a read-only disk or without permission
        return not os.path.exists(path) or set(os.listdir(path)) <= {"model.safetensors.tmp"} or ours(json.load(open(
            os.path.join(path, marker))))  # empty: nothing, or only the .tmp of a first save cut short (replaced)
    return False

# Config ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:  # data, then the two towers (v_*: the V-JEPA 2 encoder, l_*: the Qwen3 LLM)
    data: str = ""  # user annotation JSON for training (format in the README); "" = the built-in synthetic world
    test_data: str = ""  # user annotation JSON for evaluation; else about a tenth of --data is held out
    data_dir: str = "data/mark1"
    out_dir: str = "out/mark1"
    n_train: int = 4000
    n_val: int = 100
    n_test: int = 300
    n_novel: int = 300
    n_frames: int = 16  # frames sampled uniformly from each clip (also the length of the saliency vector)
    crop: int = 32  # V-JEPA 2 preprocessing: shortest edge -> int(crop*256/224), centre crop `crop`
    vision_ckpt: str = ""  # vision tower (V-JEPA 2): with a checkpoint, the v_* sizes and crop are its config's
    v_width: int = 96
    v_layers: int = 3
    v_heads: int = 2  # head dim 48 -> RoPE split 16/16/16
    v_patch: int = 8  # 16 in the real model; 8 keeps a 4x4 grid on 32-pixel frames
    v_tubelet: int = 2
    v_mlp_ratio: float = 4.0
    llm_ckpt: str = ""  # LLM (Qwen3): with a checkpoint, the l_* sizes, rope_theta and tie are its config's
    l_width: int = 128
    l_layers: int = 3
    l_heads: int = 4
    l_kv_heads: int = 2  # grouped-query attention: 2 q heads per kv head, as in Qwen3-0.6B
    l_head_dim: int = 32
    l_inter: int = 384
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    compact_vocab: bool = True  # GPT-2 mode: output table over the ids seen in training (False: all 50257)
    n_visual_query: int = 8  # the bridge from here on: N visual queries (32 in the Mark-1 project)
    n_temporal_query: int = 5  # M (5 in the Mark-1 project)
    bridge_heads: int = 4
    bridge_layers: int = 2  # cross-attention blocks of the queries over the video tokens (the Mark-1 project used one)
    bert_heads: int = 4
    bert_inter: int = 512
    temporal_blocks: int = 2  # residual MLP blocks in the temporal head
    frame_head: str = "keys"  # "keys": queries score per-frame video keys; "linear": Mark-1's Linear(D, F)
    centre_frames: bool = True  # from-scratch encoder only: subtract each frame's mean colour (background reads ~0)
    data_init: int = 128  # clips of the data-dependent init (Salimans & Kingma 2016) before step 0; 0 = off
    lam: float = 2.0  # weight of the frame BCE loss (Mark-1: 2.0)
    pos_weight: float = 3.0  # BCE positive weight; Mark-1 used 10; here 4 positives in 16 frames (3:1)
    freeze_vision: bool = False  # a --vision_ckpt always freezes the encoder
    freeze_llm: bool = False  # a --llm_ckpt always freezes the LLM
    feature_cache: bool = True  # frozen encoder: compute features once per clip and keep them
    device_map: str = ""  # e.g. vision=cuda:0,bridge=cuda:0,llm=cuda:1 ("" = everything on --device)
    # training
    batch_size: int = 32  # micro-batch per process
    grad_accum: int = 1
    max_steps: int = 1200
    lr: float = 1e-3
    min_lr: float = 1e-4  # where the cosine ends
    warmup_frac: float = 0.1  # linear warmup over this fraction of the steps, then cosine to min_lr (Mark-1: to 0)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    dtype: str = "auto"  # autocast: auto (bfloat16 where the hardware multiplies in it), float32, bfloat16, float16
    device: str = "auto"
    seed: int = 1337
    log_interval: int = 50
    eval_interval: int = 500
    stop_after: int = 0  # stop (and save) after this many steps, as if interrupted; --resume continues
    temperature: float = 0.0  # generation: 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    max_new_tokens: int = 16
    threshold: float = 0.5  # a frame is "support" when its saliency, sigmoid(frame logit), exceeds this

PRESETS = {"default": {},
    "tiny": dict(n_train=48, n_val=8, n_test=12, n_novel=12, n_frames=8, v_width=32, v_layers=1, v_heads=2, l_width=32,
                 l_layers=1, l_heads=2, l_kv_heads=1, l_head_dim=16, l_inter=64, n_visual_query=4, n_temporal_query=2,
                 bridge_heads=2, bert_heads=2, bert_inter=64, batch_size=8, max_steps=6, log_interval=2,
                 eval_interval=4, dtype="float32", data_dir="data/mark1_tiny", out_dir="out/mark1_tiny"),
    # --bench: a frozen ViT-S-sized encoder (384 wide, 12 layers) on 64-pixel frames (random weights: the cost matters)
    "bench": dict(v_width=384, v_layers=12, v_heads=6, v_patch=16, crop=64, n_train=256, data_dir="data/mark1_bench"),
    # the Mark-1 project's bridge sizes (video width 1408 and LLM width 1024 come from the checkpoints)
    "original": dict(n_visual_query=32, n_temporal_query=5, bridge_heads=8, bridge_layers=1, bert_heads=16, lam=2.0,
                 bert_inter=4096, pos_weight=10.0, lr=5e-5, min_lr=0.0, n_frames=16, crop=256, frame_head="linear")}

# Data: the synthetic world (real mp4 files), the video loader, the annotation file, tokenizers ------------------------
COLOURS = {"red": (40, 40, 230), "green": (60, 200, 60), "blue": (230, 90, 40), "yellow": (40, 220, 230),
           "purple": (200, 60, 170)}  # BGR, as OpenCV draws
SHAPES = ["circle", "square", "triangle"]  # drawn filled, RADIUS pixels from the centre
EVENTS = ["appears", "turns", "stops", "meets"]  # the four answers; their order is the options' template order
HELD_OUT = {("red", "appears"), ("green", "turns"), ("blue", "stops"), ("yellow", "meets")}  # the `novel` split
SIDE, RADIUS, FPS, N_CLIP = 48, 6, 8, 16  # frame side, shape radius, frames per second, frames per clip

def bounce(x0, v, t, lo=10, hi=SIDE - 10):  # frame t's position of a point moving at v px/frame between walls lo, hi
    span = hi - lo
    p = (x0 - lo + v * t) % (2 * span)  # unfold the reflections: a path of period 2 * span
    return lo + (p if p <= span else 2 * span - p)  # fold the way back

def sample_event(rng, split):  # one clip's story -> (per-frame draw list, annotation dict without the video path)
    while True:
        colour, event = rng.choice(list(COLOURS)), rng.choice(EVENTS)
        if ((colour, event) in HELD_OUT) == (split == "novel"):  # novel holds exactly the held-out pairs
            break
    other_colour = rng.choice([c for c in COLOURS if c != colour])  # the distractor object's colour
    shape, other_shape = rng.choice(SHAPES), rng.choice(SHAPES)
    new_colour = rng.choice([c for c in COLOURS if c not in (colour, other_colour)])  # for "turns"
    e = rng.randint(2, 12)  # first support frame; support = 4 frames
    speed = lambda: rng.choice([-1, 1]) * rng.uniform(1.5, 2.5)  # px/frame, either direction
    xa, xb, va, vb = rng.uniform(12, 36), rng.uniform(12, 36), speed(), speed()
    ya, yb = ((rng.uniform(11, 19), rng.uniform(29, 37)) if rng.random() < 0.5  # two rows, 11-19 and 29-37
              else (rng.uniform(29, 37), rng.uniform(11, 19)))  # the named object on either
    frames = []
    for t in range(N_CLIP):
        a = dict(shape=shape, colour=colour, x=bounce(xa, va, t), y=ya)  # the named object
        b = dict(shape=other_shape, colour=other_colour, x=bounce(xb, vb, t), y=yb)  # the other, always moving
        if event == "appears" and t < e:
            a = None  # not drawn before frame e
        elif event == "turns" and t >= e:
            a["colour"] = new_colour  # another colour from frame e
        elif event == "stops" and t >= e:
            a["x"] = bounce(xa, va, e)  # frozen where it was at frame e
        elif event == "meets":  # both on one row, closing in at 1.5 px/frame each, touching at frame e+1, then apart
            side = 1 if xa < xb else -1  # the named object comes from the left (+1) or the right (-1)
            off = min(14.0, RADIUS + 1.5 * abs(t - (e + 1)))  # far apart they wait at the edges
            a.update(x=24 - side * off, y=24)
            b.update(x=24 + side * off, y=24)
        frames.append([o for o in (a, b) if o is not None])  # draw list of frame t
    options = ["it appears", f"it turns {new_colour}", "it stops", f"it meets the {other_colour} {other_shape}"]
    answer_text = options[EVENTS.index(event)]
    rng.shuffle(options)  # the answer's letter is uniform over A-D
    choices = [f"{'ABCD'[i]}. {o}" for i, o in enumerate(options)]
    return frames, dict(question=f"What happens to the {colour} {shape}?", choices=choices,
                        answer=choices[options.index(answer_text)],  # support: the 4 frames that show the event
                        support_times=[round(f / FPS, 4) for f in range(e, e + 4)], event=event, colour=colour)

def write_clip(path, frames):
    w = cv2.VideoWriter(os.fsencode(path), cv2.VideoWriter_fourcc(*"mp4v"), FPS, (SIDE, SIDE))  # MPEG-4 part 2, lossy
    for objs in frames:
        img = np.full((SIDE, SIDE, 3), 128, np.uint8)  # grey background
        for o in objs:  # filled shapes, at integer pixels as OpenCV draws
            x, y, r, bgr = int(round(o["x"])), int(round(o["y"])), RADIUS, COLOURS[o["colour"]]
            if o["shape"] == "circle":
                cv2.circle(img, (x, y), r, bgr, -1)
            elif o["shape"] == "square":
                cv2.rectangle(img, (x - r + 1, y - r + 1), (x + r - 1, y + r - 1), bgr, -1)
            else:
                cv2.fillConvexPoly(img, np.array([[x, y - r], [x - r, y + r - 1], [x + r, y + r - 1]], np.int32), bgr)
        w.write(img)
    w.release()

def build_world(cfg):  # write train/val/test/novel clips + annotation JSON under data_dir (skipped when complete)
    sizes = dict(train=cfg.n_train, val=cfg.n_val, test=cfg.n_test, novel=cfg.n_novel, version=2)
    stamp = os.path.join(cfg.data_dir, "world.json")  # the sizes the folder was built with
    if os.path.isfile(stamp) and read_json(stamp, "delete it to write the world again") == sizes:
        return
    if not writable(cfg.data_dir, "world.json", lambda m: set(m) == set(sizes)):
        raise UserError(f"--data_dir {cfg.data_dir}: a file, a folder this script did not write (no world.json of its "
                        f"own), or no folder can be made there; give a new folder, or your files as --data FILE.json")
    os.makedirs(cfg.data_dir, exist_ok=True)
    json.dump(dict(sizes, version=0), open(stamp, "w"))  # version 0: a build under way (cut short, it is redone)
    for si, (split, n) in enumerate(list(sizes.items())[:4]):
        rng, anns = random.Random(1000 * si + 7), []  # rng fixed per split: the same world on every machine
        os.makedirs(os.path.join(cfg.data_dir, split), exist_ok=True)
        for i in range(n):
            (frames, ann), rel = sample_event(rng, split), os.path.join(split, f"{i:05d}.mp4")
            write_clip(os.path.join(cfg.data_dir, rel), frames)
            anns.append({"video": rel, **ann})
        json.dump(anns, open(os.path.join(cfg.data_dir, f"{split}.json"), "w"), indent=0)
    atomic(stamp, lambda p: json.dump(sizes, open(p, "w")))  # complete

def sample_indices(n_total, n_frames):  # uniform: the centre of each of n_frames equal bins; short clips repeat ones
    return [min(n_total - 1, int((i + 0.5) * n_total / n_frames)) for i in range(n_frames)]

def preprocess(img, crop):  # transformers' VJEPA2VideoProcessor on a uint8 (H, W, 3) frame, all but normalize()
    (h, w), short = img.shape[:2], int(crop * 256 / 224)  # resize to 8/7 of the crop, then cut the centre (ImageNet)
    nh, nw = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)  # keep the aspect ratio
    if (nh, nw) != (h, w):  # torchvision's uint8 resize is this call; antialias widens the kernel on a shrink (as PIL)
        x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)[None]  # (1, 3, H, W) uint8
        x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)  # (1, 3, nh, nw)
        img = x[0].permute(1, 2, 0).numpy()  # (nh, nw, 3) uint8
    top, left = int((nh - crop) / 2), int((nw - crop) / 2)  # transformers' centre crop truncates (torchvision rounds)
    return img[top:top + crop, left:left + crop]  # (crop, crop, 3)

def read_frame(path):  # a frame image -> BGR uint8 (H, W, 3); libjpeg fills a cut-off JPEG with grey, silently
    data, i = open(path, "rb").read(), 2  # i -> the scan (FF DA), past any EXIF thumbnail's own FF D9
    while data[:2] == b"\xff\xd8" and i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] != 0xDA:
        i += 1 if data[i + 1] == 0xFF else 2 + int.from_bytes(data[i + 2:i + 4], "big")  # FF FF: a fill byte
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[i:] or data[:4] == b"\x89PNG" and b"IEND" not in data:
        raise UserError(f"{path}: this image is cut off (no end-of-image marker); re-export or re-copy it")
    try:  # os.fsencode: OpenCV gets the name's bytes (a name that is not UTF-8, from an old zip, crashes it as a str)
        img = cv2.imread(os.fsencode(path), cv2.IMREAD_UNCHANGED)  # alpha kept, if any
    except cv2.error as e:  # OpenCV raises for an image over its size limit (and returns None for one it cannot read)
        raise UserError(f"{path}: OpenCV cannot decode this image ({e.err}; it reads at most 2^30 pixels)") from None
    if img is None:  # damaged, or not an image at all
        raise UserError(f"{path}: OpenCV cannot decode this image; check the file")
    if img.ndim != 3 or img.shape[2] != 4 or img.dtype not in (np.uint8, np.uint16):
        return cv2.imread(os.fsencode(path))  # no alpha: OpenCV's 8-bit BGR
    img = (img >> 8 * (img.dtype == np.uint16)).astype(np.int32)  # BGRA onto white, as transformers' convert_to_rgb
    return ((img[:, :, :3] * img[:, :, 3:] + 255 * (255 - img[:, :, 3:]) + 127) // 255).astype(np.uint8)

def load_video(path, n_frames, crop):
    """A video (any container OpenCV reads) or a frame folder -> uint8 (F, crop, crop, 3) RGB, times (F,), duration."""
    fps, exts, ts = float(FPS), (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff"), []  # a folder plays at FPS
    if os.path.isdir(path):  # frames in natural order: f2 before f10
        names = sorted((n for n in os.listdir(path) if n.lower().endswith(exts) and not n.startswith(".")
                        and os.path.isfile(f"{path}/{n}")),  # not frames: a folder x.png, a hidden ._x.png
                       key=lambda n: [int(t) if t.isdecimal() else t for t in re.split(r"(\d+)", n)])
        n, read = len(names), lambda want: ((i, read_frame(os.path.join(path, names[i]))) for i in sorted(want))
    elif os.path.isfile(path):
        cap = cv2.VideoCapture(os.fsencode(path))
        if cap.get(cv2.CAP_PROP_FOURCC) == cv2.VideoWriter_fourcc(*"ansi"):  # FFmpeg plays a text file as a video
            raise UserError(f"{path}: a text file, not a video")
        fps = cap.get(cv2.CAP_PROP_FPS) if 0 < cap.get(cv2.CAP_PROP_FPS) < 1000 else FPS  # none or nonsense: FPS
        while cap.grab():  # pass 1, no conversion: the frame count (a header's can be wrong) and each frame's time
            ts.append(cap.get(cv2.CAP_PROP_POS_MSEC) / 1000)  # its time stamp, in s: a phone's frame rate varies
        if (n := len(ts)) < 0.9 * (listed := int(cap.get(cv2.CAP_PROP_FRAME_COUNT))):  # cut off: its first part decodes
            raise UserError(f"{path}: only {n} of the {listed} frames in its header decode (cut off or damaged)")
        def read(want):  # pass 2: grab() decodes every frame, retrieve() converts the sampled ones (never a whole clip)
            cap = cv2.VideoCapture(os.fsencode(path))
            return ((i, cap.retrieve()[1]) for i in range(max(want) + 1) if cap.grab() and i in want)
    else:
        raise UserError(f"{path}: video not found" + " (use / in paths)" * ("\\" in path.replace(os.sep, "/")))
    if n == 0:
        raise UserError(f"{path}: no frames (an empty, corrupt or unsupported video, or no {'/'.join(exts)} images)")
    idx = sample_indices(n, n_frames)  # F indices into the clip's n frames (n > 0)
    frames = {i: img for i, img in read(set(idx)) if img is not None}  # BGR (H, W, 3) uint8, by frame index
    if len(frames) < len(set(idx)):
        raise UserError(f"{path}: frame {min(set(idx) - set(frames))} could not be read; check the file")
    times = np.array(ts)[idx] if ts and np.all(np.diff(ts) > 0) else np.array(idx, np.float64) / fps  # or i / fps
    return np.stack([preprocess(frames[i], crop)[:, :, ::-1] for i in idx]), times, n / fps  # (F, S, S, 3) RGB

MEAN, STD = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])  # V-JEPA 2 (ImageNet)
def normalize(clips):  # uint8 (B, F, S, S, 3) -> float (B, F, 3, S, S) as HF's pixel_values_videos, one op
    x = clips.permute(0, 1, 4, 2, 3).float()  # (B, F, 3, S, S), still 0..255
    return (x - MEAN.view(1, 1, 3, 1, 1) * 255) / (STD.view(1, 1, 3, 1, 1) * 255)

def read_annotations(path, fix=""):  # user JSON list, validated; errors name the entry (`fix`: what to do instead)
    items = read_json(path, fix or "pass an annotation file in the README's format (a JSON list of entries)", list)
    out, base = [], os.path.dirname(os.path.abspath(path))  # video paths are relative to the file
    for i, it in enumerate(items):
        where, keys = f"{path} entry {i + 1}", ("video", "question", "answer")
        if not isinstance(it, dict) or not all(isinstance(it.get(k), str) and it[k].strip() for k in keys):
            raise UserError(f"{where}: needs keys video, question, answer (text), choices (support_times optional)")
        check_choices(it.get("choices"), where)
        if it["answer"] not in it["choices"]:
            raise UserError(f"{where}: answer {it['answer']!r} is not one of the choices")
        if "support_times" not in it and (k := next((k for k in it if re.match(r"(?i)sup+ort", k)), None)):
            raise UserError(f"{where}: key {k!r} is not read; give the supporting seconds as support_times")
        st = it.get("support_times", [])
        if not isinstance(st, list) or not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in st):
            raise UserError(f"{where}: support_times must be a list of seconds")
        out.append({**it, "video": os.path.join(base, it["video"]), "support_times": st, "where": where})
    return out  # (os.path.join keeps an absolute video path as it is)

def check_choices(choices, where):
    if not isinstance(choices, list) or not 2 <= len(choices) <= 26 or any(not isinstance(c, str) for c in choices):
        raise UserError(f"{where}: needs 2 to 26 choices, strings like 'A. ...' (in a file: a JSON list)")
    for k, c in enumerate(choices):  # the k-th choice starts with the k-th letter
        if not re.match(rf"{chr(65 + k)}\. \S", c):
            raise UserError(f"{where}: choice {c!r} is not in the form '{chr(65 + k)}. text' (A, B, C, ... in order)")

def frame_labels(support_times, times, duration, where):  # 1 at the frame nearest each support time, else 0
    lab = np.zeros(len(times), np.float32)
    for t in support_times:
        if not 0 <= t <= duration:
            raise UserError(f"{where}: support time {t}s is outside the clip (0..{duration:.2f}s)")
        lab[times == times[np.argmin(np.abs(times - t))]] = 1  # the Mark-1 project's rule; every slot of that frame
    return lab

def load_split(entries, cfg):  # -> uint8 clips (N, F, S, S, 3), frame labels, times (N, F), durations (N,)
    def row(e):  # one entry -> (clip, frame labels, frame times, duration)
        try:  # a video that cannot be read names its entry too, as the annotation checks do
            clip, t, dur = load_video(e["video"], cfg.n_frames, cfg.crop)
        except UserError as err:
            raise UserError(f"{e['where']}: {err}") from None
        return clip, frame_labels(e["support_times"], t, dur, e["where"]), t, dur
    clips, labs, times, durs = map(np.stack, zip(*map(row, entries)))
    return dict(clips=torch.from_numpy(clips), labels=torch.from_numpy(labs), times=times, durations=durs)

class GPT2Tokenizer:  # GPT-2 (tiktoken) over the table `ids`: <|endoftext|>, <unk>, the ids seen in training (or all)
    chat, ask, reply = "{}", "\nAnswer:", " {}"  # the prompt, its line after the options, the answer (GPT-2: " word")
    def __init__(self, ids=None):
        try:  # GPT-2's two files: downloaded once, or read from TIKTOKEN_CACHE_DIR
            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # offline with no cached files: say how to fix it, no traceback
            raise UserError(f"tiktoken could not load the GPT-2 encoding ({type(e).__name__}); offline, point "
                            f"TIKTOKEN_CACHE_DIR at a copy of its cache folder (two hash-named files)") from None
        self.ids = ids if ids is not None else list(range(self.enc.n_vocab))
        self.index = {g: i for i, g in enumerate(self.ids)}
        self.eos, self.unk = self.index[self.enc.eot_token], self.index.get(-1, 0)  # -1 (no GPT-2 id): <unk>
    @staticmethod
    def build(texts, compact):  # the compact table of the ids in `texts`, or the full one
        full = GPT2Tokenizer()  # all 50257 GPT-2 ids
        seen = sorted({t for s in texts for t in full.enc.encode_ordinary(s)})
        return GPT2Tokenizer([full.enc.eot_token, -1] + seen) if compact else full
    def encode(self, s):  # user text is plain text: "<|endoftext|>" typed in a question is its characters
        return [self.index.get(t, self.unk) for t in self.enc.encode_ordinary(s)]
    def decode(self, ids):
        return self.enc.decode([self.ids[i] for i in ids if i != self.eos and self.ids[i] >= 0])
    def prompt(self, q, choices):
        return self.encode(self.chat.format(q + "\n" + "\n".join(choices) + self.ask))
    def target(self, answer):
        return self.encode(self.reply.format(answer)) + [self.eos]

QWEN_PAT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
            r"|\s+(?!\S)|\s+")
class QwenTokenizer(GPT2Tokenizer):  # Qwen3's tokenizer.json as a tiktoken.Encoding; GPT-2's prompt() and target()
    """Byte-level BPE: ranks = vocabulary ids, in merge order (rank-greedy merging is the merge list); no BOS."""
    chat = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"  # one turn, no thinking
    ask, reply = "\nAnswer with the option's letter and text.", "{}"
    def __init__(self, path):
        j = read_json(path, "the Qwen3 checkpoint folder needs its tokenizer.json")
        if j.get("model", {}).get("type") != "BPE":
            raise UserError(f"{path}: not a byte-level BPE tokenizer (Qwen3's tokenizer.json expected)")
        bs = [b for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255]  # GPT-2: printable bytes
        rest = [b for b in range(256) if b not in bs]  # are themselves, the other 68 chr(256), chr(257), ... in order
        dec = dict(zip(map(chr, bs + [256 + n for n in range(len(rest))]), bs + rest))  # (bytes_to_unicode, inverted)
        ranks = {bytes(dec[c] for c in tok): i for tok, i in j["model"]["vocab"].items()}  # vocabulary text -> bytes
        specials = {t["content"]: t["id"] for t in j.get("added_tokens", [])}
        pre = j.get("pre_tokenizer") or {}  # the file's own split regex where it has one, else Qwen3's
        pat = next((p["pattern"]["Regex"] for p in pre.get("pretokenizers", [pre])
                    if p.get("type") == "Split" and "Regex" in p.get("pattern", {})), QWEN_PAT)
        self.enc = tiktoken.Encoding("qwen3", pat_str=pat, mergeable_ranks=ranks, special_tokens=specials)
        self.eos, self.ids = specials.get("<|im_end|>", specials.get("<|endoftext|>")), None  # ids: full table
    def encode(self, s):
        return self.enc.encode(unicodedata.normalize("NFC", s), allowed_special="all")
    def decode(self, ids):  # ids past the tokenizer (the embedding has spare rows) decode to nothing, as in HF
        return self.enc.decode([i for i in ids if i != self.eos and i < self.enc.n_vocab])

# Model: V-JEPA 2 encoder, Qwen3 LLM, bridge ---------------------------------------------------------------------------
class VJEPA2Attention(nn.Module):  # non-causal, separate q/k/v/proj, V-JEPA 2's 3D RoPE (as transformers')
    def __init__(self, d, n_head, grid):
        super().__init__()
        self.n_head, self.hd, self.grid = n_head, d // n_head, grid  # grid = crop // patch, from the config
        self.query, self.key, self.value, self.proj = (nn.Linear(d, d) for _ in range(4))  # q/k/v, output: with biases
        self.sub = 2 * ((self.hd // 3) // 2)  # rotated dims per axis (20 for head dim 64); the rest pass through
    @staticmethod
    def rotate(x, pos):
        """The upstream rotation, kept exactly: frequencies tiled (cat(f, f)) but partners interleaved (-x1, x0, ...),
        angles built in the activation dtype. x (B, H, P, n), pos (P,)."""
        n = x.shape[-1]  # the rotated width of one axis (self.sub)
        omega = 1.0 / 10000 ** (torch.arange(n // 2, dtype=x.dtype, device=x.device) / (n / 2.0))  # (n/2,)
        angle = (pos.unsqueeze(-1) * omega).repeat(1, 2)  # (P, n): tiled, dim i turns at omega[i mod n/2]
        y = x.unflatten(-1, (-1, 2))  # (B, H, P, n/2, 2)
        y = torch.stack((-y[..., 1], y[..., 0]), dim=-1).flatten(-2)  # (B, H, P, n)
        return x * angle.cos() + y * angle.sin()  # pair (2j, 2j+1) gets two different angles: not a rotation
    def rope(self, x):  # (B, H, P, E): E split over the axes (t, h, w), so attention sees the 3-D layout, not 1-D order
        P, g, s = x.shape[2], self.grid, self.sub  # P tokens, G grid side, s dims per axis
        i = torch.arange(P, device=x.device)  # token index in (t, h, w) raster order
        t, h, w = i // (g * g), (i % (g * g)) // g, i % g  # positions from the config grid, not the input size
        parts = [self.rotate(x[..., k * s:(k + 1) * s], pos) for k, pos in enumerate((t, h, w))]  # 3 x (B, H, P, s)
        return torch.cat(parts + [x[..., 3 * s:]], dim=-1)  # the E - 3s leftover dims are not rotated (4 for E=64)
    def forward(self, x):
        B, P, D = x.shape  # (B, P, Dv)
        q, k, v = (m(x).view(B, P, self.n_head, self.hd).transpose(1, 2) for m in (self.query, self.key, self.value))
        q, k = self.rope(q), self.rope(k)  # (B, H, P, E)
        y = F.scaled_dot_product_attention(q, k, v)  # scale E^-0.5, no mask
        return self.proj(y.transpose(1, 2).reshape(B, P, D))  # (B, H, P, E) -> (B, P, H*E)

class VJEPA2Layer(nn.Module):
    def __init__(self, d, n_head, mlp_ratio, grid, eps):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=eps), nn.LayerNorm(d, eps=eps)  # pre-LN block (ViT)
        self.attention = VJEPA2Attention(d, n_head, grid)
        h = int(d * mlp_ratio)  # hidden width (4x here, 48/11 in ViT-g); exact (erf) GELU; keys mlp.fc1, mlp.fc2
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(d, h), act=nn.GELU(), fc2=nn.Linear(h, d)))
    def forward(self, x):
        x = x + self.attention(self.norm1(x))  # residual around attention
        return x + self.mlp(self.norm2(x))  # residual around the MLP

class VJEPA2Encoder(nn.Module):  # module names as in the HF checkpoint, its `encoder.` prefix stripped
    def __init__(self, c, eps=1e-6):  # sizes from a Config: v_* and crop
        super().__init__()
        self.width, self.patch, self.tubelet, self.crop = c.v_width, c.v_patch, c.v_tubelet, c.crop  # read by Mark1
        cube = (c.v_tubelet, c.v_patch, c.v_patch)  # a tubelet of frames x p x p -> 1 token: fewer tokens, motion in
        proj = nn.Conv3d(3, c.v_width, kernel_size=cube, stride=cube)  # cubes side by side, no overlap
        self.embeddings = nn.ModuleDict(dict(patch_embeddings=nn.ModuleDict(dict(proj=proj))))  # the checkpoint's keys
        self.layer = nn.ModuleList(VJEPA2Layer(c.v_width, c.v_heads, c.v_mlp_ratio, c.crop // c.v_patch, eps)
                                   for _ in range(c.v_layers))
        self.layernorm = nn.LayerNorm(c.v_width, eps=eps)  # final norm: its output is the feature Mark 1 uses
    def forward(self, video):  # (B, F, 3, S, S) normalised -> (B, P, Dv), == HF get_vision_features
        x = video.permute(0, 2, 1, 3, 4)  # (B, 3, F, S, S)
        if x.shape[2] < self.tubelet:  # fewer frames than a tubelet (one image): the clip repeated, as transformers
            x = x.repeat(1, 1, self.tubelet, 1, 1)
        proj = self.embeddings.patch_embeddings.proj
        x = proj(x.to(proj.weight.dtype))  # (B, Dv, T, G, G) in the tower's dtype; an odd F drops the last frame
        x = x.flatten(2).transpose(1, 2).contiguous()  # (B, P, Dv), t-h-w order; contiguous once, not a copy per layer
        for blk in self.layer:
            x = blk(x)  # (B, P, Dv)
        return self.layernorm(x)

class RMSNorm(nn.Module):
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))  # a gain, no bias, no mean subtraction
    def forward(self, x):
        h = x.float()  # the statistic in float32 even for bfloat16 activations
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)  # HF order: normalise in fp32, cast back, then scale

def rope_cos_sin(pos, dim, theta, dtype):  # rotate_half RoPE: pos (B, L) -> cos, sin (B, 1, L, E) in dtype
    inv = 1.0 / theta ** (torch.arange(0, dim, 2, device=pos.device, dtype=torch.float) / dim)  # (E/2,)
    emb = (pos.float()[..., None] * inv).repeat(1, 1, 2)[:, None]  # (B, 1, L, E): the E/2 angles twice (rotate_half)
    return emb.cos().to(dtype), emb.sin().to(dtype)

def apply_rope(x, cos, sin):  # x (B, H, L, E): pair (i, i + E/2) turned by pos * freq_i, so q.k sees only offsets
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, H, L, E/2)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin  # (B, H, L, E)

class Qwen3Attention(nn.Module):
    def __init__(self, d, n_head, n_kv, hd, eps):
        super().__init__()
        self.n_head, self.n_kv, self.hd = n_head, n_kv, hd  # GQA: n_kv k/v heads shared by the q heads: a smaller cache
        self.q_proj, self.o_proj = nn.Linear(d, n_head * hd, bias=False), nn.Linear(n_head * hd, d, bias=False)
        self.k_proj, self.v_proj = nn.Linear(d, n_kv * hd, bias=False), nn.Linear(d, n_kv * hd, bias=False)  # K heads
        self.q_norm, self.k_norm = RMSNorm(hd, eps), RMSNorm(hd, eps)  # QK-norm per head: bounded q.k, stabler training
    def forward(self, x, cos, sin, mask, cache=None):
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, L, self.n_head, self.hd)).transpose(1, 2)  # (B, H, L, E)
        k = self.k_norm(self.k_proj(x).view(B, L, self.n_kv, self.hd)).transpose(1, 2)  # (B, K, L, E)
        v = self.v_proj(x).view(B, L, self.n_kv, self.hd).transpose(1, 2)  # (B, K, L, E)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # normed first: a gain after RoPE breaks relative q.k
        if cache is not None:  # a dict per layer: the keys/values of every earlier position, then these
            cache["k"] = k = torch.cat((cache["k"], k), 2) if "k" in cache else k  # (B, K, past + L, E)
            cache["v"] = v = torch.cat((cache["v"], v), 2) if "v" in cache else v
        rep = self.n_head // self.n_kv  # kv head j serves q heads rep*j .. rep*j+rep-1
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)  # (B, H, Lk, E)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and L > 1)  # (B, H, L, E)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, self.n_head * self.hd))  # (B, L, H*E) -> (B, L, D)

class Qwen3MLP(nn.Module):
    def __init__(self, d, inter):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, inter, bias=False), nn.Linear(d, inter, bias=False)
        self.down_proj = nn.Linear(inter, d, bias=False)  # no biases anywhere in Qwen3
    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU

class Qwen3Layer(nn.Module):
    def __init__(self, d, n_head, n_kv, hd, inter, eps):
        super().__init__()
        self.self_attn, self.mlp = Qwen3Attention(d, n_head, n_kv, hd, eps), Qwen3MLP(d, inter)
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d, eps), RMSNorm(d, eps)  # pre-norm block
    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)  # (B, L, D)
        return x + self.mlp(self.post_attention_layernorm(x))

class Qwen3LM(nn.Module):  # Qwen3ForCausalLM, with the checkpoint's names (model.*, lm_head)
    def __init__(self, vocab, c, eps=1e-6):  # sizes from a Config: l_*, rope_theta, tie_embeddings
        super().__init__()
        d, self.hd, self.theta, self.tie = c.l_width, c.l_head_dim, c.rope_theta, c.tie_embeddings
        self.model = nn.Module()  # the body (the checkpoint's `model.` key prefix)
        self.model.embed_tokens = nn.Embedding(vocab, d)  # (V, D); also the lm_head when tied
        self.model.layers = nn.ModuleList(Qwen3Layer(d, c.l_heads, c.l_kv_heads, self.hd, c.l_inter, eps)
                                          for _ in range(c.l_layers))
        self.model.norm = RMSNorm(d, eps)  # the final norm before lm_head
        self.lm_head = nn.Linear(d, vocab, bias=False)  # (V, D)
        if self.tie:  # tied head (small Qwen3s): the output matrix IS the input embedding, one Parameter
            self.lm_head.weight = self.model.embed_tokens.weight
    def forward(self, x, pos=None, valid=None, cache=None, last_only=False, head=True):
        """x (B, L, D) embeddings; pos (B, L) (default arange); valid (B, Lk = cached + L) False at padded keys; cache
        a list of per-layer dicts. -> logits (B, L or 1, V), or (head=False) the normed hidden states (B, L or 1, D)."""
        (B, L, _), past = x.shape, cache[0]["k"].shape[2] if cache and "k" in cache[0] else 0  # past: cached keys
        ki = torch.arange(past + L, device=x.device)  # (Lk,) key slots: the `past` cached ones, then the L new ones
        qi = ki[past:, None]  # (L, 1) the new queries' slots: (ki <= qi) is the causal (L, Lk) mask
        cos, sin = rope_cos_sin(ki[past:].expand(B, L) if pos is None else pos, self.hd, self.theta, x.dtype)
        mask = None  # no padding, no cache: SDPA's own causal mask
        if valid is not None:  # causal AND key not padding; a query always sees itself, so pad rows stay finite
            mask = (((ki <= qi)[None] & valid[:, None, :]) | (ki == qi)[None])[:, None]  # (B, 1, L, Lk)
        elif past:  # decoding with a cache: new query i sees every cached key and new keys up to itself
            mask = (ki <= qi)[None, None]  # (1, 1, L, Lk)
        for i, blk in enumerate(self.model.layers):
            x = blk(x, cos, sin, mask, cache[i] if cache is not None else None)  # (B, L, D)
        x = self.model.norm(x[:, -1:] if last_only else x)  # generation needs the last position only
        return self.lm_head(x) if head else x

class CrossAttention(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head  # H heads of width E = D / H
        self.q, self.kv, self.out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)  # keys+values in one matmul
    def forward(self, x, ctx, key_valid=None):  # x (B, Lq, D) queries, ctx (B, Lk, D), key_valid (B, Lk) bool
        B, Lq, D = x.shape
        H, E = self.n_head, D // self.n_head  # heads, head width
        q = self.q(x).view(B, Lq, H, E).transpose(1, 2)  # (B, H, Lq, E)
        k, v = self.kv(ctx).view(B, -1, 2, H, E).permute(2, 0, 3, 1, 4)  # (B, Lk, 2, H, E) -> 2 x (B, H, Lk, E)
        mask = key_valid[:, None, None, :] if key_valid is not None else None  # (B, 1, 1, Lk)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, H, Lq, E)
        return self.out(y.transpose(1, 2).reshape(B, Lq, D))  # (B, Lq, H*E)

class BertLayer(nn.Module):  # BERT's encoder layer: post-LayerNorm, GELU, padding mask
    def __init__(self, d, n_head, inter):
        super().__init__()
        self.attn = CrossAttention(d, n_head)  # self-attention = cross-attention to itself
        self.ln1, self.ln2 = nn.LayerNorm(d, eps=1e-12), nn.LayerNorm(d, eps=1e-12)
        self.fc1, self.fc2 = nn.Linear(d, inter), nn.Linear(inter, d)  # the feed-forward, inter wide
    def forward(self, x, valid):  # x (B, L, D), valid (B, L) False at padding
        x = self.ln1(x + self.attn(x, x, valid))  # post-LN: normalise after the residual sum
        return self.ln2(x + self.fc2(F.gelu(self.fc1(x))))

class Bridge(nn.Module):
    """Trained in every mode. The V-JEPA 2 encoder adds no position embedding (RoPE only), and cross-attention is blind
    to token order, so the bridge adds learned per-tubelet and per-patch-position embeddings to the video tokens:
    without them the visual prefix and the "linear" frame head could not tell *when* anything happened."""
    def __init__(self, cfg, v_width, d, tubelet, grid):
        super().__init__()  # T = n_tubelet tubelets of `per` frames; a clip shorter than a tubelet is repeated: T = F
        n_tubelet, per = (cfg.n_frames, 1) if cfg.n_frames < tubelet else (cfg.n_frames // tubelet, tubelet)
        self.N, self.M, self.grid = cfg.n_visual_query, cfg.n_temporal_query, grid  # query counts, patch grid side
        self.proj = nn.Linear(v_width, d)  # video width Dv -> LLM width D
        self.time_emb = nn.Parameter(torch.zeros(n_tubelet, d))  # one per tubelet
        self.space_emb = nn.Parameter(torch.zeros(grid * grid, d))  # one per patch position
        self.queries = nn.Parameter(torch.randn(self.N + self.M, d) * 0.02)  # BLIP-2: P tokens -> N+M; visual first
        self.ln_v = nn.LayerNorm(d)  # the video tokens enter the cross-attention normalised
        # queries read the video in pre-LN cross-attention + MLP blocks (a Q-Former without query self-attention)
        mlp = lambda h: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, h), nn.GELU(), nn.Linear(h, d))  # pre-LN, h wide
        self.xattn = nn.ModuleList(CrossAttention(d, cfg.bridge_heads) for _ in range(cfg.bridge_layers))
        self.xmlp = nn.ModuleList(mlp(4 * d) for _ in range(cfg.bridge_layers))
        self.ln_q = nn.ModuleList(nn.LayerNorm(d) for _ in range(cfg.bridge_layers))  # pre-LN of the queries
        self.bert = BertLayer(d, cfg.bert_heads, cfg.bert_inter)  # queries and question tokens attend to each other
        self.head = nn.ModuleList(mlp(d) for _ in range(cfg.temporal_blocks))  # the temporal head's residual blocks
        self.frame_mode = cfg.frame_head  # "keys": each frame scored on its own video: follows the event, not a slot
        if cfg.frame_head == "linear":  # the Mark-1 project's: a fixed map from each query to F logits
            self.frame_out = nn.Linear(d, cfg.n_frames)
        else:
            self.frame_key = nn.Linear(d, per * d)  # a tubelet's feature -> `per` frame keys
            self.frame_bias = nn.Parameter(torch.zeros(cfg.n_frames))  # the per-frame prior
            last = n_tubelet * per - 1  # frame f -> key min(f, last) (tubelet f // per, its frame f % per)
            self.register_buffer("frame_to_key", torch.arange(cfg.n_frames).clamp(max=last), persistent=False)
        self.q_scale = nn.Parameter(torch.ones_like(self.queries))  # per-query output scale and shift, the identity
        self.q_shift = nn.Parameter(torch.zeros_like(self.queries))  # at first (set from data by Mark1.init_from_data)
    def forward(self, feats, q_emb, q_valid):
        """feats (B, P, Dv), question q_emb (B, Lq, D), q_valid (B, Lq) -> prefix (B, N, D), frame logits (B, F)."""
        v = self.video_tokens(feats)  # (B, P, D)
        x = self.read(v, q_emb, q_valid) * self.q_scale + self.q_shift  # (B, N+M, D)
        prefix, t = x[:, :self.N], x[:, self.N:]  # (B, N, D), (B, M, D)
        for blk in self.head:
            t = t + blk(t)  # residual MLP blocks
        return prefix, self.frame_logits(v, t)
    def frame_logits(self, v, t):
        """v (B, P, D) video tokens, t (B, M, D) temporal queries -> (B, F) support logits. Each tubelet pooled over
        space minus its clip mean (what changes) -> frame_key -> one key per frame; each query scores each key (scaled
        dot product), the best query wins, plus a per-frame bias. Mark-1's head (frame_head="linear"): Linear(D, F)."""
        if self.frame_mode == "linear":
            return self.frame_out(t).amax(1)  # (B, M, F) -> max over the M temporal queries -> (B, F)
        B, P, D = v.shape
        tube = v.reshape(B, P // (self.grid * self.grid), -1, D).mean(2)  # (B, T, G*G, D) -> space mean (B, T, D)
        k = self.frame_key(tube - tube.mean(1, keepdim=True)).reshape(B, -1, D)  # (B, T, per*D) -> (B, T*per, D)
        s = (t @ k.transpose(1, 2)).amax(1) / math.sqrt(D)  # (B, M, T*per) -> max over the M queries -> (B, T*per)
        return s[:, self.frame_to_key] + self.frame_bias  # (B, F)
    def video_tokens(self, feats):
        T = feats.shape[1] // (self.grid * self.grid)  # tubelets; P = T*G*G tokens in (t, h, w) order
        pos = (self.time_emb[:T, None, :] + self.space_emb[None, :, :]).flatten(0, 1)  # (T, G*G, D) -> (P, D)
        feats = feats.to(self.proj.weight.dtype)  # boundary 1: the encoder's dtype (bfloat16 files) -> the bridge's
        return self.ln_v(self.proj(feats) + pos)  # (B, P, D)
    def read(self, v, q_emb, q_valid):  # v (B, P, D) -> the N+M query rows after cross-attention and BERT
        q = self.queries.expand(v.shape[0], -1, -1)  # (B, N+M, D)
        for ln, att, mlp in zip(self.ln_q, self.xattn, self.xmlp):
            q = q + att(ln(q), v)
            q = q + mlp(q)
        x = torch.cat((q, q_emb.to(q.dtype)), 1)  # (B, N+M+Lq, D); no positions: the question is a bag of tokens
        valid = torch.cat((torch.ones(q.shape[:2], dtype=torch.bool, device=q.device), q_valid), 1)  # (B, N+M+Lq)
        return self.bert(x, valid)[:, :self.N + self.M]

class Mark1(nn.Module):  # vision -> bridge -> llm (--device_map may split them); loss = answer CE + lam * frame BCE
    def __init__(self, cfg, vocab, vision=None, llm=None):
        super().__init__()
        self.vision, self.llm = vision or VJEPA2Encoder(cfg), llm or Qwen3LM(vocab, cfg)  # from scratch: cfg's sizes
        d, grid = self.llm.model.embed_tokens.weight.shape[1], self.vision.crop // self.vision.patch
        self.bridge = Bridge(cfg, self.vision.width, d, self.vision.tubelet, grid)
        self.frozen, self.cfg, self.devices = set(), cfg, dict(vision="cpu", bridge="cpu", llm="cpu")
        self.scratch_vision = vision is None  # a checkpoint encoder keeps its HF input and its weights
        self.centre = cfg.centre_frames and self.scratch_vision
        for part in [p for p, loaded in (("vision", vision), ("llm", llm), ("bridge", None)) if loaded is None]:
            getattr(self, part).apply(self._init_weights)  # towers loaded from a checkpoint keep their weights
    @staticmethod
    def _init_weights(m):  # GPT-style init (std 0.02, zero biases); norms keep their identity init
        if isinstance(m, (nn.Linear, nn.Embedding, nn.Conv3d)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    def freeze(self, part):  # frozen for real: no grads, and an eval mode a later .train() cannot undo
        getattr(self, part).requires_grad_(False).eval()
        self.frozen.add(part)
    def train(self, mode=True):
        super().train(mode)
        for p in self.frozen:
            getattr(self, p).eval()
        return self
    def place(self, devices):  # {part: device}: the three parts may sit on different devices (--device_map)
        self.devices = devices
        for part, dev in devices.items():
            getattr(self, part).to(dev)
        return self
    def encode(self, clips):  # uint8 (B, F, S, S, 3) -> (B, P, Dv); frozen: nothing needs grad, so no graph is kept
        x = normalize(clips).to(self.devices["vision"], self.vision.layernorm.weight.dtype)  # the tower's dtype
        if self.centre:  # the faithful tower forward is untouched: this is the from-scratch input only
            x = x - x.mean((-2, -1), keepdim=True)
        return self.vision(x)
    @torch.no_grad()
    def init_from_data(self, clips, q_ids, q_valid):
        """Data-dependent init (Salimans & Kingma 2016). Every clip is mostly background, so at random init every clip
        embeds to nearly one vector and the LLM learns the answer prior without finding the video. One batch's
        per-feature mean/std, folded into the LayerNorms that end each stage (the scratch encoder's, the bridge's ln_v)
        and per query into the bridge's output scale/shift, give zero mean, unit variance across clips at step 0."""
        def fold(ln_w, ln_b, x, dims):
            m, s = x.float().mean(dims), x.float().std(dims, correction=0) + 1e-3  # (a batch of 1 is fine)
            ln_w.div_(s)
            ln_b.sub_(m).div_(s)
        if "vision" not in self.frozen and self.scratch_vision:
            fold(self.vision.layernorm.weight, self.vision.layernorm.bias, self.encode(clips), (0, 1))
        dev, b = self.devices["bridge"], self.bridge
        feats = self.encode(clips).to(dev)  # again: the fold above changed the encoder's output (and ln_v's below)
        fold(b.ln_v.weight, b.ln_v.bias, b.video_tokens(feats), (0, 1))
        q = b.read(b.video_tokens(feats), self.embed(q_ids).to(dev), q_valid.to(dev))  # (B, N+M, D)
        if q.shape[0] > 1:  # a spread across clips needs two clips
            fold(b.q_scale, b.q_shift, q, 0)
    def embed(self, ids):
        return self.llm.model.embed_tokens(ids.to(self.devices["llm"]))
    def fuse(self, feats, q_ids, q_valid):  # -> prefix (B, N, D) (the LLM's device), frame logits (B, F) (bridge's)
        dev = self.devices["bridge"]  # the question enters as the LLM's own embeddings of its tokens
        prefix, frame_logits = self.bridge(feats.to(dev), self.embed(q_ids).to(dev), q_valid.to(dev))
        return prefix.to(self.devices["llm"], self.llm.lm_head.weight.dtype), frame_logits  # boundary 2: the LLM's
    def forward(self, feats, q_ids, q_valid, inp, tgt=None, labels=None, n_tok=None, n_clip=None):
        """inp/tgt (B, L): right-padded prompt+answer tokens and next-token targets (-100 on prompt and pad).
        -> (logits, loss, frame logits (B, F)); logits (B, L, V) without tgt, else (A, V) at the A answer positions
        only (lm_head, V x D, is the largest product at Qwen3 scale). Loss sums are divided by n_tok answer tokens and
        n_clip clips: this batch's by default; training passes the global batch's, so any split adds up to its mean."""
        prefix, frame_logits = self.fuse(feats, q_ids, q_valid)
        x = torch.cat((prefix, self.embed(inp).to(prefix.dtype)), 1)  # (B, N+L, D)
        h = self.llm(x, head=False)[:, prefix.shape[1]:]  # (B, L, D); causal mask: right padding needs no mask
        if tgt is None:
            return self.llm.lm_head(h), None, frame_logits
        keep = tgt.to(h.device) != -100  # (B, L) the answer tokens, the only positions the loss reads
        logits = self.llm.lm_head(h[keep])  # (A, V)
        ce = F.cross_entropy(logits.float(), tgt.to(h.device)[keep], reduction="sum") / (n_tok or int(keep.sum()))
        pw = torch.tensor(self.cfg.pos_weight, device=frame_logits.device)
        lab = labels.to(frame_logits.device)  # (B, F); a clip without support_times (all 0) gets no frame loss
        bce = F.binary_cross_entropy_with_logits(frame_logits.float(), lab, weight=lab.amax(1, keepdim=True),
                                                 pos_weight=pw, reduction="sum") / ((n_clip or len(lab)) * lab.shape[1])
        self.parts = (ce.item(), bce.item())  # for the log line
        return logits, ce + self.cfg.lam * bce.to(ce.device), frame_logits

# Checkpoint I/O: own format (out_dir/model.safetensors + config.json + train_state.pt) and the HF loaders -------------
def atomic(path, write):
    write(path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash never leaves a half-written file

PLAIN = {  # the settings each tower implements, as transformers defaults them (a true/false one read as a bool)
    "vjepa2": ("gelu with q/k/v biases (V-JEPA 2's)", dict(hidden_act="gelu", qkv_bias=True)),
    "qwen3": ("plain Qwen3 (default RoPE, full attention, SiLU, no attention bias)", {"hidden_act": "silu",
              "attention_bias": False, "use_sliding_window": False, "rope_scaling": None,  # YaRN, linear, ...
              "rope_parameters.rope_type": "default"})}
def read_hf_dir(path, want):  # -> (config dict, {tensor key: file}, Config fields) of an HF folder, shards too
    fix = "pass a complete Hugging Face checkpoint folder (download it again if damaged)"
    if not os.path.isdir(path):
        raise UserError(f"{path}: no such folder; pass {'--vision_ckpt' if want == 'vjepa2' else '--llm_ckpt'} DIR")
    conf = read_json(os.path.join(path, "config.json"), fix)
    if conf.get("model_type") != want:
        raise UserError(f"{path}: checkpoint is model_type {conf.get('model_type')!r}, expected {want!r}")
    sizes = ("hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim", "intermediate_size", "vocab_size",
             "patch_size", "tubelet_size", "crop_size", "mlp_ratio", "layer_norm_eps", "rms_norm_eps")  # null: refused
    sizes += tuple(k for k in ("num_key_value_heads", "rope_theta") if conf.get(k) is not None)  # null: a default
    whole = lambda k: not k.endswith(("ratio", "eps", "theta"))  # a count or size: 96.0 is refused too
    if bad := [k for k in sizes if k in conf and not (type(conf[k]) in (int, float)[:2 - whole(k)] and conf[k] > 0)]:
        raise UserError(f"{path}: config.json sets {bad[0]} to {conf[bad[0]]!r}, not a positive "
                        f"{'whole ' * whole(bad[0])}number; {fix}")
    rope = conf.get("rope_parameters") or {}  # transformers 5 keeps rope_theta there
    if not (isinstance(rope, dict) and type(theta := rope.get("rope_theta", 1.0)) in (int, float) and theta > 0):
        raise UserError(f"{path}: config.json's rope_parameters {rope!r}: not an object with a positive rope_theta")
    what, plain = PLAIN[want]
    sets = {**conf, "rope_parameters.rope_type": rope.get("rope_type", "default")}  # the settings PLAIN names
    if bad := [k for k, v in plain.items() if (bool(sets.get(k, v)) if type(v) is bool else sets.get(k, v)) != v]:
        raise UserError(f"{path}: config.json sets {bad[0]} {sets[bad[0]]!r}; only {what} is implemented")
    idx = os.path.join(path, "model.safetensors.index.json")  # shards: {"weight_map": {tensor key: file name}}
    wm = read_json(idx, fix).get("weight_map") if os.path.isfile(idx) else {"": "model.safetensors"}
    if not isinstance(wm, dict):
        raise UserError(f"{idx}: no weight_map (tensor key -> shard file); {fix}")
    keys = {}
    for f in sorted(set(map(str, wm.values()))):
        try:
            with safe_open(os.path.join(path, f), "pt") as h:
                keys.update(dict.fromkeys(h.keys(), f))
        except Exception as e:  # missing, truncated, not safetensors at all
            raise UserError(f"{os.path.join(path, f)}: unreadable safetensors file ({e})")
    (h, hf), (w, wf) = ((("num_attention_heads", "v_heads"), ("hidden_size", "v_width")) if want == "vjepa2" else
                        (("num_key_value_heads", "l_kv_heads"), ("num_attention_heads", "l_heads")))
    if (f := hf_fields(want, conf, keys))[wf] % f[hf]:  # headers only so far
        raise UserError(f"{path}: config.json's {h} {f[hf]} does not divide its {w} {f[wf]} (split evenly)")
    return conf, keys, f

def check_fit(where, want, have):  # {key: shape} of model, file -> one line: every missing, extra, mis-shaped key
    missing, unexpected = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    shaped = sorted(f"{k} {list(s)} (model {list(want[k])})" for k, s in have.items()
                    if k in want and list(s) != list(want[k]))
    if missing or unexpected or shaped:
        raise UserError(f"{where}: does not fit: missing {missing}, unexpected {unexpected}, mis-shaped {shaped}")

def assign_strict(module, path, keys, mapping, dtype=None, device="cpu"):
    """mapping: file key -> module key (None: ignored). Every key is checked from the headers before any read."""
    want = {k: v.shape for k, v in module.named_parameters()}  # a tied lm_head is the embedding: listed once
    plan = {fk: mapping(fk) for fk in keys if mapping(fk) is not None}  # file key -> module key
    handles = {f: safe_open(os.path.join(path, f), "pt") for f in set(keys.values())}  # headers only, lazily
    check_fit(path, want, {mk: handles[keys[fk]].get_slice(fk).get_shape() for fk, mk in plan.items()})
    read = ((mk, handles[keys[fk]].get_tensor(fk)) for fk, mk in plan.items())  # all checks passed: one at a time
    # dtype None keeps each file's dtype, but float16, which cannot mix with bfloat16 autocast, is read as float32
    state = {k: t.to(device, dtype or (torch.float32 if t.dtype == torch.float16 else t.dtype)) for k, t in read}
    module.load_state_dict(state, strict=False, assign=True)  # strict=False: a tied lm_head has no tensor of its own
    if getattr(module, "tie", False):
        module.lm_head.weight = module.model.embed_tokens.weight  # assign=True replaced the Parameter: tie again
    return module

def hf_fields(want, conf, keys):  # config.json, tensor keys -> the Config fields they set, as transformers reads them
    if want == "vjepa2":  # V-JEPA 2's defaults where a key is absent
        return dict(v_width=conf.get("hidden_size", 1024), v_layers=conf.get("num_hidden_layers", 24),
                    v_heads=conf.get("num_attention_heads", 16), v_patch=conf.get("patch_size", 16),
                    v_tubelet=conf.get("tubelet_size", 2), crop=conf.get("crop_size", 256),
                    v_mlp_ratio=conf.get("mlp_ratio", 4.0))
    rope, nh = conf.get("rope_parameters") or {}, conf.get("num_attention_heads", 32)  # Qwen3's where absent or null
    return dict(l_width=conf.get("hidden_size", 4096), l_layers=conf.get("num_hidden_layers", 32), l_heads=nh,
                l_kv_heads=conf.get("num_key_value_heads") or nh, l_head_dim=conf.get("head_dim", 128),
                l_inter=conf.get("intermediate_size", 22016),
                rope_theta=conf.get("rope_theta") or rope.get("rope_theta", 10000.0),  # a number: read_hf_dir checks
                tie_embeddings=bool(conf.get("tie_word_embeddings")) and "lm_head.weight" not in keys)  # as HF

def tower_fields(cfg):  # -> [(folder, {Config field: value})]: each HF tower's sizes, frozen
    return [(p, {**read_hf_dir(p, kind)[2], freeze: True}) for p, kind, freeze in (
        (cfg.vision_ckpt, "vjepa2", "freeze_vision"), (cfg.llm_ckpt, "qwen3", "freeze_llm")) if p]

def fingerprint(tower):  # 8 values spread over each tensor, hashed: tells towers of one size apart, in any dtype
    vals = [v.flatten()[::max(1, v.numel() // 8)][:8].float().cpu() for _, v in sorted(tower.state_dict().items())]
    return hashlib.sha256(torch.cat(vals).numpy().tobytes()).hexdigest()[:16]

def load_vjepa2(path, dtype=None, device="cpu"):  # HF V-JEPA 2 folder (`encoder.*` or `vjepa2.encoder.*`) -> encoder
    conf, keys, f = read_hf_dir(path, "vjepa2")
    with torch.device("meta"):
        enc = VJEPA2Encoder(Config(**f), conf.get("layer_norm_eps", 1e-6))
    mapping = {k: k.removeprefix("vjepa2.").removeprefix("encoder.") for k in keys
               if k.removeprefix("vjepa2.").startswith("encoder.")}  # the rest: predictor, pooler, classifier
    if len(mapping) < len(keys):
        print(f"{path}: ignoring {len(keys) - len(mapping)} predictor/pooler/classifier tensors, on purpose")
    return assign_strict(enc, path, keys, mapping.get, dtype, device)

def load_qwen3(path, dtype=None, device="cpu"):  # HF Qwen3 folder -> Qwen3LM; absent keys: transformers' defaults
    conf, keys, f = read_hf_dir(path, "qwen3")  # f: tied head unless the file has its own lm_head (as transformers)
    with torch.device("meta"):
        lm = Qwen3LM(conf.get("vocab_size", 151936), Config(**f), conf.get("rms_norm_eps", 1e-6))
    return assign_strict(lm, path, keys, lambda k: k, dtype, device)

def build_model(cfg, tok):
    """Mark1; HF towers in float32, or under bfloat16 autocast as their files store them (float16 files: float32)."""
    dtype = None if autocast_dtype(cfg.dtype, parse_device_map(cfg)["vision"]) == "bfloat16" else torch.float32
    vision = load_vjepa2(cfg.vision_ckpt, dtype) if cfg.vision_ckpt else None
    llm = load_qwen3(cfg.llm_ckpt, dtype) if cfg.llm_ckpt else None
    width = llm.model.embed_tokens.weight.shape[1] if llm else cfg.l_width  # the bridge runs at the LLM's width
    if bad := [f"--{h} {getattr(cfg, h)}" for h in ("bridge_heads", "bert_heads") if width % getattr(cfg, h)]:
        raise UserError(f"{', '.join(bad)}: must divide the LLM's width {width} (split evenly)")
    torch.manual_seed(cfg.seed)
    model = Mark1(cfg, len(tok.ids) if tok.ids is not None else None, vision, llm)
    for part in [p for p in ("vision", "llm") if getattr(cfg, p + "_ckpt") or getattr(cfg, "freeze_" + p)]:
        model.freeze(part)
    return model

def make_tokenizer(cfg, entries=None, ids=None):  # Qwen3's with --llm_ckpt, else GPT-2 over `ids` or `entries`
    if cfg.llm_ckpt:  # its folder and model_type were checked already (tower_fields): another model's is named
        return QwenTokenizer(os.path.join(cfg.llm_ckpt, "tokenizer.json"))
    if ids is not None:
        return GPT2Tokenizer(ids)
    texts = [e["question"] + "\n" + "\n".join(e["choices"]) + "\nAnswer: " + e["answer"] for e in entries]
    return GPT2Tokenizer.build(texts, cfg.compact_vocab)

def own_state(model, cfg):  # what a checkpoint stores: parameters not from HF folders (frame_to_key isn't persistent)
    hf = tuple(p + "." for p, c in (("vision", cfg.vision_ckpt), ("llm", cfg.llm_ckpt)) if c)
    return {k: v for k, v in model.named_parameters() if not k.startswith(hf)}  # a tied lm_head: once, as the embedding

def save_checkpoint(model, tok, cfg, opt, step, scaler, **run):  # the weights of every part not from an HF folder
    os.makedirs(cfg.out_dir, exist_ok=True)
    path = lambda name: os.path.join(cfg.out_dir, name)
    state = {k: v.detach().cpu().contiguous() for k, v in own_state(model, cfg).items()}
    atomic(path("model.safetensors"), lambda p: save_file(state, p))
    for stale in filter(os.path.isfile, map(path, ("eval.json", "train_state.pt"))):  # eval.json scored the old
        os.remove(stale)  # weights; the old state would --resume the new ones at its step (written again below)
    meta = {"script": SCRIPT, "config": dataclasses.asdict(cfg), "vocab": tok.ids, "towers": {  # the HF towers' weights
        p: fingerprint(getattr(model, p)) for p in ("vision", "llm") if getattr(cfg, p + "_ckpt")}}
    atomic(path("config.json"), lambda p: json.dump(meta, open(p, "w")))
    ts = dict(optimizer=opt.state_dict(), scaler=scaler.state_dict(), step=step, rng=torch.get_rng_state(), **run)
    atomic(path("train_state.pt"), lambda p: torch.save(ts, p))  # what --resume needs (run: global batch, seconds)

PATH_KEYS = {"data", "test_data", "vision_ckpt", "llm_ckpt"}  # inputs: parse_args makes them absolute (found anywhere)
RUN_KEYS = {"max_steps", "stop_after", "out_dir", "data_dir", "data", "test_data", "device", "device_map", "dtype",
            "log_interval", "eval_interval", "feature_cache", "vision_ckpt", "llm_ckpt"}  # how long, where, on what
READ_KEYS = RUN_KEYS | {"temperature", "top_k", "top_p", "max_new_tokens", "seed", "threshold"}
STEPS = ("max_steps", "stop_after", "log_interval", "eval_interval")  # read by training alone
KEYS = {"--resume": RUN_KEYS | {"max_new_tokens"}, "--eval": READ_KEYS - set(STEPS),  # what each mode may set
        "--predict": READ_KEYS - {*STEPS, "data", "test_data", "data_dir", "feature_cache"}}  # (the rest: the run's)
def load_checkpoint(out_dir, overrides=None, mode="--eval"):  # -> (model, tok, cfg): saved config, allowed overrides
    cpath, wpath = os.path.join(out_dir, "config.json"), os.path.join(out_dir, "model.safetensors")
    if not (os.path.isfile(cpath) and os.path.isfile(wpath)):
        raise UserError(f"{out_dir}: no checkpoint here (run --train first, or pass --out_dir)")
    meta = read_json(cpath, "the checkpoint is damaged, retrain or restore it")
    if meta.get("script") != SCRIPT or not isinstance(meta.get("config"), dict):
        raise UserError(f"{out_dir}: not a checkpoint of {SCRIPT}.py (config.json: script {meta.get('script')!r})")
    if not writable(out_dir, "config.json", lambda m: True):  # each mode that loads a run writes into its folder
        raise UserError(f"{out_dir}: {mode} writes into the run's folder, and no file can be written there (copy it)")
    saved = {f.name: meta["config"][f.name] for f in dataclasses.fields(Config) if f.name in meta["config"]}
    for k, v in (overrides or {}).items():
        if k not in KEYS[mode] and saved.get(k) != v:
            raise UserError(f"--{k} {v}: the run in {out_dir} has {k}={saved.get(k)!r}; {mode} cannot change it "
                            f"(drop the flag, or train into a new --out_dir)")
    cfg = Config(**{**saved, **(overrides or {}), "out_dir": out_dir})  # written where read (the run may have moved)
    vocab, towers = meta.get("vocab", "missing"), meta.get("towers", {})
    hf = {p for p in ("vision", "llm") if getattr(cfg, p + "_ckpt")}  # the towers loaded from HF folders
    problems = config_problems(cfg) + [f"towers {towers!r}: not a {{vision, llm: fingerprint}} object of its HF "
        "towers"] * (not (isinstance(towers, dict) and set(towers) <= hf)) + ["vocab: missing, or not a list of "
        "token ids with <|endoftext|> (50256)"] * (not (isinstance(vocab, list) and all(type(i) is int for i in vocab)
                                                        and 50256 in vocab or vocab is None and cfg.llm_ckpt))
    if problems:
        raise UserError(f"{cpath}: {problems[0]}; the checkpoint is damaged, retrain or restore it")
    for path, got in tower_fields(cfg):  # a moved tower folder must hold the tower this run was trained with
        if k := next((k for k, v in got.items() if saved.get(k, v) != v), None):
            raise UserError(f"{path}: {k} {got[k]}, but the run in {out_dir} was trained with {saved[k]}; pass the "
                            "tower it was trained with")
    model = build_model(cfg, tok := make_tokenizer(cfg, ids=vocab))
    if bad := [p for p, fp in towers.items() if fingerprint(getattr(model, p)) != fp]:  # same sizes
        raise UserError(f"{getattr(cfg, bad[0] + '_ckpt')}: not the weights the run in {out_dir} trained with")
    try:
        state = load_file(wpath)
    except Exception as e:  # truncated or not safetensors at all
        raise UserError(f"{wpath}: unreadable safetensors file ({e}); retrain or restore it")
    check_fit(wpath, {k: v.shape for k, v in own_state(model, cfg).items()}, {k: v.shape for k, v in state.items()})
    model.load_state_dict(state, strict=False)  # towers from HF folders are already loaded; the rest is checked above
    if not dist.is_initialized() or dist.get_rank() == 0:  # the config that runs: the saved one, as updated
        print("config:", json.dumps(dataclasses.asdict(cfg)))
    return model, tok, cfg

# Metrics (plain Python, tested on hand-computed cases) ----------------------------------------------------------------
def extract_option(text):  # strict: the answer must begin with an option letter and a full stop ("C. it stops")
    return m.group(1) if (m := re.match(r"^\s*([A-Z])\.(\s|$)", text)) else None

def mcq_accuracy(preds, answers):  # share of predictions whose option letter is the answer's
    ok = [extract_option(p) is not None and extract_option(p) == extract_option(a) for p, a in zip(preds, answers)]
    return sum(ok) / max(1, len(ok))

def frame_f1(pred, gold):  # micro F1 over every (clip, frame) pair: pred and gold are lists of 0/1 lists
    pairs = [(bool(p), bool(g)) for ps, gs in zip(pred, gold) for p, g in zip(ps, gs)]  # (predicted, gold) per frame
    tp, fp, fn = sum(p and g for p, g in pairs), sum(p and not g for p, g in pairs), sum(g and not p for p, g in pairs)
    return 2 * tp / max(1, 2 * tp + fp + fn)  # F1 = 2TP / (2TP + FP + FN); 0 when nothing is positive

def segment_from_scores(scores, times, duration, threshold):  # frame saliency -> one (start, end) in seconds
    run, n = [], 0  # run[i]: how many frames in a row up to frame i are above the threshold
    for s in scores:
        n = n + 1 if s > threshold else 0
        run.append(n)
    last = run.index(max(run)) if max(run) else max(range(len(scores)), key=lambda k: scores[k])  # none: top frame
    first = last - max(1, run[last]) + 1  # the first of the longest runs, or the most salient frame alone
    return float(times[first]), float(min(duration, times[last] + duration / len(set(times))))  # + a frame's share

def temporal_iou(a, b):  # two (start, end) spans in seconds -> intersection over union
    inter, union = max(0.0, min(a[1], b[1]) - max(a[0], b[0])), max(a[1], b[1]) - min(a[0], b[0])
    return inter / union if union > 0 else 0.0

def grounding_metrics(pred_segs, gold_segs):  # -> R@1 at IoU 0.3/0.5/0.7 and mean IoU
    ious = [temporal_iou(p, g) for p, g in zip(pred_segs, gold_segs)]
    n = max(1, len(ious))
    return {**{f"r1_iou{t}": sum(i >= t for i in ious) / n for t in (0.3, 0.5, 0.7)}, "miou": sum(ious) / n}

# Training -------------------------------------------------------------------------------------------------------------
def pick_device(name):  # "auto" -> cuda, else mps, else cpu; any other name as given
    mps = torch.backends.mps.is_available()
    return name if name != "auto" else "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"

def parse_device_map(cfg):  # -> {part: device}: --device for all, unless --device_map moves a part; each checked
    out = dict.fromkeys(("vision", "bridge", "llm"), pick_device(cfg.device))
    for part in filter(None, cfg.device_map.split(",")):
        k, _, v = part.partition("=")  # "llm=cuda:1" -> ("llm", "cuda:1")
        if k not in out or not v:
            raise UserError(f"--device_map {cfg.device_map!r}: expected vision=DEV,bridge=DEV,llm=DEV")
        out[k] = v
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for k, v in out.items():
        kind, _, i = v.partition(":")
        cuda_ok = n > 0 and (not i or (i.isdecimal() and int(i) < n))  # "cuda" or an existing "cuda:N"
        if not {"cpu": True, "mps": pick_device("auto") == "mps", "cuda": cuda_ok}.get(kind, False):
            raise UserError(f"--device / --device_map {k}: device {v!r} does not exist here ({n} CUDA devices); "
                            "use cpu or an existing cuda:N (--device_map '' puts every part on --device)")
    return out

def autocast_dtype(name, device):  # auto: bfloat16 where the hardware multiplies in it; else float32 (emulated: slow)
    if name != "auto":
        return name
    gpu = device.startswith("cuda") and torch.cuda.get_device_capability(device)[0] >= 8
    cpu = device == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return "bfloat16" if gpu or cpu else "float32"

def autocast(cfg, device):  # the mixed-precision context of one part's device; plain float32 when off
    dtype = autocast_dtype(cfg.dtype, device)
    return torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype), enabled=dtype != "float32")

def lr_at(step, cfg):
    warm = max(1, int(cfg.warmup_frac * cfg.max_steps))  # warmup steps
    if step < warm:
        return cfg.lr * (step + 1) / warm  # linear from lr/warm up to lr
    t = min(1.0, (step - warm) / max(1, cfg.max_steps - warm))  # 0 -> 1 over the rest of the run
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (cfg.lr - cfg.min_lr)

def global_batch(step, n, size, seed):  # a pure function of the step: the same batch on every rank and after --resume
    epoch, k = divmod(step, max(1, n // size))  # a fresh permutation per epoch, full batches (the remainder is skipped)
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))[k * size:(k + 1) * size]

def pad_left(rows, pad=0):  # ids (L_i,) / embeddings (L_i, D) -> (B, L[, D]) left-padded with `pad`, valid (B, L)
    L = max(len(r) for r in rows)
    x = torch.stack([torch.cat((r.new_full((L - len(r), *r.shape[1:]), pad), r)) for r in rows])  # pad, then row
    return x, torch.stack([torch.arange(L, device=r.device) >= L - len(r) for r in rows])  # valid: False on the pad

def text_batch(items, tok, with_answer=True):  # -> question ids, mask (B, Lq); prompt+answer inputs, targets (B, L)
    q_ids, q_valid = pad_left([torch.tensor(tok.encode(e["question"]) or [tok.eos]) for e in items], tok.eos)
    seqs = [(tok.prompt(e["question"], e["choices"]), tok.target(e["answer"]) if with_answer else []) for e in items]
    pad = lambda rows, fill: nn.utils.rnn.pad_sequence(  # (B, L), padded on the right: causal rows never attend to it
        [torch.tensor(r, dtype=torch.long) for r in rows], batch_first=True, padding_value=fill)
    inp = pad([(p + a)[:-1] for p, a in seqs], tok.eos)  # inputs drop the last token; EOS pads (never a target)
    tgt = pad([[-100] * (len(p) - 1) + a for p, a in seqs], -100)  # targets drop the first; -100 except on answers
    return q_ids, q_valid, inp, tgt

class FeatureCache:  # frozen encoder: features once per clip (by split, index), kept in memory
    def __init__(self, model, enabled):
        self.model, self.on, self.store = model, enabled and "vision" in model.frozen, {}  # a trained encoder: no cache
    def __call__(self, split, idx, clips):
        if not self.on:
            return self.model.encode(clips[idx])
        if todo := [i for i in idx.tolist() if (split, i) not in self.store]:  # clips seen for the first time
            feats = self.model.encode(clips[torch.tensor(todo)]).detach()
            self.store.update({(split, i): f.cpu() for i, f in zip(todo, feats)})  # (P, Dv) each: encoder dtype, CPU
        return torch.stack([self.store[(split, i)] for i in idx.tolist()])

def prepare_data(cfg, rank=0, splits=("train", "val", "test", "novel")):  # -> {split: (entries, load_split dict)}
    anns = {"test": read_annotations(cfg.test_data)} if cfg.test_data else {}  # replaces any other test split
    if not cfg.data:  # the synthetic world: only the splits asked for are read (--eval: test and novel)
        if rank == 0:
            build_world(cfg)
        if dist.is_initialized():
            dist.barrier()
        anns = {s: anns[s] if s in anns else read_annotations(os.path.join(cfg.data_dir, f"{s}.json")) for s in splits}
    elif "train" in splits or not cfg.test_data:  # (--eval --test_data never opens it); --test_data's test wins below
        train = read_annotations(cfg.data, "" if "train" in splits else "--eval takes its held-out test entries from "
                                 "this --data file; restore it, or pass --test_data FILE to evaluate another file")
        draw = [random.Random(os.path.relpath(e["video"], cfg.data) + e["question"]).random() for e in train]  # by path
        cut = max(0.1, min(draw, default=0))  # held out: up to 0.1, or the lowest; new entries can only lower the cut
        test = [e for e, d in zip(train, draw) if d <= cut]  # set by its video path and question, not its place
        anns = {"train": [e for e, d in zip(train, draw) if cfg.test_data or d > cut], "test": test, **anns}
        if not anns["train"] and "train" in splits:  # all held out (one entry, say); --eval would score them
            raise UserError(f"{cfg.data}: too few entries to hold out a test set; add entries or pass --test_data")
    anns.setdefault("val", anns["test"][:max(1, len(anns["test"]) // 2)])  # user data: half of test (only logged)
    return {s: (e, load_split(e, cfg)) for s, e in anns.items() if s in splits}

def check_answers(data, tok, cfg):  # decoding stops at --max_new_tokens: a longer answer would be cut off, silently
    for split, (entries, _) in data.items():  # the longest answer, named by its entry (or its split)
        n, at = max((len(tok.target(e["answer"])), e.get("where", "")) for e in entries)
        if split != "val" and n > cfg.max_new_tokens:
            raise UserError(f"{at + ': the' if at else 'a ' + split} answer is {n} tokens long (EOS included): "
                            f"--max_new_tokens {cfg.max_new_tokens} must be at least {n}")

def make_optimizer(model, cfg):  # AdamW: decay on Linear/Conv3d weights (a tied embedding too), not norms or queries
    params, dev = [p for p in model.parameters() if p.requires_grad], model.devices["llm"]  # where the loss is
    weights = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv3d))}
    groups = [{"params": [p for p in params if id(p) in weights], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if id(p) not in weights], "weight_decay": 0.0}]
    scaler = torch.amp.GradScaler(dev.split(":")[0], enabled=autocast_dtype(cfg.dtype, dev) == "float16")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95)), params, scaler

def accumulate(fwd, model, cache, tok, entries, tr, idx, cfg, rank, world, device, scaler):
    """Forward + backward of this rank's micro-batches of the global batch `idx` -> its mean (loss, ce, bce). Losses use
    the global batch's counts, so any split gives one gradient (DDP averages over ranks, so each is scaled by world)."""
    n_tok = sum(len(tok.target(entries[i]["answer"])) for i in idx.tolist())  # answer tokens in the global batch
    ddp, share = isinstance(fwd, nn.parallel.DistributedDataParallel), torch.zeros(3)
    for a in range(cfg.grad_accum):
        mb = idx[(a * world + rank) * cfg.batch_size:(a * world + rank + 1) * cfg.batch_size]
        mb, w = (mb, world) if len(mb) else (idx[:1], 0)  # empty: one clip weighted 0 (DDP needs every rank's backward)
        with fwd.no_sync() if ddp and a < cfg.grad_accum - 1 else contextlib.nullcontext():  # DDP: the last all-reduces
            with autocast(cfg, device):  # a trainable encoder runs here, outside fwd: DDP hooks its gradients too
                feats = cache("train", mb, tr["clips"])
                _, loss, _ = fwd(feats, *text_batch([entries[i] for i in mb], tok), tr["labels"][mb], n_tok, len(idx))
            if not torch.isfinite(loss):
                raise UserError(f"loss became {loss.item()}; lower --lr (or train with --dtype float32)")
            scaler.scale(loss * w).backward()  # float16: scaled up, so small gradients do not underflow to 0
        share += torch.tensor([loss.item(), *model.parts]) * (w > 0)  # this micro-batch's part of the means
    if ddp:  # three numbers, so that the log line shows the whole global batch (nccl reduces only GPU tensors)
        dist.all_reduce(share := share.to(device))
    return share.tolist()

@torch.no_grad()
def val_loss(model, tok, cfg, val, cache):  # CE + lam * BCE on val = (entries, arrays): no graph, no random draws
    (entries, ds), total = val, 0.0
    model.eval()
    for idx in torch.arange(len(entries)).split(cfg.batch_size):
        with autocast(cfg, model.devices["llm"]):
            _, loss, _ = model(cache("val", idx, ds["clips"]), *text_batch([entries[i] for i in idx], tok),
                               ds["labels"][idx])
        total += loss.item() * len(idx)
    model.train()
    if not math.isfinite(total):  # the weights diverged within the last steps: they are not saved
        raise UserError(f"validation loss {total}: stopped; {cfg.out_dir} keeps its last save (try a lower --lr)")
    return total / max(1, len(entries))

def setup_distributed(cfg):  # -> (ddp, rank, world) under torchrun: gloo on CPU, nccl on CUDA
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return False, 0, 1  # one process unless torchrun started several
    if cuda := not pick_device(cfg.device).startswith("cpu"):  # CUDA, or mps (no CUDA GPU: refused below)
        if (gpus := torch.cuda.device_count()) < int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
            raise UserError(f"torchrun: one CUDA GPU per process, {gpus} here: start fewer or pass --device cpu")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # "cuda" is now this rank's GPU
    dist.init_process_group("nccl" if cuda else "gloo")
    return True, dist.get_rank(), dist.get_world_size()

def train(cfg, resume=False, overrides=None):
    ddp, rank, world = setup_distributed(cfg)
    say, t0, step, seconds0 = print if rank == 0 else (lambda *a, **k: None), time.time(), 0, 0.0
    if resume:  # the saved config and token table rebuild the model; towers load once, the optimiser is built once
        if not os.path.isfile(path := os.path.join(cfg.out_dir, "train_state.pt")):
            raise UserError(f"{path}: nothing to resume (train without --resume first)")
        model, tok, cfg = load_checkpoint(cfg.out_dir, {"stop_after": cfg.stop_after, **(overrides or {})}, "--resume")
        try:  # truncated, not a torch file, or keys missing: PyTorch's own errors differ by cause
            ts = dict(torch.load(path, map_location="cpu", weights_only=True))  # a GPU's too: the optimizer moves it
            step, seconds0 = int(ts["step"]), float(ts.get("seconds", 0))
        except Exception as e:
            raise UserError(f"{path}: not a readable training state ({type(e).__name__}); retrain or restore it")
        if step >= cfg.max_steps or 0 < cfg.stop_after <= step:  # nothing to train: refused before any data
            raise UserError(f"{cfg.out_dir}: at step {step} already; pass a larger " + ("--max_steps, or --eval to"
                            " score it" if step >= cfg.max_steps else f"--stop_after than {cfg.stop_after} or drop it"))
    devices, data = parse_device_map(cfg), prepare_data(cfg, rank)
    entries, tr = data["train"]
    if not resume:
        model = build_model(cfg, tok := make_tokenizer(cfg, entries))
    check_answers(data, tok, cfg)
    opt, params, scaler = make_optimizer(model.place(devices), cfg)  # params: the trainable ones
    total, trainable = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in params)  # tied: once
    say(f"data ready in {time.time() - t0:.1f}s | params: {total / 1e6:.2f}M total, {trainable / 1e6:.2f}M trainable, "
        f"{(total - trainable) / 1e6:.2f}M frozen | vocab {len(tok.ids) if tok.ids else 'full'} | autocast "
        f"{autocast_dtype(cfg.dtype, devices['llm'])}")
    gbatch = cfg.batch_size * cfg.grad_accum * world  # clips per step: global_batch orders the data by it
    if resume:
        try:  # another run's optimiser state, or a key missing
            opt.load_state_dict(ts["optimizer"])  # AdamW checks how many tensors per group, not their shapes,
            if any(s["exp_avg"].shape != p.shape for p, s in opt.state.items()):  # so another run's moments are refused
                raise ValueError("AdamW moments of other shapes")
            torch.set_rng_state(ts["rng"])
            if ts.get("scaler"):  # float16: the loss scale goes on where it stopped (other dtypes save none)
                scaler.load_state_dict(ts["scaler"])
        except Exception as e:
            raise UserError(f"{path}: not a readable training state ({type(e).__name__}); retrain or restore it")
        if (g := ts.get("batch") or gbatch) != gbatch:  # (a state without "batch" is not checked)
            raise UserError(f"{path}: trained at global batch {g} (batch_size*grad_accum*processes), not {gbatch}")
        say(f"resumed at step {step}")
    elif cfg.data_init > 0:  # one fixed batch, the same on every rank (--seed): clips, question ids and mask
        idx = torch.randperm(len(entries), generator=torch.Generator().manual_seed(cfg.seed))[:cfg.data_init]
        model.init_from_data(tr["clips"][idx], *text_batch([entries[i] for i in idx.tolist()], tok)[:2])
    cache = FeatureCache(model, cfg.feature_cache)
    fwd = model.train()  # what the training forward calls; `model` itself is what is saved and evaluated (no "module.")
    if ddp:  # DDP all-reduces only parameters with requires_grad (frozen towers add no traffic)
        fwd = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)  # no device_ids: place() did
        say(f"{type(fwd).__name__}: {world} processes ({dist.get_backend()}), {gbatch} clips per step")
    t_log, losses, end = time.time(), [], min(cfg.max_steps, cfg.stop_after) if cfg.stop_after else cfg.max_steps
    while step < end:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        idx = global_batch(step, len(entries), gbatch, cfg.seed)
        stats = accumulate(fwd, model, cache, tok, entries, tr, idx, cfg, rank, world, devices["llm"], scaler)
        scaler.unscale_(opt)  # float16's loss scale undone: the true gradients are clipped
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)  # the global norm before clipping
        losses.append(stats + [norm.item()])
        scaler.step(opt)  # float16: skipped when a gradient overflowed, and the scale lowered
        scaler.update()
        step += 1
        measure = rank == 0 and (step % cfg.eval_interval == 0 or step == cfg.max_steps)  # val loss on this line
        if step % cfg.log_interval == 0 or step == end or measure:
            dt = (time.time() - t_log) / len(losses)  # seconds per step, before the val pass
            lo, ce, bce, gn = (sum(x[k] for x in losses) / len(losses) for k in range(4))
            val = f"{val_loss(model, tok, cfg, data['val'], cache):.4f}" if measure else "-"
            say(f"step {step}/{cfg.max_steps} | loss {lo:.4f} | val {val} | ce {ce:.3f}, bce {bce:.3f} | grad norm "
                f"{gn:.4f} | lr {lr_at(step - 1, cfg):.2e} | {dt * 1000:.0f} ms | {gbatch / dt:.3g} samples/s | "
                f"eta {dt * (end - step) / 60:.1f}m")
            t_log, losses = time.time(), []
        if rank == 0 and (step % cfg.eval_interval == 0 or step == end):
            save_checkpoint(model, tok, cfg, opt, step, scaler, batch=gbatch, seconds=seconds0 + time.time() - t0)
    if step < cfg.max_steps:
        say(f"stopped after step {step} as asked; go on with --train --resume --out_dir {shlex.quote(cfg.out_dir)}")
    elif rank == 0:
        evaluate(model, tok, cfg, data, seconds0 + time.time() - t0, cache)  # the whole run's, before --resume too
    if ddp:
        dist.destroy_process_group()
    return model, tok

# Generation, evaluation, prediction, bench ----------------------------------------------------------------------------
def filter_logits(logits, top_k, top_p):
    if top_k > 0:
        logits = logits.masked_fill(logits < logits.topk(min(top_k, logits.shape[-1])).values[..., -1:], float("-inf"))
    if top_p < 1.0:
        srt, order = logits.sort(-1, descending=True)
        drop = srt.softmax(-1).cumsum(-1) - srt.softmax(-1) >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))  # vocab order
    return logits

@torch.no_grad()
def llm_generate(llm, embed, x, valid, eos, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, use_cache=True,
                 generator=None):  # -> token lists, from left-padded x (B, L, D), valid (B, L); embed() embeds new ids
    pos = (valid.long().cumsum(1) - 1).clamp(min=0)  # (B, L): positions count real tokens only
    B, dev, step_x, step_pos = x.shape[0], x.device, x, pos  # step_x, step_pos: what the next step feeds
    cache = [dict() for _ in llm.model.layers] if use_cache else None  # one {k, v} per layer
    done, toks = torch.zeros(B, dtype=torch.bool, device=dev), []  # rows that produced EOS, (B,) ids per step
    for _ in range(max_new_tokens):  # with the cache: prefill once, then one position per step
        logits = (llm(step_x, step_pos, valid, cache, last_only=True) if use_cache
                  else llm(x, pos, valid, last_only=True))[:, -1].float()  # (B, V)
        nxt = logits.argmax(-1)  # greedy, unless sampled:
        if temperature > 0:  # logits shifted to max 0 first: a tiny temperature cannot overflow
            probs = filter_logits((logits - logits.amax(-1, keepdim=True)) / temperature, top_k, top_p).softmax(-1)
            nxt = torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(dev)
        nxt = torch.where(done, torch.full_like(nxt, eos), nxt)  # finished rows keep emitting EOS
        toks.append(nxt)
        done |= nxt == eos
        if done.all():
            break
        step_x, step_pos = embed(nxt[:, None]).to(x.dtype), pos[:, -1:] + 1  # (B, 1, D), each row's next position
        valid = torch.cat((valid, torch.ones(B, 1, dtype=torch.bool, device=dev)), 1)  # the new key is real
        x, pos = torch.cat((x, step_x), 1), torch.cat((pos, step_pos), 1)
    return [[t for t in row if t != eos] for row in torch.stack(toks, 1).tolist()]  # (B, steps) -> lists

@torch.no_grad()
def generate(model, feats, items, tok, cfg, use_cache=True, generator=None):  # -> id lists, frame logits (B, F)
    prefix, frame_logits = model.fuse(feats, *text_batch(items, tok, with_answer=False)[:2])  # question ids, mask
    prompts = [model.embed(torch.tensor(tok.prompt(it["question"], it["choices"]))) for it in items]  # (Lp_i, D)
    rows = [torch.cat((prefix[i], p.to(prefix.dtype)), 0) for i, p in enumerate(prompts)]  # (N + Lp_i, D) each
    return llm_generate(model.llm, model.embed, *pad_left(rows), tok.eos, cfg.max_new_tokens, cfg.temperature,
                        cfg.top_k, cfg.top_p, use_cache, generator), frame_logits  # pad_left: x (B, L, D), valid (B, L)

def evaluate(model, tok, cfg, data, train_seconds=None, cache=None):  # test, novel -> table, samples, eval.json
    cache, result = cache or FeatureCache(model, cfg.feature_cache), {"config": dataclasses.asdict(cfg)}  # what ran
    model.eval()
    for split in [s for s in ("test", "novel") if s in data]:
        (entries, ds), preds, sal = data[split], [], []  # preds, sal: answers, frame saliency (sigmoid) per clip
        for idx in torch.arange(len(entries)).split(64):  # 64 clips a batch
            with torch.no_grad(), autocast(cfg, model.devices["llm"]):  # cache() may run a trainable encoder
                ids, fl = generate(model, cache(split, idx, ds["clips"]), [entries[i] for i in idx], tok, cfg)
            preds += [tok.decode(i).strip() for i in ids]
            sal += torch.sigmoid(fl.float()).cpu().tolist()
        gold, pred_lab = ds["labels"].int().tolist(), [[int(s > cfg.threshold) for s in row] for row in sal]
        segs = [segment_from_scores(r, ds["times"][i], ds["durations"][i], cfg.threshold) for i, r in enumerate(sal)]
        known = [i for i, e in enumerate(entries) if e["support_times"]]  # frame F1, mIoU, R@1: clips that give them
        # gold span: the longest run of labelled frames (0/1, so any threshold in (0, 1)), on the predictions' grid
        gsegs = {i: segment_from_scores(gold[i], ds["times"][i], ds["durations"][i], 0.5) for i in known}
        m = dict(n=len(entries), mcq_accuracy=mcq_accuracy(preds, [e["answer"] for e in entries]),
                 exact_match=sum(p == e["answer"].strip() for p, e in zip(preds, entries)) / len(entries),
                 n_localised=len(known), frame_f1=frame_f1([pred_lab[i] for i in known], [gold[i] for i in known]),
                 **grounding_metrics([segs[i] for i in known], list(gsegs.values())))
        if not known:  # no support_times: the frame metrics are not measured (0 would read as a failed model)
            m.update(dict.fromkeys(("frame_f1", "miou", "r1_iou0.3", "r1_iou0.5", "r1_iou0.7")))
        m["samples"] = [dict(question=e["question"], choices=e["choices"], answer=e["answer"], prediction=p,
                             support=[round(a, 3) for a in gsegs.get(i, ())], predicted_span=[round(a, 3) for a in s])
                        for i, (e, p, s) in enumerate(list(zip(entries, preds, segs))[:5])]
        result[split] = m
        print(f"{split:6s} n={m['n']} | " + " | ".join(f"{k} {'n/a' if m[k] is None else f'{m[k]:.3f}'}" for k in (
              "mcq_accuracy", "exact_match", "frame_f1", "miou", "r1_iou0.3", "r1_iou0.5", "r1_iou0.7")))
        for smp in m["samples"][:3]:
            print(f"   {smp['question']} {' '.join(smp['choices'])} -> {smp['prediction']!r} (ref {smp['answer']!r}), "
                  f"span {smp['predicted_span']} (ref {smp['support']})")
    if train_seconds is None and os.path.isfile(path := os.path.join(cfg.out_dir, "eval.json")):  # --eval keeps it
        train_seconds = read_json(path, "delete it, or run --train again").get("train_seconds")
    result["train_seconds"] = None if train_seconds is None else round(train_seconds, 1)
    atomic(os.path.join(cfg.out_dir, "eval.json"), lambda p: json.dump(result, open(p, "w"), indent=1))
    return result

def frame_strip(clip, sal, path, title, threshold):  # PNG: the frames, a saliency bar under each (green: > threshold)
    F_, S = clip.shape[0], 64
    img = np.full((S + 40, F_ * (S + 2), 3), 255, np.uint8)
    for i, x in enumerate(range(0, F_ * (S + 2), S + 2)):  # x: frame i's left edge
        img[:S, x:x + S] = cv2.resize(cv2.cvtColor(clip[i], cv2.COLOR_RGB2BGR), (S, S), interpolation=cv2.INTER_NEAREST)
        cv2.rectangle(img, (x + 4, S + 34 - int(round(30 * sal[i]))), (x + S - 4, S + 34),
                      (60, 180, 60) if sal[i] > threshold else (150, 150, 150), -1)
    cv2.putText(img, title[:F_ * 10], (2, S + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
    if not cv2.imwrite(os.fsencode(path), img):  # False, not an exception, when it cannot write
        raise UserError(f"{path}: the frame strip could not be written there (a folder of that name, no permission)")

def predict(cfg, overrides, video, question, choices):
    if not video or not question.strip() or not choices:  # a blank question too
        raise UserError("--predict needs --video PATH --question TEXT --choices 'A. ...|B. ...|C. ...|D. ...'")
    check_choices(choice_list := [c.strip() for c in choices.split("|")], f"--choices {choices!r} (split at |)")
    model, tok, cfg = load_checkpoint(cfg.out_dir, overrides, "--predict")
    check_answers({"--choices": ([dict(answer=c) for c in choice_list], None)}, tok, cfg)  # each may be the answer
    model.place(parse_device_map(cfg)).eval()
    clip, times, dur = load_video(video, cfg.n_frames, cfg.crop)
    with torch.no_grad(), autocast(cfg, model.devices["llm"]):  # encode() runs here, outside generate()
        ids, fl = generate(model, model.encode(torch.from_numpy(clip)[None]),
                           [dict(question=question, choices=choice_list)], tok, cfg)
    sal, answer, path = torch.sigmoid(fl.float())[0].tolist(), tok.decode(ids[0]).strip(), cfg.out_dir + "/predict.png"
    span = segment_from_scores(sal, times, dur, cfg.threshold)
    print(f"answer: {answer}" + " (not a choice)" * (answer not in choice_list) + f"\nsupport: {span[0]:.2f}s - "
          f"{span[1]:.2f}s | saliency per frame: {' '.join(f'{s:.2f}' for s in sal)}\nframe strip: {path}")
    frame_strip(clip, sal, path, answer, cfg.threshold)  # after the print: writing the strip may fail
    return answer, span, sal

BENCH_RUNS = dict(freeze_vision=True, grad_accum=1, feature_cache=True)  # --bench's values (a differing flag: refused)
def bench(cfg):  # frozen encoder: epoch 1 fills the feature cache, epoch 2 reads it; the same bridge/LLM work
    cfg = dataclasses.replace(cfg, **BENCH_RUNS)
    entries, tr = prepare_data(cfg)["train"]
    model = build_model(cfg, tok := make_tokenizer(cfg, entries)).place(parse_device_map(cfg)).train()
    (opt, _, scaler), cache, times = make_optimizer(model, cfg), FeatureCache(model, True), []
    for epoch in range(2):
        t = time.time()
        for idx in torch.arange(len(entries)).split(cfg.batch_size):  # the clips in order, a step per batch
            opt.zero_grad(set_to_none=True)
            accumulate(model, model, cache, tok, entries, tr, idx, cfg, 0, 1, model.devices["llm"], scaler)
            scaler.step(opt)
            scaler.update()
        times.append(time.time() - t)
        print(f"epoch {epoch + 1}: {times[-1]:.2f}s for {len(entries)} clips ({len(entries) / times[-1]:.1f} clips/s)")
    print(f"feature cache speedup (epoch 1 / epoch 2): {times[0] / times[1]:.1f}x")
    return times

# Command line ---------------------------------------------------------------------------------------------------------
ZERO_OK = ("temporal_blocks", "data_init", "seed", "stop_after", "top_k")
def config_problems(cfg):  # the checks every config gets: the flags' and a saved config.json's alike
    for f in dataclasses.fields(Config):  # a JSON string, null or list where a number belongs (a bool is no int)
        v, ok = getattr(cfg, f.name), (int, float) if type(f.default) is float else type(f.default)
        if not isinstance(v, ok) or isinstance(v, bool) != isinstance(f.default, bool):
            return [f"--{f.name} {v!r}: must be of type {type(f.default).__name__}, like {f.default!r}"]
    problems = [f"--{k} {getattr(cfg, k)}: choose one of {', '.join(ok)}" for k, ok in (("frame_head", (
        "keys", "linear")), ("dtype", ("auto", "float32", "bfloat16", "float16"))) if getattr(cfg, k) not in ok]
    counts = [f.name for f in dataclasses.fields(Config) if type(f.default) is int and f.name not in ZERO_OK]
    problems += [f"--{k} {getattr(cfg, k)}: must be at least 1" for k in counts if getattr(cfg, k) < 1]
    problems += [f"--l_head_dim {cfg.l_head_dim}: must be even (RoPE turns pairs of features)"] * (cfg.l_head_dim % 2)
    problems += [f"--v_patch {cfg.v_patch}: must be at most --crop {cfg.crop}"] * (cfg.v_patch > cfg.crop)
    problems += [f"--{k} {getattr(cfg, k)}: must be above 0 and finite" for k in ("lr", "grad_clip", "top_p",  # NaN too
                 "rope_theta", "v_mlp_ratio") if not 0 < getattr(cfg, k) < math.inf] + [f"--{k} {getattr(cfg, k)}: must"
                 f" be 0 or more and finite" for k in ("min_lr", "weight_decay", "warmup_frac", "lam", "pos_weight",
                 "temperature", *(k for k in ZERO_OK if k != "seed")) if not 0 <= getattr(cfg, k) < math.inf]
    problems += [f"--threshold {cfg.threshold}: must be in [0, 1) (saliency: a sigmoid)"] * (not 0 <= cfg.threshold < 1)
    problems += [f"--seed {cfg.seed}: must fit in 64 bits (-2**63 to 2**63 - 1)"] * (not -2**63 <= cfg.seed < 2**63)
    return problems + [f"--{h} {getattr(cfg, h)}: must divide --{w} {getattr(cfg, w)} (split evenly)" for h, w in
                 (("v_heads", "v_width"), ("l_kv_heads", "l_heads"), ("bridge_heads", "l_width"), ("bert_heads",
                 "l_width")) if getattr(cfg, w) % max(1, getattr(cfg, h)) and not (cfg.llm_ckpt and w == "l_width")]

UNREAD = STEPS + ("out_dir", "test_data", "data_init", "warmup_frac", "min_lr", "grad_clip", "temperature", "top_k",
                  "top_p", "max_new_tokens", "threshold")  # flags --bench never reads
def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Mark 1: video MCQ and the frames that show it.", allow_abbrev=False)
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # argparse's refusals in one line too, no usage
    for mode, what in (("train", "build data (if needed), train, evaluate"), ("resume", "with --train: continue from "
                       "out_dir"), ("eval", "evaluate out_dir on test and novel"), ("predict", "answer --question "
                       "about --video"), ("bench", "feature-cache speedup with a frozen encoder")):
        p.add_argument(f"--{mode}", action="store_true", help=what)
    for name, what in (("video", "video file or folder of frames, for --predict"), ("question", "for --predict"),
                       ("choices", "'A. ...|B. ...|C. ...|D. ...'"), ("preset", "sizes: default (--bench: bench)")):
        p.add_argument(f"--{name}", default="", help=what, choices=sorted(PRESETS) if name == "preset" else None)
    notes = dict(re.findall(r"^    (\w+): (.*)$", inspect.getsource(Config), re.M)) if argv is None else {}  # --help
    for f in dataclasses.fields(Config):  # --flag/--no-flag for bools, typed values for the rest
        kw = dict(action=argparse.BooleanOptionalAction) if isinstance(f.default, bool) else dict(type=type(f.default))
        p.add_argument(f"--{f.name}", default=None, help=notes.get(f.name), **kw)  # None: the preset's value
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    overrides.update({k: os.path.abspath(v) for k, v in overrides.items() if v and k in PATH_KEYS})
    cfg = Config(**{**PRESETS[args.preset or ("bench" if args.bench else "default")], **overrides})
    problems = config_problems(cfg) + ["a flag given '' must name a file or folder, not an empty string"] * (
        "" in {**overrides, "device_map": None}.values())  # --device_map '': no map
    if args.train and not args.resume and not writable(cfg.out_dir, "config.json", lambda m: m["script"] == SCRIPT):
        problems.append(f"--out_dir {cfg.out_dir}: a file, a folder holding files this script did not write (your "
                        f"own, a checkpoint's), or no folder can be made there; give a new or empty folder")
    modes = sum(map(bool, (args.train or args.eval, args.predict, args.bench)))  # --train ends with an evaluation
    problems += ["one mode per call: --train, --eval, --predict or --bench"] * (modes > 1)
    problems += ["--resume continues a training run: use it with --train"] * (args.resume and not args.train)
    problems += [f"--preset {args.preset}: --resume, --eval and --predict take the sizes from the checkpoint; drop "
                 "--preset"] * bool(args.preset and (args.resume or args.predict or args.eval and not args.train))
    problems += [f"--{k}: only --predict reads it" for k in ("video", "question", "choices")
                 if vars(args)[k] and not args.predict]
    problems += [f"--{k}: --bench does not use it; drop the flag" for k in UNREAD if args.bench and k in overrides]
    problems += [f"--{k} {overrides[k]}: --bench always runs with {k}={v}; drop the flag" for k, v in BENCH_RUNS.items()
                 if args.bench and overrides.get(k, v) != v]
    problems += [f"--{k}: the synthetic world's, unused with --data (the file holds the split); drop it" for k in
                 ("n_train", "n_val", "n_test", "n_novel", "data_dir") if cfg.data and k in overrides]
    problems += ["--no-compact_vocab: with --llm_ckpt the vocabulary is the checkpoint's; drop it"] * (
        cfg.llm_ckpt != "" and overrides.get("compact_vocab") is False)
    if problems:
        raise UserError(problems[0])
    return args, cfg, overrides

def main(argv=None):
    args, cfg, overrides = parse_args(argv)
    for path, got in tower_fields(cfg) if args.train or args.bench else []:  # sizes and crop as the tower's own
        if k := next((k for k, v in got.items() if overrides.get(k, v) != v), None):  # a flag that says otherwise
            raise UserError(f"--{k} {overrides[k]}: {path} sets it to {got[k]} (a loaded tower: its own sizes, frozen)")
        cfg = dataclasses.replace(cfg, **got)  # what is printed and saved is what runs
        if problems := config_problems(cfg):  # the tower's sizes with the flags' (a crop smaller than its patch)
            raise UserError(f"{path}: with its config.json's sizes, {problems[0]}")
    cfg = dataclasses.replace(cfg, data_dir=os.path.abspath(cfg.data_dir))  # saved so: --eval finds it from anywhere
    if int(os.environ.get("RANK", "0")) == 0 and (args.bench or args.train and not args.resume):  # else: as loaded
        print("config:", json.dumps({**dataclasses.asdict(cfg), **(BENCH_RUNS if args.bench else {})}))
    if args.train:
        train(cfg, resume=args.resume, overrides=overrides)
    elif args.eval:
        model, tok, cfg = load_checkpoint(cfg.out_dir, overrides)
        check_answers(data := prepare_data(cfg, splits=("test", "novel")), tok, cfg)
        evaluate(model.place(parse_device_map(cfg)), tok, cfg, data)
    elif args.predict:
        predict(cfg, overrides, args.video, args.question, args.choices)
    elif args.bench:
        bench(cfg)
    else:
        print("nothing to do: pass --train, --eval, --predict, or --bench (see --help)")

if __name__ == "__main__":
    if hasattr(sys.stdout, "reconfigure"):  # IDLE's stream has none; pythonw's stdout is None
        sys.stdout.reconfigure(errors="backslashreplace")  # a character the code page lacks (Windows): \U0001f600
    try:
        main()
    except (UserError, OSError, KeyboardInterrupt) as e:  # Ctrl-C too: one line, exit status 130
        print(f"error: {str(e) or 'interrupted; --train --resume goes on from the last (whole) save'}", file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 2)
