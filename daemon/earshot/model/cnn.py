"""Model stage: the streaming sound-event CNN and its streaming/offline scorers.

Architecture (`CnnDims` defaults; 234 k multiply-adds per 10 ms frame, see `macs_per_frame`):

    features (B, T, 64) -> per-mel-bin BatchNorm
    5 x [Conv2d 3x3 over (freq, time): freq stride 2, freq padding 1 ("same"),
         time unpadded ("valid") with dilations 1, 2, 4, 8, 16 -> BatchNorm -> ReLU]
         channels 16, 24, 32, 48, 64; freq 64 -> 32 -> 16 -> 8 -> 4 -> 2
    flatten (channels x freq = 128) -> 1x1 projection to a 64-d per-frame embedding
    per-frame heads: frame_logits Linear(64 -> C), frame_attention Linear(64 -> C)
    window pooling: per class, softmax(attention) over the L = T - R + 1 frame positions
                    whose receptive field lies inside the window, logit = sum(w * frame_logit)

Why this shape:

- Valid (unpadded) convolutions in time make every embedding a function of exactly R = 63
  consecutive frames (0.63 s), independent of where the window starts. So the live path
  computes each frame through each layer exactly once (`StreamingScorer` caches the last
  (k-1)*dilation inputs of each layer) and a 1 s window slid by 0.1 s costs 10 new frames,
  not 100. Dilations 1-2-4-8-16 reach 0.63 s of context with five cheap layers: a whole
  gunshot or glass break with its tail, a stretch of a siren's sweep, a T3 beep with its gap;
  the 1 s window adds the rest through pooling.
- Frequency stride 2 per layer keeps cost low (most MACs are in the narrow upper layers)
  while "same" padding over frequency needs no state.
- Attention pooling gives a weakly-labelled clip (one label per window) a way to focus on
  the few frames that contain the event, and is the only per-window work: O(L * C).
- BatchNorm is affine at inference, so the streaming scorer folds it into the
  convolutions; dropout (on the embedding) acts only in training.

At about 100 frames/s the network costs ~23 M MAC/s per stream, a fraction of a percent of
one core once per-call overhead is amortised over a 10-frame hop (see tools/bench.py).

Inside the package this module imports `spec` and `scoring` only; the checkpoint format
(`earshot.model.checkpoint`) builds these networks, and the ONNX export
(`earshot.model.onnx`) reuses `FoldedNet`'s folding.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from earshot.model.scoring import StepScorer, check_window
from earshot.model.spec import CnnDims, check_features, no_windows


class SoundEventCnn(nn.Module):
    """The streaming-friendly CNN: valid convs in time, per-frame heads, attention pooling."""

    def __init__(self, dims: CnnDims) -> None:
        super().__init__()
        self.dims = dims
        self.input_norm = nn.BatchNorm1d(dims.n_mels)
        convs = []
        cin = 1
        for cout, fs, k, d in zip(dims.channels, dims.freq_strides, dims.time_kernels, dims.dilations):
            convs.append(
                nn.Sequential(
                    nn.Conv2d(
                        cin,
                        cout,
                        kernel_size=(dims.freq_kernel, k),
                        stride=(fs, 1),
                        padding=(dims.freq_kernel // 2, 0),
                        dilation=(1, d),
                        bias=False,
                    ),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                )
            )
            cin = cout
        self.convs = nn.ModuleList(convs)
        self.proj = nn.Sequential(
            nn.Conv1d(dims.flat_dim, dims.embed_dim, kernel_size=1, bias=False),
            nn.BatchNorm1d(dims.embed_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(dims.dropout)
        self.frame_logits = nn.Linear(dims.embed_dim, dims.n_classes)
        self.frame_attention = nn.Linear(dims.embed_dim, dims.n_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        """Kaiming for ReLU convs, unit BatchNorm, small heads, flat attention and negative bias."""
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Conv2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.frame_logits.weight, std=0.01)
        # Events are rare: start near p = 0.05 so early training is not dominated by negatives.
        nn.init.constant_(self.frame_logits.bias, -3.0)
        # Zero attention weights start as plain mean pooling over the window.
        nn.init.zeros_(self.frame_attention.weight)
        nn.init.zeros_(self.frame_attention.bias)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Per-frame embeddings (B, T - R + 1, D) of features x (B, T, n_mels), T >= R."""
        assert x.dim() == 3 and x.shape[2] == self.dims.n_mels, f"expected (B, T, {self.dims.n_mels}), got {x.shape}"
        assert x.shape[1] >= self.dims.receptive_frames, f"need T >= R={self.dims.receptive_frames}, got {x.shape[1]}"
        h = self.input_norm(x.transpose(1, 2))  # (B, n_mels, T)
        h = h.unsqueeze(1)  # (B, 1, n_mels, T)
        for conv in self.convs:
            h = conv(h)  # (B, C_l, F_l, T_l), T_l = T_{l-1} - (k-1)*d
        b, c, f, t = h.shape
        h = h.reshape(b, c * f, t)  # (B, C*F, L)
        h = self.proj(h)  # (B, D, L)
        return h.transpose(1, 2)  # (B, L, D)

    def frame_outputs(self, emb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-frame (logits, attention), each (B, L, C), from embeddings (B, L, D)."""
        emb = self.dropout(emb)
        return self.frame_logits(emb), self.frame_attention(emb)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Window logits (B, C) of features x (B, T, n_mels); apply sigmoid for probabilities."""
        logits, att = self.frame_outputs(self.embed(x))  # (B, L, C) each
        return attention_pool(logits, att)


def attention_pool(logits: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """Per class softmax(att) over frames (dim -2) weighting frame logits: (..., L, C) -> (..., C)."""
    w = torch.softmax(att, dim=-2)  # (..., L, C)
    return (w * logits).sum(dim=-2)


def pool_windows(logits: torch.Tensor, att: torch.Tensor, window: int, hop: int) -> torch.Tensor:
    """Window logits (..., W, C) from per-frame logits and attention (..., L, C): every window of
    `window` frame positions starting every `hop` positions from 0, pooled by `attention_pool`."""
    lw = logits.unfold(-2, window, hop).transpose(-1, -2)  # (..., W, window, C)
    aw = att.unfold(-2, window, hop).transpose(-1, -2)
    return attention_pool(lw, aw)


# ------------------------------------------------------------------------------------------
# Inference: BatchNorm folded into the convolutions, shared by the streaming and offline paths


class FoldedNet:
    """Eval-mode copy of a `SoundEventCnn` with BatchNorm folded into the convolutions.

    Folding removes 5 of ~15 small ops per call, which is most of the cost at a 10-frame hop.
    Computed in float64 and stored as float32; differs from the module by ~1e-7.
    """

    def __init__(self, model: SoundEventCnn) -> None:
        dims = model.dims
        self.dims = dims
        with torch.no_grad():
            bn = model.input_norm
            scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)
            self.in_scale = scale.float().view(1, 1, -1, 1)  # (1, 1, n_mels, 1)
            self.in_shift = (bn.bias.double() - bn.running_mean.double() * scale).float().view(1, 1, -1, 1)
            # (weight, bias, stride, padding, (time kernel, dilation)) per layer
            self.convs: list[tuple[torch.Tensor, torch.Tensor, tuple[int, int], tuple[int, int], tuple[int, int]]] = []
            for block in model.convs:
                conv, cbn = block[0], block[1]
                w, b = fold_batchnorm(conv.weight, cbn)
                k, d = w.shape[3], conv.dilation[1]
                if d > 1:
                    # Dilated conv2d takes a slow path on CPU (about 2x here at a 10-frame hop).
                    # Instead stack the k time taps as channels and run an undilated (F, 1)
                    # conv: weight (C', C, F, k) -> (C', k*C, F, 1), tap-major like the stack.
                    w = w.permute(0, 3, 1, 2).reshape(w.shape[0], k * w.shape[1], w.shape[2], 1).contiguous()
                self.convs.append((w, b, conv.stride, conv.padding, (k, d)))
            pconv, pbn = model.proj[0], model.proj[1]
            w, b = fold_batchnorm(pconv.weight, pbn)
            self.proj_w = w.squeeze(-1)  # (D, C*F)
            self.proj_b = b
            # Both heads in one matmul: (2C, D).
            self.head_w = torch.cat([model.frame_logits.weight, model.frame_attention.weight]).detach().clone()
            self.head_b = torch.cat([model.frame_logits.bias, model.frame_attention.bias]).detach().clone()
        self.time_context = [(k - 1) * d for k, d in zip(dims.time_kernels, dims.dilations)]

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Input BatchNorm on (B, T, n_mels) features -> (B, 1, n_mels, T)."""
        return torch.addcmul(self.in_shift, x.transpose(1, 2).unsqueeze(1), self.in_scale)

    def conv(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Layer i (conv + folded BN + ReLU), valid in time: (B, C, F, T) -> (B, C', F', T - ctx_i)."""
        w, b, stride, padding, (k, d) = self.convs[i]
        if d == 1:
            return torch.relu_(F.conv2d(h, w, b, stride, padding))
        n = h.shape[3] - (k - 1) * d
        taps = torch.cat([h[..., j * d : j * d + n] for j in range(k)], dim=1)  # (B, k*C, F, n)
        return torch.relu_(F.conv2d(taps, w, b, stride, padding))

    def heads(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Last conv output (B, C, F, L) -> per-frame (logits, att), each (B, L, C)."""
        b, c, f, t = h.shape
        h = h.reshape(b, c * f, t).transpose(1, 2)  # (B, L, C*F)
        emb = torch.relu_(F.linear(h, self.proj_w, self.proj_b))  # (B, L, D)
        out = F.linear(emb, self.head_w, self.head_b)  # (B, L, 2C)
        n = self.dims.n_classes
        return out[..., :n], out[..., n:]

    def rows(self, h: torch.Tensor) -> torch.Tensor:
        """Last conv output (B, C, F, L) -> per-frame logits | attention (B, L, 2C) in one tensor."""
        b, c, f, t = h.shape
        emb = torch.relu_(F.linear(h.reshape(b, c * f, t).transpose(1, 2), self.proj_w, self.proj_b))  # (B, L, D)
        return F.linear(emb, self.head_w, self.head_b)  # (B, L, 2C)

    def step(self, x: np.ndarray, caches: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """Streaming step (see earshot.model.scoring): frames (B, n, n_mels) + full layer caches -> rows (B, n, 2C)."""
        with torch.inference_mode():
            h = self.normalize(torch.from_numpy(x))  # (B, 1, n_mels, n)
            new = []
            for i, ctx_len in enumerate(self.time_context):
                h = torch.cat((torch.from_numpy(caches[i]), h), dim=3)  # (B, C, F, ctx + n)
                new.append(h[..., h.shape[3] - ctx_len :].numpy())  # the next call's context
                h = self.conv(i, h)  # (B, C', F', n)
            return self.rows(h).numpy(), new

    def frame_outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, T, n_mels), T >= R -> per-frame (logits, att), each (B, T - R + 1, C)."""
        h = self.normalize(x)
        for i in range(len(self.convs)):
            h = self.conv(i, h)
        return self.heads(h)


def fold_batchnorm(weight: torch.Tensor, bn: nn.modules.batchnorm._BatchNorm) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold eval-mode BatchNorm after a bias-free conv into (weight, bias), float32."""
    scale = bn.weight.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (C,)
    w = weight.double() * scale.view(-1, *([1] * (weight.dim() - 1)))
    b = bn.bias.double() - bn.running_mean.double() * scale
    return w.float().contiguous(), b.float().contiguous()


class StreamingScorer:
    """Live scoring: push feature frames in any block size, get window scores every hop.

    Each frame passes each layer exactly once: layer i keeps the last (k-1)*dilation input
    columns as context, and the per-frame (logit, attention) of the last L positions are
    kept for pooling. Emits one `(end_frame, scores)` each time the frame count reaches
    `chunk_frames + k * hop_frames`; scores are sigmoid probabilities (C,) float32 of the
    window of the last `chunk_frames` frames, equal to `sigmoid(model(window))`.
    Not thread-safe; one instance per stream.
    """

    def __init__(self, model: SoundEventCnn, chunk_frames: int, hop_frames: int) -> None:
        self.chunk_frames = chunk_frames
        self.hop_frames = hop_frames
        self.n_positions = check_window(model.dims, chunk_frames, hop_frames)
        # A snapshot with eval semantics (running BN stats, no dropout); the model's own
        # train/eval mode is left untouched, and later weight updates are not seen.
        self._net = FoldedNet(model)
        self.reset()

    def reset(self) -> None:
        """Forget all context (start of a new stream)."""
        dims = self._net.dims
        self._ctx: list[torch.Tensor | None] = [None] * len(dims.channels)
        self._hist = torch.zeros(0, 2 * dims.n_classes)  # (<= L, 2C) per-frame logits | att
        self.frames_seen = 0

    def push(self, frames: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Add (n, n_mels) feature frames; return the windows completed, oldest first."""
        frames = np.asarray(frames, dtype=np.float32)
        n_mels = self._net.dims.n_mels
        if frames.ndim != 2 or frames.shape[1] != n_mels:
            raise ValueError(f"expected frames of shape (n, {n_mels}), got {frames.shape}")
        n = frames.shape[0]
        if n == 0:
            return []
        start = self.frames_seen
        self.frames_seen += n
        with torch.inference_mode():
            h = self._net.normalize(torch.from_numpy(frames).unsqueeze(0))  # (1, 1, n_mels, n)
            for i, ctx_len in enumerate(self._net.time_context):
                ctx = self._ctx[i]
                if ctx is not None:
                    h = torch.cat((ctx, h), dim=3)  # (1, C, F, ctx + n)
                # Keep the last ctx_len input columns for the next push (fewer at stream start).
                self._ctx[i] = h[..., -ctx_len:].clone() if ctx_len else h[..., :0]
                if h.shape[3] <= ctx_len:
                    return []  # still filling the receptive field; nothing reaches the heads yet
                h = self._net.conv(i, h)  # (1, C', F', new columns)
            logits, att = self._net.heads(h)  # (1, m, C) each
            hist = torch.cat((self._hist, torch.cat((logits[0], att[0]), dim=1)), dim=0)  # (<= L + m, 2C)
            results = self._emit(hist, start)
            self._hist = hist[-self.n_positions :]
        return results

    def _emit(self, hist: torch.Tensor, start: int) -> list[tuple[int, np.ndarray]]:
        """Pool every window whose end falls in (start, frames_seen]; hist ends at frames_seen."""
        t, hop, big_l = self.chunk_frames, self.hop_frames, self.n_positions
        first_k = max(0, -(-(start + 1 - t) // hop))  # smallest k with t + k*hop > start
        ends = list(range(t + first_k * hop, self.frames_seen + 1, hop))
        if not ends:
            return []
        n_classes = self._net.dims.n_classes
        # Row j of hist is the position whose receptive field ends at frame
        # frames_seen - (len(hist) - 1 - j); a window ending at E uses the L rows ending at E.
        idx = torch.tensor([len(hist) - (self.frames_seen - e) - big_l for e in ends])
        rows = idx.view(-1, 1) + torch.arange(big_l).view(1, -1)  # (W, L)
        sel = hist[rows]  # (W, L, 2C)
        scores = torch.sigmoid(attention_pool(sel[..., :n_classes], sel[..., n_classes:]))  # (W, C)
        out = scores.numpy().astype(np.float32)
        return [(e, out[i]) for i, e in enumerate(ends)]


class MultiStreamScorer(StepScorer):
    """Live scoring of `n_streams` streams in one worker: one batched forward pass per layer and push.

    `push([frames_0, ..., frames_{n-1}]) -> [[(end_frame, scores (C,)), ...] per stream]`, each
    stream's list equal (within 1e-5) to what its own `StreamingScorer` would return for the same
    blocks; `reset(i)` restarts stream i. Streams given the same number of new frames are
    stacked on the batch axis (at a common hop: all of them), each keeping its own layer caches.
    Eval semantics (BatchNorm folded); not thread-safe.
    """

    def __init__(self, model: SoundEventCnn, chunk_frames: int, hop_frames: int, n_streams: int) -> None:
        net = FoldedNet(model)
        super().__init__(net.step, model.dims, chunk_frames, hop_frames, n_streams)


def score_windows(
    model: SoundEventCnn,
    feats: np.ndarray,
    chunk_frames: int,
    hop_frames: int,
    segment_frames: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """Offline scores of every window, the same numbers as `StreamingScorer`.

    feats (T, n_mels) -> end_frames (N,) int64 and scores (N, C) float32, one row per window
    ending at chunk_frames + k*hop_frames <= T. Embeddings are computed over the whole file
    in segments overlapping by R - 1 frames (bounded memory for hour-long files), then all
    windows are pooled at once. 512-frame segments keep each layer's activations in cache:
    about 2.5x faster on one thread than 4096 (tools/bench.py, offline column).
    """
    big_l = check_window(model.dims, chunk_frames, hop_frames)
    dims = model.dims
    feats = check_features(feats, dims)
    total = feats.shape[0]
    if total < chunk_frames:
        return no_windows(dims)
    net = FoldedNet(model)  # eval semantics; does not change the model's train/eval mode
    r = dims.receptive_frames
    step = max(1, segment_frames)
    parts = []
    with torch.inference_mode():
        x = torch.from_numpy(feats)
        for s in range(0, total - r + 1, step):
            seg = x[s : min(total, s + step + r - 1)].unsqueeze(0)  # (1, <= step + R - 1, n_mels)
            logits, att = net.frame_outputs(seg)  # (1, m, C) each
            parts.append(torch.cat((logits[0], att[0]), dim=1))  # (m, 2C)
        per_frame = torch.cat(parts)  # (T - R + 1, 2C)
        n = dims.n_classes
        scores = torch.sigmoid(pool_windows(per_frame[:, :n], per_frame[:, n:], big_l, hop_frames))  # (N, C)
    ends = chunk_frames + hop_frames * np.arange(scores.shape[0], dtype=np.int64)
    return ends, scores.numpy().astype(np.float32)


__all__ = [
    "FoldedNet",
    "MultiStreamScorer",
    "SoundEventCnn",
    "StreamingScorer",
    "attention_pool",
    "fold_batchnorm",
    "pool_windows",
    "score_windows",
]
