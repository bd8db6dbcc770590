"""Attention heat maps: source tokens across, target tokens down, one panel per layer or their mean.

    hyp = beam_search(model, src, need_attention=True)[0][0]          hyp.attention (n_layers, L, S)
    plot_attention(hyp.attention, src_labels, tgt_labels, "a.png")    the mean over layers
    plot_attention(hyp.attention, src_labels, tgt_labels, "a.png", layer="all")    one panel per layer
    plot_sentence(model, tokenizer, "Ein Hund läuft.", "a.png")       translate one sentence, then plot

Matplotlib is imported on first use (a plotting dependency only) and drawn off-screen (Agg), so it works without
a display and leaves pyplot's global state alone.
"""

from __future__ import annotations

import torch

from .tokenizer import EOS_ID, SPECIAL_IDS


def _layers(attention: torch.Tensor, layer) -> tuple[list, list]:
    """(n_layers, L, S) or (L, S) -> ([(L, S) panels], [titles]) for layer = "mean" | "all" | int."""
    att = attention.detach().float().cpu()
    if att.dim() == 2:
        att = att[None]
    if att.dim() != 3 or att.shape[0] == 0:
        raise ValueError(f"attention must be (n_layers >= 1, L, S) or (L, S), got shape {tuple(attention.shape)}")
    if layer == "mean":
        return [att.mean(dim=0)], [f"mean of {att.shape[0]} attention layer(s)"]
    if layer == "all":
        return list(att), [f"attention layer {i}" for i in range(att.shape[0])]
    if isinstance(layer, int) and -att.shape[0] <= layer < att.shape[0]:
        return [att[layer]], [f"attention layer {layer % att.shape[0]}"]
    raise ValueError(f"layer must be 'mean', 'all' or an index below {att.shape[0]}, got {layer!r}")


def plot_attention(attention: torch.Tensor, src_labels, tgt_labels, out: str, *, layer="mean",
                   title: str | None = None) -> str:
    """Save a heat map of attention (n_layers, L, S) or (L, S) to `out` (format from its suffix, e.g. .png).

    src_labels: S source token strings (columns); tgt_labels: L target token strings (rows).
    layer: "mean" (average over layers), "all" (one panel per layer) or a layer index. Returns `out`.
    """
    from matplotlib.figure import Figure

    panels, names = _layers(attention, layer)
    L, S = panels[0].shape
    if len(src_labels) != S or len(tgt_labels) != L:
        raise ValueError(f"attention is (L={L}, S={S}) but got {len(tgt_labels)} target and {len(src_labels)} "
                         "source labels")
    cols = min(len(panels), 3)
    rows = -(-len(panels) // cols)
    # 0.4 inch per token keeps subword labels legible for Multi30k-length sentences (~15 tokens).
    w, h = 1.5 + 0.4 * S, 1.5 + 0.4 * L
    fig = Figure(figsize=(cols * w, rows * h), layout="constrained")
    for i, (panel, name) in enumerate(zip(panels, names)):
        ax = fig.add_subplot(rows, cols, i + 1)
        im = ax.imshow(panel.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
        ax.set_xticks(range(S), labels=src_labels, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(L), labels=tgt_labels, fontsize=8)
        ax.set_xlabel("source")
        ax.set_ylabel("target")
        ax.set_title(name, fontsize=9)
    fig.colorbar(im, ax=fig.axes, shrink=0.8, label="attention probability")
    if title:
        fig.suptitle(title)
    fig.savefig(out, dpi=120)
    return out


def _pieces(sp, ids) -> list[str]:
    return ["<eos>" if i == EOS_ID else sp.id_to_piece(int(i)) for i in ids]


def plot_sentence(model, tokenizer, sentence: str, out: str, *, layer="mean", beam: int = 5,
                  max_len_a: float = 1.2, max_len_b: int = 10) -> tuple[str, str]:
    """Translate `sentence` with beam search and save its best hypothesis' attention map to `out`.

    Returns (translation, out). Rows are the target subwords (ending with <eos>), columns the source subwords + <eos>.
    """
    from .search import beam_search

    device = next(model.parameters()).device
    ids = tokenizer.encode_src([sentence])[0]
    limit = model.config.max_source_positions - 1
    ids = [i for i in ids[:limit] if i not in SPECIAL_IDS] + [model.config.eos_idx]
    src = torch.tensor([ids], dtype=torch.long, device=device)
    hyp = beam_search(model, src, beam=beam, max_len_a=max_len_a, max_len_b=max_len_b, need_attention=True)[0][0]
    tgt_ids = hyp.tokens.tolist()
    translation = tokenizer.decode_tgt(tgt_ids)
    plot_attention(hyp.attention, _pieces(tokenizer.src, ids), _pieces(tokenizer.tgt, tgt_ids), out, layer=layer,
                   title=f"{sentence}\n→ {translation}")
    return translation, out
