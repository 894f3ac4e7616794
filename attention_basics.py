"""
attention_basics.py: a runnable tour of the building blocks of vision LLMs, then the two ways to wire one, trained
side by side on a CPU.

Read it top to bottom. The tour (`python attention_basics.py`) prints, section by section, what each block does with
real tensor shapes and checks every claim as it goes:

    attention   softmax(QK^T/sqrt(d))V written out: heads, padding mask with a finite minimum, max subtraction;
                equal to F.scaled_dot_product_attention; a causal mask as the contrast
    cross       cross-attention between two sequences of different lengths (the "fused representation")
    patchify    ViT: image -> patches -> linear projection; patches -> the image again, exactly
    clip        CLIP: image + text encoders, normalised embeddings, symmetric InfoNCE, learnable temperature
    video       video as frames: frame-rate sub-sampling (every 8th frame of 24 fps = 3 fps), fixed-length clips
    perceiver   Perceiver resampler: learned latents attend to [frame tokens; latents] (+ time embeddings) and give
                the same fixed number of visual tokens (64) for any number of frames
    flamingo    gated cross-attention dense block: tanh gates start at zero (the LM is unchanged at init) and media
                masking (each text token attends only to the latest preceding image/video)

Train mode (`--train`) then
  1. trains a tiny CLIP on synthetic PNG images + captions and reports zero-shot accuracy on new images, the 18
     colour/shape classes given as text prompts ("a red circle");
  2. trains the two vision-LLM variants on one synthetic mp4 captioning task ("a red circle moves left": the direction
     needs more than one frame), same budget, both starting from the CLIP image encoder:
       unified  visual tokens projected and placed in the decoder's input sequence (LLaVA-style prefix);
       cross    Perceiver resampler + Flamingo gated cross-attention layers inside the decoder;
  3. prints a side-by-side table (parameters, train time, exact match test/novel, generation tokens/s), writes
     attention heat maps (text tokens over frames, latents over frames) and out/attention_basics/eval.json.

Papers: Attention (https://arxiv.org/abs/1706.03762), ViT (https://arxiv.org/abs/2010.11929), CLIP
(https://arxiv.org/abs/2103.00020), Perceiver (https://arxiv.org/abs/2103.03206), Flamingo
(https://arxiv.org/abs/2204.14198); overview: https://cameronrwolfe.substack.com/p/vision-llms

The attention math is spelled out on purpose, once, in `attention()`; the modules run F.scaled_dot_product_attention
by default (`--no-sdpa` and the heat maps use the written math), and the tour checks that both agree.

Shape legend: B batch, F frames, S image side, P tokens per frame (P' patches of p x p pixels + CLS), Q latents,
M media items, L text tokens, N keys, D width (Dm: media's), H heads of d = D/H, E joint CLIP embedding, V vocabulary.

Commands:
    python attention_basics.py                              # the whole tour (seconds)
    python attention_basics.py --section perceiver          # one section
    python attention_basics.py --train                      # CLIP + both variants + table + heat maps (CPU)
    python attention_basics.py --train --preset tiny        # seconds, what the tests run
    python attention_basics.py --eval                       # re-evaluate the checkpoints in out/attention_basics
    python attention_basics.py --generate --video clip.mp4 --variant cross   # caption any video / frame folder
"""

import argparse
import contextlib
import dataclasses
import inspect
import json
import math
import os
import random
import re
import sys
import tempfile
import textwrap
import time

os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")  # OpenCV and its FFmpeg stay quiet (set before cv2 loads): an
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")  # image or video they cannot read is our one line
import cv2
import numpy as np
import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

SCRIPT = "attention_basics"

class UserError(Exception):
    """A problem with the user's input: main() prints it as one line and exits with status 2."""

def read_json(path):  # path's JSON object as a dict, or None: missing, unreadable, not JSON or not an object
    with contextlib.suppress(OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return obj if isinstance(obj := json.load(open(path, encoding="utf-8")), dict) else None

def writable(path, marker, ours):  # may this script write into path? missing, empty, or its `marker` JSON passes ours()
    up = os.path.abspath(path)  # (and a folder can be made there: tried in the nearest existing one, left as it was)
    while not os.path.lexists(up):
        up = os.path.dirname(up)
    with contextlib.suppress(OSError):  # a file in the way, no write access, a read-only or virtual file system
        os.rmdir(tempfile.mkdtemp(dir=up))
        return not os.path.exists(path) or not os.listdir(path) or ours(read_json(os.path.join(path, marker)) or {})
    return False

# Config ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    data_dir: str = "data/attention_basics"  # synthetic PNG images and mp4 clips are written here
    out_dir: str = "out/attention_basics"  # checkpoints (clip/, unified/, cross/), eval.json, heat maps
    n_img_train: int = 3000  # the synthetic world: CLIP training images
    n_img_test: int = 300  # new images (all 18 colour/shape classes) for zero-shot classification
    n_train: int = 2000  # training clips for the captioners
    n_test: int = 200  # new clips of (colour, shape) pairs seen in training: the headline exact match
    n_novel: int = 200  # clips of the 6 held-out pairs: compositional generalisation
    img_size: int = 24  # images and frames: centre-cropped to a square, then resized to this side
    patch: int = 4  # ViT patch side: (24/4)^2 = 36 patches + 1 CLS token (coarse patches blur the small shapes)
    n_frames: int = 4  # frames sampled uniformly from each clip
    d_model: int = 64  # the model: width of every tower (ViT, text encoder, decoder)
    n_head: int = 4  # attention heads H in every tower: each head works in D/H = 16 channels
    n_vit_layer: int = 2  # image encoder blocks (bidirectional)
    n_text_layer: int = 2  # CLIP text encoder blocks (causal, read out at EOS)
    n_dec_layer: int = 2  # caption decoder blocks; the cross wiring adds one gated layer before each
    d_embed: int = 64  # CLIP joint embedding width E
    n_latents: int = 64  # Perceiver resampler output size (Flamingo uses 64)
    n_perceiver_layer: int = 1  # resampler layers, each: latents attend, then an MLP
    max_frames: int = 64  # rows of the time embeddings (resampler, unified prefix): the most --n_frames may be
    max_len: int = 12  # longest caption in tokens, BOS/EOS included
    motion: bool = True  # frame-to-frame token differences + a per-frame summary token (Captioner)
    sdpa: bool = True  # attention through F.scaled_dot_product_attention (False: the written-out math)
    clip_steps: int = 3000  # CLIP training (stage 1): fewer steps leave shape half learned on some seeds (NOTES)
    steps: int = 1000  # optimiser steps for each captioner (stage 2): both get exactly the same budget
    batch_size: int = 32
    lr: float = 2e-3  # peak AdamW rate for everything trained from scratch
    vision_lr: float = 5e-4  # the CLIP image encoder is fine-tuned gently
    gate_lr: float = 2e-2  # the tanh gates' own rate: they start at 0, and at --lr a short run barely opens them
    warmup: int = 50  # linear warmup steps, then cosine decay to lr / 10
    weight_decay: float = 0.05  # on every tensor of 2+ dims: weights, embeddings, latents (see make_optimizer)
    dtype: str = "float32"  # autocast dtype: float32 or bfloat16 (pays off on a GPU, not for tiny CPU matrices)
    device: str = "auto"  # auto = cuda > mps > cpu
    seed: int = 1337  # one seed for the world, the init and the batch order
    threads: int = 0  # torch CPU threads; 0 = PyTorch's default (one per physical core)
    log_interval: int = 100  # steps between log lines
    section: str = "all"  # the tour, with no mode: which section to run
    variant: str = "cross"  # --generate: which captioner to use (unified or cross)

# How to run, not what was trained: left out of saved checkpoints, always taken from the command line.
RUN_FIELDS = ("out_dir", "dtype", "device", "threads", "log_interval", "section", "variant")
# All that the tour (no mode) reads: parse_args refuses any other flag typed for it, which it would ignore.
TOUR_FIELDS = ("img_size", "patch", "d_model", "n_head", "n_vit_layer", "n_text_layer", "n_dec_layer", "d_embed",
               "n_latents", "n_perceiver_layer", "max_frames", "max_len", "sdpa", "seed", "threads", "section")

PRESETS = {"default": {}, "tiny": dict(n_img_train=48, n_img_test=12, n_train=32, n_test=8, n_novel=8, img_size=16,
    patch=8, n_frames=3, d_model=32, n_head=2, n_vit_layer=1, n_text_layer=1, n_dec_layer=1, d_embed=16, n_latents=8,
    clip_steps=4, steps=4, batch_size=8, warmup=2, log_interval=2, data_dir="data/ab_tiny", out_dir="out/ab_tiny")}

# Data: synthetic world (PNG images, mp4 clips), loaders, annotation files, tokenizer ----------------------------------
COLOURS = {"red": (40, 40, 230), "green": (40, 200, 40), "blue": (230, 90, 30),  # BGR, as OpenCV draws
           "yellow": (30, 220, 230), "purple": (200, 50, 160), "white": (235, 235, 235)}
SHAPES = ["circle", "square", "triangle"]
MOTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
# (colour, shape) pairs no training clip shows (CLIP's stills include them): one shape per colour, each shape twice.
NOVEL_PAIRS = {("red", "triangle"), ("green", "circle"), ("blue", "square"),
               ("yellow", "triangle"), ("purple", "circle"), ("white", "square")}
CLASSES = [(c, s) for c in COLOURS for s in SHAPES]  # the 18 zero-shot classes
RENDER, CLIP_LEN, TRAVEL = 64, 16, 26  # written side, frames per clip, pixels an object moves in a clip
MEAN, STD = 0.45, 0.25  # a fixed pixel normalisation, not measured on this world (its statistics: NOTES.md)

def draw_shape(img, shape, colour, cx, cy, half):
    """Draw one filled shape of half-side `half` centred at (cx, cy), in place (img is BGR uint8)."""
    c = COLOURS[colour]
    if shape == "circle":
        cv2.circle(img, (cx, cy), half, c, -1, cv2.LINE_AA)  # anti-aliased edge, as a camera would blur it
    elif shape == "square":
        cv2.rectangle(img, (cx - half + 1, cy - half + 1), (cx + half - 1, cy + half - 1), c, -1)  # -1 = filled
    else:  # an isosceles triangle, apex up
        pts = np.array([[cx, cy - half], [cx - half, cy + half - 1], [cx + half, cy + half - 1]], np.int32)
        cv2.fillPoly(img, [pts], c, cv2.LINE_AA)

def pick_pair(rng, split):
    while True:  # rejection sampling: the novel split draws only held-out pairs, every other split never does
        pair = rng.choice(CLASSES)
        if (pair in NOVEL_PAIRS) == (split == "novel"):
            return pair

def write_image(path, rng, colour, shape):
    """One object of random size and position on a background of random grey: a still image for CLIP."""
    img = np.full((RENDER, RENDER, 3), rng.randint(40, 90), np.uint8)  # (R, R, 3) BGR, one grey level
    half = rng.randint(10, 14)  # half-side in pixels
    lo, hi = half + 1, RENDER - half - 2  # the whole shape stays inside the image
    draw_shape(img, shape, colour, rng.randint(lo, hi), rng.randint(lo, hi), half)
    cv2.imwrite(os.fsencode(path), img)  # PNG: lossless, read back by the same loader as user images

def write_clip(path, rng, colour, shape, motion):
    """CLIP_LEN frames, one object moving TRAVEL pixels in one direction, as an mp4v mp4."""
    half, (dx, dy) = 11, MOTIONS[motion]
    lo, hi = half + 1, RENDER - half - 2
    x0, y0 = (rng.randint(lo + TRAVEL * (d < 0), hi - TRAVEL * (d > 0)) for d in (dx, dy))  # the path stays in frame
    grey = rng.randint(40, 90)  # one background per clip: only the object changes between frames
    writer = cv2.VideoWriter(os.fsencode(path), cv2.VideoWriter_fourcc(*"mp4v"), 8, (RENDER, RENDER))  # 8 fps, lossy
    for t in range(CLIP_LEN):
        img = np.full((RENDER, RENDER, 3), grey, np.uint8)
        frac = t / (CLIP_LEN - 1)  # 0 at the first frame, 1 at the last: constant speed
        draw_shape(img, shape, colour, round(x0 + dx * TRAVEL * frac), round(y0 + dy * TRAVEL * frac), half)
        writer.write(img)
    writer.release()

def build_world(cfg):
    """Write data_dir/{images,videos}/<split>/ and one annotation file per split, once (deterministic from --seed).
    Annotation format, read back by read_annotations: one `relative/path<TAB>caption` per line."""
    want = dict(img=[cfg.n_img_train, cfg.n_img_test], vid=[cfg.n_train, cfg.n_test, cfg.n_novel],
                seed=cfg.seed, version=3)  # what the files on disk were written for
    if read_json(stamp := os.path.join(cfg.data_dir, "world.json")) == want:
        return  # already written for these sizes and this seed: reuse the files
    if not writable(cfg.data_dir, "world.json", lambda m: set(m) == set(want) and isinstance(m["version"], int)):
        raise UserError(f"--data_dir {cfg.data_dir}: a file, a folder this script did not write (no world.json of its "
                        f"own), or no folder can be made there; give a new folder for the synthetic world")
    os.makedirs(cfg.data_dir, exist_ok=True)
    json.dump(dict(want, version=0), open(stamp, "w"))  # 0: ours, but a build under way (or cut short)
    for kind, sizes in (("images", want["img"]), ("videos", want["vid"])):
        for offset, (split, n) in enumerate(zip(("train", "test", "novel"), sizes)):
            rng, lines = random.Random(cfg.seed * 100 + offset + (10 if kind == "videos" else 0)), []  # per split
            os.makedirs(os.path.join(cfg.data_dir, kind, split), exist_ok=True)
            for i in range(n):
                if kind == "images":  # every class: CLIP is the pretrained encoder, it may see held-out pairs
                    (colour, shape), name = rng.choice(CLASSES), f"{kind}/{split}/{i:05d}.png"
                    write_image(os.path.join(cfg.data_dir, name), rng, colour, shape)
                    lines.append(f"{name}\ta {colour} {shape}")
                else:
                    (colour, shape), motion = pick_pair(rng, split), rng.choice(list(MOTIONS))
                    name = f"{kind}/{split}/{i:05d}.mp4"
                    write_clip(os.path.join(cfg.data_dir, name), rng, colour, shape, motion)
                    lines.append(f"{name}\ta {colour} {shape} moves {motion}")
            open(os.path.join(cfg.data_dir, f"{kind}_{split}.txt"), "w").write("\n".join(lines) + "\n")
    atomic(stamp, lambda p: json.dump(want, open(p, "w")))

def read_annotations(path):
    """`path<TAB>caption` lines (paths relative to the file) -> [(abs_path, caption)]; errors name the line."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: annotation file not found")
    out = []
    for no, line in enumerate(open(path, encoding="utf-8"), 1):
        if not line.strip():
            continue  # blank lines are allowed anywhere
        parts = line.rstrip("\n").split("\t")  # captions may hold spaces, so a TAB separates the two fields
        if len(parts) != 2 or not parts[1].strip():
            raise UserError(f"{path}:{no}: expected 'path<TAB>caption', got {line.strip()[:60]!r}")
        full = os.path.join(os.path.dirname(os.path.abspath(path)), parts[0])
        if not os.path.exists(full):
            raise UserError(f"{path}:{no}: file not found: {full}")
        out.append((full, parts[1].strip()))
    if not out:
        raise UserError(f"{path}: no entries (expected 'path<TAB>caption' lines)")
    return out

def _square(img, size):  # centre-crop to a square, then shrink to size x size (INTER_AREA averages pixels: no aliasing)
    (h, w), s = img.shape[:2], min(img.shape[:2])
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]  # centre crop
    return cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)

def cut_off(path):  # a JPEG with no end marker FF D9 after its scan FF DA (libjpeg fills it grey), a PNG with no IEND
    data, i = open(path, "rb").read(), 2  # i: the next marker; segments before the scan are skipped by their length
    while data[:2] == b"\xff\xd8" and i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] != 0xDA:
        i += 1 if data[i + 1] == 0xFF else 2 + int.from_bytes(data[i + 2:i + 4], "big")  # FF FF: a fill byte
    return data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[i:] or data[:4] == b"\x89PNG" and b"IEND" not in data

def load_image(path, size):
    if os.path.isfile(path) and cut_off(path):  # checked before libjpeg or libpng decodes it (and warns on stderr)
        raise UserError(f"{path}: this image is cut off (no end-of-image marker); re-export or re-copy it")
    try:  # os.fsencode: OpenCV gets the name's bytes (a name that is not UTF-8, from an old zip, crashes it as a str)
        img = cv2.imread(os.fsencode(path), cv2.IMREAD_UNCHANGED)  # alpha kept, if any
    except cv2.error as e:  # OpenCV raises for an image over its size limit (and returns None for one it cannot read)
        raise UserError(f"{path}: OpenCV cannot decode this image ({e.err}; it reads at most 2^30 pixels)") from None
    if img is not None and (img.ndim != 3 or img.shape[2] != 4 or img.dtype not in (np.uint8, np.uint16)):
        img = cv2.imread(os.fsencode(path))  # no alpha: OpenCV's 8-bit BGR (H, W, 3)
    if img is None:
        raise UserError(f"{path}: cannot read this image")
    if img.shape[2] == 4:  # transparency composited onto white, as transformers' convert_to_rgb; + 127 rounds as PIL
        img = (img >> 8 * (img.dtype == np.uint16)).astype(np.int32)  # (H, W, 4) BGRA in 0..255 (16-bit: high byte)
        img = ((img[:, :, :3] * img[:, :, 3:] + 255 * (255 - img[:, :, 3:]) + 127) // 255).astype(np.uint8)
    return _square(img, size)[:, :, ::-1].copy()  # BGR -> RGB, (S, S, 3) uint8

def sample_indices(n_total, n_frames):
    """Uniform frame indices: the centre of each of n_frames equal segments (short clips repeat indices)."""
    return [min(n_total - 1, int((i + 0.5) * n_total / n_frames)) for i in range(n_frames)]

def load_video(path, n_frames, size):
    """Video file (any container/codec OpenCV reads) or folder of frame images -> uint8 (F, S, S, 3) RGB."""
    if os.path.isdir(path):
        names = sorted((n for n in os.listdir(path) if re.match(r"[^.].*\.(png|jpe?g|bmp|webp|tiff?)$", n, re.I)
                        and os.path.isfile(os.path.join(path, n))),  # not frames: a folder x.png, a hidden ._x.png
                       key=lambda n: [int(t) if t.isdecimal() else t for t in re.split(r"(\d+)", n)])  # f2 before f10
        frames = [load_image(os.path.join(path, n), size) for n in names]
    else:
        if not os.path.isfile(path):
            raise UserError(f"{path}: no such video file or folder of frames")
        cap, frames = cv2.VideoCapture(os.fsencode(path)), []  # FFmpeg underneath: any container and codec it decodes
        if not cap.isOpened() or cap.get(cv2.CAP_PROP_FOURCC) == cv2.VideoWriter_fourcc(*"ansi"):  # FFmpeg's "ansi"
            raise UserError(f"{path}: OpenCV cannot open this as a video (corrupt, unknown format, or text)")  # = text
        while cap.grab():  # decode every frame (clips here are short), then pick n_frames of them
            frames.append(_square(cap.retrieve()[1], size)[:, :, ::-1])  # BGR uint8: shrink at once, -> RGB
        if len(frames) < 0.9 * (listed := int(cap.get(cv2.CAP_PROP_FRAME_COUNT))):  # a cut-off file decodes part
            raise UserError(f"{path}: only {len(frames)} of the {listed} frames in its header decode (cut off?)")
    if not frames:
        raise UserError(f"{path}: video has no frames")
    return np.stack([frames[i] for i in sample_indices(len(frames), n_frames)])

def gpt2():  # tiktoken's GPT-2 byte-level BPE; its two files are downloaded once, or read from TIKTOKEN_CACHE_DIR
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline with no cached files: say how to fix it, no traceback
        raise UserError(f"tiktoken could not load the GPT-2 encoding ({type(e).__name__}); offline, point "
                        f"TIKTOKEN_CACHE_DIR at a copy of its cache folder (two hash-named files)") from None

EOT = 0  # model id of <|endoftext|> (the table's first entry): BOS, EOS and padding

class Tokenizer:
    """GPT-2 BPE over a compact table, model id i = GPT-2 id `ids[i]`: a 50257-way layer would dominate these models."""
    def __init__(self, ids):
        self.enc, self.ids = gpt2(), list(ids)  # ids: model id -> GPT-2 id
        self.to_model = {g: i for i, g in enumerate(self.ids)}  # GPT-2 id -> model id
    @classmethod
    def from_texts(cls, texts):
        enc = gpt2()  # <|endoftext|> first (model id 0), then every GPT-2 id the texts use, sorted
        return cls([enc.eot_token] + sorted({t for c in texts for t in enc.encode_ordinary(c)}))
    def encode(self, text):
        """Text -> [BOS, ..., EOS] in model ids; GPT-2 ids absent from the table are dropped without a word."""
        return [EOT] + [self.to_model[t] for t in self.enc.encode_ordinary(text) if t in self.to_model] + [EOT]
    def decode(self, ids):  # model ids -> text, BOS/EOS/padding (model id 0) left out
        return self.enc.decode([self.ids[i] for i in ids if i != EOT]).strip()

def pad_batch(seqs, max_len):  # token lists -> (ids, lengths), right-padded with EOT to the longest, cut at max_len
    seqs = [s[:max_len] for s in seqs]
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), EOT, dtype=torch.long)  # (B, L)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
    return ids, torch.tensor([len(s) for s in seqs])

def to_pixels(x):  # uint8 (..., S, S, 3) -> normalised float (..., 3, S, S)
    return (x.float().div(255).sub(MEAN).div(STD)).movedim(-1, -3)

# Model: attention -> blocks -> ViT / text encoder / CLIP -> Perceiver -> Flamingo gated block -> decoder, captioners --

def attention(q, k, v, mask=None, causal=False):
    """softmax(Q K^T / sqrt(d)) V, spelled out. q (B, H, L, d), k/v (B, H, N, d), mask bool broadcastable to
    (B, H, L, N) with True = may attend. Returns (out (B, H, L, d), weights (B, H, L, N))."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, L, N); q.k has std ~sqrt(d): scaled to ~1
    # Masked scores get the dtype's most negative *finite* value, not -inf: a row with every key masked then still
    # gives finite (uniform) weights instead of 0/0 = NaN; callers zero such rows (see GatedCrossAttention).
    neg = torch.finfo(scores.dtype).min
    if causal:  # position i sees keys 0..i only (top-left aligned, as SDPA's is_causal)
        keep = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, neg)
    if mask is not None:
        scores = scores.masked_fill(~mask, neg)
    # Subtracting the row maximum changes nothing (softmax is shift-invariant) but keeps exp() <= 1: no overflow.
    w = (scores - scores.amax(-1, keepdim=True)).exp()
    w = w / w.sum(-1, keepdim=True)  # (B, H, L, N), rows sum to 1
    return w @ v, w

class Module(nn.Module):
    """Base of every module below: its constructor builds the layers and ends with `self.init_weights()`, so a
    module is ready however it is built, alone (as in the tour) or inside a model."""
    def init_weights(self):
        """GPT-2's init over the whole tree, in module order: Linear and Embedding weights N(0, 0.02), biases 0,
        LayerNorm scale 1, shift 0; then each module's own exceptions (`init_own`). Learned latents, position and time
        embeddings are drawn with std 0.02 where they are defined, and gates are created at 0."""
        # An enclosing constructor runs this again over its whole tree, replacing a part's own pass; fork_rng keeps
        # every pass off the global random stream, so a model's weights depend on --seed and its layout only.
        with torch.random.fork_rng(devices=[]):
            for m in self.modules():  # pre-order: a module, then its children in the order they were assigned
                if isinstance(m, (nn.Linear, nn.Embedding)):
                    nn.init.normal_(m.weight, 0.0, 0.02)  # small: every residual branch starts close to zero
                    if getattr(m, "bias", None) is not None:
                        nn.init.zeros_(m.bias)
                elif isinstance(m, nn.LayerNorm):
                    nn.init.ones_(m.weight)  # scale 1, shift 0: LayerNorm starts as plain normalisation
                    nn.init.zeros_(m.bias)
            for m in self.modules():  # second pass, so an exception is never overwritten by the default
                if isinstance(m, Module):
                    m.init_own()
    def init_own(self):
        """What this module sets differently from the default above (most modules: nothing)."""

class MultiHeadAttention(Module):
    """Every attention in this file, three ways to use one module:
      self-attention (ctx None): each token of x gathers from all tokens of x, the ViT's way to relate patches;
      causal (causal=True): token i gathers from tokens 0..i only, so a decoder can be trained on every position
        at once and still never see the token it must predict;
      cross-attention (ctx given): queries from x, keys/values from another sequence, possibly of another width:
        how text reads an image in Flamingo and how latents read frames in the Perceiver.
    H heads each attend in a D/H-wide subspace (each can look for something else); their outputs are concatenated
    and projected back to D. The argument `d` below is the full width D, not the legend's head width d = D/H."""
    def __init__(self, d, n_head, d_ctx=None, sdpa=True):
        super().__init__()
        self.h, self.sdpa = n_head, sdpa
        self.q = nn.Linear(d, d, bias=False)  # queries: what each token of x looks for
        self.kv = nn.Linear(d_ctx or d, 2 * d, bias=False)  # keys (what a token offers) and values (what it gives)
        self.proj = nn.Linear(d, d)  # mixes the H heads' outputs back into one D-wide vector
        self.record, self.weights = False, None  # record=True keeps the weights (heat maps); uses the written path
        self.init_weights()
    def forward(self, x, ctx=None, mask=None, causal=False):
        ctx = x if ctx is None else ctx  # self-attention is cross-attention of x with itself
        (B, L, D), N, d = x.shape, ctx.size(1), x.size(-1) // self.h  # L queries, N keys, d = D/H per head
        q = self.q(x).view(B, L, self.h, d).transpose(1, 2)  # (B, L, H, d) -> (B, H, L, d)
        k, v = self.kv(ctx).view(B, N, 2, self.h, d).permute(2, 0, 3, 1, 4)  # (B, N, 2, H, d) -> 2 x (B, H, N, d)
        if mask is not None and mask.dim() == 3:
            mask = mask[:, None]  # (B, 1, L, N): one mask for every head
        if self.sdpa and not self.record:  # PyTorch's fused kernel: same math, less memory
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)  # (B, H, L, d)
        else:
            out, w = attention(q, k, v, mask, causal)  # (B, H, L, d), (B, H, L, N)
            if self.record:
                self.weights = w.detach().float().mean(1)  # (B, L, N), averaged over heads
        return self.proj(out.transpose(1, 2).reshape(B, L, D))  # (B, L, D)

class MLP(Module):
    """The per-token feed-forward layer: attention moves information between tokens, this transforms each one."""
    def __init__(self, d):
        super().__init__()
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)  # 4x wider inside, as in GPT-2 and ViT
        self.init_weights()
    def forward(self, x):
        return self.proj(F.gelu(self.fc(x)))  # (..., D) -> (..., 4D) -> (..., D)

class Block(Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x)). causal=True makes it a decoder block.
    Pre-norm (GPT-2, ViT) leaves the residual path x + ... free of norms, so gradients reach early layers intact."""
    def __init__(self, d, n_head, causal=False, sdpa=True):
        super().__init__()
        self.causal = causal
        self.ln1, self.attn = nn.LayerNorm(d), MultiHeadAttention(d, n_head, sdpa=sdpa)
        self.ln2, self.mlp = nn.LayerNorm(d), MLP(d)
        self.init_weights()
    def forward(self, x, mask=None):
        x = x + self.attn(self.ln1(x), mask=mask, causal=self.causal)  # (B, L, D): tokens exchange information
        return x + self.mlp(self.ln2(x))  # (B, L, D): each token transformed on its own

def patchify(img, p):  # (B, 3, S, S) -> (B, (S/p)^2, 3*p*p): non-overlapping p x p patches, row by row, each flattened
    B, C, S, _ = img.shape
    n = S // p  # patches per row and per column
    x = img.reshape(B, C, n, p, n, p)  # (B, C, row, py, col, px)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(B, n * n, C * p * p)  # (B, rows*cols, C*p*p)

class ViT(Module):
    """Image -> patches -> linear projection -> [CLS; patches] + position embeddings -> bidirectional blocks.
    Returns every token (B, 1+P', D); token 0 (CLS) summarises the image for CLIP. Attention itself is blind to
    order, so a learned position embedding per token says where each patch sits in the image."""
    def __init__(self, cfg):
        super().__init__()
        self.p = cfg.patch
        n_patch = (cfg.img_size // cfg.patch) ** 2  # P'
        self.embed = nn.Linear(3 * cfg.patch ** 2, cfg.d_model)  # a patch's pixels -> one D-wide token
        self.cls = nn.Parameter(torch.randn(1, 1, cfg.d_model) * 0.02)  # (1, 1, D): a learned extra token
        self.pos = nn.Parameter(torch.randn(1, 1 + n_patch, cfg.d_model) * 0.02)  # (1, 1+P', D)
        self.blocks = nn.ModuleList([Block(cfg.d_model, cfg.n_head, sdpa=cfg.sdpa) for _ in range(cfg.n_vit_layer)])
        self.ln = nn.LayerNorm(cfg.d_model)
        self.init_weights()
    def forward(self, img):
        x = self.embed(patchify(img, self.p).to(self.pos.dtype))  # (B, P', D), in the weights' dtype
        x = torch.cat([self.cls.expand(x.size(0), -1, -1), x], 1) + self.pos  # (B, 1+P', D)
        for b in self.blocks:
            x = b(x)  # bidirectional: every patch sees every other
        return self.ln(x)  # (B, 1+P', D)

class TextEncoder(Module):
    """CLIP's text tower: causal blocks over the tokens; the feature at the EOS token (last real position) is the
    sentence embedding, so padding after it never matters."""
    def __init__(self, cfg, vocab):
        super().__init__()
        self.tok = nn.Embedding(vocab, cfg.d_model)  # (V, D)
        self.pos = nn.Parameter(torch.randn(1, cfg.max_len, cfg.d_model) * 0.02)  # (1, L_max, D)
        self.blocks = nn.ModuleList([Block(cfg.d_model, cfg.n_head, causal=True, sdpa=cfg.sdpa)  # as CLIP's
                                     for _ in range(cfg.n_text_layer)])
        self.ln = nn.LayerNorm(cfg.d_model)
        self.init_weights()
    def forward(self, ids, lengths):
        x = self.tok(ids) + self.pos[:, :ids.size(1)]  # (B, L, D)
        for b in self.blocks:
            x = b(x)
        return self.ln(x)[torch.arange(ids.size(0)), lengths - 1]  # (B, D) at each row's EOS

def clip_loss(img_emb, txt_emb, logit_scale, same=None):
    """Symmetric InfoNCE. Embeddings are L2-normalised, so img @ txt^T is a cosine-similarity matrix (B, B); times
    exp(logit_scale) = 1/temperature: cosines lie in [-1, 1], too flat for a confident softmax, so 1/T is learned
    (<= 100, as CLIP). Row i must pick column i among the batch's captions, column i row i; the loss averages both.
    same (B, B) bool, optional: pairs that share a caption. Synthetic batches repeat captions, and calling an identical
    caption a negative is a false negative; with `same` the target spreads evenly over all matching entries."""
    img, txt = F.normalize(img_emb, dim=-1), F.normalize(txt_emb, dim=-1)
    logits = logit_scale.exp().clamp(max=100) * img @ txt.t()  # (B, B)
    if same is None:
        same = torch.eye(len(img), dtype=torch.bool, device=img.device)  # each image matches its own caption only
    target = same.float() / same.float().sum(-1, keepdim=True)  # (B, B), rows sum to 1 (same is symmetric)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target)) / 2

class CLIP(Module):
    """Two towers that never attend to each other: they meet only in the loss, as dot products in one E-wide space.
    That is what makes zero-shot classification work: any sentence can be embedded and compared with any image."""
    def __init__(self, cfg, vocab):
        super().__init__()
        self.vision, self.text = ViT(cfg), TextEncoder(cfg, vocab)
        self.img_proj = nn.Linear(cfg.d_model, cfg.d_embed, bias=False)  # (D -> E) into the joint space
        self.txt_proj = nn.Linear(cfg.d_model, cfg.d_embed, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))  # CLIP's initial temperature 0.07
        self.init_weights()
    def encode_image(self, img):
        return F.normalize(self.img_proj(self.vision(img)[:, 0]), dim=-1)  # (B, E), the CLS token
    def encode_text(self, ids, lengths):
        return F.normalize(self.txt_proj(self.text(ids, lengths)), dim=-1)  # (B, E)
    def forward(self, img, ids, lengths, same=None):  # -> the loss of a batch of (image, caption) pairs
        return clip_loss(self.img_proj(self.vision(img)[:, 0]), self.txt_proj(self.text(ids, lengths)),
                         self.logit_scale, same)

class PerceiverResampler(Module):
    """Flamingo's resampler: Q learned latents read a variable number of frame tokens and return Q tokens.
    Each layer's keys/values are [frame tokens; latents] (the latents also see each other), its queries the latents
    alone, so the output size is Q whatever F is. A learned time embedding per frame tells frames apart."""
    def __init__(self, d, n_head, n_latents, n_layer, max_frames, sdpa=True):
        super().__init__()
        self.latents = nn.Parameter(torch.randn(n_latents, d) * 0.02)  # (Q, D): learned queries, no input of their own
        self.time = nn.Parameter(torch.randn(max_frames, 1, d) * 0.02)  # (F_max, 1, D): broadcast over a frame
        self.layers = nn.ModuleList([nn.ModuleDict(dict(  # one layer: attention of latents over frames, then an MLP
            ln_x=nn.LayerNorm(d), ln_q=nn.LayerNorm(d), attn=MultiHeadAttention(d, n_head, sdpa=sdpa),
            ln_ff=nn.LayerNorm(d), ff=MLP(d))) for _ in range(n_layer)])
        self.ln = nn.LayerNorm(d)  # the output goes on to other layers' keys/values: normalised once here
        self.init_weights()
    def init_own(self):
        # Sharper queries and keys than the default: at std 0.02 every latent attends almost uniformly to all F*P
        # frame tokens (mostly background), so its output hardly depends on the video and the captioner learns
        # only the caption prior. At std 0.3 the scores spread and each latent picks tokens by content from step 0.
        for layer in self.layers:
            nn.init.normal_(layer.attn.q.weight, 0.0, 0.3)  # (D, D)
            nn.init.normal_(layer.attn.kv.weight, 0.0, 0.3)  # (2D, D): keys and values alike
    def forward(self, x):
        B, Fr, P, D = x.shape  # (B, F, P, D) frame tokens; Fr, since F already names torch.nn.functional
        if Fr > self.time.size(0):
            raise UserError(f"video has {Fr} frames, the resampler has time embeddings for {self.time.size(0)} "
                            f"(train again with a larger --max_frames)")
        x = (x + self.time[:Fr]).reshape(B, Fr * P, D)  # (B, F*P, D): time added, frames flattened into one set
        lat = self.latents.expand(B, -1, -1)  # (B, Q, D)
        for layer in self.layers:
            kv = torch.cat([layer.ln_x(x), layer.ln_q(lat)], 1)  # (B, F*P+Q, D)
            lat = lat + layer.attn(layer.ln_q(lat), kv)  # (B, Q, D)
            lat = lat + layer.ff(layer.ln_ff(lat))  # (B, Q, D)
        return self.ln(lat)  # (B, Q, D)

def media_attention_mask(media_locations, n_latents):
    """Flamingo's media masking. media_locations (B, L) bool marks where an <image>/<video> token sits in the text.
    text_time[i] = number of media at or before token i, so token i may attend only to the latents of media number
    text_time[i] (its latest preceding media), never to an earlier or later one. -> (B, L, M*Q) bool, True = attend;
    rows of tokens before any media are all False (GatedCrossAttention zeroes their output)."""
    text_time = media_locations.long().cumsum(-1)  # (B, L), 0 = no media yet
    M = max(1, int(media_locations.sum(-1).max()))  # the most media items in any row: the media tensor holds M*Q
    media_id = torch.arange(1, M + 1, device=media_locations.device).repeat_interleave(n_latents)  # (M*Q,)
    return text_time[:, :, None] == media_id[None, None, :]  # (B, L, M*Q)

class GatedCrossAttention(Module):
    """Flamingo's GATED XATTN-DENSE block, inserted before an LM block:
        x = x + tanh(a) * xattn(ln(x), media)      x = x + tanh(b) * ff(ln(x))
    a = b = 0 at init, and tanh(0) * anything finite is exactly 0, so the LM computes exactly what it did
    without the block; training opens the gates gradually."""
    def __init__(self, d, d_media, n_head, sdpa=True):
        super().__init__()
        self.ln, self.attn = nn.LayerNorm(d), MultiHeadAttention(d, n_head, d_ctx=d_media, sdpa=sdpa)
        self.ln_ff, self.ff = nn.LayerNorm(d), MLP(d)
        self.attn_gate = nn.Parameter(torch.zeros(()))  # scalar a = 0: closed, the block starts as the identity
        self.ff_gate = nn.Parameter(torch.zeros(()))  # scalar b = 0
        self.init_weights()
    def forward(self, x, media, mask):
        # media (B, M*Q, Dm), mask (B, L, M*Q). A fully masked row would attend uniformly (or get zeros from SDPA), so
        # tokens with no media yet get a zero update instead.
        out = self.attn(self.ln(x), media, mask=mask)  # (B, L, D): each text token's read of its media
        out = out.masked_fill(~mask.any(-1, keepdim=True), 0.0)  # (B, L, D)
        # tanh keeps each gate in (-1, 1): the media can at most add one full branch, never blow the LM's scale up,
        # and its slope 1 at 0 lets the gradient open a closed gate at once.
        x = x + self.attn_gate.tanh() * out
        return x + self.ff_gate.tanh() * self.ff(self.ln_ff(x))  # (B, L, D)

class Decoder(Module):
    """A small causal LM. `prefix` (B, Np, D) is prepended to the token embeddings (unified embedding);
    `media` (B, M*Q, D) + `media_mask` go through a gated cross-attention layer before every block (Flamingo);
    `xattn=False` builds the plain LM. forward -> (logits (B, L, V) over the text positions, loss or None)."""
    def __init__(self, cfg, vocab, n_pos, xattn=False):
        super().__init__()
        d = cfg.d_model
        self.tok = nn.Embedding(vocab, d)  # (V, D)
        self.pos = nn.Parameter(torch.randn(1, n_pos, d) * 0.02)  # (1, Np+L_max, D): the prefix has positions too
        self.blocks = nn.ModuleList([Block(d, cfg.n_head, causal=True, sdpa=cfg.sdpa) for _ in range(cfg.n_dec_layer)])
        self.xattn = nn.ModuleList([GatedCrossAttention(d, d, cfg.n_head, sdpa=cfg.sdpa)
                                    for _ in range(cfg.n_dec_layer)]) if xattn else None
        self.ln = nn.LayerNorm(d)  # final norm before the output layer (pre-norm blocks leave x un-normalised)
        self.head = nn.Linear(d, vocab, bias=False)  # D -> V logits
        self.head.weight = self.tok.weight  # tied input/output embeddings
        self.init_weights()
    def forward(self, ids, prefix=None, media=None, media_mask=None, targets=None):
        x = self.tok(ids) if prefix is None else torch.cat([prefix, self.tok(ids)], 1)  # (B, Np+L, D)
        n_prefix = x.size(1) - ids.size(1)  # Np, 0 without a prefix
        x = x + self.pos[:, :x.size(1)]  # (B, Np+L, D)
        for i, block in enumerate(self.blocks):
            if media is not None and self.xattn is not None:
                x = self.xattn[i](x, media, media_mask)  # Flamingo: read the media, then the LM block
            x = block(x)  # causal: a prefix token sees earlier prefix tokens, a text token the prefix and its past
        logits = self.head(self.ln(x[:, n_prefix:]))  # (B, L, V): text positions only
        if targets is None:  # generation; training: next-token cross-entropy, -100 marks positions after EOS
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100)  # mean: ()

class Captioner(Module):
    """Video -> caption, two ways. Frames go one by one through the (CLIP) ViT: (B, F, P, D) frame tokens. Then
      unified: + a time embedding per frame, a linear projection, placed before the text in the decoder input
        (LLaVA's wiring). The simplest: visual tokens are more tokens, the decoder's own self-attention does the
        reading, nothing in the LM changes; but every layer pays for all F*(1+P) visual tokens (F*P: --no-motion).
      cross:   Perceiver resampler -> Q latents, read by gated cross-attention layers inside the decoder
        (Flamingo's wiring). The text sequence stays text-only and the visual cost is Q per layer whatever F is;
        the zero gates let it be added to a pretrained LM without changing what that LM computes at first."""
    def __init__(self, cfg, vocab, variant):
        super().__init__()
        self.variant, d = variant, cfg.d_model
        self.vision = ViT(cfg)
        P = (cfg.img_size // cfg.patch) ** 2 + 1  # tokens per frame: patches + CLS
        # Motion made explicit (both variants): each frame's tokens also receive a projection of their difference to
        # the previous frame's tokens. The CLIP encoder was trained on stills: its tokens say what is in a frame, and
        # the direction of motion lives only in how they change from frame to frame.
        self.motion = nn.Linear(d, d) if cfg.motion else None
        # One more token per frame: the frame's whole token grid flattened into one vector and projected, so that
        # *where* the object is lives in the channels (as in a CNN feature map) rather than in which token holds it.
        # Its difference between frames (above) then says where the object went, as one vector.
        self.summary = nn.Linear(P * d, d) if cfg.motion else None
        if variant == "unified":
            self.time = nn.Parameter(torch.randn(cfg.max_frames, 1, d) * 0.02)  # (F_max, 1, D): which frame
            self.proj = nn.Linear(d, d)  # the projector: image-encoder space -> the decoder's input space
            # positions: F frames x (P tokens + 1 summary token if --motion, as the bool counts 1), then the text
            self.decoder = Decoder(cfg, vocab, cfg.n_frames * (P + cfg.motion) + cfg.max_len)
        else:
            self.resampler = PerceiverResampler(d, cfg.n_head, cfg.n_latents, cfg.n_perceiver_layer, cfg.max_frames,
                                                cfg.sdpa)
            self.decoder = Decoder(cfg, vocab, cfg.max_len, xattn=True)
        self.init_weights()
    def encode(self, frames):  # uint8 (B, F, S, S, 3) -> prefix (B, F*(1+P), D) or latents (B, Q, D); no --motion: F*P
        B, Fr = frames.shape[:2]
        tokens = self.vision(to_pixels(frames.flatten(0, 1))).unflatten(0, (B, Fr))  # (B, F, P, D): each frame alone
        if self.motion is not None:
            tokens = torch.cat([self.summary(tokens.flatten(2))[:, :, None], tokens], 2)  # (B, F, 1+P, D)
            prev = torch.cat([tokens[:, :1], tokens[:, :-1]], 1)  # (B, F, 1+P, D): frame f-1 (frame 0 for itself)
            tokens = tokens + self.motion(tokens - prev)  # (B, F, 1+P, D); frame 0's difference is 0
        if self.variant == "unified":
            return self.proj(tokens + self.time[:Fr]).flatten(1, 2)  # (B, F*(1+P), D)
        return self.resampler(tokens)  # (B, Q, D)
    def forward(self, visual, ids, targets=None):
        if self.variant == "unified":
            return self.decoder(ids, prefix=visual, targets=targets)
        # one video per caption, "placed" before the first token: every token's latest media is media 1
        loc = torch.zeros_like(ids, dtype=torch.bool)
        loc[:, 0] = True
        mask = media_attention_mask(loc, visual.size(1))  # (B, L, Q), all True here
        return self.decoder(ids, media=visual, media_mask=mask, targets=targets)

def set_record(model, on):
    for m in model.modules():
        if isinstance(m, MultiHeadAttention):
            m.record, m.weights = on, None

def n_params(model):
    return sum(p.numel() for p in model.parameters())

# The tour: each section prints real shapes and checks its claims (an AssertionError here is a bug, not user error) ----
def check(ok, claim):
    if not ok:
        raise AssertionError(f"tour check failed: {claim}")
    print(f"  ok  {claim}")

def subsample(n_total, fps, target_fps):
    """Frame-rate sub-sampling: keep every (fps/target_fps)-th frame, e.g. every 8th of 24 fps simulates 3 fps."""
    return list(range(0, n_total, max(1, round(fps / target_fps))))  # the step: 24 / 3 = every 8th frame

def fixed_clips(indices, clip_len):
    """Cut a frame list into clips of exactly clip_len (a mini-batch needs equal lengths); the last clip is padded by
    repeating its last frame, so no frame is dropped."""
    clips = [indices[i:i + clip_len] for i in range(0, len(indices), clip_len)]
    clips[-1] = clips[-1] + [clips[-1][-1]] * (clip_len - len(clips[-1]))
    return clips

def unpatchify(x, p, channels=3):  # the inverse of patchify: (B, P', 3*p*p) -> (B, 3, S, S)
    B, n = x.size(0), math.isqrt(x.size(1))  # n: patches per row and per column
    x = x.reshape(B, n, n, channels, p, p).permute(0, 3, 1, 4, 2, 5)  # (B, C, row, py, col, px)
    return x.reshape(B, channels, n * p, n * p)

def tour_attention(cfg):
    print("== attention: softmax(Q K^T / sqrt(d)) V, written out ==")
    g = torch.Generator().manual_seed(0)
    B, H, L, d = 2, 4, 6, 8
    q, k, v = (torch.randn(B, H, L, d, generator=g, dtype=torch.float64) for _ in range(3))
    out, w = attention(q, k, v)
    print(f"  q, k, v {tuple(q.shape)} (B, H, L, d) -> scores/weights {tuple(w.shape)} (B, H, L, L) -> out "
          f"{tuple(out.shape)} (B, H, L, d)")
    check(torch.allclose(w.sum(-1), torch.ones(B, H, L, dtype=torch.float64)), "every row of weights sums to 1")
    check(torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-12),
          "bidirectional attention == F.scaled_dot_product_attention (float64, 1e-12)")
    check(bool(torch.isfinite(attention(q * 1e3, k * 1e3, v)[0]).all()), "scores of 1e6 stay finite thanks to the "
          "max subtraction")
    # padding: batch item 1 has only 4 real keys; the mask hides its keys 4, 5 from every query
    keep = (torch.arange(L)[None] < torch.tensor([[6], [4]]))[:, None, None, :]  # (B, 1, 1, N): lengths 6 and 4
    out_m, w_m = attention(q, k, v, keep)
    print(f"  padding mask {tuple(keep.shape)} (B, 1, 1, N), True = real key; masked scores get "
          f"finfo.min = {torch.finfo(torch.float64).min:.3g}, not -inf")
    check(bool((w_m[1, :, :, 4:] == 0).all()), "padded keys get weight exactly 0")
    check(torch.allclose(out_m, F.scaled_dot_product_attention(q, k, v, attn_mask=keep), atol=1e-12),
          "masked attention == SDPA with the same boolean mask")
    v2 = torch.where(keep[:, :, 0, :, None], v, 1e6)  # (B, H, N, d): the padded values set to 1e6
    check(torch.equal(attention(q, k, v2, keep)[0][1], out_m[1]), "changing padded values changes nothing")
    check(bool(torch.isfinite(attention(q, k, v, torch.zeros(B, 1, 1, L, dtype=torch.bool))[0]).all()),
          "a fully masked row gives finite numbers (uniform), never NaN")
    out_c, w_c = attention(q, k, v, causal=True)
    print("  causal weights of head 0, batch 0 (row = query, column = key):\n" +
          "\n".join("    " + " ".join(f"{x:.2f}" for x in row) for row in w_c[0, 0].tolist()))
    check(bool((w_c.triu(1) == 0).all()), "causal: query i gives key j > i weight exactly 0")
    check(torch.allclose(out_c, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-12),
          "causal attention == SDPA(is_causal=True)")
    check(not torch.allclose(out_c, out), "causal differs from bidirectional (only the last row agrees)")
    check(torch.allclose(out_c[..., -1, :], out[..., -1, :]), "the last query sees all keys in both")
    mha = MultiHeadAttention(32, 4, sdpa=False).double()
    x = torch.randn(2, 5, 32, generator=g, dtype=torch.float64)
    y1 = mha(x)
    mha.sdpa = True
    check(torch.allclose(y1, mha(x), atol=1e-12), f"MultiHeadAttention {tuple(x.shape)} -> {tuple(y1.shape)}: "
          "written path == SDPA path")

def tour_cross(cfg):
    print("== cross: text tokens (queries) read a different sequence (keys/values) ==")
    g = torch.Generator().manual_seed(1)
    text, image = torch.randn(2, 7, 32, generator=g), torch.randn(2, 17, 48, generator=g)
    xa = MultiHeadAttention(32, 4, d_ctx=48, sdpa=False)
    xa.record = True
    fused = xa(text, image)
    print(f"  text {tuple(text.shape)} (B, L, D) x image {tuple(image.shape)} (B, N, Dm) -> weights "
          f"{tuple(xa.weights.shape)} (B, L, N) -> fused {tuple(fused.shape)} (B, L, D)")
    check(fused.shape == text.shape, "the output has the text's length and width: one fused vector per text token")
    check(torch.allclose(xa.weights.sum(-1), torch.ones(2, 7)), "each text token's weights over 17 image tokens sum "
          "to 1")
    image2 = image + torch.tensor([0.0, 1.0])[:, None, None]  # (B, N, Dm): batch 1's image shifted, batch 0's kept
    check(torch.equal(xa(text, image2)[0], fused[0]) and not torch.allclose(xa(text, image2)[1], fused[1]),
          "changing batch 1's image changes batch 1's output only")
    xa.record, xa.sdpa = False, True
    check(torch.allclose(xa(text, image), fused, atol=1e-5), "cross-attention written out == SDPA (float32)")

def tour_patchify(cfg):
    print("== patchify: a ViT sees an image as (S/p)^2 patches, not S^2 pixels: attention's cost grows as tokens^2 ==")
    S, p = cfg.img_size, cfg.patch
    img = torch.rand(2, 3, S, S, generator=torch.Generator().manual_seed(2))
    patches = patchify(img, p)
    print(f"  image {tuple(img.shape)} (B, 3, S, S) -> patches {tuple(patches.shape)} (B, (S/p)^2, 3*p*p) with p={p}")
    check(torch.equal(unpatchify(patches, p), img), "patches -> image is exact (bit for bit)")
    check(torch.equal(patches[0, S // p - 1], img[0, :, :p, -p:].reshape(-1)), f"patch {S // p - 1} is the top "
          "row's last p x p square (patches go row by row), channels first")
    vit = ViT(cfg)
    tokens = vit(img)
    print(f"  linear projection {tuple(vit.embed.weight.shape[::-1])} (3*p*p, D), + CLS, + positions -> ViT tokens "
          f"{tuple(tokens.shape)} (B, 1+P', D)")
    check(tokens.shape == (2, 1 + (S // p) ** 2, cfg.d_model), "one token per patch plus the CLS token")

def tour_clip(cfg):
    print("== clip: two encoders, one embedding space, symmetric InfoNCE ==")
    tok = Tokenizer.from_texts([f"a {c} {s}" for c, s in CLASSES])
    clip = CLIP(cfg, len(tok.ids))
    caps = ["a red circle", "a blue square", "a white triangle"]
    ids, lengths = pad_batch([tok.encode(c) for c in caps], cfg.max_len)
    img = torch.rand(3, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(3))
    ie, te = clip.encode_image(img), clip.encode_text(ids, lengths)
    print(f"  images {tuple(img.shape)} (B, 3, S, S) -> {tuple(ie.shape)} (B, E); texts {tuple(ids.shape)} (B, L) -> "
          f"{tuple(te.shape)} (B, E)")
    check(torch.allclose(ie.norm(dim=-1), torch.ones(3)) and torch.allclose(te.norm(dim=-1), torch.ones(3)),
          "embeddings are unit vectors, so img @ txt^T holds cosine similarities")
    # hand-computed InfoNCE on a 2x2 case: cosines [[1, 0], [0, 1]] at temperature 1 (logit_scale 0)
    a, hand = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), -math.log(math.e / (math.e + 1))  # embeddings, loss by hand
    check(abs(clip_loss(a, a, torch.tensor(0.0)).item() - hand) < 1e-6,
          f"InfoNCE on orthogonal pairs at T=1 equals -log(e/(e+1)) = {hand:.4f}")
    check(clip_loss(a, a, torch.tensor(math.log(10.0))).item() < hand, "a lower temperature (0.1) gives a lower loss")
    loss = clip(img, ids, lengths)
    loss.backward()
    print(f"  loss at init {loss.item():.4f} (chance: ln 3 = {math.log(3):.4f}); temperature = 1/exp(logit_scale) = "
          f"{1 / clip.logit_scale.exp().item():.3f}")
    check(clip.logit_scale.grad is not None and clip.logit_scale.grad.abs() > 0, "the temperature is learned: it "
          "gets a gradient")

def tour_video(cfg):
    print("== video: ordered frames, sub-sampled, cut into fixed-length clips ==")
    fps, seconds = 24, 3
    idx = subsample(fps * seconds, fps, 3)
    print(f"  {seconds} s at {fps} fps = {fps * seconds} frames; every 8th -> {len(idx)} frames at 3 fps: {idx}")
    check(idx == list(range(0, 72, 8)), "every 8th frame of 24 fps simulates 3 fps")
    clips = fixed_clips(idx, 4)
    print(f"  clips of 4 frames: {clips}")
    check(all(len(c) == 4 for c in clips) and sorted(set(sum(clips, []))) == idx,
          "every clip has 4 frames (the last repeats its final frame) and no frame is lost")
    batch = torch.zeros(len(clips), 4, 3, cfg.img_size, cfg.img_size)
    print(f"  a mini-batch of clips: {tuple(batch.shape)} (B, F, 3, S, S); each frame goes through the image encoder "
          f"as its own image: {tuple(batch.flatten(0, 1).shape)} (B*F, 3, S, S)")
    check(sample_indices(5, 8) == [0, 0, 1, 2, 2, 3, 4, 4], "8 from a 5-frame clip: a short clip repeats some frames")

def tour_perceiver(cfg):
    print("== perceiver: any number of frames -> a fixed set of latents (the LM's cost per layer stays Q, not F*P) ==")
    d, Q = cfg.d_model, cfg.n_latents
    res = PerceiverResampler(d, cfg.n_head, Q, cfg.n_perceiver_layer, max(cfg.max_frames, 24), sdpa=False)  # F up to 24
    P, outs = (cfg.img_size // cfg.patch) ** 2 + 1, []  # tokens per frame (patches + CLS), the output shapes
    set_record(res, True)  # keep the attention weights, to show their shape (the outputs stay the same)
    for Fr in (1, 3, 8, 24):
        x = torch.randn(2, Fr, P, d, generator=torch.Generator().manual_seed(Fr))
        y = res(x)
        w = res.layers[-1].attn.weights
        print(f"  frames {tuple(x.shape)} (B, F, P, D) = {Fr * P:4d} tokens -> latents {tuple(y.shape)} (B, Q, D); "
              f"attention {tuple(w.shape)} (B, Q, F*P+Q)")
        outs.append(y.shape)
    check(len(set(outs)) == 1 and outs[0][1] == Q, f"always {Q} visual tokens, whatever the frame count")
    swapped = (x := torch.randn(1, 2, P, d)).flip(1)  # (1, F, P, D): x with its two frames in the other order
    check(not torch.allclose(res(x), res(swapped)), "time embeddings make frame order matter (swapping 2 frames "
          "changes the latents)")
    res.double().time.data.zero_()  # time embeddings set to 0; float64: reordering now changes only rounding
    check(torch.allclose(res(x.double()), res(swapped.double()), atol=1e-5), "without them the resampler sees a set: "
          "order would not matter")

@torch.no_grad()  # the checks compare outputs only
def tour_flamingo(cfg):
    print("== flamingo: gated cross-attention dense blocks and media masking ==")
    vocab, d, Q = 20, cfg.d_model, 4  # vocabulary size V, width D, latents per media item Q
    lm = Decoder(dataclasses.replace(cfg, sdpa=False), vocab, n_pos=16, xattn=True).eval()  # 16 positions >= L
    ids = torch.randint(0, vocab, (2, 10))  # (B, L): L = 10 text tokens
    media = torch.randn(2, 2 * Q, d)  # (B, M*Q, D): two media items, Q latents each
    loc = torch.zeros(2, 10, dtype=torch.bool)
    loc[0, [2, 6]], loc[1, 2] = True, True  # <image> tokens: row 0 at positions 2 and 6, row 1 at 2 only
    mask = media_attention_mask(loc, Q)
    print(f"  text {tuple(ids.shape)} (B, L), media {tuple(media.shape)} (B, M*Q, D), media mask {tuple(mask.shape)} "
          f"(B, L, M*Q)")
    print("  row 0: token -> media it may see: " + " ".join(
        f"{i}:{(mask[0, i].nonzero()[0].item() // Q + 1) if mask[0, i].any() else '-'}" for i in range(10)))
    check(not mask[0, :2].any() and bool(mask[0, 2:6, :Q].all()) and not mask[0, 2:6, Q:].any()
          and bool(mask[0, 6:, Q:].all()) and not mask[0, 6:, :Q].any(),
          "tokens before any media see nothing; 2..5 see image 1 only; 6.. see image 2 only")
    plain, _ = lm(ids)  # the LM alone: the gated layers are skipped
    gated, _ = lm(ids, media=media, media_mask=mask)
    print(f"  gates tanh(0) = 0: logits {tuple(plain.shape)} (B, L, V) with and without the media")
    check(torch.equal(plain, gated), "at init the gated model's logits equal the plain LM's bit for bit")
    for blk in lm.xattn:  # open both gates of every block
        blk.attn_gate.data.fill_(1.0), blk.ff_gate.data.fill_(1.0)
    opened, _ = lm(ids, media=media, media_mask=mask)
    media2 = torch.cat([media[:, :Q] + 1.0, media[:, Q:]], 1)  # (B, M*Q, D): image 1 changed, image 2 kept
    check(not torch.allclose(opened, plain), "opened gates (tanh(1) = 0.76) let the media change the logits")
    # The mask acts inside each gated block; one block alone shows it without the LM's self-attention mixing
    # positions afterwards (in the full LM a later token may still read an earlier token that saw image 1).
    blk, x = lm.xattn[0], torch.randn(2, 10, d)  # the first gated block and a text input (B, L, D) for it
    y, y2, y3 = blk(x, media, mask), blk(x, media2, mask), blk(x, torch.randn_like(media), mask)  # (B, L, D) each
    check(torch.equal(y[:, :2], y3[:, :2]), "tokens before the first image ignore the media entirely")
    check(torch.equal(y[0, 6:], y2[0, 6:]) and not torch.allclose(y[0, 2:6], y2[0, 2:6]),
          "changing image 1 changes tokens 2..5 only: token 6 onwards sees its latest media, image 2")
    check(not torch.allclose(y[1, 6:], y2[1, 6:]), "in row 1 (a single image) every later token sees image 1")

SECTIONS = {"attention": tour_attention, "cross": tour_cross, "patchify": tour_patchify, "clip": tour_clip,
            "video": tour_video, "perceiver": tour_perceiver, "flamingo": tour_flamingo}

def tour(cfg):
    names, t0 = list(SECTIONS) if cfg.section == "all" else [cfg.section], time.time()
    for name in names:
        torch.manual_seed(cfg.seed)  # each section prints the same numbers on every run, alone or in the whole tour
        SECTIONS[name](cfg)
        print()
    print(f"tour: {len(names)} section(s), every check passed, {time.time() - t0:.1f} s")

# Checkpoint I/O: out_dir/<name>/model.safetensors + config.json (the dataclass, the token table, the train time) ------
def atomic(path, write):
    write(path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash never leaves a half-written file

def save_model(model, tok, cfg, name, train_seconds):
    os.makedirs(d := os.path.join(cfg.out_dir, name), exist_ok=True)
    # the decoder's output layer is tied to its embedding: store the tensor once
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if not k.endswith("head.weight")}
    atomic(os.path.join(d, "model.safetensors"), lambda p: save_file(state, p))
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUN_FIELDS}
    meta = {"script": SCRIPT, "model": name, "config": config, "vocab": tok.ids, "train_seconds": train_seconds}
    atomic(os.path.join(d, "config.json"), lambda p: json.dump(meta, open(p, "w"), indent=1))

def load_model(cfg, name):
    """-> (model on cfg's device, tokenizer, saved architecture + cfg's run fields, train seconds), or one line."""
    d = os.path.join(cfg.out_dir, name)
    cpath, wpath = os.path.join(d, "config.json"), os.path.join(d, "model.safetensors")
    if not (os.path.isfile(cpath) and os.path.isfile(wpath)):
        raise UserError(f"{d}: no checkpoint here (run --train first, or pass --out_dir)")
    if not isinstance((meta := read_json(cpath) or {}).get("config"), dict):
        raise UserError(f"{cpath}: not valid JSON, or not a checkpoint config (a JSON object with a 'config' object); "
                        f"re-run --train into a new --out_dir")
    if meta.get("script") != SCRIPT or meta.get("model") != name:
        raise UserError(f"{d}: checkpoint written by {meta.get('script')}/{meta.get('model')}, not {SCRIPT}/{name}")
    if unknown := sorted(set(meta["config"]) - {f.name for f in dataclasses.fields(Config)} - set(RUN_FIELDS)):
        raise UserError(f"{cpath}: unknown config keys {unknown} (written by another version of this script?)")
    cfg = Config(**{**meta["config"], **{k: getattr(cfg, k) for k in RUN_FIELDS}})  # run modes: the command line's
    if bad := config_problems(cfg):  # a hand-edited value (the token table's length is checked with the weights)
        raise UserError(f"{cpath}: {bad[0]}; the checkpoint is damaged, re-run --train into a new --out_dir")
    if not isinstance(ids := meta.get("vocab"), list) or any(type(i) is not int or not 0 <= i < 50257 for i in ids):
        raise UserError(f"{cpath}: 'vocab' is not a list of GPT-2 ids; the checkpoint is damaged, re-run --train")
    model = CLIP(cfg, len(ids)) if name == "clip" else Captioner(cfg, len(ids), name)  # ids: model id -> GPT-2 id
    try:
        state = load_file(wpath)
    except Exception as e:  # safetensors raises its own error type for a truncated or corrupt file
        raise UserError(f"{wpath}: not a readable safetensors file ({type(e).__name__}); re-run --train") from None
    if name != "clip" and "decoder.tok.weight" in state:  # the tied head, stored once
        state["decoder.head.weight"] = state["decoder.tok.weight"]
    want = model.state_dict()
    missing, unexpected = sorted(set(want) - set(state)), sorted(set(state) - set(want))
    shapes = [k for k in want if k in state and want[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise UserError(f"{wpath}: does not fit (missing {missing}, unexpected {unexpected}, mis-shaped {shapes})")
    model.load_state_dict(state)
    return model.to(pick_device(cfg.device)), Tokenizer(ids), cfg, meta.get("train_seconds")

# Metrics --------------------------------------------------------------------------------------------------------------
def exact_match(preds, refs):  # share of predictions equal to their reference (lower-cased, whitespace normalised)
    norm = lambda text: " ".join(text.lower().strip().rstrip(".").split())  # no final '.'
    return sum(norm(p) == norm(r) for p, r in zip(preds, refs)) / max(1, len(refs))

# Train: CLIP first, then the two captioners from its image encoder, same budget ---------------------------------------
def pick_device(name):  # --device auto -> cuda if there is one, else mps (Apple GPUs), else cpu; else one of them
    mps = torch.backends.mps.is_available()
    cudas = [f"cuda:{i}" for i in range(torch.cuda.device_count())]  # counting them creates no CUDA context
    have = ["cpu"] + ["mps"] * mps + cudas + ["cuda"] * bool(cudas)  # auto takes the last: cuda > mps > cpu
    if name != "auto" and name not in have:
        raise UserError(f"--device {name}: no such device on this machine; pass auto or one of {', '.join(have)}")
    return have[-1] if name == "auto" else name

def autocast(cfg, device):
    if cfg.dtype == "float32" or device == "mps":
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(device.split(":")[0], dtype=getattr(torch, cfg.dtype))

def lr_at(step, total, base, cfg):  # linear warmup, then cosine decay to a tenth of the base rate
    if step < cfg.warmup:
        return base * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, total - cfg.warmup))
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))  # 0.45 = (1 - 0.1) / 2: 1 at t = 0, 0.1 at t = 1

def make_optimizer(groups, cfg):
    """AdamW; weight decay on every tensor of 2+ dims (weights, embeddings; not biases, norms, gates, temperature)."""
    out = []
    for params, lr in groups:
        params = [p for p in params if p.requires_grad]
        for decay, ps in ((cfg.weight_decay, [p for p in params if p.dim() >= 2]),  # matrices
                          (0.0, [p for p in params if p.dim() < 2])):  # biases, norms, gates, the temperature
            if ps:
                out.append(dict(params=ps, lr=lr, base_lr=lr, weight_decay=decay))
    return torch.optim.AdamW(out, betas=(0.9, 0.95))

def fit(model, opt, total, batch_fn, cfg, name):
    """The shared loop: batch_fn(step) -> loss. One line per log_interval (lr: --lr's rate, as scheduled at that step;
    --vision_lr and --gate_lr follow the same schedule); a NaN loss is a user error."""
    model.train()
    t0 = time.time()
    for step in range(total):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, total, g["base_lr"], cfg)
        loss = batch_fn(step)
        if not torch.isfinite(loss):  # named: the step as the log lines number it, the rates this model trains at
            rates = "--lr" + (", --vision_lr" if name != "clip" else "") + (", --gate_lr" if name == "cross" else "")
            fix = "" if cfg.dtype == "float32" else ", or train with --dtype float32"
            raise UserError(f"{name}: loss became {loss.item()} at step {step + 1}; lower {rates}{fix}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % cfg.log_interval == 0 or step == total - 1:
            el = time.time() - t0  # seconds so far
            print(f"{name} step {step + 1}/{total} | loss {loss.item():.4f} | lr {lr_at(step, total, cfg.lr, cfg):.2e}"
                  f" | {1000 * el / (step + 1):.0f} ms/step | {cfg.batch_size * (step + 1) / el:.0f} samples/s | "
                  f"eta {el / (step + 1) * (total - step - 1):.0f}s", flush=True)
    model.eval()
    return time.time() - t0

def prepare_data(cfg):
    """Build the world if needed and decode everything once: {kind: {split: (captions, uint8 tensor)}} + tokenizer."""
    build_world(cfg)
    data = {"images": {}, "videos": {}}
    for split in ("train", "test", "novel"):
        if split != "novel":
            ents = read_annotations(os.path.join(cfg.data_dir, f"images_{split}.txt"))
            data["images"][split] = ([c for _, c in ents],
                                     torch.from_numpy(np.stack([load_image(p, cfg.img_size) for p, _ in ents])))
        ents = read_annotations(os.path.join(cfg.data_dir, f"videos_{split}.txt"))
        data["videos"][split] = ([c for _, c in ents], torch.from_numpy(
            np.stack([load_video(p, cfg.n_frames, cfg.img_size) for p, _ in ents])))  # (N, F, S, S, 3)
    tok = Tokenizer.from_texts(texts := data["images"]["train"][0] + data["videos"]["train"][0])
    if (longest := max(len(tok.encode(t)) for t in texts)) > cfg.max_len:  # pad_batch would cut it
        raise UserError(f"--max_len {cfg.max_len}: a training caption is {longest} tokens (with BOS, EOS); raise it")
    return data, tok

def train_clip(cfg, data, tok, device):
    torch.manual_seed(cfg.seed)
    model = CLIP(cfg, len(tok.ids)).to(device)
    caps, imgs = data["images"]["train"]
    classes = sorted(set(caps))
    label = torch.tensor([classes.index(c) for c in caps])
    ids, lengths = pad_batch([tok.encode(c) for c in classes], cfg.max_len)  # one row per distinct caption
    opt = make_optimizer([(model.parameters(), cfg.lr)], cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    print(f"clip: {n_params(model):,} parameters, {len(caps)} images, {len(classes)} distinct captions")
    def batch(step):
        idx = torch.randint(0, len(caps), (cfg.batch_size,), generator=g)
        lab = label[idx]
        same = (lab[:, None] == lab[None, :]).to(device)  # (B, B): pairs sharing a caption are both positives
        with autocast(cfg, device):
            return model(to_pixels(imgs[idx]).to(device), ids[lab].to(device), lengths[lab].to(device), same)
    return model, fit(model, opt, cfg.clip_steps, batch, cfg, "clip")  # (model, training seconds)

def caption_batch(tok, caps, cfg):
    """Captions -> (inputs, targets): targets are inputs shifted by one, -100 after each row's EOS."""
    ids, lengths = pad_batch([tok.encode(c) for c in caps], cfg.max_len)
    inp, tgt = ids[:, :-1], ids[:, 1:].clone()  # (B, L-1) each: the token at j, the token at j+1 to predict
    tgt[torch.arange(tgt.size(1))[None] >= (lengths[:, None] - 1)] = -100  # (B, L-1): from slot length-1 on, padding
    return inp, tgt

def train_captioner(cfg, variant, vision_state, data, tok, device):
    torch.manual_seed(cfg.seed)
    model = Captioner(cfg, len(tok.ids), variant).to(device)
    model.vision.load_state_dict(vision_state)  # start from the CLIP image encoder (copied onto the device)
    caps, clips = data["videos"]["train"]
    inp, tgt = caption_batch(tok, caps, cfg)
    gates = [p for n, p in model.named_parameters() if n.endswith("_gate")]  # cross's tanh gates (unified: none)
    rest = [p for n, p in model.named_parameters() if not n.startswith("vision.") and not n.endswith("_gate")]
    opt = make_optimizer([(model.vision.parameters(), cfg.vision_lr), (rest, cfg.lr), (gates, cfg.gate_lr)], cfg)
    g = torch.Generator().manual_seed(cfg.seed)  # both variants see the very same batches
    print(f"{variant}: {n_params(model):,} parameters ({n_params(model.vision):,} in the CLIP image encoder)")
    def batch(step):
        idx = torch.randint(0, len(caps), (cfg.batch_size,), generator=g)
        with autocast(cfg, device):
            return model(model.encode(clips[idx].to(device)), inp[idx].to(device), tgt[idx].to(device))[1]  # loss
    return model, fit(model, opt, cfg.steps, batch, cfg, variant)  # (model, training seconds)

def train(cfg):
    device, t0 = pick_device(cfg.device), time.time()  # an unknown --device is refused before any data is built
    cfg = dataclasses.replace(cfg, data_dir=os.path.abspath(cfg.data_dir))  # saved so: --eval finds it from anywhere
    print("config:", json.dumps(dataclasses.asdict(cfg)))
    data, tok = prepare_data(cfg)
    print(f"data ready in {time.time() - t0:.1f} s: {len(tok.ids)} token table entries, "
          f"{len(data['images']['train'][0])} train images, {len(data['videos']['train'][0])} train clips")
    clip_model, seconds = train_clip(cfg, data, tok, device)
    times, models = {"clip": seconds}, {}
    vision = {k: v.detach().clone() for k, v in clip_model.vision.state_dict().items()}
    for variant in ("unified", "cross"):
        models[variant], times[variant] = train_captioner(cfg, variant, vision, data, tok, device)
    for name, model in (("clip", clip_model), *models.items()):  # after training: a failed run keeps the old ones
        save_model(model, tok, cfg, name, times[name])
    res = evaluate(models, clip_model, tok, cfg, device, data, times)
    print(f"train mode: {time.time() - t0:.0f} s wall in all")
    return res

# Generate and evaluate ------------------------------------------------------------------------------------------------
@torch.no_grad()
def generate(model, frames, cfg, device):
    """Greedy captions for uint8 clips (B, F, S, S, 3). The video is encoded once; each step re-runs the decoder on
    the whole sequence (no KV cache: captions here are ~6 tokens). -> list of token-id lists, EOS excluded."""
    model.eval()
    with autocast(cfg, device):
        visual = model.encode(frames.to(device))
        ids = torch.full((len(frames), 1), EOT, dtype=torch.long, device=device)  # BOS
        done = torch.zeros(len(frames), dtype=torch.bool, device=device)
        for _ in range(cfg.max_len - 1):
            nxt = model(visual, ids)[0][:, -1].argmax(-1).masked_fill(done, EOT)  # (B,): finished rows pad with EOS
            ids = torch.cat([ids, nxt[:, None]], 1)
            done |= nxt == EOT
            if done.all():
                break
    return [row[:row.index(EOT)] if EOT in row else row for row in ids[:, 1:].tolist()]  # cut at the first EOS

def caption_all(model, tok, clips, cfg, device, batch=64):  # -> (captions, generated tokens per second)
    preds, n_tok, t0 = [], 0, time.time()
    for i in range(0, len(clips), batch):
        for ids in generate(model, clips[i:i + batch], cfg, device):
            preds.append(tok.decode(ids))
            n_tok += min(len(ids) + 1, cfg.max_len - 1)  # + its EOS, unless it ran to max_len without one
    return preds, n_tok / (time.time() - t0)

@torch.no_grad()
def zero_shot(model, tok, cfg, imgs, caps, device):
    """Classify each image among the 18 class prompts 'a <colour> <shape>' by cosine similarity."""
    prompts = [f"a {c} {s}" for c, s in CLASSES]
    ids, lengths = pad_batch([tok.encode(p) for p in prompts], cfg.max_len)
    with autocast(cfg, device):
        txt = model.encode_text(ids.to(device), lengths.to(device)).float()  # (18, E)
        pred = torch.cat([(model.encode_image(to_pixels(imgs[i:i + 256]).to(device)).float() @ txt.t()).argmax(-1)
                          for i in range(0, len(imgs), 256)]).cpu()
    acc = sum(prompts[p] == c for p, c in zip(pred.tolist(), caps)) / len(caps)
    return {"n": len(caps), "zero_shot_accuracy": acc,
            "samples": [{"pred": prompts[p], "ref": c} for p, c in list(zip(pred.tolist(), caps))[:3]]}

def heat_png(path, w, frames, labels, title, rows):
    """Attention as a picture: one row per query (`labels`, described by `rows`), one column per frame (each frame
    drawn above its column), colour = weight scaled to its row's maximum; a header says all of this. Writes a PNG."""
    def put(img, texts, xys):  # small white text, texts[i] at pixel xys[i]
        for text, xy in zip(texts, xys):
            cv2.putText(img, text, xy, cv2.FONT_HERSHEY_SIMPLEX, 0.35, (255, 255, 255), 1, cv2.LINE_AA)
    cell, row_h, lab_w = 48, (14 if len(labels) > 16 else 20), 90
    w = w / np.maximum(w.max(1, keepdims=True), 1e-9)  # (rows, F), each row scaled to its own maximum
    heat = cv2.applyColorMap((255 * w).astype(np.uint8), cv2.COLORMAP_VIRIDIS)  # (rows, F, 3) BGR
    heat = cv2.resize(heat, (w.shape[1] * cell, w.shape[0] * row_h), interpolation=cv2.INTER_NEAREST)
    left = np.zeros((heat.shape[0], lab_w, 3), np.uint8)  # the row labels
    put(left, [lab[:12] for lab in labels], [(2, i * row_h + row_h - 4) for i in range(len(labels))])
    strip = np.concatenate([cv2.resize(f[:, :, ::-1], (cell, cell), interpolation=cv2.INTER_NEAREST)
                            for f in frames], 1)  # (cell, F*cell, 3): the frames, RGB -> BGR for OpenCV
    names = np.zeros((14, strip.shape[1], 3), np.uint8)  # the column labels, under the frames
    put(names, [f"frame {j + 1}" for j in range(len(frames))], [(j * cell + 2, 11) for j in range(len(frames))])
    width = lab_w + strip.shape[1]
    lines = [ln for t in (title, f"rows: {rows}", "columns: the frames, in time order; colour: weight / row max, "
                          "from dark purple (0) to yellow (1)")
             for ln in textwrap.wrap(t, width // 7)]  # about 7 pixels per character
    head = np.zeros((14 * len(lines) + 6, width, 3), np.uint8)
    put(head, lines, [(2, 14 * i + 14) for i in range(len(lines))])
    top = np.concatenate([np.zeros((cell + 14, lab_w, 3), np.uint8), np.concatenate([strip, names], 0)], 1)
    if not cv2.imwrite(os.fsencode(path), np.concatenate([head, top, np.concatenate([left, heat], 1)], 0)):
        raise UserError(f"{path}: could not be written (a folder of that name, or no permission)")

@torch.no_grad()
def attention_maps(model, tok, clip, cfg, device):
    """One clip's recorded attention, mean over heads -> {kind: (weights (rows, F), labels, rows' meaning)}, caption"""
    ids = generate(model, clip[None], cfg, device)[0]
    seq = torch.tensor([[EOT] + ids], device=device)  # (1, 1+L): BOS, then the caption
    labels = ["<bos>"] + [tok.enc.decode([tok.ids[i]]) for i in ids]
    maps, Fr = {}, clip.size(0)
    set_record(model, True)
    model(model.encode(clip[None].to(device)), seq)
    if model.variant == "unified":
        w = model.decoder.blocks[-1].attn.weights[0]  # (Np+L, Np+L)
        Np = w.size(0) - seq.size(1)
        maps["text_over_frames"] = (w[Np:, :Np].reshape(len(labels), Fr, -1).sum(-1), labels,  # (L, F)
                                    "caption tokens (queries) in the last decoder layer, weight summed per frame")
    else:
        wl = model.resampler.layers[-1].attn.weights[0]  # (Q, F*(1+P)+Q) with --motion, else (Q, F*P+Q)
        lat = wl[:, :-cfg.n_latents].reshape(cfg.n_latents, Fr, -1).sum(-1)  # (Q, F)
        maps["latents_over_frames"] = (lat, [f"latent {i}" for i in range(cfg.n_latents)],
                                       "the resampler's latents (queries) in its last layer, weight summed per frame")
        wt = model.decoder.xattn[-1].attn.weights[0]  # (L, Q)
        maps["text_over_frames"] = (wt @ (lat / lat.sum(-1, keepdim=True)), labels,  # (L, F)
                                    "caption tokens, through the latents (last gated layer's text->latent weights "
                                    "times latent->frame weights)")
    set_record(model, False)
    return {k: (v.float().cpu().numpy(), *rest) for k, (v, *rest) in maps.items()}, tok.decode(ids)

def evaluate(models, clip_model, tok, cfg, device, data, seconds):
    """Score CLIP zero-shot and both captioners on test and novel; print table, samples; write eval.json, heat maps."""
    # eval.json: {"test": {model: metrics, params, train_seconds (captioners: + params_wiring, gen_tokens_per_s)}, ...}
    res = {"test": {}, "novel": {}, "train_seconds": sum(seconds.values()), "config": dataclasses.asdict(cfg)}
    res["test"]["clip"] = zero_shot(clip_model, tok, cfg, data["images"]["test"][1], data["images"]["test"][0], device)
    res["test"]["clip"].update(params=n_params(clip_model), train_seconds=seconds["clip"])
    for name, model in models.items():
        for split in ("test", "novel"):
            caps, clips = data["videos"][split]
            preds, tps = caption_all(model, tok, clips, cfg, device)
            res[split][name] = {"n": len(caps), "exact_match": exact_match(preds, caps),
                                "samples": [{"pred": p, "ref": r} for p, r in list(zip(preds, caps))[:4]]}
        # both wirings share the frame encoder (CLIP ViT + motion features); "wiring" counts what differs
        shared = sum(n_params(m) for m in (model.vision, model.motion, model.summary) if m is not None)
        res["test"][name].update(params=n_params(model), params_wiring=n_params(model) - shared,
                                 train_seconds=seconds[name], gen_tokens_per_s=tps)
    print(f"\nCLIP zero-shot over {len(CLASSES)} class prompts on new images: "
          f"{res['test']['clip']['zero_shot_accuracy']:.1%} (n={res['test']['clip']['n']})")
    print(f"\n{'variant':<10} {'params':>9} {'wiring':>9} {'train s':>8} {'EM test':>8} {'EM novel':>9} {'tok/s':>10}")
    for n in models:
        v = res["test"][n]
        print(f"{n:<10} {v['params']:>9,} {v['params_wiring']:>9,} {v['train_seconds']:>8.1f} {v['exact_match']:>8.1%} "
              f"{res['novel'][n]['exact_match']:>9.1%} {v['gen_tokens_per_s']:>10.0f}")
    for n in models:
        for s in res["test"][n]["samples"][:2] + res["novel"][n]["samples"][:2]:
            print(f"  {n:<8} pred: {s['pred']!r:<32} ref: {s['ref']!r}")
    atomic(os.path.join(cfg.out_dir, "eval.json"), lambda p: json.dump(res, open(p, "w"), indent=1))
    clip = data["videos"]["test"][1][0]
    for name, model in models.items():
        maps, caption = attention_maps(model, tok, clip, cfg, device)
        for kind, (w, labels, rows) in maps.items():
            path = os.path.join(cfg.out_dir, f"attn_{name}_{kind}.png")
            heat_png(path, w, clip.numpy(), labels, f"{name} captioner, first test clip: '{caption}'", rows)
            print(f"wrote {path}")
    print(f"wrote {os.path.join(cfg.out_dir, 'eval.json')}")
    return res

def refuse_changes(cfg, typed, mode):  # --eval, --generate: refuse a flag unlike the saved run's; print what runs
    same = lambda k, v: os.path.abspath(v) == cfg.data_dir if k == "data_dir" else v == getattr(cfg, k)  # (absolute)
    if clash := [f"--{'no-' * (v is False)}{k}" + f" {v}" * (not isinstance(v, bool)) for k, v in typed.items()
                 if k not in RUN_FIELDS and not same(k, v)]:  # a bool as typed: --no-sdpa
        raise UserError(f"{cfg.out_dir}: {mode} runs the trained settings and world; drop {', '.join(clash)}")
    print("config:", json.dumps(dataclasses.asdict(cfg)))  # the saved run, with the typed run fields

def evaluate_saved(cfg, typed):  # --eval: the three checkpoints in out_dir, scored and pictured as --train does
    clip_model, tok, cfg, t_clip = load_model(cfg, "clip")
    refuse_changes(cfg, typed, "--eval")
    loaded = {v: load_model(cfg, v) for v in ("unified", "cross")}  # variant -> (model, tok, cfg, train seconds)
    if odd := [v for v, (_, t, c, _) in loaded.items() if (t.ids, c) != (tok.ids, cfg)]:  # settings, world, table
        raise UserError(f"{cfg.out_dir}: clip and {' and '.join(odd)} were saved by different --train runs; re-run it")
    return evaluate({v: got[0] for v, got in loaded.items()}, clip_model, tok, cfg, pick_device(cfg.device),
                    prepare_data(cfg)[0], {"clip": t_clip, **{v: got[3] for v, got in loaded.items()}})  # seconds

# Command line ---------------------------------------------------------------------------------------------------------
CHOICES = dict(section=("all", *SECTIONS), variant=("unified", "cross"), dtype=("float32", "bfloat16"))
ZERO_OK = ("n_vit_layer", "n_text_layer", "warmup", "threads")  # counts where 0 means none / the default
RATES = ("lr", "vision_lr", "gate_lr")  # above 0; every other number but --seed is at least 0

def config_problems(cfg):  # what a config must satisfy, typed or saved in a checkpoint (the first problem is reported)
    kinds = [f"--{f.name} {v!r}: must be of type {type(f.default).__name__}" for f in dataclasses.fields(cfg)
             if type(v := getattr(cfg, f.name)) is not type(f.default) and (type(f.default), type(v)) != (float, int)]
    nums = {n: float(v) if type(getattr(Config, n)) is float else v for n, v in vars(cfg).items()  # JSON's 0: a float
            if type(v) in (int, float) and n != "seed"}
    bad = [f"--{n} {v}: choose one of {', '.join(c)}" for n, c in CHOICES.items() if (v := getattr(cfg, n)) not in c]
    bad += [f"--{n} must be at least 1 ({v})" for n, v in nums.items() if type(v) is int and n not in ZERO_OK and v < 1]
    bad += [f"--{n} must be a number > 0 ({v})" for n, v in nums.items() if n in RATES and not 0 < v < math.inf]
    bad += [f"--{n} must be a number >= 0 ({v})" for n, v in nums.items() if not 0 <= v < math.inf]
    return kinds or bad or [why for wrong, why in (  # a NaN fails every range; these divide by sizes checked above
        (cfg.max_len < 2, f"--max_len {cfg.max_len}: at least 2 (BOS and one token)"),
        (cfg.d_model < 3, f"--d_model {cfg.d_model}: at least 3 (LayerNorm of 1 or 2 features: a constant or a sign)"),
        (not -2**63 <= cfg.seed < 2**63, f"--seed {cfg.seed}: must fit in 64 bits (-2**63 to 2**63 - 1)"),
        ("" in (cfg.out_dir, cfg.data_dir), "--out_dir and --data_dir must name a folder, not an empty string"),
        (cfg.img_size % cfg.patch, f"--img_size {cfg.img_size} is not a multiple of --patch {cfg.patch}"),
        (cfg.d_model % cfg.n_head, f"--d_model {cfg.d_model} is not a multiple of --n_head {cfg.n_head}")) if wrong]

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="A runnable tour of attention, ViT, CLIP, Perceiver and Flamingo, then "
                                            "two vision-LLM variants trained side by side.", allow_abbrev=False)
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # argparse's refusals in one line too, no usage
    p.add_argument("--train", action="store_true", help="build data, train CLIP and both captioners, evaluate")
    p.add_argument("--eval", action="store_true", help="re-evaluate the checkpoints in out_dir")
    p.add_argument("--generate", action="store_true", help="caption --video with the --variant checkpoint")
    p.add_argument("--video", default="", help="video file or folder of frames, for --generate")
    p.add_argument("--preset", default="default", choices=sorted(PRESETS), help="the sizes to start from")
    notes = dict(re.findall(r"^    (\w+): (.*)$", inspect.getsource(Config), re.M)) if argv is None else {}  # --help
    for f in dataclasses.fields(Config):  # every Config field is a flag; bools as --flag / --no-flag
        kw = dict(action=argparse.BooleanOptionalAction) if isinstance(f.default, bool) else dict(type=type(f.default))
        p.add_argument(f"--{f.name}", default=None, help=notes.get(f.name), **kw)  # None: the preset's value
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    cfg = Config(**{**PRESETS[args.preset], **overrides})
    unread = next((n for n in overrides if n not in TOUR_FIELDS), "") * (not (args.train or args.eval or args.generate))
    if bad := config_problems(cfg) or [why for wrong, why in (  # the first bad flag, in one line naming it
        (args.train and cfg.n_frames > cfg.max_frames,  # (those two: the run's sizes)
         f"--n_frames {cfg.n_frames}: at most --max_frames {cfg.max_frames}"),
        ((args.train or args.eval and os.path.isdir(cfg.out_dir)) and not writable(cfg.out_dir, os.path.join("clip",
         "config.json"), lambda m: not args.train or m.get("script") == SCRIPT), f"--out_dir {cfg.out_dir}: a file, "
         "a folder this script did not write, or no folder can be made or written in" + "; use another" * args.train),
        (args.video and (args.train or args.eval or not args.generate), "--video is for --generate, on its own"),
        ("variant" in overrides and not args.generate, "--variant picks --generate's model (--train, --eval run both)"),
        ("section" in overrides and (args.train or args.eval or args.generate), "--section is for the tour (no mode)"),
        (unread, f"--{unread} is for a mode (--train, --eval, --generate); the tour does not read it"),
        (args.generate and not args.video, "--generate needs --video PATH (a video or a folder of frames)")) if wrong]:
        raise UserError(bad[0])
    return args, cfg, overrides

def main(argv=None):
    try:
        args, cfg, typed = parse_args(argv)
        torch.set_num_threads(cfg.threads or torch.get_num_threads())  # 0: PyTorch's default, left as it is
        if not args.generate:  # --train or --eval (each prints the config it runs), or no mode: the tour
            return train(cfg) if args.train else evaluate_saved(cfg, typed) if args.eval else tour(cfg)
        model, tok, cfg, _ = load_model(cfg, cfg.variant)
        refuse_changes(cfg, typed, "--generate")
        clip = torch.from_numpy(load_video(args.video, cfg.n_frames, cfg.img_size))[None]  # (1, F, S, S, 3)
        print(tok.decode(generate(model, clip, cfg, pick_device(cfg.device))[0]))
    except (UserError, OSError, KeyboardInterrupt) as e:  # bad input, a file it cannot read or write, or Ctrl-C
        print(f"error: {str(e) or 'interrupted; no file is left half-written'}", file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 2)

if __name__ == "__main__":
    if hasattr(sys.stdout, "reconfigure"):  # IDLE's stream has none; pythonw's stdout is None
        sys.stdout.reconfigure(errors="backslashreplace")  # a character the code page lacks (Windows): \U0001f600
    main()
