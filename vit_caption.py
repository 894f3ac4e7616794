"""vit_caption: a ViT image encoder + LLaMA-style decoder image captioner in one file, small enough to train on a CPU.

    image (B, S, S, 3) uint8
      -> ViT: patch embedding (conv, stride = patch), learned positions (default init: 2-D sin-cos), pre-LN blocks with
         GELU MLPs (dropout in --preset original), final LayerNorm            -> (B, P, E) patch tokens (+ CLS)
      -> pooled to the visual prefix: "cls" (a learned CLS token's output, (B, 1, E), the write-up's image vector),
         "mean" (mean of the patch tokens, (B, 1, E)) or "patches" (all P patch tokens, (B, P, E))
      -> linear projection E -> D                                                       -> (B, N, D)
      -> LLaMA-style decoder over [visual prefix, <|endoftext|> (BOS), caption tokens]: RMSNorm, rotary positions
         (rotate_half), causal SDPA self-attention with a KV cache, SwiGLU MLP (SiLU)   -> (B, L, V)

The "Vision Language Model (From Scratch)" write-up gives this model's parts and sizes (`--preset original`) and trained
it on 16 image-caption pairs with LLaMA's 32,000-piece tokenizer. Here the text is GPT-2 BPE (tiktoken); the embedding
and output table cover only the GPT-2 ids of the training captions plus <|endoftext|> (BOS and EOS), because a 50257-way
layer would dominate a small model on a CPU (`--no-compact_vocab` keeps all 50257 rows, as `--preset original` does).

The built-in world: PNG images of one or two shapes (6 colours x 3 shapes x 2 sizes) on grey, captioned with size,
colour, shape and, for two objects, their relation: "a small red circle above a large blue square" (two references,
one from each object's side). `test`: new images of (colour, shape) pairs seen in training; `novel`: held-out pairs.

Shape legend: B batch, S image side, P patches, E ViT width, N visual prefix tokens (1 or P), L text tokens,
D decoder width, H heads, hd head width D/H, T positions in one call, V vocabulary, K beams, G global batch.

Commands (also: --max_train 16, --preset original, --eval, --bench):
    python vit_caption.py --train                            # data + training + evaluation on CPU
    python vit_caption.py --generate --image photo.jpg       # caption any image (+ attention PNG)
    torchrun --nproc_per_node=2 vit_caption.py --train       # DDP (gloo on CPU, nccl on CUDA)
"""

import argparse
import collections
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

os.environ.setdefault("OPENCV_LOG_LEVEL", "OFF")  # set before cv2 loads: an image it cannot read is our one line
import cv2
import numpy as np
import tiktoken
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

SCRIPT = "vit_caption"

class UserError(Exception):
    """A problem with the user's input: main() prints it as one line and exits with status 2."""

def read_json(path):  # path's JSON object as a dict, or None: missing, unreadable, not JSON or not an object
    with contextlib.suppress(OSError, ValueError):  # ValueError: not JSON, or not UTF-8
        return obj if isinstance(obj := json.load(open(path, encoding="utf-8")), dict) else None

def check_folder(path, flag, ours, why):  # refuse a path to write into unless missing, an empty folder or `ours`
    if os.path.exists(path) and not (os.path.isdir(path) and (ours or not os.listdir(path))):
        raise UserError(f"{flag} {path}: {why}")
    top = os.path.abspath(path)  # -> the nearest path that exists (a link to nothing: the probe below fails)
    while not os.path.lexists(top):
        top = os.path.dirname(top)
    try:  # a scratch folder made and removed there: path can be made (not under a file, nor in /proc), before any work
        os.mkdir(probe := os.path.join(top, f".probe{os.getpid()}"))
        os.rmdir(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot create or write into this folder ({e.strerror})")

# Config ---------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Config:
    data: str = ""  # captions file of user data (format in the README); "" = the built-in synthetic world
    test_data: str = ""  # optional captions file to evaluate user data on; else about a tenth of the images is held out
    data_dir: str = "data/vit_caption"  # where the synthetic world is written
    out_dir: str = "out/vit_caption"  # checkpoint, eval.json, pictures
    n_train: int = 20000  # synthetic training images: enough that the model cannot memorise them
    n_val: int = 200  # validation loss during training
    n_test: int = 500  # the headline split: new images of (colour, shape) pairs seen in training
    n_novel: int = 500  # images with a held-out (colour, shape) pair
    max_train: int = 0  # >0: train on only the first max_train images (the write-up had 16) and report train EM
    eval_max: int = 0  # >0: evaluate only the first eval_max images of each split (the big preset is slow)
    img_size: int = 48  # images are resized (long side) to this side, then letterboxed to a square
    patch: int = 12  # patch side in pixels: 48 / 12 -> a 4 x 4 grid, P = 16; a shape spans 1-3 patches a side
    vit_dim: int = 128  # E
    vit_layers: int = 3  # ViT blocks
    vit_heads: int = 4  # ViT attention heads
    vit_mlp: int = 512  # GELU MLP hidden width (4 E, as ViT)
    vit_dropout: float = 0.0  # ViT dropout (the write-up's 0.4 is in --preset original)
    patch_init: str = "pca"  # "pca": patch embedding whitened on the training patches (init_from_data); "random"
    patch_scale: float = 1.0  # std of each whitened feature
    pool: str = "patches"  # visual prefix: "patches" (all P tokens), "cls" or "mean" (one vector, as the write-up)
    d_model: int = 128  # D
    n_layer: int = 2  # decoder layers
    n_head: int = 4  # decoder attention heads
    mlp_dim: int = 384  # SwiGLU hidden width
    max_len: int = 24  # longest caption in tokens, BOS and EOS included
    rope_theta: float = 100.0  # RoPE base; with LLaMA's 10000 the short prefix offsets barely turn (NOTES.md)
    dropout: float = 0.0  # decoder dropout on the attention weights and the residual branches
    compact_vocab: bool = True  # embedding and output tables over the GPT-2 ids seen in training (False: all 50257)
    batch_size: int = 64  # micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step (global batch = batch_size * grad_accum * processes)
    max_steps: int = 3000  # optimizer steps
    lr: float = 2e-3  # peak learning rate, after linear warmup; cosine decay to min_lr
    min_lr: float = 1e-4  # where the cosine ends (at max_steps)
    warmup: int = 60  # steps of linear warmup
    weight_decay: float = 0.05  # AdamW, on matrices and the conv (not the position table or CLS)
    grad_clip: float = 1.0  # max global gradient norm
    dtype: str = "float32"  # autocast dtype: float32, bfloat16, or float16 (CUDA, with a gradient scaler)
    device: str = "auto"  # auto = cuda > mps > cpu
    compile: bool = False  # torch.compile the training forward
    seed: int = 1337  # the synthetic world, the init, the batches
    log_interval: int = 50  # a log line every this many steps
    eval_interval: int = 400  # validation loss and a checkpoint every this many steps
    stop_after: int = 0  # stop (and save) after this many steps, as if interrupted; --resume continues
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # sample among the k likeliest tokens; 0 = off
    top_p: float = 1.0  # nucleus sampling; 1 = off
    beam: int = 1  # beam width; >1 = beam search (deterministic)
    max_new_tokens: int = 23  # caption length limit in tokens, EOS included

# tiny: seconds, for the tests, in folders of its own. original: the write-up's sizes (heads, run settings: ours)
PRESETS = {"default": {}, "tiny": dict(n_train=64, n_val=8, n_test=12, n_novel=12, img_size=16, patch=8, vit_dim=32,
    vit_layers=1, vit_heads=2, vit_mlp=64, d_model=32, n_layer=1, n_head=2, mlp_dim=64, batch_size=8, max_steps=6,
    warmup=2, log_interval=2, eval_interval=4, data_dir="data/vit_caption_tiny", out_dir="out/vit_caption_tiny"),
    "original": dict(img_size=96, patch=16, vit_dim=512, vit_layers=16, vit_heads=8, vit_mlp=2048, vit_dropout=0.4,
                     pool="cls", d_model=128, n_layer=8, n_head=4, mlp_dim=11008, compact_vocab=False, rope_theta=1e4,
                     batch_size=16, max_steps=6, eval_max=64, warmup=2, lr=3e-4, log_interval=1, eval_interval=1000)}

# Data: synthetic world, image loader, captions files, tokenizer -------------------------------------------------------
COLOURS = {"red": (40, 40, 230), "green": (40, 200, 40), "blue": (230, 90, 30),  # BGR, as OpenCV draws
           "yellow": (30, 220, 230), "purple": (200, 50, 160), "white": (235, 235, 235)}
SHAPES = ["circle", "square", "triangle"]
SIZES = {"small": 10, "large": 18}  # half-size in pixels of the written RENDER x RENDER image
NOVEL_PAIRS = {("red", "triangle"), ("green", "circle"), ("blue", "square"),  # (colour, shape) pairs never in training:
               ("yellow", "triangle"), ("purple", "circle"), ("white", "square")}  # one per colour, two per shape
RELATIONS = {"above": "below", "below": "above",
             "to the left of": "to the right of", "to the right of": "to the left of"}
RENDER = 96  # side of the written PNG (the write-up's input size); the model resizes to img_size

def captions_for(objs, relation):  # one object: 'a <size> <colour> <shape>'; two: 'A <relation> B', 'B <inverse> A'
    a, *b = (f"a {size} {colour} {shape}" for colour, shape, size, *_ in objs)  # objs: (colour, shape, size, ...)
    return [f"{a} {relation} {b[0]}", f"{b[0]} {RELATIONS[relation]} {a}"] if b else [a]

def sample_scene(rng, split):
    """-> (objects, relation): one object, or two in opposite halves; a held-out pair in the novel split only."""
    while True:
        n = 1 if rng.random() < 0.3 else 2  # redrawn on a retry: novel (needs a held-out pair) keeps two more often
        attrs = [(rng.choice(list(COLOURS)), rng.choice(SHAPES), rng.choice(list(SIZES))) for _ in range(n)]
        if any((c, s) in NOVEL_PAIRS for c, s, _ in attrs) != (split == "novel") or (n == 2 and attrs[0] == attrs[1]):
            continue  # novel: some held-out pair, other splits none; two equal objects ("a X above a X"): redraw
        q, m = RENDER // 4, max(SIZES[z] for _, _, z in attrs) + 2  # q: a half's centre; m: margin, not along relations
        if n == 1:
            return [(*attrs[0], rng.randint(m, RENDER - m), rng.randint(m, RENDER - m))], None
        relation = rng.choice(list(RELATIONS))
        along = [q, 3 * q] if relation in ("above", "to the left of") else [3 * q, q]  # first object's side first
        other, objs = rng.randint(m + 6, RENDER - m - 6), []  # shared position along the other axis...
        for (c, s, z), a in zip(attrs, along):
            # ...jittered: centres >= 2q - 12 apart along the relation's axis, <= 12 across it: one relation only
            a, o = a + rng.randint(-6, 6), other + rng.randint(-6, 6)  # along (no margin: may touch the edge), across
            objs.append((c, s, z, o, a) if relation in ("above", "below") else (c, s, z, a, o))  # (..., cx, cy)
        return objs, relation

def write_image(path, objs, rng):
    img = np.full((RENDER, RENDER, 3), rng.randint(50, 90), np.uint8)  # background grey varies a little
    for colour, shape, size, cx, cy in objs:
        c, h = COLOURS[colour], SIZES[size]  # BGR colour, half-size in pixels
        if shape == "circle":
            cv2.circle(img, (cx, cy), h, c, -1, cv2.LINE_AA)
        elif shape == "square":  # a little smaller than the circle's box: about the same area
            cv2.rectangle(img, (cx - h + 2, cy - h + 2), (cx + h - 2, cy + h - 2), c, -1)
        else:  # an upright triangle in the same box
            cv2.fillPoly(img, [np.int32([[cx, cy - h], [cx - h, cy + h - 1], [cx + h, cy + h - 1]])], c, cv2.LINE_AA)
    if not cv2.imwrite(os.fsencode(path), img):
        raise UserError(f"{path}: cannot write (is {os.path.dirname(path)} writable?)")

def build_world(cfg):  # write data_dir/<split>/*.png and data_dir/<split>.txt once (deterministic from --seed) -> paths
    sizes = {"train": cfg.n_train, "val": cfg.n_val, "test": cfg.n_test, "novel": cfg.n_novel}
    stamp, want = os.path.join(cfg.data_dir, "world.json"), dict(sizes, seed=cfg.seed, version=2)  # the manifest
    files, old = {s: os.path.join(cfg.data_dir, f"{s}.txt") for s in sizes}, read_json(stamp) or {}
    if old == want:  # written before for these sizes and this seed
        return files
    check_folder(cfg.data_dir, "--data_dir", set(old) == set(want) and isinstance(old["version"], int), "a file, or "
                 "a folder this script did not write (no world.json of its own); give a new folder, or use --data FILE")
    os.makedirs(cfg.data_dir, exist_ok=True)
    json.dump(dict(want, version=0), open(stamp, "w"))  # 0: ours, but a build under way (or cut short)
    for offset, (split, n) in enumerate(sizes.items()):
        rng, lines = random.Random(cfg.seed * 10 + offset), []  # one stream per split: --n_train moves no test image
        os.makedirs(os.path.join(cfg.data_dir, split), exist_ok=True)
        for i in range(n):
            (objs, relation), name = sample_scene(rng, split), f"{split}/{i:05d}.png"
            write_image(os.path.join(cfg.data_dir, name), objs, rng)
            lines += [f"{name} | {c}" for c in captions_for(objs, relation)]
        open(files[split], "w").write("\n".join(lines) + "\n")
    atomic(stamp, lambda p: json.dump(want, open(p, "w")))
    return files

def cut_off(path):  # a PNG with no IEND chunk; a JPEG with no end marker FF D9 after its scan (libjpeg pads it grey)
    data, i = open(path, "rb").read(), 2  # i: the next marker after FF D8; data may follow FF D9 (a motion photo)
    while data[:2] == b"\xff\xd8" and i + 4 <= len(data) and data[i] == 0xFF and data[i + 1] != 0xDA:
        i += 1 if data[i + 1] == 0xFF else 2 + int.from_bytes(data[i + 2:i + 4], "big")  # FF FF: a fill byte
    return data[:2] == b"\xff\xd8" and b"\xff\xd9" not in data[i:] or data[:4] == b"\x89PNG" and b"IEND" not in data

def load_image(path, size):
    """Any image OpenCV reads, any size -> uint8 (size, size, 3) RGB: long side resized to size (a 1 x 100000 strip
    stays thin), then letterboxed (edges repeated): a crop could cut an object away, a stretch turns circles oval."""
    if os.path.isfile(path) and cut_off(path):  # checked before libjpeg or libpng decodes it (and warns on stderr)
        raise UserError(f"{path}: this image is cut off (no end-of-image marker); re-export or re-copy it")
    try:  # os.fsencode: OpenCV gets the name's bytes (a name that is not UTF-8, from an old zip, crashes it as a str)
        img = cv2.imread(os.fsencode(path), cv2.IMREAD_UNCHANGED) if os.path.isfile(path) else None  # alpha kept
    except cv2.error as e:  # OpenCV raises for an image over its size limit (and returns None for one it cannot read)
        raise UserError(f"{path}: OpenCV cannot decode this image ({e.err}; it reads at most 2^30 pixels)") from None
    if img is not None and (img.ndim != 3 or img.shape[2] != 4 or img.dtype not in (np.uint8, np.uint16)):
        img = cv2.imread(os.fsencode(path), cv2.IMREAD_COLOR)  # no alpha: OpenCV's 8-bit BGR (EXIF-rotated), or None
    if img is None or img.size == 0:
        raise UserError(f"{path}: " + ("OpenCV cannot decode this image (empty, corrupt or unknown format)" if
                os.path.isfile(path) else "a folder, not an image" if os.path.isdir(path) else "image not found"))
    if img.shape[2] == 4:  # transparency composited onto white, as transformers' convert_to_rgb; + 127 rounds as PIL
        img = (img >> 8 * (img.dtype == np.uint16)).astype(np.int32)  # (H, W, 4) BGRA in 0..255 (16-bit: high byte)
        img = ((img[:, :, :3] * img[:, :, 3:] + 255 * (255 - img[:, :, 3:]) + 127) // 255).astype(np.uint8)
    h, w = (max(1, round(n * size / max(img.shape[:2]))) for n in img.shape[:2])  # long side -> size, aspect kept
    img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if max(img.shape[:2]) > size else cv2.INTER_LINEAR)
    top, left = (size - h) // 2, (size - w) // 2  # pad the short side equally on both ends
    img = cv2.copyMakeBorder(img, top, size - h - top, left, size - w - left, cv2.BORDER_REPLICATE)  # (size, size, 3)
    return np.ascontiguousarray(img[:, :, ::-1])  # BGR -> RGB

def read_captions(path, why=""):
    """Captions file: one `image path | caption` per line, paths relative to the file; an image may appear on several
    lines (several references). Blank lines and lines starting with # are skipped. -> [(image_path, [captions])]."""
    try:
        text = open(path, encoding="utf-8").read().replace("\ufeff", "")  # every BOM: a file's first, or files joined
    except (OSError, UnicodeDecodeError) as e:  # OSError: missing, a folder, unreadable (why: what needs the file)
        raise UserError(f"{path}: " + ("not a UTF-8 text file (expected lines 'image.png | a caption')" if isinstance(
            e, UnicodeDecodeError) else f"cannot read this captions file ({e.strerror}){why}"))
    base, caps = os.path.dirname(os.path.abspath(path)), {}  # image -> its captions, in the file's order
    for no, line in enumerate((raw.strip() for raw in text.split("\n")), 1):
        if not line or line.startswith("#"):
            continue
        name, bar, caption = (x.strip() for x in line.partition("|"))  # no "|": bar and caption are ""
        if not (name and bar and caption) or caption.startswith("|"):  # no bar, an empty side or "||"
            raise UserError(f"{path}:{no}: expected 'image path | caption', one bar between, both non-empty; found "
                            f"{line[:60]!r}")
        image = os.path.realpath(os.path.join(base, name))  # one key per image file, however its path is spelled
        if image not in caps and not os.path.isfile(image):
            raise UserError(f"{path}:{no}: no image file '{name}' (paths are relative to the captions file, with /)")
        caps.setdefault(image, []).append(caption)  # several lines per image = several references
    if not caps:
        raise UserError(f"{path}: no entries (expected lines 'image.png | a caption')")
    return list(caps.items())

def gpt2():  # tiktoken's GPT-2 BPE: its two files are downloaded once, or read from TIKTOKEN_CACHE_DIR
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # offline with no cached files: say how to fix it, no traceback
        raise UserError(f"tiktoken could not load the GPT-2 encoding ({type(e).__name__}); offline, point "
                        f"TIKTOKEN_CACHE_DIR at a copy of its cache folder (two hash-named files)") from None

class Tokenizer:  # GPT-2 BPE (tiktoken) over a compact table `ids` of the GPT-2 ids seen in training
    def __init__(self, ids):
        self.enc, self.ids, self.eos = gpt2(), list(ids), 0  # ids: model id -> GPT-2 id; 0: <|endoftext|>, BOS too
        self.to_model = {g: i for i, g in enumerate(self.ids)}  # GPT-2 id -> model id
    @classmethod
    def from_captions(cls, captions, compact=True):  # <|endoftext|>, then every GPT-2 id of the captions (or all 50257)
        enc = gpt2()
        ids = {t for c in captions for t in enc.encode_ordinary(c)} if compact else set(range(enc.n_vocab))
        return cls([enc.eot_token] + sorted(ids - {enc.eot_token}))
    def encode(self, text):  # caption -> [BOS, ..., EOS] in model ids; GPT-2 ids not in the table are dropped
        return [self.eos, *(self.to_model[t] for t in self.enc.encode_ordinary(text) if t in self.to_model), self.eos]
    def decode(self, ids):
        return self.enc.decode([self.ids[i] for i in ids if i != self.eos]).strip()

def normalise(text):  # for the metrics: lower case, punctuation dropped (as COCO's caption evaluation), single spaces
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())  # "Ball, left." -> "ball left"

# Model: primitives -> one Block for both towers -> ViT -> captioner ---------------------------------------------------
class RMSNorm(nn.Module):
    """LLaMA's norm (Zhang & Sennrich 2019): x / rms(x) * weight, no mean or bias: cheaper than LayerNorm, as good."""
    def __init__(self, d, eps=1e-6):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))
    def forward(self, x):
        xf = x.float()  # the mean square in float32, as LLaMA does, then back to the working dtype
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight

def rope_tables(n, head_dim, theta):
    """cos/sin (n, head_dim) for rotary positions (Su et al. 2021) in the rotate_half layout of HF LLaMA: the two
    halves share frequencies: pair i is (x_i, x_{i+head_dim/2}). Position t turns pair i by t * theta^(-2i/head_dim):
    the first pairs turn fast (they tell near positions apart), the last ones slowly (far ones)."""
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)  # (head_dim/2,)
    freqs = torch.outer(torch.arange(n, dtype=torch.float32), inv)  # (n, head_dim/2)
    emb = torch.cat([freqs, freqs], -1)  # (n, head_dim)
    return emb.cos(), emb.sin()

def apply_rope(x, cos, sin):
    """x (B, H, T, hd) turned by the angles of its positions; cos/sin (T, hd). Turning both q and k makes their dot
    product see the two positions only through their distance (relative position), besides the content."""
    x1, x2 = x.chunk(2, -1)  # the two halves of each head, (..., hd/2) each
    rotated = torch.cat([-x2, x1], -1)  # rotate_half, (..., hd): pair (x1_i, x2_i) -> (-x2_i, x1_i), a quarter turn
    return (x * cos + rotated * sin).type_as(x)

class Attention(nn.Module):
    """Multi-head self-attention with the HF LLaMA names (q_proj, k_proj, v_proj, o_proj), through SDPA. ViT
    (causal=False): bidirectional, with biases, positions already added to the tokens. Decoder (causal=True): no
    biases, RoPE on q and k, and a KV cache (a dict per layer) of every position seen so far, so that a generation
    step feeds only its new token. `weights`: None, or a list collecting each call's map (mean over heads)."""
    def __init__(self, dim, heads, causal, dropout):
        super().__init__()
        self.h, self.causal, self.p, self.weights = heads, causal, dropout, None
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(dim, dim, bias=not causal) for _ in range(4))
    def forward(self, x, rope=None, cache=None):
        B, T, D = x.shape
        # (B, T, D) -> (B, T, H, D/H) -> (B, H, T, D/H): each head attends on its own slice of the width
        q, k, v = (m(x).view(B, T, self.h, -1).transpose(1, 2) for m in (self.q_proj, self.k_proj, self.v_proj))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)  # each at its own absolute position
        past = cache["k"].shape[2] if cache else 0  # positions already in the cache ({} before the first call)
        if cache is not None:  # append the new positions to the cached ones: (B, H, past+T, D/H)
            k = cache["k"] = torch.cat([cache["k"], k], 2) if past else k
            v = cache["v"] = torch.cat([cache["v"], v], 2) if past else v
        # causal over the whole [prefix, text] sequence, as LLaVA: new query i (position past+i) sees keys <= past+i
        mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(past) if self.causal else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        if self.weights is not None:  # the same weights, explicit, only to draw the attention maps
            att = (q @ k.transpose(-2, -1)).float() / math.sqrt(q.shape[-1])  # (B, H, T, past+T)
            att = att if mask is None else att.masked_fill(~mask, float("-inf"))
            self.weights.append(att.softmax(-1).mean(1))  # (B, T, past+T)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, D))  # heads side by side again: (B, T, D)

class GeluMLP(nn.Module):  # the ViT's MLP (Dosovitskiy et al. 2020): down(dropout(gelu(up(x)))), with biases
    def __init__(self, dim, hidden, dropout):
        super().__init__()
        self.up_proj, self.down_proj, self.drop = nn.Linear(dim, hidden), nn.Linear(hidden, dim), nn.Dropout(dropout)
    def forward(self, x):
        return self.down_proj(self.drop(F.gelu(self.up_proj(x))))

class SwiGLU(nn.Module):
    """LLaMA's MLP (Shazeer 2020, https://arxiv.org/abs/2002.05202): down(silu(gate(x)) * up(x)), no biases.
    The gate lets each hidden unit switch its up-projection on or off depending on the input."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(dim, hidden, bias=False), nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

class Block(nn.Module):
    """Pre-norm Transformer block, the same wiring in both towers: x + attn(norm(x)), then x + mlp(norm(x)); the ViT's
    (causal=False) with LayerNorm and a GELU MLP, LLaMA's decoder layer (causal=True) with RMSNorm and SwiGLU. o_proj
    and down_proj write into the residual stream: init_std 0.02 / sqrt(2 * depth) (GPT-2) keeps its scale at init."""
    def __init__(self, dim, heads, hidden, dropout, causal, depth):
        super().__init__()
        norm = RMSNorm if causal else nn.LayerNorm
        self.input_layernorm = norm(dim)
        self.self_attn = Attention(dim, heads, causal, dropout)
        self.post_attention_layernorm = norm(dim)
        self.mlp = SwiGLU(dim, hidden) if causal else GeluMLP(dim, hidden, dropout)
        self.drop = nn.Dropout(dropout)
        self.self_attn.o_proj.init_std = self.mlp.down_proj.init_std = 0.02 / math.sqrt(2 * depth)
    def forward(self, x, rope=None, cache=None):
        x = x + self.drop(self.self_attn(self.input_layernorm(x), rope, cache))
        return x + self.drop(self.mlp(self.post_attention_layernorm(x)))  # (B, T, D)

def sincos_2d(n, dim):
    """Positions of an n x n patch grid (row-major) -> (n*n, dim): dim/4 sin-cos pairs of the column, then dim/4 of the
    row, frequencies from pi/n per cell (smooth across the grid) down to ~1/100 of that; each at mean 0, variance 1."""
    rows, cols = torch.meshgrid(torch.arange(n).double(), torch.arange(n).double(), indexing="ij")  # (n, n) each
    freqs = (math.pi / n) / 100.0 ** (torch.arange(dim // 4).double() / (dim // 4))  # (dim/4,)
    angles = [c.flatten()[:, None] * freqs for c in (cols, rows)]  # (n*n, dim/4) each
    pe = torch.cat([f(a) for a in angles for f in (torch.sin, torch.cos)], 1)  # (n*n, 4 * (dim/4))
    pe = (pe - pe.mean(0)) / pe.std(0).clamp_min(1e-6) if pe.numel() else pe  # (dim < 4: no features, all zeros)
    return torch.cat([pe, pe.new_zeros(n * n, dim - pe.shape[1])], 1).float()  # dim not a multiple of 4: zeros

def pixels(images):  # uint8 (B, S, S, 3) -> float (B, 3, S, S) in [-1, 1], fixed: the model learns from scratch
    return (images.permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.5

class ViT(nn.Module):
    """Vision Transformer (Dosovitskiy et al. 2020, "An Image is Worth 16x16 Words"): cut the image into p x p
    patches, map each linearly to a token, add a position vector, run bidirectional Transformer blocks.
    (B, 3, S, S) normalised pixels -> visual tokens (B, N, E): N = 1 for "cls"/"mean", N = P for "patches"."""
    def __init__(self, cfg):
        super().__init__()
        self.pool, n_patch = cfg.pool, (cfg.img_size // cfg.patch) ** 2
        self.patch_embed = nn.Conv2d(3, cfg.vit_dim, cfg.patch, cfg.patch)  # stride = kernel: a linear map per patch
        # a CLS token only where it is read: DDP raises an error at the next step for a parameter with no gradient
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.vit_dim)) if cfg.pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, n_patch + (cfg.pool == "cls"), cfg.vit_dim))  # learned
        self.drop = nn.Dropout(cfg.vit_dropout)
        self.layers = nn.Sequential(*(Block(cfg.vit_dim, cfg.vit_heads, cfg.vit_mlp, cfg.vit_dropout, causal=False,
                                            depth=cfg.vit_layers) for _ in range(cfg.vit_layers)))  # x in, x out
        self.norm = nn.LayerNorm(cfg.vit_dim)
    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, E, S/p, S/p) -> (B, P, E), patches row by row
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1)  # (B, 1+P, E)
        x = self.norm(self.layers(self.drop(x + self.pos_embed)))  # (B, 1+P, E) with a CLS token, else (B, P, E)
        return x[:, :1] if self.pool == "cls" else (x.mean(1, keepdim=True) if self.pool == "mean" else x)  # (B, N, E)

class ViTCaptioner(nn.Module):  # ViT -> linear projection -> LLaMA-style decoder over [prefix, BOS, caption]
    def __init__(self, cfg, vocab_size):
        super().__init__()
        self.cfg, self.vit = cfg, ViT(cfg)
        self.proj = nn.Linear(cfg.vit_dim, cfg.d_model)  # E -> D: the image in the decoder's embedding space
        self.n_prefix = 1 if cfg.pool in ("cls", "mean") else (cfg.img_size // cfg.patch) ** 2  # N
        self.embed_tokens = nn.Embedding(vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg.d_model, cfg.n_head, cfg.mlp_dim, cfg.dropout, causal=True,
                                          depth=cfg.n_layer) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, vocab_size, bias=False)  # untied from embed_tokens, as in LLaMA
        cos, sin = rope_tables(self.n_prefix + cfg.max_len, cfg.d_model // cfg.n_head, cfg.rope_theta)  # (N+L, D/H)
        self.register_buffer("rope_cos", cos, persistent=False)  # RoPE angles for every position the decoder can see
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(lambda m: self._init_weights(m, 0.02))  # by module type (nanoGPT): weights N(0, 0.02), biases 0
        for table in [t for t in (self.vit.pos_embed, self.vit.cls_token) if t is not None]:  # cls_token: None or one
            nn.init.normal_(table, 0.0, 0.02)  # the ViT's positions and CLS token likewise
        for m in self.modules():  # second pass (GPT-2): the residual output projections at their smaller init_std
            if hasattr(m, "init_std"):
                self._init_weights(m, m.init_std)
    @staticmethod
    def _init_weights(m, std):
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
    @torch.no_grad()
    def init_from_data(self, images):
        """Patch embedding from the data (whitening, as in fast CIFAR-10 training, Keller Jordan's airbench): each
        output channel is one principal component of the training patches, scaled to std patch_scale, and centred.
        At random init every patch token is mostly the one grey-background vector; after this the tokens spread along
        the directions the patches vary most in (edges and colours). The patch positions become 2-D sin-cos."""
        conv, p = self.vit.patch_embed, self.cfg.patch
        patches = F.unfold(pixels(images), p, stride=p).transpose(1, 2).flatten(0, 1).double()  # (B*P, 3*p*p)
        x = patches - (mean := patches.mean(0))  # centred, (n, 3*p*p) for n = B*P patches
        # n < 3*p*p (few images, big patches): the n x n Gram matrix x x^T has cov's nonzero eigenvalues, and is smaller
        evals, evecs = torch.linalg.eigh(x @ x.T / (len(x) - 1) if (gram := len(x) < x.shape[1]) else torch.cov(x.T))
        # only components with real variance (few images leave some near 0: a 1/std gain would blow new images up)
        k = min(conv.out_channels, int((evals > 1e-5 * evals[-1]).sum()))
        evals, evecs = evals[len(evals) - k:].flip(0), evecs[:, len(evals) - k:].flip(1)  # the k largest, largest first
        evecs = x.T @ evecs / (evals * (len(x) - 1)).sqrt() if gram else evecs  # Gram's u -> cov's x^T u, unit length
        w = (evecs / evals.sqrt()).T * self.cfg.patch_scale  # (k, 3*p*p): component / its std: output std patch_scale
        conv.weight.zero_(), conv.bias.zero_()  # channels beyond the k components stay zero
        conv.weight.view(conv.out_channels, -1)[:k] = w.float()  # (E, 3, p, p) seen as (E, 3*p*p): unfold's order
        conv.bias[:k] = -(w @ mean).float()  # centred: the mean patch maps to zero
        # where a patch is must stay visible beside what it shows: positions at the features' std (NOTES.md)
        side = self.cfg.img_size // p  # patches a side; smooth 2-D sin-cos positions make "left of" a linear read-out
        self.vit.pos_embed[0, -side * side:] = sincos_2d(side, self.vit.pos_embed.shape[-1]) * self.cfg.patch_scale
    def part_counts(self):  # parameter count of each part, for the start-up print
        n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        return {"vit": n(self.vit), "projection": n(self.proj), "embedding": n(self.embed_tokens),
                "decoder layers": n(self.layers) + n(self.norm), "lm_head": n(self.lm_head)}
    def encode(self, images):  # uint8 (B, S, S, 3) -> visual prefix (B, N, D)
        return self.proj(self.vit(pixels(images).to(self.proj.weight.dtype)))  # float32 unless the model is cast
    def decode(self, x, cache=None, pos=0):
        """Embedded x (B, T, D) at positions pos..pos+T-1 -> final hidden states (B, T, D), normed. The callers take
        lm_head only where a token is predicted: the text positions in training, the last one when generating."""
        T = x.shape[1]
        if pos + T > self.rope_cos.shape[0]:
            raise UserError(f"sequence of {pos + T} positions exceeds the context {self.rope_cos.shape[0]} "
                            f"(visual prefix {self.n_prefix} + max_len {self.cfg.max_len}); raise --max_len")
        rope = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]  # (T, D/H) each
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, None if cache is None else cache[i])
        return self.norm(x)
    def forward(self, images, idx, targets=None):
        """images uint8 (B, S, S, 3), idx (B, L) starting with BOS -> logits (B, L, V) at the text positions, loss: the
        mean over the real tokens (image positions predict nothing; cross_entropy skips pad_batch's -100 targets)."""
        x = torch.cat([self.encode(images), self.embed_tokens(idx)], 1)  # (B, N+L, D): first, so all text can see it
        logits = self.lm_head(self.decode(x)[:, self.n_prefix:])  # (B, L, V)
        return logits, None if targets is None else F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
    def record_attention(self, on):  # on: each Attention keeps its maps (the explicit softmax, slower); off: drops them
        for m in (m for m in self.modules() if isinstance(m, Attention)):
            m.weights = [] if on else None

# Checkpoint I/O: out_dir/model.safetensors + config.json (+ the token table) + train_state.pt -------------------------
def atomic(path, write):
    write(path + ".tmp")
    os.replace(path + ".tmp", path)  # a crash never leaves a half-written file

def save_checkpoint(model, tok, cfg, opt, step, scaler, **run):  # train_state.pt: for --resume (run: batch, seconds)
    os.makedirs(cfg.out_dir, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic(os.path.join(cfg.out_dir, "model.safetensors"), lambda p: save_file(state, p))
    for old in filter(os.path.isfile, (f"{cfg.out_dir}/{n}" for n in ("eval.json", "attention.png", "train_state.pt"))):
        os.remove(old)  # the old weights': their scores, their picture, and a state that would --resume the new ones
    meta = {"script": SCRIPT, "config": dataclasses.asdict(cfg), "vocab": tok.ids}
    atomic(os.path.join(cfg.out_dir, "config.json"), lambda p: json.dump(meta, open(p, "w")))
    ts = dict(optimizer=opt.state_dict(), scaler=scaler.state_dict(), step=step, rng=torch.get_rng_state(), **run)
    atomic(os.path.join(cfg.out_dir, "train_state.pt"), lambda p: torch.save(ts, p))

ARCH = ("img_size", "patch", "vit_dim", "vit_layers", "vit_heads", "vit_mlp", "pool", "d_model", "n_layer", "n_head",
        "mlp_dim", "max_len", "rope_theta", "compact_vocab")  # what the weights were trained with: the checkpoint's
WORLD = ("seed", "n_train", "n_val", "n_test", "n_novel")  # the synthetic world's: --resume and --eval keep the run's
TRAINING = ("batch_size", "grad_accum", "max_steps", "lr", "min_lr", "warmup", "weight_decay", "grad_clip", "compile",
            "log_interval", "eval_interval", "stop_after", "patch_init", "patch_scale", "dropout", "vit_dropout")
DATA = ("data", "test_data", "data_dir", "max_train", "eval_max")  # what --eval reads and --generate does not
BENCH = ARCH + ("batch_size", "grad_clip", "dropout", "vit_dropout", "dtype", "device")  # all that --bench reads

def as_typed(k, v):  # a flag and its value as typed: --lr 0.5, --data '' (quoted as a shell needs), --compile
    return (f"--{k}" if v else f"--no-{k}") if isinstance(v, bool) else f"--{k} {shlex.quote(str(v))}"

def load_checkpoint(out_dir, overrides=None, fixed=ARCH):  # -> (model, tok, cfg): saved `fixed` fields, overrides rest
    cpath, wpath = os.path.join(out_dir, "config.json"), os.path.join(out_dir, "model.safetensors")
    if not (os.path.isfile(cpath) and os.path.isfile(wpath)):
        raise UserError(f"{out_dir}: no checkpoint here (run --train first, or pass --out_dir)")
    if (meta := read_json(cpath) or {}).get("script") != SCRIPT:  # {}: damaged
        raise UserError(f"{cpath}: damaged, or another script's ({meta.get('script')}); pass a {SCRIPT} --out_dir")
    if not isinstance(meta.get("config"), dict) or not isinstance(meta.get("vocab"), list):
        raise UserError(f"{cpath}: no 'config' object or 'vocab' list (checkpoint damaged; retrain or pass --out_dir)")
    saved = {k: v for k, v in meta["config"].items() if k in {f.name for f in dataclasses.fields(Config)}}
    types = [f"{f.name} {v!r}: must be of type {f.type.__name__}" for f in dataclasses.fields(Config)  # bool: no int
             if type(v := saved.get(f.name, f.default)) is not f.type and (f.type, type(v)) != (float, int)]
    if bad := types or config_problems(Config(**saved)):  # then a value no flag could give (each names its flag)
        raise UserError(f"{cpath}: {bad[0]}; the file is damaged or hand-edited: restore it, or retrain with --train")
    typed = overrides or {}  # a typed flag that differs from a saved `fixed` field is refused, named as it was typed
    if clash := [f"{as_typed(k, v)} ({'world ' if k in WORLD else ''}saved as {as_typed(k, saved.get(k))})"
                 for k, v in typed.items() if k in fixed and v != saved.get(k)]:
        raise UserError(f"{out_dir}: this mode keeps the value the run was saved with; drop {clash[0]}")
    cfg = Config(**{**saved, **{k: v for k, v in typed.items() if k not in fixed}, "out_dir": out_dir})
    tok, model = Tokenizer(meta["vocab"]), ViTCaptioner(cfg, len(meta["vocab"]))  # the run's own token table
    try:
        state = load_file(wpath)
    except Exception as e:  # safetensors raises its own error types for truncated files
        raise UserError(f"{wpath}: cannot read weights ({str(e)[:80]}); retrain or pass another --out_dir")
    missing, extra = sorted(set(own := model.state_dict()) - set(state)), sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or extra or shapes:  # strict: every key present, none extra, every shape equal, or one clear line
        raise UserError(f"{wpath}: bad keys (missing {missing[:5]}, unexpected {extra[:5]}, mis-shaped {shapes[:5]})")
    model.load_state_dict(state)
    check_decoding(cfg)  # the decoding flags that will run: the saved ones, typed ones on top
    return model, tok, cfg

# Metrics: exact match, corpus BLEU-4, CIDEr-D (plain Python, tested on hand-computed cases) ---------------------------
def ngrams(words, n):  # -> {n-gram tuple: count} of a word list
    return collections.Counter(tuple(words[i:i + n]) for i in range(len(words) - n + 1))

def exact_match(preds, refs):
    return sum(normalise(p) in {normalise(r) for r in rs} for p, rs in zip(preds, refs)) / max(1, len(preds))

def bleu4(preds, refs):
    """Corpus BLEU-4 (Papineni et al.): clipped n-gram precision over the corpus, brevity penalty against the
    reference closest in length (shorter on ties). Unsmoothed: a matchless order gives 0; an empty one is left out."""
    match, total, ref_len = [0] * 4, [0] * 4, 0
    for p, rs in zip(preds, refs):
        h, rws = normalise(p).split(), [normalise(r).split() for r in rs]
        ref_len += min((abs(len(r) - len(h)), len(r)) for r in rws)[1]
        for n in range(1, 5):
            counts = [ngrams(r, n) for r in rws]  # an n-gram counts at most as often as the reference holding it most
            match[n - 1] += sum(min(c, max(r[g] for r in counts)) for g, c in ngrams(h, n).items())  # clipped matches
            total[n - 1] += max(0, len(h) - n + 1)  # n-grams predicted; total[0]: the words, the length bp compares
    orders = [(m, t) for m, t in zip(match, total) if t]  # orders with an n-gram anywhere in the predictions
    if not orders or min(m for m, _ in orders) == 0:
        return 0.0
    bp = 1.0 if total[0] > ref_len else math.exp(1 - ref_len / max(total[0], 1))  # the brevity penalty
    return bp * math.exp(sum(math.log(m / t) for m, t in orders) / len(orders))  # x the precisions' geometric mean

def cider_d(preds, refs, sigma=6.0):
    """CIDEr-D (Vedantam et al.): TF-IDF n-gram vectors (n=1..4, IDF from the evaluated set's references), cosine with
    clipped hypothesis counts, Gaussian length penalty (sigma=6), averaged over references and n, times 10."""
    ref_words = [[normalise(r).split() for r in rs] for rs in refs]
    df = collections.Counter(g for rws in ref_words  # document frequency: how many images' references hold g
                             for g in {g for r in rws for n in range(1, 5) for g in ngrams(r, n)})
    log_n = math.log(float(len(refs)))
    def vec(words):  # -> TF-IDF vector per n (dicts), their norms, the length
        v = [{g: c * (log_n - math.log(max(1.0, df[g]))) for g, c in ngrams(words, n).items()} for n in range(1, 5)]
        return v, [math.sqrt(sum(x * x for x in d.values())) for d in v], len(words)
    scores = []
    for p, rws in zip(preds, ref_words):
        (hv, hn, hl), total = vec(normalise(p).split()), 0.0
        for rv, rn, rl in map(vec, rws):  # each reference's vectors, norms and length
            for n in range(4):  # cosine times the length penalty; an empty vector (no n-grams of this n) scores 0
                val = sum(min(x, rv[n].get(g, 0.0)) * rv[n].get(g, 0.0) for g, x in hv[n].items())
                total += val / (hn[n] * rn[n] or 1.0) * math.exp(-((hl - rl) ** 2) / (2 * sigma ** 2))
        scores.append(total / 4 / len(rws) * 10.0)
    return sum(scores) / max(1, len(scores))

# Training -------------------------------------------------------------------------------------------------------------
def pick_device(name):  # --device auto: cuda > mps > cpu; any other name must be one of the devices this machine has
    cudas = [f"cuda:{i}" for i in range(torch.cuda.device_count())]  # counting them creates no CUDA context
    have = ["cpu"] + ["mps"] * torch.backends.mps.is_available() + cudas + ["cuda"] * bool(cudas)  # auto: the last
    if name != "auto" and name not in have:
        raise UserError(f"--device {name}: no such device on this machine; pass auto or one of {', '.join(have)}")
    return have[-1] if name == "auto" else name

def autocast(cfg, device):  # matmuls in cfg.dtype under torch.autocast (weights stay float32); float32 = off
    return torch.autocast(device.split(":")[0], dtype=getattr(torch, cfg.dtype), enabled=cfg.dtype != "float32")

def pad_batch(seqs):
    """Token lists [BOS, .., EOS] (none over max_len: check_lengths) -> inputs s[:-1], targets s[1:] (next token),
    (B, L) each; pad targets -100 (no loss). No attention mask: under the causal mask a pad reaches no real token."""
    seqs = [torch.tensor(s, dtype=torch.long) for s in seqs]
    return (nn.utils.rnn.pad_sequence([s[:-1] for s in seqs], batch_first=True),  # pads 0 after the last token
            nn.utils.rnn.pad_sequence([s[1:] for s in seqs], batch_first=True, padding_value=-100))

def check_lengths(tok, data, cfg, splits, grow=False):  # refused: a caption --max_len has no room for, or decoding cuts
    for s, pick in [(s, {"train": max, "val": next}.get(s, min)) for s in splits if s in data]:  # val: its first
        n = max(pick(2 + len(tok.enc.encode_ordinary(c)) for c in cs) for _, cs in data[s][0])  # test/novel: shortest
        what = f"a {s.replace('train', 'training')} caption is {n} tokens long (GPT-2 tokens, BOS and EOS included)"
        if n > cfg.max_len:  # the model has no position for its end: a new run may grow, a trained one cannot
            raise UserError(f"{what}: --max_len {cfg.max_len} must be at least {n}" if grow else f"{what}, more than "
                            f"the model writes ({cfg.max_len}): edit {s != 'train' and cfg.test_data or cfg.data}")
        if n - 1 > cfg.max_new_tokens and s != "val":  # generation would stop before its end (val is never decoded)
            raise UserError(f"{what}: --max_new_tokens {cfg.max_new_tokens} must be at least {n - 1}")

def lr_at(step, cfg):  # linear warmup, then cosine decay to min_lr
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = min(1.0, (step - cfg.warmup) / max(1, cfg.max_steps - cfg.warmup))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * t)) * (cfg.lr - cfg.min_lr)

def global_batch(step, n, size, seed):  # a step's indices: a fresh permutation per epoch, the same on every rank
    n_all = n * -(-size // n)  # n, or n repeated ceil(size / n) times: a set smaller than a batch (--max_train 16)
    epoch, k = divmod(step, n_all // size)  # which epoch, which batch inside it; the last n_all % size go unused
    return (torch.randperm(n_all, generator=torch.Generator().manual_seed(seed + epoch)) % n)[k * size:(k + 1) * size]

def prepare_data(cfg, rank, typed=(), scoring=False):  # -> {split: (entries, uint8 (n, S, S, 3) images)}, decoded once
    if cfg.test_data and not cfg.data:  # the synthetic world has its own test split: never silently ignored
        raise UserError(f"--test_data {cfg.test_data}: only with --data FILE (your training data) as well")
    if cfg.data and (world := [f"--{k}" for k in ("data_dir", *WORLD[1:]) if k in typed]):  # typed flags unused
        raise UserError(f"{world[0]}: the synthetic world's, unused with --data {cfg.data}; drop it")
    keep = ("train", "val", "test", "novel") if not scoring else ("test", "novel", "train")[:3 if cfg.max_train else 2]
    if cfg.data:  # --eval (scoring) reads and decodes what it scores: held-out images (or --test_data), --max_train's
        why = f"; --eval scores images from it, or pass --test_data FILE{' --max_train 0' if cfg.max_train else ''}"
        entries = [] if "train" not in keep and cfg.test_data else read_captions(cfg.data, why if scoring else "")
        draw = [random.Random(os.path.relpath(im, os.path.realpath(cfg.data))).random() for im, _ in entries]  # by path
        cut = max(0.1, min(draw, default=0))  # held out: up to 0.1, or the lowest; new entries can only lower the cut
        test = read_captions(cfg.test_data) if cfg.test_data else [e for e, d in zip(entries, draw) if d <= cut]
        entries = entries if cfg.test_data else [e for e, d in zip(entries, draw) if d > cut]
        if not entries and "train" in keep:  # all held out (a lone image, say); --eval would score them all the same
            raise UserError(f"{cfg.data}: too few images to hold out a test set; add images or pass --test_data")
        splits = {"train": entries, "val": test[: max(1, len(test) // 2)], "test": test}  # val: for the loss log
    else:
        if rank == 0:
            build_world(cfg)
        if dist.is_initialized():
            dist.barrier()  # the other ranks wait until rank 0 has written the world
        splits = {s: read_captions(os.path.join(cfg.data_dir, f"{s}.txt")) for s in keep}
    splits = {s: e[: cfg.max_train or None] if s == "train" else e for s, e in splits.items() if s in keep}  # 0: all
    return {s: (e, torch.from_numpy(np.stack([load_image(p, cfg.img_size) for p, _ in e]))) for s, e in splits.items()}

def setup_distributed(cfg):  # -> (rank, world, device): torchrun's WORLD_SIZE > 1: nccl on CUDA, gloo on CPU
    device = pick_device(cfg.device)
    if cfg.compile and device == "cpu":  # inductor's CPU kernels are C++: a missing compiler is refused before step 1
        try:
            torch._inductor.cpp_builder.get_cpp_compiler()
        except torch._inductor.exc.InvalidCxxCompiler as e:
            raise UserError(f"--compile: {e}; install g++ or clang++ (or set CXX), or pass --no-compile") from None
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, device
    if device != "cpu" and (gpus := torch.cuda.device_count()) < int(os.environ.get("LOCAL_WORLD_SIZE", "1")):  # mps: 0
        raise UserError(f"torchrun: one CUDA GPU per process, {gpus} here: start fewer or pass --device cpu")
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    if device.startswith("cuda"):
        torch.cuda.set_device(device := f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
    return dist.get_rank(), dist.get_world_size(), device

def init_training(cfg, entries, images, resumed, device):  # -> model, tok, opt, scaler, (step, seconds): fresh/resumed
    if resumed:
        model, tok, state = resumed
        if lost := next(((t, c) for _, cs in entries for c in cs for t in tok.enc.encode_ordinary(c)
                         if t not in tok.to_model), None):  # encode() would drop it: the caption would train as another
            raise UserError(f"{cfg.data or cfg.data_dir}: '{tok.enc.decode(lost[:1]).strip()}' (in '{lost[1]}'): the "
                            f"checkpoint in {cfg.out_dir} has no token for it; train afresh with another --out_dir")
    else:
        tok = Tokenizer.from_captions([c for _, cs in entries for c in cs], cfg.compact_vocab)
        model = ViTCaptioner(cfg, len(tok.ids))
        if cfg.patch_init == "pca":  # every rank draws the same images, so every rank starts from the same weights
            model.init_from_data(images[torch.randperm(len(images))[:2000]])
    model.to(device)
    tables = {id(model.vit.pos_embed), id(model.vit.cls_token)}  # added vectors: no decay (embed_tokens is decayed)
    decay = [p for p in model.parameters() if p.dim() >= 2 and id(p) not in tables]  # matrices and the conv kernel
    rest = [p for p in model.parameters() if not (p.dim() >= 2 and id(p) not in tables)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=cfg.dtype == "float16")  # float16: loss scaling
    if resumed:
        opt.load_state_dict(state["optimizer"])  # checks the group sizes, not the shapes: another run's moments are
        if any(s["exp_avg"].shape != p.shape for p, s in opt.state.items()):  # refused here (in train's dry run)
            raise ValueError("AdamW moments of other shapes")  # train() names the file
        torch.set_rng_state(state["rng"])  # CPU dropout continues as if never stopped (the CUDA RNG is not saved)
        if state.get("scaler"):  # float16: the loss scale goes on where it stopped (other dtypes save none)
            scaler.load_state_dict(state["scaler"])
    return model, tok, opt, scaler, (state["step"], state.get("seconds", 0.0)) if resumed else (0, 0.0)

def train_step(model, opt, scaler, batch, cfg, device, rank, world):
    """One optimizer step over grad_accum micro-batches of this rank's rows -> the global batch's mean loss. Summed
    over tokens / the global token count, any split of the batch gives the same gradient (DDP averages: * world)."""
    images, inp, tgt = batch  # the global batch: (G, S, S, 3), (G, L), (G, L)
    n_tok, total = (tgt != -100).sum().item(), torch.zeros((), device=device)  # total: this rank's share of the loss
    model.train()
    for micro in range(cfg.grad_accum):  # DDP: no_sync() defers the all-reduce to the last micro-batch's backward
        rows = slice((micro * world + rank) * cfg.batch_size, (micro * world + rank + 1) * cfg.batch_size)
        sync = model.no_sync() if world > 1 and micro < cfg.grad_accum - 1 else contextlib.nullcontext()
        with sync, autocast(cfg, device):
            logits, _ = model(images[rows].to(device), inp[rows].to(device))
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tgt[rows].flatten().to(device), ignore_index=-100,
                                   reduction="sum") / n_tok * world
        scaler.scale(loss).backward()
        total += loss.detach() / world
    if world > 1:  # each rank summed its own rows only: the global batch's loss is the sum over ranks
        dist.all_reduce(total)
    if not torch.isfinite(total):
        raise UserError(f"loss became {total.item()}: stopped; {cfg.out_dir} keeps its last save (try a lower --lr)")
    scaler.unscale_(opt)
    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return total.item()

def train(cfg, resume=False, typed=None):  # train (every rank), evaluate and save (rank 0) -> model, tok
    resumed = None  # most refusals come before any data is read
    if resume:  # out_dir's run, the typed flags on top (typed None: all of cfg); the saved stop is behind us
        if not os.path.isfile(path := os.path.join(cfg.out_dir, "train_state.pt")):
            raise UserError(f"{cfg.out_dir}: nothing to resume (no train_state.pt); drop --resume to start afresh")
        model, tok, cfg = load_checkpoint(cfg.out_dir, dataclasses.asdict(cfg) if typed is None else {
            "stop_after": 0, **typed}, ARCH + WORLD + ("patch_init", "patch_scale"))  # (the init ran at the start)
        try:  # a dry run of the resume (CPU, before any data; it sets the RNG, seeded again below): it must all load
            resumed = model, tok, {**torch.load(path, map_location="cpu", weights_only=True)}  # a GPU's state too
            init_training(cfg, [], None, resumed, "cpu")  # (the optimizer moves the moments to the parameters)
        except Exception as e:  # zip, pickle or torch errors; TypeError: no dict ({**}); KeyError, ValueError: no fit
            raise UserError(f"{path}: damaged or another run's ({type(e).__name__}); train again without --resume")
        if (s := resumed[2]["step"]) >= cfg.max_steps or 0 < cfg.stop_after <= s:  # no step left to train
            raise UserError(f"{cfg.out_dir}: saved at step {s}: pass a " + ("--max_steps above it, or --eval to score "
                            "it" if s >= cfg.max_steps else "--stop_after above it, or drop it"))
    cfg = dataclasses.replace(cfg, data_dir=os.path.abspath(cfg.data_dir))  # saved so: found from any folder
    check_decoding(cfg)
    rank, world, device = setup_distributed(cfg)
    gsize = cfg.batch_size * cfg.grad_accum * world  # G images a step; a new G reorders the data: --resume refuses it
    if resumed and (g := resumed[2].get("batch") or gsize) != gsize:  # (a state saved without one is not checked)
        raise UserError(f"{cfg.out_dir}: trained at global batch {g} (batch_size*grad_accum*processes), not {gsize}")
    say, t0 = print if rank == 0 else (lambda *a, **k: None), time.time()  # rank 0 alone prints
    say("config:", json.dumps(dataclasses.asdict(cfg)))
    torch.manual_seed(cfg.seed)
    data = prepare_data(cfg, rank, typed or ())
    say("data: " + ", ".join(f"{s} {len(e)}" for s, (e, _) in data.items()) + f" images ({time.time() - t0:.1f}s)")
    model, tok, opt, scaler, (step, seconds0) = init_training(cfg, *data["train"], resumed, device)
    say(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, all trained; vocab {len(tok.ids)}; "
        + ", ".join(f"{k} {v / 1e6:.3f}M" for k, v in model.part_counts().items())
        + (f"; resumed from step {step}" if resume else ""))
    raw = model  # what is saved and evaluated: never the DDP wrapper or the compiled module
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    fwd = torch.compile(model) if cfg.compile else model
    (entries, images), caption_rng = data["train"], random.Random()
    check_lengths(tok, data, cfg, ("train", "val", "test", "novel"), grow=not resume)
    tokens = [[tok.encode(c) for c in cs] for _, cs in entries]  # every reference of every image, encoded once
    val_batch = pad_batch([tok.encode(cs[0]) for _, cs in data["val"][0]])  # (inputs, targets)
    t_log, log_step, stop = time.time(), step, False
    while step < cfg.max_steps and not stop:
        idx = global_batch(step, len(entries), gsize, cfg.seed)
        caption_rng.seed(cfg.seed * 100003 + step)  # which reference each image shows: a function of (seed, step)
        inp, tgt = pad_batch([caption_rng.choice(tokens[i]) for i in idx.tolist()])
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        loss = train_step(fwd, opt, scaler, (images[idx], inp, tgt), cfg, device, rank, world)
        step, val = step + 1, None  # val: shown only on the steps where it is measured
        dt = (time.time() - t_log) / (step - log_step)  # seconds a step since the last log line, before val and save
        stop = cfg.stop_after and cfg.stop_after <= step < cfg.max_steps  # as if interrupted: saved, --resume goes on
        if rank == 0 and (step % cfg.eval_interval == 0 or step == cfg.max_steps):
            with torch.no_grad(), autocast(cfg, device):  # mean token loss on the first reference of each image
                val = raw.eval()(data["val"][1].to(device), *(t.to(device) for t in val_batch))[1].item()
            if not math.isfinite(val):  # the weights diverged within the last steps: they are not saved
                raise UserError(f"validation loss {val}: stopped; {cfg.out_dir} keeps its last save (try a lower --lr)")
        if rank == 0 and (val is not None or stop):  # the weights, and train_state.pt with the time trained so far
            save_checkpoint(raw, tok, cfg, opt, step, scaler, batch=gsize, seconds=seconds0 + time.time() - t0)
        if rank == 0 and (step % cfg.log_interval == 0 or val is not None):  # val: every eval step, the last too
            m, s = divmod(round(dt * (cfg.max_steps - step)), 60)  # time left; lr below: the step just taken
            say(f"step {step}/{cfg.max_steps} | loss {loss:.3f} | val {'-' if val is None else f'{val:.3f}'} | "
                f"lr {lr_at(step - 1, cfg):.1e} | {dt * 1000:.0f} ms | {gsize / dt:.3g} samples/s | eta {m}m{s:02d}s")
            t_log, log_step = time.time(), step
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if rank == 0 and step >= cfg.max_steps:  # the whole run's time, with the part saved before --resume (eval.json's)
        before = f"; {seconds0:.0f}s of it before --resume" if seconds0 else ""  # seconds0 is 0 on a fresh run
        say(f"trained {step} steps in {seconds0 + time.time() - t0:.0f}s (data included{before})")
        evaluate(raw, tok, cfg, device, data, seconds0 + time.time() - t0)
    elif stop:
        say(f"stopped after step {step} as asked; go on with --train --resume --out_dir {shlex.quote(cfg.out_dir)}")
    return raw, tok

# Generation and evaluation --------------------------------------------------------------------------------------------
def filter_logits(logits, top_k, top_p):  # keep the top_k largest and the smallest set of mass top_p; the rest -> -inf
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), -1).values[..., -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = logits.softmax(-1).sort(-1, descending=True)
        drop = probs.cumsum(-1) - probs >= top_p  # tokens after the nucleus is already full
        drop[..., 0] = False  # the likeliest token always stays, even at top_p 0
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))  # drop: sorted -> vocabulary order
    return logits

def prefill_input(model, images):  # [visual prefix, BOS (id 0)] embedded: (B, N+1, D); rows share one length
    return torch.cat([model.encode(images), model.embed_tokens(images.new_zeros(len(images), 1, dtype=torch.long))], 1)

def next_logits(model, x, cache=None, pos=0):  # x (B, T, D) at positions pos.. -> float logits (B, V) of the next token
    return model.lm_head(model.decode(x, cache, pos)[:, -1]).float()

@torch.no_grad()
def generate(model, images, cfg, use_cache=True, generator=None, stop_at_eos=True):
    """Batched captioning from BOS until every row wrote EOS (or max_new_tokens) -> id lists: greedy at temperature 0,
    else sampled (top-k, top-p) from `generator`; beam > 1: beam search. No cache: each step decodes all (--bench)."""
    model.eval()
    if cfg.beam > 1:
        return beam_search(model, images, cfg)
    B, eos, N, steps = images.shape[0], 0, model.n_prefix, min(cfg.max_new_tokens, cfg.max_len - 1)  # BOS: 1 of max_len
    x, cache = prefill_input(model, images), ([{} for _ in model.layers] if use_cache else None)  # x: (B, N+1, D)
    logits = next_logits(model, x, cache)  # prefill, the image encoded once: (B, V)
    seq = torch.zeros(B, 0, dtype=torch.long, device=images.device)  # the caption so far, (B, t)
    done = torch.zeros(B, dtype=torch.bool, device=images.device)  # rows that have written EOS
    for t in range(steps):
        if cfg.temperature == 0:
            nxt = logits.argmax(-1)  # (B,)
        else:  # shifted to max 0 (a tiny temperature cannot overflow), scaled, then top-k / top-p filtered
            logits = filter_logits((logits - logits.amax(-1, keepdim=True)) / cfg.temperature, cfg.top_k, cfg.top_p)
            nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]
        nxt = nxt.masked_fill(done, eos)  # a finished row only pads with EOS
        seq = torch.cat([seq, nxt[:, None]], 1)  # (B, t+1)
        done |= nxt == eos
        if (stop_at_eos and done.all()) or t == steps - 1:
            break
        new = model.embed_tokens(nxt[:, None]) if use_cache else torch.cat([x, model.embed_tokens(seq)], 1)
        logits = next_logits(model, new, cache, pos=N + 1 + t if use_cache else 0)  # cached: one new position, N+1+t
    return [[i for i in row if i != eos] for row in seq.tolist()]

def beam_search(model, images, cfg, length_penalty=1.0):  # generate's beam > 1: under its no_grad and eval()
    """Beam search, KV cache, B*K rows; finished: log-prob / len**length_penalty: raw sums favour short captions."""
    B, K, V, N, eos = images.shape[0], cfg.beam, model.lm_head.out_features, model.n_prefix, 0
    x, cache = prefill_input(model, images).repeat_interleave(K, 0), [{} for _ in model.layers]  # x: (B*K, N+1, D)
    logp = next_logits(model, x, cache).log_softmax(-1)  # (B*K, V)
    seq = torch.zeros(B * K, 0, dtype=torch.long, device=images.device)
    score = torch.tensor([0.0] + [float("-inf")] * (K - 1), device=images.device).repeat(B, 1)  # K equal rows: 1 live
    finished, steps = [[] for _ in range(B)], min(cfg.max_new_tokens, cfg.max_len - 1)  # per image: (score, ids)
    for t in range(steps):
        top, flat = (score.view(B * K, 1) + logp).view(B, K * V).topk(2 * K, -1)  # (B, 2K): <= K end in EOS, K live
        live = []  # (score, row it continues, token): K per image
        for b in range(B):
            keep = []
            for s, f in zip(top[b].tolist(), flat[b].tolist()):
                beam, token = divmod(f, V)  # the flat index over (K, V) -> which beam, which next token
                if s == float("-inf") or len(keep) == K:
                    break
                if token == eos:  # a finished hypothesis, scored by its length-normalised log-probability
                    finished[b].append((s / (t + 1) ** length_penalty, seq[b * K + beam].tolist()))
                else:
                    keep.append((s, b * K + beam, token))
            live += keep + [(float("-inf"), b * K, eos)] * (K - len(keep))  # dead fillers keep the shape (B*K)
        score, rows, token = (torch.tensor(c, device=images.device) for c in zip(*live))  # (B*K,) each
        for layer in cache:  # re-order the cache to follow the surviving beams
            layer["k"], layer["v"] = layer["k"][rows], layer["v"][rows]
        seq, score = torch.cat([seq[rows], token[:, None]], 1), score.view(B, K)  # (B*K, t+1), (B, K)
        best_live = score.max(-1).values / (t + 2) ** length_penalty  # a stopping heuristic, not a bound
        if t == steps - 1 or all(finished[b] and max(f[0] for f in finished[b]) >= best_live[b] for b in range(B)):
            break
        logp = next_logits(model, model.embed_tokens(token[:, None]), cache, pos=N + 1 + t).log_softmax(-1)
    return [max(f)[1] if f else seq[b * K + score[b].argmax().item()].tolist()  # none ended: the best live beam
            for b, f in enumerate(finished)]  # each image's best-scoring finished hypothesis

def attention_png(model, image, tok, cfg, device, path, show=None, ids=None):
    """Where the model looked while it wrote `ids`, its caption of `image` (None: the greedy one) -> the caption. Left:
    the image, patches numbered. Right: a row per caption token, a column per patch: the decoder's last-layer attention
    from the position that wrote the token. Pool "cls"/"mean": the decoder sees one vector, so rows show the ViT's."""
    def put(img, text, x, y, scale=0.4):  # white text
        cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, (255, 255, 255), 1, cv2.LINE_AA)
    with torch.no_grad(), autocast(cfg, device):  # the caption fed back in one call (teacher forcing), maps recorded
        if ids is None:
            ids = generate(model, image[None].to(device), dataclasses.replace(cfg, beam=1, temperature=0.0))[0]
        model.record_attention(True)
        model(image[None].to(device), torch.tensor([[tok.eos] + ids], device=device))  # BOS, the caption: (1, 1+T)
    calls, vit = model.layers[-1].self_attn.weights, model.vit.layers[-1].self_attn.weights if model.vit.layers else []
    model.record_attention(False)
    g, N = cfg.img_size // cfg.patch, model.n_prefix
    if N > 1:  # the call's maps: (1, N+1+T, N+1+T); position N+j (BOS at N) wrote token j
        rows, what = [calls[0][0, N + j, :N].float() for j in range(len(ids))], "decoder, last layer"
    else:
        w = vit[0][0].float() if vit else torch.ones(1 + g * g, 1 + g * g)  # (1+P, 1+P) with a CLS token, else (P, P)
        rows = [w[0, -g * g:] if cfg.pool == "cls" else w.mean(0)[-g * g:]] * len(ids)
        what = f"ViT last layer, {'CLS token' if cfg.pool == 'cls' else 'mean query'} (decoder sees one vector)"
    big, cell, label = 192, max(12, min(24, 480 // (g * g))), 96  # image side, matrix cell, token label width
    labels = [tok.decode([t])[:12] for t in ids] or ["(empty)"]
    heat = torch.stack(rows) if rows else torch.zeros(1, g * g)  # (tokens, P)
    heat = (255 * heat / heat.amax(1, keepdim=True).clamp_min(1e-9)).to(torch.uint8).cpu().numpy()
    heat = cv2.resize(cv2.applyColorMap(heat, cv2.COLORMAP_VIRIDIS), (cell * g * g, cell * len(labels)),
                      interpolation=cv2.INTER_NEAREST)  # (tokens * cell, P * cell, 3)
    mat = np.pad(heat, ((16, 0), (label, 0), (0, 0)))  # black margins: a header row (patch numbers), token labels
    pic = cv2.resize((show if show is not None else image.numpy())[:, :, ::-1], (big, big), interpolation=0)  # BGR
    for i in range(g * g):  # patch i: its cell on the image (grid numbered row by row) and its column's header
        r, c = divmod(i, g)
        cv2.rectangle(pic, (c * big // g, r * big // g), ((c + 1) * big // g, (r + 1) * big // g), (200, 200, 200), 1)
        put(pic, str(i), c * big // g + 2, r * big // g + 12, 0.35)
        put(mat, str(i), label + i * cell + 1, 12, 0.3)
    for j, text in enumerate(labels):  # row labels: the tokens
        put(mat, text, 2, 16 + j * cell + cell // 2 + 4)
    body = np.zeros((max(big, mat.shape[0]), max(560, big + 8 + mat.shape[1]), 3), np.uint8)
    body[:big, :big], body[:mat.shape[0], big + 8:big + 8 + mat.shape[1]] = pic, mat
    title, caption = np.zeros((58, body.shape[1], 3), np.uint8), tok.decode(ids)
    put(title, caption[:90], 4, 16, 0.45)
    put(title, f"rows: caption tokens; columns: patches 0-{g * g - 1}, numbered on the image", 4, 34, 0.35)
    put(title, f"{what}, mean over heads; each row scaled to its maximum", 4, 50, 0.35)
    if not cv2.imwrite(os.fsencode(path), np.concatenate([title, body], 0)):  # False (no exception) if not written
        raise UserError(f"{path}: could not be written (a folder of that name, or no permission)")
    return caption

def evaluate(model, tok, cfg, device, data, train_seconds=None):  # score test, novel (train: --max_train); eval.json
    saved = (read_json(os.path.join(cfg.out_dir, "eval.json")) or {}).get("train_seconds")  # --eval keeps the run's
    result = {"train_seconds": saved if train_seconds is None else train_seconds, "config": dataclasses.asdict(cfg)}
    print(f"{'split':8s} {'n':>5s} {'exact':>7s} {'BLEU-4':>7s} {'CIDEr-D':>8s}")
    generator = torch.Generator(device).manual_seed(cfg.seed)  # sampling (--temperature > 0) repeats: the run's seed
    for split in [s for s in ("test", "novel") + (("train",) if cfg.max_train > 0 else ()) if s in data]:
        entries, images = (x[:cfg.eval_max] if cfg.eval_max > 0 else x for x in data[split])
        with autocast(cfg, device):  # batches of 256 images: memory stays flat whatever the split's size
            preds = [tok.decode(ids) for i in range(0, len(images), 256)
                     for ids in generate(model, images[i:i + 256].to(device), cfg, generator=generator)]
        refs = [cs for _, cs in entries]
        shown = [dict(image=os.path.relpath(p), prediction=x, references=rs) for (p, rs), x in zip(entries[:8], preds)]
        r = result[split] = dict(n=len(preds), exact_match=exact_match(preds, refs), bleu4=bleu4(preds, refs),
                                 cider=cider_d(preds, refs), samples=shown)
        print(f"{split:8s} {r['n']:5d} {r['exact_match']:7.3f} {r['bleu4']:7.3f} {r['cider']:8.3f}")
    print("\n".join(f"  pred: {s['prediction']!r}\n  refs: {s['references']}" for s in result["test"]["samples"][:4]))
    atomic(os.path.join(cfg.out_dir, "eval.json"), lambda p: json.dump(result, open(p, "w"), indent=1))
    attention_png(model, data["test"][1][0], tok, cfg, device, os.path.join(cfg.out_dir, "attention.png"))
    print(f"wrote {cfg.out_dir}/eval.json and {cfg.out_dir}/attention.png")
    return result

def bench(cfg):  # training samples/s, captions/s (KV cache on, off) in cfg.dtype: random images, the world's tokens
    device, B = pick_device(cfg.device), cfg.batch_size
    torch.manual_seed(0)
    objs = [(c, s, z) for c in COLOURS for s in SHAPES for z in SIZES]  # every word the world's captions use
    caps = [captions_for([o], None)[0] for o in objs] + [captions_for(objs[:2], r)[0] for r in RELATIONS]
    model = ViTCaptioner(cfg, vocab := len(Tokenizer.from_captions(caps, cfg.compact_vocab).ids)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.split(":")[0], enabled=cfg.dtype == "float16")  # float16: loss scaling
    img = torch.randint(0, 255, (B, cfg.img_size, cfg.img_size, 3), dtype=torch.uint8, device=device)
    inp = torch.randint(0, vocab, (B, min(16, cfg.max_len)), device=device)  # the longest caption has 13 (BOS + 12)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M, vocab {vocab}")
    times, one = [], dataclasses.replace(cfg, grad_accum=1)  # the whole batch in one micro-batch
    for i in range(8):  # the training step itself: 2 warm-up steps, then the median of 6
        t = time.time()
        train_step(model, opt, scaler, (img, inp, inp), one, device, 0, 1)
        times.append(time.time() - t)
    print(f"train  ({cfg.dtype}): {B / np.median(times[2:]):8.1f} samples/s  (batch {B}, median of 6 steps)")
    fixed = dataclasses.replace(cfg, beam=1, temperature=0.0, max_new_tokens=16)
    for use_cache in (True, False):
        t = time.time()
        with autocast(cfg, device):
            for _ in range(3):
                generate(model, img, fixed, use_cache, stop_at_eos=False)  # 16 tokens (fewer if max_len is shorter)
        print(f"caption (cache {'on ' if use_cache else 'off'}): {3 * B / (time.time() - t):8.1f} captions/s "
              f"(batch {B}, {min(16, cfg.max_len - 1)} tokens each, {cfg.dtype})")

# Command line ---------------------------------------------------------------------------------------------------------
CHOICES = dict(pool=("cls", "mean", "patches"), dtype=("float32", "bfloat16", "float16"), patch_init=("pca", "random"))
ZERO_OK = ("max_train", "eval_max", "vit_layers", "warmup", "stop_after", "top_k")  # counts where 0 means none / off
RATES = ("lr", "grad_clip", "rope_theta", "patch_scale")  # above 0; every other number is at least 0

def check_decoding(cfg):  # a decoding flag (typed, or saved with a checkpoint) the search would ignore: refused
    if (cfg.temperature > 0 or cfg.top_k > 0 or cfg.top_p < 1) and (cfg.beam > 1 or cfg.temperature == 0):
        raise UserError(f"sampling is --temperature above 0 with --beam 1, --top_k / --top_p filter it; got --beam "
                        f"{cfg.beam}, --temperature {cfg.temperature}, --top_k {cfg.top_k}, --top_p {cfg.top_p}")

def config_problems(cfg, fresh=True):  # what every value must satisfy, typed or in a saved config.json (fresh: sizes)
    bad = [f"--{n} {v}: choose one of {', '.join(c)}" for n, c in CHOICES.items() if (v := getattr(cfg, n)) not in c]
    nums = {n: type(getattr(Config, n))(v) for n, v in vars(cfg).items() if type(v) in (int, float) and n != "seed"}
    bad += [f"--{n} {v}: must be at least 1" for n, v in nums.items() if type(v) is int and n not in ZERO_OK and v < 1]
    bad += [f"--{n} {v}: must be a number > 0" for n, v in nums.items() if n in RATES and not 0 < v < math.inf]
    bad += [f"--{n} {v}: must be a number >= 0" for n, v in nums.items() if not 0 <= v < math.inf]
    return bad or [why for wrong, why in (  # each range: what a good value meets (a NaN fails every comparison)
        (not (0 <= cfg.dropout < 1 and 0 <= cfg.vit_dropout < 1), "--dropout and --vit_dropout: in [0, 1)"),
        (not 0 < cfg.top_p <= 1, f"--top_p {cfg.top_p}: must be in (0, 1] (1 = off)"),
        (not -2**63 <= cfg.seed < 2**63, f"--seed {cfg.seed}: must fit in 64 bits (-2**63 to 2**63 - 1)"),
        (fresh and (cfg.img_size % cfg.patch or cfg.img_size == cfg.patch), f"--img_size {cfg.img_size}: must be a "
         f"multiple of --patch {cfg.patch}, at least twice it (the sin-cos positions need a grid of patches)"),
        (fresh and (cfg.d_model % cfg.n_head or (cfg.d_model // cfg.n_head) % 2 or cfg.vit_dim % cfg.vit_heads),
         f"--d_model {cfg.d_model} / --n_head {cfg.n_head}: need even head sizes, --vit_dim a multiple of --vit_heads"),
        (cfg.max_len < 2, f"--max_len {cfg.max_len}: at least 2 (BOS and one token)")) if wrong]  # sizes are > 0 here

def parse_args(argv=None):  # -> (args, cfg, overrides): the preset, then the flags typed; leaves nothing behind
    p = argparse.ArgumentParser(description="vit_caption: train, evaluate, caption images.", allow_abbrev=False)
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # argparse's refusals in one line too, no usage
    for mode, what in (("train", "build data (if needed), train, evaluate"), ("resume", "with --train: continue from "
                       "out_dir/train_state.pt"), ("eval", "score out_dir's model: test, novel (train: --max_train)"),
                       ("generate", "caption --image with out_dir's model"), ("bench", "training and caption speed")):
        p.add_argument(f"--{mode}", action="store_true", help=what)
    p.add_argument("--image", default="", help="image file, for --generate")
    p.add_argument("--preset", choices=sorted(PRESETS), help="the sizes to start from (default: default)")
    notes = dict(re.findall(r"^    (\w+): (.*)$", inspect.getsource(Config), re.M)) if argv is None else {}  # --help
    for f in dataclasses.fields(Config):  # every Config field is a flag; bools as --flag / --no-flag
        kw = dict(action=argparse.BooleanOptionalAction) if isinstance(f.default, bool) else dict(type=type(f.default))
        p.add_argument(f"--{f.name}", default=None, help=notes.get(f.name), **kw)  # None: the preset's value
    args = p.parse_args(argv)
    overrides = {f.name: getattr(args, f.name) for f in dataclasses.fields(Config) if getattr(args, f.name) is not None}
    overrides.update({k: os.path.abspath(overrides[k]) for k in ("data", "test_data") if overrides.get(k)})  # as saved
    cfg = Config(**{**PRESETS[args.preset or "default"], **overrides})
    fresh = not (args.resume or args.eval and not args.train or args.generate)  # else the checkpoint's sizes run
    unread = [as_typed(k, v) for k, v in overrides.items() if args.bench and k not in BENCH]  # typed, yet unread
    if bad := config_problems(cfg, fresh) or [why for wrong, why in (  # the first bad flag, in one line
        ("" in overrides.values(), "a flag given '' must name a file or folder, not an empty string"),
        (fresh and "patch_scale" in overrides and cfg.patch_init == "random", "--patch_scale: with --patch_init pca"),
        ([args.train or args.eval, args.generate, args.bench].count(True) > 1 or args.resume and not args.train,
         "one mode per call (--train evaluates); --resume continues a training run: use it with --train"),
        (args.preset and (args.resume or args.eval and not args.train or args.generate),  # --train --eval: --train's
         f"--preset {args.preset}: --resume, --eval and --generate take the sizes from the checkpoint; drop --preset"),
        (unread, f"{', '.join(unread)}: not read by --bench (it times a new model of these sizes, greedy); drop it"),
        (bool(args.image) != args.generate, "--generate and --image PATH (what to caption) go together")) if wrong]:
        raise UserError(bad[0])
    if args.train or (args.eval or args.generate) and os.path.isdir(cfg.out_dir):  # each writes into out_dir; a new
        saved = read_json(os.path.join(cfg.out_dir, "config.json")) or {}  # run only into a new, empty or own folder
        check_folder(cfg.out_dir, "--out_dir", args.resume or not args.train or saved.get("script") == SCRIPT,
                     "a file, or a folder this script did not write; give a new or empty one")
    return args, cfg, overrides

def main(argv=None):  # --train / --bench / --eval / --generate; a UserError or OSError: one line, exit status 2
    try:
        args, cfg, overrides = parse_args(argv)
        if args.train:  # train prints the config it runs: on --resume the checkpoint's, with the typed flags on top
            return train(cfg, args.resume, overrides)
        if args.eval or args.generate:  # `fixed` flags are the run's (--generate: a typed --seed seeds sampling)
            fixed = ARCH + TRAINING + (WORLD if args.eval else WORLD[1:] + DATA)
            model, tok, cfg = load_checkpoint(cfg.out_dir, overrides, fixed)
            if args.eval and "data" in overrides and "test_data" not in overrides and cfg.test_data:  # else unread
                raise UserError(f"--data: --eval scores the run's --test_data {cfg.test_data}; give --test_data FILE")
        print("config:", json.dumps(dataclasses.asdict(cfg)))  # the config that runs: the saved one, typed flags on top
        if args.bench:
            return bench(cfg)
        if not (args.eval or args.generate):
            return print("nothing to do: pass --train, --eval, --generate --image PATH, or --bench (see --help)")
        model.to(device := pick_device(cfg.device))
        if args.eval:
            check_lengths(tok, data := prepare_data(cfg, 0, overrides, scoring=True), cfg, ("test", "novel"))
            return evaluate(model, tok, cfg, device, data)
        image = torch.from_numpy(load_image(args.image, cfg.img_size))  # (S, S, 3) uint8, letterboxed
        with autocast(cfg, device):  # sampling (--temperature > 0) is reproducible from --seed
            ids = generate(model, image[None].to(device), cfg, generator=torch.Generator(device).manual_seed(cfg.seed))
        print(tok.decode(ids[0]))
        path = os.path.join(cfg.out_dir, f"caption_{os.path.splitext(os.path.basename(args.image))[0][:60]}.png")
        attention_png(model, image, tok, cfg, device, path, show=load_image(args.image, 192), ids=ids[0])
        print(f"wrote {path} (attention over the patches, a row per caption token)")
    except (UserError, OSError, KeyboardInterrupt) as e:  # Ctrl-C too: one line, exit status 130
        print(f"error: {str(e) or 'interrupted; --train --resume goes on from the last (whole) save'}", file=sys.stderr)
        sys.exit(130 if isinstance(e, KeyboardInterrupt) else 2)

if __name__ == "__main__":
    if hasattr(sys.stdout, "reconfigure"):  # IDLE's stream has none; pythonw's stdout is None
        sys.stdout.reconfigure(errors="backslashreplace")  # a character the code page lacks (Windows): \U0001f600
    main()
