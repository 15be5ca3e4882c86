"""
pasta.py: PaStA (HATCH's patch-level spatial alignment) for widematch. A helper module of grpo.py, no CLI:
grpo.py imports it when run with --pasta-weight W > 0 and adds W * (mean PaStA loss over the step's prompts) to
the GRPO loss.

Each image's visual tokens are averaged into an n x n grid of cells (n = 4); the pool's verified dense matches
decide which image-2 cell each image-1 cell corresponds to; the loss is a two-way InfoNCE over cosine
similarities of the cell features (ours: the HATCH text we have does not give the loss). Default features: the
vision merger's output (layer 0), where the two images have not seen each other.

Usage (inside grpo.py; `enc` is model_io.encode(...) of one prompt, `pair`/`arrays` its pool pair and npz):
    loss, stats = pasta.pasta_term(model, enc, arrays, pair, n=4, layer=0, tau=0.1)
    (loss * W / n_prompts).backward()
Pieces: cell_correspondence, image_token_features, grid_pool, pasta_loss.

In: the model, one encoded prompt, its pair's dense matches. Out: a scalar loss and stats.
Details (the pieces' signatures, the token layout, which layer and why, FSDP2): docs/pasta.md.
"""
import numpy as np
import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Which cells correspond (numpy, from the pool's dense matches)


def point_cells(points, size, n):
    """(k, 2) pixel coords (pixel centres at integers) in an image of size (width, height) -> (k,) cell index
    row * n + col of the n x n grid over the normalised image, -1 for points outside the image."""
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    u = (p[:, 0] + 0.5) / float(size[0])                                                         # (k,) in [0, 1)
    v = (p[:, 1] + 0.5) / float(size[1])                                                         # (k,)
    inside = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    col = np.clip(np.floor(u * n), 0, n - 1).astype(np.int64)
    row = np.clip(np.floor(v * n), 0, n - 1).astype(np.int64)
    return np.where(inside, row * n + col, -1)


def cell_correspondence(dense1, dense2, size1, size2, n=4, min_count=5):
    """Dense matches (row i of dense1 <-> row i of dense2, ORIGINAL pixels) -> (n*n,) int64: for each cell of
    image 1 the cell of image 2 that most of its matches land in, or -1 where it has fewer than min_count matches.
    Ties go to the lower cell index (deterministic)."""
    d1 = np.asarray(dense1, dtype=np.float64).reshape(-1, 2)
    d2 = np.asarray(dense2, dtype=np.float64).reshape(-1, 2)
    if len(d1) != len(d2):
        raise ValueError(f"cell_correspondence: {len(d1)} dense1 rows but {len(d2)} dense2 rows")
    c1, c2 = point_cells(d1, size1, n), point_cells(d2, size2, n)
    ok = (c1 >= 0) & (c2 >= 0)
    counts = np.zeros((n * n, n * n), dtype=np.int64)                                            # (cells1, cells2)
    np.add.at(counts, (c1[ok], c2[ok]), 1)
    return np.where(counts.sum(1) >= max(1, min_count), counts.argmax(1), -1)

# -----------------------------------------------------------------------------
# Features: visual tokens per image, pooled into n x n cells (torch)


def image_token_features(model, inputs, layer=0):
    """Visual-token features of every image in `inputs` (model_io.encode output or a collated batch, on the model's
    device) -> list of (t*h*w/merge^2, d) tensors, one per image in image_grid_thw order, each in row-major order
    over the merged grid. layer 0: vision merger output = the LLM's input at the image pads (vision tower only);
    layer k >= 1: output of decoder layer k at the image pads (one forward of the prompt, no lm_head).
    Gradients flow (call under torch.no_grad() for diagnostics)."""
    inner = model.model                                     # Qwen3VLModel inside Qwen3VLForConditionalGeneration
    grid = inputs["image_grid_thw"]
    if layer == 0:
        return list(inner.get_image_features(inputs["pixel_values"], grid).pooler_output)
    layers = inner.language_model.layers
    if not 1 <= layer <= len(layers):
        raise ValueError(f"image_token_features: layer {layer} not in 0..{len(layers)}")
    captured = {}

    def hook(module, args, output):
        captured["h"] = output[0] if isinstance(output, tuple) else output
    handle = layers[layer - 1].register_forward_hook(hook)
    try:
        inner(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
              mm_token_type_ids=inputs["mm_token_type_ids"], pixel_values=inputs["pixel_values"],
              image_grid_thw=grid, use_cache=False)
    finally:
        handle.remove()
    mask = inputs["input_ids"] == model.config.image_token_id                                   # (B, L)
    tokens = captured["h"][mask]                                   # (sum of tokens, d), batch-major = image order
    merge = inner.visual.spatial_merge_size
    return list(torch.split(tokens, (grid.prod(-1) // merge ** 2).tolist()))


def _overlap_weights(cells, tokens, like):
    """(cells, tokens) share of each token interval [r/tokens, (r+1)/tokens] inside each cell interval, rows
    normalised to 1 (exact area weights along one axis)."""
    lo_c = torch.arange(cells, dtype=torch.float64) / cells
    lo_t = torch.arange(tokens, dtype=torch.float64) / tokens
    ov = (torch.minimum(lo_c[:, None] + 1 / cells, lo_t[None] + 1 / tokens)
          - torch.maximum(lo_c[:, None], lo_t[None])).clamp(min=0)                              # (cells, tokens)
    return (ov / ov.sum(1, keepdim=True)).to(device=like.device, dtype=like.dtype)


def grid_pool(features, grid_thw, merge_size, n=4):
    """One image's visual tokens (t*h*w/merge^2, d), row-major over the merged grid (h/merge, w/merge), ->
    (n*n, d) cell features (cell index row * n + col), area-weighted averages; frames (t > 1) are averaged."""
    t, h, w = (int(v) for v in grid_thw)
    H, W = h // merge_size, w // merge_size
    if features.shape[0] != t * H * W:
        raise ValueError(f"grid_pool: {features.shape[0]} tokens for grid_thw {(t, h, w)} / merge {merge_size}")
    f = features.reshape(t, H, W, -1).mean(0)                                                   # (H, W, d)
    Wh, Ww = _overlap_weights(n, H, f), _overlap_weights(n, W, f)                               # (n, H), (n, W)
    return torch.einsum("ih,jw,hwd->ijd", Wh, Ww, f).reshape(n * n, -1)                         # (n*n, d)

# -----------------------------------------------------------------------------
# The alignment loss


def pasta_loss(f1, f2, corr, tau=0.1):
    """One-way InfoNCE: each image-1 cell i with corr[i] >= 0 must pick image-2 cell corr[i] among all image-2
    cells by cosine similarity / tau. f1 (n*n, d), f2 (n*n, d), corr (n*n,) int. Returns a scalar (fp32); 0 that
    still depends on f1 and f2 when no cell has a correspondence."""
    corr = (corr if torch.is_tensor(corr) else torch.as_tensor(np.asarray(corr))).to(f1.device, torch.long)  # (n*n,)
    z1, z2 = F.normalize(f1.float(), dim=-1), F.normalize(f2.float(), dim=-1)                   # (n*n, d)
    valid = corr >= 0
    if not bool(valid.any()):
        return (z1.sum() + z2.sum()) * 0.0
    logits = z1[valid] @ z2.T / tau                                                             # (v, n*n)
    return F.cross_entropy(logits, corr[valid])


def pasta_term(model, inputs, pair_arrays, pair_meta, n=4, layer=0, tau=0.1, min_count=5):
    """PaStA loss of ONE prompt (two images: image 1, image 2) -> (loss, stats). inputs: model_io.encode() output
    (moved to the model's device here); pair_arrays: the pair's npz dict (dense1, dense2); pair_meta: its pairs.jsonl
    row (width1, height1, width2, height2). loss = mean of the 1->2 and 2->1 InfoNCE losses. stats: pasta_loss,
    pasta_cells (image-1 cells with a correspondence), pasta_acc (share of those whose most similar image-2 cell is
    the right one; nan when none)."""
    device = next(model.parameters()).device
    inp = {k: v.to(device) for k, v in inputs.items() if torch.is_tensor(v)}
    if inp["image_grid_thw"].shape[0] != 2:
        raise ValueError(f"pasta_term: expects one prompt with 2 images, got {inp['image_grid_thw'].shape[0]}")
    feats = image_token_features(model, inp, layer)
    merge = model.model.visual.spatial_merge_size
    g1, g2 = (grid_pool(f, thw, merge, n) for f, thw in zip(feats, inp["image_grid_thw"].tolist()))
    size1 = (pair_meta["width1"], pair_meta["height1"])
    size2 = (pair_meta["width2"], pair_meta["height2"])
    d1 = pair_arrays.get("dense1", np.zeros((0, 2)))
    d2 = pair_arrays.get("dense2", np.zeros((0, 2)))
    c12 = cell_correspondence(d1, d2, size1, size2, n, min_count)
    c21 = cell_correspondence(d2, d1, size2, size1, n, min_count)
    loss = 0.5 * (pasta_loss(g1, g2, c12, tau) + pasta_loss(g2, g1, c21, tau))
    with torch.no_grad():
        valid = np.flatnonzero(c12 >= 0)
        sim = F.normalize(g1.float(), dim=-1) @ F.normalize(g2.float(), dim=-1).T                # (n*n, n*n)
        acc = float((sim.argmax(1).cpu().numpy()[valid] == c12[valid]).mean()) if len(valid) else float("nan")
    return loss, dict(pasta_loss=float(loss.detach()), pasta_cells=int(len(valid)), pasta_acc=acc)
