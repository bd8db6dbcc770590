"""Load fairseq `fconv` checkpoints (Gehring et al.'s released models and fairseq-trained ones) into ConvS2S.

    model = from_fairseq("checkpoint_best.pt")          # or the loaded checkpoint dict -> ConvS2S, eval mode
    symbols = read_fairseq_dict("dict.de.txt")          # ["<s>", "<pad>", "</s>", "<unk>", ...] (index = id)

Covered: the `fconv`, `fconv_iwslt_de_en`, `fconv_wmt_en_ro`, `fconv_wmt_en_de`, `fconv_wmt_en_fr` architectures
(any layer strings, residual distances, attention subsets, tied output embedding), fairseq's weight norm on
Linear (g (out, 1)) and ConvTBC (dim 2: g (1, 1, 2*C_out); pre-version-2 decoders: dim 0, g (k, 1, 1)).
Not covered (ValueError): fconv_self_att, fconv_lm, adaptive softmax, normalization_constant != 0.5.

Mapping facts (fairseq -> ours):
  * learned positions: fairseq's table has R rows, position p (1-based) uses row padding_idx + p, row padding_idx
    is zero; ours uses row p and row 0 for padding, so ours = fairseq[padding_idx:] and max positions =
    R - padding_idx - 1 (taken from the tensor: fairseq's table size convention changed between versions).
  * special ids: fairseq dictionaries are <s>=0, <pad>=1, </s>=2, <unk>=3, and its decoder starts from </s>, so
    the converted config has pad 1, bos = eos = 2, unk 3; fairseq's sources end with </s>.
  * weights are copied as (g, v) pairs where the layouts agree, so the model can be trained further.
  * fairseq's decoder keeps per-layer modules in side-by-side lists (convolutions.N, attention.N, projections.N),
    ours in one DecoderLayer each (layers.N.conv, layers.N.attention, layers.N.proj): model.upgrade_decoder_key.
"""

from __future__ import annotations

import argparse
import ast
import os
import pickle
from collections.abc import Mapping

import torch

from .model import ConvS2S, ConvS2SConfig, upgrade_decoder_key

FAIRSEQ_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]     # fairseq Dictionary's ids 0..3
PAD, EOS, UNK = 1, 2, 3

_BASE = dict(dropout=0.1, encoder_embed_dim=512, encoder_layers="[(512, 3)] * 20", decoder_embed_dim=512,
             decoder_layers="[(512, 3)] * 20", decoder_out_embed_dim=256, decoder_attention="True",
             share_input_output_embed=False, normalization_constant=0.5)
_WMT_CONVS = {
    "fconv_wmt_en_de": "[(512, 3)] * 9 + [(1024, 3)] * 4 + [(2048, 1)] * 2",
    "fconv_wmt_en_fr": "[(512, 3)] * 6 + [(768, 3)] * 4 + [(1024, 3)] * 3 + [(2048, 1)] * 1 + [(4096, 1)] * 1",
}
# fairseq's register_model_architecture defaults for the fconv model (applied where the args lack a field).
ARCH_DEFAULTS: dict[str, dict] = {
    "fconv": _BASE,
    "fconv_iwslt_de_en": {**_BASE, "encoder_embed_dim": 256, "encoder_layers": "[(256, 3)] * 4",
                          "decoder_embed_dim": 256, "decoder_layers": "[(256, 3)] * 3", "decoder_out_embed_dim": 256},
    "fconv_wmt_en_ro": {**_BASE, "decoder_out_embed_dim": 512},
    **{name: {**_BASE, "encoder_embed_dim": 768, "encoder_layers": convs, "decoder_embed_dim": 768,
              "decoder_layers": convs, "decoder_out_embed_dim": 512} for name, convs in _WMT_CONVS.items()},
}
_IGNORED_KEYS = {"encoder.version", "decoder.version"}


def parse_layer_string(text: str):
    """fairseq's layer / attention expression ("[(512, 3)] * 9 + [(1024, 3)] * 4", "True", "[True, False]") ->
    the Python value, without eval: only int / bool literals, lists, tuples, `+` and `*` are allowed."""
    if not isinstance(text, str):
        return text
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"cannot parse fairseq layer string {text!r}: {e.msg}") from None
    return _literal(tree.body, text)


def _literal(node, text: str):
    if isinstance(node, ast.Constant) and isinstance(node.value, (bool, int)):
        return node.value
    if isinstance(node, (ast.List, ast.Tuple)):
        items = [_literal(e, text) for e in node.elts]
        return items if isinstance(node, ast.List) else tuple(items)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
        left, right = _literal(node.left, text), _literal(node.right, text)
        if isinstance(node.op, ast.Add) and isinstance(left, (list, tuple)) and type(left) is type(right):
            return left + right
        if isinstance(node.op, ast.Mult):
            seq, n = (left, right) if isinstance(left, (list, tuple)) else (right, left)
            # 1000 bounds the list a string can build (fairseq's deepest preset has 40 layers).
            if isinstance(seq, (list, tuple)) and type(n) is int and 0 <= n * len(seq) <= 1000:
                return seq * n
        raise ValueError(f"unsupported operands for {type(node.op).__name__} in fairseq layer string {text!r}")
    raise ValueError(f"fairseq layer string {text!r} contains {type(node).__name__}: only int/bool literals, "
                     "lists, tuples, '+' and '*' are allowed")


def read_fairseq_dict(path: str | os.PathLike) -> list[str]:
    """fairseq dict.<lang>.txt ("<symbol> <count>" per line) -> symbols by id: the 4 specials, then the file's."""
    symbols = list(FAIRSEQ_SPECIALS)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.endswith(" #fairseq:overwrite"):          # a flag fairseq allows after the count
                line = line[: -len(" #fairseq:overwrite")]
            word, sep, count = line.rpartition(" ")
            if not sep or not count.isdigit():
                raise ValueError(f"{path}:{n}: expected '<symbol> <count>', got {line!r}")
            symbols.append(word)
    return symbols


def _allowed_globals() -> list:
    """What torch's weights_only unpickler may build beyond tensors and containers: argparse.Namespace (fairseq's
    `args`, and cfg['model'] of legacy architectures such as fconv) and numpy arrays / scalars / dtypes, which
    fairseq-trained checkpoints keep in extra_state (val_loss, best, meters) - fairseq issue #5603. All of them
    are data: none runs code given in the file. numpy pickles name its module numpy.core (numpy 1) or numpy._core
    (numpy 2), so both spellings are allowed."""
    allowed: list = [argparse.Namespace]
    try:
        import numpy as np
    except ImportError:                       # torch works without numpy; such a checkpoint then names numpy
        return allowed
    multiarray = (np._core if hasattr(np, "_core") else np.core).multiarray
    allowed += [np.ndarray, np.dtype]
    if hasattr(np, "dtypes"):                 # numpy >= 1.25 pickles a dtype as its class (Float64DType, ...)
        allowed += [cls for cls in vars(np.dtypes).values() if isinstance(cls, type) and issubclass(cls, np.dtype)]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(multiarray.scalar, f"{module}.scalar"), (multiarray._reconstruct, f"{module}._reconstruct")]
    return allowed


def load_fairseq_checkpoint(path: str | os.PathLike) -> dict:
    """torch.load(weights_only=True) of a fairseq checkpoint (torch's zip or legacy format); beyond tensors and
    containers only argparse.Namespace and numpy data are allowed (see _allowed_globals)."""
    allowed = _allowed_globals()
    with torch.serialization.safe_globals(allowed):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            try:                                             # zip-format files can be listed without unpickling
                ok = {a[1] if isinstance(a, tuple) else f"{a.__module__}.{a.__qualname__}" for a in allowed}
                names = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in ok]
            except Exception:                                # legacy format: torch's message names the first one
                names = []
            found = f"it holds {', '.join(names)}; " if names else ""
            raise ValueError(
                f"cannot load {path} with weights_only=True: {found}only tensors, containers, argparse.Namespace "
                "and numpy data are allowed. If the file is from a trusted source, keep only its 'args' (or 'cfg') "
                f"and 'model' entries with fairseq installed, and load that. torch said: {e}") from None


def _model_args(ckpt: Mapping) -> dict:
    args = ckpt.get("args")
    if args is None and isinstance(ckpt.get("cfg"), Mapping):
        args = ckpt["cfg"].get("model")
    if args is None:
        raise ValueError("checkpoint has neither 'args' nor 'cfg'['model']: cannot tell the architecture")
    args = dict(vars(args)) if isinstance(args, argparse.Namespace) else dict(args)
    arch = args.get("arch", args.get("_name"))
    if arch not in ARCH_DEFAULTS:
        raise ValueError(f"unsupported fairseq architecture {arch!r}; supported: {', '.join(ARCH_DEFAULTS)}")
    return {**ARCH_DEFAULTS[arch], **{k: v for k, v in args.items() if v is not None}}


def _conv_g_v(prefix: str, sd: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """fairseq ConvTBC weight-norm (g, v), v (k, C_in, 2*C_out) -> ours: g (2*C_out,) normed over (k, C_in)."""
    g, v = sd[prefix + "weight_g"], sd[prefix + "weight_v"]
    k, c_in, c2 = v.shape
    if tuple(g.shape) == (1, 1, c2):                    # weight_norm(dim=2): our parametrisation exactly
        return g.reshape(c2), v
    if tuple(g.shape) == (k, 1, 1):                     # pre-version-2 decoders: weight_norm(dim=0), per tap
        # Folded in fp64 and left there: load_state_dict casts to the model's dtype once.
        w = v.double() * (g.double() / v.double().pow(2).sum(dim=(1, 2), keepdim=True).sqrt())
        return w.pow(2).sum(dim=(0, 1)).sqrt(), w
    raise ValueError(f"{prefix}weight_g has shape {tuple(g.shape)}; expected (1, 1, {c2}) or ({k}, 1, 1)")


def _our_key(key: str) -> str:
    """A fairseq fconv state-dict key -> ours (the decoder's per-layer modules, see upgrade_decoder_key)."""
    return "decoder." + upgrade_decoder_key(key[len("decoder."):]) if key.startswith("decoder.") else key


def from_fairseq(checkpoint, *, src_dict=None, tgt_dict=None, backend: str = "auto") -> ConvS2S:
    """A fairseq fconv checkpoint (path, or the dict torch.load gives) -> ConvS2S in eval mode, same outputs.

    src_dict / tgt_dict (a dict.<lang>.txt path or a symbol list), when given, are checked against the
    embedding sizes. Parameters keep the checkpoint's dtype (fp16 / bf16 are upcast to fp32).
    """
    ckpt = load_fairseq_checkpoint(checkpoint) if isinstance(checkpoint, (str, os.PathLike)) else checkpoint
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("model"), Mapping):
        raise ValueError("a fairseq checkpoint is a dict with a 'model' state dict")
    sd, args = ckpt["model"], _model_args(ckpt)
    if float(args["normalization_constant"]) != 0.5:
        raise ValueError(f"normalization_constant={args['normalization_constant']} is not supported (only 0.5)")
    if args.get("adaptive_softmax_cutoff") or any(k.startswith("decoder.adaptive_softmax") for k in sd):
        raise ValueError("adaptive softmax checkpoints are not supported")
    for key in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "encoder.embed_positions.weight",
                "decoder.embed_positions.weight"):
        if key not in sd:
            raise ValueError(f"checkpoint state dict lacks {key}")
    attention = parse_layer_string(args["decoder_attention"])
    src_vocab, tgt_vocab = sd["encoder.embed_tokens.weight"].shape[0], sd["decoder.embed_tokens.weight"].shape[0]
    for name, symbols, size in (("src_dict", src_dict, src_vocab), ("tgt_dict", tgt_dict, tgt_vocab)):
        if symbols is not None:
            symbols = read_fairseq_dict(symbols) if isinstance(symbols, (str, os.PathLike)) else symbols
            if len(symbols) != size:
                raise ValueError(f"{name} has {len(symbols)} symbols but the checkpoint's embedding has {size} rows")
    cfg = ConvS2SConfig(
        src_vocab_size=src_vocab, tgt_vocab_size=tgt_vocab,
        encoder_embed_dim=int(args["encoder_embed_dim"]), encoder_layers=parse_layer_string(args["encoder_layers"]),
        decoder_embed_dim=int(args["decoder_embed_dim"]), decoder_layers=parse_layer_string(args["decoder_layers"]),
        decoder_out_embed_dim=int(args["decoder_out_embed_dim"]),
        decoder_attention=attention if isinstance(attention, bool) else list(attention),
        share_decoder_input_output_embed=bool(args["share_input_output_embed"]), dropout=float(args["dropout"]),
        max_source_positions=sd["encoder.embed_positions.weight"].shape[0] - PAD - 1,
        max_target_positions=sd["decoder.embed_positions.weight"].shape[0] - PAD - 1,
        pad_idx=PAD, bos_idx=EOS, eos_idx=EOS, unk_idx=UNK, backend=backend)

    converted = {}                                      # fairseq's keys, our values
    for key, value in sd.items():
        if key in _IGNORED_KEYS:
            continue
        if key.endswith("embed_positions.weight"):
            converted[key] = value[PAD:]
        elif key.startswith(("encoder.convolutions.", "decoder.convolutions.")) and key.endswith(".weight_g"):
            prefix = key[: -len("weight_g")]
            converted[prefix + "weight_g"], converted[prefix + "weight_v"] = _conv_g_v(prefix, sd)
        elif key.startswith(("encoder.convolutions.", "decoder.convolutions.")) and key.endswith(".weight_v"):
            continue                                    # handled with its weight_g
        else:
            converted[key] = value
    fairseq_key = {_our_key(key): key for key in converted}              # error messages name fairseq's keys
    ours = {_our_key(key): value for key, value in converted.items()}
    if cfg.share_decoder_input_output_embed:
        embedding = ours["decoder.embed_tokens.weight"]
        if not torch.equal(ours.setdefault("decoder.fc3.weight", embedding), embedding):
            raise ValueError("share_input_output_embed is set but decoder.fc3.weight differs from the embedding")

    dtype = sd["encoder.embed_tokens.weight"].dtype
    model = ConvS2S.uninitialized(cfg, dtype=torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    expected = model.state_dict()
    unexpected = sorted(fairseq_key[key] for key in set(ours) - set(expected))
    if unexpected:
        raise ValueError(f"unexpected keys in the fairseq state dict for this architecture: {', '.join(unexpected)}")
    missing = sorted(set(expected) - set(ours))
    if missing:
        raise ValueError(f"keys missing from the fairseq state dict: {', '.join(missing)}")
    for key, value in ours.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise ValueError(f"{fairseq_key.get(key, key)}: checkpoint shape {tuple(value.shape)} does not match "
                             f"the architecture's {tuple(expected[key].shape)} (check the layer strings and "
                             "embedding sizes)")
    model.load_state_dict(ours, strict=True)
    return model.eval()


__all__ = ["from_fairseq", "load_fairseq_checkpoint", "parse_layer_string", "read_fairseq_dict", "ARCH_DEFAULTS"]
