"""Which GGUF of a Hub repository a reference means: quantisation names and preferences."""

from __future__ import annotations

from rbee.hive.download import pick_gguf, quant_of


def test_quant_of_file_names() -> None:
    assert quant_of("Llama-3.2-1B-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert quant_of("sub/model.q8_0.gguf") == "Q8_0"
    assert quant_of("model-f16.gguf") == "F16"
    assert quant_of("model-IQ4_XS.gguf") == "IQ4_XS"
    assert quant_of("model.gguf") is None


def test_pick_gguf_prefers_q4_k_m_then_q5_k_m_q8_0_f16() -> None:
    files = ["README.md", "m-F16.gguf", "m-Q8_0.gguf", "m-Q5_K_M.gguf", "m-Q4_K_M.gguf", "m-Q2_K.gguf"]
    assert pick_gguf(files, None) == "m-Q4_K_M.gguf"
    assert pick_gguf(files[:-2], None) == "m-Q5_K_M.gguf"
    assert pick_gguf(files[:3], None) == "m-Q8_0.gguf"
    assert pick_gguf(files[:2], None) == "m-F16.gguf"
    assert pick_gguf(["m-Q2_K.gguf"], None) is None
    assert pick_gguf(files, "Q2_K") == "m-Q2_K.gguf"
    assert pick_gguf(files, "IQ1_S") is None
    # Split GGUFs are not one loadable file.
    assert pick_gguf(["m-Q4_K_M-00001-of-00002.gguf", "m-Q8_0.gguf"], None) == "m-Q8_0.gguf"
