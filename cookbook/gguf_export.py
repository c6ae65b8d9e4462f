"""From recipe to runtime: our quantized linears written into a GGUF file that llama.cpp runs.

GGUF's Q4_0 and Q8_0 are plain block formats: blocks of 32 weights along the input, each with one float16
scale d, and w = d * (q - 8) for a 4-bit q (Q4_0) or w = d * q for an int8 q (Q8_0). Those are exactly the
codes our quantizers produce with `bits=4` or `8`, `group_size=32`, `symmetric=True` (RTN `quantize_linears_rtn`
or GPTQ `quantize_model_layerwise`), so the export copies codes and scales, it does not quantize again.

`export_gguf` takes the GGUF the model came from (the packaged Gemma 3 file by default) as the template: its
metadata, tokenizer and every tensor we did not quantize (norms, the token table) are copied as they are, and
each decoder linear is replaced by our codes. The model must therefore keep the template's architecture and
shapes (pruned or distilled models have no template). The writer is `gguf.GGUFWriter` (the `gguf` package,
already a dependency for loading the model); `read_back` dequantizes a written tensor with `gguf`'s reader, so
the round trip is tested without llama.cpp.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .core import LINEAR_NAMES, decoder_layers
from .errors import require_module
from .quantization import QuantizedWeight, QuantLinear

BLOCK = 32  # weights per block in Q4_0 and Q8_0
GGUF_LINEAR = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down"}
FILE_TYPE = {4: 2, 8: 7}  # llama.cpp's general.file_type: MOSTLY_Q4_0, MOSTLY_Q8_0


def why_not_exportable(qw: QuantizedWeight, input_scale: torch.Tensor | None = None) -> str | None:
    """None when `qw` maps onto Q4_0 / Q8_0 code for code, else what rules it out and what would work."""
    if qw.bits not in FILE_TYPE:
        return f"{qw.bits}-bit codes have no GGUF block format here (4 -> Q4_0, 8 -> Q8_0)"
    if qw.group_size != BLOCK or not qw.symmetric:
        return (f"Q4_0 / Q8_0 hold one float16 scale per block of {BLOCK} around a fixed zero; got group_size="
                f"{qw.group_size}, symmetric={qw.symmetric} (quantize with group_size=32, symmetric=True)")
    if input_scale is not None:
        return "AWQ's per-input scale has no place in a GGUF linear (fold it into the preceding norm first)"
    return None


def q4_0_blocks(qw: QuantizedWeight) -> np.ndarray:
    """(out, in / 32 * 18) bytes: per block the float16 scale, then 16 bytes whose low nibbles hold
    weights 0-15 of the block and high nibbles weights 16-31 (codes already carry the +8 offset)."""
    out, inp = qw.codes.shape
    codes = qw.codes.reshape(out, inp // BLOCK, BLOCK)  # (out, nb, 32) in [0, 15]
    qs = codes[..., :16] | (codes[..., 16:] << 4)  # (out, nb, 16)
    d = qw.scale.half().reshape(out, inp // BLOCK, 1).view(torch.uint8)  # (out, nb, 2)
    return torch.cat([d, qs], dim=-1).reshape(out, -1).numpy()


def q8_0_blocks(qw: QuantizedWeight) -> np.ndarray:
    """(out, in / 32 * 34) bytes: per block the float16 scale, then 32 signed int8 codes (ours minus 128)."""
    out, inp = qw.codes.shape
    q = (qw.codes.to(torch.int16) - 128).to(torch.int8).reshape(out, inp // BLOCK, BLOCK).view(torch.uint8)
    d = qw.scale.half().reshape(out, inp // BLOCK, 1).view(torch.uint8)  # (out, nb, 2)
    return torch.cat([d, q], dim=-1).reshape(out, -1).numpy()


def _linear_codes(model: nn.Module) -> dict[str, QuantLinear]:
    """GGUF tensor name -> our QuantLinear, for every decoder linear; a clear error for anything else."""
    found = {}
    for i, layer in enumerate(decoder_layers(model)):
        for hf, short in GGUF_LINEAR.items():
            module = layer.get_submodule(hf)
            if not isinstance(module, QuantLinear):
                raise ValueError(f"layer {i} {hf} is {type(module).__name__}, not a QuantLinear: quantize every "
                                 f"decoder linear ({', '.join(LINEAR_NAMES)}) before exporting.")
            reason = why_not_exportable(module.quantized_weight(), module.input_scale)
            if reason:
                raise ValueError(f"layer {i} {hf} cannot be written as GGUF: {reason}.")
            found[f"blk.{i}.{short}.weight"] = module
    return found


def export_gguf(model: nn.Module, path: str | Path, template: str | Path | None = None) -> Path:
    """Write `model`'s quantized decoder linears into a copy of `template` (default: the packaged GGUF)."""
    gguf = require_module("gguf", purpose="writing GGUF files")
    from .llamacpp import packaged_gguf

    reader = gguf.GGUFReader(template or packaged_gguf())
    linears = _linear_codes(model)
    bits = {m.quantized_weight().bits for m in linears.values()}
    if len(bits) != 1:
        raise ValueError(f"Mixed widths {sorted(bits)}: export one width (4 -> Q4_0 or 8 -> Q8_0) per file.")
    bits = bits.pop()
    missing = set(linears) - {t.name for t in reader.tensors}
    if missing:
        raise ValueError(f"The template has no tensors {sorted(missing)[:3]}...: it is not this model's GGUF.")
    writer = gguf.GGUFWriter(str(path), arch=reader.fields["general.architecture"].contents())
    _copy_metadata(gguf, reader, writer, FILE_TYPE[bits])
    for t in reader.tensors:
        if t.name in linears:
            qw = linears[t.name].quantized_weight()
            if tuple(qw.codes.shape) != tuple(int(n) for n in reversed(t.shape.tolist())):
                raise ValueError(f"{t.name}: our weight is {tuple(qw.codes.shape)}, the template's "
                                 f"{tuple(reversed(t.shape.tolist()))}: not the model this GGUF holds.")
            qtype = gguf.GGMLQuantizationType.Q4_0 if bits == 4 else gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(t.name, q4_0_blocks(qw) if bits == 4 else q8_0_blocks(qw), raw_dtype=qtype)
        else:  # norms and the token table, as the template has them
            writer.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)  # bytes or floats, as read
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _copy_metadata(gguf, reader, writer, file_type: int) -> None:
    """Every key of the template except the ones the writer sets itself, with llama.cpp's file type updated."""
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        value = file_type if key == "general.file_type" else field.contents()
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, value, vtype, sub_type=sub_type)


def read_back(path: str | Path, names: list[str]) -> dict[str, torch.Tensor]:
    """Tensors of a GGUF file dequantized to float32 by the `gguf` package's own reader: name -> (rows, columns)."""
    gguf = require_module("gguf", purpose="reading GGUF files")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}  # (parsing a 262k-token vocabulary: ~20 s)
    missing = [n for n in names if n not in tensors]
    if missing:
        raise KeyError(f"No tensors {missing} in {path}.")
    out = {}
    for name in names:
        t = tensors[name]
        values = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        out[name] = torch.from_numpy(values).reshape(*reversed(t.shape.tolist()))
    return out
