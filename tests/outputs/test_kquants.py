"""k-quants (Q4_K, Q5_K, Q6_K) written by engine.outputs.kquants, read back by the gguf package's own
dequantisers, and the llama.cpp per-tensor rules of the q4_k_m / q5_k_m / q6_k mixes.

The quantisers were also compared byte for byte with ggml's C reference (quantize_row_q*_K_ref,
ggml-org/ggml, compiled with -ffp-contract=off): identical on 800 super-blocks per type including
zero, constant, one-signed and heavy-tailed rows (docs/GGUF.md); that comparison needs a C build of
ggml and is not run here.
"""
import numpy as np
import pytest

from engine.outputs import export
from engine.outputs import gguf_write


def _data():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((64, 1024)) * 0.02).astype(np.float32)
    edge = np.zeros((4, 1024), dtype=np.float32)                 # a zero row
    edge[1] = 0.75                                                # a constant row
    edge[2] = np.abs(rng.standard_normal(1024) * 0.02)            # one-signed (min clamps to 0)
    edge[3] = rng.standard_t(2, 1024) * 0.01                      # heavy tails
    return x, edge


def _roundtrip(x, name):
    import gguf
    qt = gguf.GGMLQuantizationType[name]
    q = gguf_write.encode(x, qt)                                   # the path export writes with
    assert q.dtype == np.uint8 and q.shape == tuple(gguf.quant_shape_to_byte_shape(x.shape, qt))
    return gguf.quants.dequantize(q, qt), q


# relative RMS error bounds on N(0, 0.02^2) weights (measured: Q4_K 0.0719, Q5_K 0.0363,
# Q6_K 0.0178; the legacy types at the same bits: Q4_0 0.0861, Q5_0 0.0428)
BOUNDS = {"Q4_K": 0.08, "Q5_K": 0.04, "Q6_K": 0.02}


@pytest.mark.parametrize("name", sorted(BOUNDS))
def test_kquant_reads_back_within_bound(name):
    import gguf
    x, edge = _data()
    y, q = _roundtrip(x, name)
    rel = float(np.sqrt(((y - x) ** 2).mean() / (x ** 2).mean()))
    assert 0 < rel <= BOUNDS[name]
    # better than the legacy type of (about) the same size, written by the gguf package
    legacy = {"Q4_K": "Q4_0", "Q5_K": "Q5_0", "Q6_K": "Q8_0"}[name]
    lt = gguf.GGMLQuantizationType[legacy]
    ly = gguf.quants.dequantize(gguf.quants.quantize(x, lt), lt)
    lrel = float(np.sqrt(((ly - x) ** 2).mean() / (x ** 2).mean()))
    if name != "Q6_K":
        assert rel < lrel and q.nbytes == gguf.quants.quantize(x, lt).nbytes
    else:
        assert q.nbytes < gguf.quants.quantize(x, lt).nbytes       # 6.56 bits against 8.5
    # every value within one quantisation step of its 16/32-value group
    nmax = {"Q4_K": 15, "Q5_K": 31, "Q6_K": 63}[name]
    g = 16 if name == "Q6_K" else 32
    xg, yg = x.reshape(-1, g), y.reshape(-1, g)
    step = (np.maximum(xg.max(1), 0) - np.minimum(xg.min(1), 0)) / nmax
    assert (np.abs(yg - xg).max(1) <= 1.5 * step + 1e-6).all()
    # edge rows: zeros stay zeros exactly, a constant row stays close, nothing is NaN
    ey, _ = _roundtrip(edge, name)
    assert np.isfinite(ey).all() and not ey[0].any()
    assert np.abs(ey[1] - 0.75).max() <= 0.75 * 2e-3
    assert np.sqrt(((ey[2:] - edge[2:]) ** 2).mean() / (edge[2:] ** 2).mean()) <= 2 * BOUNDS[name]


def test_kquants_order_by_bits():
    x, _ = _data()
    errs = [float(np.abs(_roundtrip(x, n)[0] - x).mean()) for n in ("Q4_K", "Q5_K", "Q6_K")]
    assert errs[0] > errs[1] > errs[2] > 0


def test_row_length_not_multiple_of_256_is_refused_by_the_quantiser():
    from engine.outputs import kquants
    with pytest.raises(ValueError, match="multiple of 256"):
        kquants.quantize(np.zeros((4, 128), dtype=np.float32), "Q4_K")


# --------------------------------------------------------------------------- llama.cpp's mixes

def _types(gguf_type, n_layer=32, hidden=4096, ffn=11008, has_output=True):
    names = {}
    for i in range(n_layer):
        for t, shape in (("attn_q", (hidden, hidden)), ("attn_k", (1024, hidden)), ("attn_v", (1024, hidden)),
                         ("attn_output", (hidden, hidden)), ("ffn_gate", (ffn, hidden)),
                         ("ffn_up", (ffn, hidden)), ("ffn_down", (hidden, ffn))):
            name = f"blk.{i}.{t}.weight"
            names[name] = gguf_write.tensor_type(name, shape, gguf_type, n_layer, has_output).name
        names[f"blk.{i}.attn_norm.weight"] = gguf_write.tensor_type("x", (hidden,), gguf_type, n_layer).name
    for name, shape in (("token_embd.weight", (32000, hidden)), ("output.weight", (32000, hidden))):
        names[name] = gguf_write.tensor_type(name, shape, gguf_type, n_layer, has_output).name
    return names


def test_q4_k_m_follows_llama_cpp_rules():
    t = _types("q4_k_m")
    # llama.cpp: "Q4_K_M uses Q6_K for half of the attention.wv and feed_forward.w2 tensors";
    # use_more_bits(i, 32): i < 4, i >= 28, or (i - 4) % 3 == 2
    more = [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    for kind in ("attn_v", "ffn_down"):
        assert [i for i in range(32) if t[f"blk.{i}.{kind}.weight"] == "Q6_K"] == more
        assert {t[f"blk.{i}.{kind}.weight"] for i in range(32) if i not in more} == {"Q4_K"}
    for kind in ("attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"):
        assert {t[f"blk.{i}.{kind}.weight"] for i in range(32)} == {"Q4_K"}
    assert t["output.weight"] == "Q6_K" and t["token_embd.weight"] == "Q4_K"
    assert t["blk.0.attn_norm.weight"] == "F32"
    m5 = _types("q5_k_m")
    assert [i for i in range(32) if m5[f"blk.{i}.ffn_down.weight"] == "Q6_K"] == more
    assert m5["blk.5.attn_q.weight"] == "Q5_K" and m5["output.weight"] == "Q6_K"


def test_q6_k_s_variants_pure_and_tied_embeddings():
    assert set(_types("q6_k").values()) == {"Q6_K", "F32"}
    s4 = _types("q4_k_s")          # Q4_K_S: attn_v of the first 4 layers and ffn_down of the first 1/8 at Q5_K
    assert [i for i in range(32) if s4[f"blk.{i}.attn_v.weight"] == "Q5_K"] == [0, 1, 2, 3]
    assert [i for i in range(32) if s4[f"blk.{i}.ffn_down.weight"] == "Q5_K"] == [0, 1, 2, 3]
    assert set(_types("q5_k_s").values()) == {"Q5_K", "Q6_K", "F32"}
    pure = _types("q4_k")           # llama-quantize --pure: every weight, output included
    assert set(pure.values()) == {"Q4_K", "F32"}
    tied = _types("q4_k_m", has_output=False)    # tied embeddings: the embedding is the output head
    assert tied["token_embd.weight"] == "Q6_K"


def test_rows_not_a_multiple_of_256_fall_back_as_llama_cpp_does():
    tt = gguf_write.tensor_type
    assert tt("blk.0.attn_q.weight", (128, 128), "q4_k_m", 2).name == "Q5_0"
    assert tt("blk.0.attn_q.weight", (128, 128), "q5_k_m", 2).name == "Q5_1"
    assert tt("blk.0.attn_q.weight", (128, 128), "q6_k", 2).name == "Q8_0"
    assert tt("blk.1.attn_v.weight", (64, 128), "q4_k_m", 2).name == "Q8_0"     # Q6_K's fallback
    assert tt("blk.0.attn_q.weight", (48, 48), "q4_k_m", 2).name == "F16"        # not even 32
    assert tt("output.weight", (1000, 128), "q4_k_m", 2).name == "Q8_0"          # llama.cpp's output rule


def test_one_list_of_types():
    assert gguf_write.check_type("Q4_K_M") == "q4_k_m" and gguf_write.check_type("q6_K") == "q6_k"
    assert gguf_write.check_type("q5_K") == "q5_k"
    assert all(gguf_write.TYPES[t].tolerance for t in gguf_write.GGUF_TYPES)    # every type we write has its bound
    with pytest.raises(gguf_write.GGUFError, match="llama-quantize FILE-f16.gguf OUT.gguf Q3_K_M"):
        gguf_write.check_type("q3_k_m")
    with pytest.raises(gguf_write.GGUFError, match="k-quants are for whole models"):
        gguf_write.check_adapter_type("q4_k_m")
    assert gguf_write.check_adapter_type("q8_0") == "q8_0"
