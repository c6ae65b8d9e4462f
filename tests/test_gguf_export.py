import gguf
import numpy as np
import pytest
import torch

from cookbook import gguf_export as G
from cookbook import quantization as Q
from cookbook.models import tiny_model


def _template(model, path):
    """A small GGUF of the tiny model in float32, named as llama.cpp names Gemma 3's tensors."""
    writer = gguf.GGUFWriter(str(path), arch="gemma3")
    writer.add_block_count(model.config.num_hidden_layers)
    writer.add_file_type(0)
    writer.add_tensor("token_embd.weight", model.model.embed_tokens.weight.detach().numpy())
    for i, layer in enumerate(model.model.layers):
        for hf, short in G.GGUF_LINEAR.items():
            writer.add_tensor(f"blk.{i}.{short}.weight", layer.get_submodule(hf).weight.detach().numpy())
        writer.add_tensor(f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight.detach().numpy())
    writer.write_header_to_file(); writer.write_kv_data_to_file(); writer.write_tensors_to_file(); writer.close()
    return path


@pytest.mark.parametrize("bits,qtype", [(4, "Q4_0"), (8, "Q8_0")])
def test_our_codes_round_trip_through_gguf_bit_for_bit(tmp_path, bits, qtype):
    model = tiny_model(hidden_size=64)
    template = _template(model, tmp_path / "template.gguf")
    Q.quantize_linears_rtn(model, bits, 32, symmetric=True)
    out = G.export_gguf(model, tmp_path / "ours.gguf", template)
    reader = gguf.GGUFReader(out)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.1.ffn_down.weight"] == qtype and types["token_embd.weight"] == "F32"
    assert reader.fields["general.file_type"].contents() == G.FILE_TYPE[bits]
    names = ["blk.0.attn_q.weight", "blk.1.ffn_down.weight", "blk.0.attn_norm.weight"]
    back = G.read_back(out, names)
    assert torch.equal(back["blk.0.attn_q.weight"], model.model.layers[0].self_attn.q_proj.dequantized_weight())
    assert torch.equal(back["blk.1.ffn_down.weight"], model.model.layers[1].mlp.down_proj.dequantized_weight())
    assert torch.equal(back["blk.0.attn_norm.weight"].flatten(), model.model.layers[0].input_layernorm.weight)


def test_q4_0_block_layout():
    # one block: float16 scale, then low nibbles = weights 0..15, high nibbles = weights 16..31
    codes = torch.arange(32, dtype=torch.uint8)[None] % 16  # (1, 32)
    qw = Q.QuantizedWeight(codes, torch.tensor([[0.5]], dtype=torch.float16), torch.tensor([[8]], dtype=torch.uint8),
                           4, 32, True)
    block = G.q4_0_blocks(qw)[0]
    assert block.shape == (18,) and block[:2].view(np.float16)[0] == 0.5
    assert list(block[2:] & 15) == list(range(16)) and list(block[2:] >> 4) == list(range(16))


@pytest.mark.parametrize("kwargs,needle", [
    (dict(bits=4, group_size=64, symmetric=True), "group_size=32, symmetric=True"),
    (dict(bits=4, group_size=32, symmetric=False), "group_size=32, symmetric=True"),
    (dict(bits=3, group_size=32, symmetric=True), "no GGUF block format"),
])
def test_formats_gguf_cannot_hold_are_refused_with_the_fix(tmp_path, kwargs, needle):
    model = tiny_model(hidden_size=64)
    template = _template(model, tmp_path / "template.gguf")
    Q.quantize_linears_rtn(model, kwargs["bits"], kwargs["group_size"], symmetric=kwargs["symmetric"])
    with pytest.raises(ValueError, match=needle):
        G.export_gguf(model, tmp_path / "ours.gguf", template)


def test_a_float_model_is_refused(tmp_path):
    model = tiny_model(hidden_size=64)
    with pytest.raises(ValueError, match="not a QuantLinear"):
        G.export_gguf(model, tmp_path / "ours.gguf", _template(model, tmp_path / "t.gguf"))
