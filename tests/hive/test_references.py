"""Model references: every accepted form, and the refusals that name them."""

from __future__ import annotations

import pytest

from rbee.errors import InvalidRequestError
from rbee.hive.references import ModelRef, parse_reference, pick_gguf, quant_of


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("gemma3-270m", ModelRef("gemma3-270m", "embedded")),
        ("hf:org/repo", ModelRef("hf:org/repo", "hf", repo="org/repo")),
        ("hf:org/repo:q4_k_m", ModelRef("hf:org/repo:Q4_K_M", "hf", repo="org/repo", quant="Q4_K_M")),
        ("hf:org/repo/file.gguf", ModelRef("hf:org/repo/file.gguf", "hf", repo="org/repo", filename="file.gguf")),
        ("hf:Org-1/re.po_2/sub/f-Q8_0.gguf",
         ModelRef("hf:Org-1/re.po_2/sub/f-Q8_0.gguf", "hf", repo="Org-1/re.po_2", filename="sub/f-Q8_0.gguf")),
        ("file:/abs/path.gguf", ModelRef("file:/abs/path.gguf", "file", path="/abs/path.gguf")),
        ("  gemma3-270m ", ModelRef("gemma3-270m", "embedded")),
    ],
)
def test_accepted_forms(raw: str, expected: ModelRef) -> None:
    assert parse_reference(raw) == expected


@pytest.mark.parametrize(
    "raw",
    ["", "   ", None, 42, "llama3", "ollama:llama3", "hf:", "hf:org", "hf:/repo", "hf:org/repo/", "hf:org/repo/file.bin",
     "hf:org/repo/../x.gguf", "hf:org/repo/file.gguf:Q4_K_M", "hf:org/repo:Q4-K", "file:relative.gguf",
     "file:/a/../b.gguf", "file:/abs/model.bin", "hf:.org/repo"],
)
def test_refusals_name_the_accepted_forms(raw: object) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        parse_reference(raw)
    assert caught.value.http_status == 400
    for form in ("hf:org/repo", "hf:org/repo:Q4_K_M", "hf:org/repo/file.gguf", "file:/abs/path.gguf", "gemma3-270m"):
        assert form in caught.value.message
    assert caught.value.details[0]["field"] == "model"


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
