"""VideoLLaMA-Mini: a video captioner in one file, after Video-LLaMA and BLIP-2, small enough to train on a laptop CPU.
What `--train` builds (qformer_mode "text", the design of the VideoLLaMA-Mini write-up):
    frames (B, F, S, S, 3) uint8 -> [-1, 1] less each frame's mean colour, + change from the previous frame: 6 channels
      -> FrameEncoder: a 3-conv CNN per frame, pooled to a grid x grid map (+ a max) -> one vector per frame  (B, F, D)
      -> + sinusoidal time code -> temporal Transformer encoder (frames attend to frames) -> visual tokens  (B, F, D)
      -> caption decoder over GPT-2 tokens: causal self-attention, then cross-attention in which the caption
         tokens are the queries and the F visual tokens the keys/values (a text-query Q-Former)          (B, L, V)

`--qformer_mode queries` (BLIP-2) inserts a QFormer between the visual tokens and the same decoder:
      visual tokens (B, F, D) -> QFormer: Q learned queries; self-attention, cross-attention to the F tokens  (B, Q, D)
      -> caption decoder as above, its cross-attention reading the Q vectors instead of the F visual tokens (B, L, V)
Papers: BLIP-2 (https://arxiv.org/abs/2301.12597), Video-LLaMA (https://arxiv.org/abs/2306.02858).
The decoder reads the video by cross-attention, not as a prefix: the decoded sequence is the caption alone (its
self-attention cache holds only text; the video's keys/values are computed at the first step, then cached).

The built-in world: one or two coloured shapes (6 colours x 3 shapes) moving left/right/up/down over a grey background,
written as real mp4 clips. A caption names colour, shape and motion of each object, left-most at the start first:
"a red circle moves left and a blue square moves up". Direction needs more than one frame, hence the frame
differences and a pooled grid that keeps position. Split `novel` holds (colour, shape) pairs never seen in training.
Text: GPT-2 tokens from tiktoken, but the embedding / output table covers only the GPT-2 ids that occur in the
training captions (plus <|endoftext|>, which is both BOS and EOS): the 50257-way layer would dominate a tiny model.

Shape legend: B batch (G global), K beams, F frames, S side, Q queries, L text, T: F/Q/L, D width, H heads, V vocab.

Commands (also: --qformer_mode queries, --eval, --resume, --bench):
    python videollama_mini.py --train                         # data + training + evaluation, minutes on a CPU
    python videollama_mini.py --generate --video clip.mp4     # caption any video (or a folder of frames)
    torchrun --nproc_per_node=2 videollama_mini.py --train    # DDP (gloo on CPU, nccl on CUDA)
"""

import argparse
from collections import Counter
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import shlex
import sys
import time

os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # quiet FFmpeg: a bad video ends in this script's one line alone
os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")  # and quiet OpenCV (a frame image it cannot read), before cv2 loads
import cv2
import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

SCRIPT = "videollama_mini"

class UserError(Exception):
    """A problem with the user's input: main() prints it as one line and exits with status 2."""

def check_folder(path, flag, ours, why):  # refuse a path to write into unless missing, an empty folder or `ours`
    if os.path.exists(path) and not (os.path.isdir(path) and (ours or not os.listdir(path))):
        raise UserError(f"{flag} {path}: " + (why if os.path.isdir(path) else "a file, not a folder"))
    top = os.path.abspath(path)  # -> the nearest path that exists (a link to nothing: the probe below fails)
    while not os.path.lexists(top):
        top = os.path.dirname(top)
    try:  # a scratch folder made and removed there: path can be made (not under a file, nor in /proc), before any work
        os.mkdir(probe := os.path.join(top, f".probe{os.getpid()}"))
        os.rmdir(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create or write into this folder ({e.strerror})")

def read_json(path):  # path's JSON object as a dict, or None: missing, unreadable, not JSON, not an object
    with contextlib.suppress(OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return obj if isinstance(obj := json.load(open(path, encoding="utf-8")), dict) else None

def as_typed(k, v):  # flag --k with value v as a user types it: --k v ('' and spaces quoted), a boolean --k or --no-k
    return (f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k} {shlex.quote(str(v))}"

# Config ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    data: str = ""  # data: annotation file of user data (format in the README); "" = the built-in synthetic world
    test_data: str = ""  # optional annotation file to evaluate user data on; else about a tenth of --data is held out
    data_dir: str = "data/videollama_mini"  # where the synthetic world is written
    out_dir: str = "out/videollama_mini"  # checkpoint, eval.json, pictures
    n_train: int = 4000  # synthetic training clips (the other splits: below)
    n_val: int = 200  # validation loss during training
    n_test: int = 300  # the headline split: new clips of (colour, shape) pairs seen in training
    n_novel: int = 300  # clips with a held-out (colour, shape) pair, NOVEL_PAIRS
    n_frames: int = 8  # frames sampled uniformly from each clip
    img_size: int = 32  # frames are centre-cropped to a square and resized to this side
    d_model: int = 128  # model: the width of every layer
    n_head: int = 4
    cnn_width: int = 32  # channels of the first conv; later convs use 2x
    grid: int = 4  # adaptive pooling keeps a grid x grid map so that position (and so motion) survives pooling
    frame_diff: bool = True  # also feed frame[t] - frame[t-1] to the CNN: motion made explicit
    n_temporal_layer: int = 2
    qformer_mode: str = "text"  # "text": caption tokens query the visual tokens (write-up); "queries": BLIP-2 QFormer
    n_query: int = 8  # Q learned queries of the QFormer (--qformer_mode queries)
    n_qformer_layer: int = 2  # QFormer blocks (--qformer_mode queries)
    n_dec_layer: int = 2
    max_len: int = 32  # longest caption in tokens, BOS/EOS included
    dropout: float = 0.1  # on the attention weights, each MLP's output and the decoder's input embeddings
    compact_vocab: bool = True  # output table over the GPT-2 ids seen in training (False: all 50257)
    batch_size: int = 32  # training: micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch_size * grad_accum * world size)
    max_steps: int = 2400
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.05
    grad_clip: float = 1.0
    dtype: str = "auto"  # auto (bfloat16 where the hardware has it: autocast_dtype), float32, bfloat16, float16
    device: str = "auto"  # auto = cuda > mps > cpu
    compile: bool = False
    seed: int = 1337
    log_interval: int = 50
    eval_interval: int = 400  # validation loss every this many steps (and a checkpoint)
    stop_after: int = 0  # stop (and save) after this many steps, as if interrupted; --resume continues
    temperature: float = 0.0  # generation: 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    beam: int = 1  # beam width; >1 = beam search (deterministic)
    max_new_tokens: int = 30

CHOICES = {"qformer_mode": ("text", "queries"), "dtype": ("auto", "float32", "bfloat16", "float16")}  # config_problems
# default: the CPU run; tiny: seconds, for the tests, in folders of its own; original: what the VideoLLaMA-Mini write-up
# specifies (text tokens as Q-Former queries, the whole GPT-2 vocabulary, Adam; dropout, decay: future work); no sizes
PRESETS = {"default": {}, "original": dict(qformer_mode="text", compact_vocab=False, dropout=0.0, weight_decay=0.0),
    "tiny": dict(n_train=64, n_val=8, n_test=12, n_novel=12, n_frames=4, img_size=16, d_model=32, n_head=2, cnn_width=8,
                 grid=2, n_temporal_layer=1, n_query=4, n_qformer_layer=1, n_dec_layer=1, batch_size=8, max_steps=6,
                 warmup=2, log_interval=2, eval_interval=4, dtype="float32", data_dir="data/videollama_mini_tiny",
                 out_dir="out/videollama_mini_tiny")}

# Data: synthetic world, video loader, annotation files, tokenizer -----------------------------------------------------
COLOURS = {"red": (40, 40, 230), "green": (40, 200, 40), "blue": (230, 90, 30),  # BGR, as OpenCV draws
           "yellow": (30, 220, 230), "purple": (200, 50, 160), "white": (235, 235, 235)}
SHAPES = ["circle", "square", "triangle"]
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
VERBS = ("moves", "goes")  # two phrasings of each caption: two references per clip, as in captioning datasets
NOVEL_PAIRS = {("red", "triangle"), ("green", "circle"), ("blue", "square"),  # (colour, shape) pairs never in training:
               ("yellow", "triangle"), ("purple", "circle"), ("white", "square")}  # one per colour, two per shape
RENDER, CLIP_LEN, HALF, TRAVEL = 64, 16, 9, 26  # written frame side, frames per clip, shape half-size, pixels moved

def caption_for(objects, verb):  # [(colour, shape, motion, x0, y0)] -> 'a red circle moves left and ...', leftmost 1st
    return " and ".join(f"a {c} {s} {verb} {m}" for c, s, m, _, _ in sorted(objects, key=lambda o: o[3]))  # by x0

def sample_objects(rng, split):  # one or two objects whose pairs fit the split; two start >= 2*HALF apart in x
    n = 1 if rng.random() < 0.4 else 2  # 40% single-object clips
    while True:
        objs, colours = [], rng.sample(list(COLOURS), n)
        for colour in colours:
            shape, motion = rng.choice(SHAPES), rng.choice(list(MOTIONS))
            (dx, dy), lo, hi = MOTIONS[motion], HALF + 1, RENDER - HALF - 2  # lo..hi: centres 1 px clear of the edges
            x0, y0 = (rng.randint(lo + TRAVEL * (d < 0), hi - TRAVEL * (d > 0)) for d in (dx, dy))  # ends in lo..hi too
            objs.append((colour, shape, motion, x0, y0))
        novel = any((c, s) in NOVEL_PAIRS for c, s, *_ in objs)  # does an object use a held-out pair?
        if novel == (split == "novel") and (n == 1 or abs(objs[0][3] - objs[1][3]) >= 2 * HALF):
            return objs

def write_clip(path, objects):  # render CLIP_LEN frames of RENDER x RENDER, written as an mp4v mp4
    writer = cv2.VideoWriter(os.fsencode(path), cv2.VideoWriter_fourcc(*"mp4v"), 8, (RENDER, RENDER))  # 8 fps (2 s)
    for frac in (t / (CLIP_LEN - 1) for t in range(CLIP_LEN)):  # each frame's place along the path, 0 -> 1
        img = np.full((RENDER, RENDER, 3), 60, np.uint8)  # grey background
        for colour, shape, motion, x0, y0 in objects:
            (dx, dy), c = MOTIONS[motion], COLOURS[colour]  # c: the colour, BGR as OpenCV draws
            cx, cy = round(x0 + dx * TRAVEL * frac), round(y0 + dy * TRAVEL * frac)  # the shape's centre now
            if shape == "circle":
                cv2.circle(img, (cx, cy), HALF, c, -1, cv2.LINE_AA)
            elif shape == "square":
                cv2.rectangle(img, (cx - HALF + 1, cy - HALF + 1), (cx + HALF - 1, cy + HALF - 1), c, -1)
            else:  # a triangle, apex up
                pts = np.array([[cx, cy - HALF], [cx - HALF, cy + HALF - 1], [cx + HALF, cy + HALF - 1]], np.int32)
                cv2.fillPoly(img, [pts], c, cv2.LINE_AA)
        writer.write(img)
    writer.release()  # flushes the mp4

def build_world(cfg):  # write data_dir/<split>/*.mp4 and <split>.txt once (deterministic from cfg.seed)
    sizes, d = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test, "novel": cfg.n_novel}, cfg.data_dir
    stamp, want = os.path.join(d, "world.json"), dict(sizes, seed=cfg.seed, version=1, script=SCRIPT)  # the manifest
    if (old := read_json(stamp) or {}) == want:  # already written ({}: missing or damaged)
        return
    check_folder(d, "--data_dir", old.get("script") == SCRIPT,  # ours: its world.json names this script
                 "a folder this script did not write (no world.json of its own); give a new or empty one or use --data")
    os.makedirs(d, exist_ok=True)
    json.dump(dict(want, version=0), open(stamp, "w"))  # this script's, never matching until the world is complete
    for offset, (split, n) in enumerate(sizes.items()):
        rng, lines = random.Random(cfg.seed * 10 + offset), []  # one stream per split: --n_train moves no test clip
        os.makedirs(os.path.join(d, split), exist_ok=True)
        for i in range(n):
            objs, name = sample_objects(rng, split), f"{split}/{i:05d}.mp4"
            write_clip(os.path.join(d, name), objs)
            lines += [name, *(caption_for(objs, verb) for verb in VERBS), ""]  # the clip and its references
        open(os.path.join(d, f"{split}.txt"), "w").write("\n".join(lines))
    json.dump(want, open(stamp, "w"))

def sample_indices(n_total, n_frames, path="video"):  # centres of n_frames equal segments (a short clip repeats frames)
    if n_total <= 0:
        raise UserError(f"{path}: no frames (an empty video, or a folder with no .png/.jpg/.bmp/.webp/.tif images)")
    return [min(n_total - 1, int((i + 0.5) * n_total / n_frames)) for i in range(n_frames)]

def _square(img, size):  # BGR (H, W, 3) -> centre square -> (S, S, 3), S = size; INTER_AREA averages
    (h, w), s = img.shape[:2], min(img.shape[:2])  # s: the square's side
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]  # centre crop
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)

def read_frame(path):
    """One frame image -> BGR uint8 (H, W, 3). libjpeg fills a cut-off JPEG with grey, silently: the marker segments
    (FF xx, a 2-byte length) are skipped up to the start of scan FF DA, and an end of image FF D9 must follow."""
    data, i = open(path, "rb").read(), 2  # i: the next marker, after FF D8 (checked before libjpeg warns of it)
    while data[:2] == b"\xff\xd8" and i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] != 0xDA:
        i += 1 if data[i + 1] == 0xFF else 2 + int.from_bytes(data[i + 2:i + 4], "big")  # FF FF: a fill byte
    if data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[i:] or data[:4] == b"\x89PNG" and b"IEND" not in data:
        raise UserError(f"{path}: this image is cut off (no end-of-image marker); re-export or re-copy it")
    try:  # os.fsencode: OpenCV gets the name's bytes (a name that is not UTF-8, from an old zip, crashes it as a str)
        img = None if re.search(r"\.jpe?g$", path, re.I) else cv2.imread(os.fsencode(path), cv2.IMREAD_UNCHANGED)
        if img is None or img.ndim != 3 or img.shape[2] != 4 or img.dtype not in (np.uint8, np.uint16):
            img = cv2.imread(os.fsencode(path))  # no alpha: OpenCV's 8-bit BGR; None if it cannot read the file
    except cv2.error as e:  # OpenCV raises for an image over its size limit
        raise UserError(f"{path}: OpenCV cannot decode this image ({e.err}; it reads at most 2^30 pixels)") from None
    if img is None:
        raise UserError(f"{path}: cannot read this image")
    if img.shape[2] == 4:  # transparency composited onto white, as transformers' convert_to_rgb; + 127 rounds as PIL
        img = (img >> 8 * (img.dtype == np.uint16)).astype(np.int32)  # (H, W, 4) BGRA in 0..255 (16-bit: high byte)
        img = ((img[:, :, :3] * img[:, :, 3:] + 255 * (255 - img[:, :, 3:]) + 127) // 255).astype(np.uint8)
    return img

def load_video(path, n_frames, size):  # a video file OpenCV reads, or a folder of frames -> uint8 (F, S, S, 3) RGB
    if os.path.isdir(path):
        names = sorted((n for n in os.listdir(path) if re.match(r"[^.].*\.(png|jpe?g|bmp|webp|tiff?)$", n, re.I)
                        and os.path.isfile(os.path.join(path, n))),  # not frames: a folder x.png, a hidden ._x.png
                       key=lambda n: [int(t) if t.isdecimal() else t for t in re.split(r"(\d+)", n)])  # f2 before f10
        frames = [_square(read_frame(os.path.join(path, n)), size) for n in names]
    else:
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such video file or folder of frames")
        cap = cv2.VideoCapture(os.fsencode(path))  # FFmpeg: any container/codec; closed when it is freed, at return
        if not cap.isOpened() or cap.get(cv2.CAP_PROP_FOURCC) == cv2.VideoWriter_fourcc(*"ansi"):  # "ansi": a text file
            raise UserError(f"{path}: OpenCV cannot open this as a video (corrupt, unknown format, or text)")
        # grab() decodes the next frame (False after the last), retrieve() gives it as BGR uint8, shrunk at once
        frames = [_square(cap.retrieve()[1], size) for _ in iter(cap.grab, False)]  # a long 720p clip stays small
        if len(frames) < 0.9 * (listed := int(cap.get(cv2.CAP_PROP_FRAME_COUNT))):  # header guess, 10% slack; -1: none
            raise UserError(f"{path}: only {len(frames)} of the {listed} frames in its header decode (the file is cut "
                            "off or damaged)")  # a cut-off file opens and decodes its first part without an error
    return np.stack([frames[i][:, :, ::-1] for i in sample_indices(len(frames), n_frames, path)])  # (F, S, S, 3) RGB

def read_annotations(path, why=""):
    """The VideoLLaMA-Mini write-up's format: a video path line, one or more caption lines, a blank line between
    entries. Paths are relative to the annotation file. Returns [(video_path, [captions])], one entry per clip."""
    caps, cur, start = {}, [], 0  # video -> its captions; cur: the lines of the entry being read
    try:  # a byte-order mark (first, from some editors; mid-file after `cat a.txt b.txt`) is no part of a path
        lines = open(path, encoding="utf-8").read().replace("\ufeff", "").split("\n") + [""]  # "" ends the last entry
    except (OSError, UnicodeDecodeError) as e:  # OSError: missing, a folder, unreadable (why: what needs it)
        raise UserError(f"{path}: " + ("not a UTF-8 text file (save it as UTF-8)" if isinstance(e, UnicodeDecodeError)
                                       else "annotation file not found or unreadable" + why))
    for no, line in enumerate((s.strip() for s in lines), 1):
        if line:  # another line of the current entry (start: the line number of its first line)
            start, cur = (start if cur else no), cur + [line]
        elif cur:  # a blank line ends the entry
            if len(cur) < 2:
                raise UserError(f"{path}:{start}: entry '{cur[0]}' has a video path but no caption line")
            video = os.path.realpath(os.path.join(here := os.path.dirname(path), cur[0]))  # relative to the file
            if not os.path.exists(video):
                raise UserError(f"{path}:{start}: video not found: {video}" + " (use / in paths)" * ("\\" in cur[0]))
            for i, cap in enumerate(cur[1:], start + 1):  # a missing blank line would merge two entries
                near = os.path.join(here, cap)  # a file, or a folder of frames, beside the annotation file?
                if re.search(r"\.(mp4|avi|mov|mkv|webm|m4v)$", cap, re.I) or os.path.isfile(near) or os.path.isdir(
                        near) and any(re.search(r"\.(png|jpe?g|bmp|webp|tiff?)$", n, re.I) for n in os.listdir(near)):
                    raise UserError(f"{path}:{i}: '{cap}' looks like a video path; put a blank line between entries")
            caps.setdefault(video, []).extend(cur[1:])  # a clip listed twice: one entry, held out whole or not at all
            cur = []
    if not caps:
        raise UserError(f"{path}: no entries (expected a video path line followed by caption lines)")
    return list(caps.items())

EOS = BOS = 0  # model id of <|endoftext|>: the first entry of every token table, it starts and ends each caption

def gpt2():  # tiktoken's GPT-2 BPE: its two files are downloaded once, or read from TIKTOKEN_CACHE_DIR
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline with no cached files: say how to fix it, no traceback
        raise UserError(f"tiktoken could not load the GPT-2 encoding ({type(e).__name__}); offline, point "
                        f"TIKTOKEN_CACHE_DIR at a copy of its cache folder (two hash-named files)") from None

class Tokenizer:  # GPT-2 BPE (tiktoken), compact: model ids index `ids`, the GPT-2 ids seen in training
    def __init__(self, ids):
        self.enc, self.ids = gpt2(), list(ids)  # ids: model id -> GPT-2 id
        self.to_model = {g: i for i, g in enumerate(self.ids)}  # GPT-2 id -> model id
    @classmethod
    def from_captions(cls, captions, compact=True):
        enc = gpt2()
        seen = sorted({t for c in captions for t in enc.encode_ordinary(c)}) if compact else range(enc.n_vocab)
        return cls([enc.eot_token] + [i for i in seen if i != enc.eot_token])  # EOS first: model id 0
    def encode(self, text):  # caption -> [BOS, ..., EOS] in model ids; GPT-2 ids outside the table are dropped
        return [BOS] + [self.to_model[t] for t in self.enc.encode_ordinary(text) if t in self.to_model] + [EOS]
    def decode(self, ids):
        return self.enc.decode([self.ids[i] for i in ids if i != EOS]).strip()

def normalise(text):  # for the metrics: lower case, punctuation dropped (as COCO's caption evaluation), single spaces
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())  # "Ball, left." -> "ball left"

# Model ----------------------------------------------------------------------------------------------------------------
def to_unit(video):  # uint8 frames (B, F, S, S, 3) -> float (B, F, 3, S, S) in [-1, 1], channels first for Conv2d
    return video.permute(0, 1, 4, 2, 3).float() / 127.5 - 1.0

def sinusoid(n, d):  # the classic sinusoidal position table (n, d) of Vaswani et al.
    pos = torch.arange(n, dtype=torch.float32)[:, None]  # (n, 1)
    freq = torch.exp(torch.arange(0, d, 2, dtype=torch.float32) * (-math.log(10000.0) / d))
    return torch.stack((torch.sin(pos * freq), torch.cos(pos * freq)), -1).flatten(1)  # (n, d): sin, cos, sin, ...

class Attention(nn.Module):
    """Multi-head attention; self-attention when ctx is None, else cross-attention to ctx.
    `cache` (a dict per layer) holds past keys/values for self-attention and the context's keys/values for
    cross-attention, so a decode step computes only the new token. Set `record = True` to keep the weights."""
    def __init__(self, cfg):
        super().__init__()
        self.h, self.dropout = cfg.n_head, cfg.dropout  # H heads of width D/H
        self.q, self.k, self.v, self.proj = (nn.Linear(cfg.d_model, cfg.d_model) for _ in range(4))  # proj mixes heads
        self.record, self.weights = False, None  # attention_png switches recording on
    def split(self, x):  # (B, T, D) -> (B, H, T, D/H), T: the length of this sequence (F, Q or L)
        return x.view(x.shape[0], x.shape[1], self.h, -1).transpose(1, 2)
    def forward(self, x, ctx=None, causal=False, cache=None):
        q = self.split(self.q(x))  # (B, H, T, D/H)
        if ctx is None:  # self-attention: append the new keys/values to the cache
            k, v = self.split(self.k(x)), self.split(self.v(x))  # (B, H, T, D/H) each
            if cache is not None:
                if "k" in cache:
                    assert x.shape[1] == 1, "cached decoding feeds one token at a time"
                    k, v = torch.cat([cache["k"], k], 2), torch.cat([cache["v"], v], 2)
                    causal = False  # the new query sees every cached key (is_causal would keep only the first)
                cache["k"], cache["v"] = k, v  # (B, H, T_past + T, D/H)
        elif cache is not None and "ck" in cache:  # cross-attention: the video's keys/values, from the first step
            k, v = cache["ck"], cache["cv"]  # (B, H, F or Q, D/H)
        else:
            k, v = self.split(self.k(ctx)), self.split(self.v(ctx))  # (B, H, F or Q, D/H)
            if cache is not None:
                cache["ck"], cache["cv"] = k, v  # reused by every later decode step
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        if self.record:  # the same weights, explicit, only to draw the attention maps
            att = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])  # (B, H, T, keys)
            if causal:
                att = att.masked_fill(torch.ones_like(att, dtype=torch.bool).triu(1), float("-inf"))
            self.weights = att.softmax(-1).float().mean(1).detach()  # (B, T, keys), averaged over heads
        return self.proj(y.transpose(1, 2).reshape(x.shape))  # (B, T, D)

class Block(nn.Module):
    """Pre-LayerNorm Transformer block: self-attention (optionally causal), optional cross-attention, GELU MLP.
    The temporal encoder uses (self), the Q-Former (self + cross), the caption decoder (causal self + cross)."""
    def __init__(self, cfg, causal=False, cross=False):
        super().__init__()
        self.causal = causal  # the caption decoder's self-attention only
        self.ln1, self.attn = nn.LayerNorm(cfg.d_model), Attention(cfg)  # self-attention
        self.ln2, self.xattn = (nn.LayerNorm(cfg.d_model), Attention(cfg)) if cross else (None, None)
        self.ln3 = nn.LayerNorm(cfg.d_model)  # before the MLP
        self.mlp = nn.Sequential(nn.Linear(cfg.d_model, 4 * cfg.d_model), nn.GELU(),
                                 nn.Linear(4 * cfg.d_model, cfg.d_model), nn.Dropout(cfg.dropout))
    def forward(self, x, ctx=None, cache=None):  # cache: this layer's dict (self-attention k, v; cross ck, cv)
        x = x + self.attn(self.ln1(x), causal=self.causal, cache=cache)  # (B, T, D)
        if self.xattn is not None:
            x = x + self.xattn(self.ln2(x), ctx=ctx, cache=cache)  # read the context
        return x + self.mlp(self.ln3(x))  # (B, T, D)

class FrameEncoder(nn.Module):
    """(B, F, 3, S, S) -> (B, F, D): a small CNN per frame, adaptive average pooling to a grid x grid map (a 1x1
    pool would erase where the object is, and with it the motion) plus a global max, projected to one vector a frame."""
    def __init__(self, cfg):
        super().__init__()
        w, c_in = cfg.cnn_width, 6 if cfg.frame_diff else 3  # RGB, plus the RGB difference
        self.frame_diff, self.grid = cfg.frame_diff, cfg.grid  # grid: the pooled map's side
        # GroupNorm (batch-independent, so DDP ranks and batch sizes see the same function) keeps each conv's
        # output at unit scale: the raw colour and motion signal reaches the transformer strongly from step one.
        self.cnn = nn.Sequential(nn.Conv2d(c_in, w, 3, 2, 1), nn.GroupNorm(8, w), nn.GELU(),
                                 nn.Conv2d(w, 2 * w, 3, 2, 1), nn.GroupNorm(8, 2 * w), nn.GELU(),
                                 nn.Conv2d(2 * w, 2 * w, 3, 1, 1), nn.GroupNorm(8, 2 * w), nn.GELU())
        self.proj = nn.Linear(2 * w * (cfg.grid * cfg.grid + 1), cfg.d_model)
        # LayerNorm brings the frame embedding to unit scale, the scale of the sinusoidal time code added next:
        # without it the small initial CNN features drown under the time code and the decoder learns to ignore them.
        self.ln = nn.LayerNorm(cfg.d_model)
    def forward(self, x):
        # Subtract each frame's mean colour: the background then reads as ~0 and the small objects carry the signal;
        # otherwise every clip's embedding is "mostly background", nearly one vector for all clips, hiding the video.
        x = x - x.mean((-2, -1), keepdim=True)  # (B, F, 3, S, S)
        if self.frame_diff:  # x[t] - x[t-1] (0 at t=0): a moving shape's front and back show up with opposite signs
            diff = torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], 1)  # (B, F, 3, S, S)
            x = torch.cat([x, diff], 2)  # (B, F, 6, S, S)
        feat = self.cnn(x.flatten(0, 1).to(self.ln.weight.dtype))  # (B*F, 2w, S/4, S/4), w = cnn_width
        feat = feat - feat.mean((-2, -1), keepdim=True)  # what stands out from the frame's average, nothing else
        where = F.adaptive_avg_pool2d(feat, self.grid).flatten(1)  # (B*F, 2w*grid*grid): what is where
        what = feat.amax((-2, -1))  # (B*F, 2w): the strongest response anywhere, the same wherever the object is
        return self.ln(self.proj(torch.cat([where, what], 1))).unflatten(0, x.shape[:2])  # (B*F, D) -> (B, F, D)

class QFormer(nn.Module):
    """BLIP-2's Querying Transformer: Q learned query vectors (B, Q, D) attend to each other and read the visual tokens
    (B, F, D) by cross-attention, layer after layer; the decoder reads these Q vectors, a fixed-size summary however
    many frames. `--qformer_mode text` builds none: each caption token queries the frames itself, no bottleneck."""
    def __init__(self, cfg):
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, cfg.n_query, cfg.d_model) * 0.02)  # (1, Q, D), std 0.02
        self.blocks = nn.ModuleList(Block(cfg, cross=True) for _ in range(cfg.n_qformer_layer))
        self.ln = nn.LayerNorm(cfg.d_model)
        self.scale = nn.Parameter(torch.ones(1, cfg.n_query, cfg.d_model))  # per-query affine, set by init_from_data
        self.shift = nn.Parameter(torch.zeros(1, cfg.n_query, cfg.d_model))
    def forward(self, vis):  # vis: (B, F, D) visual tokens
        q = self.query.expand(vis.shape[0], -1, -1)  # (B, Q, D), the same queries for every clip
        for blk in self.blocks:
            q = blk(q, ctx=vis)  # (B, Q, D)
        return self.ln(q) * self.scale + self.shift  # (B, Q, D)

class VideoLLaMAMini(nn.Module):
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg = cfg  # the architecture fields decide every shape below
        self.frames = FrameEncoder(cfg)  # (B, F, 3, S, S) -> (B, F, D)
        self.register_buffer("time_pos", sinusoid(cfg.n_frames, cfg.d_model), persistent=False)
        self.temporal = nn.ModuleList(Block(cfg) for _ in range(cfg.n_temporal_layer))  # frames attend to each other
        self.ln_vis = nn.LayerNorm(cfg.d_model)  # the visual tokens' final norm
        if cfg.qformer_mode == "queries":
            self.qformer = QFormer(cfg)  # (B, F, D) -> (B, Q, D)
        self.tok = nn.Embedding(vocab_size, cfg.d_model)  # (V, D), not the Tokenizer; V: GPT-2 ids seen, or all
        self.register_buffer("text_pos", sinusoid(cfg.max_len, cfg.d_model), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)  # on the decoder's input
        self.decoder = nn.ModuleList(Block(cfg, causal=True, cross=True) for _ in range(cfg.n_dec_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)  # before the output table
        self.head = nn.Linear(cfg.d_model, vocab_size, bias=False)  # (V, D), untied from tok; V rows as in tok
        for m in self.modules():  # GPT-2's init (Conv2d keeps PyTorch's), then the two exceptions below
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)  # GPT-2's std: the head's first predictions near-uniform
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)  # biases start neutral
        # Vaswani et al.: token vectors of std D^-0.5 scaled up by sqrt(D) in decode(), so a token enters at the same
        # unit scale as the sinusoidal position code; at GPT-2's std 0.02 the position code would drown the word.
        nn.init.normal_(self.tok.weight, 0.0, cfg.d_model ** -0.5)
        depth = sum(isinstance(m, Block) for m in self.modules())  # all stacks' blocks: temporal, decoder [+ Q-Former]
        for name, p in self.named_parameters():  # GPT-2's rule over that depth: residual outputs at 0.02/sqrt(2*depth)
            if name.endswith("attn.proj.weight") or name.endswith("mlp.2.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * depth))
    @torch.no_grad()
    def init_from_data(self, video):
        """Data-dependent initialisation (Salimans & Kingma, 2016) of the affine parameters that end each stage. Every
        clip is mostly background, so at random init every clip embeds to nearly one vector and the decoder learns the
        caption prior alone. The per-feature mean and std over `video` (up to 256 training clips, dropout on), folded
        into the LayerNorms after the frame and temporal encoders and (per query) the QFormer's output scale and shift,
        make their outputs zero-mean, unit-variance *across clips*: a one-off weight change, no running stats."""
        def fold(weight, bias, x, dims):  # x: the clips' output of the affine (weight, bias)
            m, s = x.mean(dims), x.std(dims) + 1e-3  # over clips (dim 0) and positions (1): (D,) or (Q, D) each
            weight.div_(s)  # y = (x - m) / s, folded into the affine
            bias.sub_(m).div_(s)
        fold(self.frames.ln.weight, self.frames.ln.bias, self.frames(to_unit(video)), (0, 1))  # x: (B, F, D)
        fold(self.ln_vis.weight, self.ln_vis.bias, self.encode(video, use_qformer=False), (0, 1))
        if self.cfg.qformer_mode == "queries":  # each query has its own constant part: centre per query, (B, Q, D)
            fold(self.qformer.scale, self.qformer.shift, self.encode(video), 0)
    def encode(self, video, use_qformer=True):  # uint8 (B, F, S, S, 3) -> (B, Q, D) by the QFormer, else (B, F, D)
        vis = self.frames(to_unit(video)) + self.time_pos[: video.shape[1]]  # (B, F, D)
        for blk in self.temporal:  # attention is order-blind: the time code above tells frame 1 from frame F
            vis = blk(vis)
        vis = self.ln_vis(vis)  # (B, F, D)
        return self.qformer(vis) if self.cfg.qformer_mode == "queries" and use_qformer else vis  # False: init_from_data
    def decode(self, idx, memory, cache=None, pos=0, last_only=False):  # (B, L) ids at pos.. -> logits (B, L or 1, V)
        x = self.drop(self.tok(idx) * math.sqrt(self.cfg.d_model) + self.text_pos[pos: pos + idx.shape[1]])  # (B, L, D)
        for i, blk in enumerate(self.decoder):
            x = blk(x, ctx=memory, cache=None if cache is None else cache[i])
        return self.head(self.ln_f(x[:, -1:] if last_only else x))  # (B, L or 1, D) -> (B, L or 1, V)
    def forward(self, video, idx, targets=None):  # targets -100 at pads: cross_entropy's default ignore_index
        logits = self.decode(idx, self.encode(video))  # (B, L, V)
        return logits, (None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()))
    def record_attention(self, on):
        for m in (m for m in self.modules() if isinstance(m, Attention)):
            m.record, m.weights = on, None

# Checkpoint I/O: out_dir/model.safetensors + config.json (+ the token table) + train_state.pt -------------------------
def atomic(path, write):
    write(path + ".tmp")  # the same folder, so os.replace is atomic
    os.replace(path + ".tmp", path)  # a crash never leaves a half-written file

def save_checkpoint(model, tok, cfg, opt, step, scaler, batch=None, seconds=0.0):  # train_state.pt: what --resume needs
    os.makedirs(out := cfg.out_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic(os.path.join(out, "model.safetensors"), lambda p: save_file(state, p))
    for old in filter(os.path.isfile, (os.path.join(out, n) for n in ("eval.json", "attention.png", "train_state.pt"))):
        os.remove(old)  # the old weights' scores and attention map, and their state (it would --resume the new)
    meta = {"script": SCRIPT, "config": dataclasses.asdict(cfg), "vocab": tok.ids}
    atomic(os.path.join(out, "config.json"), lambda p: json.dump(meta, open(p, "w")))
    ts = dict(optimizer=opt.state_dict(), scaler=scaler.state_dict(), step=step, rng=torch.get_rng_state(), batch=batch,
              seconds=seconds)  # seconds: the run's time so far, data included; --resume adds on to it
    atomic(os.path.join(out, "train_state.pt"), lambda p: torch.save(ts, p))

def load_checkpoint(out_dir, overrides=None, fixed=()):  # -> (model, tokenizer, cfg): the saved config, overrides on
    # top, but an override of a `fixed` field that differs is refused, as is a missing, damaged or foreign checkpoint
    cpath, wpath = os.path.join(out_dir, "config.json"), os.path.join(out_dir, "model.safetensors")
    if not (os.path.isfile(cpath) and os.path.isfile(wpath)):
        raise UserError(f"{out_dir}: no checkpoint here (run --train first, or pass --out_dir)")
    if (meta := read_json(cpath) or {}).get("script") != SCRIPT:  # {}: not a JSON object
        raise UserError(f"{cpath}: " + (f"written by {meta['script']}.py, not {SCRIPT}.py" if meta.get("script") else
                                        f"not a JSON object as {SCRIPT}.py --train writes it"))
    if not (isinstance(meta.get("config"), dict) and isinstance(meta.get("vocab"), list)):
        raise UserError(f"{cpath}: damaged, no 'config' object or 'vocab' list (retrain with --train)")
    known, typed = {f.name for f in dataclasses.fields(Config)}, overrides or {}  # a key this version lacks: ignored
    saved = Config(**{k: v for k, v in meta["config"].items() if k in known})
    types = [f"{f.name} {v!r}: must be of type {f.type.__name__}" for f in dataclasses.fields(saved)  # bool: no int
             if type(v := getattr(saved, f.name)) is not f.type and (f.type, type(v)) != (float, int)]
    if bad := types or config_problems(saved):  # then a value no flag could give (each message names the flag)
        raise UserError(f"{cpath}: {bad[0]}; the file is damaged or hand-edited: restore it, or retrain with --train")
    if clash := [f"{as_typed(k, v)} ({'world ' if k in WORLD else ''}saved as {as_typed(k, getattr(saved, k))})"
                 for k, v in typed.items() if k in fixed and v != getattr(saved, k)]:
        raise UserError(f"{out_dir}: this mode keeps the value the run was saved with; drop {clash[0]}")
    cfg = dataclasses.replace(saved, **{**{k: v for k, v in typed.items() if k not in fixed}, "out_dir": out_dir})
    tok, model = Tokenizer(meta["vocab"]), VideoLLaMAMini(cfg, len(meta["vocab"]))  # the weights' own token table
    try:
        state = load_file(wpath)
    except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
        raise UserError(f"{wpath}: not a readable safetensors file ({e})")
    own = model.state_dict()  # what this architecture expects
    bad = {"missing": sorted(set(own) - set(state)), "unexpected": sorted(set(state) - set(own)),
           "mis-shaped": sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)}
    if any(bad.values()):  # never a silent partial load
        raise UserError(f"{wpath}: keys do not match the model {bad}")
    model.load_state_dict(state)  # strict: every key checked above
    check_decoding(cfg)  # the decoding flags that will run: the saved ones, typed ones on top
    return model, tok, cfg

# Metrics: exact match, corpus BLEU-4, CIDEr-D (plain Python, tested on hand-computed cases) ---------------------------
def ngrams(words, n):  # {n-gram tuple: count} of a word list.
    return Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))

def exact_match(preds, refs):
    return sum(normalise(p) in {normalise(r) for r in rs} for p, rs in zip(preds, refs)) / max(1, len(preds))

def bleu4(preds, refs):
    """Corpus BLEU-4 (Papineni et al.): clipped n-gram precision over the corpus, brevity penalty against the
    reference closest in length (shorter on ties). Unsmoothed: a matchless order gives 0; an empty one is left out."""
    match, total, hyp_len, ref_len = [0] * 4, [0] * 4, 0, 0
    for p, rs in zip(preds, refs):
        h, rws = normalise(p).split(), [normalise(r).split() for r in rs]
        hyp_len += len(h)
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rws)[1]
        for n in range(1, 5):
            counts = [ngrams(r, n) for r in rws]  # an n-gram counts at most as often as the reference holding it most
            match[n - 1] += sum(min(c, max(r[g] for r in counts)) for g, c in ngrams(h, n).items())  # clipped matches
            total[n - 1] += max(0, len(h) - n + 1)
    orders = [(m, t) for m, t in zip(match, total) if t]  # orders with an n-gram anywhere in the predictions
    if not orders or min(m for m, _ in orders) == 0:
        return 0.0
    bp = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / max(hyp_len, 1))  # brevity penalty
    return bp * math.exp(sum(math.log(m / t) for m, t in orders) / len(orders))  # x the precisions' geometric mean

def cider_d(preds, refs, sigma=6.0):
    """CIDEr-D (Vedantam et al.): TF-IDF n-gram vectors (n=1..4, IDF from the evaluated set's references), cosine
    with clipped hypothesis counts, a Gaussian length-difference penalty, averaged over references and n, times 10."""
    ref_words = [[normalise(r).split() for r in rs] for rs in refs]  # df: how many clips' references hold each n-gram
    df = Counter(g for rws in ref_words for g in {g for r in rws for n in range(1, 5) for g in ngrams(r, n)})
    log_n = math.log(float(len(refs)))  # IDF numerator
    def vec(words):  # -> one TF-IDF vector per n-gram order, their norms, the length (df[g]: 0 if g is unseen)
        v = [{g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in ngrams(words, n).items()} for n in range(1, 5)]
        return v, [math.sqrt(sum(x * x for x in d.values())) for d in v], len(words)
    scores = []
    for p, rws in zip(preds, ref_words):
        (hv, hn, hl), total = vec(normalise(p).split()), 0.0  # vectors, norms, length; total over references and n
        for rv, rn, rl in map(vec, rws):  # each reference's vectors, norms and length
            for n in range(4):
                val = sum(min(x, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, x in hv[n].items())
                val /= hn[n] * rn[n] or 1.0  # cosine; an empty vector (no n-grams of this n) scores 0
                total += val * math.exp(-((hl - rl) ** 2) / (2 * sigma ** 2))
        scores.append(total / 4 / len(rws) * 10.0)  # mean over n and refs, x10
    return sum(scores) / max(1, len(scores))

# Training -------------------------------------------------------------------------------------------------------------
def pick_device(name):  # --device auto: cuda > mps > cpu; a named one (cpu, mps, cuda, cuda:N) must exist here
    mps, gpus = torch.backends.mps.is_available(), [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    have = ["auto", "cpu"] + ["mps"] * mps + ["cuda"] * bool(gpus) + gpus  # the names --device accepts here
    if name not in have:
        raise UserError(f"--device {name}: not available on this machine; choose one of {', '.join(have)}")
    return name if name != "auto" else "cuda" if gpus else "mps" if mps else "cpu"

def autocast_dtype(name, device):
    """--dtype auto: bfloat16 where the hardware multiplies in it (a CUDA GPU of compute capability 8+, a CPU with
    AVX512-BF16 or AMX), float32 elsewhere, where bfloat16 would be emulated and several times slower."""
    if name != "auto":
        return name
    native = (torch.cuda.get_device_capability(device)[0] >= 8 if device.startswith("cuda") else
              device == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()))
    return "bfloat16" if native else "float32"

def autocast(cfg, device):
    dtype = autocast_dtype(cfg.dtype, device)  # float32: autocast off
    return torch.autocast(device.split(":")[0], dtype=getattr(torch, dtype), enabled=dtype != "float32")

def pad_batch(seqs):
    """Token lists (none over max_len: check_lengths) -> (inputs, targets), right-padded with 0 (BOS/EOS), the pad
    targets -100 (ignored by the loss). No attention mask: under the causal mask a pad reaches no real token."""
    seqs = [torch.tensor(s, dtype=torch.long) for s in seqs]  # inputs drop the last token, targets the first: (B, L)
    return (nn.utils.rnn.pad_sequence([s[:-1] for s in seqs], batch_first=True),
            nn.utils.rnn.pad_sequence([s[1:] for s in seqs], batch_first=True, padding_value=-100))

def check_lengths(tok, data, cfg, grow=False):  # refused: a caption with no room in --max_len, or that decoding cuts
    for s, pick in [(s, {"train": max, "val": next}.get(s, min)) for s in data]:  # val: the first (its loss)
        n = max(pick(2 + len(tok.enc.encode_ordinary(c)) for c in cs) for _, cs in data[s][0])  # test/novel: shortest
        what = f"a {s.replace('train', 'training')} caption is {n} tokens long (GPT-2 tokens, BOS and EOS included)"
        if n > cfg.max_len:  # the model has no position for its end: a new run may grow, a trained one cannot
            raise UserError(f"{what}: --max_len {cfg.max_len} must be at least {n}" if grow else f"{what}, more than "
                            f"the model writes ({cfg.max_len}): edit {s != 'train' and cfg.test_data or cfg.data}")
        if n - 1 > cfg.max_new_tokens and s != "val":  # generation would stop before its end (val is never decoded)
            raise UserError(f"{what}: --max_new_tokens {cfg.max_new_tokens} must be at least {n - 1}")

def lr_at(step, cfg):  # Linear warmup, then cosine decay to min_lr.
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))  # progress through the decay, 0..1
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (cfg.lr - cfg.min_lr)

def global_batch(step, n, size, seed):  # a step's clip indices: a fresh permutation per epoch, the same on all ranks
    n_all = n * -(-size // n)  # what an epoch draws from: the set, copied ceil(size / n) times if smaller than a batch
    epoch, k = divmod(step, n_all // size)  # the epoch, the batch in it; the last n_all % size of an epoch go unused
    return (torch.randperm(n_all, generator=torch.Generator().manual_seed(seed + epoch)) % n)[k * size:(k + 1) * size]

def prepare_data(cfg, rank, typed=(), keep=("train", "val", "test", "novel")):  # -> {split in keep: (entries, clips)}
    if cfg.test_data and not cfg.data:  # the synthetic world has its own test split: never silently ignored
        raise UserError(f"--test_data {cfg.test_data}: only with --data FILE (your training data) as well")
    if cfg.data and (world := [f"--{k}" for k in ("data_dir", *WORLD[1:]) if k in typed]):  # typed flags unused
        raise UserError(f"{world[0]}: the synthetic world's, unused with --data {cfg.data}; drop it")
    if cfg.data:  # user data; --eval (no "train" in keep) opens --data only for the entries held out of it
        scoring, why = "train" not in keep, "; --eval scores the entries held out of it, or pass --test_data FILE"
        entries = [] if scoring and cfg.test_data else read_annotations(cfg.data, why if scoring else "")
        draw = [random.Random(os.path.relpath(v, os.path.realpath(cfg.data))).random() for v, _ in entries]  # by path
        cut = max(0.1, min(draw, default=0))  # held out: up to 0.1, or the lowest; new entries can only lower the cut
        test = read_annotations(cfg.test_data) if cfg.test_data else [e for e, d in zip(entries, draw) if d <= cut]
        entries = entries if cfg.test_data else [e for e, d in zip(entries, draw) if d > cut]
        if not (entries or scoring):  # all held out (a single entry, say): --eval would score it all the same
            raise UserError(f"{cfg.data}: too few entries to hold out a test set; add entries or pass --test_data")
        splits = {"train": entries, "val": test[: max(1, len(test) // 2)], "test": test}  # val: for the loss log
    else:
        if rank == 0:  # rank 0 alone writes the world (all its splits, once)
            build_world(cfg)
        if dist.is_initialized():
            dist.barrier()  # wait for rank 0's files
        splits = {s: read_annotations(os.path.join(cfg.data_dir, f"{s}.txt")) for s in keep}
    return {s: (e, torch.from_numpy(np.stack([load_video(v, cfg.n_frames, cfg.img_size) for v, _ in e])))
            for s, e in splits.items() if s in keep}  # clips: uint8 (N, F, S, S, 3), decoded once for all epochs

ARCH = ("n_frames", "img_size", "d_model", "n_head", "cnn_width", "grid", "frame_diff", "n_temporal_layer",
        "qformer_mode", "n_query", "n_qformer_layer", "n_dec_layer", "max_len", "compact_vocab")  # fixed by the weights
WORLD = ("seed", "n_train", "n_val", "n_test", "n_novel")  # the synthetic world's: --resume and --eval keep the run's
TRAINING = ("batch_size", "grad_accum", "max_steps", "lr", "min_lr", "warmup", "weight_decay", "grad_clip", "compile",
            "log_interval", "eval_interval", "stop_after", "dropout")  # --train's (--bench: batch_size, dropout)
DATA = ("data", "test_data", "data_dir")  # what --eval reads and --generate does not
BENCH = ARCH + ("batch_size", "dropout", "dtype", "device", "temperature", "top_k", "top_p")  # all that --bench reads

def start_config(cfg, typed=None, resume=False):
    """Checked before any data. A fresh run: out_dir must be missing, empty or this script's. --resume: out_dir's saved
    config, the typed flags on top (None: all of cfg; --stop_after only if typed), a different ARCH or WORLD refused."""
    out, path = cfg.out_dir, os.path.join(cfg.out_dir, "train_state.pt")
    ours = resume or (read_json(os.path.join(out, "config.json")) or {}).get("script") == SCRIPT  # its config names it
    check_folder(out, "--out_dir", ours, f"holds files but no {SCRIPT} checkpoint; give a new or empty folder")
    if not resume:
        return dataclasses.replace(cfg, data_dir=os.path.abspath(cfg.data_dir)), None  # saved so: found from anywhere
    if not os.path.isfile(path):
        raise UserError(f"{cfg.out_dir}: nothing to resume (no train_state.pt); drop --resume to start afresh")
    typed = dataclasses.asdict(cfg) if typed is None else {"stop_after": 0, **typed, "out_dir": out}
    model, tok, saved = load_checkpoint(out, typed, ARCH + WORLD)  # --resume keeps the run's architecture and world
    try:  # torch raises several error types for a truncated file; another run's does not fit this model's AdamW
        ts = dict(torch.load(path, map_location="cpu", weights_only=True))  # saved on a GPU too; dict(): not a tensor
        (opt := torch.optim.AdamW(decay_groups(model, 0.0))).load_state_dict(ts["optimizer"])  # counts, not shapes:
        if any(s["exp_avg"].shape != p.shape for p, s in opt.state.items()):  # another run's widths: other shapes
            raise ValueError("AdamW moments of other shapes")
        ts = dict(ts, step=int(ts["step"]), rng=ts["rng"], seconds=float(ts.get("seconds", 0.0)))
    except Exception:  # and a KeyError: a file that is no training state
        raise UserError(f"{path}: damaged or another run's; drop --resume to start afresh (copy the folder to keep it)")
    if (step := ts["step"]) >= saved.max_steps or 0 < saved.stop_after <= step:  # nothing left to train
        raise UserError(f"{out}: at step {step} already; pass a larger " + ("--max_steps, or --eval to score it as it"
                        " is" if step >= saved.max_steps else f"--stop_after than {saved.stop_after} or drop it"))
    return saved, (model, tok, ts)

def decay_groups(model, weight_decay):
    """AdamW groups, minGPT's rule: weight decay on the weight matrices of Linear and Conv2d layers only. Biases,
    norms, the token table, the learned queries and the per-query scale/shift are not pulled towards zero."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    return [{"params": [p for p in model.parameters() if id(p) in decay], "weight_decay": weight_decay},
            {"params": [p for p in model.parameters() if id(p) not in decay], "weight_decay": 0.0}]

def setup_distributed(cfg):  # -> (ddp, rank, world, device): torchrun sets WORLD_SIZE; gloo on CPU, nccl on CUDA
    device = pick_device(cfg.device)
    if ddp := int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device != "cpu" and (gpus := torch.cuda.device_count()) < int(os.environ.get("LOCAL_WORLD_SIZE", "1")):
            raise UserError(f"torchrun: one CUDA GPU per process, {gpus} here: start fewer or pass --device cpu")
        dist.init_process_group("nccl" if device != "cpu" else "gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ddp else (0, 1)  # one process unless torchrun
    if cfg.compile and device == "cpu":  # inductor's CPU kernels are C++: a missing compiler is refused before step 1
        try:
            torch._inductor.cpp_builder.get_cpp_compiler()
        except torch._inductor.exc.InvalidCxxCompiler as e:
            raise UserError(f"--compile: {e}; install g++ or clang++ (or set CXX), or pass --no-compile") from None
    if device.startswith("cuda") and ddp:  # one GPU per rank
        torch.cuda.set_device(device := f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return ddp, rank, world, device

def build_or_resume(cfg, resumed, train_entries, train_clips, device):
    """-> (model, tokenizer, optimizer, loss scaler, step): a fresh model initialised from data, or start_config's."""
    if resumed:
        model, tok, ts = resumed
        for c in (c for _, cs in train_entries for c in cs):  # encode() would drop the GPT-2 ids the table lacks
            if lost := [t for t in tok.enc.encode_ordinary(c) if t not in tok.to_model]:
                raise UserError(f"{cfg.data or cfg.data_dir}: '{tok.enc.decode(lost[:1]).strip()}' (in '{c}'): the "
                                f"checkpoint in {cfg.out_dir} has no token for it; train afresh with another --out_dir")
    else:
        tok = Tokenizer.from_captions([c for _, cs in train_entries for c in cs], cfg.compact_vocab)
        model = VideoLLaMAMini(cfg, len(tok.ids))
        init_idx = torch.randperm(len(train_entries), generator=torch.Generator().manual_seed(cfg.seed))[:256]
        model.init_from_data(train_clips[init_idx])  # the same clips on every rank: the same statistics folded in
    model.to(device)
    opt = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=cfg.dtype == "float16")  # loss scaling for float16
    if resumed:  # the optimizer's moments; dropout on a CPU continues the unbroken run's stream (its RNG is saved)
        opt.load_state_dict(ts["optimizer"]), torch.set_rng_state(ts["rng"])
        if ts.get("scaler"):  # float16: the loss scale goes on where it stopped (other dtypes save none)
            scaler.load_state_dict(ts["scaler"])
    return model, tok, opt, scaler, ts["step"] if resumed else 0

def train(cfg, typed=None, resume=False):  # build (or resume), train with gradient accumulation and DDP, save, evaluate
    cfg, resumed = start_config(cfg, typed, resume)  # refused before data is touched
    check_decoding(cfg)
    ddp, rank, world, device = setup_distributed(cfg)
    gsize = cfg.batch_size * cfg.grad_accum * world  # G clips a step; a new G reorders the data: --resume refuses it
    if resumed and (g := resumed[2].get("batch") or gsize) != gsize:  # (a state saved with batch=None has none)
        raise UserError(f"{cfg.out_dir}: trained at global batch {g} (batch_size*grad_accum*processes), not {gsize}")
    say = print if (master := rank == 0) else (lambda *a, **k: None)  # rank 0 alone prints, evaluates and saves
    say("config:", json.dumps(dataclasses.asdict(cfg)))  # on --resume: the saved config, the typed flags on top
    t0, seconds0 = time.time(), resumed[2]["seconds"] if resumed else 0.0  # train_seconds counts data too
    torch.manual_seed(cfg.seed)  # the initial weights and dropout follow --seed
    data = prepare_data(cfg, rank, typed or ())  # {split: (entries, uint8 clips)}
    train_entries, train_clips = data["train"]
    say(f"data: " + ", ".join(f"{s} {len(e)}" for s, (e, _) in data.items()) + f" clips ({time.time() - t0:.1f}s)")
    model, tok, opt, scaler, step = build_or_resume(cfg, resumed, train_entries, train_clips, device)
    say(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, all trained; vocab {len(tok.ids)}; "
        f"{device}, autocast {autocast_dtype(cfg.dtype, device)}" + (f"; resumed from step {step}" if resume else ""))
    raw = model  # the plain module: what is saved and evaluated
    if ddp:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    fwd = torch.compile(model) if cfg.compile else model  # --compile: same module, compiled forward
    check_lengths(tok, data, cfg, grow=not resume)
    train_tokens = [[tok.encode(c) for c in cs] for _, cs in train_entries]
    t_log, log_step = time.time(), step  # for the log's ms a step and eta
    while step < cfg.max_steps:
        idx = global_batch(step, len(train_entries), gsize, cfg.seed)  # (gsize,) clip indices, the same on every rank
        caption_rng = random.Random(cfg.seed * 100003 + step)  # which reference each clip shows: set by (seed, step)
        inp_all, tgt_all = pad_batch([caption_rng.choice(train_tokens[i]) for i in idx.tolist()])  # (G, L)
        n_tok = (tgt_all != -100).sum().item()  # loss is a mean over the global batch's tokens, whatever the split
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)  # warmup then cosine
        model.train()  # dropout on
        total = torch.zeros((), device=device)  # the step's mean loss, for the log
        for micro in range(cfg.grad_accum):  # DDP all-reduces once, on the last (else: enable_grad, a no-op context)
            rows = slice((micro * world + rank) * cfg.batch_size, (micro * world + rank + 1) * cfg.batch_size)
            video, inp, tgt = train_clips[idx[rows]].to(device), inp_all[rows].to(device), tgt_all[rows].to(device)
            with model.no_sync() if ddp and micro < cfg.grad_accum - 1 else torch.enable_grad(), autocast(cfg, device):
                logits, _ = fwd(video, inp)  # (B, L, V)
                loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt.flatten(), ignore_index=-100,
                                       reduction="sum") / n_tok * world  # DDP averages grads over ranks: * world undoes
            scaler.scale(loss).backward()  # gradients add up across micro-batches
            total += loss.detach() / world  # this rank's share of the global mean
        if ddp:  # sum the shares: the log and the NaN check see the global batch's loss on every rank
            dist.all_reduce(total)
        if not math.isfinite(total):
            raise UserError(f"loss became {total.item()} at step {step}: stopped; {cfg.out_dir} keeps its last save "
                            "(try a lower --lr)")
        scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(raw.parameters(), cfg.grad_clip)  # global-norm clipping
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)  # frees the gradient memory between steps
        step += 1
        dt = (time.time() - t_log) / (step - log_step)  # seconds a step since the last log line, before val and save
        stop = cfg.stop_after and cfg.stop_after <= step < cfg.max_steps  # as if interrupted: save, --resume goes on
        measure = master and (step % cfg.eval_interval == 0 or step == cfg.max_steps)  # the val loss, and a save
        val = evaluate_loss(raw, tok, *data["val"], cfg, device) if measure else None  # logged where it is measured
        if master and (measure or stop):
            save_checkpoint(raw, tok, cfg, opt, step, scaler, batch=gsize, seconds=seconds0 + time.time() - t0)
        if master and (step % cfg.log_interval == 0 or measure):  # measure: also at max_steps
            eta = round(dt * (cfg.max_steps - step))  # seconds left at this pace; lr below: the step just taken
            say(f"step {step}/{cfg.max_steps} | loss {total:.3f} | val {'-' if val is None else f'{val:.3f}'} | "
                f"lr {lr_at(step - 1, cfg):.1e} | {dt * 1000:.0f} ms | {gsize / dt:.0f} samples/s | "
                f"eta {eta // 60}m{eta % 60:02d}s")
            t_log, log_step = time.time(), step
        if stop:
            say(f"stopped after step {step} as asked; go on with --train --resume --out_dir {shlex.quote(cfg.out_dir)}")
            break
    train_seconds = seconds0 + time.time() - t0  # data + training, without the final evaluation
    if ddp:  # every rank has finished training: all leave the group together, then rank 0 evaluates alone
        dist.barrier()
        dist.destroy_process_group()
    if master and step >= cfg.max_steps:
        before = f"; {seconds0:.0f}s of it before --resume" if seconds0 else ""  # as saved when it stopped
        say(f"trained in {train_seconds:.0f}s (data included{before})")
        evaluate(raw, tok, cfg, device, data, train_seconds)
    return raw, tok

@torch.no_grad()
def evaluate_loss(model, tok, entries, clips, cfg, device):  # the mean token loss
    model.eval()  # dropout off
    inp, tgt = pad_batch([tok.encode(cs[0]) for _, cs in entries])  # first reference of each clip
    with autocast(cfg, device):
        loss = model(clips.to(device), inp.to(device), tgt.to(device))[1].item()
    if not math.isfinite(loss):  # the weights diverged within the last steps: they are not saved
        raise UserError(f"validation loss {loss}: stopped; {cfg.out_dir} keeps its last save (try a lower --lr)")
    return loss

# Generation and evaluation --------------------------------------------------------------------------------------------
def filter_logits(logits, top_k, top_p):  # keep the top_k largest and the smallest set of mass top_p; the rest -> -inf
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), -1).values[..., -1:]  # (B, 1): the k-th largest
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = logits.softmax(-1).sort(-1, descending=True)  # (B, V) in descending order
        drop = probs.cumsum(-1) - probs >= top_p  # tokens after the nucleus is already full
        drop[..., 0] = False  # the most likely token always stays, however small top_p is
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # back to vocabulary order
    return logits

@torch.no_grad()
def generate(model, video, cfg, use_cache=True, generator=None, stop_at_eos=True):
    """Batched captioning from BOS until EOS (per row) or max_new_tokens (< max_len): greedy at temperature 0, else
    sampling from `generator` (top-k, top-p); beam search for beam > 1 -> id lists; stop_at_eos=False: all steps."""
    model.eval()
    if cfg.beam > 1:
        return beam_search(model, video, cfg)
    B, memory = video.shape[0], model.encode(video)  # the video is encoded once: (B, Q or F, D)
    cache = [{} for _ in model.decoder] if use_cache else None  # one dict of keys/values per decoder layer
    seq = torch.full((B, 1), BOS, dtype=torch.long, device=video.device)  # (B, 1), grows to (B, 1 + steps)
    done = torch.zeros(B, dtype=torch.bool, device=video.device)  # rows that have emitted EOS
    for t in range(min(cfg.max_new_tokens, cfg.max_len - 1)):  # the position table holds max_len positions
        inp, pos = (seq[:, -1:], t) if use_cache else (seq, 0)  # cached: the newest token alone; else the whole prefix
        logits = model.decode(inp, memory, cache, pos=pos, last_only=True)[:, -1].float()  # (B, V): the next token's
        if cfg.temperature == 0:
            nxt = logits.argmax(-1)  # greedy: (B,)
        else:
            logits = (logits - logits.amax(-1, keepdim=True)) / cfg.temperature  # max 0: safe at a tiny temperature
            probs = filter_logits(logits, cfg.top_k, cfg.top_p).softmax(-1)  # (B, V)
            nxt = torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,) sampled
        nxt = nxt.masked_fill(done, EOS)  # a finished row only pads with EOS
        done |= nxt == EOS
        seq = torch.cat([seq, nxt[:, None]], 1)  # (B, t + 2)
        if stop_at_eos and done.all():
            break
    return [[i for i in row[1:] if i != EOS] for row in seq.tolist()]

def beam_search(model, video, cfg, length_penalty=1.0):
    """Beam search with the KV cache, called by generate (eval mode, no grad): B*beam rows; the cache is re-ordered
    by each step's surviving beams. Finished: log-prob / (tokens + EOS)**length_penalty (raw sums favour short ones)."""
    B, K = video.shape[0], cfg.beam  # K beams a clip; only one starts live, else step 0 picks one token K times
    memory = model.encode(video).repeat_interleave(K, 0)  # (B*K, Q or F, D)
    cache = [{} for _ in model.decoder]  # self- and cross-attention keys/values per layer
    seq = torch.full((B * K, 1), BOS, dtype=torch.long, device=video.device)  # (B*K, 1): K equal rows a clip
    score = torch.tensor([0.0] + [float("-inf")] * (K - 1), device=video.device).repeat(B, 1)  # (B, K): one alive
    finished = [[] for _ in range(B)]
    for t in range(min(cfg.max_new_tokens, cfg.max_len - 1)):  # BOS takes one of the max_len positions
        logp = model.decode(seq[:, -1:], memory, cache, pos=t)[:, -1].float().log_softmax(-1)  # (B*K, V)
        V = logp.shape[-1]  # vocabulary size; topk(2K) below: at most K end in EOS, so K can stay live
        top, flat = (score.view(-1, 1) + logp).view(B, K * V).topk(2 * K, -1)  # (B, 2K); flat = beam*V + token
        kept = []  # (score, row, token) of the K live beams of each clip, in clip order
        for b in range(B):
            keep = []
            for s, p in zip(top[b].tolist(), flat[b].tolist()):
                beam, token = divmod(p, V)  # which beam it extends, with which token
                if s == float("-inf") or len(keep) == K:
                    break
                if token == EOS:
                    finished[b].append((s / (t + 1) ** length_penalty, seq[b * K + beam, 1:].tolist()))
                else:
                    keep.append((s, b * K + beam, token))
            kept += keep + [(float("-inf"), b * K, EOS)] * (K - len(keep))  # dead fillers if too few survive
        score, rows, new_tok = (torch.tensor(x, device=video.device) for x in zip(*kept))  # (B*K,) each: the survivors
        for layer in cache:  # re-order the self-attention cache (the cross-attention K/V are equal across beams)
            layer["k"], layer["v"] = layer["k"][rows], layer["v"][rows]
        seq, score = torch.cat([seq[rows], new_tok[:, None]], 1), score.view(B, K)  # (B*K, t + 2), (B, K)
        best_live = score.max(-1).values / (t + 2) ** length_penalty  # a stopping heuristic, not a bound
        if all(finished[b] and max(f[0] for f in finished[b]) >= best_live[b] for b in range(B)):
            break
    return [max(f)[1] if f else seq[b * K + score[b].argmax().item(), 1:].tolist()  # none ended: the best live beam
            for b, f in enumerate(finished)]  # each clip's best-scoring finished hypothesis

def attention_png(model, clip, tok, cfg, device, path, cell=40, label_w=110):
    """A row per caption token ("text": the decoder's last cross-attention; row i predicts token i) or learned query
    ("queries": the last Q-Former layer), a column per frame (drawn above), mean over heads; the caption on top."""
    model.record_attention(True)
    video, text = clip[None].to(device), cfg.qformer_mode == "text"  # (1, F, S, S, 3)
    with torch.no_grad():
        ids = generate(model, video, dataclasses.replace(cfg, beam=1, temperature=0.0))[0]
        if text:  # re-run the caption to collect the decoder's cross-attention
            model.decode(torch.tensor([[BOS] + ids], device=device), model.encode(video))
    w = (model.decoder[-1] if text else model.qformer.blocks[-1]).xattn.weights[0].cpu().numpy()  # (L or Q, F)
    model.record_attention(False)  # SDPA alone again: no explicit attention weights kept
    labels = ([tok.decode([i]).strip() for i in ids] or ["(empty)"]) if text else [f"query {q}" for q in range(len(w))]
    w = w[:len(labels)]  # (rows, F); text: the row that predicts EOS is dropped
    heat = cv2.applyColorMap((255 * w / max(w.max(), 1e-9)).astype(np.uint8), cv2.COLORMAP_VIRIDIS)  # (rows, F, 3)
    heat = cv2.resize(heat, (w.shape[1] * cell, len(labels) * cell // 2), interpolation=cv2.INTER_NEAREST)
    strip = np.concatenate([cv2.resize(f[:, :, ::-1], (cell, cell), interpolation=cv2.INTER_NEAREST)  # RGB -> BGR
                            for f in clip.numpy()], 1)  # (cell, F*cell, 3)
    body = np.concatenate([strip, np.zeros((18, strip.shape[1], 3), np.uint8), heat], 0)  # frames, numbers, map
    caption = tok.decode(ids)
    img = np.zeros((24 + body.shape[0], max(label_w + body.shape[1], 8 * len(caption) + 8), 3), np.uint8)
    img[24:, label_w:label_w + body.shape[1]] = body
    marks = [(caption, 4, 16), ("row: word" if text else "row: query", 4, 24 + cell // 2),  # caption, legend
             ("column: frame", 4, 24 + cell + 14)]
    marks += [(str(f + 1), label_w + f * cell + cell // 2 - 4, 24 + cell + 14) for f in range(w.shape[1])]  # frames
    marks += [(word[:14], 4, 24 + cell + 18 + r * cell // 2 + cell // 4 + 5) for r, word in enumerate(labels)]  # rows
    for s, x, y in marks:  # the caption on top, each frame's number under it, each row's label centred beside it
        cv2.putText(img, s, (x, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (255, 255, 255), 1, cv2.LINE_AA)
    if not cv2.imwrite(os.fsencode(path), img):  # False, not an exception, when it cannot write
        raise UserError(f"{path}: could not be written (a folder of that name, or no permission)")

def evaluate(model, tok, cfg, device, data, train_seconds=None):  # caption test and novel, score; eval.json, a PNG
    saved = (read_json(os.path.join(cfg.out_dir, "eval.json")) or {}).get("train_seconds")  # --eval keeps the run's
    result = {"train_seconds": saved if train_seconds is None else train_seconds, "config": dataclasses.asdict(cfg)}
    print(f"{'split':8s} {'n':>5s} {'exact':>7s} {'BLEU-4':>7s} {'CIDEr-D':>8s}")
    generator = torch.Generator(device=device).manual_seed(cfg.seed)  # sampling (--temperature > 0) repeats: run's seed
    for split in [s for s in ("test", "novel") if s in data]:  # novel is absent on user data
        entries, clips = data[split]
        with autocast(cfg, device):  # greedy (or --beam / sampling), 128 clips at a time to bound the memory
            preds = [tok.decode(ids) for i in range(0, len(clips), 128)
                     for ids in generate(model, clips[i:i + 128].to(device), cfg, generator=generator)]
        refs = [cs for _, cs in entries]  # every reference of each clip
        shown = [dict(video=os.path.relpath(v), prediction=x, references=rs) for (v, rs), x in zip(entries[:8], preds)]
        r = result[split] = dict(n=len(preds), exact_match=exact_match(preds, refs), bleu4=bleu4(preds, refs),
                                 cider=cider_d(preds, refs), samples=shown)
        print(f"{split:8s} {r['n']:5d} {r['exact_match']:7.3f} {r['bleu4']:7.3f} {r['cider']:8.3f}")
    print("\n".join(f"  pred: {s['prediction']!r}\n  refs: {s['references']}" for s in result["test"]["samples"][:4]))
    atomic(os.path.join(cfg.out_dir, "eval.json"), lambda p: json.dump(result, open(p, "w"), indent=1))
    attention_png(model, data["test"][1][0], tok, cfg, device, os.path.join(cfg.out_dir, "attention.png"))
    print(f"wrote {cfg.out_dir}/eval.json and {cfg.out_dir}/attention.png")
    return result

def bench(cfg):  # training samples/s and captions/s with and without the KV cache, on random clips of the set size
    check_decoding(cfg)  # --top_k or --top_p at temperature 0 would time greedy decoding: refused, as elsewhere
    device, B = pick_device(cfg.device), cfg.batch_size  # B: the training micro-batch
    torch.manual_seed(0)
    caps = [caption_for([(c, s, m, 0, 0)] * 2, v) for c in COLOURS for s in SHAPES for m in MOTIONS for v in VERBS]
    tok = Tokenizer.from_captions(caps, cfg.compact_vocab)  # the token table of the world's captions
    model = VideoLLaMAMini(cfg, len(tok.ids)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)  # real optimizer steps, as in training
    video = torch.randint(0, 255, (B, cfg.n_frames, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8, device=device)
    inp = torch.randint(0, len(tok.ids), (B, min(20, cfg.max_len)), device=device)  # (B, L) random tokens
    print(f"captions: autocast {autocast_dtype(cfg.dtype, device)} (--dtype {cfg.dtype}); training: each dtype below")
    for label in dict.fromkeys(["float32", "bfloat16" if cfg.dtype == "auto" else cfg.dtype]):  # float32, then --dtype
        times = []
        for i in range(8):  # the first 2 steps warm up the allocator, the median of 6 is printed
            t = time.time()
            with autocast(dataclasses.replace(cfg, dtype=label), device):
                (loss := model(video, inp, inp)[1]).backward()  # against random targets: the cost, not the result
            opt.step(), opt.zero_grad(), loss.item()  # item() waits for a GPU's queued work: the step is timed whole
            times.append(time.time() - t)
        print(f"train  ({label:8s}): {B / np.median(times[2:]):8.1f} samples/s  (batch {B}, median of 6 steps)")
    fixed = dataclasses.replace(cfg, max_new_tokens=20, beam=1)  # what is timed: 20 steps of one beam each
    for use_cache in (True, False):  # generate() puts the model in eval mode
        t = time.time()
        for _ in range(3):  # a fixed 20 decode steps: an untrained model would otherwise stop at random places
            with autocast(cfg, device):
                generate(model, video, fixed, use_cache, stop_at_eos=False)
        print(f"caption (cache {'on ' if use_cache else 'off'}): {3 * B / (time.time() - t):8.1f} captions/s "
              f"(batch {B}, {min(20, cfg.max_len - 1)} tokens each, {autocast_dtype(cfg.dtype, device)})")

# Command line ---------------------------------------------------------------------------------------------------------
def check_decoding(cfg):  # a decoding flag (typed, or saved with a checkpoint) the search would ignore: refused
    if (cfg.temperature > 0 or cfg.top_k > 0 or cfg.top_p < 1) and (cfg.beam > 1 or cfg.temperature == 0):
        raise UserError(f"sampling is --temperature above 0 with --beam 1, --top_k / --top_p filter it; got --beam "
                        f"{cfg.beam}, --temperature {cfg.temperature}, --top_k {cfg.top_k}, --top_p {cfg.top_p}")

def config_problems(cfg, fresh=True):  # what every value must satisfy, typed or in a saved config.json (fresh: sizes)
    zero_ok = ("n_temporal_layer", "warmup", "stop_after", "top_k")  # counts where 0 means none (seed, max_len: below)
    counts = [f"--{k} {v}: must be {'0 or more' if k in zero_ok else 'at least 1'}" for k, v in vars(cfg).items()
              if type(getattr(Config, k)) is int and k not in ("seed", "max_len") and v < (k not in zero_ok)]  # ints
    return counts + [why for bad, why in [  # (bad value, the line naming the flag and the fix)
        *[(vars(cfg)[k] not in ok, f"--{k} {vars(cfg)[k]!r}: choose from {'/'.join(ok)}") for k, ok in CHOICES.items()],
        (cfg.max_len < 2, f"--max_len {cfg.max_len}: must be at least 2 (BOS and one caption token)"),
        (cfg.img_size < 3, f"--img_size {cfg.img_size}: must be at least 3 (GroupNorm needs 2x2 after the first conv)"),
        (not 0 < cfg.lr < math.inf, f"--lr {cfg.lr}: must be above 0 and finite"),
        (not 0 <= cfg.min_lr < math.inf, f"--min_lr {cfg.min_lr}: must be 0 or more and finite (the cosine's floor)"),
        (not 0 <= cfg.dropout < 1, f"--dropout {cfg.dropout}: must be in [0, 1)"),
        (not cfg.grad_clip > 0, f"--grad_clip {cfg.grad_clip}: must be above 0 (the largest gradient norm)"),
        (not 0 <= cfg.weight_decay < math.inf, f"--weight_decay {cfg.weight_decay}: must be finite, 0 or more"),
        (not -2**63 <= cfg.seed < 2**63, f"--seed {cfg.seed}: must fit in 64 bits (-2**63 to 2**63 - 1)"),
        (fresh and cfg.d_model % math.lcm(2, cfg.n_head or 1),
         f"--d_model {cfg.d_model}: must be even, a multiple of --n_head {cfg.n_head}"),
        (cfg.cnn_width % 8, f"--cnn_width {cfg.cnn_width}: must be a multiple of 8 (GroupNorm's 8 groups)"),
        (not cfg.temperature >= 0, f"--temperature {cfg.temperature}: must be 0 (greedy) or more"),
        (not 0 < cfg.top_p <= 1, f"--top_p {cfg.top_p}: must be in (0, 1]; 1 keeps every token")] if bad]

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="VideoLLaMA-Mini: train, evaluate, caption videos.", allow_abbrev=False)
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # argparse's refusals in one line too, no usage
    for mode, what in (("train", "build data (if needed), train, evaluate"), ("resume", "with --train: continue from "
                       "out_dir/train_state.pt"), ("eval", "evaluate the checkpoint in out_dir on test and novel"),
                       ("generate", "caption --video with out_dir's model"), ("bench", "training and caption speed")):
        p.add_argument(f"--{mode}", action="store_true", help=what)
    p.add_argument("--video", default="", help="video file or folder of frames, for --generate")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the settings to start from (default: default)")
    notes = dict(re.findall(r"^    (\w+): (.*)$", inspect.getsource(Config), re.M)) if argv is None else {}  # --help
    for f in dataclasses.fields(Config):  # every field is a flag; bools as --flag / --no-flag, never type=bool
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(f.default, bool) else {"type": type(f.default)}
        p.add_argument(f"--{f.name}", default=None, help=notes.get(f.name), **kind)  # None: the preset's value
    args = p.parse_args(argv)  # argparse exits 2 itself on an unknown flag or choice
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    # the run's input files are saved in its config: absolute, so --eval and --resume find them from any folder
    overrides.update({k: os.path.abspath(v) for k, v in overrides.items() if v and k in ("data", "test_data")})
    cfg = Config(**{**PRESETS[args.preset or "default"], **overrides})
    fresh = not (args.resume or args.eval and not args.train or args.generate)  # else the checkpoint's sizes run
    unread = [as_typed(k, v) for k, v in overrides.items() if args.bench and k not in BENCH  # typed, unread by --bench
              or (fresh and k in ("n_query", "n_qformer_layer") and cfg.qformer_mode == "text")]  # or by "text"
    if errors := config_problems(cfg, fresh) + [why for bad, why in [  # refused before any work, in one line
        ("" in overrides.values(), "a flag given '' must name a file or folder, not an empty string"),
        (sum(map(bool, (args.train or args.eval, args.generate, args.bench))) > 1 or args.resume and not args.train,
         "one mode per call: --train (it also evaluates), --eval, --generate or --bench; --resume goes with --train"),
        (unread, f"{', '.join(unread)}: " + ("not read by --bench (it times a new model of these sizes on random "
         "clips); drop it" if args.bench else "the learned-query Q-Former's sizes; only with --qformer_mode queries")),
        (args.preset and (args.resume or args.eval and not args.train or args.generate),  # --train --eval: --train's
         f"--preset {args.preset}: --resume, --eval and --generate take the sizes from the checkpoint; drop --preset"),
        (bool(args.video) != args.generate, "--generate and --video PATH (file or frame folder) go together")] if bad]:
        raise UserError(errors[0])
    return args, cfg, overrides

def main(argv=None):  # --train / --bench / --eval / --generate; a UserError or OSError: one line, exit status 2
    try:
        args, cfg, overrides = parse_args(argv)
        if args.train:  # train prints the config it runs
            return train(cfg, overrides, resume=args.resume)
        if args.eval or args.generate:  # saved config, typed flags on top (fixed refused); --generate accepts --seed
            fixed = ARCH + TRAINING + (WORLD if args.eval else WORLD[1:] + DATA)
            model, tok, cfg = load_checkpoint(cfg.out_dir, overrides, fixed)
            if args.eval and "data" in overrides and "test_data" not in overrides and cfg.test_data:  # else unread
                raise UserError(f"--data: --eval scores the run's --test_data {cfg.test_data}; give --test_data FILE")
        print("config:", json.dumps(dataclasses.asdict(cfg)))  # the config that runs: a checkpoint's is the saved one
        if args.bench:
            return bench(cfg)
        if not (args.eval or args.generate):
            return print("nothing to do: pass --train, --eval, --generate --video PATH, or --bench (see --help)")
        model.to(device := pick_device(cfg.device))
        if args.eval:  # test and novel, as in training; eval.json and attention.png are written into out_dir
            check_folder(cfg.out_dir, "--out_dir", True, "")  # refused now if it cannot be written
            check_lengths(tok, data := prepare_data(cfg, 0, overrides, ("test", "novel")), cfg)
            return evaluate(model, tok, cfg, device, data)
        clip = torch.from_numpy(load_video(args.video, cfg.n_frames, cfg.img_size))[None].to(device)  # (1, F, S, S, 3)
        with autocast(cfg, device):  # --seed makes sampling repeatable
            ids = generate(model, clip, cfg, generator=torch.Generator(device=device).manual_seed(cfg.seed))[0]
        print(tok.decode(ids))  # the caption, alone on the last line
    except (UserError, OSError, KeyboardInterrupt) as e:  # Ctrl-C too: one line, exit status 130
        print(f"error: {str(e) or 'interrupted; --train --resume goes on from the last (whole) save'}", file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 2)

if __name__ == "__main__":
    if hasattr(sys.stdout, "reconfigure"):  # IDLE's stream has none; pythonw's stdout is None
        sys.stdout.reconfigure(errors="backslashreplace")  # a character the code page lacks (Windows): \U0001f600
    main()
